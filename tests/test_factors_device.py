"""The fit at the device's speed (issue 26): targets drawn on the device keyed by example, batched
eigendecompositions, the memory plan (gradients on the device, on the host, or a sketch when N × p does not fit) and
the sketches against the exact Gram fits, and a device out-of-memory as a ResourceError."""

from __future__ import annotations

import pytest
import torch
from fixtures.tiny import tiny_lora_lm as tiny_lm

from llmeraser import resources
from llmeraser.curvature import gradient
from llmeraser.errors import ResourceError
from llmeraser.factors import FactorArguments, example_generators, fit_factors
from llmeraser.factors.kronecker import batched_eigh
from llmeraser.factors.memory import plan
from llmeraser.params import ParamView
from llmeraser.task import sample_targets

EMPIRICAL = dict(fisher="empirical")


def rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x - y).norm() / y.norm())


def rows(fit, i: int) -> torch.Tensor:
    return torch.cat([fit.tensors[f"{b.module}.grads"][i] for b in fit.blocks])


# ------------------------------------------------------------------------------------------ sampled targets
def test_an_examples_draws_depend_only_on_the_seed_and_its_id():
    """Example "x" keeps its draws in another batch, at another row, padded to another width, beside other
    examples; another seed draws others. Integers compared exactly: the same uniforms and the same logits give the
    same inverse-CDF draw (a uniform within float64 rounding of a CDF step has probability ~1e-16)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 50, generator=gen, dtype=torch.float64)  # x's 3 response positions, 50 words
    alone = sample_targets(x[None], example_generators(0, ["x"]), 24)[0]
    other = torch.randn(2, 7, 50, generator=gen, dtype=torch.float64)
    batch = torch.cat([other, torch.cat([x, torch.zeros(4, 50, dtype=torch.float64)])[None]])  # x third, width 7
    drawn = sample_targets(batch, example_generators(0, ["a", "b", "x"]), 24)
    assert torch.equal(drawn[2, :3], alone)
    many = torch.stack([sample_targets(x[None], example_generators(s, ["x"]), 24)[0] for s in range(1, 6)])
    assert not all(torch.equal(m, alone) for m in many)  # the seed matters (5 other seeds: not all equal by chance)


def test_sampled_targets_follow_the_softmax():
    """Frequencies of 40,000 draws (one per position of a 40,000-position batch, one generator a row) match the
    softmax within 5 standard errors (√(p(1−p)/n) ≤ 0.0025)."""
    logits = torch.tensor([2.0, 0.0, -1.0, 0.5, -30.0], dtype=torch.float64)
    p = torch.softmax(logits, 0)
    ids = [f"e{i}" for i in range(400)]
    draws = sample_targets(logits.expand(400, 100, 5), example_generators(7, ids), 100)
    freq = torch.bincount(draws.reshape(-1), minlength=5).double() / draws.numel()
    assert (freq - p).abs().max() < 5 * float((p * (1 - p) / draws.numel()).sqrt().max())
    assert freq[4] == 0  # a token of probability e⁻³² is (almost surely) never drawn


def test_a_fit_does_not_depend_on_batching_or_on_the_other_examples():
    """Each example's sampled-target gradient row is the same whatever the batch size and whichever examples are
    fitted beside it. Float64 model: the rows differ only by the rounding of padded attention (~1e-16), where a
    draw keyed by batch position would move a row by O(1)."""
    model, task, examples = tiny_lm(n=14)
    fits = [fit_factors(model, task, ex, ("datainf",), FactorArguments(batch_size=bs))["datainf"]
            for ex, bs in ((examples, 3), (examples, 5), (examples[4:], 4))]
    for i in range(len(examples)):
        assert rel(rows(fits[1], i), rows(fits[0], i)) < 1e-10
        if i >= 4:
            assert rel(rows(fits[2], i - 4), rows(fits[0], i)) < 1e-10


# --------------------------------------------------------------------------------------- eigendecompositions
def test_batched_eigh_equals_one_eigh_a_matrix():
    """Stacks by shape, in chunks (max_bytes forces several): each matrix's eigenvalues equal its own eigh's and
    its eigenvectors diagonalise it (to float64 rounding: the batched and single LAPACK calls are the same
    algorithm, eigenvectors compared through the reconstruction, which is sign-free)."""
    gen = torch.Generator().manual_seed(0)
    mats = {}
    for i, d in enumerate([3, 5, 3, 3, 7, 5]):
        m = torch.randn(d, d, generator=gen, dtype=torch.float64)
        mats[f"m{i}"] = m @ m.T
    dec = batched_eigh(mats, torch.float64, max_bytes=2 * 3 * 3 * 8)
    for k, m in mats.items():
        vals, vecs = dec[k]
        assert rel(vals, torch.linalg.eigvalsh(m)) < 1e-12
        assert rel(vecs @ torch.diag(vals) @ vecs.T, m) < 1e-12


# ------------------------------------------------------------------------------------------- the Gram sketches
def test_nystrom_at_rank_n_is_the_exact_woodbury_fit():
    """Rank F ≤ N, so a rank-N Nyström sketch reproduces F (Tropp et al. 2017): its solve, product and scale equal
    exact Woodbury's up to the shift ν ~ √p·eps·‖Y‖ that keeps its Cholesky factor defined."""
    model, task, examples = tiny_lm(n=12)
    view = ParamView(model)
    exact = fit_factors(model, task, examples, ("woodbury",), FactorArguments(**EMPIRICAL))["woodbury"]
    sketch = fit_factors(model, task, examples, ("woodbury",), FactorArguments(sketch=12, **EMPIRICAL))["woodbury"]
    assert exact.meta["gram"]["method"] == "exact" and sketch.meta["gram"]["method"] == "nystrom"
    assert sketch.meta["gram"]["size"] == 12 and "sketch.U" in sketch.tensors and "gram.U" not in sketch.tensors
    b = gradient(model, task, examples[:2]) / len(examples)
    for lam in (1e-4, 1e-2, 1.0):
        assert rel(sketch.solve(b, lam, view), exact.solve(b, lam, view)) < 1e-7
    assert rel(sketch.matvec(b, view), exact.matvec(b, view)) < 1e-9
    assert abs(sketch.top_eigenvalue() / exact.top_eigenvalue() - 1) < 1e-9


def test_nystrom_below_rank_n_is_within_its_error_bound():
    """At rank k < N: F_k ≼ F (so the nuclear-norm error is tr F − tr F_k) and, by Tropp et al.'s Theorem 4.1,
    E tr(F − F_k) ≤ (1 + r/(k − r − 1)) · (the tail of F's eigenvalues past r) for every r < k − 1; with the fixed
    seed the error is asserted within 3× the best such bound (Markov: a draw exceeds 3× its mean with probability
    ≤ 1/3). Measured here: error / bound printed (`-s`)."""
    model, task, examples = tiny_lm(n=40)
    exact = fit_factors(model, task, examples, ("woodbury",), FactorArguments(**EMPIRICAL))["woodbury"]
    g = torch.cat([exact.tensors[f"{b.module}.grads"] for b in exact.blocks], dim=1)
    f = g.T @ g / len(examples)
    k = 16
    sk = fit_factors(model, task, examples, ("woodbury",), FactorArguments(sketch=k, **EMPIRICAL))["woodbury"]
    u, e = sk.tensors["sketch.U"], sk.tensors["sketch.e"]
    fk = u @ torch.diag(e) @ u.T
    lam = torch.linalg.eigvalsh(f).flip(0)
    assert float(torch.linalg.eigvalsh(f - fk).min()) > -1e-10 * float(lam[0])  # F_k ≼ F
    bound = min((1 + r / (k - r - 1)) * float(lam[r:].sum()) for r in range(k - 2))
    err = float(torch.trace(f - fk))
    print(f"\nNyström rank {k} of N = 40: tr(F − F_k) = {err:.4g}, bound {bound:.4g} (ratio {err / bound:.2f}), "
          f"relative {err / float(lam.sum()):.3f}")
    assert 0 < err <= 3 * bound


def test_the_fit_falls_back_to_a_sketch_when_memory_is_short(monkeypatch, caplog):
    """With room for neither 40 × 128 float64 gradients plus Woodbury's 40 × 40 system (79 KB) but 72 KB usable:
    woodbury takes the largest Nyström rank that fits (40 → 20 → 10), datainf the largest sample of examples
    (40 → 20), the meta and the log say so; the sampled datainf equals an exact datainf fitted on just those
    examples (the rows kept are the right ones, whatever the batches). With no room at all: refused, naming ekfac."""
    model, task, examples = tiny_lm(n=40)
    view = ParamView(model)
    monkeypatch.setattr(resources, "available_bytes", lambda: 90_000)
    with caplog.at_level("WARNING", logger="llmeraser.factors.fit"):
        fits = fit_factors(model, task, examples, ("woodbury", "datainf"), FactorArguments(batch_size=3))
    assert fits["woodbury"].meta["gram"]["method"] == "nystrom" and fits["woodbury"].meta["gram"]["size"] == 10
    assert fits["datainf"].meta["gram"]["method"] == "sampled" and fits["datainf"].meta["gram"]["size"] == 20
    assert "do not fit in memory" in fits["woodbury"].meta["gram"]["why"]
    assert "nystrom sketch of size 10" in caplog.text and "sampled sketch of size 20" in caplog.text
    picked = sorted(torch.randperm(40, generator=torch.Generator().manual_seed(0))[:20].tolist())
    monkeypatch.undo()
    ref = fit_factors(model, task, [examples[i] for i in picked], ("datainf",))["datainf"]
    b = gradient(model, task, examples[:2]) / len(examples)
    assert rel(fits["datainf"].solve(b, 0.1, view), ref.solve(b, 0.1, view)) < 1e-10
    monkeypatch.setattr(resources, "available_bytes", lambda: 1000)
    with pytest.raises(ResourceError, match="--kind ekfac"):
        fit_factors(model, task, examples, ("woodbury",))


def test_the_plan_keeps_gradients_on_the_device_while_they_fit(monkeypatch):
    """A model on a device (the meta device stands in for a GPU: only its type matters to the plan): per-example
    gradients stay there while the device's free memory holds them, go to the host when only the host does."""
    model = torch.nn.Linear(100, 10, device="meta")
    args = FactorArguments()
    monkeypatch.setattr(resources, "available_bytes", lambda: 2**30)
    monkeypatch.setattr(resources, "device_free_bytes", lambda device: 2**30)
    assert plan(model, [1010], ("woodbury",), 100, args).keep == "device"
    monkeypatch.setattr(resources, "device_free_bytes", lambda device: 10_000)
    p = plan(model, [1010], ("woodbury",), 100, args)
    assert p.keep == "host" and p.gram["woodbury"]["method"] == "exact"
    assert plan(model, [1010], ("ekfac",), 100, args).keep == "host"
    assert plan(model, [1010], ("kfac",), 100, args).keep is None


def test_a_device_out_of_memory_is_a_resource_error_naming_the_way_out(monkeypatch):
    model, task, examples = tiny_lm(n=4)

    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr("llmeraser.factors.fit.collect", oom)
    with pytest.raises(ResourceError, match=r"ekfac fit over 4 examples.*did not fit in the device.s memory"):
        fit_factors(model, task, examples, ("ekfac",))


def test_ranks_agree_on_the_most_conservative_plan(monkeypatch):
    """Each rank sees its own free memory, but the collectives follow the plan: exact only where every rank fits
    it, each sketch as small as the tightest rank's. Two ranks simulated: the all-reduce adds the other's votes."""
    from llmeraser.factors import memory

    theirs = []
    monkeypatch.setattr(memory.distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(memory.distributed, "all_reduce", lambda t, what: t + theirs[0])
    other = torch.zeros(1 + 2 * (memory.HALVINGS + 1), dtype=torch.float64)
    # kinds in sorted order (datainf, woodbury): the other rank cannot fit exact, halves each sketch twice
    other[0], other[1 + 2], other[1 + (memory.HALVINGS + 1) + 2] = 1.0, 1.0, 1.0
    theirs.append(other)
    assert memory._agree(True, {"woodbury": 1, "datainf": 3}) == (False, {"woodbury": 2, "datainf": 3})
    theirs[0] = torch.zeros_like(other)
    theirs[0][1], theirs[0][1 + memory.HALVINGS + 1] = 1.0, 1.0
    assert memory._agree(True, {"woodbury": 0, "datainf": 0}) == (True, {"woodbury": 0, "datainf": 0})
