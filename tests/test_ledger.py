"""The request ledger and sequential unlearning: history on record, requests in order, R1 then R2 = R1 ∪ R2."""

from __future__ import annotations

import json
import sqlite3

import pytest
import torch
from fixtures.tabular import TabularTask, linear_model, make_examples, regression_data, ridge_solution
from fixtures.tiny import fact_examples, tiny_lineage

from llmeraser.cli import main
from llmeraser.data import save_examples
from llmeraser.eraser import EraserArguments, compute_update
from llmeraser.ledger import Ledger, LedgerError
from llmeraser.params import ADAPTER_WEIGHTS, ParamView
from llmeraser.request import Edit, Request, apply_request
from llmeraser.solvers.api import solver_arguments
from llmeraser.task import CausalLMTask


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def sequential_and_union(model, task, train, r1, r2, args):
    """θ after R1 then R2 (the second computed at the new θ on the effective set), and after R1 ∪ R2 at once."""
    view = ParamView(model)
    theta = view.vector()
    d1 = compute_update(model, task, train, r1, args).delta
    view.set_vector(theta + d1)
    d2 = compute_update(model, task, apply_request(train, r1), r2, args).delta
    view.set_vector(theta)
    union = compute_update(model, task, train, Request(r1.edits + r2.edits), args).delta
    return theta + d1 + d2, theta + union, theta


def test_sequential_equals_union_on_ridge_with_newton():
    """Ridge is quadratic: each newton step lands on the exact minimiser, so R1 then R2 = R1 ∪ R2 = the retrain."""
    l2 = 1e-2
    x, y = regression_data(60, 5, seed=3)
    train = make_examples(x, y)
    model = linear_model(5)
    ParamView(model).set_vector(ridge_solution(train, l2))
    r1 = Request((Edit("remove", "r1"), Edit("correct_response", "r7", response="2.5")))
    r2 = Request((Edit("remove", "r3"), Edit("modify_query", "r9", prompt=json.dumps([0.1, -0.2, 0.3, 0.0, 1.0]))))
    args = EraserArguments(method="newton", solver="dense", damping=0.0, l2=l2)
    seq, union, _ = sequential_and_union(model, TabularTask(), train, r1, r2, args)
    retrain = ridge_solution(apply_request(apply_request(train, r1), r2), l2)
    assert rel(seq, union) <= 1e-8 and rel(seq, retrain) <= 1e-8  # measured ~1e-14


@pytest.fixture(scope="module")
def rule_lm(one_thread):
    """The tiny LoRA LM of test_tiny_lm, well-conditioned regime, fitted by L-BFGS to ‖∇R‖ ≤ 1e-7."""
    from test_tiny_lm import GRAD_TOL, L2_WELL, MAX_LBFGS, N_TRAIN, lora_model, word_tokenizer
    from test_tiny_lm import fact_examples as rule_facts

    from llmeraser.finetune import FinetuneArguments, finetune

    task = CausalLMTask(word_tokenizer(), max_length=16)
    train = rule_facts(N_TRAIN, exception=False)
    model = lora_model(len(task.tokenizer))
    fit = FinetuneArguments(optimizer="lbfgs", l2=L2_WELL, grad_tol=GRAD_TOL["well"], max_iters=MAX_LBFGS,
                            batch_size=N_TRAIN)
    finetune(model, task, train, fit)
    return model, task, train, fit


@pytest.mark.parametrize("method", ["newton", "first-order"])
def test_sequential_close_to_union_on_a_tiny_lm(method, rule_lm):
    """R1 = remove 2 of 50, R2 = remove 1 and flip 1 label. The routes differ by terms of second order in the steps,
    which on this small, curved model are not small: measured ‖θ_seq − θ_union‖ / ‖Δθ_union‖ = 0.15 (newton),
    0.12 (first-order); other request pairs gave 0.04–0.31. What matters is that going one request at a time is no
    worse: the distance to retraining on R1 ∪ R2 (warm-started L-BFGS) is 0.49 sequential vs 0.66 union (newton),
    0.51 vs 0.50 (first-order). Asserted: gap ≤ 0.25, sequential error ≤ 1.1 × union error."""
    import copy

    from test_tiny_lm import L2_WELL, N_TRAIN

    from llmeraser.finetune import finetune

    model, task, train, fit = rule_lm
    flip = {" Yes": " No", " No": " Yes"}
    r1 = Request.remove("ex0", "ex1")
    r2 = Request((Edit("remove", "ex2"), Edit("correct_response", "ex3", response=flip[train[3].response])))
    args = EraserArguments(method=method, solver="cg", curvature="ggn", l2=L2_WELL, damping=0.0,
                           batch_size=N_TRAIN, solver_args=solver_arguments("cg", tol=1e-10, max_iters=2000))
    seq, union, theta = sequential_and_union(model, task, train, r1, r2, args)
    retrained = copy.deepcopy(model)
    finetune(retrained, task, apply_request(apply_request(train, r1), r2), fit)
    target = ParamView(retrained).vector()
    gap = rel(seq - theta, union - theta)
    seq_err, union_err = rel(seq - theta, target - theta), rel(union - theta, target - theta)
    print(f"{method}: gap {gap:.3f}, to retraining: sequential {seq_err:.3f}, union {union_err:.3f}")
    assert gap <= 0.25 and seq_err <= 1.1 * union_err


# --------------------------------------------------------------------------------------------------- the CLI
@pytest.fixture()
def lineage(tmp_path):
    """A tiny base model folder, a training set and a fine-tuned adapter `a0` (through the CLI)."""
    tiny_lineage(tmp_path, "a0")
    return tmp_path


def unlearn(root, adapter: str, request: dict, out: str, *extra: str) -> int:
    path = root / f"{out}.request.json"
    path.write_text(json.dumps(request))
    return main(["unlearn", "--base-model", str(root / "base"), "--adapter", str(root / adapter), "--train",
                 str(root / "train.jsonl"), "--request", str(path), "--out", str(root / out), "--ledger",
                 str(root / "ledger"), "--damping", "0.1", "--solver-max-iters", "10", "--method", "first-order",
                 "--quiet", *extra])


def test_ledger_records_sequential_requests_and_refuses_what_does_not_fit(lineage, capsys):
    r1 = {"edits": [{"op": "remove", "id": "ex0"}, {"op": "remove", "id": "ex3"}]}
    r2 = {"edits": [{"op": "correct_response", "id": "ex5", "response": " Maybe"}]}
    assert unlearn(lineage, "a0", r1, "a1") == 0
    assert unlearn(lineage, "a1", r2, "a2") == 0
    report = json.loads((lineage / "a2" / "report.json").read_text())
    assert report["n_train"] == 10  # the second request ran on the training set without R1's examples
    capsys.readouterr()
    # the same request again: a no-op, whatever --out says
    assert unlearn(lineage, "a1", r2, "a9") == 0
    assert "already applied (#2" in capsys.readouterr().out and not (lineage / "a9").exists()
    # an edit of an id that R1 removed
    assert unlearn(lineage, "a2", {"edits": [{"op": "correct_response", "id": "ex3", "response": " No"}]}, "a3") == 2
    assert "'ex3' was removed by request #1" in capsys.readouterr().err
    # an adapter that is not the head (a fork) and a training set that is not the lineage's
    assert unlearn(lineage, "a1", {"edits": [{"op": "remove", "id": "ex7"}]}, "a3") == 2
    assert "is not the head of this lineage" in capsys.readouterr().err
    save_examples(fact_examples(12, seed=9), lineage / "train.jsonl")
    assert unlearn(lineage, "a2", {"edits": [{"op": "remove", "id": "ex7"}]}, "a3") == 2
    assert "not this lineage's training set" in capsys.readouterr().err and not (lineage / "a3").exists()

    with Ledger(lineage / "ledger", create=False) as ledger:
        entries = ledger.entries()
        assert [(e.seq, e.status) for e in entries] == [(1, "applied"), (2, "applied")]
        assert entries[1].input_sha256 == entries[0].output_sha256
        assert [e["id"] for e in entries[0].edited] == ["ex0", "ex3"] and entries[0].edited[0]["new_sha256"] is None
        assert entries[1].report["solve"]["residual"] >= 0 and entries[1].report["n_train"] == 10
    assert main(["ledger", "show", str(lineage / "ledger")]) == 0
    out = capsys.readouterr().out
    assert "applied" in out and "remove=2" in out and "correct_response=1" in out
    assert main(["ledger", "verify", str(lineage / "ledger")]) == 0
    assert "2 applied request(s) match" in capsys.readouterr().out
    # tampering with an adapter on disk is found
    weights = lineage / "a1" / ADAPTER_WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert main(["ledger", "verify", str(lineage / "ledger")]) == 1
    assert "request #1" in capsys.readouterr().out


def test_a_failed_request_is_recorded_and_can_be_run_again(lineage, capsys, monkeypatch):
    import llmeraser.eraser as eraser

    real = eraser.UnlearningProblem.solve

    def boom(*args, **kwargs):
        raise eraser.SolverError("solver 'cg' diverged")

    monkeypatch.setattr(eraser.UnlearningProblem, "solve", boom)
    request = {"edits": [{"op": "remove", "id": "ex2"}]}
    assert unlearn(lineage, "a0", request, "a1") == 1
    with Ledger(lineage / "ledger") as ledger:
        (entry,) = ledger.entries()
        assert entry.status == "failed" and "diverged" in entry.error
    monkeypatch.setattr(eraser.UnlearningProblem, "solve", real)
    assert unlearn(lineage, "a0", request, "a1") == 0
    with Ledger(lineage / "ledger") as ledger:
        (entry,) = ledger.entries()
        assert entry.status == "applied" and entry.attempts == 2 and entry.error is None


def test_recover_finishes_a_run_cut_off_after_the_rename(lineage, capsys, monkeypatch):
    """The one window two atomic steps leave: output renamed into place, record not yet 'applied'."""
    from llmeraser.ledger import Ledger as RealLedger

    def cut_off(self, seq, report=None):
        raise KeyboardInterrupt  # as if killed right after the rename

    monkeypatch.setattr(RealLedger, "finish", cut_off)
    request = {"edits": [{"op": "remove", "id": "ex4"}]}
    assert unlearn(lineage, "a0", request, "a1") == 130
    monkeypatch.undo()
    assert (lineage / "a1" / ADAPTER_WEIGHTS).is_file()
    with Ledger(lineage / "ledger") as ledger:
        assert ledger.entries()[0].status == "failed"  # an interrupt is recorded (a SIGKILL leaves 'pending')
    capsys.readouterr()
    assert unlearn(lineage, "a0", request, "a1") == 0
    assert "recorded now" in capsys.readouterr().out
    assert main(["ledger", "verify", str(lineage / "ledger")]) == 0


def test_ledger_errors_name_the_problem(tmp_path):
    with pytest.raises(LedgerError, match="no ledger"):
        Ledger(tmp_path / "none", create=False)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "ledger.sqlite").write_bytes(b"not a database" * 100)
    with pytest.raises(LedgerError, match="not a readable ledger"):
        Ledger(tmp_path / "bad")
    with Ledger(tmp_path / "ok") as ledger:
        assert ledger.entries() == [] and ledger.root() is None
        with pytest.raises(sqlite3.IntegrityError):  # the schema refuses an unknown status
            ledger.db.execute("INSERT INTO requests (request_sha256, request_json, edited, created, updated, "
                              "status, input_adapter, input_sha256, output_adapter) VALUES "
                              "('h', '{}', '[]', 't', 't', 'done', 'a', 'b', 'c')")
