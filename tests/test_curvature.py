"""Gradients and curvature products against brute force (docs/math.md#curvature, docs/tests.md).

Every model is float64 and the tiny Llama computes softmax/RMSNorm in float64 (tests/fixtures/tiny.py), so two
correct implementations of the same quantity agree to a few ulps times the number of accumulated terms: with
p = 64 parameters and losses of order 1, sums of a few thousand terms stay below ~1e-13. The bounds below
(1e-12 absolute on gradients of size ~1, 1e-10 relative on curvature matrices) leave two to three orders of
margin for summation order while any real error (a wrong sign, a missing 1/N, padding leaking into a loss, a
factor ½) shows up at order 1e-3 or larger.

References are computed per example alone (no padding) with torch.autograd on a functional copy of the model
(torch.func.functional_call over the ParamView names), so they share no code with llmeraser.curvature.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

import pytest
import torch
import torch.nn.functional as F
from fixtures.tabular import TabularTask, linear_model, make_examples, regression_data
from fixtures.tiny import fact_examples, tiny_llama, tiny_lora, tiny_tokenizer
from torch.autograd.functional import hessian, jacobian
from torch.func import functional_call

from llmeraser.curvature import CurvatureOperator, gradient, objective_gradient, per_example_gradients
from llmeraser.data import Example
from llmeraser.errors import ConfigError
from llmeraser.params import ParamView
from llmeraser.task import CausalLMTask, Task

L2 = 0.05
DT = torch.float64


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


class _Outputs(torch.nn.Module):
    """task.forward(model, batch) as a module, so functional_call can substitute θ."""

    def __init__(self, model: torch.nn.Module, task: Task):
        super().__init__()
        self.model, self.task = model, task

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.task.forward(self.model, batch)


def functional(model: torch.nn.Module, task: Task) -> tuple[ParamView, Callable]:
    """(view, outputs) with outputs(θ_flat, batch) = task.forward(model with θ, batch)."""
    view = ParamView(model)
    wrapper = _Outputs(model, task)

    def outputs(theta: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        params = {"model." + n: t for n, t in zip(view.names, view.unflatten(theta), strict=True)}
        return functional_call(wrapper, params, (batch,), strict=False)

    return view, outputs


def objective_fn(model: torch.nn.Module, task: Task, examples: Sequence[Example], l2: float) -> tuple[ParamView,
                                                                                                      Callable]:
    """(view, R) with R(θ) = mean over examples of ℓ(zᵢ; θ), each example in a batch of its own, + l2/2 ‖θ‖²."""
    view, outputs = functional(model, task)
    batches = [task.collate([e]) for e in examples]

    def objective(theta: torch.Tensor) -> torch.Tensor:
        losses = torch.stack([task.loss(outputs(theta, b), b)[0] for b in batches])
        return losses.mean() + 0.5 * l2 * theta.dot(theta)

    return view, objective


def dense_hessian(model: torch.nn.Module, task: Task, examples: Sequence[Example], l2: float) -> torch.Tensor:
    view, objective = objective_fn(model, task, examples, l2)
    return hessian(objective, view.vector(), vectorize=True)


def dense_ggn(model: torch.nn.Module, task: Task, examples: Sequence[Example], l2: float) -> torch.Tensor:
    """(1/N) Σᵢ Jᵢᵀ H_out,i Jᵢ + l2·I with Jᵢ the Jacobian of example i's outputs (alone) and H_out,i the Hessian
    of its loss in those outputs, both dense."""
    view, outputs = functional(model, task)
    theta = view.vector()
    total = torch.zeros(view.dim, view.dim, dtype=DT)
    for e in examples:
        batch = task.collate([e])
        out = outputs(theta, batch).detach()
        jac = jacobian(lambda t, b=batch: outputs(t, b).reshape(-1), theta, vectorize=True)  # (outputs, p)
        h_out = hessian(lambda o, b=batch, s=out.shape: task.loss(o.reshape(s), b)[0], out.reshape(-1),
                        vectorize=True)  # (outputs, outputs)
        total += jac.T @ h_out @ jac
    return total / len(examples) + l2 * torch.eye(view.dim, dtype=DT)


def operator_matrix(op: CurvatureOperator) -> torch.Tensor:
    """The columns H eᵢ as computed by matvec, not symmetrised (CurvatureOperator.dense would hide asymmetry)."""
    eye = torch.eye(op.dim, dtype=DT)  # float64: torch.eye defaults to float32
    return torch.stack([op.matvec(eye[i]) for i in range(op.dim)], dim=1)


# ---------------------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def lm() -> tuple[torch.nn.Module, CausalLMTask, list[Example]]:
    """The tiny LoRA Llama (p = 64) and 6 examples of 7 to 27 tokens (so batches are padded), one with a 3-token
    response (so the per-example mean over response tokens matters)."""
    tok = tiny_tokenizer()
    model = tiny_lora(tiny_llama(len(tok), seed=0), seed=0)
    examples = [*fact_examples(4, seed=1),
                Example("long", "The fox likes red. The cat likes blue. Does the fox like blue?", " No"),
                Example("multi", "cat", " Yes No Yes")]
    task = CausalLMTask(tok)
    lengths = {len(task.encode(e)[0]) for e in examples}
    assert len(lengths) >= 3, f"the examples must have different lengths to exercise padding, got {lengths}"
    return model, task, examples


@pytest.fixture(scope="module")
def lm_hessian(lm) -> torch.Tensor:
    model, task, examples = lm
    return dense_hessian(model, task, examples, L2)


class HeadTask:
    """A user-defined classifier: a frozen random feature layer, a trainable projector and head, cross-entropy.

    An example's prompt is a JSON list of 4 features and its response the class index (0, 1 or 2).
    """

    def collate(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        x = torch.tensor([json.loads(e.prompt) for e in examples], dtype=DT)  # (batch, 4)
        y = torch.tensor([int(e.response) for e in examples], dtype=torch.long)  # (batch,)
        return {"x": x, "y": y}

    def forward(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(batch["x"])  # (batch, 3) logits

    def loss(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(outputs, batch["y"], reduction="none")  # (batch,)


class HeadModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.features = torch.nn.Linear(4, 5).double().requires_grad_(False)  # frozen "base"
        self.projector = torch.nn.Linear(5, 4).double()
        self.head = torch.nn.Linear(4, 3).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.projector(torch.tanh(self.features(x)))))


@pytest.fixture(scope="module")
def head() -> tuple[HeadModel, HeadTask, list[Example]]:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(7, 4, generator=gen, dtype=DT)
    y = torch.randint(0, 3, (7,), generator=gen)
    examples = [Example(f"h{i}", json.dumps(xi.tolist()), str(int(yi)))
                for i, (xi, yi) in enumerate(zip(x, y, strict=True))]
    return HeadModel(), HeadTask(), examples


# ---------------------------------------------------------------------------------------------------------------
# gradients


def loop_gradients(model: torch.nn.Module, task: Task, examples: Sequence[Example]) -> torch.Tensor:
    """(N, p): one torch.autograd.grad per example, each example in a batch of its own (no padding)."""
    view = ParamView(model)
    rows = []
    for e in examples:
        batch = task.collate([e])
        loss = task.loss(task.forward(model, batch), batch)[0]
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, view.params)]))
    return torch.stack(rows)


@pytest.mark.parametrize(("method", "chunk_size"), [("vmap", 3), ("loop", 3), ("vmap", 100)])
def test_per_example_gradients_match_a_loop(lm, method: str, chunk_size: int) -> None:
    model, task, examples = lm
    reference = loop_gradients(model, task, examples)
    assert reference.shape == (6, 64) and float(reference.abs().max()) > 1e-2  # not trivially zero
    got = per_example_gradients(model, task, examples, method=method, chunk_size=chunk_size)
    assert got.shape == reference.shape and got.dtype == DT
    # Same float64 arithmetic up to padding and summation order: agreement to ~1e-15; 1e-12 leaves margin.
    assert float((got - reference).abs().max()) <= 1e-12


def test_per_example_gradients_of_a_custom_task(head) -> None:
    model, task, examples = head
    reference = loop_gradients(model, task, examples)
    for method in ("vmap", "loop"):
        got = per_example_gradients(model, task, examples, method=method, chunk_size=3)
        assert float((got - reference).abs().max()) <= 1e-12, method  # as above


def test_per_example_gradients_rejects_unknown_method(lm) -> None:
    model, task, examples = lm
    with pytest.raises(ConfigError, match="'jvp'"):
        per_example_gradients(model, task, examples, method="jvp")


def test_per_example_gradients_of_no_examples_keep_the_dtype(lm) -> None:
    model, task, _ = lm
    got = per_example_gradients(model, task, [])
    assert got.shape == (0, 64)
    assert got.dtype == DT


@pytest.mark.parametrize("batch_size", [1, 4, 100])
def test_weighted_gradient_is_the_weighted_sum_of_rows(lm, batch_size: int) -> None:
    model, task, examples = lm
    rows = loop_gradients(model, task, examples)
    weights = [1.0, -1.0, 0.5, 2.0, -0.25, 3.0]
    got = gradient(model, task, examples, weights=weights, batch_size=batch_size)
    expected = torch.tensor(weights, dtype=DT) @ rows
    assert float((got - expected).abs().max()) <= 1e-12  # sums of 6 terms of size ≲ 1: ~1e-15 expected
    unweighted = gradient(model, task, examples, batch_size=batch_size)
    assert float((unweighted - rows.sum(0)).abs().max()) <= 1e-12


def test_objective_gradient_has_the_mean_and_the_l2_term(lm) -> None:
    model, task, examples = lm
    view, objective = objective_fn(model, task, examples, L2)
    theta = view.vector()
    reference = torch.autograd.functional.jacobian(objective, theta)  # ∇[(1/N) Σ ℓᵢ + l2/2 ‖θ‖²]
    got = objective_gradient(model, task, examples, l2=L2, batch_size=4)
    assert float((got - reference).abs().max()) <= 1e-12
    # the two terms separately: a missing 1/N or l2·θ would move the result by ≥ 5e-2·|θ| or by a factor 6
    assert float((got - loop_gradients(model, task, examples).mean(0) - L2 * theta).abs().max()) <= 1e-12
    assert float((got - objective_gradient(model, task, examples, batch_size=4)).norm()) > 1e-3


def test_objective_gradient_of_no_examples_raises(lm) -> None:
    model, task, _ = lm
    with pytest.raises(ConfigError):
        objective_gradient(model, task, [], l2=L2)


# ---------------------------------------------------------------------------------------------------------------
# curvature on the tiny LoRA Llama


def test_hessian_operator_matches_the_dense_hessian(lm, lm_hessian) -> None:
    model, task, examples = lm
    reference = lm_hessian
    assert reference.shape == (64, 64)
    op = CurvatureOperator(model, task, examples, kind="hessian", l2=L2, batch_size=4)
    assert (op.dim, op.num_terms, op.dtype) == (64, 6, DT)
    got = operator_matrix(op)
    # float64 double backward vs functional hessian: ~1e-14 relative expected
    assert rel(got, reference) <= 1e-10
    assert rel(got, got.T) <= 1e-12  # symmetric column by column (double backward is exact up to rounding)
    # the reference is not dominated by l2·I: the data part is of order 1 and indefinite
    # (docs/math.md#the-exact-hessian-of-a-lora-model)
    data_eig = torch.linalg.eigvalsh(reference - L2 * torch.eye(64, dtype=DT))
    assert float(data_eig[-1]) > 10 * L2 and float(data_eig[0]) < 0


def test_ggn_operator_matches_jt_hout_j(lm, lm_hessian) -> None:
    model, task, _ = lm
    # the explicit H_out is (T·V)² per example (V = 300): use short examples, of different lengths so op pads them
    short = [Example("a", "cat", " Yes"), Example("b", "The fox", " No"), Example("c", "owl", " Yes No"),
             Example("d", "Does", " No")]
    assert len({len(task.encode(e)[0]) for e in short}) >= 2
    reference = dense_ggn(model, task, short, L2)
    op = CurvatureOperator(model, task, short, kind="ggn", l2=L2, batch_size=3)
    got = operator_matrix(op)
    assert rel(got, reference) <= 1e-10  # as for the Hessian
    # the GGN differs from the exact Hessian here (not the same computation under another name)
    assert rel(dense_hessian(model, task, short, L2), reference) > 1e-3


def test_ggn_is_positive_semidefinite(lm) -> None:
    model, task, examples = lm
    ggn = operator_matrix(CurvatureOperator(model, task, examples, kind="ggn", l2=0.0, batch_size=4))
    assert rel(ggn, ggn.T) <= 1e-12  # Jᵀ H J is symmetric by construction
    eig = torch.linalg.eigvalsh((ggn + ggn.T) / 2)
    # exact PSD: rounding leaves eigenvalues ≥ −p·eps·λ_max ≈ −1e-14 λ_max
    assert float(eig[0]) >= -1e-12 * float(eig[-1])
    assert float(eig[-1]) > 1e-2


@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_products_do_not_depend_on_batch_size(lm, kind: str) -> None:
    model, task, examples = lm
    vs = torch.randn(3, 64, generator=torch.Generator().manual_seed(0), dtype=DT)
    results = []
    for batch_size in (1, 3, len(examples)):
        op = CurvatureOperator(model, task, examples, kind=kind, l2=L2, batch_size=batch_size)
        results.append(torch.stack([op.matvec(v) for v in vs]))
    # padding to another width and other summation order only: ~1e-15 relative
    assert rel(results[1], results[0]) <= 1e-12
    assert rel(results[2], results[0]) <= 1e-12


def test_sample_matvec(lm, lm_hessian) -> None:
    model, task, examples = lm
    op = CurvatureOperator(model, task, examples, kind="hessian", l2=L2, batch_size=4)
    v = torch.randn(64, generator=torch.Generator().manual_seed(1), dtype=DT)
    everything = op.sample_matvec(v, torch.arange(len(examples)))
    assert rel(everything, op.matvec(v)) <= 1e-12
    assert rel(everything, lm_hessian @ v) <= 1e-10
    subset = [5, 1, 4]  # unsorted, mixed lengths
    reference = dense_hessian(model, task, [examples[i] for i in subset], L2)  # mean over the 3 + l2·I
    got = op.sample_matvec(v, torch.tensor(subset))
    assert rel(got, reference @ v) <= 1e-10
    assert rel(got, lm_hessian @ v) > 1e-3  # a subset is not the full average


# ---------------------------------------------------------------------------------------------------------------
# user tasks


def test_linear_squared_loss_ggn_equals_hessian_equals_closed_form() -> None:
    x, y = regression_data(20, 5, seed=2)
    examples = make_examples(x, y)
    model = linear_model(5)
    with torch.no_grad():  # away from 0, so a term in θ would show
        model.weight.copy_(torch.randn(1, 5, generator=torch.Generator().manual_seed(3), dtype=DT))
    expected = x.T @ x / 20 + L2 * torch.eye(5, dtype=DT)
    for kind in ("ggn", "hessian"):
        op = CurvatureOperator(model, TabularTask(), examples, kind=kind, l2=L2, batch_size=6)
        assert rel(operator_matrix(op), expected) <= 1e-12, kind  # both are exactly XᵀX/n + l2·I for a linear model
        assert rel(op.dense(), expected) <= 1e-12, kind


def test_custom_task_with_trainable_modules(head) -> None:
    model, task, examples = head
    view = ParamView(model)
    assert view.dim == 5 * 4 + 4 + 4 * 3 + 3  # projector + head; the frozen features are not part of θ
    assert not any(n.startswith("features") for n in view.names)
    _, objective = objective_fn(model, task, examples, L2)
    reference = torch.autograd.functional.jacobian(objective, view.vector())
    assert float((objective_gradient(model, task, examples, l2=L2, batch_size=3) - reference).abs().max()) <= 1e-12
    h_ref = dense_hessian(model, task, examples, L2)
    g_ref = dense_ggn(model, task, examples, L2)
    assert rel(h_ref, g_ref) > 1e-3  # a non-linear model: the two differ
    h = operator_matrix(CurvatureOperator(model, task, examples, kind="hessian", l2=L2, batch_size=3))
    g = operator_matrix(CurvatureOperator(model, task, examples, kind="ggn", l2=L2, batch_size=3))
    assert rel(h, h_ref) <= 1e-10
    assert rel(g, g_ref) <= 1e-10


# ---------------------------------------------------------------------------------------------------------------
# errors


def test_unknown_curvature_kind_raises(lm) -> None:
    model, task, examples = lm
    with pytest.raises(ConfigError, match="'fisher'.*ggn, hessian"):
        CurvatureOperator(model, task, examples, kind="fisher")


def test_empty_examples_raise(lm) -> None:
    model, task, _ = lm
    with pytest.raises(ConfigError, match="at least one example"):
        CurvatureOperator(model, task, [], kind="ggn")
