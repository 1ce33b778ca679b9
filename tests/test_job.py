"""The library API of the jobs on an adapter folder (`llmeraser.job.AdapterJob`), called directly: the training
record and its warning, the ledger's replay and no-op, factor reuse and hand-on, auto, the relative default damping,
and a declined request. The same paths through the command line (exit codes, messages) are in test_cli*.py."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil

import pytest
import torch
from fixtures.tiny import tiny_lineage
from safetensors.torch import load_file

from llmeraser.cli import main
from llmeraser.eraser import RELATIVE_DAMPING, EraserArguments
from llmeraser.job import AdapterJob
from llmeraser.ledger import Ledger
from llmeraser.record import DEFAULT_L2, DEFAULT_MAX_LENGTH, TrainingRecord
from llmeraser.request import Request, apply_request
from llmeraser.updates import UnlearnOptions


def one_step(**kw) -> UnlearnOptions:
    """The one-step update (these tests are about it; with no method a recorded adapter would be rewound or
    replayed, tests/test_path.py), with `kw` split between the options and their one-step arguments."""
    mine = {k: kw.pop(k) for k in list(kw) if k in {f.name for f in dataclasses.fields(UnlearnOptions)}}
    return UnlearnOptions(method="first-order", eraser=EraserArguments(**kw), **mine)


@pytest.fixture
def root(tmp_path):
    tiny_lineage(tmp_path, "in")
    return tmp_path


def job(root, adapter="in", **kw) -> AdapterJob:
    return AdapterJob(root / adapter, root / "train.jsonl", base_model=str(root / "base"), **kw)


def weights(folder):
    return load_file(folder / "adapter_model.safetensors")


def test_the_record_is_read_and_an_adapter_without_one_is_warned_about(root, caplog, capsys):
    record = TrainingRecord.read(root / "in")
    assert record.max_length == 24 and record.l2 == 0.0 and not record.assumed and record.lora["targets"] == ["q_proj"]
    shutil.copytree(root / "in", root / "bare")
    (root / "bare" / "report.json").unlink()  # an adapter made elsewhere: no record
    bare = TrainingRecord.read(root / "bare")
    assert (bare.max_length, bare.l2) == (DEFAULT_MAX_LENGTH, DEFAULT_L2)
    assert bare.assumed == ("max_length", "l2", "loss")
    line = bare.warning(root / "bare")
    assert "max_length 64 (--max-length)" in line and "l2 0 (--l2)" in line and "response tokens" in line
    assert "\n" not in line
    given = TrainingRecord.read(root / "bare", max_length=24, l2=0.01)
    assert (given.max_length, given.l2) == (24, 0.01) and given.assumed == ("loss",)
    with caplog.at_level(logging.WARNING):
        job(root, "bare", max_length=24)
    assert any("assuming l2 0 (--l2)" in r.getMessage() and "max_length" not in r.getMessage()
               for r in caplog.records)
    # through the command line: one warning (logged: the CLI prints it on stderr), and the run still succeeds
    (root / "r.json").write_text(json.dumps(Request.remove("ex1").to_dict()))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert main(["unlearn", "--base-model", str(root / "base"), "--adapter", str(root / "bare"), "--train",
                     str(root / "train.jsonl"), "--request", str(root / "r.json"), "--out", str(root / "o"),
                     "--quiet"]) == 0
    err = [r.getMessage() for r in caplog.records if "training record" in r.getMessage()]
    assert len(err) == 1 and "max_length 64 (--max-length)" in err[0]
    report = json.loads((root / "o" / "report.json").read_text())
    assert report["task"]["assumed"] == ["max_length", "l2", "loss"] and report["task"]["max_length"] == 64


def test_unlearn_with_a_ledger_replays_chains_and_is_idempotent(root):
    j = job(root)
    r1, r2 = Request.remove("ex0", "ex3"), Request.correct_response({"ex5": " Maybe"})
    first = j.unlearn(r1, root / "a1", one_step(solver="cg", damping=0.1, ledger=root / "ledger"))
    assert first.status == "applied" and first.seq == 1 and (root / "a1" / "report.json").is_file()
    report = first.report
    assert report["task"]["max_length"] == 24 and report["damping"] == 0.1 and report["damping_rule"]["rule"] == \
        "absolute"
    again = j.unlearn(r1, root / "elsewhere", UnlearnOptions(ledger=root / "ledger"))
    assert again.status == "done" and again.update is None and not (root / "elsewhere").exists()
    second = job(root, "a1").unlearn(r2, root / "a2", one_step(solver="cg", damping=0.1,
                                                                  ledger=root / "ledger"))
    assert second.seq == 2 and second.report["n_train"] == 10  # the replayed set: 12 minus r1's two removals
    with Ledger(root / "ledger") as book:
        assert [e.status for e in book.entries()] == ["applied", "applied"]
        assert not book.verify()


def test_auto_and_the_relative_default_damping(root):
    # every default of the one-step update (with every default, this recorded adapter would be rewound:
    # tests/test_path.py)
    result = job(root).unlearn(Request.remove("ex2"), root / "o", one_step())
    r = result.report
    assert r["solver"] == "dense" and r["solver_choice"].startswith("auto chose dense")  # p × N is tiny here
    rule = r["damping_rule"]
    assert rule["rule"] == "relative" and rule["relative_damping"] == RELATIVE_DAMPING
    assert r["damping"] == pytest.approx(RELATIVE_DAMPING * rule["scale"], rel=1e-12) and rule["scale"] > 0
    assert r["delta_norm"] > 0 and r["converged"]
    cg = job(root).unlearn(Request.remove("ex2"), root / "o2",
                           one_step(solver="cg", solver_options={"tol": 1e-10, "max_iters": 50}))
    c = cg.report
    assert c["solver_args"]["tol"] == 1e-10 and c["damping_rule"]["scale"] == pytest.approx(c["solve"]["ritz"][1])
    # the same λ through dense and cg's Lanczos: the Krylov estimate of θ_max is within the true spectrum, so the two
    # relative dampings agree to the accuracy of the top Ritz value (converged here: 50 steps ≥ the 10 dense used)
    assert c["damping"] == pytest.approx(r["damping"], rel=1e-3)


def test_fitted_solver_fits_once_reuses_and_hands_on(root):
    j = job(root)
    rows = j.fit_curvature(["ekfac"])
    assert rows[0]["kind"] == "ekfac" and (root / "in.factors" / "ekfac" / "meta.json").is_file()
    # 1 of 12 edited: within 20%, so the fit is handed on
    result = j.unlearn(Request.remove("ex3"), root / "o", one_step(solver="ekfac", damping=0.1, refit_fraction=0.2))
    f = result.report["factors"]
    assert f["source"].startswith("loaded from") and result.report["seconds"]["fit"] == 0.0
    assert "reused for the new adapter" in result.factors_note
    assert (root / "o.factors" / "ekfac" / "meta.json").is_file()
    edited = apply_request(j.train, Request.remove("ex3"))  # without a ledger, the next job gets the edited set
    nxt = AdapterJob(root / "o", edited, base_model=str(root / "base")).unlearn(
        Request.remove("ex5"), root / "o2", one_step(solver="ekfac", damping=0.1))
    assert nxt.report["factors"]["source"].startswith("loaded from") and nxt.report["factors"]["edited_since_fit"] == 1
    assert "the next request refits" in nxt.factors_note  # 2 of 12 > the default 5%


def test_a_declined_choice_writes_the_adapter_unchanged_unless_forced(root):
    j = job(root)
    key = {"adapter_sha256": j.adapter_sha256}
    from llmeraser.data import examples_hash

    record = {"chosen": 0.1, "declines": True, "scores": [{"damping": 0.1, "score": 1.7, "pearson": -0.2}],
              "trials": 1, "removal_size": 1, "valid_sha256": "x"}
    j.store.save_damping(record, key["adapter_sha256"], examples_hash(j.train))
    result = j.unlearn(Request.remove("ex3"), root / "o",
                       one_step(solver="cg", damping="auto", ledger=root / "ledger"))
    assert result.status == "declined" and result.report["decision"] == "declined" and "1.7" in result.report["reason"]
    before, after = weights(root / "in"), weights(root / "o")
    assert all(torch.equal(before[k], after[k]) for k in before)
    with Ledger(root / "ledger") as book:
        (entry,) = book.entries()
        assert entry.status == "applied" and entry.report["decision"] == "declined"
    forced = job(root).unlearn(Request.remove("ex3"), root / "o2",
                               one_step(solver="cg", damping="auto", force=True))
    assert forced.status == "applied" and forced.report["damping"] == 0.1 and forced.report["delta_norm"] > 0


def test_relative_cg_falls_back_to_a_short_probe_when_the_basis_does_not_fit(root, monkeypatch):
    import llmeraser.resources as resources
    from llmeraser.eraser import SCALE_PRODUCTS

    args = one_step(solver="cg", solver_options={"tol": 1e-10})
    one_run = job(root).unlearn(Request.remove("ex2"), root / "a", args).report
    monkeypatch.setattr(resources, "available_bytes", lambda: 1)  # no room for the Lanczos basis
    probed = job(root).unlearn(Request.remove("ex2"), root / "b", args).report
    assert probed["solve"]["solver"] == "cg" and one_run["solve"]["solver"] == "cg (shifted)"
    assert probed["solve"]["hvps"] >= SCALE_PRODUCTS + probed["solve"]["iterations"] - 1
    # both estimate θ_max by Lanczos from the same b; the probe stops at 10 steps, so its λ is at most the full run's
    assert 0 < probed["damping"] <= one_run["damping"] * (1 + 1e-9)


def test_several_requests_on_the_command_line_are_one_rewind_equal_to_applying_them_in_order(root, capsys):
    """`unlearn --request A B` merges them (`merge_requests`) into one exact rewind; both that and two rewinds one
    after the other are retraining on the set after A and B with the recorded recipe: the weights are equal bit for
    bit. With --ledger the batch is the same update, each request on its own row (tests/test_backlog.py)."""
    from llmeraser.data import load_examples

    train = load_examples(root / "train.jsonl")
    (root / "a.json").write_text(json.dumps({"edits": [{"op": "remove", "id": train[2].id}]}))
    (root / "b.json").write_text(json.dumps({"edits": [{"op": "correct_response", "id": train[5].id,
                                                        "response": " Maybe"}]}))
    common = ["unlearn", "--base-model", str(root / "base"), "--train", str(root / "train.jsonl"), "--quiet",
              "--method", "rewind"]
    assert main([*common, "--adapter", str(root / "in"), "--request", str(root / "a.json"), str(root / "b.json"),
                 "--out", str(root / "ab")]) == 0
    assert main([*common, "--adapter", str(root / "in"), "--request", str(root / "a.json"), "--out",
                 str(root / "a")]) == 0
    after_a = apply_request(train, Request.from_dict(json.loads((root / "a.json").read_text())))
    from llmeraser.data import save_examples

    save_examples(after_a, root / "train-a.jsonl")
    assert main(["unlearn", "--base-model", str(root / "base"), "--train", str(root / "train-a.jsonl"), "--quiet",
                 "--method", "rewind", "--adapter", str(root / "a"), "--request", str(root / "b.json"), "--out",
                 str(root / "a-then-b")]) == 0
    both, steps = weights(root / "ab"), weights(root / "a-then-b")
    assert both.keys() == steps.keys() and all(torch.equal(both[k], steps[k]) for k in both)
    capsys.readouterr()
    assert main([*common, "--adapter", str(root / "in"), "--request", str(root / "a.json"), str(root / "b.json"),
                 "--out", str(root / "x"), "--ledger", str(root / "book")]) == 0
    assert "(requests #1, #2)" in capsys.readouterr().out
    booked = weights(root / "x")
    assert all(torch.equal(both[k], booked[k]) for k in both)
