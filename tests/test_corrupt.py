"""Corruption: the returned request undoes it exactly; inserted titles are new to the user; seeds; errors."""

from __future__ import annotations

import pytest
from test_movielens import write_synthetic_ml100k

from llmeraser.data import Example, load_examples
from llmeraser.errors import ConfigError, DataError
from llmeraser.request import apply_request, load_request
from llmeraser_experiments.corrupt import corrupt, write_corruption
from llmeraser_experiments.movielens import NO, YES, build_splits, format_prompt


@pytest.fixture(scope="module")
def train(tmp_path_factory) -> list[Example]:
    folder = write_synthetic_ml100k(tmp_path_factory.mktemp("ml") / "ml-100k")
    return build_splits(folder, n_train=80, n_valid=10, n_test=10, seed=0)["train"]


def triples(examples):
    return [(e.id, e.prompt, e.response) for e in examples]


def user_titles(examples, user):
    out = set()
    for e in examples:
        if e.extra["user"] == user:
            out.update([*e.extra["liked"], *e.extra["disliked"], e.extra["target"]])
    return out


@pytest.mark.parametrize("kind", ["query", "response"])
@pytest.mark.parametrize("ratio", [0.1, 0.5, 1.0])
def test_request_restores_the_original(train, kind, ratio):
    corrupted, request = corrupt(train, kind=kind, ratio=ratio, seed=0)
    changed = [c.id for c, e in zip(corrupted, train, strict=True) if triples([c]) != triples([e])]
    assert len(changed) == round(ratio * len(train))
    assert [e.id for e in request.edits] == changed
    op = "modify_query" if kind == "query" else "correct_response"
    assert request.counts()[op] == len(changed) and len(request.edits) == len(changed)
    assert [e.id for e in corrupted] == [e.id for e in train]
    assert triples(apply_request(corrupted, request)) == triples(train)


def test_response_flips(train):
    corrupted, _ = corrupt(train, kind="response", ratio=0.5, seed=1)
    for c, e in zip(corrupted, train, strict=True):
        assert c.prompt == e.prompt
        assert c.response == e.response or {c.response, e.response} == {YES, NO}


def test_query_inserts_unseen_titles(train):
    corrupted, _ = corrupt(train, kind="query", ratio=1.0, seed=2)
    for c, e in zip(corrupted, train, strict=True):
        new = [t for t in c.extra["liked"] if t not in e.extra["liked"]]
        assert 1 <= len(new) <= 2
        assert not set(new) & user_titles(train, e.extra["user"])  # never a title the user rated
        assert c.response == e.response
        assert c.extra["liked"][-len(new):] == new  # appended as the newest liked
        # the cap of 8: the newest liked titles go first, then (a user who liked nothing) the newest disliked
        n_old = len(e.extra["liked"]) + len(e.extra["disliked"])
        assert len(c.extra["liked"]) + len(c.extra["disliked"]) == min(8, n_old + len(new))
        kept_liked = c.extra["liked"][: -len(new)]
        assert kept_liked == e.extra["liked"][: len(kept_liked)]
        assert c.extra["disliked"] == e.extra["disliked"][: len(c.extra["disliked"])]
        if kept_liked:  # a disliked title goes only once no original liked title is left
            assert c.extra["disliked"] == e.extra["disliked"]
        assert c.prompt == format_prompt(c.extra["liked"], c.extra["disliked"], c.extra["target"])
        assert e.extra["liked"] != c.extra["liked"]  # the input's extra is not modified


def test_query_at_the_length_cap_replaces_the_newest_liked():
    liked, disliked = [f"L{i}" for i in range(6)], ["D0", "D1"]
    ex = Example("u1-1", format_prompt(liked, disliked, "T"), YES,
                 {"user": 1, "item": 1, "liked": liked, "disliked": disliked, "target": "T"})
    titles = ["N0", "N1", "N2", *liked]
    for seed in range(10):
        (c,), _ = corrupt([ex], kind="query", ratio=1.0, seed=seed, titles=titles)
        assert len(c.extra["liked"]) + len(c.extra["disliked"]) == 8  # the history stays at the cap
        new = [t for t in c.extra["liked"] if t.startswith("N")]
        assert 1 <= len(new) <= 2 and c.extra["liked"] == liked[: 6 - len(new)] + new
        assert c.extra["disliked"] == disliked


def test_query_at_the_cap_with_nothing_liked_replaces_the_newest_disliked():
    disliked = [f"D{i}" for i in range(8)]
    ex = Example("u1-1", format_prompt([], disliked, "T"), NO,
                 {"user": 1, "item": 1, "liked": [], "disliked": disliked, "target": "T"})
    for seed in range(10):
        (c,), request = corrupt([ex], kind="query", ratio=1.0, seed=seed, titles=["N0", "N1", "N2"])
        n = len(c.extra["liked"])
        assert 1 <= n <= 2 and c.extra["disliked"] == disliked[: 8 - n]
        assert triples(apply_request([c], request)) == triples([ex])


def test_titles_argument_and_exhaustion(train):
    corrupted, _ = corrupt(train, kind="query", ratio=0.2, seed=0, titles=["Zzz Unseen (1999)"])
    inserted = {t for c in corrupted for t in c.extra["liked"] if t == "Zzz Unseen"}
    assert inserted == {"Zzz Unseen"}  # cleaned like every title
    seen = sorted(user_titles(train[:1], train[0].extra["user"]))
    with pytest.raises(DataError, match="already in user"):
        corrupt(train[:1], kind="query", ratio=1.0, seed=0, titles=seen)


def test_determinism_by_seed(train):
    for kind in ("query", "response"):
        a, ra = corrupt(train, kind=kind, ratio=0.3, seed=5)
        b, rb = corrupt(train, kind=kind, ratio=0.3, seed=5)
        assert triples(a) == triples(b) and ra == rb
        c, rc = corrupt(train, kind=kind, ratio=0.3, seed=6)
        assert triples(c) != triples(a) and rc != ra


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5])
def test_ratio_errors(train, ratio):
    with pytest.raises(ConfigError, match="ratio must be in"):
        corrupt(train, kind="response", ratio=ratio, seed=0)


def test_other_errors(train):
    with pytest.raises(ConfigError, match="corrupts none"):
        corrupt(train, kind="response", ratio=0.001, seed=0)
    with pytest.raises(ConfigError, match="unknown corruption kind 'label'"):
        corrupt(train, kind="label", ratio=0.5, seed=0)
    with pytest.raises(DataError, match="example 'ex0' lacks extra field"):
        corrupt([Example("ex0", "p", YES)], kind="query", ratio=1.0, seed=0, titles=["A"])
    with pytest.raises(DataError, match="example 'ex0': response ' maybe'"):
        corrupt([Example("ex0", "p", " maybe")], kind="response", ratio=1.0, seed=0)


def test_write_corruption_round_trip(train, tmp_path):
    corrupted, request = corrupt(train, kind="query", ratio=0.25, seed=0)
    write_corruption(corrupted, request, tmp_path / "c")
    loaded = load_examples(tmp_path / "c" / "train.jsonl")
    assert [e.to_dict() for e in loaded] == [e.to_dict() for e in corrupted]
    assert load_request(tmp_path / "c" / "request.json") == request
    assert triples(apply_request(loaded, load_request(tmp_path / "c" / "request.json"))) == triples(train)
