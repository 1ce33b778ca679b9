"""The recording on disk, `trajectory.safetensors` beside an adapter: writing it with its checksums, and reading it
back so that nothing in it is trusted unchecked (docs/path.md#what-is-verified).

The file holds tensors (θ₀, each step's gradient and/or evenly spaced checkpoints) and a JSON header (the recipe of
the run: optimiser constants, schedule, seed, the task's recipe) in the safetensors metadata; nothing is unpickled.
The header carries the sha256 of every tensor and of itself. `write` streams the file a vector at a time
(`storage.write_safetensors`; a recording spooled by `recorder.Recorder` already knows its checksums). `read`
validates every header field by type and range (`llmeraser.schema`) before anything is built from it, checks the
header's digest and every tensor's checksum (naming the first bad step; streamed, one step at a time), and returns a
`trajectory.Trajectory` whose gradients and checkpoints stay on disk, read one step at a time (`storage.Rows` over
safetensors' `get_slice`), and whose `task_recipe`, kept in the header, is compared with the request's before a
replay (`Trajectory.check_recipe`).

Formats: 3 may hold bfloat16 gradients beside full-precision checkpoints ("grad_dtype", "checkpoint_every"); 2 is
3's full-precision layout, read the same way; 1 (read, reported as unverified) has no checksums, digest or recipe.
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
from llmeraser.storage import Rows, TensorFile, write_safetensors
from llmeraser.trajectory import RECORD_DTYPES, TRAJECTORY, Trajectory, tensor_sha256

FORMAT = 3  # 3: low-precision gradients possible; 2: checksums, header digest and recipe; 1 (read, unverified): none
READS = (1, 2, FORMAT)
MAX_EPOCHS = 1000  # a header asking for more is refused before any schedule is built


def write(trajectory: Trajectory, folder: str | os.PathLike) -> Path:
    """`trajectory` as FOLDER/trajectory.safetensors, its header carrying every tensor's sha256 and its own; streamed
    one vector at a time (the gradients are never all in memory). A trajectory spooled by a `Recorder` keeps reading
    from its spool (removed when the trajectory is released, or at exit), not from the file written, which its
    caller may move or edit."""
    t = trajectory
    entries: list[tuple[str, object]] = [("theta0", t.theta0.contiguous())]
    for k, c in sorted(t.checkpoints.items()):  # full precision before the (maybe 2-byte) gradients: aligned
        parts = c if isinstance(c, Rows) else Rows.of(list(c))
        entries += [(f"ckpt.{k}.{x}", parts.one(i)) for i, x in enumerate(("theta", "m", "v"))]
    if t.grads is not None:
        entries.append(("grads", t.grads))
    path = Path(folder) / TRAJECTORY
    header = {"format": FORMAT, **t.meta, "checksums": checksums(t)}
    header["header_sha256"] = _header_sha256(header)
    write_safetensors(path, entries, {"llmeraser": json.dumps(header)})
    return path


def _sha256s(x) -> list[str]:
    """Each vector's sha256 of a stack (tensor or Rows), known from the spool when it was spooled."""
    if isinstance(x, Rows):
        return list(x.sha256) if x.sha256 is not None else [tensor_sha256(x.raw(k)) for k in
                                                            range(len(x))]
    return [tensor_sha256(g) for g in x]


def checksums(trajectory: Trajectory) -> dict:
    """sha256 of θ₀, of each step's gradient and of each checkpoint's tensors (verified on read)."""
    t = trajectory
    out: dict = {"theta0": tensor_sha256(t.theta0)}
    if t.grads is not None:
        out["grads"] = _sha256s(t.grads)
    out["checkpoints"] = {str(k): _sha256s(c) for k, c in sorted(t.checkpoints.items())}
    return out


def recorded_steps(folder: str | os.PathLike) -> int | None:
    """The number of steps the recording beside an adapter holds, from its header alone (nothing verified: for
    reporting; `read` checks everything before a replay), or None without a readable recording."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(Path(folder) / TRAJECTORY), framework="pt") as f:
            header = parse_json((f.metadata() or {}).get("llmeraser", "null"), "a trajectory header", AdapterError)
        steps = header.get("steps") if isinstance(header, dict) else None
        return steps if isinstance(steps, int) and not isinstance(steps, bool) and steps >= 0 else None
    except (OSError, SafetensorError, AdapterError):
        return None


def read(folder: str | os.PathLike) -> Trajectory | None:
    """The trajectory beside an adapter, or None when it has none; its header validated and every tensor checked
    against its recorded sha256 (one step at a time). Its gradients and checkpoints stay in the file, read a step
    at a time (the file is kept open: renaming or removing it later changes nothing).

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
        with safe_open(str(path), framework="pt") as f:  # safetensors' own checks of the layout
            header = parse_json((f.metadata() or {}).get("llmeraser", "null"), f"{path}'s header", AdapterError)
        if not isinstance(header, dict) or header.get("format") not in READS:
            raise AdapterError(f"{path} is not an llmeraser trajectory (formats {', '.join(map(str, READS))})")
        meta = dict(header)
        version, sums, digest = meta.pop("format"), meta.pop("checksums", None), meta.pop("header_sha256", None)
        _validate(meta, str(path))
        meta = {k: v for k, v in meta.items() if v is not None or k == "checkpoint_every"}  # null: absent
        if version >= 2 and (not isinstance(digest, str) or digest != _header_sha256(
                {k: v for k, v in header.items() if k != "header_sha256"})):
            raise AdapterError(f"{path}: its header does not match its recorded sha256 (the header was edited after "
                               f"the recording was written)")
        traj = Trajectory(meta, *_open(path, meta), integrity="format 1: no checksums recorded")
        if version >= 2:
            _verify_checksums(traj, sums, str(path))
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        if isinstance(e, AdapterError):
            raise
        raise AdapterError(f"{path} is unreadable: {e}") from e
    return traj


def _open(path: Path, meta: dict) -> tuple:
    return _tensors(TensorFile(path), meta, str(path))


def _verify_checksums(t: Trajectory, sums: object, where: str) -> None:
    """Every tensor's sha256 against the header's, one vector at a time (AdapterError naming the first that
    differs)."""
    recorded = Fields(sums, f"{where}: 'checksums'", AdapterError)
    changed = "the recording was changed after it was written"
    if tensor_sha256(t.theta0) != recorded.string("theta0", sha256=True):
        raise AdapterError(f"{where}: θ₀ (the adapter before fine-tuning) fails its checksum: {changed}")
    if t.grads is not None:
        rows = recorded.sequence("grads", lambda x: isinstance(x, str), "a sha256", length=t.steps)
        for k, sha in enumerate(rows):
            if tensor_sha256(t.grads.raw(k)) != sha:
                raise AdapterError(f"{where}: step {k}'s recorded gradient fails its checksum: {changed}")
    ckpts = recorded.mapping("checkpoints")
    for k, c in sorted(t.checkpoints.items()):
        if [tensor_sha256(c.raw(i)) for i in range(3)] != ckpts.sequence(
                str(k), lambda x: isinstance(x, str), "a sha256", length=3):
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
    f.string("grad_dtype", optional=True, choices=tuple(RECORD_DTYPES))
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


def _tensors(f, meta: dict, where: str) -> tuple[torch.Tensor, Rows | None, dict]:
    """(θ₀, the per-step gradients or None, the checkpoints) from the open `storage.TensorFile` `f`, their names,
    shapes and dtypes checked against the header; the gradients and checkpoints as `Rows` read from it on demand."""
    names, spec = set(f.keys()), f.spec
    theta0 = f.vector("theta0").clone() if "theta0" in names and len(spec("theta0")[0]) == 1 and \
        spec("theta0")[1] is not None else None
    if theta0 is None or not theta0.is_floating_point():
        raise AdapterError(f"{where}: 'theta0' must be a floating-point vector")
    p, steps, every = theta0.numel(), meta["steps"], meta.get("checkpoint_every")
    low = meta.get("grad_dtype") not in (None, "full")
    grads = None
    if "grads" in names:
        (shape, dtype), want = spec("grads"), RECORD_DTYPES[meta["grad_dtype"]] if low else theta0.dtype
        if shape != (steps, p) or dtype != want:
            raise AdapterError(f"{where}: gradients of shape {shape} ({dtype}) for {steps} steps of {p} parameters "
                               f"({want})")
        grads = Rows(lambda k: f.vector("grads", k), steps, p, dtype, theta0.dtype, keep=f)
    elif low:
        raise AdapterError(f"{where}: its header says {meta['grad_dtype']} gradients; the file has none")
    checkpoints, known = {}, {"theta0", "grads"}
    with_ckpts = (grads is None or low) and steps
    if with_ckpts:
        stored = sum(k.startswith("ckpt.") and k.endswith(".theta") for k in names)
        if not every or math.ceil(steps / every) != stored:  # checked before a loop over the header's numbers
            raise AdapterError(f"{where}: {steps} steps with a checkpoint every {every} need "
                               f"{math.ceil(steps / every) if every else '?'} checkpoints; the file has {stored}")
    for k in range(0, steps, every) if with_ckpts else ():
        parts = [f"ckpt.{k}.{x}" for x in ("theta", "m", "v")]
        if any(n not in names or spec(n) != ((p,), theta0.dtype) for n in parts):
            raise AdapterError(f"{where}: the checkpoint at step {k} is missing or not a vector of {p} parameters")
        checkpoints[k] = Rows(lambda i, parts=parts: f.vector(parts[i]), 3, p, theta0.dtype, theta0.dtype, keep=f)
        known |= set(parts)
    if grads is None and steps and not checkpoints:
        raise AdapterError(f"{where} holds neither per-step gradients nor checkpoints")
    if names - known:
        raise AdapterError(f"{where}: tensors the header does not account for: {sorted(names - known)[:3]}")
    return theta0, grads, checkpoints
