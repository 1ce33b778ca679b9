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
    bit (the ranks share out the single-process batches); only the order of the final sum differs, by rounding.
    Measured (max |difference|): fitted, dense, lissa, sqp, paper ≤ 8e-15; CG and newton-CG run to tol 1e-13 ≤ 1e-13;
    Adam 8e-17; CG stopped early on a curvature sample, bit for bit. Order-sensitive, hence its looser stated
    tolerance: L-BFGS (its strong-Wolfe line search turns rounding into different trial steps: 4e-7 after 3
    iterations). An unconverged CG over the whole set is order-sensitive too (its iterates amplify rounding), which
    is why the CG runs here go to their tolerance."""
    single, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    proc = subprocess.Popen([sys.executable, str(HERE / "dist_worker.py"), str(single)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    run = torchrun(str(HERE / "dist_worker.py"), str(two))
    assert proc.wait(timeout=600) == 0, proc.stderr.read()[-3000:]
    assert run.returncode == 0, run.stderr[-3000:]
    a, b = load_file(single), load_file(two)
    assert set(a) == set(b) and len(a) == 35
    ops = {k.split("/")[0] for k in a if "/" in k}
    assert ops == {"remove", "modify_query", "correct_response"}
    for key in a:
        tol = 1e-5 if key == "finetune-lbfgs" else 1e-10
        assert a[key].abs().max() > 0, key
        assert (a[key] - b[key]).abs().max() <= tol * max(1.0, float(a[key].abs().max())), key


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
            "--out", str(out), "--batch-size", "4", "--damping", "0.05", "--quiet", *extra]


def test_torchrun_cli_matches_a_single_process(lineage, tmp_path):
    """`torchrun --nproc-per-node 2 -m llmeraser finetune / unlearn (cg, ekfac) / fit-curvature`: the same adapters
    and factors as without torchrun; rank 0 alone writes, and the ledger records the request once."""
    root, common = lineage
    runs = {"cg": ["--solver", "cg", "--solver-tol", "1e-12", "--solver-max-iters", "200"],
            "ekfac": ["--solver", "ekfac", "--factors", "FACTORS"]}
    for name, extra in runs.items():
        one, two = tmp_path / f"{name}-1", tmp_path / f"{name}-2"
        x1 = [str(tmp_path / f"f1-{name}") if e == "FACTORS" else e for e in extra]
        x2 = [str(tmp_path / f"f2-{name}") if e == "FACTORS" else e for e in extra]
        assert main(_unlearn(root, common, one, *x1)) == 0
        run = torchrun("-m", "llmeraser", *_unlearn(root, common, two, *x2, "--ledger", str(tmp_path / "ledger")))
        assert run.returncode == 0, run.stderr[-3000:]
        assert run.stdout.count("unlearned 3 edits") == 1  # rank 0 prints; the other rank is quiet
        # float64 weights, but transformers' eager attention takes its softmax in float32: CG stalls at a relative
        # residual of ~2e-7 and its last iterates amplify the ranks' summation order to ~1e-9 (measured)
        w1, w2 = _weights(one), _weights(two)
        for k in w1:
            assert (w1[k] - w2[k]).abs().max() <= 1e-7, (name, k)
        r1, r2 = (json.loads((d / "report.json").read_text()) for d in (one, two))
        assert r1["delta_norm"] == pytest.approx(r2["delta_norm"], rel=1e-7) and r2["n_train"] == 23
        from llmeraser.ledger import Ledger

        with Ledger(tmp_path / "ledger", create=False) as book:
            assert [e.status for e in book.entries()] == ["applied"]
        os.rename(tmp_path / "ledger", tmp_path / f"ledger-{name}")  # the next run applies the same request again
    f1, f2 = (load_file(str(tmp_path / f / "ekfac" / "factors.safetensors")) for f in ("f1-ekfac", "f2-ekfac"))
    assert all((f1[k] - f2[k]).abs().max() <= 1e-7 for k in f1)  # the factor fit, sharded, is the same fit
    ft2 = tmp_path / "ft2"
    run = torchrun("-m", "llmeraser", "finetune", *common, "--out", str(ft2), "--epochs", "2", "--lr", "1e-2",
                   "--batch-size", "4", "--lora-r", "2", "--lora-targets", "q_proj,v_proj", "--max-length", "24",
                   "--quiet")
    assert run.returncode == 0, run.stderr[-3000:]
    w1, w2 = _weights(root / "ft"), _weights(ft2)
    assert all((w1[k] - w2[k]).abs().max() <= 1e-7 for k in w1)


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
        f1, f2 = (load_file(str(tmp_path / f"store{n}" / kind / "factors.safetensors")) for n in (1, 2))
        assert set(f1) == set(f2) and all((f1[k] - f2[k]).abs().max() <= 1e-7 for k in f1)
    d1, d2 = (json.loads((tmp_path / f"store{n}" / "damping.json").read_text()) for n in (1, 2))
    assert d1["chosen"] == d2["chosen"]
    for a, b in zip(d1["scores"], d2["scores"], strict=True):
        assert a["damping"] == b["damping"] and a["score"] == pytest.approx(b["score"], rel=1e-5, abs=1e-9)
