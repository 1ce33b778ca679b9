"""Hostile and broken input through the CLI: random and malformed request and data files, broken adapters.

Every case must end with exit code 2 and one line on stderr that starts with "llmeraser: error:" — never a
traceback, never exit 1 — and every input file must be byte-identical afterwards, with no output folder written.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path

import pytest
from fixtures.tiny import fact_examples, tiny_lineage, tiny_llama, tiny_tokenizer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from llmeraser.cli import main
from llmeraser.params import ADAPTER_WEIGHTS

TRAIN_IDS = [e.id for e in fact_examples(12, seed=1)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny base model folder, its training set and an adapter fine-tuned on it; and a second, wider base model."""
    root = tmp_path_factory.mktemp("hostile")
    tiny_lineage(root)
    (root / "wide").mkdir()
    tiny_lineage(root / "wide", hidden=32)  # another base model (wider)
    return root


def _files(paths: list[Path]) -> dict[str, bytes]:
    out = {}
    for p in paths:
        for f in ([p] if p.is_file() else sorted(p.rglob("*")) if p.is_dir() else []):
            if f.is_file():
                out[str(f)] = f.read_bytes()
    return out


def refused(capsys, world: Path, *, request: bytes | None = None, train: bytes | None = None,
            adapter: Path | None = None, base: Path | None = None, ledger: bool = False,
            extra: list[str] | None = None) -> str:
    """Run `unlearn` on the given inputs; assert exit 2, one error line, inputs unchanged, no output."""
    work = Path(tempfile.mkdtemp(dir=world))
    try:
        req = work / "request.json"
        req.write_bytes(request if request is not None else b'{"edits": [{"op": "remove", "id": "ex0"}]}')
        tr = world / "train.jsonl"
        if train is not None:
            tr = work / "train.jsonl"
            tr.write_bytes(train)
        adapter = adapter or world / "adapter"
        inputs = [req, tr, adapter]
        before = _files(inputs)
        argv = ["unlearn", "--base-model", str(base or world / "base"), "--adapter", str(adapter), "--train", str(tr),
                "--request", str(req), "--out", str(work / "out"), "--method", "first-order", "--quiet"]
        if ledger:
            argv += ["--ledger", str(work / "ledger")]
        argv += extra or []
        capsys.readouterr()
        code = main(argv)
        captured = capsys.readouterr()
        err = captured.err.strip()
        assert code == 2, (code, err)
        assert len(err.splitlines()) == 1 and err.startswith("llmeraser: error:") and "Traceback" not in err
        assert _files(inputs) == before and not (work / "out").exists()
        return err
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ strategies
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
                      st.text(max_size=30))
json_value = st.recursive(json_leaf, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                             st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                          max_leaves=12)
huge = st.text(min_size=1, max_size=10).map(lambda s: s * 2000)  # ids and prompts of thousands of characters
bad_id = st.one_of(st.just(""), st.text(min_size=1, max_size=40).filter(lambda s: s not in TRAIN_IDS), huge,
                   st.integers(), st.none(), st.lists(st.text(max_size=3)))
any_text = st.one_of(st.text(max_size=50), huge, st.integers(), st.none())
bad_edit = st.one_of(
    st.fixed_dictionaries({"op": st.sampled_from(["remove", "modify_query", "correct_response"]), "id": bad_id}),
    st.fixed_dictionaries({"op": st.text(max_size=12).filter(lambda s: s not in ("remove", "modify_query",
                                                                               "correct_response")),
                           "id": st.sampled_from(TRAIN_IDS)}),
    st.fixed_dictionaries({"op": st.just("modify_query"), "id": st.sampled_from(TRAIN_IDS), "prompt": any_text,
                           "response": any_text}),
    st.fixed_dictionaries({"op": st.just("remove"), "id": st.sampled_from(TRAIN_IDS), "prompt": any_text}),
    st.dictionaries(st.text(max_size=8), json_value, max_size=3),
)
bad_request = st.one_of(
    json_value.filter(lambda v: not isinstance(v, dict) or "edits" not in v),
    st.fixed_dictionaries({"edits": st.lists(bad_edit, min_size=1, max_size=3)}),
    st.fixed_dictionaries({"edits": st.one_of(st.just([]), json_leaf)}),
    st.fixed_dictionaries({"edits": st.just([]), "extra": json_value}),
)


def _dumps(value) -> bytes:
    return json.dumps(value, allow_nan=True).encode("utf-8", "surrogatepass")


SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                           HealthCheck.too_slow])


@SETTINGS
@given(request=bad_request, ledger=st.booleans())
def test_malformed_requests_are_refused(world, capsys, request, ledger):
    refused(capsys, world, request=_dumps(request), ledger=ledger)


@SETTINGS
@given(raw=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(lambda s: s.encode("utf-8", "surrogatepass")),
                     st.integers(1, 20000).map(lambda n: b"[" * n + b"]" * n)))
def test_random_bytes_as_request_are_refused(world, capsys, raw):
    refused(capsys, world, request=raw)


bad_line = st.one_of(
    json_value.map(lambda v: json.dumps(v, allow_nan=True)),
    st.fixed_dictionaries({"id": bad_id, "prompt": any_text, "response": any_text}).map(json.dumps),
    st.text(max_size=80),
    st.just("{" * 3000),
)


@SETTINGS
@given(lines=st.lists(bad_line, min_size=1, max_size=4), keep=st.integers(0, 12))
def test_malformed_training_files_are_refused(world, capsys, lines, keep):
    """Good lines (never ex0, which the request removes) followed by bad ones: a defect, or at least no ex0."""
    good = (world / "train.jsonl").read_text().splitlines()[1:keep]
    refused(capsys, world, train="\n".join([*good, *lines]).encode("utf-8", "surrogatepass"))


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_adapter_weights_are_refused(world, capsys, tmp_path, value):
    broken = tmp_path / "broken"
    shutil.copytree(world / "adapter", broken)
    tensors = load_file(broken / ADAPTER_WEIGHTS)
    name = sorted(tensors)[0]
    tensors[name].view(-1)[0] = value
    save_file(tensors, broken / ADAPTER_WEIGHTS)
    assert "non-finite" in refused(capsys, world, adapter=broken)


def test_an_adapter_for_another_base_model_is_refused(world, capsys):
    assert "does not fit the base model" in refused(capsys, world, base=world / "wide" / "base")


def test_a_request_for_another_training_set_is_refused(world, capsys):
    other = [e.to_dict() | {"id": "other-" + e.id} for e in fact_examples(12, seed=1)]
    err = refused(capsys, world, train="\n".join(json.dumps(o) for o in other).encode())
    assert "unknown example id 'ex0'" in err


def test_broken_adapter_files_are_refused(world, capsys, tmp_path):
    for name, content in ((ADAPTER_WEIGHTS, b"not safetensors"), ("adapter_config.json", b"{broken")):
        broken = tmp_path / name
        shutil.copytree(world / "adapter", broken)
        (broken / name).write_bytes(content)
        refused(capsys, world, adapter=broken)
    pickled = tmp_path / "pickled"
    shutil.copytree(world / "adapter", pickled)
    (pickled / ADAPTER_WEIGHTS).rename(pickled / "adapter_model.bin")
    assert "pickled weights are refused" in refused(capsys, world, adapter=pickled)


@pytest.mark.parametrize("ledger", [False, True])
def test_lone_surrogates_are_refused(world, capsys, ledger):
    """JSON escapes can carry strings UTF-8 cannot encode; hashing them would crash, so they are refused first."""
    assert "not valid Unicode" in refused(capsys, world, request=b'{"edits": [{"op": "remove", "id": "\\ud800"}]}',
                                          ledger=ledger)
    line = b'{"id": "x\\udfff", "prompt": "p", "response": " Yes"}'
    assert "not valid Unicode" in refused(capsys, world, train=line, ledger=ledger)


# --------------------------------------------------------------------------------------------- resource guard
def test_resource_guard_refuses_what_cannot_fit(world, capsys, monkeypatch):
    """With (simulated) 1 KiB of free memory, a dense solve and a per-example gradient matrix are refused before any
    work, and the message names the option that fits; with the real memory they run."""
    import llmeraser.resources as resources
    from llmeraser.curvature import per_example_gradients
    from llmeraser.task import CausalLMTask
    from llmeraser.testing import tiny_lora

    tok = tiny_tokenizer()
    model = tiny_lora(tiny_llama(len(tok), init_std=0.3), r=2)
    task, examples = CausalLMTask(tok, max_length=24), fact_examples(40, seed=3)
    assert per_example_gradients(model, task, examples).shape[0] == 40
    monkeypatch.setattr(resources, "available_bytes", lambda: 2**10)
    with pytest.raises(resources.ResourceError, match=r"per-example gradients \(40 examples.*--solver cg"):
        per_example_gradients(model, task, examples)
    err = refused(capsys, world, request=b'{"edits": [{"op": "remove", "id": "ex0"}]}', extra=["--solver", "dense"])
    assert "solver 'dense'" in err and "available" in err and "--solver cg" in err


def test_a_recorded_chat_template_that_never_ends_is_refused(world, capsys, tmp_path, monkeypatch):
    """A training record is untrusted input, its chat template code: one that loops for hours ends in exit 2."""
    import llmeraser.task
    from llmeraser.testing import chat_records

    monkeypatch.setattr(llmeraser.task, "TEMPLATE_SECONDS", 1.0)
    adapter = tmp_path / "adapter"
    shutil.copytree(world / "adapter", adapter)
    (adapter / "trajectory.safetensors").unlink(missing_ok=True)
    report = json.loads((adapter / "report.json").read_text())
    report["task"].pop("train_sha256", None)
    report["task"]["rendering"] = {"chat_template": "{% for i in range(100000) %}{% for j in range(100000) %}"
                                                    "{% endfor %}{% endfor %}"}
    (adapter / "report.json").write_text(json.dumps(report))
    train = "".join(json.dumps(r) + "\n" for r in chat_records(4)).encode()
    err = refused(capsys, world, request=b'{"edits": [{"op": "remove", "id": "chat0"}]}', train=train,
                  adapter=adapter)
    assert "the chat template took longer than 1 s" in err and "rendering.chat_template" in err


role = st.one_of(st.sampled_from(["user", "assistant", "system", "tool"]), st.text(max_size=6), st.integers(),
                 st.none())
message = st.one_of(st.fixed_dictionaries({"role": role, "content": any_text}),
                    st.dictionaries(st.sampled_from(["role", "content", "name", "tool_calls"]), json_value, max_size=3))
chat_record = st.fixed_dictionaries({"id": st.sampled_from(["c0", "c1", "c2"]),
                                     "messages": st.one_of(st.lists(message, max_size=4), json_value)})


@SETTINGS
@given(records=st.lists(chat_record, min_size=1, max_size=3),
       response=st.one_of(any_text, st.lists(message, min_size=1, max_size=2)))
def test_random_chat_data_and_chat_requests_never_fail_unnamed(world, capsys, records, response):
    """Chat records and a correct_response on one, any shapes: exit 0, or exit 2 with one named error line; never
    exit 1, and the inputs are unchanged."""
    work = Path(tempfile.mkdtemp(dir=world))
    try:
        train, req = work / "chat.jsonl", work / "request.json"
        train.write_bytes(b"\n".join(_dumps(r) for r in records))
        req.write_bytes(_dumps({"edits": [{"op": "correct_response", "id": records[0]["id"], "response": response}]}))
        before = _files([train, req, world / "adapter"])
        capsys.readouterr()
        code = main(["unlearn", "--base-model", str(world / "base"), "--adapter", str(world / "adapter"), "--train",
                     str(train), "--request", str(req), "--out", str(work / "out"), "--method", "first-order",
                     "--quiet"])
        err = capsys.readouterr().err.strip()
        assert code in (0, 2), err
        assert code == 0 or (len(err.splitlines()) == 1 and err.startswith("llmeraser: error:")), err
        assert _files([train, req, world / "adapter"]) == before
    finally:
        shutil.rmtree(work, ignore_errors=True)
