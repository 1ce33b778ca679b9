"""The inverse-HVP solvers against torch.linalg.solve, and their failure modes.

Every problem is float64. Error is ‖x − x*‖/‖x*‖ with x* = torch.linalg.solve(H + λI, b); for an iterative
solver stopped at relative residual r it is at most κ·r (κ the condition number of H + λI), which is how the
deterministic tolerances below are justified.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from llmeraser.errors import ConfigError, ResourceError, SolverError
from llmeraser.solvers.api import get_solver, solve, solver_arguments
from llmeraser.solvers.base import SOLVERS, MatrixOperator, relative_residual

ALL = ["dense", "cg", "lissa", "sqp", "paper"]


def spd(dim: int, cond: float, seed: int, distinct: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A random SPD matrix with eigenvalues log-spaced in [1, cond] (or `distinct` distinct values), and a b."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    eig = torch.logspace(0, math.log10(cond), distinct or dim, dtype=torch.float64)
    eig = eig.repeat(dim // len(eig) + 1)[:dim]
    return (q * eig) @ q.T, torch.randn(dim, generator=gen, dtype=torch.float64)


def tiny_mlp_terms(n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example loss Hessians (n, 21, 21) of a 3→4→1 tanh MLP with squared error, and b = ∇ of 2 examples' loss.

    Their mean is the exact Hessian of the mean loss at random (not optimal) parameters: indefinite.
    """
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 3, generator=gen, dtype=torch.float64), torch.randn(n, 1, generator=gen, dtype=torch.float64)
    shapes = [(4, 3), (4,), (1, 4), (1,)]
    sizes = [math.prod(s) for s in shapes]
    theta = 0.7 * torch.randn(sum(sizes), generator=gen, dtype=torch.float64)

    def loss(p: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        w1, b1, w2, b2 = (t.reshape(s) for t, s in zip(p.split(sizes), shapes, strict=True))
        return ((torch.tanh(xs @ w1.T + b1) @ w2.T + b2 - ys) ** 2).mean()

    hessian = torch.autograd.functional.hessian
    terms = torch.stack([hessian(lambda p, i=i: loss(p, x[i : i + 1], y[i : i + 1]), theta) for i in range(n)])
    assert torch.allclose(terms.mean(0), hessian(lambda p: loss(p, x, y), theta), atol=1e-12)
    b = torch.autograd.functional.jacobian(lambda p: loss(p, x[:2], y[:2]), theta)
    return terms, b


@functools.cache
def problem(name: str) -> tuple[MatrixOperator, torch.Tensor, float]:
    """(operator, b, λ) of a named test problem."""
    if name == "spd_1e2":  # dim 30, κ = 1e2 (+ a little damping)
        h, b = spd(30, 1e2, seed=0)
        return MatrixOperator(h), b, 0.1
    if name == "spd_1e3":  # dim 30, κ = 1e3
        h, b = spd(30, 1e3, seed=1)
        return MatrixOperator(h), b, 0.0
    if name == "finite_sum":  # 64 PSD terms Hᵢ = S + 0.1 aᵢaᵢᵀ (S SPD with κ = 10, aᵢ of rank 2), dim 20
        s, b = spd(20, 10, seed=3)
        a = torch.randn(64, 20, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
        return MatrixOperator(s + 0.1 * a @ a.transpose(1, 2)), b, 0.1
    if name == "mlp":  # damped so that λ_min(H + λI) = 0.01 λ_max(H): κ ≈ 180
        terms, b = tiny_mlp_terms()
        eig = torch.linalg.eigvalsh(terms.mean(0))
        return MatrixOperator(terms), b, float(-eig[0] + 0.01 * eig[-1])
    raise KeyError(name)


def exact(name: str) -> torch.Tensor:
    op, b, damping = problem(name)
    return torch.linalg.solve(op.mean + damping * torch.eye(op.dim, dtype=torch.float64), b)


DET = dict(tol=1e-12, max_iters=20000)  # deterministic runs: residual ≤ 1e-12, so error ≤ κ·1e-12 ≤ 1e-9
NOISY = dict(batch_size=8, max_iters=3000, tol=0.0)  # mini-batches of 8 of the 64 terms, fixed budget

CASES = [
    # (solver, problem, overrides, bound on the relative error, why)
    *[("dense", p, {}, 1e-8, "LU is backward stable: error ~ κ·eps ≤ 1e-12") for p in
      ("spd_1e2", "spd_1e3", "finite_sum", "mlp")],
    *[("cg", p, DET, 1e-8, "κ·tol ≤ 1e3·1e-12") for p in ("spd_1e2", "spd_1e3", "finite_sum", "mlp")],
    ("lissa", "spd_1e2", DET, 1e-8, "κ·tol; about 2.5e3 steps at rate 1 − 1/(1.1κ)"),
    ("lissa", "mlp", DET, 1e-8, "κ·tol with κ ≈ 180; indefinite per-example terms, full products"),
    ("sqp", "spd_1e2", DET, 1e-8, "SGD with lr 1/‖H+λI‖ is LiSSA with s = ‖H+λI‖"),
    ("sqp", "mlp", DET, 1e-8, "as above"),
    # Adam with a constant lr stalls near 1e-10 here and then drifts (see test_adam_keeps_its_best_iterate)
    ("sqp", "spd_1e3", {"optimizer": "adam", "tol": 1e-10, "max_iters": 5000}, 1e-7, "κ·tol = 1e3·1e-10"),
    ("sqp", "mlp", {**DET, "optimizer": "adam"}, 1e-8, "κ·tol"),
    # Constant-step stochastic recursions stall at a noise floor set by the spread of the terms: measured errors
    # (best checked iterate, 3000 steps) 2.1e-2 (lissa), 2.3e-2 (sgd), 5.1e-2 (adam), so the bounds leave ~3x.
    # Products of the wrong scale (a sum instead of a mean) diverge; dropping the sampling is caught by the counts.
    ("lissa", "finite_sum", NOISY, 0.06, "noise floor of batch-8 products"),
    ("sqp", "finite_sum", NOISY, 0.06, "noise floor of batch-8 products"),
    ("sqp", "finite_sum", {**NOISY, "optimizer": "adam"}, 0.15, "Adam's default lr has ~2x SGD's noise floor"),
]


@pytest.mark.parametrize(("solver", "name", "overrides", "bound", "why"), CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2].get('optimizer', 'sgd')}-b{c[2].get('batch_size', 0)}"
                              for c in CASES])
def test_matches_exact_solve(solver: str, name: str, overrides: dict, bound: float, why: str) -> None:
    op, b, damping = problem(name)
    x_star = exact(name)
    result = solve(solver, op, b, damping, **overrides)
    error = float(torch.linalg.vector_norm(result.x - x_star) / torch.linalg.vector_norm(x_star))
    assert error <= bound, f"{solver} on {name}: error {error:.3g} > {bound:g} ({why})"
    # the reported residual is the true one of the returned x, and `converged` agrees with it
    assert result.residual == pytest.approx(relative_residual(op, result.x, b, damping), rel=1e-9, abs=1e-15)
    assert result.converged == (result.residual <= solver_arguments(solver, **overrides).tol)
    assert result.solver == solver and result.x.dtype == torch.float64
    assert result.history and result.seconds >= 0


def test_adam_keeps_its_best_iterate() -> None:
    """Adam with a constant lr reaches ~7e-11 on spd_1e3 by step 2300, then drifts up to ~1e-2 as its
    second-moment estimate decays; the result must be the best checked iterate, with its own true residual."""
    op, b, damping = problem("spd_1e3")
    result = solve("sqp", op, b, damping, optimizer="adam", tol=1e-12, max_iters=6000)
    assert result.history[-1] > 1e-6  # the last iterate is far worse ...
    assert result.residual == min(result.history) < 1e-9  # ... than the one returned
    assert result.residual == pytest.approx(relative_residual(op, result.x, b, damping), rel=1e-9)
    assert result.converged is False and result.iterations == 6000


def test_cg_rejects_indefinite_matrix_without_damping() -> None:
    gen = torch.Generator().manual_seed(5)
    q, _ = torch.linalg.qr(torch.randn(10, 10, generator=gen, dtype=torch.float64))
    h = (q * torch.linspace(-3, 1, 10, dtype=torch.float64)) @ q.T
    with pytest.raises(SolverError, match="not positive definite") as info:
        solve("cg", MatrixOperator(h), torch.ones(10, dtype=torch.float64), 0.0)
    assert "--damping" in str(info.value) and "ggn" in str(info.value)
    # dense still solves the (non-singular) indefinite system
    result = solve("dense", MatrixOperator(h), torch.ones(10, dtype=torch.float64), 0.0)
    assert result.residual < 1e-12


def test_dense_falls_back_on_an_exactly_singular_matrix() -> None:
    h = torch.diag(torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64))
    result = solve("dense", MatrixOperator(h), torch.tensor([1.0, 4.0, 0.0], dtype=torch.float64), 0.0)
    assert torch.allclose(result.x, torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64), atol=1e-12)  # min norm
    assert result.residual < 1e-12


def test_lissa_with_too_small_scale_diverges() -> None:
    op, b, damping = problem("spd_1e2")  # ‖H + λI‖ ≈ 100, so s = 10 amplifies the top mode ~9x per step
    with pytest.raises(SolverError, match="'lissa' diverged") as info:
        solve("lissa", op, b, damping, scale=10.0, max_iters=1000)
    assert "scale" in str(info.value) and "damping" in str(info.value)


def test_sqp_with_too_large_lr_diverges() -> None:
    op, b, damping = problem("spd_1e2")
    with pytest.raises(SolverError, match="'sqp' diverged"):
        solve("sqp", op, b, damping, lr=0.1, max_iters=1000)  # 0.1 > 2/‖H+λI‖ ≈ 0.02


@pytest.mark.parametrize("solver", ALL)
def test_bad_inputs_raise(solver: str) -> None:
    op, b, damping = problem("spd_1e2")
    bad = b.clone()
    bad[3] = float("nan")
    with pytest.raises(SolverError, match="non-finite"):
        solve(solver, op, bad, damping)
    with pytest.raises(ConfigError, match="length 30"):
        solve(solver, op, b[:-1], damping)
    with pytest.raises(ConfigError, match="damping"):
        solve(solver, op, b, -1.0)
    with pytest.raises(ConfigError, match="damping"):
        solve(solver, op, b, float("inf"))


@pytest.mark.parametrize("solver", ALL)
def test_zero_rhs_gives_zero(solver: str) -> None:
    op, b, damping = problem("spd_1e2")
    result = solve(solver, op, torch.zeros_like(b), damping)
    assert torch.equal(result.x, torch.zeros_like(b))
    assert (result.residual, result.converged, result.hvps) == (0.0, True, 0.0)


def test_dense_refuses_large_problems() -> None:
    op, b, damping = problem("spd_1e2")
    with pytest.raises(ResourceError) as info:
        solve("dense", op, b, damping, max_dense_dim=29)
    message = str(info.value)
    assert "30" in message and "29" in message and "--solver cg" in message


def test_unknown_solver_lists_known_ones() -> None:
    with pytest.raises(ConfigError, match="'newton'") as info:
        get_solver("newton")
    assert all(name in str(info.value) for name in ALL)
    assert set(ALL) <= set(SOLVERS)


def test_arguments_are_preset_then_overrides() -> None:
    paper = solver_arguments("paper")
    assert (paper.optimizer, paper.lr, paper.batch_size, paper.max_iters) == ("adam", 1e-5, 1, 20)
    assert solver_arguments("paper", lr=1e-3, batch_size=None).lr == 1e-3  # None keeps the preset
    assert solver_arguments("paper", batch_size=None).batch_size == 1
    with pytest.raises(ConfigError, match="lrate"):
        solver_arguments("sqp", lrate=1.0)
    with pytest.raises(ConfigError, match="optimizer"):
        solver_arguments("sqp", optimizer="lbfgs")


def test_paper_preset_does_not_converge_and_says_so() -> None:
    op, b, damping = problem("finite_sum")
    result = solve("paper", op, b, damping)
    assert result.converged is False
    true_residual = relative_residual(op, result.x, b, damping)
    assert result.residual == pytest.approx(true_residual, rel=1e-12)
    assert 0.9 < result.residual <= 1.0  # 20 Adam steps of 1e-5 barely move x from 0
    assert result.iterations == 20
    assert result.hvps == pytest.approx(20 / 64 + 1)  # 20 single-term products, one full residual check


def test_sqp_gradient_is_not_the_published_half_hessian() -> None:
    """The published gradient ½Hx + λx − b solves (½H + λI)x = b: with λ = 0, twice the answer."""
    op, b, _ = problem("spd_1e2")
    x_star = torch.linalg.solve(op.mean, b)
    for optimizer in ("sgd", "adam"):
        x = solve("sqp", op, b, 0.0, optimizer=optimizer, **DET).x
        assert float(torch.linalg.vector_norm(x - x_star) / torch.linalg.vector_norm(x_star)) < 1e-8
        assert float(torch.linalg.vector_norm(x - 2 * x_star) / torch.linalg.vector_norm(x_star)) > 0.99
    # two SGD steps by hand: x₁ = lr·b, x₂ = x₁ − lr((H + λI)x₁ − b)
    damping, lr = 0.5, 0.004
    x1 = lr * b
    x2 = x1 - lr * (op.mean @ x1 + damping * x1 - b)
    result = solve("sqp", op, b, damping, lr=lr, max_iters=2, tol=0.0)
    assert torch.allclose(result.x, x2, rtol=1e-12, atol=0)


def test_product_counts() -> None:
    # cg: one product per iteration plus one for the reported residual, at most dim + 1 on a dim-30 SPD matrix
    h, b = spd(30, 10, seed=6)
    result = solve("cg", MatrixOperator(h), b, 0.0, tol=1e-10)
    assert result.converged and result.hvps == result.iterations + 1 <= 31
    # with 3 distinct eigenvalues CG is exact after 3 steps (one more allowed for rounding)
    h, b = spd(30, 100, seed=7, distinct=3)
    result = solve("cg", MatrixOperator(h), b, 0.0, tol=1e-10)
    assert result.converged and result.iterations <= 4

    # dense: a MatrixOperator is read directly; any other operator costs dim products to build H
    class Products:
        def __init__(self, matrix: torch.Tensor):
            self.matrix, self.dim, self.num_terms = matrix, matrix.shape[0], 1
            self.dtype, self.device = matrix.dtype, matrix.device

        def matvec(self, v: torch.Tensor) -> torch.Tensor:
            return self.matrix @ v

        def sample_matvec(self, v: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
            return self.matrix @ v

    op, b, damping = problem("spd_1e2")
    direct = solve("dense", op, b, damping)
    built = solve("dense", Products(op.mean), b, damping)
    assert (direct.hvps, built.hvps) == (1, 31)
    assert torch.allclose(direct.x, built.x, rtol=1e-12, atol=0)

    # stochastic: 100 steps on 8 of 64 terms (= 12.5 full passes) plus a full residual every 10 steps
    op, b, damping = problem("finite_sum")
    for solver, step in (("lissa", {"scale": 20.0}), ("sqp", {"lr": 0.05})):  # given: no power iteration
        result = solve(solver, op, b, damping, batch_size=8, max_iters=100, check_every=10, tol=0.0, **step)
        assert (result.iterations, result.hvps, len(result.history)) == (100, 100 * 8 / 64 + 10, 11)
    # the default step costs 20 power-iteration products on top
    result = solve("lissa", op, b, damping, batch_size=8, max_iters=100, check_every=10, tol=0.0)
    assert result.hvps == 100 * 8 / 64 + 10 + 20


def test_stochastic_solvers_are_seeded() -> None:
    op, b, damping = problem("finite_sum")
    runs = [solve("lissa", op, b, damping, batch_size=8, max_iters=50, seed=seed).x for seed in (0, 0, 1)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_cg_returns_its_best_iterate_when_the_budget_ends_early():
    # On an ill-conditioned matrix CG's residual is not monotone; cut at a step where it went up, the solver must
    # return the earlier, better iterate and report that iterate's true residual.
    h, b = spd(40, 1e6, seed=5)
    went_up = 0
    for k in range(1, 15):
        res = SOLVERS["cg"](MatrixOperator(h), b, 0.0, solver_arguments("cg", tol=0.0, max_iters=k))
        went_up += res.history[-1] > min(res.history)
        # 15 float64 CG steps: the recursive residual still equals the true one to ~1e-9 at this conditioning.
        assert res.residual == pytest.approx(min(res.history), rel=1e-6)
        assert res.residual == pytest.approx(relative_residual(MatrixOperator(h), res.x, b, 0.0), rel=1e-12)
    assert went_up >= 1  # the case exists here, so the assertions above test the best-iterate rule


# ---------------------------------------------------------------------------------------------------------------
# shifted cg: one Lanczos run, every damping


def test_shifted_solve_matches_dense_for_every_damping() -> None:
    from llmeraser.solvers.krylov import shifted_solve

    h, b = spd(40, 1e4, seed=3)
    dampings = [0.0, 1e-3, 0.1, 10.0]
    results = shifted_solve(MatrixOperator(h), b, dampings, solver_arguments("cg", tol=1e-10, max_iters=200))
    for lam, r in zip(dampings, results, strict=True):
        exact_x = torch.linalg.solve(h + lam * torch.eye(40, dtype=h.dtype), b)
        assert r.converged and r.residual <= 1e-10
        assert float((r.x - exact_x).norm() / exact_x.norm()) <= 1e-8
    # larger damping converges faster, so the shared run stops when the smallest one is done (≤ dim products)
    assert results[0].iterations <= 40
    eig = torch.linalg.eigvalsh(h)  # converged Lanczos: its Ritz values are H's extreme eigenvalues
    assert results[0].ritz == pytest.approx((float(eig[0]), float(eig[-1])), rel=1e-6)


def test_shifted_solve_early_stop_is_the_galerkin_solution() -> None:
    """After k steps x(λ) is the Galerkin solution on span{b, Hb, …, H^{k-1}b}: Q (Qᵀ(H+λI)Q)⁻¹ Qᵀ b (QR basis)."""
    from llmeraser.solvers.krylov import shifted_solve

    h, b = spd(30, 1e3, seed=5)
    k = 6
    krylov = torch.stack([torch.linalg.matrix_power(h, j) @ b for j in range(k)], dim=1)
    q, _ = torch.linalg.qr(krylov)
    for lam, r in zip([0.0, 0.5], shifted_solve(MatrixOperator(h), b, [0.0, 0.5],
                                                solver_arguments("cg", tol=0.0, max_iters=k)), strict=True):
        a = q.T @ (h + lam * torch.eye(30, dtype=h.dtype)) @ q
        galerkin = q @ torch.linalg.solve(a, q.T @ b)
        assert r.iterations == k and not r.converged
        assert float((r.x - galerkin).norm() / galerkin.norm()) <= 1e-8
        assert math.isclose(r.residual, relative_residual(MatrixOperator(h), galerkin, b, lam), rel_tol=1e-6)
        assert math.isclose(r.history[-1], max(r.residual, r.history[-1]), rel_tol=1e-6)  # the worst λ's


def test_shifted_solve_refuses_indefinite_and_bad_dampings() -> None:
    from llmeraser.solvers.krylov import shifted_solve

    h = torch.diag(torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64))
    b = torch.ones(3, dtype=torch.float64)
    with pytest.raises(SolverError, match="not positive definite"):
        shifted_solve(MatrixOperator(h), b, [0.0], solver_arguments("cg"))
    assert shifted_solve(MatrixOperator(h), b, [2.5], solver_arguments("cg", tol=1e-12))[0].converged
    with pytest.raises(ConfigError):
        shifted_solve(MatrixOperator(h), b, [], solver_arguments("cg"))
    with pytest.raises(ConfigError, match="damping"):
        shifted_solve(MatrixOperator(h), b, [1.0, -1.0], solver_arguments("cg"))
    zero = shifted_solve(MatrixOperator(h), torch.zeros(3, dtype=torch.float64), [1.0, 2.0], solver_arguments("cg"))
    assert all(r.residual == 0 and not r.x.any() for r in zero)
