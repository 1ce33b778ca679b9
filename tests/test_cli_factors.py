"""The fitted solvers through the command line: fit-curvature, the factor store beside the adapter (reuse, staleness,
inheritance along a lineage), --solver auto, tune-damping and --damping auto."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
from fixtures.tiny import tiny_lineage

from llmeraser.cli import main
from llmeraser.data import load_examples, save_examples
from llmeraser.request import Request, apply_request
from llmeraser.testing import fact_examples

BASE = ["--quiet"]


@pytest.fixture
def lineage(tmp_path):
    tiny_lineage(tmp_path, "in")
    (tmp_path / "r1.json").write_text(json.dumps(Request.remove("ex3").to_dict()))
    (tmp_path / "r2.json").write_text(json.dumps(Request.remove("ex5").to_dict()))
    return tmp_path


def unlearn(root, adapter, out, request, *extra):
    return main(["unlearn", "--base-model", str(root / "base"), "--adapter", str(root / adapter), "--train",
                 str(root / "train.jsonl"), "--request", str(root / request), "--out", str(root / out), *BASE,
                 "--method", "first-order", *extra])


def report(root, out):
    return json.loads((root / out / "report.json").read_text())


def test_fit_once_then_every_request_reuses_and_the_lineage_inherits(lineage, capsys):
    root = lineage
    assert main(["fit-curvature", "--base-model", str(root / "base"), "--adapter", str(root / "in"), "--train",
                 str(root / "train.jsonl"), "--kind", "ekfac", "kfac", *BASE]) == 0
    out = capsys.readouterr().out
    assert re.search(r"one pass over \d+ examples served 2 fit\(s\)", out)
    assert (root / "in.factors" / "ekfac" / "factors.safetensors").is_file()
    assert unlearn(root, "in", "out1", "r1.json", "--solver", "ekfac", "--damping", "0.1",
                   "--refit-fraction", "0.1") == 0
    r = report(root, "out1")
    assert r["solver"] == "ekfac" and r["factors"]["source"].startswith("loaded from")
    assert r["seconds"]["fit"] == 0.0 and r["solve"]["residual"] != r["solve"]["residual"]  # NaN: not measured
    assert "reused for the new adapter: 1 of 12 examples" in capsys.readouterr().out
    meta = json.loads((root / "out1.factors" / "ekfac" / "meta.json").read_text())
    assert meta["edited_since_fit"] == 1 and meta["derived_from"]["adapter_sha256"] == r["input_adapter_sha256"]
    # the next request on the new adapter, with the training set as it now is, loads the inherited fit
    save_examples(apply_request(load_examples(root / "train.jsonl"), Request.remove("ex3")), root / "train.jsonl")
    assert unlearn(root, "out1", "out2", "r2.json", "--solver", "ekfac", "--damping", "0.1",
                   "--refit-fraction", "0.1") == 0
    assert report(root, "out2")["factors"]["edited_since_fit"] == 1
    assert "2 examples edited since the ekfac fit" in capsys.readouterr().out  # 2/12 > 10 %: the next one refits
    assert not (root / "out2.factors").exists()


def test_missing_or_stale_factors_are_fitted_and_auto_picks_by_size(lineage, capsys, monkeypatch):
    root = lineage
    assert unlearn(root, "in", "out0", "r1.json", "--solver", "auto", "--damping", "0.1") == 0
    assert "auto chose dense" in report(root, "out0")["solver_choice"]  # 12 examples × 32 parameters: exact
    monkeypatch.setattr("llmeraser.solvers.choose.EXACT_WORK", 0)
    assert unlearn(root, "in", "out1", "r1.json", "--solver", "auto", "--damping", "0.1") == 0
    r = report(root, "out1")
    assert r["solver"] == "woodbury" and "auto chose woodbury" in r["solver_choice"]
    assert r["factors"]["source"].startswith("fitted for this request (no woodbury factors")
    assert r["seconds"]["fit"] > 0 and r["seconds"]["total"] >= r["seconds"]["fit"]
    # another training set: the stored fit is stale and is replaced
    train = load_examples(root / "train.jsonl")
    save_examples([dataclasses.replace(train[0], response=" Yes" if train[0].response == " No" else " No"),
                   *train[1:]], root / "train.jsonl")
    assert unlearn(root, "in", "out2", "r1.json", "--solver", "woodbury", "--damping", "0.1") == 0
    assert "fitted on another training set" in report(root, "out2")["factors"]["source"]


def test_tune_damping_then_damping_auto(lineage, capsys):
    root = lineage
    save_examples([dataclasses.replace(e, id=f"v{i}") for i, e in enumerate(fact_examples(8, seed=5))],
                  root / "valid.jsonl")
    assert unlearn(root, "in", "x", "r1.json", "--solver", "ekfac", "--damping", "auto") == 2
    assert "run 'llmeraser tune-damping'" in capsys.readouterr().err
    assert main(["tune-damping", "--base-model", str(root / "base"), "--adapter", str(root / "in"), "--train",
                 str(root / "train.jsonl"), "--valid", str(root / "valid.jsonl"), "--solver", "ekfac", "--trials",
                 "2", "--size", "0.1", "--dampings", "1", "0.1", "0.01", *BASE]) == 0
    out = capsys.readouterr().out
    record = json.loads((root / "in.factors" / "damping.json").read_text())
    assert len(record["scores"]) == 3 and record["removal_size"] == 1 and len(record["removed"]) == 2
    best = min(record["scores"], key=lambda s: s["score"])
    assert record["chosen"] == best["damping"] and "saved in" in out
    # the decision follows the record: written with its λ when it beat no update, declined (unchanged) when not,
    # unless --force; each case set explicitly so the test does not hang on which one this tiny model lands in
    path = root / "in.factors" / "damping.json"
    path.write_text(json.dumps({**record, "declines": False}))
    assert unlearn(root, "in", "out1", "r1.json", "--solver", "ekfac", "--damping", "auto") == 0
    r = report(root, "out1")
    assert r["damping"] == record["chosen"] and r["damping_choice"]["chosen"] == record["chosen"]
    assert r["delta_norm"] > 0
    path.write_text(json.dumps({**record, "declines": True}))
    capsys.readouterr()
    assert unlearn(root, "in", "out3", "r1.json", "--solver", "ekfac", "--damping", "auto") == 0
    r = report(root, "out3")
    assert r["decision"] == "declined" and r["delta_norm"] == 0 and r["damping_choice"]["declines"]
    assert "declined" in capsys.readouterr().out
    from safetensors.torch import load_file

    before, after = load_file(root / "in" / "adapter_model.safetensors"), load_file(root / "out3" /
                                                                                    "adapter_model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert unlearn(root, "in", "out4", "r1.json", "--solver", "ekfac", "--damping", "auto", "--force") == 0
    r = report(root, "out4")
    assert r["damping"] == record["chosen"] and r["delta_norm"] > 0
    assert unlearn(root, "in", "out2", "r1.json", "--damping", "lots") == 2
    assert "--damping takes a number or 'auto'" in capsys.readouterr().err


def test_tune_damping_refuses_validation_examples_from_training(lineage, capsys):
    root = lineage
    save_examples(load_examples(root / "train.jsonl")[:3], root / "valid.jsonl")
    assert main(["tune-damping", "--base-model", str(root / "base"), "--adapter", str(root / "in"), "--train",
                 str(root / "train.jsonl"), "--valid", str(root / "valid.jsonl"), *BASE]) == 2
    assert "shares 3 id(s) with --train" in capsys.readouterr().err
