"""Which solver `auto` stands for, from the sizes, the estimated cost of a curvature product and the model's
structure, and why: the one home of that rule (`choose_solver`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from llmeraser import distributed
from llmeraser.data import Example
from llmeraser.errors import ConfigError
from llmeraser.params import ParamView
from llmeraser.solvers.base import SolverArguments
from llmeraser.task import Task

EXACT_WORK = 200_000  # p × N up to which `auto` solves with the exact curvature (dense, or cg)
DENSE_FLOPS = 1e10  # estimated floating-point operations up to which `auto` builds the exact matrix (dense)
DEFAULT_TOKENS = 64  # tokens per example assumed when the caller does not say (CausalLMTask's default max_length)


def choose_solver(model: torch.nn.Module, n_train: int | None = None, *, need_path: bool = False,
                  tokens: float | None = None) -> tuple[str, str]:
    """The solver `auto` stands for, from the sizes and the model's structure, and why. The one home of `auto`.

    `tokens`: the tokens of an example (`CausalLMTask.mean_tokens` of the training set, or its max_length), for the
    cost of a curvature product; DEFAULT_TOKENS when not given.

    - the exact curvature when p × N ≤ EXACT_WORK: dense when its p curvature products over N examples, at about
      6 · P · t operations an example (P the model's parameters that a token meets, the output projection included,
      t its tokens), cost at most DENSE_FLOPS (seconds on a CPU: tiny models run at a few GFLOP/s), and no
      approximation is then worth its error; cg otherwise (a deep model, a big vocabulary: a Krylov solve needs far
      fewer products), and when `need_path` (dense has no damping path);
    - otherwise a fitted solver when every trainable parameter is in a linear layer (fitted once on a sample, a
      fraction of an epoch, reused by every request): woodbury while the per-example gradients of the examples its
      fit passes over (at most `FIT_SAMPLE`, `factors.fit.sample_size`) take at most a quarter of the available
      memory, else ekfac (memory independent of N). On the embedded benchmark woodbury was never far from the best
      fitted solver and was the only one that helped on RC-10, where the Kronecker ones overshot at every λ
      (docs/fitted-curvature.md#where-the-update-does-help-qm-5-and-rc-10);
    - cg otherwise (products over the training set per request).
    """
    name, why = _choose_solver(model, n_train, need_path, DEFAULT_TOKENS if tokens is None else tokens)
    name, why = distributed.broadcast_json([name, why], "choosing the solver")  # free memory differs by rank
    return name, why


def example_tokens(task: Task, train: Sequence[Example]) -> float | None:
    """Tokens of an example of `train` as `task` renders it (a sample's mean), for `choose_solver`; None for a task
    that cannot say."""
    mean = getattr(task, "mean_tokens", None)
    return mean(train) if mean is not None and train else None


def _forward_parameters(model: torch.nn.Module) -> int:
    """The parameters a token's forward pass multiplies by: all of them but the input embedding (a lookup), with
    the output projection counted even when it is tied to the embedding (on a tiny model with a big vocabulary it is
    most of the work)."""
    def weight(getter: str) -> int:
        try:
            module = getattr(model, getter)()
        except (AttributeError, NotImplementedError):
            return 0
        w = getattr(module, "weight", None)
        return w.numel() if isinstance(w, torch.Tensor) else 0

    total = sum(p.numel() for p in model.parameters())  # a tied tensor once
    return max(total - weight("get_input_embeddings") + weight("get_output_embeddings"), 1)


def _choose_solver(model: torch.nn.Module, n_train: int | None, need_path: bool,
                   tokens: float) -> tuple[str, str]:
    from llmeraser.resources import available_bytes

    view = ParamView(model)
    p = view.dim
    if n_train is not None and p * n_train <= EXACT_WORK:
        size = f"{p:,} parameters × {n_train:,} examples"
        if need_path:
            return "cg", (f"auto chose cg: {size} is small (dense would do for one λ, but one Krylov run serves "
                          f"every λ)")
        forward = _forward_parameters(model)
        flops = p * n_train * 6 * forward * max(tokens, 1)
        cost = (f"{p:,} curvature products of ≈ 6 × {forward:,} model parameters × {tokens:,.0f} tokens × {n_train:,} "
                f"examples each, ≈ {flops:.1e} floating-point operations")
        if p > SolverArguments().max_dense_dim:
            over = f"its {p:,} parameters are more than dense's max_dense_dim"
        elif flops > DENSE_FLOPS:
            over = f"the exact matrix would take {cost}, over the {DENSE_FLOPS:.0e} budget"
        else:
            return "dense", f"auto chose dense: {size} is small enough for the exact matrix ({cost})"
        return "cg", f"auto chose cg: {size} is small, but {over}; a Krylov solve needs far fewer products"
    from llmeraser.factors import linear_blocks  # factors register into the solver registry: imported late
    from llmeraser.factors.fit import sample_size

    try:
        linear_blocks(model)
    except ConfigError as e:
        return "cg", f"auto chose cg: {e}"
    free = available_bytes()
    k = sample_size(n_train or 0)
    need = k * p * view.params[0].element_size()
    if k and (free is None or need <= free / 4):
        return "woodbury", (f"auto chose woodbury: every trainable parameter is in a linear layer and the "
                            f"{k:,} × {p:,} per-example gradients of its fit ({need / 2**30:.2f} GiB) fit in memory, "
                            f"so the exact inverse of the fitted Fisher serves every request at about the cost of its "
                            f"gradients")
    return "ekfac", (f"auto chose ekfac: every trainable parameter is in a linear layer, and {k:,} "
                     f"examples × {p:,} parameters are too many for woodbury's per-example gradients, so Kronecker "
                     f"factors fitted once serve every request at about the cost of its own gradients")
