"""Resource guard: estimate what a memory-hungry step needs before starting it, and refuse (or choose a cheaper
way) if it cannot fit.

Two steps here grow with the problem, not with a batch: a dense curvature matrix (p × p, plus the copy a solve
factorises) and a matrix of per-example gradients (n × p). Both are checked against the memory the OS reports as
available (`MemAvailable` in /proc/meminfo; where that is unknown the check passes), keeping a safety margin. On an
accelerator the same question is asked of the device (`device_free_bytes`: CUDA's `mem_get_info`), and an
out-of-memory error raised there anyway (fragmentation, another process) becomes a ResourceError naming what did not
fit and the option that helps (`device_memory`), not a traceback.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from llmeraser.errors import ResourceError

MARGIN = 0.8  # use at most this share of the available memory

# What helps when a command runs out of device memory (its own options), said with the error.
OOM_ADVICE = {
    "finetune": "lower --batch-size or --max-length, or load the base in --dtype bfloat16",
    "fit-curvature": "lower --batch-size, fit on a sample (--samples N), use --kind ekfac (its memory does not grow "
                     "with N), or load the base in --dtype bfloat16",
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


def device_free_bytes(device: torch.device | str) -> int | None:
    """Free memory on `device`: the host's for the CPU, CUDA's `mem_get_info` for a GPU (what the caching
    allocator already holds but does not use counts as free: it is reused before the device is asked for more),
    None where unknown (other accelerators)."""
    device = torch.device(device)
    if device.type == "cpu":
        return available_bytes()
    if device.type == "cuda":
        try:
            free, _total = torch.cuda.mem_get_info(device)
        except (RuntimeError, AssertionError):
            return None
        return int(free) + int(torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    return None


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def fits(need: int, device: torch.device | str = "cpu") -> bool:
    """Whether `need` bytes fit in MARGIN × the free memory of `device` (True where that is unknown)."""
    free = available_bytes() if torch.device(device).type == "cpu" else device_free_bytes(device)
    return free is None or need <= MARGIN * free


def require(need: int, what: str, instead: str, device: torch.device | str = "cpu") -> None:
    """Raise ResourceError if `need` bytes do not fit in MARGIN × the available memory (of `device`: the host's
    by default).

    Args:
        need: Estimated peak bytes of the step.
        what: The step, for the message ("the dense solver's 40,000 × 40,000 matrix").
        instead: What to do instead, naming an option ("use --solver cg").
        device: Where the bytes are needed.
    """
    device = torch.device(device)
    free = available_bytes() if device.type == "cpu" else device_free_bytes(device)
    if free is not None and need > MARGIN * free:
        where = "memory" if device.type == "cpu" else f"{device} memory"
        raise ResourceError(f"{what} needs about {gib(need)} but {gib(free)} of {where} is available; {instead}")


OUT_OF_MEMORY = (torch.cuda.OutOfMemoryError,)  # torch.OutOfMemoryError is the same class where it exists


@contextlib.contextmanager
def device_memory(what: str, instead: str) -> Iterator[None]:
    """Within the block, a device running out of memory becomes a ResourceError that names `what` did not fit and
    `instead` (an option that needs less): an error the user can act on, exit code 2 on the command line, not a
    traceback. The failed step's tensors are freed as the exception unwinds and the cached blocks handed back to the
    device, so the process can go on (e.g. retry smaller)."""
    try:
        yield
    except OUT_OF_MEMORY as e:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise ResourceError(f"{what} did not fit in the device's memory ({oom_detail(e)}); {instead}") from e


def oom_detail(e: BaseException) -> str:
    """The first line of an out-of-memory message (torch's runs to a paragraph of allocator advice)."""
    return (str(e).strip().splitlines() or ["out of memory"])[0][:200]
