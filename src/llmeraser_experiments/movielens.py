"""A TALLRec-style binary recommendation task from MovieLens-100k: "given what the user liked and disliked,
will they like this movie?" → " Yes" (rating ≥ 4) or " No".

The data is read in place from the `recbole==1.2.1` wheel (``site-packages/recbole/dataset_example/ml-100k/``);
its licence forbids redistribution, so it is never copied into the repository. recbole itself is not imported
(its import pulls packages we do not install): the folder is found with `importlib.util.find_spec`.

Each candidate target is one rating with at least `min_history` earlier ratings by the same user; its history is
that user's `history` most recent earlier ratings, split into liked (≥ 4) and disliked, oldest first. Splits are
by time: the candidates are ordered by timestamp and cut into consecutive blocks (train earliest, then valid,
then test), so no training target lies in the future of a validation or test target.

References: Bao et al., TALLRec (RecSys 2023); Ding et al., LLMEraser (ICLR 2025), §5.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import random
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

from llmeraser.data import Example, save_examples
from llmeraser.errors import ConfigError, DataError, UserInputError
from llmeraser.io import atomic_write_json

logger = logging.getLogger(__name__)

YES, NO = " Yes", " No"
LIKE_THRESHOLD = 4.0  # a rating ≥ 4 (of 5) counts as liked, as in TALLRec
MAX_TITLE_CHARS = 24  # keeps ~98% of examples (history 8) within 64 SmolLM2 tokens
SPLITS = ("train", "valid", "test")
INSTALL_HINT = "pip install --no-deps recbole==1.2.1"
INTER_FILE, ITEM_FILE = "ml-100k.inter", "ml-100k.item"
_UNKNOWN_TITLES = {"", "unknown", "unkonwn"}  # ml-100k item 267 is titled "unkonwn"
_TRAILING_PAREN = re.compile(r"\s*\([^()]*\)\s*$")  # "(1995)" or an alternative title "(Se7en)"
_DANGLING = {"a", "an", "and", "at", "for", "in", "of", "on", "or", "the", "to", "with", "&"}
_TRAILING_ARTICLE = re.compile(r"^(.*), (The|A|An)$")  # "Usual Suspects, The" → "The Usual Suspects"


def default_folder() -> Path:
    """The ml-100k folder inside the installed recbole wheel (found without importing recbole).

    Raises:
        UserInputError: If recbole is not installed or its wheel lacks the folder.
    """
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise UserInputError(
            f"MovieLens-100k not found: the recbole package is not installed; run `{INSTALL_HINT}` "
            "(the data is read in place from its wheel) or pass the folder explicitly")
    folder = Path(next(iter(spec.submodule_search_locations))) / "dataset_example" / "ml-100k"
    if not folder.is_dir():
        raise UserInputError(f"MovieLens-100k not found at {str(folder)!r}; run `{INSTALL_HINT}`")
    return folder


def _clean_once(title: str, max_chars: int) -> str:
    title = " ".join(title.split())
    while True:
        shorter = _TRAILING_PAREN.sub("", title)
        if shorter == title or not shorter:
            break
        title = shorter
    m = _TRAILING_ARTICLE.match(title)
    if m:
        title = f"{m.group(2)} {m.group(1)}"
    if len(title) > max_chars:
        cut = title[: max_chars + 1].rsplit(" ", 1)[0] if " " in title[:max_chars] else title[:max_chars]
        words = cut.rstrip(" ,:;-").split(" ")
        while len(words) > 1 and words[-1].lower() in _DANGLING:  # "Willy Wonka and the" → "Willy Wonka"
            words.pop()
        title = " ".join(words).rstrip(" ,:;-")
    return title


def clean_title(title: str, max_chars: int = MAX_TITLE_CHARS) -> str:
    """A short display title: trailing "(1995)" / alternative titles dropped, ", The" moved to the front, cut at a
    word boundary to at most `max_chars` characters. Idempotent."""
    while True:
        cleaned = _clean_once(title, max_chars)
        if cleaned == title:
            return title
        title = cleaned


def format_prompt(liked: Sequence[str], disliked: Sequence[str], target: str) -> str:
    """The query text, e.g. ``"Liked: A; B. Disliked: C. Will the user like X?"`` (titles cleaned, see
    `clean_title`; an empty list reads "none")."""

    def join(titles: Sequence[str]) -> str:
        return "; ".join(clean_title(t) for t in titles) or "none"

    return f"Liked: {join(liked)}. Disliked: {join(disliked)}. Will the user like {clean_title(target)}?"


class _Rating(NamedTuple):
    user: int
    item: int
    rating: float
    timestamp: int
    order: int  # line order in the file: breaks timestamp ties deterministically


def _read_table(path: Path, columns: Sequence[str]) -> Iterable[tuple[int, list[str]]]:
    """Yield (line number, the requested columns) of a recbole atomic file (tab-separated, typed header)."""
    if not path.is_file():
        raise UserInputError(f"{str(path)!r} does not exist; expected a recbole ml-100k folder ({INSTALL_HINT})")
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
        names = [h.split(":")[0] for h in header]
        missing = [c for c in columns if c not in names]
        if missing:
            raise DataError(f"{str(path)!r}, line 1: missing column(s) {', '.join(missing)}; header is {header}")
        index = [names.index(c) for c in columns]
        for lineno, line in enumerate(f, start=2):
            if not line.strip():
                continue
            fields = line.rstrip("\n").split("\t")
            if len(fields) < len(names):
                raise DataError(f"{str(path)!r}, line {lineno}: expected {len(names)} tab-separated fields, "
                                f"found {len(fields)}")
            yield lineno, [fields[i] for i in index]


def _load(folder: Path) -> tuple[list[_Rating], dict[int, str]]:
    titles: dict[int, str] = {}
    item_path = folder / ITEM_FILE
    for lineno, (item, title) in _read_table(item_path, ("item_id", "movie_title")):
        try:
            key = int(item)
        except ValueError:
            raise DataError(f"{str(item_path)!r}, line {lineno}: item_id {item!r} is not an integer") from None
        if title.strip().lower() not in _UNKNOWN_TITLES:
            titles[key] = clean_title(title)
    ratings: list[_Rating] = []
    seen: dict[tuple[int, int], int] = {}
    inter_path = folder / INTER_FILE
    rows = _read_table(inter_path, ("user_id", "item_id", "rating", "timestamp"))
    for lineno, (user, item, rating, stamp) in rows:
        try:
            r = _Rating(int(user), int(item), float(rating), int(float(stamp)), lineno)
        except ValueError:
            raise DataError(f"{str(inter_path)!r}, line {lineno}: expected integer user/item ids and numeric "
                            f"rating/timestamp, found {[user, item, rating, stamp]}") from None
        if (r.user, r.item) in seen:
            raise DataError(f"{str(inter_path)!r}, line {lineno}: user {r.user} rates item {r.item} twice "
                            f"(first on line {seen[r.user, r.item]})")
        seen[r.user, r.item] = lineno
        if r.item in titles:  # ratings of untitled items cannot be shown in a prompt
            ratings.append(r)
    return ratings, titles


class _Target(NamedTuple):
    """A candidate target: ``user_ratings[k]``, with the user's ratings sorted by time (history before k)."""

    rating: _Rating
    user_ratings: list[_Rating]
    k: int
    liked: bool


def _candidates(ratings: list[_Rating], min_history: int) -> list[_Target]:
    """Every rating with ≥ `min_history` earlier ratings by its user, in global time order."""
    by_user: dict[int, list[_Rating]] = defaultdict(list)
    for r in ratings:
        by_user[r.user].append(r)
    out: list[_Target] = []
    for rs in by_user.values():
        rs.sort(key=lambda r: (r.timestamp, r.order))
        out.extend(_Target(rs[k], rs, k, rs[k].rating >= LIKE_THRESHOLD) for k in range(min_history, len(rs)))
    out.sort(key=lambda t: (t.rating.timestamp, t.rating.order))
    return out


def _example(target: _Target, titles: dict[int, str], history: int) -> Example:
    r = target.rating
    past = target.user_ratings[max(0, target.k - history) : target.k]  # oldest first
    liked = [titles[p.item] for p in past if p.rating >= LIKE_THRESHOLD]
    disliked = [titles[p.item] for p in past if p.rating < LIKE_THRESHOLD]
    extra = {"user": r.user, "item": r.item, "liked": liked, "disliked": disliked, "target": titles[r.item],
             "timestamp": r.timestamp, "rating": r.rating}
    return Example(f"u{r.user}-{r.item}", format_prompt(liked, disliked, titles[r.item]),
                   YES if target.liked else NO, extra)


def _sample(pool: list[_Target], n: int, rng: random.Random) -> list[_Target]:
    """n targets of `pool`, half liked and half not where the pool allows, in time order."""
    yes = [t for t in pool if t.liked]
    no = [t for t in pool if not t.liked]
    n_yes = min(len(yes), max(n - len(no), (n + 1) // 2))
    picked = rng.sample(yes, n_yes) + rng.sample(no, n - n_yes)
    return sorted(picked, key=lambda t: (t.rating.timestamp, t.rating.order))


def build_splits(folder: str | os.PathLike | None = None, *, n_train: int = 400, n_valid: int = 100,
                 n_test: int = 200, history: int = 8, min_history: int = 3, seed: int = 0) -> dict[str, list[Example]]:
    """Build time-ordered train/valid/test splits of the binary task.

    The candidates (see the module docstring), in global timestamp order, are cut into three consecutive blocks in
    the proportions n_train : n_valid : n_test; from each block the requested number is drawn with `seed`, as
    balanced between " Yes" and " No" as the block allows. Hence max train timestamp ≤ min valid ≤ min test.

    Args:
        folder: A folder holding ``ml-100k.inter`` and ``ml-100k.item`` in recbole's format; default: the one
            inside the installed recbole wheel.
        n_train: Training examples.
        n_valid: Validation examples.
        n_test: Test examples.
        history: The most recent earlier ratings shown in a prompt.
        min_history: Fewest earlier ratings a target needs.
        seed: Seed of the sampling.

    Returns:
        ``{"train": [...], "valid": [...], "test": [...]}``, each in time order. Ids are ``f"u{user}-{item}"``;
        `Example.extra` holds user, item, liked, disliked, target (titles), timestamp and rating.

    Raises:
        UserInputError: If the folder or a file is missing (with the install hint).
        DataError: If a file is malformed.
        ConfigError: If a size is negative, history < min_history or min_history < 1, or a block is too small.
    """
    sizes = {"train": n_train, "valid": n_valid, "test": n_test}
    for name, n in sizes.items():
        if n < 0:
            raise ConfigError(f"n_{name} must be ≥ 0, got {n}")
    if not 1 <= min_history <= history:
        raise ConfigError(f"need 1 ≤ min_history ≤ history, got min_history={min_history}, history={history}")
    folder = default_folder() if folder is None else Path(folder)
    if not folder.is_dir():
        raise UserInputError(f"MovieLens folder {str(folder)!r} does not exist")
    ratings, titles = _load(folder)
    pool = _candidates(ratings, min_history)
    total = sum(sizes.values())
    if total == 0 or len(pool) < total:
        raise ConfigError(f"asked for {total} examples in all; {str(folder)!r} has {len(pool)} targets with "
                          f"≥ {min_history} earlier ratings")
    rng = random.Random(seed)
    splits, start, cum = {}, 0, 0
    for name in SPLITS:
        cum += sizes[name]
        end = len(pool) * cum // total  # consecutive time blocks, proportional to the requested sizes
        block = pool[start:end]
        if len(block) < sizes[name]:
            raise ConfigError(f"the {name} time block has {len(block)} candidates, fewer than n_{name}={sizes[name]}")
        splits[name] = [_example(t, titles, history) for t in _sample(block, sizes[name], rng)]
        start = end
    logger.info("MovieLens splits from %s: %s (pool %d)", folder, {k: len(v) for k, v in splits.items()}, len(pool))
    return splits


def yes_ratio(examples: Sequence[Example]) -> float:
    """The fraction of examples whose response is " Yes" (0.0 for no examples)."""
    return sum(e.response == YES for e in examples) / len(examples) if examples else 0.0


def write_splits(splits: Mapping[str, Sequence[Example]], out_dir: str | os.PathLike, *, seed: int | None = None,
                 source: str | os.PathLike | None = None) -> None:
    """Write ``<split>.jsonl`` for each split and ``meta.json`` (sizes, Yes ratio per split, seed, source).

    Args:
        splits: As returned by `build_splits`.
        out_dir: The folder to write into (created if needed); each file is written atomically.
        seed: The seed used, recorded in meta.json.
        source: The data folder used, recorded in meta.json.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, examples in splits.items():
        save_examples(examples, out / f"{name}.jsonl")
    meta = {"sizes": {k: len(v) for k, v in splits.items()}, "yes_ratio": {k: yes_ratio(v) for k, v in splits.items()},
            "seed": seed, "source": None if source is None else str(source), "task": "movielens-100k yes/no"}
    atomic_write_json(out / "meta.json", meta)


_ID = re.compile(r"^u(\d+)-\d+$")


def user_ids(examples: Iterable[Example]) -> dict[int, list[str]]:
    """Example ids per user, in example order (from ``extra["user"]``, else from an id ``u{user}-{item}``).

    Raises:
        DataError: If an example names no user.
    """
    out: dict[int, list[str]] = defaultdict(list)
    for ex in examples:
        user = ex.extra.get("user")
        if user is None:
            m = _ID.match(ex.id)
            if m is None:
                raise DataError(f"example {ex.id!r} names no user: no extra 'user' and the id is not 'u<user>-<item>'")
            user = int(m.group(1))
        out[int(user)].append(ex.id)
    return dict(out)


def all_titles(examples: Iterable[Example]) -> list[str]:
    """Every title in the examples' histories and targets (from `Example.extra`), sorted."""
    titles: set[str] = set()
    for ex in examples:
        titles.update(ex.extra.get("liked", ()))
        titles.update(ex.extra.get("disliked", ()))
        if "target" in ex.extra:
            titles.add(ex.extra["target"])
    return sorted(titles)
