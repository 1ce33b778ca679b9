"""Crash safety: `llmeraser unlearn --ledger` killed with SIGKILL at random points, many times — the one-step
update, and the two updates along a recorded training path (`--method rewind`, `--method path`).

After every kill: the input adapter is byte-identical; the output folder either does not exist, or the run got far
enough that the ledger has it (applied, or pending with exactly that folder's hash staged — the one window two
atomic steps leave, which the next run closes); the ledger never says applied without a complete output. Then the
same command runs to completion, and once more as a no-op.

`bench/attacks.py` runs the rewind/path kills by the hundred (it imports the helpers here) with other attacks.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fixtures.tiny import fact_examples, save_tiny_base, tiny_lineage

import llmeraser.io
from llmeraser.cli import main
from llmeraser.data import save_examples
from llmeraser.ledger import Ledger
from llmeraser.params import ADAPTER_WEIGHTS, adapter_hash
from llmeraser.trajectory import TRAJECTORY

KILLS = 10  # a few seconds each (most of it Python, torch and transformers starting up)
# kills per method of the rewind/path test: each is a subprocess start, killed, then a full rerun (~10 s on 2 cores)
KILLS_PER_METHOD = int(os.environ.get("LLMERASER_CRASH_KILLS", "4"))


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir())}


def _state(root: Path) -> tuple[str | None, str | None]:
    """(status of the request in the ledger or None, hash of the output folder's weights or None)."""
    status = None
    if (root / "ledger" / "ledger.sqlite").is_file():
        with Ledger(root / "ledger", create=False) as ledger:
            entries = ledger.entries()
            status = entries[0].status if entries else None
            staged = entries[0].staged_sha256 if entries else None
    weights = root / "out" / ADAPTER_WEIGHTS
    out_sha = adapter_hash(root / "out") if weights.is_file() else None
    if status == "pending" and out_sha is not None:  # the rename/commit window: must be the staged output
        assert out_sha == staged, "a pending request with an output folder that is not the staged one"
    return status, out_sha


def test_sigkill_at_random_points_never_leaves_a_half_applied_request(tmp_path):
    tiny_lineage(tmp_path, "in")
    (tmp_path / "request.json").write_text('{"edits": [{"op": "remove", "id": "ex0"}]}')
    original = _snapshot(tmp_path / "in")
    cmd = [sys.executable, "-m", "llmeraser", "unlearn", "--base-model", str(tmp_path / "base"), "--adapter",
           str(tmp_path / "in"), "--train", str(tmp_path / "train.jsonl"), "--request", str(tmp_path / "request.json"),
           "--out", str(tmp_path / "out"), "--ledger", str(tmp_path / "ledger"), "--damping", "0.1",
           "--solver-max-iters", "5", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run() -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)

    start = time.perf_counter()
    first = run()
    duration = time.perf_counter() - start
    assert first.returncode == 0, first.stderr
    rng = random.Random(0)
    seen: dict[str | None, int] = {}
    for i in range(KILLS):
        if _state(tmp_path)[0] == "applied":  # done: start the next try from scratch
            for p in (tmp_path / "out", tmp_path / "ledger"):
                subprocess.run(["rm", "-rf", str(p)], check=True)
        # otherwise the next run starts from whatever the last kill left: recovery is killed too
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # half the kills anywhere in the run, half in its last fifth (where the writing happens)
        time.sleep(rng.uniform(0, duration) if i % 2 else rng.uniform(0.8 * duration, 1.1 * duration))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert _snapshot(tmp_path / "in") == original, f"kill {i}: the input adapter changed"
        status, out_sha = _state(tmp_path)  # asserts: pending + output folder ⇒ it is the staged one
        seen[status] = seen.get(status, 0) + 1
        if status == "applied":
            assert out_sha is not None and main(["ledger", "verify", str(tmp_path / "ledger")]) == 0
        elif out_sha is None:
            assert not (tmp_path / "out").exists(), f"kill {i}: an output folder without weights"
    # the same command finishes the job from the last state, then is a no-op
    again = run()
    assert again.returncode == 0, again.stderr
    assert _state(tmp_path)[0] == "applied" and main(["ledger", "verify", str(tmp_path / "ledger")]) == 0
    noop = run()
    assert noop.returncode == 0 and "already applied" in noop.stdout
    assert _snapshot(tmp_path / "in") == original
    assert sum(seen.values()) == KILLS and set(seen) <= {None, "pending", "applied"}


@pytest.mark.parametrize("when", ["stage", "rename"])
def test_kill_inside_the_write_window(tmp_path, monkeypatch, when):
    """Deterministic versions of the two interesting kill points: after the output's hash is staged (before the
    rename) and after the rename (before the ledger says applied). Simulated by raising SystemExit-like
    BaseException subclasses that the CLI does not catch, then resetting the status to pending as SIGKILL would."""
    import llmeraser.io as io

    tiny_lineage(tmp_path, "in")
    (tmp_path / "request.json").write_text('{"edits": [{"op": "remove", "id": "ex0"}]}')
    argv = ["unlearn", "--base-model", str(tmp_path / "base"), "--adapter", str(tmp_path / "in"), "--train",
            str(tmp_path / "train.jsonl"), "--request", str(tmp_path / "request.json"), "--out", str(tmp_path / "out"),
            "--ledger", str(tmp_path / "ledger"), "--damping", "0.1", "--solver-max-iters", "5", "--quiet"]

    class Killed(BaseException):
        pass

    real_rename = os.rename

    def rename(src, dst):
        if when == "rename":
            real_rename(src, dst)
        raise Killed

    monkeypatch.setattr(io.os, "rename", rename)
    with pytest.raises(Killed):
        main(argv)
    monkeypatch.undo()
    with Ledger(tmp_path / "ledger") as ledger:  # SIGKILL would have left it pending, not failed
        ledger.db.execute("UPDATE requests SET status = 'pending', error = NULL")
    status, out_sha = _state(tmp_path)
    assert status == "pending" and (out_sha is not None) == (when == "rename")
    assert main(argv) == 0
    assert _state(tmp_path)[0] == "applied" and main(["ledger", "verify", str(tmp_path / "ledger")]) == 0


# ------------------------------------------------------------------------------------------ rewind and path replay
# The world of tests/test_recording_integrity.py: a recorded fine-tune of 40 facts, request: remove ex3.
FINETUNE = ["--lora-r", "2", "--lora-targets", "q_proj", "--max-length", "24", "--epochs", "3", "--lr", "1e-2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread, as the suite (conftest.py) runs in process


def recorded_world(root: Path) -> Path:
    """Under `root`: `base` (tiny Llama), `train.jsonl`, `request.json` and `adapter`, fine-tuned by the CLI with its
    recording (trajectory.safetensors). Returns `root`."""
    save_tiny_base(root / "base")
    save_examples(fact_examples(40, seed=1), root / "train.jsonl")
    (root / "request.json").write_text(json.dumps({"edits": [{"op": "remove", "id": "ex3"}]}))
    assert main(["finetune", "--base-model", str(root / "base"), "--train", str(root / "train.jsonl"), "--out",
                 str(root / "adapter"), *FINETUNE, "--quiet"]) == 0
    assert (root / "adapter" / TRAJECTORY).is_file()
    return root


def unlearn_argv(root: Path, method: str, out: Path, ledger: Path | None, adapter: Path | None = None) -> list[str]:
    """`unlearn --method METHOD` of the world's request on its adapter (or `adapter`) into `out`, with `ledger`."""
    return ["unlearn", "--base-model", str(root / "base"), "--adapter", str(adapter or root / "adapter"), "--train",
            str(root / "train.jsonl"), "--request", str(root / "request.json"), "--out", str(out), "--method",
            method, *(["--ledger", str(ledger)] if ledger else []), "--quiet"]


def compared(method: str) -> tuple[str, ...]:
    """The output files a rerun must reproduce byte for byte. A rewind's output carries its own recording; path
    replay's none. Both are bitwise reproducible across processes on the CPU with the same thread count (the same
    float32 operations in the same order: measured, and asserted here), so no tolerance is needed."""
    return (ADAPTER_WEIGHTS, TRAJECTORY) if method == "rewind" else (ADAPTER_WEIGHTS,)


def tree(folder: Path) -> dict[str, bytes | None]:
    """Every file (bytes) and folder (None) under `folder`, by relative path."""
    return {str(f.relative_to(folder)): f.read_bytes() if f.is_file() else None for f in sorted(folder.rglob("*"))}


def stale_temporaries(out: Path) -> list[str]:
    """Temporaries of `out` left beside it (`.OUT.*.tmp`, as llmeraser.io names them)."""
    return sorted(p.name for p in out.parent.iterdir()
                  if p.name.startswith(f".{out.name}.") and p.name.endswith(".tmp"))


# llmeraser.io removes a killed run's stale temporaries on the next write to the same target (issue 29)
STALE_CLEANUP = hasattr(llmeraser.io, "remove_stale_temporaries")


def ledger_state(out: Path, ledger: Path) -> tuple[str | None, Ledger | None]:
    """(status of the ledger's one request or None, its entry). Asserts what a kill may leave: the output folder is
    absent unless the ledger staged exactly it (pending: the rename/commit window) or applied it, and an applied
    output is complete (`ledger verify` passes)."""
    entry = None
    if (ledger / "ledger.sqlite").is_file():
        with Ledger(ledger, create=False) as book:
            entries = book.entries()
        assert len(entries) <= 1, entries
        entry = entries[0] if entries else None
    status = entry.status if entry else None
    assert status in (None, "pending", "applied"), f"a SIGKILL left status {status!r}: {entry and entry.error}"
    if status is None or (status == "pending" and entry.staged_sha256 is None):
        assert not out.exists(), f"an output folder {out} the ledger has not staged"
    elif out.exists():
        assert (out / ADAPTER_WEIGHTS).is_file() and adapter_hash(out) == entry.staged_sha256, \
            "an output folder that is not the staged one"
        if entry.files is not None:  # every file of the staged folder, not only the weights
            assert {k: llmeraser.io.sha256_file(out / k) for k in entry.files} == entry.files
    else:
        assert status == "pending", "the ledger says applied and the output folder is missing"
    if status == "applied":
        assert main(["ledger", "verify", str(ledger)]) == 0
    return status, entry


def assert_equal_outputs(out: Path, reference: Path, method: str) -> None:
    for name in compared(method):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), f"{name} differs from the reference run"


def cli(argv: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m llmeraser ARGV` in a subprocess, to completion."""
    return subprocess.run([sys.executable, "-m", "llmeraser", *argv], env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def kill_at(argv: list[str], seconds: float) -> None:
    """Start `python -m llmeraser ARGV`, SIGKILL it after `seconds` (or let it finish first), reap it."""
    proc = subprocess.Popen([sys.executable, "-m", "llmeraser", *argv], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> Path:
    return recorded_world(tmp_path_factory.mktemp("recorded"))


@pytest.mark.parametrize("method", ["rewind", "path"])
def test_sigkill_during_rewind_and_path_then_the_rerun_equals_an_uninterrupted_run(recorded, tmp_path, capsys,
                                                                                    method):
    """KILLS_PER_METHOD kills at seeded random times in (0, an uninterrupted run's duration), each followed by the
    invariants above, a rerun of the same command that completes with the reference's bytes, and a no-op rerun."""
    world = recorded
    original = tree(world / "adapter") | {f"base/{k}": v for k, v in tree(world / "base").items()}
    # the reference: one uninterrupted run of the same command into another folder; a second one, warm (the first
    # pays for cold caches), times the run and checks that two processes write the same bytes
    duration = 0.0
    for name in ("ref", "ref2"):
        start = time.perf_counter()
        done = cli(unlearn_argv(world, method, tmp_path / name, tmp_path / f"{name}-ledger"))
        duration = time.perf_counter() - start
        assert done.returncode == 0, done.stderr
    assert_equal_outputs(tmp_path / "ref2", tmp_path / "ref", method)
    out, ledger = tmp_path / "out", tmp_path / "ledger"
    argv = unlearn_argv(world, method, out, ledger)
    rng = random.Random(f"{method}-0")
    seen: dict[str | None, int] = {}
    for i in range(KILLS_PER_METHOD):
        # half the kills anywhere in the run, half in its last quarter (where the writing happens)
        kill_at(argv, rng.uniform(0, duration) if i % 2 else rng.uniform(0.75 * duration, duration))
        assert tree(world / "adapter") | {f"base/{k}": v for k, v in tree(world / "base").items()} == original, \
            f"kill {i}: an input changed"
        status, _ = ledger_state(out, ledger)
        seen[status] = seen.get(status, 0) + 1
        if status == "applied":
            assert_equal_outputs(out, tmp_path / "ref", method)
        again = cli(argv)
        assert again.returncode == 0, f"kill {i} ({status}): the rerun failed: {again.stderr}"
        assert ledger_state(out, ledger)[0] == "applied"
        assert_equal_outputs(out, tmp_path / "ref", method)
        if STALE_CLEANUP:  # skipped where it has not landed: then a killed run's `.out.*.tmp` stays by design
            assert stale_temporaries(out) == [], f"kill {i}: the rerun left a killed run's temporaries"
        capsys.readouterr()
        assert main(argv) == 0 and "already applied" in capsys.readouterr().out
        shutil.rmtree(out)
        shutil.rmtree(ledger)
    assert sum(seen.values()) == KILLS_PER_METHOD
    print(f"{method}: {KILLS_PER_METHOD} kills left {seen}; reference run {duration:.1f} s")
