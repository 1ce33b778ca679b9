"""llmeraser_experiments.peers.kronfluence: kronfluence 1.0.1's EK-FAC on a tiny LoRA causal LM, against our exact
dense GGN solve.

Setting: `tiny_llama(hidden=16, layers=1, init_std=0.3)` in float64, LoRA r=2 on q_proj/v_proj (p = 128: four
blocks, A (2, 16) and B (16, 2) per projection), 24 examples whose responses have 2 to 14 tokens (so a per-token
vs per-example scaling error shows), b = the mean gradient of 4 of them, H = CurvatureOperator(kind="ggn").dense()
(H = (1/N) Σᵢ GGN(ℓᵢ)) and the reference x = solve("dense", H, b, λ).

Checks, strongest first:
- empirical Fisher: kronfluence's Λ/N equals diag((Q_S ⊗ Q_A)ᵀ F_emp (Q_S ⊗ Q_A)) per block to rounding (measured
  ~1e-16 relative), F_emp = (1/N) Σᵢ ∇ℓᵢ∇ℓᵢᵀ from our own per-example gradients: this pins the module → parameter
  name mapping, the (out, in) orientation and the 1/N normalisation with no Monte Carlo noise.
- kronfluence_solve equals kronfluence's own preconditioner (compute_pairwise_scores with damping_factor = λ) to
  rounding (measured 3e-16).
- true Fisher (8 label draws per example): trace(Λ/N) / trace(H_block) per block is 1 up to Monte Carlo noise
  (measured 0.93-1.09; 0.97-1.02 with 64 draws on a similar set). Fitted the two wrong ways on these data it is
  0.15-0.20 (our mean loss with sampled labels: GGN/rᵢ) and 8.7-10.8 (kronfluence's summed-token LM loss: rᵢ·GGN).
- against the dense solve at λ = 0.1·mean diag(H) (kronfluence's heuristic scale, 0.0106 here): measured cosine
  0.72 and ‖x_kf‖/‖x_dense‖ 1.02. What is lost is EK-FAC's Kronecker eigenbasis, not label sampling: the same
  basis with the exact diagonal diag(Qᵀ H Q) gives cosine 0.73 (and 0.996 with x_kf), an exact block-diagonal
  solve 0.88. The bounds (cosine ≥ 0.55, norm ratio in [0.7, 1.4]) reject every corruption tried: q/v factors
  swapped (cosine 0.42, ratio 1.96), Λ not divided by N (ratio 0.07), Λ on the summed-token scale (ratio 0.18) or
  on the mean-loss scale (ratio 2.65).
- linearity in b, (F_ekfac + λI) x = b, and the model (values, requires_grad, modules, modes, .grad) unchanged.
"""

from __future__ import annotations

import dataclasses
import random
import time

import pytest
import torch

from llmeraser.curvature import CurvatureOperator, gradient, per_example_gradients
from llmeraser.data import Example
from llmeraser.params import ParamView
from llmeraser.solvers.api import solve
from llmeraser.solvers.base import MatrixOperator
from llmeraser.task import CausalLMTask
from llmeraser.testing import ANIMALS, COLORS, tiny_llama, tiny_lora, tiny_tokenizer

pytest.importorskip("kronfluence")
from llmeraser_experiments.peers import kronfluence as kp  # noqa: E402

N = 24
LABEL_SAMPLES = 8
DAMPING_SCALE = 0.1  # λ = 0.1·mean diag(H), kronfluence's heuristic damping scale
MEASURED = {"cosine": 0.72, "norm_ratio": 1.02}  # seed 0, for reference; the asserts use the bounds below
MIN_COSINE = 0.55
NORM_RATIO = (0.7, 1.4)


def examples() -> list[Example]:
    rng = random.Random(0)
    out = []
    for i in range(N):
        a, c = rng.choice(ANIMALS), rng.choice(COLORS)
        response = [" No.", " Yes, it does.", " No, it does not.", f" Yes. The {a} likes {c}."][i % 4]
        out.append(Example(id=f"ex{i}", prompt=f"Does the {a} like {c}?", response=response))
    return out


def snapshot(model: torch.nn.Module) -> dict:
    return {"params": {n: (p.detach().clone(), p.requires_grad, p.grad) for n, p in model.named_parameters()},
            "modules": {n: (type(m), m.training) for n, m in model.named_modules()}}


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.dot(a, b) / (a.norm() * b.norm()))


def blocks(view: ParamView, factors) -> dict[str, tuple[slice, torch.Tensor]]:
    """module → (its slice of θ, the EK-FAC basis Q_S ⊗ Q_A acting on the row-major (out, in) weight)."""
    out, offset = {}, 0
    starts = {}
    for name, n in zip(view.names, view.numels, strict=True):
        starts[name] = slice(offset, offset + n)
        offset += n
    for m in factors.modules:
        q = torch.kron(factors.gradient_eigenvectors[m].double(), factors.activation_eigenvectors[m].double())
        out[m] = (starts[f"{m}.weight"], q)
    return out


def exact_diagonal(view: ParamView, factors, matrix: torch.Tensor) -> dict[str, torch.Tensor]:
    """diag(Qᵀ M_block Q) per module, shaped like Λ."""
    return {m: torch.diagonal(q.T @ matrix[s, s] @ q).reshape(factors.lambda_matrix[m].shape)
            for m, (s, q) in blocks(view, factors).items()}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    start = time.perf_counter()
    task = CausalLMTask(tiny_tokenizer(), max_length=32)
    train = examples()
    model = tiny_lora(tiny_llama(len(task.tokenizer), hidden=16, layers=1, seed=0, init_std=0.3), r=2, seed=0)
    before = snapshot(model)
    view = ParamView(model)
    hessian = CurvatureOperator(model, task, train, kind="ggn", batch_size=8).dense()
    grads = per_example_gradients(model, task, train)
    tmp = tmp_path_factory.mktemp("kronfluence")
    sampled = kp.fit_kronfluence(model, task, train, workdir=tmp / "true", batch_size=8, seed=0,
                                 label_samples=LABEL_SAMPLES)
    empirical = kp.fit_kronfluence(model, task, train, workdir=tmp / "emp", empirical_fisher=True)
    files = sorted(p.name for p in (tmp / "emp").rglob("*.safetensors"))
    print(f"\nsetup {time.perf_counter() - start:.1f}s; kronfluence phases (s): "
          + ", ".join(f"{k} {v:.2f}" for k, v in sampled.seconds.items()))
    return dict(task=task, train=train, model=model, before=before, view=view, H=hessian, grads=grads,
                sampled=sampled, empirical=empirical, files=files,
                b=gradient(model, task, train[:4]) / 4, damping=DAMPING_SCALE * float(hessian.diagonal().mean()))


def test_factors_cover_the_lora_modules(setup):
    view, f = setup["view"], setup["sampled"]
    assert [f"{m}.weight" for m in f.modules] == view.names  # names map one to one, in ParamView order
    for m in f.modules:
        out, inn = view.named()[f"{m}.weight"].shape
        assert f.lambda_matrix[m].shape == (out, inn)
        assert f.activation_eigenvectors[m].shape == (inn, inn) and f.gradient_eigenvectors[m].shape == (out, out)
    assert f.num_examples == N and f.label_samples == LABEL_SAMPLES
    assert set(f.seconds) == {"covariance", "eigendecomposition", "lambda", "total"}
    assert "lambda_matrix.safetensors" in setup["files"] and "activation_eigenvectors.safetensors" in setup["files"]


def assert_unchanged(setup):
    before, after = setup["before"], snapshot(setup["model"])
    assert before["modules"] == after["modules"]  # no TrackedModule left behind, same train/eval modes
    assert before["params"].keys() == after["params"].keys()
    for name, (value, requires_grad, grad) in before["params"].items():
        v, r, g = after["params"][name]
        assert torch.equal(value, v) and requires_grad == r and grad is g, name


def test_model_unchanged(setup):
    assert_unchanged(setup)


def test_empirical_fisher_lambda_is_exact(setup):
    """Λ/N of the empirical Fisher equals the diagonal of our F_emp in kronfluence's basis, to rounding."""
    view, f, g = setup["view"], setup["empirical"], setup["grads"]
    exact = exact_diagonal(view, f, g.T @ g / N)
    for m in f.modules:
        err = float((f.lambda_matrix[m] - exact[m]).abs().max() / exact[m].abs().max())
        print(f"{m.split('layers.')[1]}: max rel err {err:.1e}")
        assert err < 1e-9, m


def test_true_fisher_lambda_on_ggn_scale(setup):
    """The sampled Λ/N estimates the EK-FAC diagonal of H = (1/N) Σ GGN(ℓᵢ) with scale 1 (Monte Carlo noise only)."""
    view, f, h = setup["view"], setup["sampled"], setup["H"]
    for m, (s, _) in blocks(view, f).items():
        ratio = float(f.lambda_matrix[m].sum() / h[s, s].trace())
        print(f"{m.split('layers.')[1]}: trace(Λ/N)/trace(H_block) {ratio:.3f}")
        assert 0.75 < ratio < 1.33, m


def test_solve_matches_kronfluence_preconditioner(setup):
    """kronfluence_solve(∇ℓ_q)ᵀ∇ℓ_t equals kronfluence's pairwise score with damping_factor = λ."""
    from kronfluence.analyzer import Analyzer
    from kronfluence.arguments import ScoreArguments
    from kronfluence.utils.dataset import DataLoaderKwargs

    model, task, train, f, g, lam = (setup[k] for k in ("model", "task", "train", "empirical", "grads", "damping"))
    peer = kp.PeerTask(task, f.modules)
    args = ScoreArguments(damping_factor=lam, per_sample_gradient_dtype=torch.float64,
                          precondition_dtype=torch.float64, score_dtype=torch.float64)
    with kp._quiet(), kp._prepared(model, peer) as prepared:  # reads the factors fit_kronfluence left in workdir
        analyzer = Analyzer(analysis_name=kp.ANALYSIS_NAME, model=prepared, task=peer, cpu=True,
                            disable_tqdm=True, output_dir=str(f.workdir))
        analyzer.compute_pairwise_scores(
            scores_name="check", factors_name=kp.FACTORS_NAME, query_dataset=kp._Examples(train[:3]),
            train_dataset=kp._Examples(train), per_device_query_batch_size=3, per_device_train_batch_size=8,
            dataloader_kwargs=DataLoaderKwargs(collate_fn=task.collate), score_args=args, overwrite_output_dir=True)
        scores = analyzer.load_pairwise_scores("check")["all_modules"]
    ours = torch.stack([kp.kronfluence_solve(f, model, g[q], lam) for q in range(3)]) @ g.T
    err = float((scores.double() - ours).abs().max() / ours.abs().max())
    print(f"kronfluence pairwise scores vs kronfluence_solve: max rel err {err:.1e}")
    assert err < 1e-9
    assert_unchanged(setup)


def test_against_dense_ggn_solve(setup):
    view, f, h, b, lam, model = (setup[k] for k in ("view", "sampled", "H", "b", "damping", "model"))
    x_dense = solve("dense", MatrixOperator(h), b, lam).x
    x_kf = kp.kronfluence_solve(f, model, b, lam)
    cos, ratio = cosine(x_kf, x_dense), float(x_kf.norm() / x_dense.norm())
    # the same Kronecker basis with the exact diagonal of H: isolates the label-sampling noise in Λ
    ideal = dataclasses.replace(f, lambda_matrix=exact_diagonal(view, f, h))
    x_ideal = kp.kronfluence_solve(ideal, model, b, lam)
    print(f"λ = {lam:.4f}: cosine(x_kf, x_dense) {cos:.3f}, ‖x_kf‖/‖x_dense‖ {ratio:.3f}; "
          f"exact-diagonal EK-FAC: cosine {cosine(x_ideal, x_dense):.3f}, cosine(x_kf, x_ideal) "
          f"{cosine(x_kf, x_ideal):.3f}")
    assert cos >= MIN_COSINE and NORM_RATIO[0] <= ratio <= NORM_RATIO[1]
    assert cosine(x_kf, x_ideal) >= 0.97

    # the bounds reject wrong name mappings and wrong scales
    mods = f.modules
    swap = dict(zip(mods, [mods[2], mods[3], mods[0], mods[1]], strict=True))  # q_proj ↔ v_proj
    r = torch.tensor([float((setup["task"].collate([e])["targets"] != -100).sum()) for e in setup["train"]])
    corrupt = {
        "q/v swapped": dataclasses.replace(
            f, activation_eigenvectors={m: f.activation_eigenvectors[swap[m]] for m in mods},
            gradient_eigenvectors={m: f.gradient_eigenvectors[swap[m]] for m in mods},
            lambda_matrix={m: f.lambda_matrix[swap[m]] for m in mods}),
        "Λ not divided by N": dataclasses.replace(f, lambda_matrix={m: v * N for m, v in f.lambda_matrix.items()}),
        "summed-token scale": dataclasses.replace(
            f, lambda_matrix={m: v * float(r.mean()) for m, v in f.lambda_matrix.items()}),
        "mean-loss scale": dataclasses.replace(
            f, lambda_matrix={m: v * float((1 / r).mean()) for m, v in f.lambda_matrix.items()}),
    }
    for name, bad in corrupt.items():
        x = kp.kronfluence_solve(bad, model, b, lam)
        c, q = cosine(x, x_dense), float(x.norm() / x_dense.norm())
        print(f"  {name}: cosine {c:.3f}, norm ratio {q:.3f}")
        assert not (c >= MIN_COSINE and NORM_RATIO[0] <= q <= NORM_RATIO[1]), name


def test_linear_and_inverts_the_ekfac_operator(setup):
    f, model, lam, g = (setup[k] for k in ("sampled", "model", "damping", "grads"))
    b1, b2 = g[0], g[5]
    x1, x2 = kp.kronfluence_solve(f, model, b1, lam), kp.kronfluence_solve(f, model, b2, lam)
    x12 = kp.kronfluence_solve(f, model, 2.0 * b1 - 3.0 * b2, lam)
    assert torch.allclose(x12, 2.0 * x1 - 3.0 * x2, rtol=1e-10, atol=1e-12 * float(x12.abs().max()))
    back = kp.kronfluence_matvec(f, model, x1) + lam * x1
    assert float((back - b1).norm() / b1.norm()) < 1e-10
    assert x1.dtype == b1.dtype and x1.shape == b1.shape
    with pytest.raises(ValueError):
        kp.kronfluence_solve(f, model, b1, -1.0)
