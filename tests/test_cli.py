"""The command line: the demo end to end on the tiny model, and exit codes."""

from __future__ import annotations

import json

from llmeraser.cli import main
from llmeraser.params import adapter_hash


def test_demo_runs_end_to_end(tmp_path, capsys):
    assert main(["demo", "--tiny", "--out", str(tmp_path / "demo"), "--n-train", "16", "--remove", "1", "--quiet"]) == 0
    out = capsys.readouterr().out
    for row in ("original", "retrain (warm start)", "llmeraser newton + cg", "paper preset"):
        assert row in out
    report = json.loads((tmp_path / "demo" / "unlearned" / "report.json").read_text())
    assert report["ops"] == {"remove": 1, "modify_query": 0, "correct_response": 0}
    assert report["converged"] and report["solve"]["residual"] <= 1e-8
    assert report["input_adapter_sha256"] == adapter_hash(tmp_path / "demo" / "original")


def test_exit_codes(tmp_path, capsys):
    assert main([]) == 2  # no command: help, usage error
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f").write_text("taken")
    # An output folder that exists and is not empty is bad input: one line, exit 2, no traceback.
    assert main(["demo", "--tiny", "--out", str(tmp_path / "x"), "--n-train", "8", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llmeraser: error:") and "already exists" in err and "Traceback" not in err
