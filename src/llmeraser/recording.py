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

Where the run's recording is (`locate`): beside the adapter, where `LLMEraserCallback` also puts it whenever the
trained model is saved (docs/data.md#where-the-record-goes); else where a small pointer file beside the adapter
(`llmeraser_recording.json`, written into each Trainer checkpoint) names it, cut to the checkpoint's first N steps
(`prefix`); else in the parent of a `checkpoint-N` folder, cut likewise; else in the run's `output_dir` that the
callback's `training_record.json` names, or the one read from the adapter's `training_args.bin` without unpickling it
(`trainer_output_dir`). What is found is used only after
the same checks as one beside the adapter; what is not found is reported with the places looked.

Formats: 3 may hold bfloat16 gradients beside full-precision checkpoints ("grad_dtype", "checkpoint_every"); 2 is
3's full-precision layout, read the same way; 1 (read, reported as unverified) has no checksums, digest or recipe.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickletools
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmeraser.errors import AdapterError
from llmeraser.io import atomic_write_json, canonical_json, sha256_bytes
from llmeraser.record import RECORD
from llmeraser.schema import Fields, is_number, parse_json, read_json
from llmeraser.storage import Rows, TensorFile, write_safetensors
from llmeraser.trajectory import RECORD_DTYPES, TRAJECTORY, Trajectory, tensor_sha256

FORMAT = 3  # 3: low-precision gradients possible; 2: checksums, header digest and recipe; 1 (read, unverified): none
READS = (1, 2, FORMAT)
MAX_EPOCHS = 1000  # a header asking for more is refused before any schedule is built
POINTER = "llmeraser_recording.json"  # beside an adapter whose run's recording lives elsewhere (a Trainer checkpoint)
POINTER_KIND = "llmeraser-recording-pointer"
TRAINING_ARGS = "training_args.bin"  # what Trainer.save_model writes beside the adapter (a pickle: never unpickled)
MAX_ARGS_BYTES = 16 * 2**20


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


# ------------------------------------------------------------------------------------------------ where it is
@dataclass
class Located:
    """What `locate` found for an adapter: the recording (None: none), where it came from (the file and how it was
    found), whether that is beside the adapter, and every place looked before it."""

    trajectory: Trajectory | None
    where: str = ""
    beside: bool = True
    looked: list[str] = field(default_factory=list)


def locate(adapter: str | os.PathLike) -> Located:
    """The recording of the run that trained `adapter`: beside it, else the first found of the places a Trainer run
    leaves it (module docstring), cut to a checkpoint's steps where the adapter is one. Nothing found elsewhere is
    trusted for being found: the caller checks it against the adapter as it checks one beside it (`Trajectory.check`
    and `replay.verify_recording`).

    Raises:
        AdapterError: a recording found is unreadable or fails its checksums (`read`), or has fewer steps than the
            checkpoint it should cover (each names the file).
    """
    adapter = Path(adapter)
    found = read(adapter)
    if found is not None:
        return Located(found, f"{adapter / TRAJECTORY} (beside the adapter)")
    looked = [f"{adapter / TRAJECTORY}: absent"]
    seen = {adapter.resolve()}
    for folder, steps, end, how in _candidates(adapter, looked):
        if folder.resolve() in seen:
            continue
        seen.add(folder.resolve())
        path = folder / TRAJECTORY
        if not path.is_file():
            looked.append(f"{path} ({how}): absent")
            continue
        found = read(folder)
        if steps is not None and steps != found.steps:
            how += f", cut to its first {steps} of {found.steps} steps"
            found = prefix(found, steps, end, where=str(path))
        return Located(found, f"{path} ({how})", beside=False, looked=looked)
    return Located(None, looked=looked)


def _candidates(adapter: Path, looked: list[str]):
    """(folder, the adapter's step in that run or None for its end, θ's sha256 there or None, how it is known) of
    each place a Trainer run may have left the adapter's recording, most specific first."""
    pointer = adapter / POINTER
    if pointer.is_file():
        try:
            f = Fields(read_json(pointer, AdapterError), str(pointer), AdapterError)
            if f.string("kind", max_len=100) != POINTER_KIND:
                raise AdapterError(f"{pointer} is not an llmeraser recording pointer")
            steps = f.number("steps", lo=0, integer=True)
            end = f.string("final_sha256", sha256=True, optional=True)
            for key in ("relative", "absolute"):
                where = Path(f.string(key, max_len=4096))
                where = Path(os.path.normpath(adapter / where)) if key == "relative" else where
                yield where, steps, end, f"named by {pointer}"
        except AdapterError as e:
            looked.append(f"{pointer}: {e}")
    checkpoint = re.fullmatch(r"checkpoint-([0-9]+)", adapter.resolve().name)
    if checkpoint:
        yield adapter.resolve().parent, int(checkpoint[1]), None, f"the Trainer run above {adapter.name}"
    try:  # the callback's record names the run's output folder (a record copied by hand without the recording)
        recorded = read_json(adapter / RECORD, AdapterError).get("output_dir") if (adapter / RECORD).is_file() else None
    except (AdapterError, AttributeError):
        recorded = None
    if isinstance(recorded, str) and recorded:
        yield Path(recorded), None, None, f"the run's output_dir in {adapter / RECORD}"
    output_dir = trainer_output_dir(adapter)
    if output_dir is not None:
        how = f"the Trainer's output_dir in {adapter / TRAINING_ARGS}"
        yield Path(output_dir), None, None, how
        if not Path(output_dir).is_absolute():  # relative to where training ran: also tried beside the adapter
            yield adapter.parent / output_dir, None, None, how


def prefix(t: Trajectory, steps: int, final_sha256: str | None, *, where: str = "the recording") -> Trajectory:
    """The first `steps` steps of a Trainer run's recording `t`: the run of the checkpoint saved after them (its
    batches, learning rates, gradients and checkpoints before `steps`), ending at `final_sha256` — θ's hash when the
    callback saved the checkpoint; None when unknown (a checkpoint of an older callback), and then the caller's
    replay check (the recorded gradients replayed end at the adapter) is what ties it to the adapter, so a recording
    of checkpoints only, which has no such check, is refused."""
    if "batches" not in t.meta:
        raise AdapterError(f"{where} has no recorded batches: only a Trainer run's recording is cut to a checkpoint")
    if steps > t.steps:
        raise AdapterError(f"{where} holds {t.steps} steps, fewer than the {steps} of the checkpoint it should cover "
                           f"(recorded by another run?)")
    if final_sha256 is None and t.grads is None:
        raise AdapterError(f"{where} kept checkpoints only and the adapter's weights at step {steps} were not "
                           f"recorded: nothing ties the checkpoint to it")
    meta = t.meta | {"steps": steps, "final_sha256": final_sha256, "batches": t.meta["batches"][:steps],
                     "lrs": t.meta["lrs"][:steps]}
    grads = t.grads
    if isinstance(grads, Rows):
        grads = Rows(grads.raw, steps, grads.p, grads.dtype, grads.as_dtype,
                     sha256=None if grads.sha256 is None else grads.sha256[:steps], keep=grads)
    elif grads is not None:
        grads = grads[:steps]
    checkpoints = {k: c for k, c in t.checkpoints.items() if k < steps}
    return Trajectory(meta, t.theta0, grads, checkpoints, integrity=t.integrity)


def write_pointer(folder: str | os.PathLike, recording: str | os.PathLike, steps: int,
                  final_sha256: str | None) -> Path:
    """FOLDER/llmeraser_recording.json: the adapter there is step `steps` (θ's hash `final_sha256`) of the run whose
    recording is (or will be, when training ends) RECORDING/trajectory.safetensors; named both relative to FOLDER (it
    moves with the run's folder) and absolute."""
    folder, recording = Path(folder), Path(recording)
    path = folder / POINTER
    atomic_write_json(path, {"kind": POINTER_KIND, "relative": os.path.relpath(recording, folder),
                             "absolute": str(recording.resolve()), "steps": steps, "final_sha256": final_sha256})
    return path


def replaceable(path: str | os.PathLike) -> bool:
    """Whether the file at `path` may be overwritten with a recording or pointer: absent, or one llmeraser wrote (a
    trajectory's header, a pointer's kind). A user's file of that name is never replaced."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return True
    if not path.is_file():
        return False
    try:
        if path.name == POINTER:
            return read_json(path, AdapterError).get("kind") == POINTER_KIND
        with safe_open(str(path), framework="pt") as f:
            return "llmeraser" in (f.metadata() or {})
    except (OSError, SafetensorError, AdapterError, AttributeError):
        return False


def trainer_output_dir(adapter: str | os.PathLike) -> str | None:
    """The `output_dir` of the TrainingArguments that `Trainer.save_model` pickled beside the adapter, read from the
    pickle's opcodes (`pickletools.genops`: nothing is unpickled or run), or None. torch.save writes a zip holding
    `…/data.pkl`; the arguments' fields are a dict of name, value string pairs in it."""
    path = Path(adapter) / TRAINING_ARGS
    try:
        if not path.is_file() or path.stat().st_size > MAX_ARGS_BYTES:
            return None
        data = path.read_bytes()
        if zipfile.is_zipfile(io.BytesIO(data)):
            with zipfile.ZipFile(io.BytesIO(data)) as z:
                name = next((i for i in z.infolist() if i.filename.rsplit("/", 1)[-1] == "data.pkl"), None)
                if name is None or name.file_size > MAX_ARGS_BYTES:
                    return None
                data = z.read(name)
        key = None
        for op, arg, _ in pickletools.genops(data):
            if isinstance(arg, str) and "UNICODE" in op.name:
                if key == "output_dir":
                    return arg
                key = arg
            elif op.name not in ("MEMOIZE", "BINPUT", "LONG_BINPUT", "PUT"):
                key = None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, NotImplementedError):
        return None
    return None
