"""Attacks on `llmeraser unlearn` as counts (issue 29): corrupted and forged recordings, edited training records,
hostile output paths, and SIGKILLs during `--method rewind` and `--method path` with a ledger.

    python bench/attacks.py                    # 100 kills (50 rewind, 50 path) and 40 runs per input family (~15 min)
    python bench/attacks.py --quick            # 6 kills, 4 runs per input family (~1 min)
    python bench/attacks.py --kills 20 --out DIR

The world is the one of tests/test_recording_integrity.py: a tiny Llama, `finetune --lora-r 2 --lora-targets q_proj
--max-length 24 --epochs 3 --lr 1e-2` with its recording on `fact_examples(40, seed=1)`, request: remove `ex3`.

Families, each run through the command line (`llmeraser.cli.main` in a forked child with a per-run timeout, or
`python -m llmeraser` in a subprocess for half the kills: a real start-up, killed anywhere in it):
  (a) flips: one byte of trajectory.safetensors XOR a random mask at a random offset; `--method rewind` / `auto`.
  (b) header: one field of the recording's header (or of its recipe / checksums) set to a random value, the header's
      digest recomputed (a forger's edit, `edit_header` of tests/test_recording_integrity.py); `rewind` / `auto`.
  (c) record: a field of report.json's or training_record.json's `task` block set to a random value, or the file made
      malformed JSON (truncated, a byte flipped, nested 100,000 deep, not an object, empty); `rewind` / `auto` /
      `first-order`.
  (d) outputs: --out below a file, a 300-character name, --ledger equal to --out, --ledger or --out inside the input
      adapter, and more; `rewind` / `path`.
  (e) kills: `unlearn --ledger` SIGKILLed at a seeded random time in (0, an uninterrupted run's duration), then the
      kill invariants of tests/test_crash.py, then the same command rerun (it must complete and equal the reference
      byte for byte), then once more (a no-op).

Counted per family: runs; refused (exit 2); stated fallback (auto → first-order, the report saying why); exit 1 (must
be 0); hangs (a run past --timeout, must be 0); silently wrong (an exit-0 output whose method claims to have used the
recording — rewind: retraining bit for bit; path: the verified recording's replay, deterministic — and that differs
from the clean reference, or a fallback that differs from the clean first-order update; must be 0); inputs changed
(any byte of the adapter, base model, training set or request; must be 0); broken invariants (a refusal that wrote
something or is not one error line, a kill state the ledger does not account for, a rerun after a kill that does not
complete, leaves a temporary or is not then a no-op; must be 0).
Written: OUT/results.json (every run) and OUT/results.md (the table).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import platform
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402

torch.set_num_threads(1)  # forked children inherit it; the subprocesses get OMP_NUM_THREADS=1 (test_crash.ENV)

from test_crash import (  # noqa: E402
    ENV,
    FINETUNE,
    STALE_CLEANUP,
    compared,
    ledger_state,
    recorded_world,
    stale_temporaries,
    tree,
    unlearn_argv,
)
from test_recording_integrity import edit_header  # noqa: E402

from llmeraser.cli import main  # noqa: E402
from llmeraser.data import load_examples, save_examples  # noqa: E402
from llmeraser.params import ADAPTER_WEIGHTS  # noqa: E402
from llmeraser.trajectory import TRAJECTORY  # noqa: E402

FAMILIES = {"a": "flips", "b": "header", "c": "record", "d": "outputs", "e-rewind": "kills (rewind)",
            "e-path": "kills (path)"}
COLUMNS = ["runs", "completed", "refused", "fallback", "exit1", "other_exit", "hangs", "wrong", "inputs_changed",
           "broken"]
HEADS = {"runs": "runs", "completed": "exit 0, as the reference", "refused": "refused (exit 2)",
         "fallback": "stated fallback", "exit1": "exit 1", "other_exit": "other exit", "hangs": "hangs",
         "wrong": "silently wrong", "inputs_changed": "inputs changed", "broken": "broken invariants"}
MUST_BE_ZERO = ("exit1", "other_exit", "hangs", "wrong", "inputs_changed", "broken")


# ------------------------------------------------------------------------------------------------ running the CLI
@dataclass
class Run:
    code: int | None  # None: killed (by the timeout: a hang; or by the attack)
    out: str
    err: str
    seconds: float
    triggered: float | None = None  # seconds from the start to when `trigger` first held


def forked(fn, *, timeout: float, kill_after: float | None = None, trigger=None) -> Run:
    """`fn()` (returning an exit code) in a forked child, stdout and stderr captured; SIGKILLed `kill_after` seconds
    after its start, or after `trigger()` first holds when given (the kill family), or at `timeout` (a hang). The
    parent has imported everything, so a child starts in milliseconds: a kill at a random time lands in the work, not
    in Python's start-up."""
    sys.stdout.flush()
    sys.stderr.flush()
    with tempfile.TemporaryFile() as fo, tempfile.TemporaryFile() as fe:
        start = time.perf_counter()
        pid = os.fork()
        if pid == 0:  # the child
            code = 1
            try:
                os.dup2(fo.fileno(), 1)
                os.dup2(fe.fileno(), 2)
                code = fn()
            except BaseException:  # noqa: BLE001 — main() catches everything; this is the harness's own failure
                traceback.print_exc()
            finally:
                with contextlib.suppress(BaseException):
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(code if isinstance(code, int) else 1)
        code, triggered = _wait(pid, start, timeout, kill_after, trigger)
        seconds = time.perf_counter() - start
        fo.seek(0)
        fe.seek(0)
        return Run(code, fo.read().decode(errors="replace"), fe.read().decode(errors="replace"), seconds, triggered)


def _wait(pid: int, start: float, timeout: float, kill_after: float | None, trigger) -> tuple[int | None, float | None]:
    """(exit code or None when killed, seconds to the trigger or None)."""
    timeout_at = start + timeout
    kill_at = start + kill_after if kill_after is not None and trigger is None else math.inf
    triggered = None
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status), triggered
        now = time.perf_counter()
        if triggered is None and trigger is not None and trigger():
            triggered = now - start
            if kill_after is not None:
                kill_at = now + kill_after
        if now >= min(kill_at, timeout_at):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return None, triggered
        time.sleep(0.0005 if trigger is not None and triggered is None else 0.002)


def cli(argv: list[str], timeout: float) -> Run:
    return forked(lambda: main(argv), timeout=timeout)


def subprocess_killed(argv: list[str], kill_after: float) -> Run:
    """`python -m llmeraser ARGV`, SIGKILLed after `kill_after` seconds unless it finished first."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "llmeraser", *argv], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        code = proc.wait(timeout=kill_after)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        code = None
    return Run(code, "", "", time.perf_counter() - start)


def subprocess_seconds(argv: list[str], timeout: float) -> float:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "llmeraser", *argv], env=ENV, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr
    return time.perf_counter() - start


def quiet_main(argv: list[str]) -> int:
    with contextlib.redirect_stdout(io.StringIO()):
        return main(argv)


# ------------------------------------------------------------------------------------------------ bookkeeping
@dataclass
class Tally:
    counts: dict[str, dict[str, int]] = field(default_factory=lambda: {f: dict.fromkeys(COLUMNS, 0) for f in FAMILIES})
    runs: list[dict] = field(default_factory=list)

    def add(self, family: str, case: str, method: str, outcome: str, run: Run | None, **extra) -> None:
        counts = self.counts[family]
        counts["runs"] += 1
        counts[outcome] += 1
        for flag in ("inputs_changed", "broken"):
            if extra.get(flag) and outcome != flag:
                counts[flag] += 1
        record = {"family": family, "case": case, "method": method, "outcome": outcome}
        if run is not None:
            record |= {"exit": run.code, "seconds": round(run.seconds, 3)}
            err = run.err.strip().splitlines()
            if err and outcome != "completed":
                record["stderr"] = err[-1][:300]
        self.runs.append(record | extra)
        bad = outcome in MUST_BE_ZERO or extra.get("inputs_changed") or extra.get("broken")
        if bad:
            print(f"  !! {family} {case} {method}: {outcome} {extra} {record.get('stderr', '')}", flush=True)


@dataclass
class World:
    root: Path
    refs: Path
    seconds: dict[str, float] = field(default_factory=dict)
    rewind_is_retrain: bool = False

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    def inputs(self, adapter: Path) -> dict:
        """What no run may change: the adapter given, the base model, the training set, the request."""
        return {"adapter": tree(adapter), "base": tree(self.root / "base"),
                "train": (self.root / "train.jsonl").read_bytes(), "request": (self.root / "request.json").read_bytes()}

    def copy(self, where: Path) -> Path:
        shutil.rmtree(where, ignore_errors=True)
        where.mkdir(parents=True)
        shutil.copytree(self.adapter, where / "adapter")
        return where / "adapter"


def same(out: Path, reference: Path, names: tuple[str, ...]) -> bool:
    return all((out / n).is_file() and (out / n).read_bytes() == (reference / n).read_bytes() for n in names)


def judge(world: World, method: str, run: Run, out: Path, *, fallback_reference: bool = True) -> tuple[str, dict]:
    """The outcome of one input-attack run: (column, details)."""
    if run.code is None:
        return "hangs", {}
    if run.code == 2:
        err = [line for line in run.err.strip().splitlines() if not line.startswith("WARNING ")]  # logged warnings
        ok = len(err) == 1 and err[0].startswith("llmeraser: error:") and not out.exists()
        return "refused", {} if ok else {"broken": "a refusal that is not one error line, or that wrote its output"}
    if run.code == 1:
        return "exit1", {}
    if run.code != 0:
        return "other_exit", {}
    report = json.loads((out / "report.json").read_text())
    used = report.get("method")
    if used == "rewind":
        return ("completed", {"used": used}) if same(out, world.refs / "rewind", compared("rewind")) else \
            ("wrong", {"used": used, "why": "a rewind that is not the reference rewind (retraining)"})
    if used == "path":
        return ("completed", {"used": used}) if same(out, world.refs / "path", compared("path")) else \
            ("wrong", {"used": used, "why": "a path replay that is not the clean recording's replay"})
    if used == "first-order" and method == "auto":
        choice = report.get("update_choice") or ""
        stated = choice.startswith("auto chose first-order:") and len(choice) > len("auto chose first-order: ") + 10
        if not stated:
            return "wrong", {"used": used, "why": f"a fallback that does not say why: {choice!r}"}
        if fallback_reference and not same(out, world.refs / "first-order", (ADAPTER_WEIGHTS,)):
            return "wrong", {"used": used, "why": "a fallback that is not the clean first-order update"}
        return "fallback", {"used": used, "why": choice[:200]}
    if used == method:  # first-order asked for: no claim on the recording
        return "completed", {"used": used}
    return "wrong", {"used": used, "why": f"--method {method} gave method {used!r}"}


def attack(world: World, tally: Tally, family: str, case: str, method: str, adapter: Path, timeout: float,
           **extra) -> None:
    """Run `unlearn --method METHOD` on the attacked `adapter` (no ledger) and tally it."""
    out = adapter.parent / "out"
    before = world.inputs(adapter)
    run = cli(unlearn_argv(world.root, method, out, None, adapter=adapter), timeout)
    outcome, details = judge(world, method, run, out, fallback_reference=family != "c")
    if world.inputs(adapter) != before:
        details["inputs_changed"] = True
    tally.add(family, case, method, outcome, run, **extra, **details)
    shutil.rmtree(adapter.parent, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ (a) byte flips
def flips(world: World, tally: Tally, n: int, rng: random.Random, work: Path, timeout: float) -> None:
    size = (world.adapter / TRAJECTORY).stat().st_size
    data_start = 8 + struct.unpack("<Q", (world.adapter / TRAJECTORY).read_bytes()[:8])[0]
    for i in range(n):
        adapter = world.copy(work / f"a{i}")
        path = adapter / TRAJECTORY
        data = bytearray(path.read_bytes())
        offset, mask = rng.randrange(size), rng.randrange(1, 256)
        data[offset] ^= mask
        path.write_bytes(bytes(data))
        region = "length" if offset < 8 else "header" if offset < data_start else "tensors"
        attack(world, tally, "a", f"byte {offset} ({region}) ^ {mask:#04x}", ("rewind", "auto")[i % 2], adapter,
               timeout)


# ------------------------------------------------------------------------------------------------ (b) header fields
def random_value(rng: random.Random, current):
    kind = rng.randrange(12)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.randint(-10, 10)
    if kind == 3:
        return rng.choice([-1, 1]) * 10 ** rng.randint(3, 30)
    if kind == 4:
        return rng.uniform(-1, 1) * 10 ** rng.randint(-12, 6)
    if kind == 5:
        return "".join(rng.choice("ab01.-é ") for _ in range(rng.randint(0, 8)))
    if kind == 6:
        return [rng.randint(0, 3) for _ in range(rng.randint(0, 3))]
    if kind == 7:
        return {"x": rng.randint(0, 3)}
    if isinstance(current, bool) or current is None:
        return not current
    if isinstance(current, (int, float)):  # near the true value: the edits a replay might not notice
        return rng.choice([current + 1, current - 1, current * 2, -current, current * (1 + 1e-7), float(current)])
    if isinstance(current, str):
        return current[:-1] + ("0" if current[-1:] != "0" else "1")
    if isinstance(current, list) and current:
        shuffled = list(current)
        rng.shuffle(shuffled)
        return rng.choice([current[:-1], current + current[-1:], shuffled])
    if isinstance(current, dict) and current:
        key = rng.choice(sorted(current))
        return {k: v for k, v in current.items() if k != key}
    return [current]


def header(world: World, tally: Tally, n: int, rng: random.Random, work: Path, timeout: float) -> None:
    from safetensors import safe_open

    with safe_open(str(world.adapter / TRAJECTORY), framework="pt") as f:
        original = json.loads(f.metadata()["llmeraser"])
    fields = sorted(k for k in original if k != "header_sha256") + ["batches", "lrs"]
    nested = [(k, s) for k in ("recipe", "checksums") if isinstance(original.get(k), dict) for s in original[k]]
    for i in range(n):
        adapter = world.copy(work / f"b{i}")
        if nested and rng.random() < 0.25:
            key, sub = rng.choice(nested)
            value = random_value(rng, original[key][sub])

            def change(h, key=key, sub=sub, value=value):
                h[key][sub] = value

            case = f"{key}.{sub} = {json.dumps(value)[:60]}"
        else:
            key = rng.choice(fields)
            value = random_value(rng, original.get(key))

            def change(h, key=key, value=value):
                h[key] = value

            case = f"{key} = {json.dumps(value)[:60]}"
        edit_header(adapter, change)
        attack(world, tally, "b", case, ("rewind", "auto")[i % 2], adapter, timeout)


# ------------------------------------------------------------------------------------------------ (c) records
def malformed(rng: random.Random, text: str) -> tuple[str, str]:
    kind = rng.randrange(5)
    if kind == 0:
        cut = rng.randrange(len(text))
        return text[:cut], f"truncated at {cut}"
    if kind == 1:
        i = rng.randrange(len(text))
        return text[:i] + chr(ord(text[i]) ^ rng.randrange(1, 128)) + text[i + 1:], f"char {i} flipped"
    if kind == 2:
        return '{"task": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested 100,000 deep"
    if kind == 3:
        return rng.choice(["[]", "null", "3", '"task"', '{"task": 3}', '{"task": []}']), "not an object"
    return "", "empty"


def records(world: World, tally: Tally, n: int, rng: random.Random, work: Path, timeout: float) -> None:
    report = json.loads((world.adapter / "report.json").read_text())
    task = report["task"]
    keys = sorted(set(task) | {"max_length", "l2", "rendering", "data_fields", "optimizer", "dropout", "packing",
                               "train_sha256", "lora", "loss", "source", "base_model", "dtype"})
    for i in range(n):
        adapter = world.copy(work / f"c{i}")
        name = ("report.json", "training_record.json")[i % 2]
        if rng.random() < 0.6:
            key = rng.choice(keys)
            value = random_value(rng, task.get(key))
            edited = dict(task) | {key: value}
            content = report | {"task": edited} if name == "report.json" else {"task": edited}
            text, case = json.dumps(content), f"{name}: task.{key} = {json.dumps(value)[:60]}"
        else:
            base = json.dumps(report if name == "report.json" else {"task": task})
            text, how = malformed(rng, base)
            case = f"{name}: {how}"
        (adapter / name).write_text(text)
        attack(world, tally, "c", case, ("rewind", "auto", "first-order")[i % 3], adapter, timeout)


# ------------------------------------------------------------------------------------------------ (d) output paths
def output_cases(world: World, d: Path, adapter: Path) -> list[tuple[str, Path, Path | None]]:
    """(name, --out, --ledger) in a fresh folder `d` beside a copy of the adapter: each must be refused (exit 2),
    writing nothing."""
    (d / "a-file").write_text("x")
    (d / "full").mkdir()
    (d / "full" / "f").write_text("x")
    return [("out below a file", d / "a-file" / "out", d / "ledger"),
            ("out a file", d / "a-file", d / "ledger"),
            ("out a 300-character name", d / ("o" * 300), d / "ledger"),
            ("out below a 300-character name", d / ("o" * 300) / "out", d / "ledger"),
            ("out an existing folder with files", d / "full", None),
            ("ledger equal to out", d / "out", d / "out"),
            ("ledger inside out", d / "out", d / "out" / "ledger"),
            ("out inside ledger", d / "ledger" / "out", d / "ledger"),
            ("ledger inside the input adapter", d / "out", adapter / "ledger"),
            ("ledger equal to the input adapter", d / "out", adapter),
            ("out inside the input adapter", adapter / "out", d / "ledger"),
            ("out equal to the input adapter", adapter, d / "ledger"),
            ("out equal to the base model", world.root / "base", d / "ledger"),
            ("ledger a file", d / "out", d / "a-file"),
            ("ledger below a file", d / "out", d / "a-file" / "ledger"),
            ("ledger a 300-character name", d / "out", d / ("l" * 300))]


def outputs(world: World, tally: Tally, work: Path, timeout: float) -> None:
    probe = work / "d-probe"
    n = len(output_cases(world, probe, world.copy(probe)))
    shutil.rmtree(probe)
    for method in ("rewind", "path"):
        for j in range(n):
            d = work / f"d-{method}-{j}"
            adapter = world.copy(d)
            name, out, ledger = output_cases(world, d, adapter)[j]
            before = world.inputs(adapter)
            listed = sorted(os.listdir(d))
            run = cli(unlearn_argv(world.root, method, out, ledger, adapter=adapter), timeout)
            outcome = {None: "hangs", 0: "completed", 1: "exit1", 2: "refused"}.get(run.code, "other_exit")
            extra: dict = {}
            if outcome == "completed":
                outcome, extra = "wrong", {"why": "an output path that should be refused was accepted"}
            if sorted(os.listdir(d)) != listed:  # (and the adapter, the base model: the inputs' check)
                extra["broken"] = f"created {sorted(set(os.listdir(d)) - set(listed))}"
            if world.inputs(adapter) != before:
                extra["inputs_changed"] = True
            tally.add("d", name, method, outcome, run, **extra)
            shutil.rmtree(d, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ (e) kills
def kills(world: World, tally: Tally, method: str, n: int, rng: random.Random, work: Path, timeout: float) -> None:
    """n SIGKILLs of `unlearn --method METHOD --ledger`, in turn of: a `python -m llmeraser` subprocess at a random
    time in its run (start-up and all); a forked `main` at a random time in its run (the work only); a forked `main`
    at a random time after its output's temporary folder appears (the writing: staging, rename, commit — the window a
    uniform time rarely hits). Each is followed by the checks, a rerun and a no-op rerun."""
    family = f"e-{method}"
    d_sub, d_fork = world.seconds[f"subprocess {method}"], world.seconds[f"forked {method}"]
    d_write = world.seconds[f"forked {method}, writing"]
    out, ledger = work / f"e-{method}" / "out", work / f"e-{method}" / "ledger"
    out.parent.mkdir(parents=True, exist_ok=True)
    argv = unlearn_argv(world.root, method, out, ledger)
    reference = world.refs / method
    for i in range(n):
        before = world.inputs(world.adapter)
        if i % 3 == 1:
            when, kind = rng.uniform(0, d_sub), "subprocess"
            killed = subprocess_killed(argv, when)
        elif i % 3 == 0:
            when, kind = rng.uniform(0, d_fork), "forked"
            killed = forked(lambda: main(argv), timeout=timeout, kill_after=when)
        else:
            when, kind = rng.uniform(0, d_write), "forked, writing"
            killed = forked(lambda: main(argv), timeout=timeout, kill_after=when,
                            trigger=lambda: bool(stale_temporaries(out)))
        extra: dict = {"kill": kind, "at": round(when, 3), "finished_first": killed.code is not None}
        if killed.code not in (None, 0):
            extra["broken"] = f"the run to be killed exited {killed.code}: {killed.err.strip()[-200:]}"
        broken, wrong = [], []
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                status, entry = ledger_state(out, ledger)
            extra["state"] = status
            if status == "pending":
                extra["state"] += f", {'staged' if entry.staged_sha256 else 'not staged'}, output " + \
                    ("in place" if out.exists() else "absent")
            if status == "applied" and not same(out, reference, compared(method)):
                wrong.append("the killed run's applied output differs from the reference")
        except AssertionError as e:
            broken.append(f"after the kill: {e}")
        extra["temporaries_left"] = len(stale_temporaries(out))
        rerun = cli(argv, timeout)
        outcome = {None: "hangs", 0: "completed", 1: "exit1", 2: "refused"}.get(rerun.code, "other_exit")
        if rerun.code not in (None, 0):
            broken.append(f"the rerun did not complete: exit {rerun.code}")
        if rerun.code == 0:
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    assert ledger_state(out, ledger)[0] == "applied", "the rerun did not leave the request applied"
            except AssertionError as e:
                broken.append(f"after the rerun: {e}")
            if not same(out, reference, compared(method)):
                wrong.append("the rerun's output differs from the reference")
            if STALE_CLEANUP and stale_temporaries(out):
                broken.append(f"the rerun left temporaries {stale_temporaries(out)}")
            noop = cli(argv, timeout)
            if noop.code != 0 or "already applied" not in noop.out:
                broken.append(f"the second rerun is not a no-op: exit {noop.code}, {noop.err.strip()[-200:]}")
        if wrong:
            outcome, extra["why"] = "wrong", "; ".join(wrong)
        if broken:
            extra["broken"] = "; ".join(broken)
        if world.inputs(world.adapter) != before:
            extra["inputs_changed"] = True
        tally.add(family, f"kill {i}", method, outcome, rerun, **extra)
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(ledger, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ the world
def build(work: Path, timeout: float) -> World:
    root = work / "world"
    root.mkdir(parents=True)
    assert forked(lambda: (recorded_world(root), 0)[1], timeout=timeout).code == 0, "building the world failed"
    world = World(root, work / "refs")
    for method in ("rewind", "path", "first-order"):
        run = cli(unlearn_argv(root, method, world.refs / method, None), timeout)
        assert run.code == 0, run.err
        world.seconds[f"forked {method}"] = run.seconds
    again = cli(unlearn_argv(root, "rewind", world.refs / "rewind-again", None), timeout)  # warm timing
    world.seconds["forked rewind"] = again.seconds
    for method in ("rewind", "path"):  # how long the writing takes: from the output's temporary to the end
        tmp = work / f"write-{method}"
        tmp.mkdir()
        run = forked(lambda tmp=tmp, method=method: main(unlearn_argv(root, method, tmp / "out", tmp / "ledger")),
                     timeout=timeout, trigger=lambda tmp=tmp: bool(stale_temporaries(tmp / "out")))
        assert run.code == 0 and run.triggered is not None, run.err
        world.seconds[f"forked {method}, writing"] = run.seconds - run.triggered
        shutil.rmtree(tmp)
    # the exactness claim itself: rewind equals a retrain without ex3 (`finetune` on the edited set)
    kept = [e for e in load_examples(root / "train.jsonl") if e.id != "ex3"]
    save_examples(kept, work / "kept.jsonl")
    run = cli(["finetune", "--base-model", str(root / "base"), "--train", str(work / "kept.jsonl"), "--out",
               str(world.refs / "retrain"), *FINETUNE, "--quiet"], timeout)
    assert run.code == 0, run.err
    world.rewind_is_retrain = same(world.refs / "rewind", world.refs / "retrain", (ADAPTER_WEIGHTS,))
    for method in ("rewind", "path"):  # a cold start, then a warm one that times the subprocess (and checks bytes)
        for k in range(2):
            tmp = work / f"sub-{method}-{k}"
            seconds = subprocess_seconds(unlearn_argv(root, method, tmp / "out", tmp / "ledger"), timeout)
            assert same(tmp / "out", world.refs / method, compared(method)), f"{method}: a subprocess differs"
            shutil.rmtree(tmp)
        world.seconds[f"subprocess {method}"] = seconds
    return world


# ------------------------------------------------------------------------------------------------ report
def table(counts: dict[str, dict[str, int]]) -> str:
    lines = ["| family | " + " | ".join(HEADS[c] for c in COLUMNS) + " |",
             "| --- | " + " | ".join("---:" for _ in COLUMNS) + " |"]
    total = dict.fromkeys(COLUMNS, 0)
    for fam, row in counts.items():
        lines.append(f"| ({fam}) {FAMILIES[fam]} | " + " | ".join(str(row[c]) for c in COLUMNS) + " |")
        for c in COLUMNS:
            total[c] += row[c]
    lines.append("| **all** | " + " | ".join(f"**{total[c]}**" for c in COLUMNS) + " |")
    return "\n".join(lines)


def write(out: Path, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    counts, runs = result["counts"], result["runs"]
    bad = [r for r in runs if r["outcome"] in MUST_BE_ZERO or r.get("inputs_changed") or r.get("broken")]
    states: dict[str, dict[str, int]] = {}
    for r in runs:
        if r["family"].startswith("e-"):
            left = "finished before the kill" if r["finished_first"] else r.get("state") or "no ledger entry"
            key = f"{r['kill']}: {left}"
            states.setdefault(r["family"], {}).setdefault(key, 0)
            states[r["family"]][key] += 1
    outcomes: dict[str, int] = {}
    for r in runs:
        if r["family"] in ("a", "b", "c") and r["outcome"] in ("completed", "fallback"):
            key = f"({r['family']}) {r['method']} → {r.get('used')}"
            outcomes[key] = outcomes.get(key, 0) + 1
    md = [f"# Attacks (issue 29): {result['verdict']}", "",
          f"`{result['command']}` — wall time {result['wall_seconds']:.0f} s ({result['wall_seconds'] / 60:.1f} min) "
          f"on {result['machine']}, {result['date']}.", "",
          table(counts), "",
          "Columns: *exit 0, as the reference* — completed, and equal to the clean reference where the method claims "
          "to use the recording (rewind: retraining, bit for bit; path: the clean recording's replay), or "
          "`--method first-order` asked for; *stated fallback* — `auto` took the one-step update, the report saying "
          "why, equal to the clean first-order update (families a, b); *silently wrong* — an exit-0 output that "
          "differs from its reference, or a fallback that does not say why; *broken invariants* — a refusal that is "
          "not one error line (logged warnings aside) or wrote something, a kill state the ledger does not account "
          "for, a rerun after a kill that does not complete, leaves a temporary or is not then a no-op. For the kill "
          "families, the exit columns are the rerun's. Must be 0: exit 1, other exit, hangs, silently wrong, inputs "
          "changed, broken invariants.", "",
          f"References: the clean rewind equals `finetune` on the set without ex3, byte for byte: "
          f"**{result['rewind_is_retrain']}**. Uninterrupted runs (kill times are drawn in (0, these); "
          f"'writing': from the output's temporary folder to the end): "
          + ", ".join(f"{k} {v:.2f} s" for k, v in result["seconds"].items())
          + f". Per-run timeout {result['timeout']:.0f} s. Stale-temporary cleanup checked: {result['stale_cleanup']}.",
          "", "What the kills left (before the rerun):", ""]
    for fam, row in states.items():
        md.append(f"- ({fam}): " + "; ".join(f"{k} ×{v}" for k, v in sorted(row.items())))
    md += ["", "Input attacks that completed, by method asked → method used:", ""]
    md += [f"- {k}: {v}" for k, v in sorted(outcomes.items())]
    md += ["", "Every run, with its case and outcome: results.json."]
    if bad:
        md += ["", "## Failures", ""] + [f"- {json.dumps(r, ensure_ascii=False)}" for r in bad]
    (out / "results.md").write_text("\n".join(md) + "\n")


def main_(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "attacks", help="results folder")
    ap.add_argument("--kills", type=int, default=100, help="SIGKILLs, split evenly across rewind and path")
    ap.add_argument("--runs", type=int, default=40, help="runs of each input family (a, b, c)")
    ap.add_argument("--quick", action="store_true", help="6 kills and 4 runs per input family")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=180, help="seconds before a run counts as a hang")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args(argv)
    kills_n, runs_n = (6, 4) if args.quick else (args.kills, args.runs)
    given = sys.argv[1:] if argv is None else argv
    command = " ".join([".venv/bin/python bench/attacks.py", *given])
    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="llmeraser-attacks-"))
    tally = Tally()
    try:
        world = build(work, args.timeout)
        print(f"world and references ready in {time.perf_counter() - start:.0f} s: {world.seconds}", flush=True)
        rng = random.Random(args.seed)
        steps = [("a", lambda: flips(world, tally, runs_n, rng, work, args.timeout)),
                 ("b", lambda: header(world, tally, runs_n, rng, work, args.timeout)),
                 ("c", lambda: records(world, tally, runs_n, rng, work, args.timeout)),
                 ("d", lambda: outputs(world, tally, work, args.timeout)),
                 ("e-rewind", lambda: kills(world, tally, "rewind", kills_n - kills_n // 2, rng, work, args.timeout)),
                 ("e-path", lambda: kills(world, tally, "path", kills_n // 2, rng, work, args.timeout))]
        for fam, step in steps:
            t = time.perf_counter()
            step()
            print(f"({fam}) {FAMILIES[fam]}: {tally.counts[fam]} in {time.perf_counter() - t:.0f} s", flush=True)
    finally:
        if args.keep:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    wall = time.perf_counter() - start
    bad = sum(row[c] for row in tally.counts.values() for c in MUST_BE_ZERO)
    result = {"verdict": "every goal met" if bad == 0 else f"{bad} failures", "command": command,
              "wall_seconds": round(wall, 1), "date": time.strftime("%Y-%m-%d"),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, one thread",
              "kills": kills_n, "runs_per_input_family": runs_n, "seed": args.seed, "timeout": args.timeout,
              "stale_cleanup": STALE_CLEANUP, "rewind_is_retrain": world.rewind_is_retrain,
              "seconds": {k: round(v, 3) for k, v in world.seconds.items()},
              "counts": tally.counts, "runs": tally.runs}
    write(args.out, result)
    print(table(tally.counts))
    print(f"{result['verdict']}; wall time {wall:.0f} s; written {args.out / 'results.md'}")
    return 0 if bad == 0 else 1


if __name__ == "__main__":
    sys.exit(main_())
