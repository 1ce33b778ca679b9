"""The recording's bulk on disk: per-step gradients and checkpoints appended to a temporary file as fine-tuning
produces them (`Spool`), read back one vector at a time (`Rows`), and written out as a safetensors file streamed
piece by piece (`write_safetensors`), so no (steps × parameters) array is ever held in memory (docs/path.md).

A 7B model with LoRA r 16 on every linear layer has ~40M trainable parameters: 160 MB a step in float32, 20 GB for
125 steps. Held in memory (as recordings once were) that exceeds most hosts; on disk it costs one sequential write
a step, and a replay reads one step at a time. Each piece's sha256 is computed from the very bytes written, so the
header's checksums never need a second pass over the data.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import weakref
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

# safetensors' dtype names; the recording stores these (a low-precision gradient: BF16)
ST_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
ST_DTYPES = {v: k for k, v in ST_NAMES.items()}
MAX_HEADER = 100 * 2**20  # safetensors' own limit on a header


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A tensor's raw bytes on the host (one transfer from its device)."""
    return memoryview(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())


def pread_exact(fd: int, nbytes: int, offset: int, what: str) -> bytes:
    """`nbytes` at `offset` of an open file, or OSError naming `what` when the file is shorter (truncated after it
    was opened or written)."""
    data = os.pread(fd, nbytes, offset)
    if len(data) != nbytes:
        raise OSError(f"{what} ({len(data)} of {nbytes} bytes at {offset})")
    return data


def _discard(path: Path, file) -> None:
    with contextlib.suppress(OSError):
        file.close()
    with contextlib.suppress(OSError):
        os.unlink(path)


class Spool:
    """An append-only temporary file (named by `llmeraser.io`'s convention beside `target`, so a killed run's is
    removed by the next write there), deleted when closed or garbage-collected: a recording's bulk while it is being
    made. `append` returns each piece's offset and the sha256 of the bytes written."""

    def __init__(self, target: str | os.PathLike):
        from llmeraser.io import _new_temporary

        Path(target).parent.mkdir(parents=True, exist_ok=True)
        self.path, fd = _new_temporary(Path(target), folder=False)
        self.file = open(self.path, "r+b")  # noqa: SIM115 (read back while written; closed by `close`)
        os.close(fd)  # created write-only
        self.size = 0
        self._finalizer = weakref.finalize(self, _discard, self.path, self.file)

    def append(self, t: torch.Tensor) -> tuple[int, str]:
        data = tensor_bytes(t)
        offset = self.size
        self.file.write(data)
        self.size += data.nbytes
        return offset, hashlib.sha256(data).hexdigest()

    def read(self, offset: int, nbytes: int) -> bytes:
        self.file.flush()
        return pread_exact(self.file.fileno(), nbytes, offset, f"{self.path}: short read")

    def close(self) -> None:
        """Delete the file (idempotent)."""
        self._finalizer()


class Rows:
    """A stack of equal-length vectors kept on disk, read one at a time: `rows[k]` is vector k as a tensor of
    `as_dtype` (the precision the replay computes in), `rows[a:b]` stacks a slice (small uses only), `len(rows)`,
    `rows.shape`, `rows.dtype` (as stored), `rows.raw(k)` (as stored), `rows.sha256` (each vector's, when known from
    the writing). `fetch(k)` returns vector k as stored; `keep` holds what must stay open while the rows are read."""

    def __init__(self, fetch: Callable[[int], torch.Tensor], n: int, p: int, dtype: torch.dtype,
                 as_dtype: torch.dtype, *, sha256: list[str] | None = None, keep: object = None, flat: bool = False):
        self._fetch, self.n, self.p, self.dtype, self.as_dtype = fetch, n, p, dtype, as_dtype
        self.sha256, self.keep, self.flat = sha256, keep, flat

    @classmethod
    def spooled(cls, spool: Spool, offsets: list[int], p: int, dtype: torch.dtype, as_dtype: torch.dtype,
                sha256: list[str]) -> Rows:
        nbytes = p * dtype.itemsize

        def fetch(k: int) -> torch.Tensor:
            return torch.frombuffer(bytearray(spool.read(offsets[k], nbytes)), dtype=dtype)

        return cls(fetch, len(offsets), p, dtype, as_dtype, sha256=sha256, keep=spool)

    @classmethod
    def of(cls, tensors: list[torch.Tensor]) -> Rows:
        """Rows over vectors already in memory (a checkpoint's θ, m, v)."""
        t0 = tensors[0]
        return cls(lambda k: tensors[k], len(tensors), t0.numel(), t0.dtype, t0.dtype)

    def one(self, k: int) -> Rows:
        """Vector k alone, shaped (p,) (a checkpoint's θ, m or v, written as its own tensor)."""
        return Rows(lambda _: self.raw(k), 1, self.p, self.dtype, self.as_dtype, keep=self, flat=True,
                    sha256=None if self.sha256 is None else [self.sha256[k]])

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.p,) if self.flat else (self.n, self.p)

    @property
    def nbytes(self) -> int:
        return self.n * self.p * self.dtype.itemsize

    def __len__(self) -> int:
        return self.n

    def raw(self, k: int) -> torch.Tensor:
        if not -self.n <= k < self.n:
            raise IndexError(f"row {k} of {self.n}")
        return self._fetch(k % self.n)

    def __getitem__(self, k):
        if isinstance(k, slice):
            rows = [self[i] for i in range(*k.indices(self.n))]
            return torch.stack(rows) if rows else torch.empty((0, self.p), dtype=self.as_dtype)  # host: from disk
        return self.raw(int(k)).to(self.as_dtype)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self[k] for k in range(self.n))


def nbytes(x) -> int:
    """The bytes a tensor or `Rows` holds."""
    return x.nbytes if isinstance(x, Rows) else x.numel() * x.element_size()


def pieces(x) -> Iterator[memoryview]:
    """A tensor's or `Rows`' bytes as stored, one vector at a time."""
    if isinstance(x, Rows):
        for k in range(len(x)):
            yield tensor_bytes(x.raw(k))
    elif x.dim() > 1:
        for row in x:
            yield tensor_bytes(row)
    else:
        yield tensor_bytes(x)


def write_safetensors(path: str | os.PathLike, entries: Iterable[tuple[str, object]], metadata: dict[str, str]) -> None:
    """Write `entries` (name, tensor or `Rows`) as a safetensors file at `path`, streamed: the header (8-byte
    little-endian length, then JSON with each tensor's dtype, shape and data offsets and `__metadata__`, padded with
    spaces to 8 bytes as safetensors pads it) and then each tensor's bytes in order, one vector at a time. Written
    to a temporary beside `path` and renamed into place (`llmeraser.io`'s convention); removed on failure."""
    from llmeraser.io import atomic_write_chunks

    entries = list(entries)
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, x in entries:
        shape = list(x.shape)
        size = nbytes(x)
        header[name] = {"dtype": ST_NAMES[x.dtype], "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)
    atomic_write_chunks(path, itertools.chain([len(text).to_bytes(8, "little"), text],
                                              (piece for _, x in entries for piece in pieces(x))))


class TensorFile:
    """A safetensors file (already validated by safetensors' own reader) read with pread, one vector at a time:
    never memory-mapped, so a file truncated or rewritten in place after it was opened gives an error naming it,
    not a crash. The open file stays valid when the file is renamed or removed."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        self.file = open(path, "rb")  # noqa: SIM115 (held open by the Rows reading from it)
        n = int.from_bytes(self._read(0, 8), "little")
        if n > MAX_HEADER:
            raise ValueError(f"{path}: a header of {n:,} bytes")
        header = json.loads(self._read(8, n))
        self.start = 8 + n
        self.entries = {k: v for k, v in header.items() if k != "__metadata__"}
        weakref.finalize(self, self.file.close)

    def _read(self, offset: int, nbytes: int) -> bytes:
        return pread_exact(self.file.fileno(), nbytes, offset, f"{self.path} was truncated after it was opened")

    def keys(self) -> list[str]:
        return list(self.entries)

    def spec(self, name: str) -> tuple[tuple[int, ...], torch.dtype | None]:
        e = self.entries[name]
        return tuple(e["shape"]), ST_DTYPES.get(e["dtype"])

    def vector(self, name: str, k: int | None = None) -> torch.Tensor:
        """Tensor `name` (a vector), or row k of a matrix, as stored."""
        shape, dtype = self.spec(name)
        size = shape[-1] * dtype.itemsize
        offset = self.start + self.entries[name]["data_offsets"][0] + (0 if k is None else k * size)
        if not size:
            return torch.empty(0, dtype=dtype)  # host: rows read from disk live on the host
        return torch.frombuffer(bytearray(self._read(offset, size)), dtype=dtype)
