"""Recording a fine-tune as it runs (docs/path.md#the-recording): what the budget keeps (`plan`), and the `Recorder`
that appends each step's gradient (and the checkpoints) to a temporary file beside the output, computing each
piece's sha256 as it is written, so memory holds one step at a time (`llmeraser.storage`).

The budget is disk space: the smaller of the bytes the user allows (`max_bytes`, default 4 GiB) and half the free
space where the recording is spooled — half, because the spool and the final trajectory.safetensors exist side by
side while the latter is written. Within it, in order of preference:

- every step's gradient in full precision (rewind and path replay; states rebuilt bit for bit);
- with `dtype` bfloat16: every step's gradient rounded, plus full-precision checkpoints (θ, m, v) every ⌈√steps⌉
  steps (rewind, exact from the checkpoint at or before the first edited step, replaying at most ⌈√steps⌉ − 1 extra
  steps; path replay from the rounded gradients);
- checkpoints only, evenly spaced within the budget (rewind only).
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from llmeraser.data import Example
from llmeraser.errors import ConfigError
from llmeraser.storage import Rows, Spool
from llmeraser.trajectory import DEFAULT_MAX_BYTES, RECORD_DTYPES, TRAJECTORY, Trajectory, adam_meta, tensor_sha256

__all__ = ["DEFAULT_MAX_BYTES", "Plan", "Recorder", "human_bytes", "plan"]


def human_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


@dataclass(frozen=True)
class Plan:
    """What a recording keeps: per-step gradients (in `dtype`) or not, checkpoints every `every` steps (None: none),
    the bytes a step, the budget and where the spool goes."""

    steps: int
    per_step: int  # bytes of one step's gradient as stored
    keep_grads: bool
    every: int | None
    dtype: torch.dtype
    budget: int
    max_bytes: int
    free: int | None
    total: int  # bytes the recording will take

    def describe(self) -> str:
        """One line for the start of a run, e.g. 'recording: 4.5 MB a step × 125 steps = 563 MB (budget 4 GiB):
        every step's gradient kept (rewind and path replay)'."""
        where = f"budget {self.max_bytes / 2**30:g} GiB"
        if self.free is not None and self.budget < self.max_bytes:
            where += f", half the disk's free {human_bytes(self.free)}"
        head = (f"recording: {human_bytes(self.per_step)} a step × {self.steps} steps = "
                f"{human_bytes(self.per_step * self.steps)} ({where})")
        if self.keep_grads and self.every is None:
            return f"{head}: every step's gradient kept (rewind and path replay)"
        if self.keep_grads:
            name = str(self.dtype).removeprefix("torch.")
            return (f"{head}: every step's gradient in {name} and full-precision checkpoints every {self.every} "
                    f"steps, {human_bytes(self.total)} in all (exact rewind; path replay from the rounded gradients)")
        return (f"{head}: over the budget, checkpoints every {self.every} steps, {human_bytes(self.total)} "
                f"(rewind only)")


def plan(p: int, steps: int, param_dtype: torch.dtype, *, max_bytes: int = DEFAULT_MAX_BYTES,
         dtype: str = "full", folder: str | Path | None = None) -> Plan:
    """What a recording of `steps` steps of `p` parameters keeps within `max_bytes` and half the free space of
    `folder` (module docstring)."""
    if dtype not in RECORD_DTYPES:
        raise ConfigError(f"record dtype must be one of {', '.join(RECORD_DTYPES)}, got {dtype!r}")
    stored = RECORD_DTYPES[dtype] or param_dtype
    folder = Path(folder if folder is not None else tempfile.gettempdir())
    place = next((f for f in (folder, *folder.parents) if f.exists()), None)
    free = shutil.disk_usage(place).free if place is not None else None
    budget = min(max_bytes, free // 2) if free is not None else max_bytes
    per_step, vector = p * stored.itemsize, p * param_dtype.itemsize
    ckpt = 3 * vector
    low = stored != param_dtype
    every = math.ceil(math.sqrt(steps)) if low and steps else None
    total = vector + steps * per_step + (math.ceil(steps / every) * ckpt if every else 0)
    if total <= budget:
        return Plan(steps, per_step, True, every, stored, budget, max_bytes, free, total)
    n_ckpt = max(1, min(steps, int((budget - vector) // ckpt)))
    every = max(1, math.ceil(steps / n_ckpt))
    return Plan(steps, per_step, False, every, stored, budget, max_bytes, free,
                vector + math.ceil(steps / every) * ckpt)


class Recorder:
    """Collects a fine-tune's trajectory step by step (`finetune.run_steps` and the Trainer callback call `step`
    before each Adam step), spooling it to a temporary file in `folder` (default: the system's temporary folder);
    `finish` returns the `Trajectory`, read from that file one step at a time. `discard` (or garbage collection)
    removes the file."""

    def __init__(self, meta: dict, theta0: torch.Tensor, n_steps: int, *, max_bytes: int = DEFAULT_MAX_BYTES,
                 dtype: str = "full", folder: str | Path | None = None, layout: Plan | None = None):
        self.meta, self.theta0, self.n_steps = dict(meta), theta0.detach().cpu().clone(), n_steps
        self.plan = layout or plan(theta0.numel(), n_steps, theta0.dtype, max_bytes=max_bytes, dtype=dtype,
                                   folder=folder)
        self.keep_grads, self.every, self.dtype = self.plan.keep_grads, self.plan.every, self.plan.dtype
        self.spool = Spool(Path(folder if folder is not None else tempfile.gettempdir()) / TRAJECTORY)
        self.grads: list[tuple[int, str]] = []  # each step's (offset, sha256) in the spool
        self.checkpoints: dict[int, list[tuple[int, str]]] = {}

    @classmethod
    def resume(cls, trajectory: Trajectory, start: int, n_steps: int, *, examples: Sequence[Example],
               folder: str | Path | None = None) -> Recorder:
        """A recorder for a run that shares `trajectory`'s first `start` steps (a rewind) and has `n_steps` in all
        on `examples`: the shared part is copied (one step at a time), in the same storage mode."""
        meta = {k: v for k, v in trajectory.meta.items() if k not in ("steps", "checkpoint_every", "final_sha256")}
        meta |= adam_meta(trajectory.config, epochs=meta["epochs"], batch_size=meta["batch_size"], seed=meta["seed"],
                          train=examples)
        if "batches" in meta:  # the recorded schedule, as the edited set takes it
            meta["batches"] = [[examples[i].id for i in b] for b in trajectory.schedule(examples)]
            meta["lrs"] = trajectory.lrs(examples)
        theta0 = trajectory.theta0
        grads = trajectory.grads
        stored = (grads.dtype if grads is not None else theta0.dtype)
        every = trajectory.meta.get("checkpoint_every")
        layout = Plan(n_steps, theta0.numel() * stored.itemsize, grads is not None, every, stored, 0, 0, None, 0)
        rec = cls(meta, theta0, n_steps, folder=folder, layout=layout)
        for k in range(start if grads is not None else 0):
            rec.grads.append(rec.spool.append(grads.raw(k) if isinstance(grads, Rows) else grads[k]))
        for k, c in sorted(trajectory.checkpoints.items()):
            if k < start:
                rec.checkpoints[k] = [rec.spool.append(x) for x in c]
        return rec

    def wants_checkpoint(self, k: int) -> bool:
        return self.every is not None and k % self.every == 0

    def step(self, k: int, data_grad: torch.Tensor, state: Callable[[], Sequence[torch.Tensor]]) -> None:
        """Record step k: its data gradient (as stored: rounded to the plan's dtype on its device, one transfer),
        and at checkpoint steps the full-precision state `state()` = (θ_k, m_k, v_k) before the step."""
        if self.keep_grads:
            if k != len(self.grads):
                raise ConfigError(f"recorded step {k} after {len(self.grads)} steps")
            self.grads.append(self.spool.append(data_grad.detach().to(self.dtype)))
        if self.wants_checkpoint(k):
            self.checkpoints[k] = [self.spool.append(x) for x in state()]

    def finish(self, steps_taken: int, final: torch.Tensor, *, partial: bool = False) -> Trajectory:
        """The trajectory of a run that took `steps_taken` steps (all that were planned, unless `partial`: a
        Trainer run may stop early) and ended at θ = `final` (its hash is kept, so `Trajectory.check` knows the
        adapter it belongs to without a replay)."""
        if steps_taken != self.n_steps and not (partial and steps_taken <= self.n_steps):
            raise ConfigError(f"recorded {steps_taken} of {self.n_steps} steps")
        low = self.keep_grads and self.every is not None
        meta = self.meta | {"steps": steps_taken, "checkpoint_every": self.every,
                            "final_sha256": tensor_sha256(final),
                            **({"grad_dtype": str(self.dtype).removeprefix("torch.")} if low else {})}
        p, as_dtype = self.theta0.numel(), self.theta0.dtype
        grads = None
        if self.keep_grads:
            offsets, sums = zip(*self.grads[:steps_taken], strict=True) if steps_taken else ((), ())
            grads = Rows.spooled(self.spool, list(offsets), p, self.dtype, as_dtype, list(sums))
        checkpoints = {k: Rows.spooled(self.spool, [o for o, _ in c], p, as_dtype, as_dtype, [s for _, s in c])
                       for k, c in self.checkpoints.items() if k < steps_taken}
        return Trajectory(meta, self.theta0, grads, checkpoints)

    def discard(self) -> None:
        """Remove the spooled file (a failed run)."""
        self.spool.close()
