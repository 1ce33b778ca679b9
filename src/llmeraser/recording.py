"""The recording on disk, `trajectory.safetensors` beside an adapter: writing it with its checksums, and reading it
back so that nothing in it is trusted unchecked (docs/path.md#what-is-verified).

The file holds tensors (θ₀, each step's gradient or evenly spaced checkpoints) and a JSON header (the recipe of the
run: optimiser constants, schedule, seed, the task's recipe) in the safetensors metadata; nothing is unpickled. The
header carries the sha256 of every tensor and of itself. `read` validates every header field by type and range
(`llmeraser.schema`) before anything is built from it, checks the header's digest and every tensor's checksum
(naming the first bad step), and returns a `trajectory.Trajectory` (whose `task_recipe`, kept in the header, is
compared with the request's before a replay: `Trajectory.check_recipe`).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from llmeraser.errors import AdapterError
from llmeraser.io import canonical_json, sha256_bytes
from llmeraser.schema import Fields, is_number, parse_json
from llmeraser.trajectory import TRAJECTORY, Trajectory, tensor_sha256

FORMAT = 2  # 2: checksums, header digest and recipe; 1 (read, reported as unverified): neither
MAX_EPOCHS = 1000  # a header asking for more is refused before any schedule is built


def write(trajectory: Trajectory, folder: str | os.PathLike) -> Path:
    """`trajectory` as FOLDER/trajectory.safetensors, its header carrying every tensor's sha256 and its own."""
    from safetensors.torch import save_file

    t = trajectory
    tensors = {"theta0": t.theta0.contiguous()}
    if t.grads is not None:
        tensors["grads"] = t.grads.contiguous()
    for k, (theta, m, v) in t.checkpoints.items():
        tensors |= {f"ckpt.{k}.theta": theta, f"ckpt.{k}.m": m, f"ckpt.{k}.v": v}
    path = Path(folder) / TRAJECTORY
    header = {"format": FORMAT, **t.meta, "checksums": checksums(t)}
    header["header_sha256"] = _header_sha256(header)
    save_file(tensors, str(path), metadata={"llmeraser": json.dumps(header)})
    return path


def checksums(trajectory: Trajectory) -> dict:
    """sha256 of θ₀, of each step's gradient and of each checkpoint's tensors (verified on read)."""
    t = trajectory
    out: dict = {"theta0": tensor_sha256(t.theta0)}
    if t.grads is not None:
        out["grads"] = [tensor_sha256(g) for g in t.grads]
    out["checkpoints"] = {str(k): [tensor_sha256(x) for x in c] for k, c in sorted(t.checkpoints.items())}
    return out


def read(folder: str | os.PathLike) -> Trajectory | None:
    """The trajectory beside an adapter, or None when it has none; its header validated and every tensor checked
    against its recorded sha256.

    Raises:
        AdapterError: the file is unreadable, not a trajectory of a format this version reads, a header field is out
            of its range, or a tensor or the header differs from what was recorded (naming the first).
    """
    from safetensors import SafetensorError, safe_open

    path = Path(folder) / TRAJECTORY
    if not path.exists() and not path.is_symlink():
        return None
    if not path.is_file():
        raise AdapterError(f"{path} is not a regular file")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = parse_json((f.metadata() or {}).get("llmeraser", "null"), f"{path}'s header", AdapterError)
            if not isinstance(header, dict) or header.get("format") not in (1, FORMAT):
                raise AdapterError(f"{path} is not an llmeraser trajectory (formats 1 and {FORMAT})")
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        if isinstance(e, AdapterError):
            raise
        raise AdapterError(f"{path} is unreadable: {e}") from e
    meta = dict(header)
    version, sums, digest = meta.pop("format"), meta.pop("checksums", None), meta.pop("header_sha256", None)
    _validate(meta, str(path))
    meta = {k: v for k, v in meta.items() if v is not None or k == "checkpoint_every"}  # null: absent
    if version == FORMAT and (not isinstance(digest, str) or digest != _header_sha256(
            {k: v for k, v in header.items() if k != "header_sha256"})):
        raise AdapterError(f"{path}: its header does not match its recorded sha256 (the header was edited after the "
                           f"recording was written)")
    traj = Trajectory(meta, *_tensors(tensors, meta, str(path)), integrity="format 1: no checksums recorded")
    if version == FORMAT:
        _verify_checksums(traj, sums, str(path))
    return traj


def _verify_checksums(t: Trajectory, sums: object, where: str) -> None:
    """Every tensor's sha256 against the header's (AdapterError naming the first that differs)."""
    recorded = Fields(sums, f"{where}: 'checksums'", AdapterError)
    changed = "the recording was changed after it was written"
    if tensor_sha256(t.theta0) != recorded.string("theta0", sha256=True):
        raise AdapterError(f"{where}: θ₀ (the adapter before fine-tuning) fails its checksum: {changed}")
    if t.grads is not None:
        rows = recorded.sequence("grads", lambda x: isinstance(x, str), "a sha256", length=t.steps)
        for k, (g, sha) in enumerate(zip(t.grads, rows, strict=True)):
            if tensor_sha256(g) != sha:
                raise AdapterError(f"{where}: step {k}'s recorded gradient fails its checksum: {changed}")
    ckpts = recorded.mapping("checkpoints")
    for k, c in sorted(t.checkpoints.items()):
        if [tensor_sha256(x) for x in c] != ckpts.sequence(str(k), lambda x: isinstance(x, str), "a sha256",
                                                           length=3):
            raise AdapterError(f"{where}: the checkpoint at step {k} fails its checksum: {changed}")
    t.integrity = "header and every tensor verified against their sha256"


def _header_sha256(header: dict) -> str:
    return sha256_bytes(canonical_json(header).encode())


def _validate(meta: dict, where: str) -> None:
    """Every header field the replay reads, by type and range, before anything is built from it (AdapterError
    naming the file and the field)."""
    f = Fields(meta, where, AdapterError)
    f.number("lr", lo=0)
    for name in ("beta1", "beta2"):
        f.number(name, lo=0, hi=1, hi_open=True)
    f.number("eps", lo=0, lo_open=True)
    f.number("l2", lo=0)
    for name in ("weight_decay", "max_grad_norm"):
        f.number(name, lo=0, optional=True)
    steps = f.number("steps", lo=0, integer=True)
    f.number("batch_size", lo=1, integer=True)
    f.number("seed", lo=-2**63, hi=2**64, integer=True)
    f.number("n_train", lo=0, integer=True, optional=True)
    f.number("checkpoint_every", lo=1, integer=True, optional=True)
    for name in ("train_sha256", "final_sha256"):
        f.string(name, sha256=True)
    f.string("param_names_sha256", sha256=True, optional=True)
    for name in ("optimizer", "recorder"):
        f.string(name, optional=True, max_len=1000)
    f.mapping("recipe", optional=True)
    batches = f.sequence("batches", lambda b: isinstance(b, list) and b and all(isinstance(i, str) for i in b),
                         "a non-empty list of example ids", length=steps, optional=True)
    lrs = f.sequence("lrs", lambda x: is_number(x) and x >= 0, "a finite learning rate ≥ 0", length=steps,
                     optional=True)
    if (batches is None) != (lrs is None):
        raise AdapterError(f"{where}: a recorded schedule needs both 'batches' and 'lrs' (one of them is missing)")
    if batches is None:  # llmeraser's id-hash schedule: epochs × ⌈N / batch⌉ steps
        f.number("epochs", lo=1, hi=MAX_EPOCHS, integer=True)
    else:  # a Trainer's run may stop inside an epoch
        f.number("epochs", lo=0, hi=MAX_EPOCHS, lo_open=True)


def _tensors(tensors: dict, meta: dict, where: str) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """(θ₀, the per-step gradients or None, the checkpoints) from the file's tensors, their names, shapes and
    dtypes checked against the header."""
    theta0, grads = tensors.get("theta0"), tensors.get("grads")
    if theta0 is None or theta0.dim() != 1 or not theta0.is_floating_point():
        raise AdapterError(f"{where}: 'theta0' must be a floating-point vector")
    p, steps, every = theta0.numel(), meta["steps"], meta.get("checkpoint_every")
    if grads is not None and (tuple(grads.shape) != (steps, p) or grads.dtype != theta0.dtype):
        raise AdapterError(f"{where}: gradients of shape {tuple(grads.shape)} ({grads.dtype}) for {steps} steps of "
                           f"{p} parameters ({theta0.dtype})")
    checkpoints, names = {}, {"theta0", "grads"}
    if grads is None and steps:
        stored = sum(k.startswith("ckpt.") and k.endswith(".theta") for k in tensors)
        if not every or math.ceil(steps / every) != stored:  # checked before a loop over the header's numbers
            raise AdapterError(f"{where}: {steps} steps with a checkpoint every {every} need "
                               f"{math.ceil(steps / every) if every else '?'} checkpoints; the file has {stored}")
    for k in range(0, steps, every) if grads is None and every else ():
        parts = [tensors.get(f"ckpt.{k}.{x}") for x in ("theta", "m", "v")]
        if any(t is None or tuple(t.shape) != (p,) or t.dtype != theta0.dtype for t in parts):
            raise AdapterError(f"{where}: the checkpoint at step {k} is missing or not a vector of {p} parameters")
        checkpoints[k] = tuple(parts)
        names |= {f"ckpt.{k}.{x}" for x in ("theta", "m", "v")}
    if grads is None and steps and not checkpoints:
        raise AdapterError(f"{where} holds neither per-step gradients nor checkpoints")
    if set(tensors) - names:
        raise AdapterError(f"{where}: tensors the header does not account for: {sorted(set(tensors) - names)[:3]}")
    return theta0, grads, checkpoints
