"""The partition of a training set into shards for sharded fine-tuning (SISA, Bourtoule et al. 2021; APA, Hu et al.
2024): one adapter is trained per shard, so a removal retrains only the shards it touches.

A data subject — a user, a person, a document: the value of a record field (`by`) — lives in exactly one shard, so a
request about one subject touches one shard. Without `by` every example is its own subject. Subjects are assigned
largest first, each to the shard with the fewest examples so far (longest-processing-time greedy: no shard holds
more than 4/3 of the best possible largest shard, and with subjects of one example each the shard sizes differ by at
most one). Ties — subjects of the same size, shards of the same load — are broken by sha256 of the subject's key and
by shard index, so the partition depends on the set of examples only, not on their order in the file.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from llmeraser.data import Example
from llmeraser.errors import DataError

FORMAT = 1


def subject_of(example: Example, by: str | None) -> str:
    """The data subject an example belongs to: the value of its record field `by` (as text), or its id."""
    if by is None:
        return example.id
    if by not in example.extra:
        raise DataError(f"example {example.id!r} has no field {by!r} to shard by")
    value = example.extra[by]
    if value is None or isinstance(value, (dict, list)) or value == "":
        raise DataError(f"example {example.id!r}: field {by!r} must be a non-empty string or number to shard by, "
                        f"got {value!r}")
    return str(value)


@dataclass(frozen=True)
class Partition:
    """Which shard each example id is in (`shard_of`), how it was decided (`by`: the record field, or None for each
    example its own subject) and the number of shards."""

    shards: int
    by: str | None
    shard_of: dict[str, int]

    @classmethod
    def build(cls, examples: Sequence[Example], shards: int, by: str | None = None) -> Partition:
        """Partition `examples` into `shards` shards, one subject per shard (module docstring)."""
        if shards < 1:
            raise DataError(f"the number of shards must be ≥ 1, got {shards}")
        groups: dict[str, list[str]] = {}
        for e in examples:
            groups.setdefault(subject_of(e, by), []).append(e.id)
        if len(groups) < shards:
            raise DataError(f"{len(groups)} data subject(s){f' (field {by!r})' if by else ''} cannot fill {shards} "
                            f"shards: every shard needs at least one; use fewer shards")
        order = sorted(groups, key=lambda key: (-len(groups[key]), _key_hash(key)))
        load = [0] * shards
        shard_of = {}
        for key in order:
            s = min(range(shards), key=lambda j: (load[j], j))
            load[s] += len(groups[key])
            shard_of.update((i, s) for i in groups[key])
        return cls(shards, by, shard_of)

    def members(self, shard: int, examples: Iterable[Example]) -> list[Example]:
        """The examples of `examples` in `shard`, in their order (ids the partition does not know are refused)."""
        return [e for e in examples if self.shard(e.id) == shard]

    def shard(self, example_id: str) -> int:
        try:
            return self.shard_of[example_id]
        except KeyError:
            raise DataError(f"example {example_id!r} is in no shard of this partition") from None

    def empty(self) -> set[int]:
        """The shards that hold no example (every one of them removed by a request)."""
        return set(range(self.shards)) - set(self.shard_of.values())

    def sizes(self) -> list[int]:
        out = [0] * self.shards
        for s in self.shard_of.values():
            out[s] += 1
        return out

    def check(self, examples: Sequence[Example]) -> None:
        """Refuse a training set that is not the partitioned one (ids missing or added) or whose subjects straddle
        shards (a record's `by` field edited after partitioning)."""
        ids = {e.id for e in examples}
        missing, extra = sorted(set(self.shard_of) - ids), sorted(ids - set(self.shard_of))
        if missing or extra:
            raise DataError(f"the training set does not match the partition: {len(missing)} partitioned id(s) "
                            f"missing (e.g. {missing[:3]}), {len(extra)} id(s) in no shard (e.g. {extra[:3]})")
        home: dict[str, int] = {}
        for e in examples:
            s = home.setdefault(subject_of(e, self.by), self.shard_of[e.id])
            if s != self.shard_of[e.id]:
                raise DataError(f"subject {subject_of(e, self.by)!r} (field {self.by!r}) is in shards {s} and "
                                f"{self.shard_of[e.id]}: the partition keeps one subject in one shard")

    def to_json(self) -> dict:
        return {"format": FORMAT, "shards": self.shards, "by": self.by, "shard_of": dict(sorted(self.shard_of.items()))}

    @classmethod
    def from_json(cls, obj: object, where: str) -> Partition:
        """A partition read back, every field checked (a hand-edited file gets an error naming what is wrong)."""
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise DataError(f"{where}: not a shard partition of format {FORMAT}")
        shards, by, shard_of = obj.get("shards"), obj.get("by"), obj.get("shard_of")
        if not isinstance(shards, int) or isinstance(shards, bool) or shards < 1:
            raise DataError(f"{where}: 'shards' must be an integer ≥ 1, got {shards!r}")
        if by is not None and not (isinstance(by, str) and by):
            raise DataError(f"{where}: 'by' must be a field name or null, got {by!r}")
        if not isinstance(shard_of, dict) or not all(
                isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and 0 <= v < shards
                for k, v in shard_of.items()):
            raise DataError(f"{where}: 'shard_of' must map example ids to shard indices 0..{shards - 1}")
        if not shard_of:
            raise DataError(f"{where}: no example is in any shard")
        return cls(shards, by, dict(shard_of))  # a shard may be empty: every example of it was removed


def _key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()
