"""The backlog: requests put on record now and applied later, together, as one update — and the policy that says when.

Erasure law gives a deadline, not an instant (the GDPR's "without undue delay", at most a month). Applying each
request as it comes costs one replay each; collecting them costs one replay for all of them (one rewind of each
touched shard of a sharded adapter). A user states the policy:

- **apply now** — `unlearn --request r.json --ledger DIR --out OUT`, as always;
- **collect until a deadline** — `unlearn --request r.json --ledger DIR --queue --deadline 30d` puts the request in
  the backlog with its deadline (checked against the lineage at once: known ids, nothing removed earlier, it applies
  after what is already queued); `unlearn --ledger DIR --backlog --due-within 6h --out OUT`, run as often as one
  likes (a daily cron job), applies the whole backlog as one update as soon as the earliest deadline is within
  `--due-within` (what the replay takes, plus the time to the next run), and otherwise writes nothing and says when
  it will be due. Without `--due-within` the backlog is applied now.

Every request of the batch keeps its own row in the ledger (its hash, its edited examples against the set the ones
before it left), all sharing the update's input and output; `ledger verify` checks the chain update by update. A
queued request leaves the backlog in the same transaction that marks it applied, so a crash between leaves it both
pending and queued, and the same command finishes the work (`Ledger.recover`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from llmeraser.data import Example
from llmeraser.errors import UserInputError
from llmeraser.ledger.book import Ledger, LedgerError, as_requests
from llmeraser.request import Request

_DURATION = re.compile(r"^\+?(\d+(?:\.\d+)?)\s*([smhdw])$")
UTC = timezone.utc  # noqa: UP017 (datetime.UTC is Python ≥ 3.11; the library supports 3.10)
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


@dataclass(frozen=True)
class Queued:
    """A request waiting in the backlog: when it was submitted and by when it must be applied (None: no deadline,
    applied with the next batch)."""

    request: Request
    submitted: datetime
    deadline: datetime | None


def now() -> datetime:
    """The time now, in UTC (what deadlines are compared with)."""
    return datetime.now(UTC)


def duration(text: str) -> timedelta:
    """'90s', '30m', '6h', '30d', '2w' (a leading + is allowed) as a timedelta (UserInputError otherwise)."""
    m = _DURATION.match(text.strip())
    if not m:
        raise UserInputError(f"{text!r} is not a duration: a number and a unit, s, m, h, d or w (e.g. 6h, 30d)")
    return timedelta(**{_UNITS[m.group(2)]: float(m.group(1))})


def deadline(text: str, now: datetime) -> datetime:
    """A deadline: a duration from `now` ('30d') or an ISO 8601 time ('2027-01-31T00:00+01:00'; without a zone it is
    UTC), in UTC. A deadline already past is refused: the request would be overdue before it is queued."""
    if _DURATION.match(text.strip()):
        when = now + duration(text)
    else:
        try:
            when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
        except ValueError:
            raise UserInputError(f"--deadline {text!r} is neither a duration (30d, 6h) nor an ISO 8601 time "
                                 f"(2027-01-31T00:00Z)") from None
        when = when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
    if when <= now:
        raise UserInputError(f"--deadline {text!r} is already past ({when.isoformat()}); apply the request now")
    return when


def queued(book: Ledger) -> list[Queued]:
    """The backlog, in the order it was submitted (the order its requests apply in)."""
    rows = book.db.execute("SELECT * FROM backlog ORDER BY submitted, rowid").fetchall()
    return [Queued(Request.from_dict(_json(r["request_json"])), datetime.fromisoformat(r["submitted"]),
                   datetime.fromisoformat(r["deadline"]) if r["deadline"] else None) for r in rows]


def submit(book: Ledger, requests: Request | Sequence[Request], original: Sequence[Example], adapter: str | Path, *,
           due: datetime | None = None, now: datetime | None = None) -> str:
    """Put `requests` in the backlog with deadline `due`, after checking them against the lineage as `unlearn` would
    (the ORIGINAL training set, `adapter` the head — a new ledger takes it as its root — and the requests applying in
    order after those already queued). A request already queued or applied is a no-op. Returns what was done, in a
    sentence.

    Raises:
        LedgerError, RequestError: as `Ledger.prepare`, naming what does not fit.
    """
    requests, now = as_requests(requests), now or datetime.now(UTC)
    waiting = queued(book)
    known = {q.request.hash for q in waiting}
    fresh = []
    for request in requests:
        entry = book.find(request)
        if entry is not None and entry.status == "applied":
            continue
        if request.hash not in known:
            fresh.append(request)
    if not fresh:
        return f"nothing queued: the request{'s are' if len(requests) > 1 else ' is'} already queued or applied"
    book.prepare(adapter, original, [q.request for q in waiting] + fresh)  # after the backlog, in order
    book.queue(fresh, now, due)
    return (f"queued {len(fresh)} request(s) ({', '.join(r.hash[:12] + '…' for r in fresh)}), due "
            f"{due.isoformat() if due else 'with the next batch'}; the backlog holds {len(waiting) + len(fresh)}")


def take(book: Ledger, within: timedelta | None = None, now: datetime | None = None) -> tuple[list[Request], str]:
    """The backlog's requests to apply now as one update, by the policy: every queued request when `within` is None
    (apply now) or when the earliest deadline falls within `within` of `now`; else none. Returns them (in submission
    order) and a sentence saying why."""
    now, waiting = now or datetime.now(UTC), queued(book)
    if not waiting:
        return [], "the backlog is empty: nothing to apply"
    dated = sorted(q.deadline for q in waiting if q.deadline is not None)
    if within is not None:
        if not dated:
            return [], (f"{len(waiting)} request(s) queued, none with a deadline: nothing is due (apply them without "
                        f"--due-within)")
        if dated[0] - now > within:
            return [], (f"{len(waiting)} request(s) queued; nothing is due: the earliest deadline is "
                        f"{dated[0].isoformat()}, due from {(dated[0] - within).isoformat()}")
    why = (f"the earliest deadline, {dated[0].isoformat()}, is within {within}" if within is not None
           else "applying the backlog now")
    return [q.request for q in waiting], f"{len(waiting)} queued request(s) applied as one update ({why})"


def _json(text: str) -> dict:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise LedgerError("a backlog row holds no request object (the ledger was edited by hand)")
    return value
