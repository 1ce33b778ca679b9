"""A model's saves, followed: `follow_saves(model, after)` makes every later `model.save_pretrained(dir)` — the one
`transformers.Trainer.save_model` calls too, for a PeftModel or a PreTrainedModel, in every transformers this
package supports — call `after(model, dir, state_dict)` once the model's own save returned. `LLMEraserCallback` uses
it to write its record beside the adapter wherever the trained model is saved (docs/data.md#where-the-record-goes).

Why an instance attribute and not a patched class or a Trainer subclass: the user's `model.save_pretrained(dir)` must
be covered as well as `trainer.save_model(dir)`, and nothing else (another model, another process) may change. The
wrapper is an object, not a closure, so that `copy.deepcopy(model)` gets one bound to the copy (a closure would save
the original's weights under the copy's name) and pickling drops it (the unpickled model saves as its class does).
"""

from __future__ import annotations

import copy
import logging
import os
import types
from collections.abc import Callable
from pathlib import Path

import torch

from llmeraser.trajectory import tensor_sha256

logger = logging.getLogger(__name__)


class SaveAndFollow:
    """`model.save_pretrained` (the class's, or a wrapper found there before), then `after(model, dir, state_dict)`
    on the main process; a failure of `after` only warns (the user's save succeeded)."""

    def __init__(self, model, after: Callable, original=None):
        self.model, self.after, self.original = model, after, original

    def __call__(self, save_directory, *args, **kwargs):
        save = self.original or types.MethodType(type(self.model).save_pretrained, self.model)
        out = save(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            try:
                self.after(self.model, save_directory, kwargs.get("state_dict"))
            except Exception as e:  # noqa: BLE001 — the save itself succeeded
                logger.warning("could not write the training record beside %s: %s: %s", save_directory,
                               type(e).__name__, e)
        return out

    def __deepcopy__(self, memo):
        return SaveAndFollow(copy.deepcopy(self.model, memo), self.after, copy.deepcopy(self.original, memo))

    def __reduce__(self):
        return _plain_save, (self.model,)


def _plain_save(model):
    return types.MethodType(type(model).save_pretrained, model)


def follow_saves(model, after: Callable) -> None:
    """Make `model.save_pretrained` call `after` too (once per `after`: following again changes nothing)."""
    current = model.__dict__.get("save_pretrained")
    if isinstance(current, SaveAndFollow) and current.after == after:
        return
    if hasattr(type(model), "save_pretrained"):
        model.__dict__["save_pretrained"] = SaveAndFollow(model, after, current)


def trainable(model) -> list[str] | None:
    """The names of `model`'s trainable parameters (None: none, or no model)."""
    named = [n for n, p in model.named_parameters() if p.requires_grad] if model is not None else []
    return named or None


def theta_sha256(model, names: list[str]) -> str | None:
    """sha256 of the named parameters' values, flattened in order (None when the model lacks one of them); equal to
    `Trajectory.check`'s hash of the same vector."""
    params = dict(model.named_parameters())
    if any(n not in params for n in names):
        return None
    return tensor_sha256(torch.cat([params[n].detach().reshape(-1) for n in names]))


def file_stat(path: str | os.PathLike) -> tuple | None:
    """(inode, size, mtime) of a file, None when absent: whether a file one wrote is still the one written."""
    try:
        st = Path(path).stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns
