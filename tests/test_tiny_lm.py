"""Acceptance test: unlearning on a tiny causal LM with LoRA, in float64, against retraining warm-started from θ̂.

Setting (shared by both regimes). A word-level tokenizer (26 tokens), `tiny_llama(hidden=16, layers=1)` with its
final RMSNorm gain multiplied by 25 (at the default init, embeddings of std 0.02 give logits of ±0.3, so no LoRA can
fit anything; ×25 gives logits of a few units), LoRA r=2 on q_proj/v_proj: p = 128 trainable parameters, so the
dense Gauss-Newton matrix costs 128 products. 50 training examples "Does the {animal} like {color}" → " Yes"/" No",
the answer set by the color (a rule the model can learn); 2 % of them (one example, `ex0`) is removed. Fine-tuning
and retraining use `finetune(optimizer="lbfgs")` on R(θ) = mean ℓ + (l2/2)‖θ‖² until ‖∇R‖ ≤ 1e-6 or tighter; the
retrained model starts from a copy of θ̂ and is fitted on the set without `ex0`, with the same l2 and tolerance.
The unlearning update is `compute_update(method="newton", curvature="ggn", solver="cg", damping=0)`.

(i) Well-conditioned: l2 = 0.3, rule data. cond(GGN + l2·I) at θ̂ is 71 (asserted ≤ 1e3). Measured (seed 0):
    cosine(Δθ_newton, θ_retrain − θ̂) = 0.951, forget loss 0.2218 → 0.2434 by retraining, → 0.2475 by Newton
    (1.19× retraining's rise); first-order (the paper's update): cosine 0.866, forget loss → 0.2478. Over six
    model seeds the Newton cosine ranges 0.913–0.982 and the rise ratio 0.93–1.32.
(ii) Memorised fact: l2 = 3e-3, the removed example contradicts the rule (a unique fact the model memorises:
    its loss is 0.066 at θ̂). Retraining moves θ by ‖Δ‖ = 1.37 and the forget loss 0.066 → 5.10; Newton on the
    edited objective moves it to 3.56 (cosine 0.886, ‖Δ‖ = 1.73); the first-order update barely moves (→ 0.152,
    ‖Δ‖ = 0.13, 1.7 % of retraining's rise). Only the direction (up) is asserted, for Newton and first-order.

The full numbers, the damping sweep, the exact-Hessian spectrum and the reasoning behind each threshold are in
docs/tiny_lm_results.md; `.venv/bin/python tests/test_tiny_lm.py` reproduces them (the tests do not use that file).

Damping. Both regimes use λ = 0: the curvature operator already contains the objective's own l2·I, and the GGN is
PSD, so GGN + l2·I ⪰ l2·I is positive definite and its solve is well posed without extra damping (the asserted
smallest eigenvalue equals l2). Any λ > 0 is a bias that pulls Δθ towards zero (in (ii) λ = 0.1 cuts Newton's
forget-loss rise from 69 % of retraining's to 5.5 %) and nothing here, short of retraining, could calibrate it.
The exact Hessian is not used: it is singular at θ̂ (smallest eigenvalue −8e-10 in (i), −4e-9 in (ii)), because
the rotation symmetry (A, B) → (QA, BQᵀ) of a rank-2 LoRA pair leaves both the loss and ‖θ‖² unchanged, so l2
does not condition it.

Threads: the model is so small that torch's intra-op threading only adds overhead (in one measurement a forward and
backward of 50 examples took 0.32 s with 2 threads next to another busy process, 0.013 s with 1), so the module
runs with one thread and restores the setting afterwards; one thread also fixes every reduction order, hence every
number.
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

import pytest
import torch
from fixtures.tiny import tiny_llama, tiny_lora
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from llmeraser.curvature import CurvatureOperator, gradient
from llmeraser.data import Example
from llmeraser.eraser import EraserArguments, Update, compute_update
from llmeraser.finetune import FinetuneArguments, FinetuneResult, finetune
from llmeraser.params import ParamView
from llmeraser.request import Request, apply_request
from llmeraser.solvers.api import solver_arguments
from llmeraser.task import CausalLMTask, per_example_loss

ANIMALS = ["cat", "dog", "fox", "owl", "bee", "cow", "eel", "yak", "ant", "bat"]
COLORS = ["red", "blue", "green", "black", "white", "gold"]
YES_COLORS = {"red", "green", "white"}  # the rule: the answer depends on the color only

N_TRAIN = 50
FORGET_IDS = ("ex0",)  # 1 of 50 = 2 %
SEED = 0
NORM_GAIN = 25.0  # logit scale: the final RMSNorm gain (see the module docstring)
LORA_RANK = 2
L2_WELL = 0.3  # regime (i): cond(GGN + l2·I) ≈ 71
L2_MEMO = 3e-3  # regime (ii): small enough that the exception is memorised (loss 0.066)
GRAD_TOL = {"well": 1e-7, "memo": 1e-6}  # L-BFGS stopping rule; both satisfy the required ‖∇R‖ ≤ 1e-6
MAX_LBFGS = 200  # outer L-BFGS iterations (×20 inner); measured: (i) 3 + 2, (ii) 9 + 5
CG_TOL = 1e-10  # relative residual of the Newton solve: far below any effect measured here


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the fact vocabulary (26 tokens: a small softmax keeps the model cheap)."""
    # "pink" is used by no example (an extra softmax competitor); it is kept because the measured numbers were
    # recorded with this 26-token vocabulary, and the vocabulary size changes the random initialisation.
    words = ["<pad>", "<s>", "</s>", "Does", "the", "like", "Yes", "No", "?", *ANIMALS, *COLORS, "pink"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def fact_examples(n: int, *, exception: bool, seed: int = SEED) -> list[Example]:
    """n distinct (animal, color) facts answered by the color rule; with `exception`, `ex0` contradicts the rule.

    The prompt ends with the color, so the rule is readable at the position that predicts the answer; the
    exception needs the (animal, color) pair, i.e. memorisation of that one example.
    """
    pairs = [(a, c) for a in ANIMALS for c in COLORS]
    random.Random(seed).shuffle(pairs)
    out = []
    for i, (animal, color) in enumerate(pairs[:n]):
        yes = (color in YES_COLORS) != (exception and i == 0)
        out.append(Example(id=f"ex{i}", prompt=f"Does the {animal} like {color}", response=" Yes" if yes else " No"))
    return out


def lora_model(vocab_size: int, seed: int = SEED) -> torch.nn.Module:
    base = tiny_llama(vocab_size, hidden=16, layers=1, seed=seed)
    with torch.no_grad():
        base.model.norm.weight.mul_(NORM_GAIN)
    return tiny_lora(base, r=LORA_RANK, targets=("q_proj", "v_proj"), seed=seed)


def mean_loss(task: CausalLMTask, model: torch.nn.Module, examples: Sequence[Example]) -> float:
    with torch.no_grad():
        return float(per_example_loss(task, model, task.collate(examples)).mean())


def loss_at(task: CausalLMTask, model: torch.nn.Module, examples: Sequence[Example], theta: torch.Tensor) -> float:
    """Mean loss of `examples` with the trainable parameters set to `theta` (the model is restored afterwards)."""
    view = ParamView(model)
    saved = view.vector()
    view.set_vector(theta)
    try:
        return mean_loss(task, model, examples)
    finally:
        view.set_vector(saved)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.dot(a, b) / (a.norm() * b.norm()))


@dataclass
class Step:
    """One way of moving θ̂ (retraining or an unlearning update) and what it does to the forget set."""

    delta: torch.Tensor
    forget_loss: float
    cosine: float = 1.0  # with the retraining displacement
    update: Update | None = None


@dataclass
class Regime:
    name: str
    l2: float
    train: list[Example]
    forget: list[Example]
    task: CausalLMTask
    model: torch.nn.Module  # at θ̂
    theta: torch.Tensor
    base_loss: float  # mean train loss before fine-tuning
    fit: FinetuneResult
    refit: FinetuneResult
    forget_loss: float  # at θ̂
    retrain: Step
    seconds: dict[str, float]
    newton: Step | None = None  # the updates, filled in by `run_regime`
    first_order: Step | None = None

    @property
    def request(self) -> Request:
        return Request.remove(*(e.id for e in self.forget))

    def unlearn(self, method: str, damping: float = 0.0) -> Step:
        args = EraserArguments(method=method, solver="cg", curvature="ggn", l2=self.l2, damping=damping,
                               batch_size=N_TRAIN, solver_args=solver_arguments("cg", tol=CG_TOL, max_iters=2000))
        update = compute_update(self.model, self.task, self.train, self.request, args)
        return Step(update.delta, loss_at(self.task, self.model, self.forget, self.theta + update.delta),
                    cosine(update.delta, self.retrain.delta), update)


def run_regime(name: str, seed: int = SEED) -> Regime:
    """Fine-tune to a stationary point, retrain without the forget set from θ̂, and compute both updates.

    `seed` seeds the model's initialisation (base weights and LoRA); the data are the same for every seed.
    """
    exception, l2 = {"well": (False, L2_WELL), "memo": (True, L2_MEMO)}[name]
    seconds = {}
    task = CausalLMTask(word_tokenizer(), max_length=16)
    train = fact_examples(N_TRAIN, exception=exception)
    forget = [e for e in train if e.id in FORGET_IDS]
    model = lora_model(len(task.tokenizer), seed=seed)
    base_loss = mean_loss(task, model, train)
    args = FinetuneArguments(optimizer="lbfgs", l2=l2, grad_tol=GRAD_TOL[name], max_iters=MAX_LBFGS,
                             batch_size=N_TRAIN)
    start = time.perf_counter()
    fit = finetune(model, task, train, args)
    seconds["finetune"] = time.perf_counter() - start
    theta = ParamView(model).vector()
    retrained = copy.deepcopy(model)  # warm start from θ̂
    start = time.perf_counter()
    refit = finetune(retrained, task, apply_request(train, Request.remove(*FORGET_IDS)), args)
    seconds["retrain"] = time.perf_counter() - start
    d_retrain = ParamView(retrained).vector() - theta
    regime = Regime(name, l2, train, forget, task, model, theta, base_loss, fit, refit,
                    forget_loss=mean_loss(task, model, forget),
                    retrain=Step(d_retrain, loss_at(task, model, forget, theta + d_retrain)), seconds=seconds)
    start = time.perf_counter()
    regime.newton = regime.unlearn("newton")
    seconds["newton"] = time.perf_counter() - start
    start = time.perf_counter()
    regime.first_order = regime.unlearn("first-order")
    seconds["first_order"] = time.perf_counter() - start
    return regime


@pytest.fixture(scope="module")
def well(one_thread) -> Regime:
    return run_regime("well")


@pytest.fixture(scope="module")
def memo(one_thread) -> Regime:
    return run_regime("memo")


def ggn_spectrum(regime: Regime) -> torch.Tensor:
    """Eigenvalues (ascending) of GGN + l2·I over the training set at θ̂ (the operator includes l2)."""
    op = CurvatureOperator(regime.model, regime.task, regime.train, kind="ggn", l2=regime.l2, batch_size=N_TRAIN)
    return torch.linalg.eigvalsh(op.dense())


@pytest.mark.parametrize("name", ["well", "memo"])
def test_fine_tuning_and_retraining_reach_stationary_points(name, request):
    regime: Regime = request.getfixturevalue(name)
    assert len(regime.forget) / len(regime.train) == 0.02
    assert regime.fit.grad_norm <= 1e-6
    assert regime.refit.grad_norm <= 1e-6
    # The fine-tuned adapter learned the data (base loss ≈ 7 nats; measured (i) 0.30, (ii) 0.036), so θ̂ is a
    # fitted model, not the all-zero adapter a large l2 could collapse to (in (i) the q_proj pair does go to
    # A = B = 0 and v_proj carries the fit).
    assert mean_loss(regime.task, regime.model, regime.train) < 0.5 * regime.base_loss
    assert float(regime.theta.norm()) > 0.1
    # Each solve converged: Δθ is the update the method defines, not a truncated iteration.
    for step in (regime.newton, regime.first_order):
        assert step.update.solve.converged, step.update.solve.diagnostics()


def test_well_conditioned_gauss_newton(well):
    eigenvalues = ggn_spectrum(well)
    # The GGN is PSD, so the smallest eigenvalue of GGN + l2·I is l2 up to rounding (~1e-14 on entries ≤ 21).
    assert float(eigenvalues[0]) >= well.l2 * (1 - 1e-9)
    # Measured 71 (largest 21.3 / smallest 0.3); the criterion is ≤ 1e3.
    assert float(eigenvalues[-1] / eigenvalues[0]) <= 1e3


def test_well_conditioned_newton_matches_retraining(well):
    # Measured 0.951 (0.913–0.982 over six model seeds). The threshold discriminates: the first-order update
    # scores 0.866 and an undamped Newton step with the exact Hessian 0.529 (docs/tiny_lm_results.md). The gap to 1
    # is mostly the residual term the GGN leaves out: at a stationary point the data gradient of a LoRA pair
    # balances l2·θ, and through the A·B cross derivative the same gradient forms a Hessian term of size l2, as
    # large as the smallest eigenvalues of GGN + l2·I. Retraining moves θ by only 0.022, so the quadratic model of
    # R′ itself is accurate here.
    assert well.newton.cosine >= 0.9
    rise_retrain = well.retrain.forget_loss - well.forget_loss
    rise_newton = well.newton.forget_loss - well.forget_loss
    # Retraining without ex0 raises its loss by 0.0216 (far above the ~1e-7 that the stopping tolerance leaves in
    # θ); a rise below 1e-3 would make the comparison vacuous.
    assert rise_retrain > 1e-3
    # Same way, by at least half as much (measured ratio 1.19).
    assert rise_newton * rise_retrain > 0
    assert abs(rise_newton) >= 0.5 * abs(rise_retrain)


def test_memorised_fact_forget_loss_moves_up_like_retraining(memo):
    # The premise of the regime: the removed example is a fact the model fits almost exactly (measured loss 0.066,
    # p(answer) = 0.94) and that retraining without it forgets (measured 0.066 → 5.10, ‖Δ‖ = 1.37: far outside
    # the region where one quadratic model of R holds).
    assert memo.forget_loss < 0.1
    assert memo.retrain.forget_loss > memo.forget_loss + 1.0
    # Asserted: only the direction of the forget-set loss. Measured: Newton 0.066 → 3.56 (cosine 0.89),
    # first-order 0.066 → 0.152 (cosine 0.71) — see docs/tiny_lm_results.md for the damping sweep.
    assert memo.newton.forget_loss > memo.forget_loss
    assert memo.first_order.forget_loss > memo.forget_loss


# ------------------------------------------------------------------------------------------------------------------
# `.venv/bin/python tests/test_tiny_lm.py` prints the numbers recorded in docs/tiny_lm_results.md (not used by tests).


def _report(regime: Regime, dampings: Sequence[float]) -> list[str]:
    eig = ggn_spectrum(regime)
    hess = CurvatureOperator(regime.model, regime.task, regime.train, kind="hessian", l2=regime.l2,
                             batch_size=N_TRAIN)
    eig_h = torch.linalg.eigvalsh(hess.dense())
    view = ParamView(regime.model)
    g_forget = gradient(regime.model, regime.task, regime.forget).norm()
    g_all = torch.stack([gradient(regime.model, regime.task, [e]).norm() for e in regime.train])
    with torch.no_grad():
        train_losses = per_example_loss(regime.task, regime.model, regime.task.collate(regime.train))
    f0 = regime.forget_loss
    rise = regime.retrain.forget_loss - f0
    lines = [
        f"### regime {regime.name}: l2 = {regime.l2:g}",
        "",
        f"- p = {view.dim} LoRA parameters, n = {len(regime.train)}, removed {len(regime.forget)}; "
        f"mean train loss {regime.base_loss:.3f} (base) → {float(train_losses.mean()):.4f} at θ̂ "
        f"(max {float(train_losses.max()):.4f}); ‖θ̂‖ = {float(regime.theta.norm()):.3f}",
        f"- ‖∇R(θ̂)‖ = {regime.fit.grad_norm:.2e} ({regime.fit.steps} L-BFGS steps, "
        f"{regime.seconds['finetune']:.1f} s); retraining ‖∇R′‖ = {regime.refit.grad_norm:.2e} "
        f"({regime.refit.steps} steps, {regime.seconds['retrain']:.1f} s)",
        f"- GGN + l2·I over the training set: eigenvalues {float(eig[0]):.4g} … {float(eig[-1]):.4g}, "
        f"cond {float(eig[-1] / eig[0]):.4g}",
        f"- exact Hessian of R (includes l2·I): smallest eigenvalues {', '.join(f'{float(v):.3g}' for v in eig_h[:4])}"
        f" … largest {float(eig_h[-1]):.4g}",
        f"- ‖∇ℓ(forget; θ̂)‖ = {float(g_forget):.4g}; per-example ‖∇ℓᵢ‖ over the training set: median "
        f"{float(g_all.median()):.4g}, max {float(g_all.max()):.4g}",
        "",
        "| Δθ from | damping | ‖Δθ‖ | cosine with retraining | forget loss | rise / retraining's rise |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| (θ̂) | | 0 | | {f0:.4f} | |",
        f"| retraining (warm from θ̂) | | {float(regime.retrain.delta.norm()):.4g} | 1 | "
        f"{regime.retrain.forget_loss:.4f} | 1 |",
    ]
    for method in ("newton", "first-order"):
        for damping in dampings:
            step = regime.unlearn(method, damping)
            lines.append(f"| {method}, GGN | {damping:g} | {float(step.delta.norm()):.4g} | {step.cosine:.3f} | "
                         f"{step.forget_loss:.4f} | {(step.forget_loss - f0) / rise:.3f} |")
    try:
        args = EraserArguments(method="newton", solver="dense", curvature="hessian", l2=regime.l2, damping=0.0,
                               batch_size=N_TRAIN)
        update = compute_update(regime.model, regime.task, regime.train, regime.request, args)
        loss = loss_at(regime.task, regime.model, regime.forget, regime.theta + update.delta)
        lines.append(f"| newton, exact Hessian | 0 | {float(update.delta.norm()):.4g} | "
                     f"{cosine(update.delta, regime.retrain.delta):.3f} | {loss:.4f} | {(loss - f0) / rise:.3f} |")
    except Exception as e:  # noqa: BLE001 - a failed exact-Hessian solve is itself a result worth reporting
        lines.append(f"| newton, exact Hessian | 0 | failed: {type(e).__name__}: {e} | | | |")
    return [*lines, ""]


def _summary(regime: Regime, seed: int) -> str:
    eig = ggn_spectrum(regime)
    f0, rise = regime.forget_loss, regime.retrain.forget_loss - regime.forget_loss
    return (f"| {regime.name} | {seed} | {float(eig[-1] / eig[0]):.4g} | {f0:.4f} | {regime.retrain.forget_loss:.4f} | "
            f"{regime.newton.forget_loss:.4f} ({(regime.newton.forget_loss - f0) / rise:.2f}) | "
            f"{regime.first_order.forget_loss:.4f} ({(regime.first_order.forget_loss - f0) / rise:.2f}) | "
            f"{regime.newton.cosine:.3f} | {regime.first_order.cosine:.3f} |")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Print the numbers of docs/tiny_lm_results.md.")
    parser.add_argument("--seeds", type=int, nargs="*", default=[],
                        help="also summarise these model seeds (the data stay the same)")
    cli = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    out = []
    for name in ("well", "memo"):
        regime = run_regime(name)
        seconds = ", ".join(f"{k} {v:.1f} s" for k, v in regime.seconds.items())
        out += _report(regime, (0.0, 1e-3, 1e-2, 1e-1))
        out.append(f"(times: {seconds})\n")
    if cli.seeds:
        out += ["| regime | seed | cond(GGN + l2·I) | forget loss at θ̂ | retrained | newton (share of rise) | "
                "first-order (share) | cos newton | cos first-order |", "| --- " * 9 + "|"]
        out += [_summary(run_regime(name, seed), seed) for seed in cli.seeds for name in ("well", "memo")]
    print("\n".join(out))
    print(f"\ntotal {time.perf_counter() - start:.1f} s")
