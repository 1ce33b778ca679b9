"""The command line: the demo end to end on the tiny model, and exit codes."""

from __future__ import annotations

import json

import pytest
from fixtures.tiny import save_tiny_base

from llmeraser.cli import main
from llmeraser.data import save_examples
from llmeraser.params import adapter_hash
from llmeraser.testing import fact_examples


def test_demo_runs_end_to_end(tmp_path, capsys):
    assert main(["demo", "--tiny", "--out", str(tmp_path / "demo"), "--n-train", "16", "--remove", "1", "--quiet"]) == 0
    out = capsys.readouterr().out
    for row in ("original", "retrain (warm start)", "llmeraser newton + cg", "paper preset"):
        assert row in out
    report = json.loads((tmp_path / "demo" / "unlearned" / "report.json").read_text())
    assert report["ops"] == {"remove": 1, "modify_query": 0, "correct_response": 0}
    assert report["converged"] and report["solve"]["residual"] <= 1e-8
    assert report["input_adapter_sha256"] == adapter_hash(tmp_path / "demo" / "original")


def test_every_command_has_its_module_and_its_help(capsys):
    """One module per command (llmeraser.cli.<command>: add_parser and run; the experiments' plug-in commands in
    llmeraser_experiments.commands), in the order --help lists them; every command's --help (and each dataset's)
    exits 0; `python -m llmeraser` reaches the same main."""
    import argparse
    import importlib
    import subprocess
    import sys

    from llmeraser.cli import COMMANDS, build_parser
    from llmeraser_experiments import commands as plugin

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert list(sub.choices) == [name.replace("_", "-") for name in (*COMMANDS, *plugin.COMMANDS)]
    for module in [f"llmeraser.cli.{name}" for name in COMMANDS] + [f"{plugin.__name__}.{n}" for n in plugin.COMMANDS]:
        module = importlib.import_module(module)
        assert callable(module.add_parser) and callable(module.run)
    for argv in ([], *([c] for c in sub.choices), ["data", "ids"], ["data", "movielens"], ["data", "people"]):
        assert main([*argv, "--help"]) == 0, argv
        assert capsys.readouterr().out.startswith(f"usage: {' '.join(['llmeraser', *argv])} ")
    done = subprocess.run([sys.executable, "-m", "llmeraser", "demo", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("usage: llmeraser demo ")


def test_exit_codes(tmp_path, capsys):
    assert main([]) == 2  # no command: help, usage error
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f").write_text("taken")
    # An output folder that exists and is not empty is bad input: one line, exit 2, no traceback.
    assert main(["demo", "--tiny", "--out", str(tmp_path / "x"), "--n-train", "8", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llmeraser: error:") and "already exists" in err and "Traceback" not in err


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """A tiny Llama + tokenizer saved as a local Hugging Face model folder, and a small train/test set."""
    root = tmp_path_factory.mktemp("cli")
    save_tiny_base(root / "base")
    save_examples(fact_examples(12, seed=1), root / "train.jsonl")
    save_examples(fact_examples(6, seed=2), root / "test.jsonl")
    return root


def test_finetune_unlearn_evaluate_through_the_cli(tiny_dirs, tmp_path, capsys):
    base, train = str(tiny_dirs / "base"), str(tiny_dirs / "train.jsonl")
    assert main(["finetune", "--base-model", base, "--train", train, "--out", str(tmp_path / "ft"), "--epochs", "2",
                 "--lr", "1e-2", "--batch-size", "4", "--lora-r", "2", "--lora-targets", "q_proj,v_proj",
                 "--l2", "1e-3", "--max-length", "24", "--no-final-check", "--quiet"]) == 0
    ft_report = json.loads((tmp_path / "ft" / "report.json").read_text())
    assert ft_report["task"]["l2"] == 1e-3 and ft_report["task"]["max_length"] == 24
    assert ft_report["arguments"]["final_check"] is False  # a bool field is a --flag / --no-flag pair
    (tmp_path / "request.json").write_text(json.dumps({"edits": [{"op": "remove", "id": "ex0"},
                                                                 {"op": "correct_response", "id": "ex1",
                                                                  "response": " Maybe"}]}))
    before = {f.name: f.read_bytes() for f in (tmp_path / "ft").iterdir()}
    assert main(["unlearn", "--base-model", base, "--adapter", str(tmp_path / "ft"), "--train", train,
                 "--request", str(tmp_path / "request.json"), "--out", str(tmp_path / "un"), "--damping", "1e-2",
                 "--solver-max-iters", "20", "--method", "first-order", "--quiet"]) == 0
    assert before == {f.name: f.read_bytes() for f in (tmp_path / "ft").iterdir()}  # the input is untouched
    report = json.loads((tmp_path / "un" / "report.json").read_text())
    assert report["ops"] == {"remove": 1, "modify_query": 0, "correct_response": 1}
    assert report["l2"] == 1e-3  # taken from the adapter's record
    assert report["delta_norm"] > 0 and report["solve"]["iterations"] <= 20
    assert main(["evaluate", "--base-model", base, "--adapter", str(tmp_path / "un"), "--data",
                 str(tiny_dirs / "test.jsonl"), "--out", str(tmp_path / "eval.json"), "--quiet"]) == 0
    ev = json.loads((tmp_path / "eval.json").read_text())
    assert ev["n"] == 6 and 0 <= ev["auc"] <= 1 and len(ev["losses"]) == 6
    # Running the same unlearning into the same output again is refused: exit 2, one line.
    capsys.readouterr()
    assert main(["unlearn", "--base-model", base, "--adapter", str(tmp_path / "ft"), "--train", train,
                 "--request", str(tmp_path / "request.json"), "--out", str(tmp_path / "un"), "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize("problem, expect", [
    ("unknown-id", "unknown example id 'nope'"),
    ("bad-json", "request.json"),
    ("no-adapter", "does not exist"),
    ("bad-solver", "unknown solver"),
    ("bad-base", "neither 'default' nor a local Hugging Face model folder"),
])
def test_bad_input_is_one_line_and_exit_2(tiny_dirs, tmp_path, capsys, problem, expect):
    base, train = str(tiny_dirs / "base"), str(tiny_dirs / "train.jsonl")
    adapter = tmp_path / "ft"
    if problem != "no-adapter":
        assert main(["finetune", "--base-model", base, "--train", train, "--out", str(adapter), "--epochs", "1",
                     "--lora-r", "1", "--lora-targets", "q_proj", "--quiet"]) == 0
    request = tmp_path / "request.json"
    request.write_text("{not json" if problem == "bad-json" else json.dumps(
        {"edits": [{"op": "remove", "id": "nope" if problem == "unknown-id" else "ex0"}]}))
    argv = ["unlearn", "--base-model", str(tmp_path / "nothing") if problem == "bad-base" else base, "--adapter",
            str(adapter), "--train", train, "--request", str(request), "--out", str(tmp_path / "un"), "--quiet"]
    if problem == "bad-solver":
        argv += ["--solver", "magic"]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert expect in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "un").exists()


def test_internal_failure_is_exit_1(tiny_dirs, tmp_path, capsys, monkeypatch):
    import llmeraser.eraser as eraser

    def boom(*args, **kwargs):
        raise eraser.SolverError("solver 'cg': the residual became non-finite")

    monkeypatch.setattr(eraser.UnlearningProblem, "solve", boom)
    base, train = str(tiny_dirs / "base"), str(tiny_dirs / "train.jsonl")
    assert main(["finetune", "--base-model", base, "--train", train, "--out", str(tmp_path / "ft"), "--epochs", "1",
                 "--lora-r", "1", "--lora-targets", "q_proj", "--quiet"]) == 0
    (tmp_path / "r.json").write_text(json.dumps({"edits": [{"op": "remove", "id": "ex0"}]}))
    capsys.readouterr()
    assert main(["unlearn", "--base-model", base, "--adapter", str(tmp_path / "ft"), "--train", train, "--request",
                 str(tmp_path / "r.json"), "--out", str(tmp_path / "un"), "--method", "first-order", "--quiet"]) == 1
    assert "non-finite" in capsys.readouterr().err and not (tmp_path / "un").exists()


def test_movielens_demo_on_a_local_model_folder(tiny_dirs, tmp_path, monkeypatch, capsys):
    """The main job's own path (MovieLens data, cached recorded fine-tune, `unlearn` with no options beside the
    paper's one-step update, cached retrain, table), with a tiny local model standing in for the embedded one."""
    pytest.importorskip("recbole")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    argv = ["demo", "--base-model", str(tiny_dirs / "base"), "--n-train", "40", "--users", "2", "--quiet"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    first = capsys.readouterr()
    for row in ("original", "llmeraser unlearn, no options (", "paper's one step (first-order + cg)",
                "retrain (same init and recipe)", "remove all", "unlearn with no options: auto chose"):
        assert row in first.out
    assert "WARNING" not in first.err  # nothing a user could not act on
    report = json.loads((tmp_path / "a" / "unlearned" / "report.json").read_text())
    assert report["method"] in ("rewind", "path") and report["update_choice"].startswith("auto chose")
    assert report["n_train"] == 40 and report["ops"]["remove"] >= 2
    cached = sorted((tmp_path / "cache" / "llmeraser" / "demo").iterdir())
    assert len(cached) == 2  # the fine-tune and the retrain
    # A rerun uses both caches and prints the same table; --damping changes the paper's row alone.
    assert main([*argv, "--out", str(tmp_path / "b")]) == 0
    def numbers(out: str) -> list[list[str]]:  # the table without its seconds column (timings vary)
        return [line.split()[:-1] for line in out.split("unlearned adapter")[0].splitlines()]

    assert numbers(capsys.readouterr().out) == numbers(first.out)
    assert sorted((tmp_path / "cache" / "llmeraser" / "demo").iterdir()) == cached
    assert main([*argv, "--out", str(tmp_path / "c"), "--damping", "1.0"]) == 0
    changed = [a != b for a, b in zip(numbers(capsys.readouterr().out), numbers(first.out), strict=True)]
    assert sum(changed) == 1  # the paper's row
