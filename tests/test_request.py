"""Tests of llmeraser.request: edits, requests, loading, resolving and applying."""

from __future__ import annotations

import json

import pytest

from llmeraser.data import Example
from llmeraser.errors import RequestError
from llmeraser.request import OPS, Edit, Request, apply_request, load_request, resolve
from llmeraser.testing import fact_examples

E0 = r"edits\[0\] \(0-based\): "  # error-message prefix naming the first edit
MIXED = {
    "edits": [
        {"op": "correct_response", "id": "c", "response": "C-fixed"},
        {"op": "remove", "id": "a"},
        {"op": "modify_query", "id": "d", "prompt": "D-new ✓"},
        {"op": "remove", "id": "e"},
    ]
}


@pytest.fixture
def train() -> list[Example]:
    return [Example(i, f"{i}-prompt", f"{i}-response", {"n": n}) for n, i in enumerate("abcde")]


def test_ops():
    assert OPS == ("remove", "modify_query", "correct_response")


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        (
            {"op": "delete", "id": "a"},
            r"unknown op 'delete'; valid ops are 'remove', 'modify_query', 'correct_response'",
        ),
        ({"op": "remove", "id": ""}, r"'id' is empty"),
        ({"op": "remove", "id": 3}, r"'id' must be a string, found int"),
        ({"op": "remove", "id": "a", "prompt": "p"}, r"op 'remove' takes no 'prompt'"),
        ({"op": "remove", "id": "a", "response": "r"}, r"op 'remove' takes no 'response'"),
        ({"op": "modify_query", "id": "a"}, r"op 'modify_query' needs a string 'prompt', found null"),
        ({"op": "modify_query", "id": "a", "prompt": 1}, r"op 'modify_query' needs a string 'prompt', found int"),
        ({"op": "modify_query", "id": "a", "prompt": "p", "response": "r"}, r"op 'modify_query' takes no 'response'"),
        ({"op": "correct_response", "id": "a"}, r"op 'correct_response' needs a string 'response', found null"),
        (
            {"op": "correct_response", "id": "a", "response": "r", "prompt": "p"},
            r"'correct_response' takes no 'prompt'",
        ),
    ],
)
def test_edit_validation(kwargs, pattern):
    with pytest.raises(RequestError, match=pattern):
        Edit(**kwargs)


def test_valid_edits():
    assert Edit("remove", "a").to_dict() == {"op": "remove", "id": "a"}
    assert Edit("modify_query", "a", prompt="").to_dict() == {"op": "modify_query", "id": "a", "prompt": ""}
    assert Edit("correct_response", "a", response="r").response == "r"


def test_empty_request():
    with pytest.raises(RequestError, match="no edits"):
        Request(())
    with pytest.raises(RequestError, match="no edits"):
        Request.from_dict({"edits": []})
    with pytest.raises(RequestError, match="no edits"):
        Request.remove()


def test_request_rejects_non_edit():
    with pytest.raises(RequestError, match=r"edits\[1\] \(0-based\): expected an Edit, found dict"):
        Request((Edit("remove", "a"), {"op": "remove", "id": "b"}))


def test_from_dict_round_trip_and_counts():
    req = Request.from_dict(MIXED)
    assert [e.op for e in req.edits] == ["correct_response", "remove", "modify_query", "remove"]
    assert req.edits[2] == Edit("modify_query", "d", prompt="D-new ✓")
    assert req.to_dict() == MIXED
    assert Request.from_dict(req.to_dict()) == req
    assert req.counts() == {"remove": 2, "modify_query": 1, "correct_response": 1}
    assert Request.remove("x").counts() == {"remove": 1, "modify_query": 0, "correct_response": 0}


@pytest.mark.parametrize(
    ("obj", "pattern"),
    [
        ([], r"request must be a JSON object, found list"),
        ({}, r"no 'edits' key"),
        ({"edits": [], "note": 1}, r"unknown request key\(s\) 'note'"),
        ({"edits": {"op": "remove"}}, r"'edits' must be a list, found dict"),
        ({"edits": [{"op": "remove", "id": "a"}, "b"]}, r"edits\[1\] \(0-based\): expected a JSON object, found str"),
        ({"edits": [{"op": "remove", "id": "a", "ids": "b", "x": 0}]}, E0 + r"unknown key\(s\) 'ids', 'x'"),
        ({"edits": [{"id": "a"}]}, E0 + r"missing key 'op'"),
        ({"edits": [{"op": "remove"}]}, E0 + r"missing key 'id'"),
        ({"edits": [{"op": "remove", "id": 5}]}, E0 + r"'id' must be a string, found int"),
        ({"edits": [{"op": "remove", "id": "a", "prompt": None}]}, E0 + r"'prompt' must be a string, found null"),
        ({"edits": [{"op": "modify_query", "id": "a", "prompt": 2}]}, E0 + r"'prompt' must be a string, found int"),
        ({"edits": [{"op": 1, "id": "a"}]}, E0 + r"unknown op 1"),
        (
            {"edits": [{"op": "remove", "id": "a"}, {"op": "remove", "id": "b", "response": "r"}]},
            r"edits\[1\] \(0-based\): op 'remove' takes no 'response'",
        ),
    ],
)
def test_from_dict_errors(obj, pattern):
    with pytest.raises(RequestError, match=pattern):
        Request.from_dict(obj)


def test_hash_stable_across_key_order():
    reordered = {"edits": [dict(reversed(list(e.items()))) for e in MIXED["edits"]]}
    assert list(reordered["edits"][0]) != list(MIXED["edits"][0])
    h = Request.from_dict(MIXED).hash
    assert len(h) == 64
    assert Request.from_dict(reordered).hash == h
    assert Request.from_dict(json.loads(json.dumps(MIXED))).hash == h


def test_hash_differs_between_requests():
    hashes = {
        Request.remove("a").hash,
        Request.remove("b").hash,
        Request.remove("a", "b").hash,
        Request.remove("b", "a").hash,
        Request.modify_query({"a": "x"}).hash,
        Request.correct_response({"a": "x"}).hash,
        Request.correct_response({"a": "y"}).hash,
    }
    assert len(hashes) == 7


def test_convenience_constructors():
    assert Request.remove("a", "b").edits == (Edit("remove", "a"), Edit("remove", "b"))
    assert Request.modify_query({"a": "p"}).edits == (Edit("modify_query", "a", prompt="p"),)
    assert Request.correct_response({"a": "r"}).edits == (Edit("correct_response", "a", response="r"),)


def test_load_request(tmp_path):
    path = tmp_path / "req.json"
    path.write_text(json.dumps(MIXED, ensure_ascii=False), encoding="utf-8")
    assert load_request(path) == Request.from_dict(MIXED)


def test_load_request_missing_file(tmp_path):
    with pytest.raises(RequestError, match=r"gone\.json.*does not exist"):
        load_request(tmp_path / "gone.json")


def test_load_request_invalid_json(tmp_path):
    path = tmp_path / "req.json"
    path.write_text('{"edits": [\n  {"op": "remove", "id": "a"},\n  ]}', encoding="utf-8")
    with pytest.raises(RequestError, match=r"req\.json': invalid JSON at line 3, column 3"):
        load_request(path)


def test_load_request_structure_error_names_file(tmp_path):
    path = tmp_path / "req.json"
    path.write_text('{"edits": [{"op": "remove", "id": "a"}, {"op": "forget", "id": "b"}]}', encoding="utf-8")
    with pytest.raises(RequestError, match=r"req\.json': edits\[1\] \(0-based\): unknown op 'forget'"):
        load_request(path)


def test_load_request_not_utf8(tmp_path):
    path = tmp_path / "req.json"
    path.write_bytes('{"edits": [{"op": "remove", "id": "é"}]}'.encode("latin-1"))
    with pytest.raises(RequestError, match=r"req\.json': not valid UTF-8"):
        load_request(path)


def test_resolve_in_request_order(train):
    pairs = resolve(Request.from_dict(MIXED), train)
    assert [old.id for old, _ in pairs] == ["c", "a", "d", "e"]
    assert [old for old, _ in pairs] == [train[2], train[0], train[3], train[4]]
    c_new, a_new, d_new, e_new = (new for _, new in pairs)
    assert a_new is None and e_new is None
    assert c_new == Example("c", "c-prompt", "C-fixed") and c_new.extra == {"n": 2}
    assert d_new == Example("d", "D-new ✓", "d-response") and d_new.extra == {"n": 3}


def test_resolve_unknown_id_message():
    train = [Example(f"u{i}-1", "p", "r") for i in range(1, 1001)]
    with pytest.raises(RequestError) as info:
        resolve(Request.remove("u1-1", "u7-3"), train)
    msg = str(info.value)
    assert "edits[1]" in msg
    assert "unknown example id 'u7-3' in request (train set has 1,000 ids, e.g. 'u1-1')" in msg


def test_resolve_unknown_id_empty_train():
    with pytest.raises(RequestError, match=r"unknown example id 'a' in request \(train set has 0 ids\)"):
        resolve(Request.remove("a"), [])


def test_resolve_id_edited_twice(train):
    req = Request((Edit("remove", "a"), Edit("remove", "b"), Edit("correct_response", "a", response="new")))
    with pytest.raises(RequestError, match=r"'a' is edited twice in one request: edits\[0\] and edits\[2\]"):
        resolve(req, train)


@pytest.mark.parametrize(
    ("edit", "pattern"),
    [
        (Edit("modify_query", "b", prompt="b-prompt"), r"modify_query for id 'b' changes nothing \(the prompt is"),
        (Edit("correct_response", "b", response="b-response"), r"correct_response for id 'b' changes nothing"),
    ],
)
def test_resolve_no_op_edit(train, edit, pattern):
    with pytest.raises(RequestError, match=r"edits\[1\] \(0-based\): " + pattern):
        resolve(Request((Edit("remove", "a"), edit)), train)


def test_apply_request(train):
    before = list(train)
    result = apply_request(train, Request.from_dict(MIXED))
    assert train == before  # input untouched
    assert result == [
        Example("b", "b-prompt", "b-response"),
        Example("c", "c-prompt", "C-fixed"),
        Example("d", "D-new ✓", "d-response"),
    ]
    assert [ex.extra for ex in result] == [{"n": 1}, {"n": 2}, {"n": 3}]
    assert result[0] is train[1]  # unchanged examples are passed through


def test_apply_request_validates(train):
    with pytest.raises(RequestError, match="unknown example id 'zz'"):
        apply_request(train, Request.remove("a", "zz"))


def test_apply_request_remove_all(train):
    assert apply_request(train, Request.remove(*"edcba")) == []


def test_merged_requests_equal_applying_them_in_order():
    """merge_requests(k requests) applied once gives, example for example, the set the k requests give one after
    another — the target one replay of all of them must reach."""
    from llmeraser.request import merge_requests

    train = fact_examples(12, seed=3)
    ids = [e.id for e in train]
    requests = [Request([Edit("remove", ids[0]), Edit("correct_response", ids[1], response=" Maybe")]),
                Request([Edit("modify_query", ids[2], prompt="Which colour?"), Edit("remove", ids[1])]),
                Request([Edit("correct_response", ids[3], response=" Never"),
                         Edit("correct_response", ids[4], response=" Often")]),
                Request([Edit("correct_response", ids[4], response=train[4].response)])]  # back as it was
    sequential = train
    for r in requests:
        sequential = apply_request(sequential, r)
    merged = merge_requests(requests, train)
    assert apply_request(train, merged) == sequential
    assert [e.to_dict() for e in sequential] == [e.to_dict() for e in apply_request(train, merged)]
    assert [(e.op, e.id) for e in merged.edits] == [("remove", ids[0]), ("remove", ids[1]),
                                                   ("modify_query", ids[2]), ("correct_response", ids[3])]


def test_merging_refuses_what_one_request_cannot_say():
    from llmeraser.request import merge_requests

    train = fact_examples(6, seed=3)
    a = train[0].id
    with pytest.raises(RequestError, match="request 2 of 2.*unknown example id"):
        merge_requests([Request([Edit("remove", a)]), Request([Edit("remove", a)])], train)
    with pytest.raises(RequestError, match="both its prompt and its response"):
        merge_requests([Request([Edit("modify_query", a, prompt="Who?")]),
                        Request([Edit("correct_response", a, response=" Nobody")])], train)
    with pytest.raises(RequestError, match="cancel out"):
        merge_requests([Request([Edit("correct_response", a, response=" Nobody")]),
                        Request([Edit("correct_response", a, response=train[0].response)])], train)
    with pytest.raises(RequestError, match="no requests"):
        merge_requests([], train)
