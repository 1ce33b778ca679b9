"""Data parallelism on torch.distributed: 2 CPU processes (gloo, launched with torchrun) give the single-process
results; a rank that dies or stops answering fails the run cleanly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from dist_worker import RIDGE, ridge_data
from fixtures.tiny import fact_examples, save_tiny_base
from safetensors.torch import load_file

from llmeraser import distributed
from llmeraser.cli import main
from llmeraser.data import save_examples

HERE = Path(__file__).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def torchrun(*args: str, nproc: int = 2, env: dict | None = None, timeout: float = 600):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env={**ENV, **(env or {})}, timeout=timeout)


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_batches_are_the_single_process_batches_shared_out(monkeypatch, world):
    n, b = 29, 4
    seen = []
    for r in range(world):
        monkeypatch.setattr(distributed, "world_size", lambda w=world: w)
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        mine = distributed.batches(n, b)
        covered = distributed.batch_range(n, b)
        assert [i for batch in mine for i in batch] == list(covered)
        seen += mine
    assert seen == [list(range(i, min(n, i + b))) for i in range(0, n, b)]  # every batch once, in order


def test_two_gloo_processes_give_the_single_process_results(tmp_path):
    """Δθ of every solver for each of the three ops, per-example gradients, K-FAC/EK-FAC/Woodbury/DataInf fits and
    fine-tunes (tests/dist_worker.py, float64), with 2 ranks vs 1 process. Each batch's result is the same bit for
    bit (the ranks share out the single-process batches); only the order of the final sums differs, by rounding
    (≲ 1e-15 relative), and every compared result is a function of those sums with a bounded sensitivity:
    - direct computations (gradients, dense, fitted factors, R(θ₀) of the L-BFGS closure) and fixed-length linear
      recursions (lissa, sqp, paper: 30 steps), and Adam (steps Lipschitz in the gradient, ≤ lr/ε): measured ≤ 8e-15;
    - CG and newton-CG run to relative residual 1e-13 (asserted by the worker): for H = GGN + λI ⪰ λI,
      ‖x_a − x_b‖ ≤ (‖r_a‖ + ‖r_b‖)/λ ≤ (2e-13 + 2κ·eps)·‖b‖/λ ≈ 1.2e-11 with ‖b‖ ≤ 2.3, λ = 0.05, κ ≈ 154 (measured);
    all within 1e-10·max(1, max|x|). Not compared, because nothing bounds the gap: an unconverged CG (its iterates
    amplify rounding), and L-BFGS's iterates on the non-convex LM (its strong-Wolfe line search turns rounding into
    other trial steps: 5e-5 after 3 iterations on one CPU). L-BFGS's sharded path is checked instead on a strongly
    convex ridge problem run to a gradient tolerance, against the closed-form gradient."""
    single, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    proc = subprocess.Popen([sys.executable, str(HERE / "dist_worker.py"), str(single)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    run = torchrun(str(HERE / "dist_worker.py"), str(two))
    assert proc.wait(timeout=600) == 0, proc.stderr.read()[-3000:]
    assert run.returncode == 0, run.stderr[-3000:]
    a, b = load_file(single), load_file(two)
    assert set(a) == set(b) and len(a) == 36
    ops = {k.split("/")[0] for k in a if "/" in k}
    assert ops == {"remove", "modify_query", "correct_response"}
    ridge = "finetune-lbfgs-ridge"
    for key in a:
        assert a[key].abs().max() > 0, key
        if key != ridge:
            assert (a[key] - b[key]).abs().max() <= 1e-10 * max(1.0, float(a[key].abs().max())), key
    # Ridge: R(w) = (1/n) Σ ½(xᵢᵀw − yᵢ)² + (l2/2)‖w‖² is μ-strongly convex with μ = λ_min(XᵀX/n) + l2, so
    # ‖w − w*‖ ≤ ‖∇R(w)‖/μ for any w, hence ‖w_a − w_b‖ ≤ (‖∇R(w_a)‖ + ‖∇R(w_b)‖)/μ. ∇R is computed here in closed form
    # over all n examples: if the ranks' gradients were not all added up (or l2 were added per rank), the 2-rank
    # run would stop at the minimiser of another objective and its ‖∇R‖ here would be of order 1.
    x, y = ridge_data()
    n, l2 = RIDGE["n"], RIDGE["l2"]
    mu = float(torch.linalg.eigvalsh(x.T @ x / n)[0]) + l2
    grads = [float((x.T @ (x @ w - y) / n + l2 * w).norm()) for w in (a[ridge], b[ridge])]
    slack = 1e-12  # rounding of the closed-form gradient (5 sums of 29 float64 terms ≲ 5)
    assert all(g <= RIDGE["grad_tol"] + slack for g in grads), grads
    assert float((a[ridge] - b[ridge]).norm()) <= (sum(grads) + 2 * slack) / mu
    assert float((a[ridge] - b[ridge]).norm()) <= 2 * (RIDGE["grad_tol"] + slack) / mu  # ≈ 6e-7 vs ‖w‖ ≈ 1


@pytest.fixture(scope="module")
def lineage(tmp_path_factory):
    """A tiny base model folder, 23 training examples, a fine-tuned adapter (single process) and a request."""
    root = tmp_path_factory.mktemp("dist")
    save_tiny_base(root / "base")
    save_examples(fact_examples(23, seed=1), root / "train.jsonl")
    (root / "request.json").write_text(json.dumps({"edits": [
        {"op": "remove", "id": "ex0"}, {"op": "modify_query", "id": "ex4", "prompt": "Does the owl like red?"},
        {"op": "correct_response", "id": "ex7", "response": " Maybe"}]}))
    common = ["--base-model", str(root / "base"), "--train", str(root / "train.jsonl"), "--dtype", "float64"]
    assert main(["finetune", *common, "--out", str(root / "ft"), "--epochs", "2", "--lr", "1e-2", "--batch-size", "4",
                 "--lora-r", "2", "--lora-targets", "q_proj,v_proj", "--max-length", "24", "--quiet"]) == 0
    return root, common


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def _unlearn(root: Path, common: list[str], out: Path, *extra: str) -> list[str]:
    return ["unlearn", *common, "--adapter", str(root / "ft"), "--request", str(root / "request.json"),
            "--out", str(out), "--batch-size", "4", "--damping", "0.05", "--method", "first-order", "--quiet", *extra]


def assert_same_factors(f1: dict[str, torch.Tensor], f2: dict[str, torch.Tensor], tol: float) -> None:
    """Two launches' stored factors agree to `tol`: eigenvector matrices (K-FAC's .QA/.QG, Woodbury's gram.U)
    column by column up to sign, which an eigendecomposition does not fix; every other tensor entry by entry."""
    assert set(f1) == set(f2)
    for k in f1:
        t1, t2 = f1[k].double(), f2[k].double()
        if k.endswith((".QA", ".QG", "gram.U")):
            t2 = t2 * torch.sign((t1 * t2).sum(0))
        assert (t1 - t2).abs().max() <= tol, k


def test_torchrun_cli_matches_a_single_process(lineage, tmp_path):
    """`torchrun --nproc-per-node 2 -m llmeraser finetune / unlearn (dense, ekfac) / fit-curvature`: the same
    adapters and factors as without torchrun; rank 0 alone writes, and the ledger records the request once.

    The loaded float64 model runs transformers' eager attention, whose softmax (and RMSNorm) is float32, so its
    curvature products are only float32-accurate and not exactly linear: CG stalls at a relative residual ~3e-7
    and its last iterates turn the ranks' summation order into differences nothing bounds, hence no CG run here
    (tests/dist_worker.py covers CG in exact float64). What is compared has a bound: each batch's products are the
    same bit for bit in both launches, only the float64 sums' order differs (≲ 1e-14 relative), and
    - dense solves (M + λI)Δ = b with M built from those sums: ‖δΔ‖/‖Δ‖ ≤ κ·(‖δM‖/‖M‖ + ‖δb‖/‖b‖) ≲ 2e-11, with
      κ(M + λI) ≈ 1.9e3 at λ = 0.05 (measured: λ_max ≈ 94) and ‖Δ‖ ≈ 1.8;
    - the Kronecker factors are eigendecompositions of such sums: eigenvectors move by ≤ ‖δA‖/gap (Davis-Kahan),
      the smallest relative eigenvalue gap of these factors being 3e-4 (measured), so ≲ 1e-11 up to their sign,
      and EK-FAC's Δθ, (λ + Λ)⁻¹ in those bases with λ = 0.05, by ≲ 1e-9;
    - Adam's steps are Lipschitz in the gradient (≤ lr/ε per step), 12 steps: ≲ 1e-9.
    1e-7 is above all of these and far below what a wrong sharding (a missing or doubled shard) changes, ~‖Δ‖."""
    root, common = lineage
    runs = {"dense": ["--solver", "dense"],
            "ekfac": ["--solver", "ekfac", "--factors", "FACTORS"]}
    for name, extra in runs.items():
        one, two = tmp_path / f"{name}-1", tmp_path / f"{name}-2"
        x1 = [str(tmp_path / f"f1-{name}") if e == "FACTORS" else e for e in extra]
        x2 = [str(tmp_path / f"f2-{name}") if e == "FACTORS" else e for e in extra]
        assert main(_unlearn(root, common, one, *x1)) == 0
        run = torchrun("-m", "llmeraser", *_unlearn(root, common, two, *x2, "--ledger", str(tmp_path / "ledger")))
        assert run.returncode == 0, run.stderr[-3000:]
        assert run.stdout.count("unlearned 3 edits") == 1  # rank 0 prints; the other rank is quiet
        w1, w2 = _weights(one), _weights(two)  # see the docstring for the bound
        for k in w1:
            assert (w1[k] - w2[k]).abs().max() <= 1e-7, (name, k)
        r1, r2 = (json.loads((d / "report.json").read_text()) for d in (one, two))
        assert r1["delta_norm"] == pytest.approx(r2["delta_norm"], rel=1e-7) and r2["n_train"] == 23
        from llmeraser.ledger import Ledger

        with Ledger(tmp_path / "ledger", create=False) as book:
            assert [e.status for e in book.entries()] == ["applied"]
        os.rename(tmp_path / "ledger", tmp_path / f"ledger-{name}")  # the next run applies the same request again
    f1, f2 = (load_file(str(tmp_path / f / "ekfac" / "factors.safetensors")) for f in ("f1-ekfac", "f2-ekfac"))
    assert_same_factors(f1, f2, 1e-7)  # the factor fit, sharded, is the same fit
    ft2 = tmp_path / "ft2"
    run = torchrun("-m", "llmeraser", "finetune", *common, "--out", str(ft2), "--epochs", "2", "--lr", "1e-2",
                   "--batch-size", "4", "--lora-r", "2", "--lora-targets", "q_proj,v_proj", "--max-length", "24",
                   "--quiet")
    assert run.returncode == 0, run.stderr[-3000:]
    w1, w2 = _weights(root / "ft"), _weights(ft2)
    assert all((w1[k] - w2[k]).abs().max() <= 1e-7 for k in w1)  # Adam: see the docstring


def test_torchrun_bad_input_fails_every_rank_with_one_message(lineage, tmp_path):
    root, common = lineage
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"edits": [{"op": "remove", "id": "nope"}]}))
    args = _unlearn(root, common, tmp_path / "out")
    args[args.index("--request") + 1] = str(bad)
    run = torchrun("-m", "llmeraser", *args)
    assert run.returncode != 0 and not (tmp_path / "out").exists()
    assert run.stderr.count("unknown example id 'nope'") == 1, run.stderr[-3000:]  # said once, by rank 0
    run = torchrun("-m", "llmeraser", "evaluate", "--data", str(root / "train.jsonl"))
    assert run.returncode != 0 and "does not run data-parallel" in run.stderr


@pytest.mark.parametrize("fault", ["kill", "hang"])
def test_a_rank_that_dies_or_hangs_fails_the_run_cleanly(lineage, tmp_path, fault):
    """Rank 1 is SIGKILLed (or stops answering: rank 0 times out after 5 s) at its 12th collective, in the middle
    of the CG solve: the run fails with a message naming it, writes no output, leaves the input adapter and the
    training data as they were, and the ledger marks the request failed; rerun, it applies."""
    root, common = lineage
    out, ledger = tmp_path / "out", tmp_path / "ledger"
    before = {p.name: p.read_bytes() for p in [*(root / "ft").iterdir(), root / "train.jsonl"]}
    start = time.perf_counter()
    run = torchrun(str(HERE / "dist_fault.py"), *_unlearn(root, common, out, "--solver-max-iters", "40",
                                                          "--ledger", str(ledger)),
                   env={"FAULT": fault, "FAULT_RANK": "1", "FAULT_AT": "12", distributed.TIMEOUT_ENV: "5"})
    elapsed = time.perf_counter() - start
    assert run.returncode != 0
    assert f"fault: rank 1 {fault}s at collective 12 (ggn product)" in run.stderr, run.stderr[-3000:]
    assert "llmeraser [rank 0/2]: failed: DistributedError" in run.stderr or "terminated" in run.stderr
    if fault == "hang":
        assert "did not answer within the timeout" in run.stderr and elapsed < 120
    assert not out.exists() and not list(tmp_path.glob(".out.*"))  # no output, not even a temporary one
    assert before == {p.name: p.read_bytes() for p in [*(root / "ft").iterdir(), root / "train.jsonl"]}
    from llmeraser.ledger import Ledger

    with Ledger(ledger, create=False) as book:
        (entry,) = book.entries()
        assert entry.status == "failed" and entry.output_sha256 is None
    assert main(_unlearn(root, common, out, "--solver-max-iters", "40", "--ledger", str(ledger))) == 0
    with Ledger(ledger, create=False) as book:
        assert book.entries()[0].status == "applied"


def test_torchrun_fit_curvature_and_tune_damping_match_a_single_process(lineage, tmp_path):
    """`fit-curvature` (woodbury, datainf: every rank gathers all per-example gradients) and `tune-damping` (held-out
    removals, warm-started fine-tunes, a damping path) give a single process's factors and scores."""
    from llmeraser.data import Example

    root, common = lineage
    valid = [Example(id=f"v{i}", prompt=e.prompt, response=e.response) for i, e in enumerate(fact_examples(6, seed=7))]
    save_examples(valid, tmp_path / "valid.jsonl")
    fit = ["fit-curvature", *common, "--adapter", str(root / "ft"), "--kind", "woodbury", "datainf", "--quiet"]
    tune = ["tune-damping", *common, "--adapter", str(root / "ft"), "--valid", str(tmp_path / "valid.jsonl"),
            "--solver", "woodbury", "--trials", "2", "--dampings", "0.01", "0.1", "1", "--quiet"]
    for n, launch in ((1, lambda *a: subprocess.run([sys.executable, "-m", "llmeraser", *a], capture_output=True,
                                                    text=True, env=ENV)),
                      (2, lambda *a: torchrun("-m", "llmeraser", *a))):
        store = ["--factors", str(tmp_path / f"store{n}")]
        for args in (fit, tune):
            run = launch(*args, *store)
            assert run.returncode == 0, run.stderr[-3000:]
    for kind in ("woodbury", "datainf"):
        # every rank gathers all per-example gradients (each batch's bit for bit), so the Gram matrix and its
        # eigenvectors are the same computation in both launches; up to sign all the same (see assert_same_factors)
        f1, f2 = (load_file(str(tmp_path / f"store{n}" / kind / "factors.safetensors")) for n in (1, 2))
        assert_same_factors(f1, f2, 1e-7)
    d1, d2 = (json.loads((tmp_path / f"store{n}" / "damping.json").read_text()) for n in (1, 2))
    rel, abs_ = 1e-5, 1e-9
    for a, b in zip(d1["scores"], d2["scores"], strict=True):
        assert a["damping"] == b["damping"] and a["score"] == pytest.approx(b["score"], rel=rel, abs=abs_)
    # The chosen λ is an argmin over the grid, so two launches may pick different λ only between near-tied scores:
    # with |s₁ − s₂| ≤ t everywhere, s₁(chosen₂) ≤ s₂(chosen₂) + t ≤ s₂(chosen₁) + t ≤ s₁(chosen₁) + 2t.
    s1 = {row["damping"]: row["score"] for row in d1["scores"]}
    t = rel * max(abs(v) for v in s1.values()) + abs_
    assert s1[d2["chosen"]] <= s1[d1["chosen"]] + 2 * t
    assert s1[d1["chosen"]] == min(s1.values())  # each launch's own choice is its argmin (same numbers)
