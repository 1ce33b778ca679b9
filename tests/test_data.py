"""Tests of llmeraser.data: JSONL loading, error messages, saving and hashing."""

from __future__ import annotations

import json

import pytest

from llmeraser.data import Example, examples_hash, load_examples, parse_examples, save_examples
from llmeraser.errors import DataError, UserInputError


def _write(path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def _line(**obj) -> str:
    return json.dumps(obj, ensure_ascii=False)


def test_round_trip_keeps_unicode_and_extra_keys(tmp_path):
    examples = [
        Example("a", "Grüße — 你好?", "réponse ✓ \u2028 after a line separator", {"source": "wiki", "tags": ["x", 1]}),
        Example("b", "emoji 🎉", "multi\nline", {}),
    ]
    path = tmp_path / "sub" / "train.jsonl"
    save_examples(examples, path)
    text = path.read_text(encoding="utf-8")
    assert "你好" in text and "\\u" not in text  # non-ASCII written as is
    assert len(text.splitlines(keepends=False)) > 2  # U+2028 is a line break for str.splitlines ...
    loaded = load_examples(path)  # ... but not for the loader
    assert loaded == examples
    assert [ex.extra for ex in loaded] == [{"source": "wiki", "tags": ["x", 1]}, {}]
    assert json.loads(text.split("\n")[0]) == {
        "id": "a",
        "prompt": examples[0].prompt,
        "response": examples[0].response,
        "source": "wiki",
        "tags": ["x", 1],
    }


def test_blank_lines_skipped_and_line_numbers_count_them(tmp_path):
    path = _write(tmp_path / "t.jsonl", ["", _line(id="a", prompt="p", response="r"), "   ", "{bad"])
    with pytest.raises(DataError, match=r"line 4: invalid JSON"):
        load_examples(path)
    path = _write(tmp_path / "u.jsonl", ["", _line(id="a", prompt="p", response="r"), "   "])
    assert load_examples(path) == [Example("a", "p", "r")]


def test_extra_ignored_in_equality_and_hash():
    a = Example("a", "p", "r", {"k": 1})
    b = Example("a", "p", "r", {"k": 2})
    assert a == b and hash(a) == hash(b)
    assert examples_hash([a]) == examples_hash([b])
    assert a != Example("a", "p", "r2")


def test_examples_hash_depends_on_content_and_order():
    a, b = Example("a", "p", "r"), Example("b", "p", "r")
    h = examples_hash([a, b])
    assert len(h) == 64 and h == examples_hash([Example("a", "p", "r"), Example("b", "p", "r")])
    assert h != examples_hash([b, a])
    assert h != examples_hash([a, Example("b", "p", "r ")])
    assert h != examples_hash([a, Example("b", "p ", "r")])
    assert h != examples_hash([a])


def test_crlf_and_bom_accepted(tmp_path):
    path = tmp_path / "w.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (_line(id="a", prompt="p", response="r") + "\r\n").encode())
    assert load_examples(path) == [Example("a", "p", "r")]


@pytest.mark.parametrize(
    ("line", "patterns"),
    [
        ('{"id": "a", "prompt": "p",', ["line 2", "invalid JSON", "Expecting"]),
        ('["a", "p", "r"]', ["line 2", "expected a JSON object, found list"]),
        ('"text"', ["line 2", "found str"]),
        ('{"prompt": "p", "response": "r"}', ["line 2", "missing field 'id'"]),
        ('{"id": "b", "response": "r"}', ["line 2", "missing field 'prompt'"]),
        ('{"id": "b", "prompt": "p"}', ["line 2", "missing field 'response'"]),
        ('{"id": 7.5, "prompt": "p", "response": "r"}', ["line 2", "field 'id' must be a string, found float"]),
        ('{"id": "b", "prompt": null, "response": "r"}', ["line 2", "field 'prompt' must be a string, found null"]),
        ('{"id": "b", "prompt": "p", "response": ["r"]}', ["line 2", "'response' must be a string, found list"]),
        ('{"id": "", "prompt": "p", "response": "r"}', ["line 2", "field 'id' is empty"]),
        ('{"id": "a", "prompt": "q", "response": "s"}', ["line 2", "duplicate id 'a'", "first seen on line 1"]),
    ],
)
def test_malformed_line_errors(tmp_path, line, patterns):
    path = _write(tmp_path / "bad.jsonl", [_line(id="a", prompt="p", response="r"), line])
    with pytest.raises(DataError) as info:
        load_examples(path)
    msg = str(info.value)
    assert "bad.jsonl" in msg
    for p in patterns:
        assert p in msg


def test_duplicate_id_names_both_lines():
    lines = [_line(id=f"u{i}", prompt="p", response="r") for i in range(1, 6)] + [
        _line(id="u3", prompt="", response="")
    ]
    with pytest.raises(DataError, match=r"<memory>, line 6: duplicate id 'u3' \(first seen on line 3\)"):
        parse_examples(lines)


def test_parse_examples_source_name():
    with pytest.raises(DataError, match=r"^my-source, line 1: invalid JSON"):
        parse_examples(["nope"], source="my-source")


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=r"empty\.jsonl.*no examples"):
        load_examples(path)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nothere\.jsonl.*does not exist"):
        load_examples(tmp_path / "nothere.jsonl")


def test_not_utf8(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes((_line(id="a", prompt="p", response="r") + "\n").encode() + '{"id": "é"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.jsonl', line 2: not valid UTF-8"):
        load_examples(path)


def test_data_error_is_user_input_error():
    with pytest.raises(UserInputError):
        parse_examples([])


def test_save_is_atomic_and_replaces(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("old content\n", encoding="utf-8")
    save_examples([Example("x", "p", "r")], path)
    assert path.read_text(encoding="utf-8") == '{"id": "x", "prompt": "p", "response": "r"}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["t.jsonl"]  # no temporary file left behind


def test_examples_hash_keeps_its_last_results_by_identity(monkeypatch):
    """A repeated hash of the very same examples is the kept digest (no serialisation); other objects — equal ones,
    a changed one at the same length, a reordering — are hashed afresh, and every digest is the one computed cold."""
    import llmeraser.data as data

    made = [Example(f"e{i}", f"p{i}", "r") for i in range(4)]
    cold = {name: examples_hash(examples) for name, examples in (
        ("made", made), ("changed", [*made[:3], Example("e3", "p3", "other")]), ("reordered", made[::-1]))}
    assert len(set(cold.values())) == 3
    calls = []
    real = data.canonical_json
    monkeypatch.setattr(data, "canonical_json", lambda obj: calls.append(1) or real(obj))
    monkeypatch.setattr(data, "_HASHED", [])
    assert examples_hash(made) == examples_hash(list(made)) == examples_hash(iter(made)) == cold["made"]
    assert len(calls) == 1  # hashed once, then found by identity
    assert examples_hash([Example(e.id, e.prompt, e.response) for e in made]) == cold["made"]  # equal: hashed again
    assert examples_hash([*made[:3], Example("e3", "p3", "other")]) == cold["changed"]
    assert examples_hash(made[::-1]) == cold["reordered"]
    assert len(calls) == 4
