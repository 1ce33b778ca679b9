"""Resource guard: estimate what a memory-hungry step needs before starting it, and refuse if it cannot fit.

Two steps here grow with the problem, not with a batch: a dense curvature matrix (p × p, plus the copy a solve
factorises) and a matrix of per-example gradients (n × p). Both are checked against the memory the OS reports as
available (`MemAvailable` in /proc/meminfo; where that is unknown the check passes), keeping a safety margin.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from llmeraser.errors import ResourceError

MARGIN = 0.8  # use at most this share of the available memory

# What helps when a command runs out of device memory (its own options), said with the error.
OOM_ADVICE = {
    "finetune": "lower --batch-size or --max-length, or load the base in --dtype bfloat16",
    "fit-curvature": "lower --batch-size, fit on a sample (--samples N), or load the base in --dtype bfloat16",
    "unlearn": "lower --batch-size (gradients and curvature products are taken a batch at a time) or "
               "--solver-batch-size, or use --solver ekfac with fitted factors",
    "evaluate": "lower --batch-size",
}


def available_bytes() -> int | None:
    """Memory the OS can give without swapping (Linux `MemAvailable`), or None where it is unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def require(need: int, what: str, instead: str) -> None:
    """Raise ResourceError if `need` bytes do not fit in MARGIN × the available memory.

    Args:
        need: Estimated peak bytes of the step.
        what: The step, for the message ("the dense solver's 40,000 × 40,000 matrix").
        instead: What to do instead, naming an option ("use --solver cg").
    """
    free = available_bytes()
    if free is not None and need > MARGIN * free:
        raise ResourceError(f"{what} needs about {gib(need)} but {gib(free)} of memory is available; {instead}")


@contextlib.contextmanager
def device_memory(what: str, instead: str) -> Iterator[None]:
    """Within the block, a device running out of memory (torch's OutOfMemoryError, CUDA's included) becomes a
    ResourceError that names `what` did not fit and `instead` (an option that helps): an error the user can act on,
    exit code 2 on the command line, not a traceback. The tensors of the failed step are freed as the exception
    unwinds, so the process can go on (e.g. retry smaller)."""
    try:
        yield
    except out_of_memory_error() as e:
        raise ResourceError(f"{what} did not fit in the device's memory ({oom_detail(e)}); {instead}") from e


def out_of_memory_error() -> type[BaseException]:
    """torch's out-of-memory exception (torch.OutOfMemoryError; torch.cuda's name before torch 2.5)."""
    import torch

    return getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def oom_detail(e: BaseException) -> str:
    """The first line of an out-of-memory message (torch's runs to a paragraph of allocator advice)."""
    return (str(e).strip().splitlines() or ["out of memory"])[0][:200]
