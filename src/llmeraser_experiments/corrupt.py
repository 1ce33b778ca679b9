"""Controlled corruption of a MovieLens yes/no training set, and the request that undoes it
(docs/benchmarks.md#settings).

- ``kind="response"`` (for Response Correction): the answer of `ratio` of the examples is flipped " Yes" ↔ " No";
  the request is ``correct_response`` back to the original answer.
- ``kind="query"`` (for Query Modification): 1–2 random titles the user never rated (in these examples) are
  appended to the liked list — replacing the newest liked titles (or, failing those, the newest disliked) when
  the history is at its length cap — and the prompt is re-formatted; the request is ``modify_query`` back to the
  original prompt.

``apply_request(corrupted, request)`` gives back the original prompts and responses exactly.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from llmeraser.data import Example, save_examples
from llmeraser.errors import ConfigError, DataError
from llmeraser.io import atomic_write_json
from llmeraser.request import Request
from llmeraser_experiments.movielens import NO, YES, all_titles, clean_title, format_prompt

logger = logging.getLogger(__name__)

KINDS = ("query", "response")
_FIELDS = ("user", "liked", "disliked", "target")


def _history_titles(examples: Sequence[Example]) -> dict[object, set[str]]:
    """Every title each user rated, over the given examples (histories and targets)."""
    seen: dict[object, set[str]] = defaultdict(set)
    for ex in examples:
        if all(k in ex.extra for k in _FIELDS):
            seen[ex.extra["user"]].update([*ex.extra["liked"], *ex.extra["disliked"], ex.extra["target"]])
    return seen


def _corrupt_query(ex: Example, rng: random.Random, titles: Sequence[str], rated: set[str],
                   max_history: int) -> Example:
    missing = [k for k in _FIELDS if k not in ex.extra]
    if missing:
        raise DataError(f"example {ex.id!r} lacks extra field(s) {', '.join(map(repr, missing))}; query corruption "
                        "re-formats the prompt from them (build the data with llmeraser_experiments.movielens)")
    liked, disliked = list(ex.extra["liked"]), list(ex.extra["disliked"])
    unseen = [t for t in titles if t not in rated]
    if not unseen:
        raise DataError(f"example {ex.id!r}: every candidate title is already in user {ex.extra['user']}'s history")
    new = rng.sample(unseen, min(rng.choice((1, 2)), len(unseen)))
    overflow = max(0, len(liked) + len(disliked) + len(new) - max_history)
    # at the cap the inserted titles replace the newest liked ones (the newest disliked if too few are liked)
    drop_liked = min(overflow, len(liked))
    liked = liked[: len(liked) - drop_liked] + new
    disliked = disliked[: max(0, len(disliked) - (overflow - drop_liked))]
    prompt = format_prompt(liked, disliked, ex.extra["target"])
    extra = {**ex.extra, "liked": liked, "disliked": disliked}
    return dataclasses.replace(ex, prompt=prompt, extra=extra)


def corrupt(examples: Sequence[Example], *, kind: str, ratio: float, seed: int, titles: Sequence[str] | None = None,
            max_history: int = 8) -> tuple[list[Example], Request]:
    """Corrupt round(ratio · N) examples, chosen with `seed`, and return the request that undoes it.

    Args:
        examples: A clean training set (for "query": with the extra fields of `llmeraser_experiments.movielens`).
        kind: "response" flips " Yes" ↔ " No"; "query" inserts 1–2 titles not in the user's history into the
            liked list and re-formats the prompt.
        ratio: The fraction of examples to corrupt, in (0, 1].
        seed: Seed of the choice of examples and titles.
        titles: Titles to insert from (default: every title in the examples' extras).
        max_history: Length cap of liked + disliked after insertion (the inserted titles replace the newest
            liked titles beyond it, then the newest disliked ones).

    Returns:
        ``(corrupted, request)``: the corrupted training set (same order and ids; for "query" its extra "liked"
        and "disliked" updated) and the request — ``modify_query`` or ``correct_response`` back to the original — whose
        application to `corrupted` restores the original prompts and responses.

    Raises:
        ConfigError: If kind is unknown, ratio is outside (0, 1], or round(ratio · N) is 0.
        DataError: If a chosen example lacks the needed extra fields ("query") or its response is not " Yes" or
            " No" ("response"), or no title is left to insert.
    """
    if kind not in KINDS:
        raise ConfigError(f"unknown corruption kind {kind!r}; expected one of {', '.join(map(repr, KINDS))}")
    if not 0 < ratio <= 1:
        raise ConfigError(f"ratio must be in (0, 1], got {ratio}")
    k = round(ratio * len(examples))
    if k == 0:
        raise ConfigError(f"ratio {ratio} of {len(examples)} examples corrupts none; use a larger ratio")
    if max_history < 2:
        raise ConfigError(f"max_history must be ≥ 2 (room for the inserted titles), got {max_history}")
    rng = random.Random(seed)
    chosen = sorted(rng.sample(range(len(examples)), k))
    corrupted = list(examples)
    undo: dict[str, str] = {}
    if kind == "response":
        for i in chosen:
            ex = examples[i]
            if ex.response not in (YES, NO):
                raise DataError(f"example {ex.id!r}: response {ex.response!r} is neither {YES!r} nor {NO!r}")
            corrupted[i] = dataclasses.replace(ex, response=NO if ex.response == YES else YES, extra=dict(ex.extra))
            undo[ex.id] = ex.response
        request = Request.correct_response(undo)
    else:
        pool = sorted({clean_title(t) for t in titles}) if titles is not None else all_titles(examples)
        rated = _history_titles(examples)
        for i in chosen:
            ex = examples[i]
            corrupted[i] = _corrupt_query(ex, rng, pool, rated.get(ex.extra.get("user"), set()), max_history)
            undo[ex.id] = ex.prompt
        request = Request.modify_query(undo)
    logger.info("corrupted %d of %d examples (%s, ratio %g, seed %d)", k, len(examples), kind, ratio, seed)
    return corrupted, request


def write_corruption(corrupted: Sequence[Example], request: Request, out_dir: str | os.PathLike) -> None:
    """Write the corrupted training set (``train.jsonl``) and the undoing request (``request.json``), atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_examples(corrupted, out / "train.jsonl")
    atomic_write_json(out / "request.json", request.to_dict())
