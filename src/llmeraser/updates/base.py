"""Update methods, registered by name as the solvers are (`solvers.base.SOLVERS`); one request's context; one options
object.

An update method turns a request into a new θ. Each family is a module that registers its methods with what they
need: `one_step` (first-order, the paper's; newton), `along_path` (rewind, path, refine), `choose` (auto, which
picks one of the others). The job (`AdapterJob.unlearn`), the command line (`--method`, its choices and help) and the
benchmarks dispatch through `get_method`; nothing else names a method.

Every method takes the request's `RequestContext` — built once per request: the model and task, the training set
the adapter stands for, the request, its resolved edits, the kept set, the hashes, and how to reach the adapter's
recording and fitted curvature — and the `UnlearnOptions`, and returns an `eraser.Update` whose report is complete.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from llmeraser.data import Example, examples_hash
from llmeraser.eraser import EraserArguments, Update
from llmeraser.errors import ConfigError, RequestError, UserInputError
from llmeraser.evidence import Probe
from llmeraser.replay import PathArguments, RefineArguments
from llmeraser.request import Request, apply_request, resolve
from llmeraser.solvers.api import is_fitted, solver_arguments
from llmeraser.task import Task
from llmeraser.updates.stop import ForgetArguments

REFIT_FRACTION = 0.05  # edits since the last real fit, as a fraction of N, beyond which the next request refits
NEEDS = {"recording": "the adapter's recorded fine-tune (trajectory.safetensors)",
         "curvature": "curvature: products over the training set, or factors fitted once (--solver)",
         "holdout": "a holdout: examples of the same kind the adapter never saw (the stop rule's evidence)"}


@dataclass(frozen=True)
class Method:
    """An update method: `run(context, options) → Update`, what it needs (`NEEDS`), whether its result is
    retraining itself (`exact`), its help text (the command line's) and its place in listings (`order`)."""

    name: str
    run: Callable[[RequestContext, UnlearnOptions], Update]
    needs: tuple[str, ...]
    help: str
    exact: bool = False
    order: int = 100


METHODS: dict[str, Method] = {}


def register(name: str, *, help: str, needs: Sequence[str] = (), exact: bool = False, order: int = 100):
    """Register the decorated `run(context, options)` as update method `name` (listed by `order`)."""
    unknown = set(needs) - set(NEEDS)
    if unknown:
        raise ValueError(f"unknown needs {sorted(unknown)}; known: {', '.join(NEEDS)}")

    def wrap(run):
        METHODS[name] = Method(name, run, tuple(needs), help, exact, order)
        return run

    return wrap


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; expected one of {', '.join(method_names())}")
    return METHODS[name]


def method_names() -> tuple[str, ...]:
    """Every registered method, in their `order` (auto first)."""
    return tuple(sorted(METHODS, key=lambda n: (METHODS[n].order, n)))


def methods_help() -> str:
    """One sentence per method, for `--method`'s help."""
    return "; ".join(f"{m}: {METHODS[m].help}" for m in method_names())


@dataclass
class UnlearnOptions:
    """Everything a request's update can be told, validated here, once. The command line and the benchmarks build
    this object; `AdapterJob.unlearn(request, out, options)` takes it.

    Attributes:
        method: a registered update method (`method_names()`); auto picks one and says why.
        eraser: how a one-step update is computed (solver, curvature, relative damping, l2, batch size, …); its
            `l2` defaults to the adapter's record.
        path, refine: options of path replay and of the refinement.
        damping: λ, absolute (a number), `'auto'` (the λ `tune-damping` chose on validation data), or None
            (relative to the curvature's scale: `eraser.relative_damping`).
        force: write the update even when the validated damping declined it.
        refit_fraction: fitted factors are handed on to the new adapter until the examples edited since the fit
            exceed this fraction of the training set.
        ledger: record the request in this ledger folder (`llmeraser.ledger`).
        solver_options: `SolverArguments` fields for the iterative solver used (also the one auto picks).
        forget: options of the unlearners without a recording (`updates.forget`: gradient-difference, npo, simnpo)
            and their stop rule.
    """

    method: str = "auto"
    eraser: EraserArguments = field(default_factory=EraserArguments)
    path: PathArguments = field(default_factory=PathArguments)
    refine: RefineArguments = field(default_factory=RefineArguments)
    damping: float | str | None = None
    force: bool = False
    refit_fraction: float = REFIT_FRACTION
    ledger: str | None = None
    solver_options: dict = field(default_factory=dict)
    forget: ForgetArguments = field(default_factory=ForgetArguments)

    def __post_init__(self) -> None:
        get_method(self.method)
        if isinstance(self.damping, str) and self.damping != "auto":
            raise ConfigError(f"damping must be a number ≥ 0, 'auto' or None, got {self.damping!r}")
        if self.damping is not None and self.damping != "auto":
            if isinstance(self.damping, bool) or not (math.isfinite(self.damping) and self.damping >= 0):
                raise ConfigError(f"damping must be a finite number ≥ 0, got {self.damping}")
            self.eraser = dataclasses.replace(self.eraser, damping=float(self.damping))
        if not 0 <= self.refit_fraction <= 1:
            raise ConfigError(f"refit_fraction must be in [0, 1], got {self.refit_fraction}")
        if self.solver_options and self.eraser.solver not in ("auto",) and not is_fitted(self.eraser.solver):
            self.eraser = dataclasses.replace(self.eraser, solver_args=solver_arguments(self.eraser.solver,
                                                                                        **self.solver_options))
        if self.ledger is not None:
            self.ledger = str(self.ledger)


@dataclass
class RequestContext:
    """One request, resolved once, and what the update methods reach through it.

    Attributes:
        model, task: the base model with the adapter loaded (at θ̂), and how it scores examples.
        train: the training set the adapter stands for (with a ledger: after the lineage's applied requests).
        request: the request; `pairs` its resolved edits (old example, new version or None), `edits` the same by
            id, `effective` the edited training set.
        l2: the L2 term of the objective the adapter was trained with (its record's), unless options set one.
        report: entries every update's report carries (the training record, notes, auto's choice).
        recording: () → (the adapter's verified recording or None, why not).
        fit: (eraser arguments) → (fitted factors for a fitted solver, seconds spent fitting now); the job's reuses
            its factor store, the default fits now.
        damping_choice: () → the damping `tune-damping` stored (for damping 'auto').
        holdout: examples of the same kind as the training set that the adapter never saw (None: none given): the
            evidence the unlearners without a recording stop by (`updates.stop`), and auto's reason to pick one.
        probe: with a holdout, the membership test of the request's edited examples (as they were) against it
            (`evidence.Probe`), shared by the report's before and after and the stop rule's checks.
    """

    model: torch.nn.Module
    task: Task
    train: list[Example]
    request: Request
    pairs: list[tuple[Example, Example | None]]
    effective: list[Example]
    train_sha256: str
    l2: float = 0.0
    report: dict = field(default_factory=dict)
    recording: Callable[[], tuple[object, str]] = lambda: (None, "no recording was given")
    fit: Callable[[EraserArguments], tuple[object, float]] | None = None
    damping_choice: Callable[[], dict] | None = None
    progress: bool = False
    holdout: list[Example] | None = None
    probe: Probe | None = None

    @classmethod
    def build(cls, model: torch.nn.Module, task: Task, train: Sequence[Example], request: Request,
              **kwargs) -> RequestContext:
        """The context of `request` on `train` (the request resolved here, once).

        Raises:
            RequestError: the request does not fit `train`, or removes every example.
            UserInputError: the holdout (kwarg `holdout`) shares ids with `train` or is of another record shape.
        """
        train = list(train)
        pairs = resolve(request, train)
        effective = apply_request(train, request)
        if not effective:
            raise RequestError("the request removes every training example; there is nothing left to fit")
        if kwargs.get("holdout") is not None:  # its format and overlap; its size is the stop rule's to judge
            from llmeraser.evidence import check_holdout

            kwargs["holdout"] = list(kwargs["holdout"])
            check_holdout(kwargs["holdout"], train=train)
            kwargs.setdefault("probe", Probe(task, [old for old, _ in pairs], kwargs["holdout"]))
        return cls(model=model, task=task, train=train, request=request, pairs=pairs, effective=effective,
                   train_sha256=examples_hash(train), **kwargs)

    @property
    def edits(self) -> dict[str, Example | None]:
        """id → the new version of each edited example (None for a removal)."""
        return {old.id: new for old, new in self.pairs}

    def trajectory(self, method: str):
        """The verified recording a path method needs (UserInputError naming why there is none)."""
        found, why = self.recording()
        if found is None:
            raise UserInputError(f"--method {method} needs the adapter's recorded trajectory: {why}")
        return found

    def eraser(self, options: UnlearnOptions) -> EraserArguments:
        """The options' one-step arguments with the record's l2 unless one was set."""
        args = options.eraser
        return args if args.l2 else dataclasses.replace(args, l2=self.l2)
