"""Logits at chosen positions only, on every transformers version the project supports.

The vocabulary projection is ~20% of a small LM's work, so a task asks the model for the logits of the positions
that carry its loss alone, through transformers' `logits_to_keep`. Recent versions (≥ 5.21, `slice_logits_to_keep`)
keep a (batch, k) integer tensor row by row; older ones index one dimension with it (`hidden[:, keep, :]`), which
gives 4-D logits (batch, batch, k, vocab). Those get the sorted union of the batch's positions instead, a 1-D tensor
every version keeps for each row, and each row's positions are picked from it.
"""

from __future__ import annotations

import functools
import sys
from typing import Any

import torch

from llmeraser.errors import ConfigError


def logits_at(model: torch.nn.Module, inputs: dict[str, torch.Tensor], positions: torch.Tensor,
              shift: int = 0) -> torch.Tensor:
    """Logits (batch, k, vocab) of `model(**inputs)` at `positions` + `shift` ((batch, k), row i's positions, on the
    host where the batch is built; `shift` virtual tokens come before the input): per row where the model keeps rows
    (`keeps_rows`), else picked from the union (its indices found on the host: no device sync; a single row's own
    positions are its union), else from every position for a model without `logits_to_keep` or one that ignores it.
    Logits of any other shape are an error."""
    device = inputs["input_ids"].device
    positions = positions + shift
    keep, pick = positions.to(device), None
    if not keeps_rows(model) and positions.shape[0] == 1:  # one row (each row under vmap, where unique cannot run)
        keep = keep[0]
    elif not keeps_rows(model):
        union = torch.unique(positions)  # sorted
        keep, pick = union.to(device), torch.searchsorted(union, positions).to(device)
    try:
        logits = model(**inputs, logits_to_keep=keep).logits
    except TypeError:  # a model without `logits_to_keep`
        logits = model(**inputs).logits
    every = inputs["input_ids"].shape[1] + shift
    if logits.ndim != 3 or logits.shape[1] not in (keep.shape[-1], every):
        raise ConfigError(f"the model returned logits of shape {tuple(logits.shape)} for logits_to_keep of shape "
                          f"{tuple(keep.shape)}; expected (batch, {keep.shape[-1]}, vocab) or (batch, {every}, vocab)")
    if logits.shape[1] != keep.shape[-1]:  # every position: project them all, keep the ones needed
        pick = positions.to(device)
    return logits if pick is None else torch.take_along_dim(logits, pick[..., None], dim=1)


def keeps_rows(model: torch.nn.Module) -> bool:
    """Whether the model (under PEFT, DDP or torch.compile wrappers) keeps a 2-D `logits_to_keep` row by row: its
    modeling module slices with transformers' `slice_logits_to_keep`, and that helper does so (probed once)."""
    for _ in range(8):
        inner = model.get_base_model() if hasattr(model, "get_base_model") else getattr(model, "_orig_mod", None)
        inner = inner if inner is not None else getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module) or inner is model:
            break
        model = inner
    return _slices_rows(getattr(sys.modules.get(type(model).__module__), "slice_logits_to_keep", None))


@functools.cache
def _slices_rows(helper: Any) -> bool:
    """Whether `helper(hidden, keep)` keeps keep[i] of row i for a (batch, k) integer tensor `keep`."""
    try:
        # host: a 2 × 3 probe of transformers' own slicing, run once per version
        out = helper(torch.arange(6.0).reshape(2, 3, 1), torch.tensor([[0], [2]]))
        return tuple(out.shape) == (2, 1, 1) and out.flatten().tolist() == [0.0, 5.0]
    except Exception:  # no helper (None), or one that does not: the union is asked for instead
        return False
