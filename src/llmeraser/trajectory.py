"""Fine-tuning's path, recorded: Adam on a flat vector, the step schedule, and the trajectory file (docs/path.md).

Adam fine-tuning (`finetune`, optimizer adam) is a deterministic function of the initial θ₀, the step schedule
(`schedule`: the id-hash order of each epoch cut into mini-batches) and each step's data gradient g_k (the batch
mean of ∇ℓ at θ_k). The trajectory stores θ₀ and every g_k, so any step's state (θ_k, Adam's m_k, v_k) is
rebuilt exactly, bit for bit, by replaying the elementwise Adam update (`Trajectory.states`) — no forward or
backward pass. That is what the path-based updates need (`llmeraser.replay`): the state just before the first step
that saw an edited example (exact rewind), and θ_k with g_k along the whole path (path-aware replay).

Storage is one vector of the trainable parameters per step (the embedded demo: 921,600 floats, 3.7 MB a step,
50 steps), bounded by `max_bytes`: beyond it only checkpoints (θ_k, m_k, v_k) at evenly spaced steps are kept,
which still serve exact rewind (from the checkpoint at or before the first edited step) but not path-aware replay.
The file lives beside the adapter (`trajectory.safetensors`, written and read back by `llmeraser.recording.write` /
`read`, which validate its header and verify every tensor's checksum). A replay is only as exact as the recording it
reads, so before one (docs/path.md#what-is-verified) the recipe is compared with the request's (`check_recipe`), and
replaying the recorded gradients with the recorded optimiser must end at the adapter (`replay_check`), which pins the
learning rates, betas, ε, L2, decay and clipping to the ones that trained it.
"""

from __future__ import annotations

import collections
import hashlib
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

import torch

from llmeraser.data import Example
from llmeraser.errors import AdapterError, ConfigError
from llmeraser.io import canonical_json, sha256_bytes

TRAJECTORY = "trajectory.safetensors"
DEFAULT_MAX_BYTES = 4 * 2**30  # per-step gradients beyond this size: checkpoints only
# Replaying the recorded gradients must end this close to the adapter, relative to the distance fine-tuning moved it.
# The replay applies the same elementwise AdamW formula to the same gradients, so it differs from training only by
# rounding (another device's fused multiply-adds; torch's lerp for m under a Trainer): measured < 1e-4 of the distance
# on SFTTrainer runs (tests/test_trl.py), 0 on llmeraser's own. An edited learning rate, beta, eps, L2, decay or
# clipping, or a changed gradient, moves every step, so it ends O(1) of the distance away.
REPLAY_TOL = 1e-3


@dataclass(frozen=True)
class AdamConfig:
    """Adam's hyper-parameters as fine-tuning used them (torch's defaults for the betas and eps), the L2 term added
    to each step's data gradient, and for a run recorded from transformers' Trainer (`callback`): AdamW's decoupled
    weight decay and the global gradient-norm clipping applied before each step."""

    lr: float
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    l2: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 0.0  # 0: no clipping


class Adam:
    """Adam on one flat parameter vector: the single implementation fine-tuning and every replay use, so a replay
    fed the same gradients reproduces training bit for bit. torch.optim.Adam's formula (torch forms m by a lerp, so
    the two agree to rounding): m ← β₁m + (1−β₁)g, v ← β₂v + (1−β₂)g², θ ← θ − (lr/(1−β₁ᵗ)) · m / (√v/√(1−β₂ᵗ) + ε),
    g = data gradient + l2·θ. With max_grad_norm the data gradient is first scaled by min(1, c / (‖g‖ + 1e-6)) (torch's
    clip_grad_norm_), and with weight_decay θ is first shrunk by (1 − lr·wd) (torch.optim.AdamW)."""

    def __init__(self, config: AdamConfig, theta: torch.Tensor, m: torch.Tensor | None = None,
                 v: torch.Tensor | None = None, t: int = 0):
        self.config = config
        self.m = torch.zeros_like(theta) if m is None else m.clone()
        self.v = torch.zeros_like(theta) if v is None else v.clone()
        self.t = t

    def step(self, theta: torch.Tensor, data_grad: torch.Tensor, lr: float | None = None) -> torch.Tensor:
        """θ after one step with the data gradient `data_grad` at θ (a new tensor; θ is not changed), at learning
        rate `lr` (default: the config's; a recorded schedule gives each step's)."""
        c = self.config
        lr = c.lr if lr is None else lr
        if c.max_grad_norm:
            data_grad = data_grad * min(1.0, c.max_grad_norm / (float(data_grad.norm()) + 1e-6))
        g = data_grad + c.l2 * theta if c.l2 else data_grad
        if c.weight_decay:
            theta = theta * (1 - lr * c.weight_decay)
        self.t += 1
        self.m.mul_(c.beta1).add_(g, alpha=1 - c.beta1)
        self.v.mul_(c.beta2).addcmul_(g, g, value=1 - c.beta2)
        bias1, bias2 = 1 - c.beta1 ** self.t, 1 - c.beta2 ** self.t
        denom = (self.v.sqrt() / math.sqrt(bias2)).add_(c.eps)
        return theta.addcdiv(self.m, denom, value=-lr / bias1)

    def copy(self) -> Adam:
        return Adam(self.config, self.m, m=self.m, v=self.v, t=self.t)

    def to(self, device) -> Adam:
        """This state with m and v on `device` (the model's; a trajectory is kept on the CPU)."""
        self.m, self.v = self.m.to(device), self.v.to(device)
        return self


def epoch_order(examples: Sequence[Example], seed: int, epoch: int) -> list[int]:
    """The order of one Adam epoch: examples sorted by a seeded hash of their id.

    Unlike a random permutation of positions, this order is stable under edits: retraining on the set without some
    examples (or with some corrected) visits the others in the same relative order, so the retrain differs from the
    original by the request, not by a reshuffled data order.
    """
    def key(j: int) -> str:
        return hashlib.sha256(f"{seed}\x00{epoch}\x00{examples[j].id}".encode()).hexdigest()

    return sorted(range(len(examples)), key=key)


def schedule(examples: Sequence[Example], *, seed: int, epochs: int, batch_size: int) -> list[list[int]]:
    """The indices (into `examples`) of every Adam step's mini-batch: each epoch in the id-hash order
    (`epoch_order`, stable under edits) cut into runs of `batch_size`."""
    steps = []
    for epoch in range(epochs):
        order = epoch_order(examples, seed, epoch)
        steps += [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return steps


def first_step_seeing(examples: Sequence[Example], steps: Sequence[Sequence[int]], ids: set[str]) -> int | None:
    """The first step whose mini-batch holds one of `ids` (None if none does)."""
    for k, batch in enumerate(steps):
        if any(examples[i].id in ids for i in batch):
            return k
    return None


class Recorder:
    """Collects a fine-tune's trajectory step by step (`finetune` calls `step` before each Adam step)."""

    def __init__(self, meta: dict, theta0: torch.Tensor, n_steps: int, *, max_bytes: int = DEFAULT_MAX_BYTES):
        self.meta, self.theta0, self.n_steps = dict(meta), theta0.detach().cpu().clone(), n_steps
        per_step = theta0.numel() * theta0.element_size()
        self.keep_grads = n_steps * per_step <= max_bytes
        self.grads = torch.empty((n_steps, theta0.numel()), dtype=theta0.dtype) if self.keep_grads else None
        # without per-step gradients: checkpoints (θ, m, v) at evenly spaced steps within the budget
        n_ckpt = max(1, min(n_steps, int(max_bytes // (3 * per_step))))
        self.every = math.ceil(n_steps / n_ckpt)
        self.checkpoints: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def resume(cls, trajectory: Trajectory, start: int, n_steps: int, *, examples: Sequence[Example]) -> Recorder:
        """A recorder for a run that shares `trajectory`'s first `start` steps (a rewind) and has `n_steps` in all
        on `examples`: the shared part is copied, in the same storage mode."""
        meta = {k: v for k, v in trajectory.meta.items() if k not in ("steps", "checkpoint_every", "final_sha256")}
        meta |= adam_meta(trajectory.config, epochs=meta["epochs"], batch_size=meta["batch_size"], seed=meta["seed"],
                          train=examples)
        if "batches" in meta:  # the recorded schedule, as the edited set takes it
            meta["batches"] = [[examples[i].id for i in b] for b in trajectory.schedule(examples)]
            meta["lrs"] = trajectory.lrs(examples)
        rec = cls(meta, trajectory.theta0, n_steps, max_bytes=0)
        rec.keep_grads = trajectory.grads is not None
        if rec.keep_grads:
            rec.grads = torch.empty((n_steps, trajectory.theta0.numel()), dtype=trajectory.theta0.dtype)
            rec.grads[:start].copy_(trajectory.grads[:start])
        else:
            rec.every = trajectory.meta["checkpoint_every"]
            rec.checkpoints = {k: c for k, c in trajectory.checkpoints.items() if k < start}
        return rec

    def step(self, k: int, theta: torch.Tensor, adam: Adam, data_grad: torch.Tensor) -> None:
        if self.keep_grads:
            self.grads[k].copy_(data_grad)
        elif k % self.every == 0:
            self.checkpoints[k] = (theta.cpu().clone(), adam.m.cpu().clone(), adam.v.cpu().clone())

    def finish(self, steps_taken: int, final: torch.Tensor) -> Trajectory:
        """The trajectory of a run that took `steps_taken` steps and ended at θ = `final` (its hash is kept, so
        `Trajectory.check` knows the adapter it belongs to without a replay)."""
        if steps_taken != self.n_steps:
            raise ConfigError(f"recorded {steps_taken} of {self.n_steps} steps")
        meta = self.meta | {"steps": self.n_steps, "checkpoint_every": None if self.keep_grads else self.every,
                            "final_sha256": tensor_sha256(final)}
        return Trajectory(meta, self.theta0, self.grads, self.checkpoints)


@dataclass
class Trajectory:
    """A recorded Adam fine-tune: `meta` (the recipe: lr, betas, eps, l2, epochs, batch_size, seed, n_train,
    train_sha256, steps), θ₀, the per-step data gradients (steps, p) or, without them, checkpoints."""

    meta: dict
    theta0: torch.Tensor
    grads: torch.Tensor | None
    checkpoints: dict
    integrity: str = "recorded in this process"  # on load: whether its checksums were verified
    verification: dict = field(default_factory=dict)  # what `replay.verify_recording` checked

    @property
    def config(self) -> AdamConfig:
        m = self.meta
        return AdamConfig(lr=m["lr"], beta1=m["beta1"], beta2=m["beta2"], eps=m["eps"], l2=m["l2"],
                          weight_decay=m.get("weight_decay", 0.0), max_grad_norm=m.get("max_grad_norm", 0.0))

    @property
    def steps(self) -> int:
        return int(self.meta["steps"])

    @property
    def nbytes(self) -> int:
        tensors = [self.theta0, *([self.grads] if self.grads is not None else []),
                   *(t for c in self.checkpoints.values() for t in c)]
        return sum(t.numel() * t.element_size() for t in tensors)

    def schedule(self, examples: Sequence[Example]) -> list[list[int]]:
        """Each step's mini-batch as indices into `examples`: the id-hash schedule of llmeraser's fine-tune, or for a
        run recorded from a Trainer its recorded batches (by id), less the examples `examples` lacks, empty steps
        dropped (retraining over the recorded batches without them takes no such step)."""
        m = self.meta
        if "batches" not in m:
            return schedule(examples, seed=m["seed"], epochs=m["epochs"], batch_size=m["batch_size"])
        at = {e.id: i for i, e in enumerate(examples)}
        steps = [[at[i] for i in batch if i in at] for batch in m["batches"]]
        return [b for b in steps if b]

    def lrs(self, examples: Sequence[Example]) -> list[float] | None:
        """Each step of `schedule(examples)`'s learning rate, for a run with a recorded schedule (else None)."""
        m = self.meta
        if "lrs" not in m:
            return None
        at = {e.id for e in examples}
        return [lr for batch, lr in zip(m["batches"], m["lrs"], strict=True) if any(i in at for i in batch)]

    def start_before(self, k: int) -> int:
        """The latest step ≤ k from which the state can be rebuilt (k itself with per-step gradients)."""
        if self.grads is not None:
            return k
        return max([0, *(j for j in self.checkpoints if j <= k)])

    def state(self, k: int) -> tuple[torch.Tensor, Adam]:
        """(θ_k, Adam's state) just before step k, rebuilt exactly; k must be a step `start_before` returns."""
        if self.grads is None:
            if k == 0:
                return self.theta0.clone(), Adam(self.config, self.theta0)
            if k not in self.checkpoints:
                raise ConfigError(f"no checkpoint at step {k} (checkpoints every {self.meta['checkpoint_every']})")
            theta, m, v = self.checkpoints[k]
            return theta.clone(), Adam(self.config, theta, m, v, t=k)
        for j, theta, adam in self.states():
            if j == k:
                return theta, adam
        raise ConfigError(f"step {k} is outside the recorded {self.steps} steps")

    def states(self, stop: int | None = None) -> Iterator[tuple[int, torch.Tensor, Adam]]:
        """(k, θ_k, Adam state before step k) for k = 0 … stop (default: every step, then the final θ at k = steps),
        rebuilt by replaying the recorded gradients: bit for bit the fine-tune's states. The yielded Adam is live:
        copy it to keep it."""
        if self.grads is None:
            raise ConfigError("this trajectory kept checkpoints only (its per-step gradients exceeded the storage "
                              "budget): it serves exact rewind, not path replay")
        stop = self.steps if stop is None else stop
        theta, adam = self.theta0.clone(), Adam(self.config, self.theta0)
        lrs = self.meta.get("lrs")
        for k in range(stop + 1):
            yield k, theta, adam
            if k == self.steps:
                return
            theta = adam.step(theta, self.grads[k], None if lrs is None else lrs[k])

    def final(self) -> torch.Tensor:
        """θ after the last step (per-step gradients only)."""
        last = collections.deque(self.states(), maxlen=1)  # one state held at a time
        return last[0][1]

    def check(self, train: Sequence[Example], theta: torch.Tensor, names: Sequence[str] | None = None) -> None:
        """That this trajectory is the fine-tune of `theta` on `train`: the training set's hash, the parameter
        count (and, when both are known, the parameters' names in order), the schedule's length, and the final θ's
        hash equal to `theta`'s.

        Raises:
            AdapterError: naming what does not match.
        """
        from llmeraser.data import examples_hash

        recorded, given = str(self.meta.get("train_sha256")), examples_hash(train)
        if recorded != given:
            raise AdapterError(f"the adapter's trajectory was recorded on another training set "
                               f"({self.meta.get('n_train')} examples, sha256 {recorded[:12]}…) than the "
                               f"{len(train)} given (sha256 {given[:12]}…)")
        if self.theta0.numel() != theta.numel():
            raise AdapterError(f"the trajectory has {self.theta0.numel():,} parameters, the adapter {theta.numel():,}")
        if names is not None and self.meta.get("param_names_sha256") not in (None, names_sha256(names)):
            raise AdapterError("the trajectory's parameters are not the adapter's (their names or order differ)")
        m = self.meta
        n = (m["epochs"] * math.ceil(len(train) / m["batch_size"]) if "batches" not in m  # before building it
             else len(self.schedule(train)))
        if n != self.steps:
            raise AdapterError(f"the trajectory's recipe gives {n} steps on this training set, but {self.steps} were "
                               f"recorded")
        if tensor_sha256(theta) != self.meta["final_sha256"]:
            raise AdapterError("the trajectory does not end at the adapter's weights (their hash differs): the "
                               "adapter was changed after fine-tuning")

    def check_recipe(self, task) -> str | None:
        """That the task a replay would compute gradients with renders, cuts and tokenises examples as fine-tuning
        did (`task_recipe`); returns a note when the recording predates recipes (format 1), else None.

        Raises:
            AdapterError: naming the first part of the recipe that differs.
        """
        recorded = self.meta.get("recipe")
        if recorded is None:
            return "recorded before recipes were kept: the rendering, max length and tokenizer are not compared"
        now = task_recipe(task)
        order = list(RECIPE_NAMES)
        for key in sorted(set(recorded) | set(now), key=lambda k: (order.index(k) if k in order else len(order), k)):
            if recorded.get(key) != now.get(key):
                what = RECIPE_NAMES.get(key, key)
                raise AdapterError(f"the recording was made with {what} {_show(recorded.get(key))}, but this "
                                   f"request would replay it with {_show(now.get(key))}: a replay would not be the "
                                   f"retraining it claims to be (use the training record's values: drop "
                                   f"--max-length/--l2 overrides, and the base model and tokenizer it was trained "
                                   f"on)")
        return None

    def replay_check(self, theta: torch.Tensor, keep: Sequence[int] = ()) -> dict[int, torch.Tensor]:
        """Replay θ₀ and the recorded gradients with the recorded optimiser (no forward or backward pass) and check
        that it ends at the adapter's θ within REPLAY_TOL of the distance fine-tuning moved it: that pins the learning
        rates, betas, ε, L2, decay and clipping in the header to the ones that trained the adapter. Returns θ_k for
        each k in `keep` (the states a gradient spot check needs). Per-step gradients only ({} otherwise).

        Raises:
            AdapterError: the replay ends elsewhere (or at non-finite values).
        """
        if self.grads is None:
            return {}
        kept: dict[int, torch.Tensor] = {}
        for k, state, _ in self.states():
            if k in keep:
                kept[k] = state.clone()
            end = state
        theta = theta.detach().to("cpu", end.dtype)
        gap = float((end.double() - theta.double()).norm())
        moved = float((theta.double() - self.theta0.double()).norm())
        if not gap <= REPLAY_TOL * moved + 1e-12:
            raise AdapterError(f"replaying the recorded gradients with the recorded optimiser ends {gap:.3g} from the "
                               f"adapter, which fine-tuning moved {moved:.3g} from θ₀: the header's learning rates, "
                               f"betas, eps, l2, weight decay or clipping are not the ones that trained it")
        return kept

    def describe(self) -> dict:
        """What the report says of the recording."""
        return {"steps": self.steps, "per_step_gradients": self.grads is not None,
                "checkpoint_every": self.meta.get("checkpoint_every"), "mib": self.nbytes / 2**20,
                "final_sha256": self.meta["final_sha256"][:16],
                "integrity": self.integrity, **({"verified": self.verification} if self.verification else {})}


def names_sha256(names: Sequence[str]) -> str:
    """The hash of the trainable parameters' names in order (a recording and an adapter must flatten alike)."""
    return hashlib.sha256("\n".join(names).encode()).hexdigest()


def tensor_sha256(t: torch.Tensor) -> str:
    """The sha256 of a tensor's bytes (any dtype or device)."""
    return hashlib.sha256(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def adam_meta(config: AdamConfig, *, epochs: int, batch_size: int, seed: int, train: Sequence[Example],
              task=None) -> dict:
    """The header of a recording of llmeraser's Adam fine-tune (with the task's recipe when `task` is given)."""
    from llmeraser.data import examples_hash
    meta = {"optimizer": "adam", **asdict(config), "epochs": epochs, "batch_size": batch_size, "seed": seed,
            "n_train": len(train), "train_sha256": examples_hash(train)}
    return meta if task is None else meta | {"recipe": task_recipe(task)}


RECIPE_NAMES = {"max_length": "max length", "rendering": "rendering",  # in the order a refusal names them
                "tokenizer_sha256": "the tokenizer whose vocabulary hashes to",
                "chat_template_sha256": "the chat template hashing to", "bos": "BOS token id", "task": "task"}


def _show(value) -> str:
    return "none" if value is None else (value[:12] + "…") if isinstance(value, str) and len(value) == 64 \
        else json.dumps(value, sort_keys=True)


def task_recipe(task) -> dict:
    """What a step's gradient depends on besides θ and the examples: for `task.CausalLMTask`, how examples are
    rendered and masked, the max length, the BOS token, and hashes of the tokenizer's vocabulary and of the chat
    template in use; another task is named by its class."""
    from llmeraser.task import CausalLMTask

    if not isinstance(task, CausalLMTask):
        return {"task": type(task).__qualname__}
    tokenizer = task.tokenizer
    rendering = {k: v for k, v in task.rendering.to_dict().items() if k != "chat_template"}
    template = task.rendering.chat_template or getattr(tokenizer, "chat_template", None)
    try:
        vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
        vocab_sha = sha256_bytes(canonical_json(vocab).encode())
    except (AttributeError, NotImplementedError, TypeError):
        vocab_sha = None
    return {"max_length": task.max_length, "rendering": rendering, "bos": task.bos, "tokenizer_sha256": vocab_sha,
            "chat_template_sha256": sha256_bytes(template.encode()) if isinstance(template, str) else None}
