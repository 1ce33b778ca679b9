"""Crash safety: `llmeraser unlearn --ledger` killed with SIGKILL at random points, many times.

After every kill: the input adapter is byte-identical; the output folder either does not exist, or the run got far
enough that the ledger has it (applied, or pending with exactly that folder's hash staged — the one window two
atomic steps leave, which the next run closes); the ledger never says applied without a complete output. Then the
same command runs to completion, and once more as a no-op.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fixtures.tiny import tiny_lineage

from llmeraser.cli import main
from llmeraser.ledger import Ledger
from llmeraser.params import ADAPTER_WEIGHTS, adapter_hash

KILLS = 10  # a few seconds each (most of it Python, torch and transformers starting up)


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
