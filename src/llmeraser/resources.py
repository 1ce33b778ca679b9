"""Resource guard: estimate what a memory-hungry step needs before starting it, and refuse if it cannot fit.

Two steps here grow with the problem, not with a batch: a dense curvature matrix (p × p, plus the copy a solve
factorises) and a matrix of per-example gradients (n × p). Both are checked against the memory the OS reports as
available (`MemAvailable` in /proc/meminfo; where that is unknown the check passes), keeping a safety margin.
"""

from __future__ import annotations

import os

from llmeraser.errors import ResourceError

MARGIN = 0.8  # use at most this share of the available memory


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
