"""Requests applied together as one update, each on record (`ledger.Ledger.begin` with several requests), and the
backlog that collects them until a deadline (`ledger.backlog`): one replay for k requests, `ledger verify` passing
update by update, the policy stated by the user."""

from __future__ import annotations

import json
import re
import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import torch
from fixtures.tiny import tiny_lineage
from safetensors.torch import load_file

from llmeraser.cli import main
from llmeraser.errors import UserInputError
from llmeraser.ledger import Ledger, LedgerError
from llmeraser.ledger import backlog as bl
from llmeraser.params import ADAPTER_WEIGHTS
from llmeraser.request import Request

UTC = timezone.utc  # noqa: UP017 (3.10)
R1 = {"edits": [{"op": "remove", "id": "ex0"}, {"op": "remove", "id": "ex3"}]}
R2 = {"edits": [{"op": "correct_response", "id": "ex5", "response": " Maybe"}]}
R3 = {"edits": [{"op": "remove", "id": "ex7"}]}


@pytest.fixture()
def lineage(tmp_path):
    tiny_lineage(tmp_path, "a0")
    for name, request in (("r1", R1), ("r2", R2), ("r3", R3)):
        (tmp_path / f"{name}.json").write_text(json.dumps(request))
    return tmp_path


def unlearn(root, *args: str, ledger: str = "ledger", adapter: str = "a0") -> int:
    return main(["unlearn", "--base-model", str(root / "base"), "--adapter", str(root / adapter), "--train",
                 str(root / "train.jsonl"), "--method", "rewind", "--quiet", "--ledger", str(root / ledger), *args])


def weights(folder) -> dict:
    return load_file(str(folder / ADAPTER_WEIGHTS))


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_batch_is_one_update_with_every_request_on_record_and_equals_applying_them_one_by_one(lineage, capsys):
    """Rewind is retraining on the set after all the requests, whichever way they come: the batch's weights equal,
    bit for bit, the two requests applied one after the other, each by its own rewind."""
    r = [str(lineage / f"r{k}.json") for k in (1, 2)]
    assert unlearn(lineage, "--request", *r, "--out", str(lineage / "both")) == 0
    assert "(requests #1, #2)" in capsys.readouterr().out
    assert unlearn(lineage, "--request", r[0], "--out", str(lineage / "a1"), ledger="one") == 0
    assert unlearn(lineage, "--request", r[1], "--out", str(lineage / "a2"), ledger="one", adapter="a1") == 0
    assert same(weights(lineage / "both"), weights(lineage / "a2"))
    with Ledger(lineage / "ledger", create=False) as book:
        entries = book.entries()
        assert [(e.seq, e.status, e.batch, e.pos) for e in entries] == [(1, "applied", 1, 0), (2, "applied", 1, 1)]
        first, second = entries
        assert first.output_sha256 == second.output_sha256 and first.input_sha256 == second.input_sha256
        assert [e["id"] for e in first.edited] == ["ex0", "ex3"] and [e["id"] for e in second.edited] == ["ex5"]
        assert len(book.updates()) == 1
    assert json.loads((lineage / "both" / "requests.json").read_text()) == [R1, R2]
    assert main(["ledger", "verify", str(lineage / "ledger")]) == 0
    capsys.readouterr()
    # the same batch again is a no-op; a batch holding an applied request is refused, naming it
    assert unlearn(lineage, "--request", *r, "--out", str(lineage / "again")) == 0
    assert "these 2 requests are already applied (#1, #2" in capsys.readouterr().out
    assert unlearn(lineage, "--request", r[0], str(lineage / "r3.json"), "--out", str(lineage / "x"),
                   adapter="both") == 2
    assert "request 1 of 2" in capsys.readouterr().err and not (lineage / "x").exists()
    # the same request twice in one batch
    assert unlearn(lineage, "--request", str(lineage / "r3.json"), str(lineage / "r3.json"), "--out",
                   str(lineage / "x"), adapter="both") == 2
    assert "request 2 of 2 is request 1 again" in capsys.readouterr().err


def test_the_backlog_collects_requests_until_a_deadline_and_applies_them_as_one_update(lineage, capsys):
    q = ["--queue"]
    assert unlearn(lineage, "--request", str(lineage / "r1.json"), *q, "--deadline", "30d") == 0
    assert "queued 1 request(s)" in capsys.readouterr().out
    assert unlearn(lineage, "--request", str(lineage / "r2.json"), *q) == 0  # no deadline: with the next batch
    assert unlearn(lineage, "--request", str(lineage / "r2.json"), *q) == 0
    assert "already queued" in capsys.readouterr().out
    # checked against the lineage after what is queued: an id the backlog removes is refused, nothing queued
    (lineage / "bad.json").write_text(json.dumps({"edits": [{"op": "remove", "id": "ex3"}]}))
    assert unlearn(lineage, "--request", str(lineage / "bad.json"), *q) == 2
    assert "request 3 of 3" in capsys.readouterr().err
    with Ledger(lineage / "ledger", create=False) as book:
        assert [x.request.to_dict() for x in bl.queued(book)] == [R1, R2] and not book.entries()
    assert main(["ledger", "show", str(lineage / "ledger")]) == 0
    shown = capsys.readouterr().out
    assert "backlog: 2 request(s) queued" in shown and "remove=2" in shown and "none" in shown
    # not due: nothing written, exit 0, and it says when
    assert unlearn(lineage, "--backlog", "--due-within", "1d", "--out", str(lineage / "b")) == 0
    assert "nothing is due" in capsys.readouterr().out and not (lineage / "b").exists()
    assert unlearn(lineage, "--backlog", "--due-within", "31d", "--out", str(lineage / "b")) == 0
    out = capsys.readouterr().out
    assert "2 queued request(s) applied as one update" in out and "(requests #1, #2)" in out
    with Ledger(lineage / "ledger", create=False) as book:
        assert not bl.queued(book) and [e.status for e in book.entries()] == ["applied", "applied"]
    assert main(["ledger", "verify", str(lineage / "ledger")]) == 0
    # the same requests given at once make the same adapter
    assert unlearn(lineage, "--request", str(lineage / "r1.json"), str(lineage / "r2.json"), "--out",
                   str(lineage / "c"), ledger="other") == 0
    assert same(weights(lineage / "b"), weights(lineage / "c"))
    capsys.readouterr()
    assert unlearn(lineage, "--backlog", "--out", str(lineage / "d"), adapter="b") == 0
    assert "the backlog is empty" in capsys.readouterr().out and not (lineage / "d").exists()
    # flags that do not go together
    for bad in (["--queue", "--request", str(lineage / "r3.json"), "--out", str(lineage / "e")],
                ["--backlog", "--request", str(lineage / "r3.json"), "--out", str(lineage / "e")],
                ["--request", str(lineage / "r3.json"), "--due-within", "1d", "--out", str(lineage / "e")],
                ["--backlog"]):
        assert unlearn(lineage, *bad, adapter="b") == 2
    assert not (lineage / "e").exists()


def test_the_policy_and_the_deadlines():
    now = datetime(2026, 12, 7, 12, tzinfo=UTC)
    assert bl.deadline("30d", now) == now + timedelta(days=30) and bl.deadline("+6h", now) == now + timedelta(hours=6)
    assert bl.deadline("2027-01-01T00:00Z", now) == datetime(2027, 1, 1, tzinfo=UTC)
    assert bl.deadline("2027-01-01T01:00+01:00", now) == datetime(2027, 1, 1, tzinfo=UTC)
    assert bl.deadline("2027-01-01T00:00", now) == datetime(2027, 1, 1, tzinfo=UTC)  # no zone: UTC
    for bad, match in (("2026-12-01", "already past"), ("soon", "neither a duration"), ("0s", "already past")):
        with pytest.raises(UserInputError, match=match):
            bl.deadline(bad, now)
    with pytest.raises(UserInputError, match="not a duration"):
        bl.duration("6 hours")


def test_take_applies_everything_when_the_earliest_deadline_is_near(tmp_path):
    now = datetime(2026, 12, 7, 12, tzinfo=UTC)
    with Ledger(tmp_path / "l") as book:
        # rows as submit writes them, without its checks (they need a lineage; tested above)
        for k, due in enumerate((now + timedelta(days=20), None, now + timedelta(days=3))):
            book.queue([Request.remove(f"x{k}")], now + timedelta(seconds=k), due)
        assert bl.take(book, timedelta(days=2), now)[0] == []
        taken, why = bl.take(book, timedelta(days=3), now)  # the earliest is 3 days off: every request goes
        assert [r.edits[0].id for r in taken] == ["x0", "x1", "x2"] and "within 3 days" in why
        assert len(bl.take(book, None, now)[0]) == 3



def test_queue_is_the_backlogs_one_writer_and_refuses_a_request_queued_twice(tmp_path):
    """`Ledger.queue` writes the backlog in one transaction: requests submitted together keep their order (a
    microsecond apart), and a request already queued — or given twice — is refused with nothing written. No module
    but the ledger's book writes the backlog table or opens the Ledger's private transaction."""
    now = datetime(2026, 12, 7, 12, tzinfo=UTC)
    a, b, c = (Request.remove(i) for i in ("x0", "x1", "x2"))
    with Ledger(tmp_path / "l") as book:
        book.queue([b, a], now, now + timedelta(days=1))
        assert [(q.request, q.submitted, q.deadline) for q in bl.queued(book)] == [
            (b, now, now + timedelta(days=1)), (a, now + timedelta(microseconds=1), now + timedelta(days=1))]
        for again in ([c, a], [c, c]):
            with pytest.raises(LedgerError, match="already in the backlog"):
                book.queue(again, now + timedelta(hours=1))
        assert [q.request for q in bl.queued(book)] == [b, a]  # c was not queued either time
    src = Path(__file__).resolve().parents[1] / "src"
    for f in sorted(src.rglob("*.py")):
        if f.name != "book.py" or f.parent.name != "ledger":
            text = f.read_text()
            assert "._transaction(" not in text, f
            assert not re.search(r"(?i)(insert\s+into|delete\s+from|update)\s+backlog\b", text), f

def test_a_ledger_written_before_batches_is_read_in_order(tmp_path):
    """A ledger from before: no batch columns, no backlog table. Opening it adds them, each request its own update
    in the order of its number."""
    folder = tmp_path / "old"
    folder.mkdir()
    db = sqlite3.connect(folder / "ledger.sqlite")
    db.executescript("""
        CREATE TABLE lineage (id INTEGER PRIMARY KEY CHECK (id = 1), created TEXT NOT NULL, root_adapter TEXT NOT
            NULL, root_sha256 TEXT NOT NULL, train_sha256 TEXT NOT NULL, n_train INTEGER NOT NULL);
        CREATE TABLE requests (seq INTEGER PRIMARY KEY AUTOINCREMENT, request_sha256 TEXT NOT NULL UNIQUE,
            request_json TEXT NOT NULL, edited TEXT NOT NULL, created TEXT NOT NULL, updated TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 1, status TEXT NOT NULL, input_adapter TEXT NOT NULL,
            input_sha256 TEXT NOT NULL, output_adapter TEXT NOT NULL, staged_sha256 TEXT, output_sha256 TEXT,
            report TEXT, error TEXT);""")
    for k in (1, 2):
        r = Request.remove(f"x{k}")
        db.execute("INSERT INTO requests (request_sha256, request_json, edited, created, updated, status, "
                   "input_adapter, input_sha256, output_adapter) VALUES (?, ?, '[]', 't', 't', 'applied', 'a', "
                   "?, ?)", (r.hash, json.dumps(r.to_dict()), f"in{k}", f"out{k}"))
    db.commit()
    db.close()
    with Ledger(folder, create=False) as book:
        assert [(e.seq, e.batch) for e in book.entries()] == [(1, 1), (2, 2)] and len(book.updates()) == 2
        assert bl.queued(book) == []


def test_a_request_that_failed_and_ran_again_later_is_replayed_where_it_ran(lineage, monkeypatch, capsys):
    """#1 fails, #2 is applied, #1 runs again: the lineage's order is #2 then #1 (what the adapters went through),
    so the training set the next request sees replays them in that order."""
    from llmeraser.job import AdapterJob

    boom = {"on": True}
    original = AdapterJob.context

    def context(self, train, request):
        if boom["on"]:
            raise KeyboardInterrupt
        return original(self, train, request)

    monkeypatch.setattr(AdapterJob, "context", context)
    assert unlearn(lineage, "--request", str(lineage / "r2.json"), "--out", str(lineage / "a1")) == 130
    boom["on"] = False
    assert unlearn(lineage, "--request", str(lineage / "r3.json"), "--out", str(lineage / "a1")) == 0
    assert unlearn(lineage, "--request", str(lineage / "r2.json"), "--out", str(lineage / "a2"), adapter="a1") == 0
    with Ledger(lineage / "ledger", create=False) as book:
        assert [(e.seq, e.status, e.attempts) for e in book.entries()] == [(2, "applied", 1), (1, "applied", 2)]
        assert book.head()[0] == str((lineage / "a2").resolve())
    assert main(["ledger", "verify", str(lineage / "ledger")]) == 0
