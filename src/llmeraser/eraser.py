"""The eraser: request → edits → right-hand side → solver → Δθ → new adapter.

Two variants (docs/math.md#first-order-and-newton), with N training examples and a request of edits zᵢ → zᵢ′
(zᵢ′ = ∅ for a removal):

- `first-order` (the paper): Δθ = (H + λI)⁻¹ b, b = (1/N) Σ_edits [∇ℓ(zᵢ; θ̂) − ∇ℓ(zᵢ′; θ̂)], H = ∇²R(θ̂) over the
  original training set. One Newton step on R′ = R + (1/N) Σ [ℓ(z′) − ℓ(z)], assuming ∇R(θ̂) = 0 and ∇²R′ ≈ H.
- `newton`: one Newton step on the edited objective itself, R′(θ) = (1/N′) Σ_{z ∈ D′} ℓ(z; θ) + (l2/2)‖θ‖² over the
  effective set D′ (N′ = N − removals): Δθ = −(H′ + λI)⁻¹ ∇R′(θ̂), H′ = ∇²R′(θ̂). Exact for quadratic losses (it
  reproduces leave-k-out retraining of ridge regression), and it does not assume θ̂ was exactly stationary.

H is the Gauss-Newton matrix (`ggn`, PSD, default) or the exact Hessian (`hessian`). λ is explicit damping, given
absolutely or, by default, relative to the curvature's own scale: λ = ρ · θ_max, θ_max the largest eigenvalue of
the curvature as the solver sees it (docs/math.md#damping), so that one default means the same on any model.

References: Ding et al., Unified Parameter-Efficient Unlearning for LLMs (LLMEraser), ICLR 2025, arXiv 2412.00383.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmeraser import distributed
from llmeraser.curvature import CURVATURES, CurvatureOperator, gradient, objective_gradient
from llmeraser.data import Example, examples_hash
from llmeraser.errors import ConfigError, RequestError, SolverError
from llmeraser.factors import FISHERS, FactorArguments, Factors, fit_factors
from llmeraser.params import ParamView, adapter_hash, save_adapter
from llmeraser.recording import write
from llmeraser.request import Request, apply_request, resolve
from llmeraser.solvers.api import get_solver, is_fitted, solver_arguments, solver_names
from llmeraser.solvers.base import SolverArguments, SolveResult, zero_result
from llmeraser.solvers.choose import choose_solver, example_tokens  # noqa: F401 (the eraser's auto; re-exported)
from llmeraser.task import Task

logger = logging.getLogger(__name__)

ONE_STEP = ("first-order", "newton")  # the one-step influence updates this module computes (every update method,
# these and the ones along the path, is registered in `llmeraser.updates`)
# λ = ρ · θ_max by default. On the embedded model's demo request the validation sweep was best at λ = 0.3 (0.1–1
# helped, 0.03 and below overshot) where θ_max = 15.2 (cg, 8 curvature samples; woodbury's fitted Fisher: 14.9), so
# ρ = 0.02 (docs/math.md#damping; bench/default_options.py checks the default on that request).
RELATIVE_DAMPING = 0.02
SCALE_PRODUCTS = 10  # Lanczos products that estimate θ_max for an iterative solver other than cg (cg's run gives it)


@dataclass
class EraserArguments:
    """How an unlearning request is turned into Δθ."""

    method: str = field(default="first-order", metadata={
        "help": "the one-step update: first-order (the paper) or newton (the update methods, these and the others, "
                "are `llmeraser.updates`' and `UnlearnOptions.method`)"})
    solver: str = field(default="auto", metadata={
        "help": "inverse-HVP solver. Iterative, on curvature products over the training set: dense, cg, lissa, sqp, "
                "paper. Fitted once per adapter and reused (each request then costs about its own gradients): "
                "kfac, ekfac, woodbury, datainf (see 'llmeraser fit-curvature'). auto: dense for tiny problems, "
                "woodbury or ekfac (by memory) when every trainable parameter is in a linear layer, else cg (the "
                "report says which and why)"})
    curvature: str = field(default="ggn", metadata={"help": "ggn (Gauss-Newton, PSD) or hessian (exact)"})
    damping: float | None = field(default=None, metadata={
        "help": "λ in (H + λI)⁻¹, absolute; larger is safer but shrinks Δθ. None: relative_damping × the "
                "curvature's largest eigenvalue"})
    relative_damping: float = field(default=RELATIVE_DAMPING, metadata={
        "help": "when no absolute damping is given, λ = this × the largest eigenvalue of the curvature as the "
                "solver sees it (cg: its own Lanczos run; fitted: the factors'), so it means the same on any model"})
    l2: float = field(default=0.0, metadata={"help": "the L2 coefficient the adapter was fine-tuned with"})
    batch_size: int = field(default=8, metadata={"help": "examples per gradient / curvature pass"})
    curvature_samples: int = field(default=0, metadata={
        "help": "estimate H on this many training examples drawn at random (seeded); 0 = all of them"})
    seed: int = field(default=0, metadata={"help": "seed of the curvature sample (and of fitted factors' targets)"})
    fisher: str = field(default="mc", metadata={
        "help": "fitted solvers: mc (targets sampled from the model: the Gauss-Newton matrix in expectation) or "
                "empirical (the training targets)"})
    solver_args: SolverArguments | None = field(default=None, metadata={"help": "None = the solver's preset"})
    progress: bool = field(default=False, metadata={"help": "show progress bars"})

    def __post_init__(self) -> None:
        if self.method not in ONE_STEP:
            raise ConfigError(f"unknown method {self.method!r} for EraserArguments, which computes the one-step "
                              f"updates {', '.join(ONE_STEP)}; other update methods: UnlearnOptions(method=...)")
        if self.curvature not in CURVATURES:
            raise ConfigError(f"unknown curvature {self.curvature!r}; expected one of {', '.join(CURVATURES)}")
        if (self.solver == "auto" or get_solver(self.solver).fitted) and self.curvature != "ggn":
            raise ConfigError(f"solver {self.solver!r} approximates the Gauss-Newton matrix; use --curvature ggn")
        if self.fisher not in FISHERS:
            raise ConfigError(f"unknown fisher {self.fisher!r}; expected one of {', '.join(FISHERS)}")
        for name in ("damping", "l2", "relative_damping"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v >= 0):
                raise ConfigError(f"{name} must be a finite number ≥ 0, got {v}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be ≥ 1, got {self.batch_size}")
        if self.curvature_samples < 0:
            raise ConfigError(f"curvature_samples must be ≥ 0 (0 = all), got {self.curvature_samples}")
        if self.solver_args is None and self.solver != "auto":
            self.solver_args = solver_arguments(self.solver)  # None for a fitted solver
        if self.curvature == "hessian" and self.damping == 0:
            # LoRA's exact Hessian is singular at θ̂ (rotating a pair (A, B) → (QA, BQᵀ) changes neither the loss nor
            # ‖θ‖²), so an undamped solve is ill-posed; the Gauss-Newton matrix plus l2 is PSD.
            logger.warning("curvature 'hessian' with damping 0: the exact Hessian of a LoRA model is singular; "
                           "use --damping > 0 or --curvature ggn")


@dataclass
class Update:
    """Δθ for a request, and the record of how it was computed."""

    delta: torch.Tensor  # (p,)
    request: Request
    solve: SolveResult
    report: dict
    theta: torch.Tensor | None = None  # the new θ itself, when known exactly (path updates): set, not θ̂ + Δθ
    factors: object = None  # the fitted factors a fitted solver used (the job hands them on to the new adapter)
    trajectory: object = None  # an exact recording of the new θ's fine-tune (rewind), saved beside it


def check_reach(model: torch.nn.Module, g: torch.Tensor, source: str) -> None:
    """Refuse a gradient that is exactly zero on a whole trainable tensor: that tensor is cut off from the loss
    (gradient checkpointing without input gradients, a frozen path, an untrained LoRA pair whose B is still zero),
    and an update computed without it would silently leave it as it was."""
    view = ParamView(model)
    dead = [n for n, t in zip(view.names, view.unflatten(g.to(view.dtype)), strict=True) if not t.any()]
    if dead:
        more = f" and {len(dead) - 3} more" if len(dead) > 3 else ""
        raise ConfigError(f"{len(dead)} of {len(view.names)} trainable tensors receive no gradient from {source}: "
                          f"{', '.join(dead[:3])}{more}. Is gradient checkpointing on without input gradients, a path "
                          f"frozen, or a LoRA pair untrained (B still zero)? The update would leave them unchanged")


def factor_arguments(args: EraserArguments, *, samples: int | None = None) -> FactorArguments:
    """The fit a fitted solver of `args` uses: its Fisher, seed, batch size and sample (curvature_samples)."""
    return FactorArguments(fisher=args.fisher, samples=args.curvature_samples if samples is None else samples,
                           batch_size=args.batch_size, seed=args.seed, progress=args.progress)


def fit_for_solver(model: torch.nn.Module, task: Task, train: Sequence[Example], args: EraserArguments) -> Factors:
    """The factors fitted solver `args.solver` needs for this θ̂ and `train`, fitted now (one pass). The one place a
    fit happens on demand; `llmeraser.job` stores and reuses what it returns."""
    if not is_fitted(args.solver):
        raise ConfigError(f"solver {args.solver!r} is not fitted; fitted solvers: "
                          f"{', '.join(solver_names(fitted=True))}")
    return fit_factors(model, task, train, (args.solver,), factor_arguments(args))[args.solver]


def compute_update(model: torch.nn.Module, task: Task, train: Sequence[Example], request: Request,
                   args: EraserArguments | None = None, factors: Factors | None = None) -> Update:
    """Δθ that makes the model at θ̂ behave as if trained on `apply_request(train, request)`. θ is not changed.

    `factors`: a fit of the solver's kind for this θ̂ and `train` (`factors.fit_factors` or a `FactorStore`); a
    fitted solver without them fits them first (and reports the time apart).

    Raises:
        RequestError: the request does not fit `train` (unknown id, ...).
        SolverError: the solve diverged or produced non-finite values.
    """
    args = args or EraserArguments()
    return UnlearningProblem(model, task, train, request, args, factors).solve()


def damping_path(model: torch.nn.Module, task: Task, train: Sequence[Example], request: Request,
                 args: EraserArguments, dampings: Sequence[float]) -> list[Update]:
    """`compute_update` for each damping λ in `dampings` (args.damping is ignored), at the cost of one solve.

    With cg the curvature products are shared: one Lanczos run gives CG's solution for every λ (`solvers.krylov`);
    a fitted solver (kfac, ekfac, woodbury, datainf) solves each λ from the same factors. This is what makes
    choosing λ on validation data affordable.
    """
    return UnlearningProblem(model, task, train, request, args).path(dampings)


class UnlearningProblem:
    """The linear system of a request — right-hand side, curvature operator, sign of Δθ — built once (the gradients
    are paid here) and solved by any solver and damping (`solve`) or for many dampings at once (`path`).
    θ is not changed.

    `factors` (with `fit_seconds`, the time their fit took, when it was made for this request): the fit of a fitted
    solver; without them one is fitted here (`fit_for_solver`). `report`: entries the caller adds to every update's
    report (the adapter's training record, how the damping was chosen), so the report is built once, complete.
    `resolved`: (the request's resolved edits, the edited set) when the caller resolved them already
    (`updates.RequestContext`)."""

    def __init__(self, model: torch.nn.Module, task: Task, train: Sequence[Example], request: Request,
                 args: EraserArguments, factors: Factors | None = None, *, fit_seconds: float = 0.0,
                 report: dict | None = None, resolved: tuple[list, list[Example]] | None = None):
        self.start = time.perf_counter()
        self.model, self.task, self.train, self.request = model, task, train, request
        self.extra = dict(report or {})
        self.choice = None
        if args.solver == "auto":
            solver, self.choice = choose_solver(model, len(train), tokens=example_tokens(task, train))
            logger.info("%s", self.choice)
            args = dataclasses.replace(args, solver=solver, solver_args=None)
        self.args = args
        pairs, effective = resolved or (resolve(request, train), apply_request(train, request))
        if not effective:
            raise RequestError("the request removes every training example; there is nothing left to fit")
        model.eval()  # no dropout: every gradient sees the same function the curvature does
        if args.method == "first-order":
            old = [o for o, _ in pairs]
            new = [e for _, e in pairs if e is not None]
            g = gradient(model, task, old + new, weights=[1.0] * len(old) + [-1.0] * len(new),
                         batch_size=args.batch_size, progress=args.progress, desc="edit gradients")
            self.rhs, self.sign, curvature_set = g / len(train), 1.0, list(train)
        else:
            curvature_set = effective
            self.rhs = objective_gradient(model, task, curvature_set, l2=args.l2, batch_size=args.batch_size,
                                          progress=args.progress)
            self.sign = -1.0
        check_reach(model, self.rhs, "the edited examples" if args.method == "first-order" else "the objective")
        self.t_grad = time.perf_counter() - self.start
        self.factors, self.t_fit = factors, fit_seconds
        if is_fitted(args.solver):
            if factors is not None and factors.kind != args.solver:
                raise ConfigError(f"solver {args.solver!r} was given {factors.kind} factors")
            if factors is None:  # on the whole set: the fit draws its own curvature sample, seeded alike
                start = time.perf_counter()
                self.factors = fit_for_solver(model, task, curvature_set, args)
                self.t_fit = time.perf_counter() - start
        if 0 < args.curvature_samples < len(curvature_set):
            # H is a mean of per-example curvatures: a uniform sample gives an unbiased estimate at a fraction of the
            # cost (the same draw as `fit_factors`' sample).
            gen = torch.Generator().manual_seed(args.seed)
            # host: which examples to sample (indices, the same on every device)
            keep = sorted(torch.randperm(len(curvature_set), generator=gen)[: args.curvature_samples].tolist())
            curvature_set = [curvature_set[i] for i in keep]
        self.curvature_set = curvature_set
        self.curvature_examples = len(curvature_set)

    @functools.cached_property
    def op(self) -> CurvatureOperator:
        """The curvature operator over the curvature set (built on first use: fitted solvers never need it)."""
        a = self.args
        return CurvatureOperator(self.model, self.task, self.curvature_set, kind=a.curvature, l2=a.l2,
                                 batch_size=a.batch_size, progress=a.progress)

    def _fitted(self, damping: float | None) -> tuple[SolveResult, dict | None]:
        """(the fitted factors' solution of (F + (λ + l2) I) x = b, the damping rule if relative): direct, so no
        residual is measured. λ = None: relative to the factors' largest eigenvalue."""
        start = time.perf_counter()
        rule = None
        if damping is None:
            scale = self.factors.top_eigenvalue()
            damping = self.args.relative_damping * scale
            rule = self._rule(scale, f"the {self.factors.kind} factors' largest eigenvalue")
        x = self.factors.solve(self.rhs, damping + self.args.l2, ParamView(self.model))
        return SolveResult(x=x, solver=self.factors.kind, residual=float("nan"), converged=True, iterations=0,
                           hvps=0.0, seconds=time.perf_counter() - start, history=[], damping=damping), rule

    def _relative(self, solver: str, solver_args: SolverArguments) -> SolveResult:
        """An iterative solve at λ = ρ · θ_max. cg: one Lanczos run estimates θ_max and solves at once (no extra
        product) when its basis fits in memory; otherwise, and for the other solvers, SCALE_PRODUCTS Lanczos
        products estimate it first (counted in the result)."""
        from llmeraser.resources import available_bytes
        from llmeraser.solvers.krylov import shifted_solve

        rho = self.args.relative_damping
        # the one-run way keeps the Lanczos basis and its products (2 · max_iters vectors of p): only while they fit
        # in a quarter of the free memory; else 10 products estimate θ_max and plain CG (O(p) memory) solves
        basis = 2 * solver_args.max_iters * self.rhs.numel() * self.rhs.element_size()
        free = available_bytes()
        if solver == "cg" and (free is None or basis <= free / 4):
            return shifted_solve(self.op, self.rhs, [rho], solver_args, relative=True)[0]
        probe = shifted_solve(self.op, self.rhs, [rho], solver_arguments("cg", tol=0.0, max_iters=SCALE_PRODUCTS),
                              relative=True)[0]
        result = get_solver(solver)(self.op, self.rhs, probe.damping, solver_args)
        return dataclasses.replace(result, damping=probe.damping, ritz=probe.ritz, hvps=result.hvps + probe.hvps,
                                   seconds=result.seconds + probe.seconds)

    def solve(self, solver: str | None = None, damping: float | None = None,
              solver_args: SolverArguments | None = None) -> Update:
        """Δθ with `solver` and `damping` (default: the arguments'; None there too: relative to the curvature's
        scale); the seconds count the gradients too."""
        solver = solver or self.args.solver
        damping = self.args.damping if damping is None else damping
        if is_fitted(solver):
            if self.factors is None or self.factors.kind != solver:
                raise ConfigError(f"solver {solver!r} needs {solver} factors; this problem has "
                                  f"{self.factors.kind if self.factors else 'none'}")
            result, rule = self._fitted(damping)
            return self.update(result, solver, None, damping_rule=rule)
        if solver_args is None:
            solver_args = self.args.solver_args if solver == self.args.solver else solver_arguments(solver)
        if damping is None:
            result = self._relative(solver, solver_args)
            rule = self._rule(result.ritz[1], "the largest Ritz value of a Lanczos run from the right-hand side")
            return self.update(result, solver, solver_args, damping_rule=rule)
        result = get_solver(solver)(self.op, self.rhs, damping, solver_args)
        return self.update(dataclasses.replace(result, damping=damping), solver, solver_args)

    def path(self, dampings: Sequence[float]) -> list[Update]:
        """Δθ for every (absolute) damping: from one Lanczos run (CG's solution for each; `solvers.krylov`), or
        from the fitted factors."""
        from llmeraser.solvers.krylov import shifted_solve

        if not get_solver(self.args.solver).path:
            raise ConfigError(f"a damping path needs solver 'cg' (one Krylov space serves every damping) or a fitted "
                              f"solver ({', '.join(solver_names(fitted=True))}), got {self.args.solver!r}")
        if is_fitted(self.args.solver):
            return [self.solve(damping=lam) for lam in dampings]
        results = shifted_solve(self.op, self.rhs, list(dampings), self.args.solver_args)
        return [self.update(r, "cg", self.args.solver_args) for r in results]

    def update(self, result: SolveResult, solver: str, solver_args: SolverArguments | None, *,
               damping_rule: dict | None = None) -> Update:
        args, request, damping = self.args, self.request, result.damping
        # every rank solved the same system; rank 0's Δθ is the one every rank applies (bitwise identical)
        delta = distributed.broadcast(self.sign * result.x, "Δθ")
        if not torch.isfinite(delta).all():
            raise SolverError(f"solver {solver!r} returned non-finite Δθ; increase --damping")
        if not result.converged and solver_args is not None:
            logger.warning("solver %s stopped at relative residual %.3g (tol %.1g) after %d iterations (λ=%g)",
                           solver, result.residual, solver_args.tol, result.iterations, damping)
        view = ParamView(self.model)
        report = {
            "request_sha256": request.hash,
            "ops": request.counts(),
            "method": args.method,
            "solver": solver,
            "solver_args": vars(solver_args).copy() if solver_args is not None else {},
            "curvature": args.curvature,
            "damping": damping,
            "damping_rule": damping_rule or {"rule": "absolute"},
            "l2": args.l2,
            "curvature_examples": self.curvature_examples,
            "n_train": len(self.train),
            "n_effective": len(self.train) - request.counts()["remove"],
            "n_params": view.dim,
            "train_sha256": examples_hash(self.train),
            "solve": result.diagnostics(),
            "converged": result.converged,
            "delta_norm": float(delta.norm()),
            "theta_norm": float(view.vector().norm()),
            "rhs_norm": float(self.rhs.norm()),
            "seconds": {"gradients": self.t_grad, "solve": result.seconds,
                        "total": self.t_grad + result.seconds + self.t_fit},
        }
        if self.choice:
            report["solver_choice"] = self.choice
        if is_fitted(solver):
            report["seconds"]["fit"] = self.t_fit  # 0 when the factors were fitted earlier and stored
            m = self.factors.meta
            report["factors"] = {k: m.get(k) for k in ("kind", "fisher", "seed", "n_examples", "n_tokens", "seconds",
                                                       "adapter_sha256", "train_sha256", "edited_since_fit",
                                                       "derived_from") if k in m}
            report["factors"]["source"] = m.get("source", "fitted for this request" if self.t_fit else "given")
        report |= self.extra
        logger.info("Δθ: ‖Δθ‖ = %.4g, residual %.3g, %.1f s", report["delta_norm"], result.residual,
                    report["seconds"]["total"])
        return Update(delta=delta, request=request, solve=result, report=report)

    def _rule(self, scale: float, source: str) -> dict:
        """The report's record of a relative damping λ = ρ · scale."""
        return {"rule": "relative", "relative_damping": self.args.relative_damping, "scale": scale,
                "scale_from": source}


def declined_update(model: torch.nn.Module, train: Sequence[Example], request: Request, reason: str,
                    report: dict | None = None) -> Update:
    """Δθ = 0 on purpose: the evidence (validation) says no update beats none. The report says so and why."""
    resolve(request, train)
    view = ParamView(model)
    theta = view.vector()
    result = zero_result("declined", theta)
    full = {"request_sha256": request.hash, "ops": request.counts(), "method": "none", "solver": "declined",
            "decision": "declined", "reason": reason, "damping": None, "n_train": len(train),
            "n_effective": len(train) - request.counts()["remove"], "n_params": view.dim,
            "train_sha256": examples_hash(train), "solve": result.diagnostics(), "converged": True,
            "delta_norm": 0.0, "theta_norm": float(theta.norm()), "seconds": {"total": 0.0}}
    return Update(delta=result.x, request=request, solve=result, report=full | dict(report or {}))


def unlearn(model: torch.nn.Module, task: Task, train: Sequence[Example], request: Request,
            args: EraserArguments | None = None, factors: Factors | None = None) -> Update:
    """Compute Δθ for `request` and add it to the model's trainable parameters in place: θ ← θ̂ + Δθ."""
    update = compute_update(model, task, train, request, args, factors)
    ParamView(model).add_(update.delta)
    return update


def save_unlearned(model, out: str, update: Update, *, input_adapter: str | None = None,
                   before_rename: Callable[[Path], None] | None = None,
                   requests: Sequence[Request] | None = None) -> None:
    """Write the unlearned adapter, `report.json` and `request.json` to `out` atomically (never over the input);
    `before_rename(tmp)` runs on the finished folder just before it is renamed into place. `requests`: the requests
    a batched update merged (`request.merge_requests`), kept as given in `requests.json`."""
    report = dict(update.report)
    if input_adapter is not None:
        report["input_adapter_sha256"] = adapter_hash(input_adapter)
    save_adapter(model, out, protect=(input_adapter,) if input_adapter else (), report=report,
                 files={"request.json": update.request.to_dict()} | (
                     {"requests.json": [r.to_dict() for r in requests]} if requests else {}),
                 before_rename=before_rename,
                 write_more=(lambda tmp: write(update.trajectory, tmp)) if update.trajectory is not None else None)
