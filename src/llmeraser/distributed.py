"""Data parallelism on torch.distributed: every pass over training data is a sum over examples, so it shards.

Each rank takes a contiguous run of a pass's batches (`batches`), computes its partial sum, and an all-reduce
(`all_reduce`) adds the partial sums up, so every rank holds the full result: gradients of the edited examples,
curvature-vector products, K-FAC/EK-FAC statistics, per-example gradients (each row computed by one rank, zero on the
others), fine-tuning gradients. Solvers then run the same arithmetic on every rank (their random draws are seeded, so
every rank draws alike), and the result is broadcast from rank 0 so that Δθ is bitwise identical everywhere.

State — the ledger, the factor store, the output adapter, the report — is read and written by rank 0 alone; what the
other ranks need of it comes from rank 0 (`on_rank0`), as JSON (never pickle). The inputs every rank reads itself
(base model, adapter, training data, request) are compared by hash across ranks before any work (`check_same`).

Nothing here does anything unless a process group with more than one rank is initialised (`init_from_env`, called
by the command line under torchrun, or by a library user): then `shard(n)` is range(n) and collectives return their
input, so single-process runs are unchanged. A collective that fails — a rank died, or did not answer within the
timeout — raises `DistributedError` on the survivors; the command line turns it into a clean failure (no output,
the ledger entry marked failed).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
from collections.abc import Callable
from typing import TypeVar

import torch

from llmeraser.errors import LLMEraserRuntimeError, UserInputError

logger = logging.getLogger(__name__)

T = TypeVar("T")
TIMEOUT_ENV, BACKEND_ENV = "LLMERASER_DIST_TIMEOUT", "LLMERASER_DIST_BACKEND"
DEFAULT_TIMEOUT = 1800.0  # seconds a rank waits for the others at a collective


class DistributedError(LLMEraserRuntimeError):
    """A collective failed: another rank died, or did not answer within the timeout."""


class Mirrored(UserInputError):
    """Rank 0's bad-input error, raised again on the other ranks (rank 0 already reported it)."""


def _dist():
    import torch.distributed as dist

    return dist


def is_distributed() -> bool:
    """True when a default process group with more than one rank is initialised."""
    dist = _dist()
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return _dist().get_rank() if is_distributed() else 0


def world_size() -> int:
    return _dist().get_world_size() if is_distributed() else 1


def shard(n: int) -> range:
    """This rank's contiguous slice of range(n): sizes differ by at most one, lower ranks take the extra ones."""
    w, r = world_size(), rank()
    q, extra = divmod(n, w)
    start = r * q + min(r, extra)
    return range(start, start + q + (r < extra))


def batches(n: int, batch_size: int) -> list[list[int]]:
    """This rank's batches of range(n): the single-process batches [0, b), [b, 2b), ... shared out in contiguous
    runs, so each batch's result is the single process's bit for bit and only the order of the sum differs."""
    return [list(range(j * batch_size, min(n, (j + 1) * batch_size)))
            for j in shard(-(-n // batch_size))]


def batch_range(n: int, batch_size: int) -> range:
    """The examples `batches(n, batch_size)` covers on this rank: a contiguous range."""
    mine = shard(-(-n // batch_size))
    return range(min(n, mine.start * batch_size), min(n, mine.stop * batch_size))


def _collective(op: Callable, tensor: torch.Tensor, what: str, **kw) -> torch.Tensor:
    """Run `op` (an in-place torch.distributed collective) on `tensor`, moving it to the backend's device and
    back, and turn a failure into a DistributedError that says which rank saw it and why."""
    where = device()
    work = tensor if tensor.device == where else tensor.to(where)
    try:
        op(work, **kw)
    except (RuntimeError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise DistributedError(f"rank {rank()} of {world_size()}: the {what} failed, so another rank died or did "
                               f"not answer within the timeout ({first})") from e
    if work is not tensor:
        tensor.copy_(work)
    return tensor


def all_reduce(tensor: torch.Tensor, what: str = "all-reduce") -> torch.Tensor:
    """Sum `tensor` over the ranks, in place (every rank then holds the sum). Returns it."""
    if not is_distributed():
        return tensor
    return _collective(_dist().all_reduce, tensor, what)


def broadcast(tensor: torch.Tensor, what: str = "broadcast", src: int = 0) -> torch.Tensor:
    """Overwrite `tensor` with rank `src`'s, in place. Returns it."""
    if not is_distributed():
        return tensor
    return _collective(_dist().broadcast, tensor, what, src=src)


def broadcast_json(obj: object, what: str) -> object:
    """Rank 0's `obj` (JSON-serialisable) on every rank; the other ranks' argument is ignored. No pickle."""
    if not is_distributed():
        return obj
    data = json.dumps(obj).encode("utf-8") if rank() == 0 else b""
    size = broadcast(torch.tensor([len(data)], dtype=torch.long), what)  # host: _collective moves it
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8) if rank() == 0 else \
        torch.empty(int(size), dtype=torch.uint8)  # host: bytes of JSON; _collective moves them
    broadcast(buf, what)
    return json.loads(buf.numpy().tobytes().decode("utf-8")) if rank() != 0 else obj


def on_rank0(fn: Callable[[], T], what: str) -> T:
    """`fn()` run by rank 0 alone (it reads or writes state: the ledger, the factor store), its JSON result given to
    every rank. When it raises, the other ranks raise too: a bad-input error as `Mirrored` (rank 0 reports it), any
    other as DistributedError; so no rank is left waiting at the next collective."""
    if not is_distributed():
        return fn()
    result, error = None, None
    if rank() == 0:
        try:
            result = fn()
        except BaseException as e:
            error = e
        shared = {"error": (str(error).splitlines() or [type(error).__name__])[0],
                  "input": isinstance(error, UserInputError)} if error is not None else {"result": result}
        broadcast_json(shared, what)
        if error is not None:
            raise error
        return result
    shared = broadcast_json(None, what)
    if "error" in shared:
        if shared["input"]:
            raise Mirrored(shared["error"])
        raise DistributedError(f"rank 0 failed while {what}: {shared['error']}")
    return shared["result"]


def check_same(values: dict[str, str], what: str) -> None:
    """Fail on every rank, naming the first difference, unless every rank passed the same `values` (e.g. the hashes
    of the inputs each rank read from its own disk)."""
    if not is_distributed():
        return
    reference = broadcast_json(values, what)
    differs = [k for k in values if values[k] != reference.get(k)]
    bad = all_reduce(torch.tensor([float(bool(differs))]), what)  # host: one flag; _collective moves it
    if differs:
        raise UserInputError(f"rank {rank()} read a different {differs[0]} than rank 0 ({values[differs[0]][:12]}… "
                             f"vs {str(reference.get(differs[0]))[:12]}…): every rank must see the same inputs")
    if float(bad) > 0:
        raise Mirrored(f"{what}: another rank read different inputs than rank 0 (its error names the file)")


# ------------------------------------------------------------------------------------------------------ set-up
def launched() -> bool:
    """True when this process was started by torchrun (or another launcher) as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def timeout_seconds() -> float:
    text = os.environ.get(TIMEOUT_ENV, "")
    try:
        value = float(text) if text else DEFAULT_TIMEOUT
    except ValueError:
        raise UserInputError(f"{TIMEOUT_ENV} must be a number of seconds, got {text!r}") from None
    if not value > 0:
        raise UserInputError(f"{TIMEOUT_ENV} must be > 0 seconds, got {text!r}")
    return value


def init_from_env(backend: str | None = None, timeout: float | None = None) -> bool:
    """Join the process group that torchrun describes in the environment (RANK, WORLD_SIZE, MASTER_ADDR, ...).

    Backend: `backend`, else $LLMERASER_DIST_BACKEND, else nccl when CUDA is available (one GPU per local rank)
    and gloo on CPU. Timeout: `timeout` seconds, else $LLMERASER_DIST_TIMEOUT, else 1800. Returns False (and does
    nothing) outside a multi-process launch.
    """
    dist = _dist()
    if not launched() or dist.is_initialized():
        return dist.is_initialized()
    backend = backend or os.environ.get(BACKEND_ENV) or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend not in ("gloo", "nccl"):
        raise UserInputError(f"{BACKEND_ENV} must be gloo or nccl, got {backend!r}")
    kw = {}
    if backend == "nccl":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        kw["device_id"] = torch.device("cuda", local)
    seconds = timeout if timeout is not None else timeout_seconds()
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=seconds), **kw)
    logger.info("rank %d of %d (%s, timeout %.0f s)", rank(), world_size(), backend, seconds)
    return True


def device() -> torch.device:
    """The device this rank computes and communicates on: its GPU under nccl, else the CPU."""
    dist = _dist()
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shutdown(*, completed: bool = False) -> None:
    """Leave the process group. After a command that `completed` on every rank, first meet the others at a barrier:
    a gloo rank tearing its connections down while its peer still uses them aborts the process at exit ("terminate
    called without an active exception", seen in about one launch in fifteen). A failed command skips the barrier:
    its peers may never reach it."""
    dist = _dist()
    if dist.is_initialized():
        if completed:
            dist.barrier()
        dist.destroy_process_group()
