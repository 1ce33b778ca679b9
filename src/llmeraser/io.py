"""Atomic writes: every output is written to a temporary path beside its target and renamed into place,
so a crash leaves either the old state or the complete new one, never half a file or half a directory."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from llmeraser.errors import UserInputError


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: object) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def check_new_output(out: str | os.PathLike) -> None:
    """Refuse an output folder that exists and is not empty (outputs never overwrite anything)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserInputError(f"output {str(out)!r} already exists and is not an empty folder; choose another --out")


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, *, protect: tuple[str | os.PathLike, ...] = (),
               before_rename: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Yield a fresh temporary folder; on success rename it to `out`, on any error delete it.

    Refuses an `out` that exists and is not empty, and an `out` that is (or lies inside) one of `protect`
    (e.g. the input adapter): inputs are never overwritten. `before_rename(tmp)` runs on the finished, synced
    folder just before the rename (the ledger records the output's hash there).
    """
    out = Path(out).resolve()  # resolve, not absolute: '..' and symlinks must not sneak into a protected input
    for p in protect:
        p = Path(p).resolve()
        if out == p or p in out.parents:
            raise UserInputError(
                f"output folder {str(out)!r} would overwrite the input {str(p)!r}; choose another --out")
    check_new_output(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if before_rename is not None:
            before_rename(tmp)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.rename(tmp, out)
        _fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def canonical_json(obj: object) -> str:
    """The JSON text used for hashing: sorted keys, no spaces, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
