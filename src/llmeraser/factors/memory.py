"""Where a fit keeps what it needs, decided before the pass from the memory there is (`Plan`).

The Kronecker kinds need O(Σ in² + out²) memory whatever N is. The Gram kinds need every fitted example's gradient,
N × p (N: the examples the fit passes over, at most `fit.FIT_SAMPLE` unless `--samples` asks for more), which stops
fitting as N or p grows; they then fall back to a sketch whose size does not grow with N:

- woodbury: a rank-k Nyström approximation of F = GᵀG/N from one streaming pass, Y = F Ω for a seeded random
  orthonormal Ω (p × k), p × k memory (`sketch`);
- datainf: k examples drawn at random (seeded), whose per-example inverses' mean estimates the mean over all N
  without bias (DataInf is a mean of per-example terms, so row sampling is its natural sketch).

Per-example gradients live on the model's device while they fit its free memory (CUDA's `mem_get_info`), else on
the host as before; the fitted factors themselves go to the host once, at the end of the fit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from llmeraser import distributed
from llmeraser.errors import ResourceError
from llmeraser.params import ParamView
from llmeraser.resources import fits, gib

SKETCH_MAX = 1024  # the largest automatic sketch (Nyström rank, or sampled examples for datainf)
SKETCH_MIN = 8  # below this a sketch is no approximation worth making: refused, naming ekfac
HALVINGS = 32  # more than enough halvings of any size to reach SKETCH_MIN
EKFAC_INSTEAD = "use --kind ekfac (Kronecker factors, memory independent of the number of examples)"


@dataclass
class Plan:
    """What the pass computes and where it keeps it."""

    kronecker: bool  # the Kronecker sums Σ aaᵀ, Σ ggᵀ (kfac, ekfac)
    keep: str | None = None  # where per-example gradients are kept: "device", "host" or None (not kept)
    rows: list[int] | None = None  # the examples whose gradients are kept, sorted (None: all of them)
    rank: int = 0  # the Nyström sketch's rank for woodbury (0: none, the exact Gram)
    gram: dict = field(default_factory=dict)  # kind → {method, size, why}: the fit's meta and log say it

    @property
    def per_example(self) -> bool:
        """Whether the pass forms per-example gradients at all (kept, or fed to the sketch)."""
        return self.keep is not None or self.rank > 0


def plan(model: torch.nn.Module, dims: Sequence[int], kinds: Sequence[str], n: int, args) -> Plan:
    """The plan for fitting `kinds` on n examples of a model whose blocks have `dims` parameters each.

    Raises:
        ResourceError: not even the smallest sketch fits (the message names ekfac).
    """
    view = ParamView(model)
    device, item, p = view.device, view.params[0].element_size(), int(sum(dims))
    kinds = set(kinds)
    out = Plan(kronecker=bool({"kfac", "ekfac"} & kinds))
    where = "device" if device.type != "cpu" else "host"
    gram = {"woodbury", "datainf"} & kinds
    if gram:
        full = n * p * item  # every rank gathers all N rows, and the fit hands them to the host
        system = 3 * 8 * n * n if "woodbury" in kinds else 0  # G Gᵀ, its eigenvectors, eigh's workspace (float64)
        sizes = {}  # kind → (the largest size it may take, bytes (device, host) of a size)
        if "woodbury" in kinds:
            sizes["woodbury"] = (min(n, p, args.sketch or SKETCH_MAX), lambda k: (4 * 8 * p * k, p * k * (8 + item)))
        if "datainf" in kinds:
            sizes["datainf"] = (min(n, args.sketch or SKETCH_MAX), lambda k: (k * p * item, k * p * item))
        exact, halved = _agree(args.sketch == 0 and fits(full + system),
                               {k: _halvings(start, need, device) for k, (start, need) in sizes.items()})
        if exact:
            out.keep = "device" if where == "device" and fits(full + system, device) else "host"
            out.gram = {k: {"method": "exact", "size": n, "why": f"the {n:,} × {p:,} per-example gradients "
                            f"({gib(full)}) fit in memory"} for k in gram}
            return out
        why = (f"a sketch of size {args.sketch} was asked for (--sketch)" if args.sketch else
               f"the {n:,} × {p:,} per-example gradients ({gib(full + system)} with the Gram system) do not fit in "
               f"memory")
        for kind, (start, _need) in sizes.items():
            if halved[kind] >= HALVINGS:
                what = {"woodbury": "woodbury's Nyström sketch", "datainf": "datainf's sampled gradients"}[kind]
                raise ResourceError(f"{what} of size {min(SKETCH_MIN, start)} over {p:,} parameters does not fit "
                                    f"in memory either; {EKFAC_INSTEAD}")
        if "woodbury" in kinds:
            out.rank = sizes["woodbury"][0] >> halved["woodbury"]
            out.gram["woodbury"] = {"method": "nystrom", "size": out.rank, "why": why}
        if "datainf" in kinds:
            k = sizes["datainf"][0] >> halved["datainf"]
            gen = torch.Generator().manual_seed(args.seed)
            out.rows = sorted(torch.randperm(n, generator=gen)[:k].tolist())  # host: indices
            out.keep = "device" if where == "device" else "host"
            out.gram["datainf"] = {"method": "sampled", "size": k, "why": why}
    if "ekfac" in kinds and out.keep is None:  # the correction reuses kept gradients, else makes a second pass
        rows = len(distributed.batch_range(n, args.batch_size)) * p * item
        if where == "device" and fits(rows, device):
            out.keep = "device"
        elif fits(rows):
            out.keep = "host"
    return out


def _halvings(start: int, need, device: torch.device) -> int:
    """How many times `start` is halved before need(size) = (device bytes, host bytes) fits; HALVINGS when no size
    of at least min(SKETCH_MIN, start) fits."""
    for h in range(HALVINGS):
        k = start >> h
        if k < min(SKETCH_MIN, start):
            break
        on_device, on_host = need(k)
        if fits(on_host + on_device) if device.type == "cpu" else fits(on_host) and fits(on_device, device):
            return h
    return HALVINGS


def _agree(exact: bool, halved: dict[str, int]) -> tuple[bool, dict[str, int]]:
    """The most conservative choice over the ranks (every rank must make the same one: the collectives follow it):
    exact only if exact fits on every rank, each sketch as small as the tightest rank needs. With the one sum
    all-reduce there is: a count of ranks where exact does not fit, and per kind a one-hot of its halvings (the
    largest index present is the maximum)."""
    if not distributed.is_distributed():
        return exact, halved
    kinds = sorted(halved)
    votes = torch.zeros(1 + len(kinds) * (HALVINGS + 1), dtype=torch.float64)  # host: flags the collective moves
    votes[0] = 0.0 if exact else 1.0
    for j, kind in enumerate(kinds):
        votes[1 + j * (HALVINGS + 1) + halved[kind]] = 1.0
    votes = distributed.all_reduce(votes, "the fit's memory plan")
    agreed = {kind: int(torch.nonzero(votes[1 + j * (HALVINGS + 1):1 + (j + 1) * (HALVINGS + 1)]).max())
              for j, kind in enumerate(kinds)}
    return bool(votes[0] == 0), agreed
