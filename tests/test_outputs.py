"""Outputs and side effects, checked before the work: output paths that cannot be written or would land in an input
are refused up front (exit 2, nothing written, no ledger); temporaries of killed runs are cleaned; files and folders
follow the umask; saving an adapter never reaches the network."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from fixtures.tiny import fact_examples, tiny_lineage

from llmeraser import io
from llmeraser.cli import main
from llmeraser.ledger import Ledger


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny base model folder, train.jsonl, an adapter fine-tuned on it, a request and a validation set."""
    root = tmp_path_factory.mktemp("outputs")
    tiny_lineage(root)
    (root / "request.json").write_text(json.dumps({"edits": [{"op": "remove", "id": "ex0"}]}))
    (root / "valid.jsonl").write_text("".join(json.dumps({**e.to_dict(), "id": f"v{i}"}) + "\n"
                                              for i, e in enumerate(fact_examples(4, seed=2))))
    return root


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` (hidden ones too), with a file's bytes."""
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def _no_work(*args, **kwargs):
    raise AssertionError("the work started before the outputs were checked")


def refused(capsys, monkeypatch, world: Path, argv: list[str], named: Path) -> str:
    """Run `argv`; assert exit 2 before any model is loaded, one error line naming `named`, nothing written anywhere
    under `world` (inputs byte-identical, no ledger, no temporary)."""
    monkeypatch.setattr("llmeraser.models.load_base_model", _no_work)
    before = _tree(world)
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, (code, err)
    assert len(err.splitlines()) == 1 and err.startswith("llmeraser: error:"), err
    assert str(named) in err, err
    assert _tree(world) == before  # nothing written: no output, no temporary, no ledger (nor a request recorded)
    return err


def unlearn_argv(world: Path, out: Path, ledger: Path | None, adapter: Path | None = None,
                 request: Path | None = None) -> list[str]:
    return ["unlearn", "--base-model", str(world / "base"), "--adapter", str(adapter or world / "adapter"), "--train",
            str(world / "train.jsonl"), "--request", str(request or world / "request.json"), "--out", str(out),
            "--method", "first-order", "--quiet", *(["--ledger", str(ledger)] if ledger else [])]


@pytest.fixture
def work(world):
    folder = Path(tempfile.mkdtemp(dir=world))
    yield folder
    for p in [folder, *folder.rglob("*")]:
        if p.is_dir():
            p.chmod(0o755)
    shutil.rmtree(folder)


def _unwritable(monkeypatch, folder: Path) -> None:
    """`folder` read-only; as root (who bypasses permissions) os.access is told so, as access(2) tells other users."""
    folder.mkdir()
    folder.chmod(0o555)
    if os.geteuid() == 0:
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: (
            False if Path(p) == folder and mode & os.W_OK else real(p, mode, *a, **k)))


# (out, ledger, the path the error must name) for each case, from (world, work)
CASES = {
    "out parent is a file": lambda w, k: (k / "file" / "out", k / "ledger", k / "file"),
    "300-byte name": lambda w, k: (k / ("a" * 300), k / "ledger", "a" * 40),
    "unwritable parent": lambda w, k: (k / "ro" / "out", k / "ledger", k / "ro"),
    "out is the ledger": lambda w, k: (k / "both", k / "both", k / "both"),
    "ledger inside out": lambda w, k: (k / "out", k / "out" / "ledger", k / "out" / "ledger"),
    "out inside ledger": lambda w, k: (k / "ledger" / "out", k / "ledger", k / "ledger" / "out"),
    "ledger inside the adapter": lambda w, k: (k / "out", w / "adapter" / "ledger", w / "adapter" / "ledger"),
    "out inside the adapter": lambda w, k: (w / "adapter" / "out", k / "ledger", w / "adapter" / "out"),
    "out inside the base model": lambda w, k: (w / "base" / "out", k / "ledger", w / "base" / "out"),
    "out taken, new ledger": lambda w, k: (k / "taken", k / "ledger", k / "taken"),
}
LEDGER_CASES = ("out is the ledger", "ledger inside out", "out inside ledger", "ledger inside the adapter",
                "out taken, new ledger")  # without a ledger: nothing to refuse (or refused before the work already)


@pytest.mark.parametrize("case, with_ledger", [(c, True) for c in CASES] + [(c, False) for c in CASES
                                                                             if c not in LEDGER_CASES])
def test_unlearn_refuses_bad_outputs_before_any_work(world, work, capsys, monkeypatch, case, with_ledger):
    out, ledger, named = CASES[case](world, work)
    if case == "out parent is a file":
        (work / "file").write_text("a file")
    if case == "unwritable parent":
        _unwritable(monkeypatch, work / "ro")
    if case == "out taken, new ledger":
        (work / "taken").mkdir()
        (work / "taken" / "x").write_text("taken")
    refused(capsys, monkeypatch, world, unlearn_argv(world, out, ledger if with_ledger else None), named)


def test_a_bad_output_records_nothing_in_an_existing_ledger(world, work, capsys, monkeypatch):
    ledger = work / "ledger"
    assert main(unlearn_argv(world, work / "first", ledger)) == 0
    with Ledger(ledger, create=False) as book:
        entries = [(e.seq, e.status) for e in book.entries()]
    (work / "file").write_text("a file")
    (work / "second.json").write_text(json.dumps({"edits": [{"op": "remove", "id": "ex1"}]}))
    refused(capsys, monkeypatch, world, unlearn_argv(world, work / "file" / "second", ledger, work / "first",
                                                     work / "second.json"), work / "file")
    with Ledger(ledger, create=False) as book:
        assert [(e.seq, e.status) for e in book.entries()] == entries == [(1, "applied")]


def test_out_inside_a_training_folder_is_refused(world, work, capsys, monkeypatch):
    datasets = pytest.importorskip("datasets")
    folder = work / "train-folder"
    datasets.Dataset.from_list([e.to_dict() for e in fact_examples(12, seed=1)]).save_to_disk(str(folder))
    argv = unlearn_argv(world, folder / "out", None)
    argv[argv.index("--train") + 1] = str(folder)
    refused(capsys, monkeypatch, world, argv, folder / "out")


def finetune_argv(world: Path, out: Path) -> list[str]:
    return ["finetune", "--base-model", str(world / "base"), "--train", str(world / "train.jsonl"), "--out", str(out),
            "--epochs", "1", "--lora-r", "1", "--lora-targets", "q_proj", "--max-length", "24", "--quiet"]


@pytest.mark.parametrize("case", ["out parent is a file", "out inside the base model", "out taken", "unwritable"])
def test_finetune_refuses_bad_outputs_before_any_work(world, work, capsys, monkeypatch, case):
    out = {"out parent is a file": work / "file" / "out", "out inside the base model": world / "base" / "out",
           "out taken": work / "taken", "unwritable": work / "ro" / "out"}[case]
    if case == "out parent is a file":
        (work / "file").write_text("a file")
    if case == "out taken":
        (work / "taken").mkdir()
        (work / "taken" / "x").write_text("taken")
    if case == "unwritable":
        _unwritable(monkeypatch, work / "ro")
    refused(capsys, monkeypatch, world, finetune_argv(world, out), out if case != "unwritable" else work / "ro")


@pytest.mark.parametrize("command", ["fit-curvature", "tune-damping"])
def test_factor_store_checked_before_any_work(world, work, capsys, monkeypatch, command):
    argv = [command, "--base-model", str(world / "base"), "--adapter", str(world / "adapter"), "--train",
            str(world / "train.jsonl"), "--quiet", *(["--valid", str(world / "valid.jsonl")]
                                                      if command == "tune-damping" else [])]
    refused(capsys, monkeypatch, world, [*argv, "--factors", str(world / "base" / "factors")],
            world / "base" / "factors")
    (work / "file").write_text("a file")
    refused(capsys, monkeypatch, world, [*argv, "--factors", str(work / "file" / "factors")], work / "file")


# ------------------------------------------------------------------------------------------ stale temporaries
KILLED = """
import os, signal, sys
from pathlib import Path
from llmeraser import io
target = Path(sys.argv[1])
if sys.argv[2] == "dir":
    with io.atomic_dir(target) as tmp:
        (tmp / "half.bin").write_bytes(b"half")
        os.kill(os.getpid(), signal.SIGKILL)
tmp, fd = io._new_temporary(target, folder=False)
os.write(fd, b"half")
os.kill(os.getpid(), signal.SIGKILL)
"""


def _temporaries(target: Path) -> list[Path]:
    return sorted(target.parent.glob(f".{target.name}.*.tmp"))


@pytest.mark.parametrize("kind", ["dir", "file"])
def test_a_killed_writer_leaves_a_temporary_the_next_write_removes(tmp_path, kind):
    target = tmp_path / ("out" if kind == "dir" else "out.json")
    run = subprocess.run([sys.executable, "-c", KILLED, str(target), kind], capture_output=True)
    assert run.returncode == -signal.SIGKILL, run.stderr
    assert len(_temporaries(target)) == 1 and not target.exists()
    if kind == "dir":
        with io.atomic_dir(target) as tmp:
            (tmp / "whole.bin").write_bytes(b"whole")
        assert [p.name for p in target.iterdir()] == ["whole.bin"]
    else:
        io.atomic_write_json(target, {"whole": True})
        assert json.loads(target.read_text()) == {"whole": True}
    assert _temporaries(target) == []


def test_a_live_writers_temporary_is_kept(tmp_path):
    target = tmp_path / "out"
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f".out.{io._HOST}-{alive.pid}.0123abcd.tmp"
        mine = tmp_path / f".out.{io._HOST}-{os.getpid()}.89abcdef.tmp"
        other_host = tmp_path / f".out.{'0' * 8 if io._HOST != '0' * 8 else '1' * 8}-999999.01234567.tmp"
        not_ours = tmp_path / ".out.abcdefgh.tmp"  # a name this module does not make
        for p in (live, mine, other_host, not_ours):
            p.mkdir()
        with io.atomic_dir(target) as tmp:
            (tmp / "x").write_text("x")
        io.atomic_write_json(tmp_path / "out.json", {})
        assert _temporaries(target) == sorted([live, mine, other_host, not_ours])
    finally:
        alive.kill()
        alive.wait()
    io.remove_stale_temporaries(target)
    assert live not in _temporaries(target) and mine in _temporaries(target)


# ------------------------------------------------------------------------------------------------ permissions
@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_follow_the_umask(tmp_path, umask):
    before = os.umask(umask)
    try:
        io.atomic_write_bytes(tmp_path / "file.bin", b"x")
        with io.atomic_dir(tmp_path / "folder") as tmp:
            io.atomic_write_json(tmp / "inner.json", {})
            (tmp / "plain.txt").write_text("y")
    finally:
        os.umask(before)
    mode = lambda p: p.stat().st_mode & 0o777  # noqa: E731
    assert mode(tmp_path / "file.bin") == 0o666 & ~umask
    assert mode(tmp_path / "folder") == 0o777 & ~umask
    assert mode(tmp_path / "folder" / "inner.json") == mode(tmp_path / "folder" / "plain.txt") == 0o666 & ~umask


# ---------------------------------------------------------------------------------------------------- network
@pytest.fixture
def no_network(monkeypatch):
    """Every connection and name lookup raises (and is recorded); the Hugging Face offline switches are off, so that
    only the code under test can keep the process offline."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(repr(args)[:200])
        raise OSError("network forbidden in this test")

    for name in ("connect", "connect_ex"):
        monkeypatch.setattr(socket.socket, name, refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    return attempts


@pytest.fixture
def unresolvable_adapter(world, tmp_path, monkeypatch):
    """A copy of the adapter whose recorded base model is a relative path that does not resolve from the working
    folder (as in an adapter made elsewhere)."""
    adapter = tmp_path / "adapter"
    shutil.copytree(world / "adapter", adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "models/base-that-is-not-here"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    monkeypatch.chdir(tmp_path)
    return adapter


def test_saving_an_adapter_never_reaches_the_network(world, tmp_path, no_network, unresolvable_adapter):
    from llmeraser.models import load_base_model
    from llmeraser.params import load_adapter, save_adapter

    base, _ = load_base_model(str(world / "base"), device="cpu")
    model = load_adapter(base, unresolvable_adapter)
    assert model.peft_config["default"].base_model_name_or_path == "models/base-that-is-not-here"
    save_adapter(model, tmp_path / "saved")
    assert no_network == []
    assert (tmp_path / "saved" / "adapter_model.safetensors").is_file()


def test_the_cli_runs_offline(world, tmp_path, no_network, unresolvable_adapter, capsys):
    assert main(unlearn_argv(world, tmp_path / "out", None, unresolvable_adapter)) == 0
    assert no_network == []
    assert os.environ["HF_HUB_OFFLINE"] == os.environ["TRANSFORMERS_OFFLINE"] == "1"
    import huggingface_hub.constants

    assert huggingface_hub.constants.HF_HUB_OFFLINE is True
