"""A device that runs out of memory: the command says what did not fit and which option helps, with exit code 2 (the
user can act on it), never a traceback; nothing is written and the failed request is on record as failed. No GPU is
needed: torch's own OutOfMemoryError is raised where a GPU would raise it."""

from __future__ import annotations

import json

import pytest
import torch
from fixtures.tiny import tiny_lineage

from llmeraser.cli import main
from llmeraser.errors import ResourceError
from llmeraser.request import Request
from llmeraser.resources import device_memory

OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
MESSAGE = "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total capacity)\nlong allocator advice"


def _raise(*args, **kwargs):
    raise OOM(MESSAGE)


@pytest.fixture
def lineage(tmp_path):
    tiny_lineage(tmp_path, "in")
    (tmp_path / "r.json").write_text(json.dumps(Request.remove("ex3").to_dict()))
    return tmp_path


def _common(root):
    return ["--base-model", str(root / "base"), "--adapter", str(root / "in"), "--train", str(root / "train.jsonl"),
            "--quiet"]


def test_the_context_names_what_and_the_way_out():
    with pytest.raises(ResourceError, match=r"fitting ekfac did not fit in the device's memory \(CUDA out of memory\. "
                                            r"Tried to allocate 2\.00 GiB .*\); lower --batch-size"):
        with device_memory("fitting ekfac", "lower --batch-size"):
            _raise()
    with device_memory("nothing", "nothing"):  # other errors and no error pass through untouched
        pass
    with pytest.raises(ValueError), device_memory("x", "y"):
        raise ValueError("not memory")


def test_a_fit_that_does_not_fit_exits_2_naming_the_options(lineage, monkeypatch, capsys):
    monkeypatch.setattr("llmeraser.factors.fit.collect", _raise)
    assert main(["fit-curvature", *_common(lineage), "--kind", "ekfac"]) == 2
    err = capsys.readouterr().err
    assert "the ekfac fit over 12 examples in batches of" in err and "did not fit in the device's memory" in err
    assert "--samples" in err
    assert "Traceback" not in err and "allocator advice" not in err  # the first line of torch's message only


def test_an_update_that_does_not_fit_exits_2_and_writes_nothing(lineage, monkeypatch, capsys):
    import dataclasses

    from llmeraser.updates.base import get_method

    oom_method = dataclasses.replace(get_method("first-order"), run=_raise)
    monkeypatch.setattr("llmeraser.job.get_method", lambda name: oom_method)
    ledger = lineage / "ledger"
    assert main(["unlearn", *_common(lineage), "--request", str(lineage / "r.json"), "--out", str(lineage / "out"),
                 "--method", "first-order", "--ledger", str(ledger)]) == 2
    err = capsys.readouterr().err
    assert "the 'first-order' update of" in err and "--solver-batch-size" in err
    assert not (lineage / "out").exists()
    assert main(["ledger", "show", str(ledger)]) == 0
    assert "failed" in capsys.readouterr().out


def test_an_unnamed_step_still_gets_the_commands_advice(lineage, monkeypatch, capsys):
    monkeypatch.setattr("llmeraser.job.fit_factors", _raise)
    assert main(["fit-curvature", *_common(lineage), "--kind", "ekfac"]) == 2
    assert "'fit-curvature' ran out of device memory (CUDA out of memory." in capsys.readouterr().err
    monkeypatch.setattr("llmeraser.job.AdapterJob.evaluate", classmethod(_raise))
    assert main(["evaluate", "--base-model", str(lineage / "base"), "--adapter", str(lineage / "in"), "--data",
                 str(lineage / "train.jsonl"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "'evaluate' ran out of device memory (CUDA out of memory." in err and "lower --batch-size" in err
