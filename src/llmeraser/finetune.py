"""Deterministic fine-tuning of the trainable parameters on exactly the objective the eraser assumes.

R(θ) = (1/N) Σᵢ ℓ(zᵢ; θ) + (l2/2) ‖θ‖²   (docs/math.md#the-objective)

The model runs in eval mode (dropout off) so the optimised function is R itself, not a noisy version of it; the
L2 term is part of the loss (not AdamW's decoupled decay), so the eraser's Hessian contains the same l2·I.
`adam` takes mini-batch steps in a seeded order that is stable under edits (`trajectory.epoch_order`; the demo and real
models); `lbfgs` minimises R with full-batch L-BFGS until ‖∇R‖ ≤ grad_tol (tests use it to reach a stationary point
in float64). Retraining baselines call this same routine on the cleaned set. `finetune_adapter` is the whole
pipeline of `llmeraser finetune` (base model, fresh adapter, fine-tune, record, save) as one call; the command line,
the demo, the benchmarks and bench/device_check.py all go through it (or, fine-tuning themselves, `save_finetuned`).

Under torch.distributed (`llmeraser.distributed`) every step is data-parallel: each rank takes a slice of the
step's examples (Adam's mini-batch, L-BFGS's full batch), and one all-reduce adds up their gradients and losses, so
every rank takes the same step as a single process would.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from tqdm.auto import tqdm

from llmeraser import distributed
from llmeraser.curvature import objective_gradient
from llmeraser.data import Example, examples_hash
from llmeraser.errors import AdapterError, ConfigError, LLMEraserRuntimeError
from llmeraser.params import ParamView
from llmeraser.record import DEFAULT_MAX_LENGTH
from llmeraser.recorder import Recorder
from llmeraser.recording import write
from llmeraser.task import Task, per_example_loss
from llmeraser.trajectory import RECORD_DTYPES, Adam, AdamConfig, Trajectory, adam_meta, schedule

logger = logging.getLogger(__name__)


@dataclass
class FinetuneArguments:
    """Options of `finetune`."""

    optimizer: str = field(default="adam", metadata={"help": "adam (mini-batch) or lbfgs (full batch, small models)"})
    epochs: int = field(default=3, metadata={"help": "adam: passes over the training set"})
    lr: float | None = field(default=None, metadata={"help": "step size; default 1e-3 (adam) or 1.0 (lbfgs)"})
    batch_size: int = field(default=8, metadata={"help": "examples per step (adam) or per pass chunk (lbfgs)"})
    l2: float = field(default=0.0, metadata={"help": "coefficient of (l2/2)‖θ‖² in the objective"})
    max_iters: int = field(default=200, metadata={"help": "lbfgs: outer iterations"})
    grad_tol: float = field(default=1e-6, metadata={"help": "lbfgs: stop when ‖∇R‖₂ ≤ grad_tol"})
    seed: int = field(default=0, metadata={"help": "seed of the example order"})
    record: bool = field(default=True, metadata={
        "help": "adam: record the trajectory (θ₀ and every step's gradient, one parameter vector a step) so that "
                "'unlearn' can rewind or replay the path; saved beside the adapter (trajectory.safetensors)"})
    record_max_gib: float = field(default=4.0, metadata={
        "help": "storage bound of the recording, on disk (also at most half the free space where it is written): "
                "beyond it only evenly spaced checkpoints are kept (exact rewind still works; path replay needs every "
                "step)"})
    record_dtype: str = field(default="full", metadata={
        "help": "precision of the recorded gradients: full (the parameters' own) or bfloat16 (half the bytes of "
                "float32, plus full-precision checkpoints every ⌈√steps⌉ steps: rewind stays exact, path replay "
                "uses the rounded gradients; docs/path.md)"})
    final_check: bool = field(default=True, metadata={
        "help": "measure R(θ) and ‖∇R(θ)‖ at the end (one more pass over the data; adam only, lbfgs always does)"})
    progress: bool = field(default=False, metadata={"help": "show a progress bar"})

    def __post_init__(self) -> None:
        if self.optimizer not in ("adam", "lbfgs"):
            raise ConfigError(f"optimizer must be 'adam' or 'lbfgs', got {self.optimizer!r}")
        if self.lr is None:
            self.lr = 1e-3 if self.optimizer == "adam" else 1.0
        for name in ("epochs", "batch_size", "max_iters"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.record_dtype not in RECORD_DTYPES:
            raise ConfigError(f"record_dtype must be one of {', '.join(RECORD_DTYPES)}, got {self.record_dtype!r}")
        for name in ("lr", "l2", "grad_tol", "record_max_gib"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0) or (name == "lr" and v == 0):
                raise ConfigError(f"{name} must be a finite number {'> 0' if name == 'lr' else '≥ 0'}, got {v}")


@dataclass
class FinetuneResult:
    losses: list[float]  # adam: mean loss per epoch; lbfgs: objective per iteration
    objective: float  # R(θ) at the end
    grad_norm: float  # ‖∇R(θ)‖₂ at the end
    converged: bool  # lbfgs: grad_norm ≤ grad_tol; adam: always True (it runs its epochs)
    steps: int
    seconds: float
    trajectory: Trajectory | None = field(default=None, repr=False)  # adam with record: the recorded path

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "trajectory"}
        if self.trajectory is not None:
            out["trajectory"] = self.trajectory.describe()
        return out


def objective(model: torch.nn.Module, task: Task, examples: Sequence[Example], *, l2: float = 0.0,
              batch_size: int = 8) -> float:
    """R(θ) = mean loss + (l2/2)‖θ‖² (no gradient)."""
    with torch.no_grad():
        total = torch.zeros(1, dtype=torch.float64, device=ParamView(model).device)  # one transfer, at the end
        for idx in distributed.batches(len(examples), batch_size):
            total += per_example_loss(task, model, task.collate([examples[i] for i in idx])).sum().double()
        total = float(distributed.all_reduce(total, "objective"))
        return total / len(examples) + 0.5 * l2 * float(ParamView(model).vector().pow(2).sum())


def _reduce_gradients(view: ParamView, loss_sum: torch.Tensor) -> float:
    """Under torch.distributed, add up the ranks' parameter gradients (in place) and their loss sums in one
    all-reduce; returns the total loss sum. A rank without examples in the step contributes zeros."""
    if not distributed.is_distributed():
        return float(loss_sum.detach())
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in view.params]
                     + [loss_sum.detach().reshape(1).to(view.dtype)])
    distributed.all_reduce(flat, "fine-tuning gradients")
    for p, g in zip(view.params, view.unflatten(flat[:-1]), strict=True):
        p.grad = g.clone()
    return float(flat[-1])


def finetune(model: torch.nn.Module, task: Task, examples: Sequence[Example],
             args: FinetuneArguments | None = None, *, record_dir: str | os.PathLike | None = None,
             announce: Callable[[str], object] | None = None) -> FinetuneResult:
    """Minimise R(θ) over the model's trainable parameters, in place. A recorded run spools its gradients to a
    temporary file in `record_dir` (default: the system's temporary folder; `finetune_adapter`: beside the output)
    and says first what the recording will keep, through `announce` (default: the log).

    Raises:
        LLMEraserRuntimeError: the loss became non-finite.
    """
    args = args or FinetuneArguments()
    if not examples:
        raise ConfigError("fine-tuning needs at least one example")
    model.eval()  # dropout off: the objective is R exactly
    view = ParamView(model)
    start = time.perf_counter()
    if args.optimizer == "adam":
        losses, steps, trajectory = _adam(model, task, examples, args, view, record_dir, announce or logger.info)
    else:
        losses, steps, trajectory = _lbfgs(model, task, examples, args, view)
    if distributed.is_distributed():  # the ranks took the same steps; make θ bitwise identical all the same
        view.set_vector(distributed.broadcast(view.vector(), "fine-tuned parameters"))
    if args.optimizer == "adam" and not args.final_check:
        result = FinetuneResult(losses=losses, objective=float("nan"), grad_norm=float("nan"), converged=True,
                                steps=steps, seconds=time.perf_counter() - start, trajectory=trajectory)
        logger.info("fine-tuned %d steps: last epoch's mean loss %.6g", steps, losses[-1])
        return result
    gnorm = float(objective_gradient(model, task, examples, l2=args.l2, batch_size=args.batch_size).norm())
    converged = args.optimizer == "adam" or gnorm <= args.grad_tol
    if not converged:
        logger.warning("lbfgs stopped after %d iterations at ‖∇R‖ = %.3g > grad_tol %.1g", steps, gnorm, args.grad_tol)
    result = FinetuneResult(losses=losses, objective=objective(model, task, examples, l2=args.l2,
                                                               batch_size=args.batch_size),
                            grad_norm=gnorm, converged=converged, steps=steps, seconds=time.perf_counter() - start,
                            trajectory=trajectory)
    logger.info("fine-tuned %d steps: R = %.6g, ‖∇R‖ = %.3g", steps, result.objective, result.grad_norm)
    return result


def _adam(model: torch.nn.Module, task: Task, examples: Sequence[Example], args: FinetuneArguments,
          view: ParamView, record_dir, announce: Callable[[str], object]) -> tuple[list[float], int, Trajectory | None]:
    """Mini-batch Adam for args.epochs in the id-hash order; (mean loss per epoch, steps, the trajectory when
    args.record)."""
    steps = schedule(examples, seed=args.seed, epochs=args.epochs, batch_size=args.batch_size)
    config = adam_config(args)
    theta = view.vector()
    recorder = None
    if args.record:
        recorder = Recorder(adam_meta(config, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
                                      train=examples, task=task), theta, len(steps),
                            max_bytes=int(args.record_max_gib * 2**30), dtype=args.record_dtype, folder=record_dir)
        if distributed.rank() == 0:
            announce(recorder.plan.describe())
    try:
        losses = run_steps(model, task, examples, steps, view, Adam(config, theta), start=0, recorder=recorder,
                           progress=args.progress)
        trajectory = recorder.finish(len(losses), view.vector()) if recorder is not None else None
    except BaseException:
        if recorder is not None:
            recorder.discard()
        raise
    per_epoch = math.ceil(len(examples) / args.batch_size)
    return ([_epoch_mean(losses, steps, e * per_epoch, (e + 1) * per_epoch) for e in range(args.epochs)],
            len(losses), trajectory)


def _epoch_mean(losses: list[float], steps: list[list[int]], lo: int, hi: int) -> float:
    n = sum(len(b) for b in steps[lo:hi])
    return sum(loss * len(b) for loss, b in zip(losses[lo:hi], steps[lo:hi], strict=True)) / n


def adam_config(args: FinetuneArguments) -> AdamConfig:
    return AdamConfig(lr=args.lr, l2=args.l2)


def step_gradient(model: torch.nn.Module, task: Task, examples: Sequence[Example], batch: Sequence[int],
                  view: ParamView, *, loss: bool = True) -> tuple[torch.Tensor, float | None]:
    """(the data gradient of the mini-batch at θ, a flat vector; its loss), data-parallel under torchrun: the batch
    mean, or under a token-weighted task (`CausalLMTask.step_scale`) Σ token NLL / Σ tokens of the batch, as
    transformers' Trainer forms a step's loss. `loss=False` (one process): the loss is not read back (None), so
    nothing waits for the device — a path replay, which does not use it, prepares its next batch meanwhile."""
    mine = [batch[j] for j in distributed.shard(len(batch))]  # all of the step in a single process
    scale = getattr(task, "step_scale", lambda _: None)([examples[j] for j in batch])
    for p in view.params:
        p.grad = None
    loss_sum = torch.zeros((), device=view.device)  # a rank with no example in this step adds zeros
    if mine:
        loss_sum = per_example_loss(task, model, task.collate([examples[j] for j in mine])).sum()
        (loss_sum / len(batch) if scale is None else loss_sum * scale).backward()
    if loss or distributed.is_distributed():  # under torchrun the ranks' gradients are added up here
        total = _reduce_gradients(view, loss_sum)
        data_loss = total / len(batch) if scale is None else total * scale
    else:
        data_loss = None
    grad = view.flatten([p.grad for p in view.params])
    for p in view.params:
        p.grad = None
    return grad, data_loss


def run_steps(model: torch.nn.Module, task: Task, examples: Sequence[Example], steps: Sequence[Sequence[int]],
              view: ParamView, adam: Adam, *, start: int = 0, recorder: Recorder | None = None,
              progress: bool = False, desc: str = "fine-tune", lrs: Sequence[float] | None = None) -> list[float]:
    """Adam steps `start`, …, len(steps) − 1 from the model's current θ and `adam`'s state (both updated in place),
    at learning rates `lrs` (one per step; default: Adam's own); the mean loss of each step. The one loop behind
    fine-tuning and exact rewind (`replay.rewind`), so that a rewind replays bit for bit what retraining would
    compute."""
    losses: list[float] = []
    theta = view.vector()
    bar = tqdm(total=len(steps) - start, desc=desc, disable=not progress)
    for k in range(start, len(steps)):
        grad, data_loss = step_gradient(model, task, examples, steps[k], view)
        if not math.isfinite(data_loss):
            if desc == "fine-tune":
                raise LLMEraserRuntimeError(f"fine-tuning loss became {data_loss} at step {k}; lower --lr")
            raise AdapterError(f"the {desc} loss became {data_loss} at step {k}: the recorded state it starts from "
                               f"holds values this model cannot take")
        if recorder is not None:
            recorder.step(k, grad, lambda theta=theta: (theta, adam.m, adam.v))
        theta = adam.step(theta, grad, None if lrs is None else lrs[k])
        view.set_vector(theta)
        losses.append(data_loss)
        bar.update(1)
        bar.set_postfix(loss=f"{data_loss:.4f}")
    bar.close()
    return losses


def _lbfgs(model: torch.nn.Module, task: Task, examples: Sequence[Example], args: FinetuneArguments,
           view: ParamView) -> tuple[list[float], int, None]:
    """Full-batch L-BFGS until ‖∇R‖ ≤ grad_tol or max_iters; (objective per iteration, iterations)."""
    losses: list[float] = []
    steps = 0
    opt = torch.optim.LBFGS(view.params, lr=args.lr, max_iter=20, history_size=50, tolerance_grad=0.0,
                            tolerance_change=0.0, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:  # R(θ) and ∇R(θ) in one pass over the data
        opt.zero_grad(set_to_none=True)
        total = torch.zeros((), dtype=view.dtype, device=view.device)
        for idx in distributed.batches(len(examples), args.batch_size):
            loss = per_example_loss(task, model, task.collate([examples[i] for i in idx])).sum()
            (loss / len(examples)).backward()
            total += loss.detach()
        total = torch.tensor(_reduce_gradients(view, total), dtype=view.dtype, device=view.device)
        reg = 0.5 * args.l2 * sum(p.pow(2).sum() for p in view.params)
        if args.l2:
            reg.backward()
        return total / len(examples) + reg.detach()

    for _ in tqdm(range(args.max_iters), desc="fine-tune (lbfgs)", disable=not args.progress):
        loss = float(opt.step(closure))
        steps += 1
        losses.append(loss)
        if not math.isfinite(loss):
            raise LLMEraserRuntimeError(f"fine-tuning objective became {loss}; lower --lr")
        gnorm = float(objective_gradient(model, task, examples, l2=args.l2, batch_size=args.batch_size).norm())
        if gnorm <= args.grad_tol:
            break
    return losses, steps, None


# ------------------------------------------------------------------------------------------------ the pipeline
@dataclass
class FinetunedAdapter:
    """What `finetune_adapter` made: the fine-tuned PEFT model and its task (still loaded), the result, the folder."""

    model: torch.nn.Module
    task: Task
    result: FinetuneResult
    path: str


def finetune_adapter(train: Sequence[Example], out: str | os.PathLike, *, base_model: str = "default",
                     dtype: str = "float32", device: str = "auto", lora=None, args: FinetuneArguments | None = None,
                     max_length: int = DEFAULT_MAX_LENGTH, fields=None, report: dict | None = None,
                     keep_trajectory: bool = True, step: Callable[[str, Callable], object] | None = None,
                     announce: Callable[[str], object] | None = None) -> FinetunedAdapter:
    """`llmeraser finetune` as one call: load `base_model` (in `dtype`, on `device`), wrap it in a fresh adapter
    (`lora`: `record.LoraSettings`, default LoRA; drawn with `args.seed`), fine-tune it on `train` (`finetune`, the
    `CausalLMTask` of `max_length`) and write it to `out` with its report.json and, when recorded and
    `keep_trajectory`, its trajectory (`save_finetuned`). Under torch.distributed every rank fine-tunes, rank 0 writes.

    Args:
        fields: the `data.DataFields` `train` was read with (recorded: later reads default to them).
        report: further report.json keys (the demo's cache key).
        step: `step(name, fn)` runs each stage ("load base", "fine-tune", "write adapter") and returns `fn()`: a
            hook for timings (default: `fn()`).
        announce: where the recording's plan is said before fine-tuning (default: the log); the recording is
            spooled beside `out` while fine-tuning runs.
    """
    from llmeraser.models import load_base_model
    from llmeraser.record import LoraSettings, lora_model
    from llmeraser.task import CausalLMTask

    step = step or (lambda name, fn: fn())
    args, lora = args or FinetuneArguments(), lora or LoraSettings()
    distributed.check_same({"training set": examples_hash(train)}, "checking the inputs")
    base, tokenizer = step("load base", lambda: load_base_model(base_model, dtype=dtype, device=device))
    model = lora_model(base, lora, seed=args.seed)
    task = CausalLMTask(tokenizer, max_length=max_length)
    result = step("fine-tune", lambda: finetune(model, task, train, args, record_dir=Path(out).resolve().parent,
                                                announce=announce))
    trajectory = result.trajectory if keep_trajectory else None
    path = step("write adapter", lambda: distributed.on_rank0(lambda: str(save_finetuned(
        model, out, train, lora=lora, max_length=max_length, args=args, result=result, trajectory=trajectory,
        base_model=base_model, dtype=dtype, fields=fields, report=report)), "writing the adapter"))
    return FinetunedAdapter(model=model, task=task, result=result, path=path)


def save_finetuned(model: torch.nn.Module, out: str | os.PathLike, train: Sequence[Example], *, lora,
                   max_length: int, args: FinetuneArguments | None = None, result: FinetuneResult | None = None,
                   trajectory: Trajectory | None = None, base_model: str | None = None, dtype: str | None = None,
                   fields=None, report: dict | None = None) -> Path:
    """Write a fine-tuned adapter as `llmeraser finetune` does, in one atomic write: the weights; report.json with the
    training record `unlearn` reads (`record.finetune_record`: max length, the l2 of `args`, `lora`, base model,
    dtype, the training set's hash, `fields`), the arguments and `result` when given, the adapter settings, the
    training set's hash and size, and `report`'s further keys; and the recorded `trajectory` when given."""
    from llmeraser.params import save_adapter
    from llmeraser.record import finetune_record

    sha = examples_hash(train)
    record = finetune_record(max_length=max_length, l2=(args or FinetuneArguments()).l2, lora=lora,
                             base_model=base_model, dtype=dtype, train_sha256=sha)
    if fields is not None:
        record["data_fields"] = fields.to_dict()
    body = {"kind": "finetune", "task": record, **({"arguments": asdict(args)} if args is not None else {}),
            "lora": lora.to_dict(), "train_sha256": sha, "n_train": len(train),
            **({"result": result.to_dict()} if result is not None else {}), **(report or {})}
    keep = (lambda tmp: write(trajectory, tmp)) if trajectory is not None else None
    return save_adapter(model, out, report=body, write_more=keep)
