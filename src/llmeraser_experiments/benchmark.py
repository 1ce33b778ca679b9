"""Benchmarks: the paper's three experiments, against retraining and other unlearning methods (bench/, README).

A *setting* is an experiment and a size on the MovieLens task: IR-p removes every example of p% of the training
users; QM-p corrupts p% of the queries (unseen titles in the history) and requests their correction; RC-p flips
p% of the labels and requests their correction. For each setting and seed:

1. fine-tune the original adapter on the training set as it was (corrupted for QM/RC), from a seeded LoRA init;
2. retrain from the same init with the same recipe (and the same data order, `trajectory.epoch_order`) on the
   cleaned set — the gold standard;
3. run each method from the original θ̂, choosing its hyper-parameters on the VALIDATION split by the mean KL of
   its yes/no answers to the retrained model's (never on test data);
4. measure on the test split: AUC and accuracy (utility), KL to the retrained model; on the edited examples:
   loss (old versions, and corrected versions for QM/RC) and a loss-based membership-inference AUC against test
   examples (never seen; retraining sets the target); ‖Δθ‖, cosine to θ_retrain − θ̂; seconds split into
   gradients, solve and tuning; peak memory; time / time(retrain), all in the same run.

Methods: original, retrain, `paper` (first-order + the authors' solver settings), first-order and newton × cg,
lissa, sqp (equal product budgets), gradient ascent and NPO on the edited examples, fine-tuning on the corrected
examples (QM, RC). The default run (`plan`) gives every setting the CORE methods on seed 0, the cheap setting IR-1
two more seeds, and IR-1's first seed the STUDY methods too: the full suite in about two hours on 2 cores.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import random
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from llmeraser.curvature import gradient
from llmeraser.data import Example, examples_hash
from llmeraser.eraser import EraserArguments, UnlearningProblem, factor_arguments
from llmeraser.errors import ConfigError, SolverError
from llmeraser.factors import fit_factors
from llmeraser.finetune import FinetuneArguments, finetune
from llmeraser.io import atomic_write_json, atomic_write_text
from llmeraser.metrics import binary_kl, evaluate, roc_auc
from llmeraser.params import ParamView
from llmeraser.record import DEFAULT_MAX_LENGTH, LoraSettings, lora_model
from llmeraser.request import Request, apply_request, resolve
from llmeraser.solvers.api import is_fitted, solver_arguments, solver_names
from llmeraser.task import CausalLMTask, per_example_loss
from llmeraser.trajectory import epoch_order

logger = logging.getLogger(__name__)

EXPERIMENTS = {"IR": "instance removal", "QM": "query modification", "RC": "response correction"}
SETTINGS = ("IR-1", "IR-5", "IR-10", "QM-5", "QM-10", "RC-10", "RC-40")
INFLUENCE = ("first-order/cg", "newton/cg", "first-order/lissa", "newton/lissa", "first-order/sqp", "newton/sqp")
# curvature fitted once per θ̂ (one shared pass, `factors.fit_factors`); the fit's seconds are reported apart
FITTED = ("first-order/ekfac", "first-order/kfac", "first-order/woodbury", "first-order/datainf")
PEERS = ("kronfluence/ekfac",)  # kronfluence 1.0.1's EK-FAC factors, our gradients and damping (`peers.kronfluence`)
BASELINES = ("gradient-ascent", "npo", "fine-tune-corrected")
# along the recorded fine-tune (`llmeraser.replay`): exact rewind; path replay at its defaults, with 5 secant pairs
# (secant), and within a fifth of retraining's gradients (short: exact every 16th step and the last 10%); the
# refinement of the default one-step update by Newton-CG steps on the edited objective
PATH = ("rewind", "path", "path/secant", "path/short", "refine")
PATH_VARIANTS = {"path": {}, "path/secant": {"history": 5}, "path/short": {"exact_every": 16, "exact_tail": 0.1}}
# retrain@k: retraining the same clean set from another init (seed + k) — the spread of retraining itself
METHODS = ("original", "retrain", "retrain@1", "retrain@2", "paper", *INFLUENCE, *FITTED, *PEERS, *BASELINES, *PATH)
# every setting and seed: the reference points, the paper's preset, our default, the two classic baselines
CORE = ("original", "retrain", "paper", "first-order/cg", "gradient-ascent", "fine-tune-corrected", "rewind", "path")
# the solver and baseline study, on the first seed of the study settings (newton/lissa and newton/sqp on request:
# newton's step is known to be wrong here, lissa/sqp only add their residual to it)
STUDY = ("newton/cg", "first-order/lissa", "first-order/sqp", "npo")


@dataclass
class BenchRecipe:
    """The data sizes and fine-tuning recipe of the MovieLens benchmarks (the original and every retrain): one
    home, so that every bench built on the suite (`BenchArguments`, `sharded_movielens.ShardedMovieLensArguments`)
    inherits the same defaults and none can drift from the others."""

    n_train: int = 400
    n_valid: int = 100
    n_test: int = 200
    epochs: int = 1
    lr: float = 1e-3
    batch_size: int = 8
    max_length: int = DEFAULT_MAX_LENGTH
    lora: dict = field(default_factory=lambda: LoraSettings().to_peft())


@dataclass
class BenchArguments(BenchRecipe):
    """What a benchmark run covers and how each method is configured (the data and recipe: `BenchRecipe`)."""

    base_model: str = "default"
    settings: tuple[str, ...] = SETTINGS
    seeds: tuple[int, ...] = (0,)
    methods: tuple[str, ...] = CORE
    more_seeds: dict = field(default_factory=lambda: {"IR-1": (1, 2)})  # setting → extra seeds (`methods` only)
    study_settings: tuple[str, ...] = ("IR-1",)  # these get `study_methods` too, on the first seed
    study_methods: tuple[str, ...] = STUDY
    # influence methods: one curvature sample and product budget for every solver
    curvature_samples: int = 8  # bench/tune_damping.py: 8 samples did as well as 32 on validation data
    max_iters: int = 8
    dampings: tuple[float, ...] = (3.0, 1.0, 0.3, 0.1, 0.03)  # ≤ 0.01 overshot in every setting tried
    # fitted solvers: fit on this many training examples drawn at random (0 = all): on the embedded model a fit on
    # all of them costs ~1.2 epochs (the Kronecker covariances, ~15 %, on top of a forward and backward pass)
    factor_samples: int = 300
    # baselines: `baseline_epochs` passes of Adam over the edited (or corrected) examples in mini-batches of
    # `batch_size`, the lr picked from the method's grid on validation data
    baseline_epochs: int = 2
    baseline_lrs: dict = field(default_factory=lambda: {"gradient-ascent": (3e-5, 1e-4), "npo": (3e-5, 1e-4),
                                                        "fine-tune-corrected": (1e-4, 1e-3)})
    npo_beta: float = 0.1
    refine_steps: int = 2  # refine: Newton-CG steps at most (each a pass of gradients over the training set)
    progress: bool = True

    def __post_init__(self) -> None:
        for name in (*self.settings, *self.more_seeds, *self.study_settings):
            parse_setting(name)
        unknown = sorted((set(self.methods) | set(self.study_methods)) - set(METHODS))
        if unknown:
            raise ConfigError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}")
        if "retrain" not in self.methods:
            raise ConfigError("every benchmark needs the 'retrain' method: it is the reference of every metric")
        if not self.seeds or not self.dampings or not all(self.baseline_lrs.get(m) for m in BASELINES):
            raise ConfigError(f"seeds, dampings and baseline_lrs of {', '.join(BASELINES)} must not be empty")
        if self.baseline_epochs < 1 or not self.npo_beta > 0:
            raise ConfigError("baseline_epochs must be ≥ 1 and npo_beta > 0")


def plan(args: BenchArguments) -> list[tuple[str, int, tuple[str, ...]]]:
    """The (setting, seed, methods) jobs of a run, most informative first: every setting on `seeds` with
    `methods` (plus `study_methods` on the first seed of `study_settings`), then `more_seeds`."""
    jobs = []
    for seed in args.seeds:
        for name in args.settings:
            extra = args.study_methods if seed == args.seeds[0] and name in args.study_settings else ()
            jobs.append((name, seed, tuple(dict.fromkeys((*args.methods, *extra)))))
    for name in args.settings:
        jobs += [(name, seed, args.methods) for seed in args.more_seeds.get(name, ()) if seed not in args.seeds]
    return jobs


def parse_setting(name: str) -> tuple[str, float]:
    """'IR-5' → ('IR', 0.05)."""
    kind, _, pct = name.partition("-")
    try:
        ratio = float(pct) / 100
    except ValueError:
        ratio = -1.0
    if kind not in EXPERIMENTS or not 0 < ratio <= 1:
        raise ConfigError(f"unknown setting {name!r}; expected IR-p, QM-p or RC-p with p a percentage in (0, 100]")
    return kind, ratio


@dataclass
class Setting:
    """One experiment instance: the training set as fine-tuned, the request, and what it edits."""

    name: str
    seed: int
    train: list[Example]  # as the original was fine-tuned (corrupted for QM/RC)
    request: Request

    @property
    def clean(self) -> list[Example]:
        return apply_request(self.train, self.request)

    @property
    def edited(self) -> list[Example]:
        """The old versions of the edited examples (removed, or corrupted)."""
        return [old for old, _ in resolve(self.request, self.train)]

    @property
    def corrected(self) -> list[Example]:
        """The new versions (QM/RC); empty for removals."""
        return [new for _, new in resolve(self.request, self.train) if new is not None]


def make_setting(name: str, seed: int, train: Sequence[Example]) -> Setting:
    """IR: every example of round(p · users) users drawn with `seed`; QM/RC: `corrupt` with `seed`."""
    from llmeraser_experiments.corrupt import corrupt
    from llmeraser_experiments.movielens import user_ids

    kind, ratio = parse_setting(name)
    if kind == "IR":
        by_user = user_ids(train)
        users = sorted(by_user)
        chosen = random.Random(seed).sample(users, max(1, round(ratio * len(users))))
        return Setting(name, seed, list(train), Request.remove(*[i for u in sorted(chosen) for i in by_user[u]]))
    corrupted, request = corrupt(train, kind="query" if kind == "QM" else "response", ratio=ratio, seed=seed)
    return Setting(name, seed, corrupted, request)


def theta_key(theta: torch.Tensor) -> str:
    """A memo key for a parameter vector: the sha256 of its bytes."""
    return hashlib.sha256(theta.detach().cpu().numpy().tobytes()).hexdigest()


class PeakMemory:
    """Peak resident memory above the level at entry, in MiB, sampled every 5 ms from /proc (Linux; else NaN).

    On entry freed heap memory is handed back to the OS (glibc `malloc_trim`), so that what an earlier method
    freed but the allocator kept does not hide this one's allocations."""

    def __enter__(self) -> PeakMemory:
        _trim_heap()
        self.start = self.peak = _rss_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss_mib())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mib())

    @property
    def mib(self) -> float:
        return self.peak - self.start


def _trim_heap() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the measure stays a lower bound
        pass


def _rss_mib() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20
    except (OSError, ValueError, IndexError):
        return float("nan")


class Bench:
    """One model, its task and data; fine-tunes, runs methods and measures them (see the module docstring)."""

    def __init__(self, args: BenchArguments, splits: dict, base_model=None, tokenizer=None):
        from llmeraser.models import load_base_model

        self.args, self.splits = args, splits
        if base_model is None:
            base_model, tokenizer = load_base_model(args.base_model)
        self.task = CausalLMTask(tokenizer, max_length=args.max_length)
        self.model = lora_model(base_model, LoraSettings.from_peft(args.lora), seed=0)
        self.model.eval()
        self.view = ParamView(self.model)
        self._finetuned: dict[tuple, tuple[torch.Tensor, float, float]] = {}
        self._trajectories: dict[tuple, object] = {}
        self._evaluated: dict[tuple, dict] = {}

    # ------------------------------------------------------------------------------------------- fine-tuning
    def init(self, seed: int) -> torch.Tensor:
        """The LoRA initialisation for `seed` (A random, B = 0, as peft draws it)."""
        torch.manual_seed(seed)
        for module in self.model.modules():
            if hasattr(module, "reset_lora_parameters"):
                module.reset_lora_parameters("default", True)
        return self.view.vector()

    def fit(self, train: list[Example], seed: int, *, record: bool = False) -> tuple[torch.Tensor, float, float]:
        """θ fine-tuned on `train` from `seed`'s init, the seconds and the peak MiB it took (memoised in the run);
        with `record` its trajectory is kept too (`trajectory`): the originals, for the path methods."""
        key = (examples_hash(train), seed)
        if key not in self._finetuned or (record and key not in self._trajectories):
            self.view.set_vector(self.init(seed))
            a = self.args
            with PeakMemory() as mem:
                result = finetune(self.model, self.task, train, FinetuneArguments(
                    epochs=a.epochs, lr=a.lr, batch_size=a.batch_size, seed=seed, final_check=False,
                    progress=a.progress, record=record))
            self._finetuned[key] = (self.view.vector(), result.seconds, mem.mib)
            if record:
                self._trajectories[key] = result.trajectory
        return self._finetuned[key]

    def trajectory(self, train: list[Example], seed: int):
        """The recorded trajectory of the fine-tune on `train` from `seed` (fitting it, recorded, if needed)."""
        self.fit(train, seed, record=True)
        return self._trajectories[(examples_hash(train), seed)]

    # ----------------------------------------------------------------------------------------------- scoring
    def evaluate(self, theta: torch.Tensor, examples: list[Example]) -> dict:
        """`metrics.evaluate` at θ, memoised on (θ, examples): the retrained θ is scored once per split."""
        key = (theta_key(theta), examples_hash(examples))
        if key not in self._evaluated:
            self.view.set_vector(theta)
            self._evaluated[key] = evaluate(self.model, self.task, examples)
        return self._evaluated[key]

    def valid_kl(self, theta: torch.Tensor, reference: list[float]) -> float:
        return binary_kl(reference, list(self.evaluate(theta, self.splits["valid"])["p_yes"].values()))

    def measure(self, theta: torch.Tensor, run: Run) -> dict:
        test = self.evaluate(theta, self.splits["test"])
        edited = self.evaluate(theta, run.setting.edited)
        out = {"test_auc": test["auc"], "test_acc": test["accuracy"],
               "test_kl": binary_kl(run.retrain_test_p, list(test["p_yes"].values())),
               "edited_loss": edited["loss"],
               # members (the edited examples as trained) vs never-seen test examples; low loss = member
               "mia_auc": roc_auc([-v for v in [*edited["losses"].values(), *test["losses"].values()]],
                                  [1] * edited["n"] + [0] * test["n"])}
        if run.setting.corrected:
            out["corrected_loss"] = self.evaluate(theta, run.setting.corrected)["loss"]
        delta, target = theta - run.theta, run.theta_retrain - run.theta
        out["delta_norm"] = float(delta.norm())
        out["cosine"] = float(torch.nn.functional.cosine_similarity(delta, target, dim=0)) if delta.any() \
            else float("nan")
        return out


@dataclass
class Run:
    """The state shared by the methods of one (setting, seed)."""

    setting: Setting
    theta: torch.Tensor  # the original θ̂
    theta_retrain: torch.Tensor
    retrain_seconds: float
    retrain_mib: float
    retrain_valid_p: list[float]
    retrain_test_p: list[float]
    problems: dict = field(default_factory=dict)  # variant → (problem, cg update at the chosen λ, tuning record)
    fits: dict = field(default_factory=dict)  # kind → Factors fitted at θ̂ on the training set (one shared pass)


# ----------------------------------------------------------------------------------------------------- methods
def _fits(bench: Bench, run: Run) -> dict:
    """Every fitted approximation at θ̂, from one pass over the training set (memoised in the run)."""
    if not run.fits:
        bench.view.set_vector(run.theta)
        with PeakMemory() as mem:
            fit = factor_arguments(EraserArguments(seed=run.setting.seed, batch_size=bench.args.batch_size,
                                                   progress=bench.args.progress), samples=bench.args.factor_samples)
            run.fits = fit_factors(bench.model, bench.task, run.setting.train, solver_names(fitted=True), fit)
        run.fits["peak_mib"] = mem.mib
    return run.fits


def _fitted(bench: Bench, run: Run, name: str) -> tuple[torch.Tensor, dict]:
    """A fitted solver (or the kronfluence peer): Δθ for every λ from the stored fit, λ chosen on validation KL.

    Reported apart: `fit` (the factors' own seconds; the shared pass counted in each), `grad_only` (the edited
    examples' gradients alone, timed just before the request) and `request` = gradients + solve, the per-request
    cost once factors are stored."""
    a, (variant, solver) = bench.args, name.split("/")
    if variant == "kronfluence":
        from llmeraser_experiments.peers.kronfluence import fit_kronfluence, kronfluence_solve

        if "kronfluence" not in run.fits:
            bench.view.set_vector(run.theta)
            with tempfile.TemporaryDirectory() as workdir:
                run.fits["kronfluence"] = fit_kronfluence(bench.model, bench.task, run.setting.train, workdir=workdir,
                                                          batch_size=a.batch_size, seed=run.setting.seed)
        peer = run.fits["kronfluence"]
        factors = _PeerFactors(peer, lambda b, lam, view: kronfluence_solve(peer, bench.model, b, lam))
        fit_seconds, fit_mib = peer.seconds["total"], float("nan")
        variant = "first-order"
    else:
        fits = _fits(bench, run)
        factors, fit_seconds, fit_mib = fits[solver], fits[solver].fit_seconds, fits["peak_mib"]
    bench.view.set_vector(run.theta)
    start = time.perf_counter()
    gradient(bench.model, bench.task, run.setting.edited + run.setting.corrected,
             weights=[1.0] * len(run.setting.edited) + [-1.0] * len(run.setting.corrected), batch_size=a.batch_size)
    grad_only = time.perf_counter() - start
    eraser = EraserArguments(method=variant, solver=factors.kind, seed=run.setting.seed, batch_size=a.batch_size)
    problem = UnlearningProblem(bench.model, bench.task, run.setting.train, run.setting.request, eraser,
                                factors=factors)
    start = time.perf_counter()
    path = problem.path(a.dampings)
    kls = [bench.valid_kl(run.theta + u.delta, run.retrain_valid_p) for u in path]
    best = min(range(len(path)), key=kls.__getitem__)
    tuning = time.perf_counter() - start
    seconds = path[best].report["seconds"]
    request = seconds["gradients"] + seconds["solve"]
    return run.theta + path[best].delta, {
        "gradients": seconds["gradients"], "solve": seconds["solve"], "total": request, "tuning": tuning,
        "damping": a.dampings[best], "tuning_kl": kls, "fit": fit_seconds, "fit_mib": fit_mib,
        "fit_vs_epoch": fit_seconds / run.retrain_seconds, "grad_only": grad_only,
        "request_vs_grad": request / grad_only}


class _PeerFactors:
    """A peer's fit behind the `Factors` interface the eraser uses (kind, meta, solve)."""

    kind = "ekfac"

    def __init__(self, fit, solve):
        self.fit, self._solve = fit, solve
        self.meta = {"kind": "kronfluence-ekfac", "seconds": dict(fit.seconds)}

    def solve(self, b: torch.Tensor, damping: float, view: ParamView) -> torch.Tensor:
        return self._solve(b, damping, view)


def _influence(bench: Bench, run: Run, name: str) -> tuple[torch.Tensor, dict]:
    variant, solver = name.split("/") if "/" in name else ("first-order", name)
    a = bench.args
    if is_fitted(solver) or variant == "kronfluence":
        return _fitted(bench, run, name)
    if variant not in run.problems:
        bench.view.set_vector(run.theta)
        eraser = EraserArguments(method=variant, solver="cg", curvature="ggn", curvature_samples=a.curvature_samples,
                                 seed=run.setting.seed, progress=a.progress,
                                 solver_args=solver_arguments("cg", max_iters=a.max_iters, tol=1e-3))
        problem = UnlearningProblem(bench.model, bench.task, run.setting.train, run.setting.request, eraser)
        start = time.perf_counter()
        path = problem.path(a.dampings)
        kls = [bench.valid_kl(run.theta + u.delta, run.retrain_valid_p) for u in path]
        best = min(range(len(path)), key=kls.__getitem__)
        run.problems[variant] = (problem, path[best], {"damping": a.dampings[best], "valid_kl": kls,
                                                       "tuning_seconds": time.perf_counter() - start})
    problem, cg_update, tuned = run.problems[variant]
    lam = tuned["damping"]
    if solver == "cg":
        update = cg_update
    else:
        overrides = {} if solver == "paper" else _equal_budget(solver, a, cg_update.solve.ritz[1] + lam, problem.rhs)
        bench.view.set_vector(run.theta)
        update = problem.solve(solver, lam, solver_arguments(solver, **overrides))
    seconds = update.report["seconds"]
    return run.theta + update.delta, {"gradients": seconds["gradients"], "solve": seconds["solve"],
                                      "total": seconds["total"], "tuning": tuned["tuning_seconds"],
                                      "damping": lam, "tuning_kl": tuned["valid_kl"],
                                      "residual": update.solve.residual}


def _equal_budget(solver: str, a: BenchArguments, top: float, rhs: torch.Tensor) -> dict:
    """lissa/sqp options for the budget of cg: as many operator products as cg's max_iters, in mini-batches of a
    quarter of the sample, one residual check at the end (a full product). The step size comes from `top`, the
    largest Ritz value of cg's Lanczos run plus λ (shared, free), instead of 20 power-iteration products."""
    from llmeraser.solvers.sqp import default_lr

    steps = 4 * a.max_iters
    step = {"scale": 1.1 * top} if solver == "lissa" else {"lr": default_lr("sgd", top, rhs)}
    return {"max_iters": steps, "check_every": steps, "batch_size": max(1, a.curvature_samples // 4), **step}


Objective = Callable[[torch.Tensor, list[Example]], torch.Tensor]


def _descend(bench: Bench, theta: torch.Tensor, examples: list[Example], objective: Objective, lr: float,
             seed: int) -> tuple[torch.Tensor, float]:
    """Adam from θ on mean objective(ℓ(batch), batch): `baseline_epochs` passes over `examples` in mini-batches of
    `batch_size`, in the seeded id-hash order of fine-tuning; returns θ and the seconds."""
    start = time.perf_counter()
    a = bench.args
    bench.view.set_vector(theta)
    opt = torch.optim.Adam(bench.view.params, lr=lr)
    for epoch in range(a.baseline_epochs):
        order = [examples[i] for i in epoch_order(examples, seed, epoch)]
        for i in range(0, len(order), a.batch_size):
            chunk = order[i:i + a.batch_size]
            opt.zero_grad(set_to_none=True)
            objective(per_example_loss(bench.task, bench.model, bench.task.collate(chunk)), chunk).mean().backward()
            opt.step()
    opt.zero_grad(set_to_none=True)
    return bench.view.vector(), time.perf_counter() - start


def _objective(bench: Bench, run: Run, name: str) -> tuple[list[Example], Objective]:
    """The examples and per-example objective of a baseline.

    gradient-ascent: −ℓ on the edited examples. fine-tune-corrected: ℓ on the corrected ones. npo (Zhang et al.
    2024, negative preference optimisation): (2/β) softplus(β (ℓ_ref − ℓ)) on the edited examples, with
    log π = −ℓ (the mean token log-likelihood of the response) and ℓ_ref the loss at θ̂: its gradient at θ̂ is
    gradient ascent's, and it fades as an example's loss rises above its reference.
    """
    if name == "fine-tune-corrected":
        return run.setting.corrected, lambda loss, chunk: loss
    if name == "gradient-ascent":
        return run.setting.edited, lambda loss, chunk: -loss
    ref, beta = bench.evaluate(run.theta, run.setting.edited)["losses"], bench.args.npo_beta

    def npo(loss: torch.Tensor, chunk: list[Example]) -> torch.Tensor:
        reference = torch.tensor([ref[e.id] for e in chunk], dtype=loss.dtype)
        return 2 / beta * F.softplus(beta * (reference - loss))

    return run.setting.edited, npo


def _baseline(bench: Bench, run: Run, name: str) -> tuple[torch.Tensor, dict]:
    lrs = bench.args.baseline_lrs[name]
    start = time.perf_counter()
    examples, objective = _objective(bench, run, name)
    candidates = [_descend(bench, run.theta, examples, objective, lr, run.setting.seed) for lr in lrs]
    kls = [bench.valid_kl(theta, run.retrain_valid_p) for theta, _ in candidates]
    best = min(range(len(kls)), key=kls.__getitem__)
    theta, seconds = candidates[best]  # its own run's time; the grid's total is the tuning time
    return theta, {"gradients": seconds, "solve": 0.0, "total": seconds, "tuning": time.perf_counter() - start,
                   "lr": lrs[best], "tuning_kl": kls}


def path_method(bench: Bench, theta: torch.Tensor, setting: Setting, name: str) -> tuple[torch.Tensor, dict]:
    """A method of PATH from θ̂ = `theta`, the original fine-tuned (and recorded: `Bench.trajectory`) on
    `setting.train`; shared by both benchmarks, dispatched through the update registry (`llmeraser.updates`).
    refine starts from the default one-step update (first-order, cg at the relative damping). Returns the new θ and
    what the report says of the run."""
    from llmeraser.replay import PathArguments, RefineArguments
    from llmeraser.updates import RequestContext, UnlearnOptions, get_method

    a = bench.args
    trajectory = bench.trajectory(setting.train, setting.seed)
    bench.view.set_vector(theta)
    ctx = RequestContext.build(bench.model, bench.task, setting.train, setting.request,
                               recording=lambda: (trajectory, ""))
    eraser = EraserArguments(method="first-order", solver="cg", curvature_samples=a.curvature_samples,
                             seed=setting.seed, batch_size=a.batch_size,
                             solver_args=solver_arguments("cg", max_iters=a.max_iters, tol=1e-3))
    options = UnlearnOptions(method=name.split("/")[0], eraser=eraser,
                             path=PathArguments(**PATH_VARIANTS.get(name, {})),
                             refine=RefineArguments(steps=a.refine_steps))
    update = get_method(options.method).run(ctx, options)
    r = update.report[name.split("/")[0]]
    info = {"total": update.report["seconds"]["total"]}
    if name == "rewind":
        info["replayed_fraction"] = r["replayed_fraction"]
    elif name == "refine":
        info |= {"residual": r["relative_residual"], "residual_at_original": r["residual_at_original"],
                 "residual_at_start": r["residual_at_start"], "residual_final": r["residual_final"]}
    else:
        info |= {"exact_steps": r["exact_steps"], "predicted_steps": r["predicted_steps"],
                 "gradient_cost": r["gradient_cost_vs_retraining"], "prediction_error": r["prediction_error"]["mean"]}
    return update.theta, info


def run_method(bench: Bench, run: Run, name: str) -> dict | None:
    """Run `name` on `run` and measure it; None when it does not apply (fine-tune-corrected on removals)."""
    if name == "fine-tune-corrected" and not run.setting.corrected:
        return None
    try:
        with PeakMemory() as mem:
            theta, info = _run(bench, run, name)
    except SolverError as e:  # a diverged solver is a result, not a crash
        logger.warning("%s seed %d %s failed: %s", run.setting.name, run.setting.seed, name, e)
        return {"setting": run.setting.name, "seed": run.setting.seed, "method": name, "failed": str(e)}
    row = {"setting": run.setting.name, "seed": run.setting.seed, "method": name, **info,
           "peak_mib": mem.mib if name != "retrain" else run.retrain_mib,
           "time_ratio": info["total"] / run.retrain_seconds, **bench.measure(theta, run)}
    logger.info("%s seed %d %s: %s", run.setting.name, run.setting.seed, name,
                {k: v for k, v in row.items() if isinstance(v, float)})
    return row


def _run(bench: Bench, run: Run, name: str) -> tuple[torch.Tensor, dict]:
    if name == "original":
        return run.theta, {"total": 0.0}
    if name == "retrain":
        return run.theta_retrain, {"gradients": run.retrain_seconds, "solve": 0.0, "total": run.retrain_seconds}
    if name.startswith("retrain@"):
        theta, seconds, _ = bench.fit(run.setting.clean, run.setting.seed + int(name[len("retrain@"):]))
        return theta, {"gradients": seconds, "solve": 0.0, "total": seconds}
    if name in BASELINES:
        return _baseline(bench, run, name)
    if name in PATH:
        return path_method(bench, run.theta, run.setting, name)
    return _influence(bench, run, name)


def run_benchmark(args: BenchArguments, out: str | Path, *, base_model=None, tokenizer=None,
                  splits: dict | None = None) -> dict:
    """Run every setting × seed × method; write results.json, tables.md and plots (PNG) under `out`."""
    from llmeraser.io import check_new_output
    from llmeraser_experiments.movielens import build_splits

    out = Path(out)
    check_new_output(out)
    splits = splits or build_splits(n_train=args.n_train, n_valid=args.n_valid, n_test=args.n_test, seed=0)
    bench = Bench(args, splits, base_model, tokenizer)
    rows: list[dict] = []
    started = time.perf_counter()
    jobs = plan(args)
    commit = git_commit()  # the code this run imported (HEAD may move while it runs)
    result: dict = {}
    for i, (name, seed, methods) in enumerate(tqdm(jobs, desc="settings", disable=not args.progress)):
        setting = make_setting(name, seed, splits["train"])
        theta, _, _ = bench.fit(setting.train, seed, record=bool(set(methods) & set(PATH)))
        theta_retrain, retrain_seconds, retrain_mib = bench.fit(setting.clean, seed)
        run = Run(setting, theta, theta_retrain, retrain_seconds, retrain_mib,
                  list(bench.evaluate(theta_retrain, splits["valid"])["p_yes"].values()),
                  list(bench.evaluate(theta_retrain, splits["test"])["p_yes"].values()))
        for method in methods:
            row = run_method(bench, run, method)
            if row is not None:
                rows.append(row)
        # written after every job, so a long run that stops keeps what it finished ("complete" says which)
        result = {"commit": commit, "arguments": dataclasses.asdict(args), "rows": rows,
                  "complete": i + 1 == len(jobs), "jobs": [list(j[:2]) for j in jobs[:i + 1]],
                  "seconds": time.perf_counter() - started,
                  "sizes": {k: len(v) for k, v in splits.items()}, "n_params": bench.view.dim}
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "results.json", result)
        atomic_write_text(out / "tables.md", tables(rows))
    plot(rows, out)
    return result


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ------------------------------------------------------------------------------------------------------ report
COLUMNS = [("test_auc", "test AUC", ".4f"), ("test_acc", "test acc", ".3f"), ("test_kl", "KL→retrain", ".4f"),
           ("edited_loss", "edited loss", ".3f"), ("corrected_loss", "corrected loss", ".3f"),
           ("mia_auc", "MIA AUC", ".3f"), ("delta_norm", "‖Δθ‖", ".3f"), ("cosine", "cos→retrain", ".3f"),
           ("damping", "λ", ".2g"), ("residual", "residual", ".1e"), ("gradient_cost", "exact grads", ".2f"),
           ("total", "seconds", ".1f"), ("time_ratio", "time/retrain", ".3f"), ("tuning", "tuning s", ".0f"),
           ("request_vs_grad", "request/grads", ".2f"), ("fit", "fit s", ".0f"), ("fit_vs_epoch", "fit/epoch", ".2f"),
           ("peak_mib", "peak MiB", ".0f")]


def _cell(values: list[float], spec: str) -> str:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return "—"
    if len(values) == 1:
        return format(values[0], spec)
    return f"{format(statistics.mean(values), spec)} ± {format(statistics.stdev(values), spec)}"


def tables(rows: list[dict]) -> str:
    """Markdown: one table per setting, methods as rows, mean ± std over seeds (failed runs counted apart)."""
    parts = []
    for setting in dict.fromkeys(r["setting"] for r in rows):
        sub = [r for r in rows if r["setting"] == setting]
        seeds = sorted({r["seed"] for r in sub})
        columns = [c for c in COLUMNS if any(c[0] in r for r in sub)]
        kind, ratio = parse_setting(setting)
        lines = [f"### {setting}: {EXPERIMENTS[kind]}, {ratio:.0%} ({len(seeds)} seed{'s' * (len(seeds) > 1)})", "",
                 "| method | " + " | ".join(h for _, h, _ in columns) + " |",
                 "|---|" + "---:|" * len(columns)]
        for method in dict.fromkeys(r["method"] for r in sub):
            mine = [r for r in sub if r["method"] == method]
            failed = sum("failed" in r for r in mine)
            label = f"{method} (failed {failed}/{len(mine)})" if failed else method
            lines.append(f"| {label} | " + " | ".join(_cell([r.get(k) for r in mine if "failed" not in r], f)
                                                      for k, _, f in columns) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def plot(rows: list[dict], out: Path) -> list[Path]:
    """utility_vs_time.png (test AUC against seconds, per method) and mia.png (MIA AUC per method), per setting.
    Skipped, with a log line, when matplotlib is not installed (`pip install -e '.[bench]'`)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plots (pip install -e '.[bench]')")
        return []
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    paths = []
    fig, axes = plt.subplots(1, len(settings), figsize=(4.5 * len(settings), 4), squeeze=False)
    ok = [r for r in rows if "failed" not in r]
    for ax, setting in zip(axes[0], settings, strict=True):
        for m in methods:
            pts = [(max(r["total"], 1e-2), r["test_auc"]) for r in ok if r["setting"] == setting
                   and r["method"] == m and r.get("test_auc") is not None]
            if pts:
                ax.scatter(*zip(*pts, strict=True), label=m, s=25)
        ax.set_xscale("log")
        ax.set(title=setting, xlabel="seconds (log)", ylabel="test AUC")
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    paths.append(out / "utility_vs_time.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    fig, axes = plt.subplots(1, len(settings), figsize=(4.5 * len(settings), 4), squeeze=False)
    for ax, setting in zip(axes[0], settings, strict=True):
        names = [m for m in methods if any(r["setting"] == setting and r["method"] == m for r in ok)]
        values = [statistics.mean(r["mia_auc"] for r in ok if r["setting"] == setting and r["method"] == m)
                  for m in names]
        ax.barh(names, values)
        retrain = [r["mia_auc"] for r in ok if r["setting"] == setting and r["method"] == "retrain"]
        if retrain:
            ax.axvline(statistics.mean(retrain), color="k", ls="--", lw=1, label="retrain (target)")
            ax.legend(fontsize=7)
        ax.set(title=setting, xlabel="membership-inference AUC (edited vs unseen)")
    fig.tight_layout()
    paths.append(out / "mia.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths
