"""The trainable-parameter view θ of a model, and PEFT adapters on disk.

θ is every parameter with requires_grad (LoRA A/B, `modules_to_save`, a projector, ...); the base is frozen.
Adapters are read and written only through peft (`PeftModel.from_pretrained` / `save_pretrained`, which use
`get_peft_model_state_dict` / `set_peft_model_state_dict`), in safetensors; nothing is unpickled.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from llmeraser.errors import AdapterError
from llmeraser.io import atomic_dir, atomic_write_json, sha256_file

logger = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
SHARDED_MANIFEST = "sharded.json"  # a sharded adapter's manifest (`llmeraser.sharded`): its identity
PROMPT_LEARNING = ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "MULTITASK_PROMPT_TUNING")


class ParamView:
    """The flat vector view of a model's trainable parameters (fixed order: `model.named_parameters()`)."""

    def __init__(self, model: torch.nn.Module):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise AdapterError("the model has no trainable parameters (nothing has requires_grad=True)")
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.shapes = [p.shape for p in self.params]
        self.numels = [p.numel() for p in self.params]
        self.dim = sum(self.numels)
        self.dtype = self.params[0].dtype
        self.device = self.params[0].device

    def flatten(self, tensors: list[torch.Tensor | None]) -> torch.Tensor:
        """Concatenate per-parameter tensors (None = zeros) into one (dim,) vector."""
        return torch.cat([
            (torch.zeros(n, dtype=self.dtype, device=self.device) if t is None else t.reshape(-1))
            for t, n in zip(tensors, self.numels, strict=True)
        ])

    def unflatten(self, vec: torch.Tensor) -> list[torch.Tensor]:
        """Split a (dim,) vector into tensors shaped like the parameters."""
        if vec.shape != (self.dim,):
            raise ValueError(f"expected a vector of {self.dim} entries, got shape {tuple(vec.shape)}")
        return [c.view(s) for c, s in zip(vec.split(self.numels), self.shapes, strict=True)]

    def vector(self) -> torch.Tensor:
        """A detached copy of θ, shape (dim,)."""
        return self.flatten([p.detach() for p in self.params]).clone()

    @torch.no_grad()
    def set_vector(self, vec: torch.Tensor) -> None:
        for p, t in zip(self.params, self.unflatten(vec.to(self.dtype)), strict=True):
            p.copy_(t)

    @torch.no_grad()
    def add_(self, delta: torch.Tensor) -> None:
        """θ ← θ + Δθ in place."""
        for p, t in zip(self.params, self.unflatten(delta.to(self.dtype)), strict=True):
            p.add_(t)

    def named(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.params, strict=True))


def check_adapter_dir(path: str | os.PathLike) -> Path:
    """Check that `path` holds a PEFT adapter in safetensors; return it as a Path."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"adapter folder {str(path)!r} does not exist")
    if not (path / "adapter_config.json").is_file():
        raise AdapterError(f"{str(path)!r} is not a PEFT adapter: adapter_config.json is missing")
    if not (path / ADAPTER_WEIGHTS).is_file():
        extra = " (found adapter_model.bin: pickled weights are refused; re-save with safetensors)" if (
            path / "adapter_model.bin").exists() else ""
        raise AdapterError(f"{str(path)!r} has no {ADAPTER_WEIGHTS}{extra}")
    try:
        json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise AdapterError(f"{str(path / 'adapter_config.json')!r} is not valid JSON: {e}") from e
    from safetensors import SafetensorError, safe_open

    try:  # reads the header only
        with safe_open(str(path / ADAPTER_WEIGHTS), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError) as e:
        raise AdapterError(f"{str(path / ADAPTER_WEIGHTS)!r} is not a readable safetensors file: {e}") from e
    return path


def _error_detail(e: Exception, limit: int = 3) -> str:
    """One line from a (possibly multi-line) library error: its lines that name parameters and shapes."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    detail = [ln for ln in lines if any(k in ln for k in ("size mismatch", "Missing key", "Unexpected key"))]
    chosen = detail[:limit] or lines[:1] or [type(e).__name__]
    more = f" (+{len(detail) - limit} more)" if len(detail) > limit else ""
    return " ".join(chosen) + more


def load_adapter(base_model: torch.nn.Module, adapter_dir: str | os.PathLike, *, trainable: bool = True,
                 adapter_name: str = "default"):
    """Wrap `base_model` with the PEFT adapter in `adapter_dir` (safetensors only), trainable by default, under
    `adapter_name` (peft's name for it; a sharded adapter's shards sit side by side under theirs).

    Raises AdapterError for a missing or malformed adapter, one made for another base model, or non-finite weights.
    """
    from peft import PeftModel
    from safetensors import SafetensorError

    path = check_adapter_dir(adapter_dir)
    dtype = next(base_model.parameters()).dtype
    config = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
    prompt_learning = str(config.get("peft_type", "")).upper() in PROMPT_LEARNING
    try:
        # peft refuses is_trainable for prompt learning; its virtual-token encoder is made trainable below
        model = PeftModel.from_pretrained(base_model, str(path), is_trainable=trainable and not prompt_learning,
                                          adapter_name=adapter_name)
        if trainable and prompt_learning:
            model.prompt_encoder.requires_grad_(True)
    except (ValueError, RuntimeError, KeyError, TypeError, AttributeError, SafetensorError) as e:
        raise AdapterError(f"adapter {str(path)!r} does not fit the base model: {_error_detail(e)}") from e
    for name, p in model.named_parameters():
        if p.requires_grad and not torch.isfinite(p).all():
            raise AdapterError(f"adapter {str(path)!r} holds non-finite values in {name}")
    return with_base_dtype(model, dtype).eval()  # dropout off: the update differentiates the deterministic objective


def with_base_dtype(model, dtype: torch.dtype):
    """peft makes some adapters (prompt tuning's embedding) in float32 whatever the base: a float64 base (the exact
    tests) gets a float64 adapter; a half-precision base keeps peft's float32 adapter (float32 gradients)."""
    return model.double() if dtype == torch.float64 else model


def save_adapter(model, out: str | os.PathLike, *, protect: tuple[str | os.PathLike, ...] = (),
                 report: Mapping[str, object] | None = None, files: Mapping[str, object] | None = None,
                 before_rename: Callable[[Path], None] | None = None,
                 write_more: Callable[[Path], object] | None = None) -> Path:
    """Save a PEFT model's adapter (safetensors), `report.json` and other JSON `files` into `out`, atomically;
    `write_more(folder)` adds further files (the recorded trajectory) inside the same atomic write.

    The folder is built under a temporary name and renamed into place, so `out` either does not exist or is
    complete. `protect` lists inputs (e.g. the input adapter) that `out` may not overwrite; `before_rename(tmp)`
    runs on the finished folder just before it is renamed into place. The report gets the
    key `adapter_sha256`, the hash of the weights file written beside it.
    """
    if not hasattr(model, "save_pretrained") or not hasattr(model, "peft_config"):
        raise AdapterError("save_adapter needs a peft.PeftModel")
    for name, p in model.named_parameters():
        if p.requires_grad and not torch.isfinite(p).all():
            raise AdapterError(f"refusing to save: parameter {name} holds non-finite values")
    with atomic_dir(out, protect=protect, before_rename=before_rename) as tmp:
        save_peft(model, tmp)
        if report is not None:
            atomic_write_json(tmp / "report.json", {**report, "adapter_sha256": adapter_hash(tmp)})
        for fname, obj in (files or {}).items():
            atomic_write_json(tmp / fname, obj)
        if write_more is not None:
            write_more(tmp)
    logger.info("saved adapter to %s", out)
    return Path(out)


def save_peft(model, folder: str | os.PathLike) -> None:
    """`model.save_pretrained(folder)` in safetensors, never reaching the network.

    peft's default `save_embedding_layers="auto"` looks the recorded base model up on the Hugging Face Hub when it is
    not a local folder (to compare vocabularies); here the base embeddings are saved exactly when the adapter targets
    an embedding layer (what "auto" decides for those without asking), else never: llmeraser never resizes them.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.constants import EMBEDDING_LAYER_NAMES

    embeddings = any(isinstance(m, BaseTunerLayer) and name.rsplit(".", 1)[-1] in EMBEDDING_LAYER_NAMES
                     for name, m in model.named_modules())
    model.save_pretrained(str(folder), safe_serialization=True, save_embedding_layers=embeddings)


def adapter_hash(adapter_dir: str | os.PathLike) -> str:
    """sha256 of the adapter's weights file (identifies an adapter version); of a sharded adapter, of its manifest,
    which records every shard's weights hash, the router's and the training set's."""
    path = Path(adapter_dir)
    return sha256_file(path / SHARDED_MANIFEST if (path / SHARDED_MANIFEST).is_file() else path / ADAPTER_WEIGHTS)


def has_adapter(folder: str | os.PathLike) -> bool:
    """Whether `folder` holds a complete adapter output (weights, or a sharded adapter's manifest, which is written
    last)."""
    return (Path(folder) / ADAPTER_WEIGHTS).is_file() or (Path(folder) / SHARDED_MANIFEST).is_file()
