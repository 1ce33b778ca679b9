"""Choosing λ on held-out removals (`llmeraser.damping`), where the right answer is known.

Ridge regression fitted exactly: a warm-started L-BFGS refit without the held-out examples is the exact leave-k-out
solution, and the newton update at λ = 0 reproduces it, so λ = 0 must score ~0 and win; larger λ shrink the update
towards "no change", whose score is 1 by construction."""

from __future__ import annotations

import pytest
import torch
from fixtures.tabular import TabularTask, linear_model, make_examples, regression_data, ridge_solution

from llmeraser.damping import DampingArguments, select_damping
from llmeraser.eraser import EraserArguments
from llmeraser.errors import ConfigError
from llmeraser.finetune import FinetuneArguments
from llmeraser.params import ParamView

L2 = 0.05


def ridge():
    x, y = regression_data(120, 4, seed=1)
    examples = make_examples(x, y)
    train, valid = examples[:100], examples[100:]
    model = linear_model(4)
    ParamView(model).set_vector(ridge_solution(train, L2))
    return model, TabularTask(), train, valid


def test_exact_update_wins_and_no_update_scores_one():
    model, task, train, valid = ridge()
    theta = ParamView(model).vector()
    eraser = EraserArguments(method="newton", solver="cg", l2=L2)
    # grad_tol 1e-7: 10× above the floor where the line search can no longer tell values of R apart (≈ 1e-8; a
    # tighter tol would run all 500 iterations on some CPUs); the λ = 0 score is then ≤ (‖∇ℓ_val‖·2‖∇R‖/μ)² over the
    # actual changes' mean square, ~1e-14, far below the asserted 1e-8
    recipe = FinetuneArguments(optimizer="lbfgs", l2=L2, grad_tol=1e-7, max_iters=500, batch_size=100)
    record = select_damping(model, task, train, valid, eraser, DampingArguments(dampings=(1e3, 1.0, 0.1, 0.0),
                                                                               trials=3, size=0.03),
                            recipe=recipe)
    scores = {r["damping"]: r["score"] for r in record["scores"]}
    assert scores[0.0] < 1e-8 and record["chosen"] == 0.0 and not record["declines"]  # bounded ~1e-14 (above)
    assert scores[1e3] == pytest.approx(1.0, abs=0.05)  # a huge λ is no update
    assert scores[1e3] > scores[1.0] > scores[0.1] > scores[0.0]
    assert record["removal_size"] == 3 and len(record["removed"]) == 3
    assert torch.equal(ParamView(model).vector(), theta)  # θ restored


def test_bad_arguments_are_refused():
    model, task, train, valid = ridge()
    with pytest.raises(ConfigError, match="solver cg"):
        select_damping(model, task, train, valid, EraserArguments(solver="dense"))
    with pytest.raises(ConfigError, match="validation"):
        select_damping(model, task, train, [], EraserArguments(solver="cg"))
    with pytest.raises(ConfigError):
        DampingArguments(size=1.5)
