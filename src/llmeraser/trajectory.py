"""Fine-tuning's path, recorded: Adam on a flat vector, the step schedule, and the trajectory file (docs/path.md).

Adam fine-tuning (`finetune`, optimizer adam) is a deterministic function of the initial θ₀, the step schedule
(`schedule`: the id-hash order of each epoch cut into mini-batches) and each step's data gradient g_k (the batch
mean of ∇ℓ at θ_k). The trajectory stores θ₀ and every g_k, so any step's state (θ_k, Adam's m_k, v_k) is
rebuilt exactly, bit for bit, by replaying the elementwise Adam update (`Trajectory.states`) — no forward or
backward pass. That is what the path-based updates need (`llmeraser.replay`): the state just before the first step
that saw an edited example (exact rewind), and θ_k with g_k along the whole path (path-aware replay).

Storage is one vector of the trainable parameters per step (the embedded demo: 921,600 floats, 3.7 MB a step,
50 steps), written to disk as fine-tuning goes (`llmeraser.recorder.Recorder`, `llmeraser.storage`) and read back one
step at a time, so memory holds one step whatever the run's length. It is bounded by a byte budget (and the disk's
free space): beyond it only checkpoints (θ_k, m_k, v_k) at evenly spaced steps are kept, which still serve exact
rewind (from the checkpoint at or before the first edited step) but not path-aware replay. A low-precision recording
(bfloat16 gradients) keeps full-precision checkpoints beside them: rewind restarts from those (exact), path replay
uses the rounded gradients, and `states` restarts from each checkpoint it passes, so its error never accumulates
beyond one checkpoint interval. The file lives beside the adapter (`trajectory.safetensors`, written and read back by
`llmeraser.recording.write` / `read`, which validate its header and verify every tensor's checksum). A replay is
only as exact as the recording it reads, so before one (docs/path.md#what-is-verified) the recipe is compared with
the request's (`check_recipe`), and replaying the recorded gradients with the recorded optimiser must end at the
adapter (`replay_check`), which pins the learning rates, betas, ε, L2, decay and clipping to the ones that trained it.
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
from llmeraser.storage import Rows, nbytes, tensor_bytes

TRAJECTORY = "trajectory.safetensors"
DEFAULT_MAX_BYTES = 4 * 2**30  # the recording's default budget (`recorder.plan`; with half the free disk space)
# Replaying the recorded gradients must end this close to the adapter, relative to the distance fine-tuning moved it.
# The replay applies the same elementwise AdamW formula to the same gradients, so it differs from training only by
# rounding (another device's fused multiply-adds; torch's lerp for m under a Trainer): measured < 1e-4 of the distance
# on SFTTrainer runs (tests/test_trl.py), 0 on llmeraser's own. An edited learning rate, beta, eps, L2, decay or
# clipping, or a changed gradient, moves every step, so it ends O(1) of the distance away.
REPLAY_TOL = 1e-3
# The recorded gradients' precisions: "full" keeps the parameters' own dtype; bfloat16 halves float32's bytes with
# float32's exponent range (float16 is not offered: gradients below 6e-5 lose relative precision there and above
# 65504 overflow, at the same 2 bytes). Unit roundoff u: a stored value is within u of the exact one, relatively.
RECORD_DTYPES = {"full": None, "bfloat16": torch.bfloat16}
UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


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


@dataclass
class Trajectory:
    """A recorded Adam fine-tune: `meta` (the recipe: lr, betas, eps, l2, epochs, batch_size, seed, n_train,
    train_sha256, steps), θ₀, the per-step data gradients (steps, p: a tensor, or `storage.Rows` read from disk one
    step at a time; `grads[k]` is step k's in θ₀'s dtype) and/or checkpoints {k: (θ_k, m_k, v_k)}. With full-precision
    gradients there are no checkpoints; without gradients (over budget) or with low-precision ones
    (meta["grad_dtype"]) there are checkpoints every meta["checkpoint_every"] steps."""

    meta: dict
    theta0: torch.Tensor
    grads: torch.Tensor | Rows | None
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
        return (nbytes(self.theta0) + (nbytes(self.grads) if self.grads is not None else 0)
                + sum(nbytes(c) if isinstance(c, Rows) else sum(map(nbytes, c)) for c in self.checkpoints.values()))

    @property
    def low_precision(self) -> bool:
        """Whether the gradients were stored rounded (path replay only; rewind restarts from checkpoints)."""
        return self.grads is not None and self.meta.get("grad_dtype") not in (None, "full")

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
        """The latest step ≤ k from which the state can be rebuilt exactly (k itself with full-precision per-step
        gradients; else the checkpoint at or before k)."""
        if self.grads is not None and not self.low_precision:
            return k
        return max([0, *(j for j in self.checkpoints if j <= k)])

    def state(self, k: int) -> tuple[torch.Tensor, Adam]:
        """(θ_k, Adam's state) just before step k, rebuilt exactly; k must be a step `start_before` returns."""
        if self.grads is None or self.low_precision:
            if k == 0:
                return self.theta0.clone(), Adam(self.config, self.theta0)
            if k not in self.checkpoints:
                raise ConfigError(f"no checkpoint at step {k} (checkpoints every {self.meta['checkpoint_every']})")
            return self._checkpoint(k)
        for j, theta, adam in self.states():
            if j == k:
                return theta, adam
        raise ConfigError(f"step {k} is outside the recorded {self.steps} steps")

    def _checkpoint(self, k: int) -> tuple[torch.Tensor, Adam]:
        theta, m, v = self.checkpoints[k]
        return theta.clone(), Adam(self.config, theta, m, v, t=k)

    def states(self, stop: int | None = None, anchor=None, device: torch.device | str | None = None,
               with_grads: bool = False) -> Iterator[tuple]:
        """(k, θ_k, Adam state before step k) for k = 0 … stop (default: every step, then the final θ at k = steps),
        rebuilt by replaying the recorded gradients: bit for bit the fine-tune's states with full-precision ones.
        With low-precision gradients the replay restarts from each full-precision checkpoint it reaches (exact
        there; within one interval's rounding between), calling `anchor(k, replayed θ_k, checkpoint θ_k)` first.
        The yielded Adam is live: copy it to keep it. On `device` (default: the host, where the recording is read)
        the states live and are stepped there — a path replay's every state, without a host step each or a
        transfer of θ_k; there they are the fine-tune's own when it ran on that device. `with_grads`: also yield
        step k's recorded gradient, on `device` (None at k = steps), the row this replay reads anyway, so a
        caller needing it reads it once."""
        if self.grads is None:
            raise ConfigError("this trajectory kept checkpoints only (its per-step gradients exceeded the storage "
                              "budget): it serves exact rewind, not path replay")
        stop = self.steps if stop is None else stop
        theta = self.theta0.to(device, copy=True) if device is not None else self.theta0.clone()
        adam = Adam(self.config, theta)
        lrs = self.meta.get("lrs")
        for k in range(stop + 1):
            if self.low_precision and k and k in self.checkpoints:
                exact, exact_adam = self._checkpoint(k)
                if device is not None:
                    exact, exact_adam = exact.to(device), exact_adam.to(device)
                if anchor is not None:
                    anchor(k, theta, exact)
                theta, adam = exact, exact_adam
            g = self.grads[k] if k < self.steps else None
            if g is not None and device is not None:
                g = g.to(device, non_blocking=True)  # a host row, copied out before this returns: no device wait
            yield (k, theta, adam, g) if with_grads else (k, theta, adam)
            if k == stop or k == self.steps:  # no step past the last state asked for
                return
            theta = adam.step(theta, g, None if lrs is None else lrs[k])

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
        rates, betas, ε, L2, decay and clipping in the header to the ones that trained the adapter. With
        low-precision gradients each checkpoint interval is checked on its own: the replay from one full-precision
        checkpoint must reach the next one (the last: the adapter) within `rounding_bound` of the interval. Returns
        θ_k for each k in `keep` (the states a gradient spot check needs). Per-step gradients only ({} otherwise).

        Raises:
            AdapterError: the replay ends elsewhere (or at non-finite values).
        """
        if self.grads is None:
            return {}
        kept: dict[int, torch.Tensor] = {}
        segment = [0, self.theta0]  # the interval's first step and exact θ there

        def anchor(k: int, replayed: torch.Tensor, exact: torch.Tensor) -> None:
            self._check_segment(segment, k, replayed, exact, f"the checkpoint at step {k}")
            segment[:] = [k, exact]

        for k, state, _ in self.states(anchor=anchor):
            if k in keep:
                kept[k] = state.clone()
            end = state
        self._check_segment(segment, self.steps, end, theta.detach().to("cpu", end.dtype), "the adapter")
        return kept

    def _check_segment(self, segment: list, stop: int, replayed: torch.Tensor, target: torch.Tensor,
                       what: str) -> None:
        """The replay from step segment[0] (exact θ segment[1]) to `stop` ended at `replayed`; `target` is where
        fine-tuning was. Full precision: ‖gap‖ ≤ REPLAY_TOL ‖move‖ (rounding only). Low precision: ‖gap‖_∞ ≤
        `rounding_bound` + REPLAY_TOL ‖move‖_∞."""
        gap, move = (replayed.double() - target.double()), (target.double() - segment[1].double())
        if self.low_precision:
            gap_n, move_n = float(gap.abs().max()), float(move.abs().max())
            allowed = self.rounding_bound(segment[0], stop) + REPLAY_TOL * move_n + 1e-12
        else:
            gap_n, move_n = float(gap.norm()), float(move.norm())
            allowed = REPLAY_TOL * move_n + 1e-12
        if not gap_n <= allowed:
            raise AdapterError(f"replaying the recorded gradients with the recorded optimiser ends {gap_n:.3g} from "
                               f"{what}, which fine-tuning moved {move_n:.3g} from step {segment[0]}'s state: the "
                               f"header's learning rates, betas, eps, l2, weight decay or clipping are not the ones "
                               f"that trained it")

    def rounding_bound(self, lo: int, hi: int) -> float:
        """How far (max over coordinates) replaying steps lo … hi−1 from an exact state with the stored, rounded
        gradients may end from the exact replay. Each stored gradient is g(1+δ), |δ| ≤ u (the dtype's unit
        roundoff). The replay feeds the recorded gradients, not recomputed ones, so the error never compounds
        through the model: it is the sum of each step's update error. A step moves a coordinate by lr·m̂/(√v̂+ε),
        and |m̂|/√v̂ ≤ K (Cauchy–Schwarz over Adam's exponential sums, `adam_ratio_bound`); rounding moves m̂/√v̂ by
        at most 2Ku (m̂ by Ku, √v̂ by u relatively), and clipping's factor, from a norm off by u, doubles that:
        ≤ 4Ku·lr_k a step, to first order in u (the L2 term's feedback, l2 · the drift, is of second order)."""
        c = self.config
        lrs = self.meta.get("lrs") or [c.lr] * self.steps
        u = UNIT_ROUNDOFF[self.grads.dtype] if self.low_precision else 0.0
        return 4 * adam_ratio_bound(c.beta1, c.beta2, self.steps) * u * sum(lrs[lo:hi])

    def replay_claim(self) -> str:
        """What `replay_check` established, for the report."""
        if self.low_precision:
            return (f"the recorded {self.meta['grad_dtype']} gradients, replayed with the recorded optimiser from each "
                    f"full-precision checkpoint, reach the next one and the adapter within their rounding bound")
        return "the recorded gradients, replayed with the recorded optimiser, end at the adapter"

    def describe(self) -> dict:
        """What the report says of the recording."""
        return {"steps": self.steps, "per_step_gradients": self.grads is not None,
                "gradient_dtype": self.meta.get("grad_dtype", "full"),
                "checkpoint_every": self.meta.get("checkpoint_every"), "mib": self.nbytes / 2**20,
                "final_sha256": self.meta["final_sha256"][:16],
                "integrity": self.integrity, **({"verified": self.verification} if self.verification else {})}


def adam_ratio_bound(beta1: float, beta2: float, steps: int) -> float:
    """A bound on |m̂_t| / √v̂_t over t = 1 … steps for any gradients: m_t = (1−β₁) Σ β₁^(t−i) g_i and v_t = (1−β₂)
    Σ β₂^(t−i) g_i², so by Cauchy–Schwarz |m_t| ≤ (1−β₁)/√(1−β₂) · √(Σ_{j<t} (β₁²/β₂)^j) · √v_t; with the bias
    corrections 1/(1−β₁^t) and √(1−β₂^t). About 7.3 for torch's betas (0.9, 0.999); infinite when β₂ = 0."""
    if beta2 <= 0:
        return math.inf
    rho, sums, best = beta1 ** 2 / beta2, 0.0, 0.0
    for t in range(1, max(1, steps) + 1):
        sums = 1 + rho * sums
        best = max(best, (1 - beta1) * math.sqrt((1 - beta2 ** t) * sums / (1 - beta2)) / (1 - beta1 ** t))
    return best


def names_sha256(names: Sequence[str]) -> str:
    """The hash of the trainable parameters' names in order (a recording and an adapter must flatten alike)."""
    return hashlib.sha256("\n".join(names).encode()).hexdigest()


def tensor_sha256(t: torch.Tensor) -> str:
    """The sha256 of a tensor's bytes (any dtype or device)."""
    return sha256_bytes(tensor_bytes(t))


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
