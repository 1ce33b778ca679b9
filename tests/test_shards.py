"""The shard partition (llmeraser.shards): one subject in one shard, balanced within LPT's bound against the exact
optimum, independent of the examples' order, and a stored partition checked field by field."""

from __future__ import annotations

import itertools
import json
import random

import pytest

from llmeraser.data import Example
from llmeraser.errors import DataError
from llmeraser.shards import Partition


def examples(sizes: list[int]) -> list[Example]:
    """Subjects s0, s1, … with the given numbers of examples each (field 'user')."""
    return [Example(f"s{s}-{i}", "q", "a", extra={"user": f"s{s}"}) for s, n in enumerate(sizes) for i in range(n)]


def test_without_a_field_every_example_is_a_subject_and_shards_differ_by_at_most_one():
    data = [Example(f"e{i}", "q", "a") for i in range(103)]
    p = Partition.build(data, 8)
    assert sum(p.sizes()) == 103 and max(p.sizes()) - min(p.sizes()) <= 1
    assert {p.shard(e.id) for e in data} == set(range(8))


def test_one_subject_lives_in_one_shard_and_the_largest_shard_is_within_lpts_bound_of_the_optimum():
    rng = random.Random(0)
    for _ in range(20):
        sizes = [rng.randint(1, 9) for _ in range(8)]
        data = examples(sizes)
        p = Partition.build(data, 3, by="user")
        for s in range(len(sizes)):
            assert len({p.shard(e.id) for e in data if e.extra["user"] == f"s{s}"}) == 1
        # the exact optimum: every assignment of the 8 subjects to 3 shards
        best = min(max(sum(n for n, j in zip(sizes, a, strict=True) if j == k) for k in range(3))
                   for a in itertools.product(range(3), repeat=len(sizes)))
        assert max(p.sizes()) <= (4 / 3 - 1 / 9) * best  # Graham's bound for longest-processing-time greedy


def test_the_partition_depends_on_the_set_not_the_order():
    data = examples([3, 1, 4, 1, 5, 9, 2, 6])
    shuffled = data[:]
    random.Random(1).shuffle(shuffled)
    assert Partition.build(data, 4, by="user") == Partition.build(shuffled, 4, by="user")


def test_round_trip_and_the_stored_partition_is_checked():
    data = examples([2, 2, 3, 1])
    p = Partition.build(data, 2, by="user")
    back = Partition.from_json(json.loads(json.dumps(p.to_json())), "partition.json")
    assert back == p
    back.check(data)
    assert [e.id for e in back.members(0, data)] == [e.id for e in data if p.shard(e.id) == 0]
    bad = [({**p.to_json(), "format": 9}, "format"), ({**p.to_json(), "shards": 0}, "'shards'"),
           ({**p.to_json(), "shards": True}, "'shards'"), ({**p.to_json(), "by": 3}, "'by'"),
           ({**p.to_json(), "shard_of": {"s0-0": 5}}, "shard indices"),
           ({**p.to_json(), "shard_of": {}}, "no example is in any shard"), ([], "format")]
    for obj, words in bad:
        with pytest.raises(DataError, match=words):
            Partition.from_json(obj, "partition.json")


def test_bad_input_names_the_problem():
    with pytest.raises(DataError, match="has no field 'team'"):
        Partition.build(examples([1, 2]), 2, by="team")
    with pytest.raises(DataError, match="must be a non-empty string or number"):
        Partition.build([Example("a", "q", "r", extra={"user": None}), Example("b", "q", "r", extra={"user": "x"})],
                        2, by="user")
    with pytest.raises(DataError, match="2 data subject.*cannot fill 3 shards"):
        Partition.build(examples([4, 4]), 3, by="user")
    with pytest.raises(DataError, match="≥ 1"):
        Partition.build(examples([1]), 0)
    p = Partition.build(examples([2, 2]), 2, by="user")
    with pytest.raises(DataError, match="1 id\\(s\\) in no shard"):
        p.check(examples([2, 2]) + [Example("new", "q", "a", extra={"user": "s0"})])
    with pytest.raises(DataError, match="is in no shard"):
        p.shard("new")
    moved = [Example(e.id, "q", "a", extra={"user": "s0"}) for e in examples([2, 2])]
    with pytest.raises(DataError, match="subject 's0'.*is in shards"):
        p.check(moved)
