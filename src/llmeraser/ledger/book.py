"""The ledger's book: the lineage and its requests in SQLite (`Ledger`), each request's record (`Entry`), the checks a
request passes against the lineage, and `verify`. The package's docstring (`llmeraser.ledger`) says what it
guarantees."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from llmeraser.data import Example, examples_hash
from llmeraser.errors import LLMEraserRuntimeError, RequestError, UserInputError
from llmeraser.io import LEDGER_FILE, canonical_json, sha256_bytes, sha256_file
from llmeraser.params import ADAPTER_WEIGHTS, adapter_hash, has_adapter
from llmeraser.request import Request, apply_request, merge_requests, resolve

FILE = LEDGER_FILE  # the database, in the ledger's folder
_SCHEMA = """
CREATE TABLE IF NOT EXISTS lineage (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    created TEXT NOT NULL,
    root_adapter TEXT NOT NULL,
    root_sha256 TEXT NOT NULL,
    train_sha256 TEXT NOT NULL,
    n_train INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS requests (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    request_sha256 TEXT NOT NULL UNIQUE,
    request_json TEXT NOT NULL,
    edited TEXT NOT NULL,
    created TEXT NOT NULL,
    updated TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 1,
    status TEXT NOT NULL CHECK (status IN ('pending', 'applied', 'failed')),
    input_adapter TEXT NOT NULL,
    input_sha256 TEXT NOT NULL,
    output_adapter TEXT NOT NULL,
    staged_sha256 TEXT,
    output_sha256 TEXT,
    report TEXT,
    error TEXT,
    files TEXT,
    batch INTEGER,
    pos INTEGER
);
CREATE TABLE IF NOT EXISTS backlog (
    request_sha256 TEXT PRIMARY KEY,
    request_json TEXT NOT NULL,
    submitted TEXT NOT NULL,
    deadline TEXT
);
"""


class LedgerError(UserInputError):
    """A request that does not fit the lineage (wrong adapter, wrong training set, an id removed earlier)."""


class LedgerMismatch(LLMEraserRuntimeError):
    """An output adapter on disk differs from the weights the ledger staged for it."""


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def example_hash(example: Example) -> str:
    """sha256 of one example's canonical JSON."""
    return sha256_bytes(canonical_json(example.to_dict()).encode("utf-8"))


@dataclass(frozen=True)
class Entry:
    """One request's record (a row of the ledger)."""

    seq: int
    request: Request
    request_sha256: str
    edited: list[dict]
    created: str
    updated: str
    attempts: int
    status: str
    input_adapter: str
    input_sha256: str
    output_adapter: str
    staged_sha256: str | None
    output_sha256: str | None
    report: dict | None
    error: str | None
    files: dict | None = None  # the output folder's files (relative path → sha256), recorded when staged
    batch: int | None = None  # the update it was (last) applied in: requests applied together share it
    pos: int | None = None  # its place in that update


class Ledger:
    """The ledger of one lineage, in `folder` (created on first use).

    Args:
        folder: The ledger's folder; holds `ledger.sqlite`.
        create: Create the folder and database if missing (else a missing ledger is an error).
    """

    def __init__(self, folder: str | Path, *, create: bool = True):
        self.folder = Path(folder)
        path = self.folder / FILE
        if not path.is_file():
            if not create:
                raise LedgerError(f"no ledger at {str(self.folder)!r} ({FILE} is missing)")
            if self.folder.exists() and not self.folder.is_dir():
                raise LedgerError(f"ledger folder {str(self.folder)!r} is a file")
            self.folder.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(path, isolation_level=None, timeout=30)
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            with self._transaction():
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    self.db.execute(statement)
                columns = {row[1] for row in self.db.execute("PRAGMA table_info(requests)")}
                if "files" not in columns:  # a ledger written before outputs' files were recorded
                    self.db.execute("ALTER TABLE requests ADD COLUMN files TEXT")
                if "batch" not in columns:  # before batches: each request was its own update, in seq order
                    self.db.execute("ALTER TABLE requests ADD COLUMN batch INTEGER")
                    self.db.execute("ALTER TABLE requests ADD COLUMN pos INTEGER")
                    self.db.execute("UPDATE requests SET batch = seq, pos = 0")
        except sqlite3.DatabaseError as e:
            raise LedgerError(f"{str(path)!r} is not a readable ledger database: {e}") from e

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE … COMMIT: one writer at a time; a crash inside leaves the previous state."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # ------------------------------------------------------------------------------------------------ reading
    def root(self) -> dict | None:
        row = self.db.execute("SELECT * FROM lineage WHERE id = 1").fetchone()
        return dict(row) if row else None

    def entries(self, status: str | None = None) -> list[Entry]:
        """The requests in the order they were (last) started: by update (`batch`), then their place in it — a
        request that failed and ran again later sits where it ran."""
        query = ("SELECT * FROM requests" + (" WHERE status = ?" if status else "") + " ORDER BY batch, pos, seq")
        return [_entry(r) for r in self.db.execute(query, (status,) if status else ())]

    def updates(self) -> list[list[Entry]]:
        """The applied requests grouped by update (one each, or a batch applied together), in order."""
        groups: dict[int, list[Entry]] = {}
        for entry in self.entries("applied"):
            groups.setdefault(entry.batch, []).append(entry)
        return list(groups.values())

    def batch(self, batch: int) -> list[Entry]:
        """The requests of one update, in order."""
        return [_entry(r) for r in self.db.execute("SELECT * FROM requests WHERE batch = ? ORDER BY pos", (batch,))]

    def rows(self) -> list[dict]:
        """One row per request, in order, as `llmeraser ledger show` lists them: seq, time (last update, UTC), status,
        request (hash, 12 hex digits), edits (op=count), input and output (hashes; output: the staged one until
        applied), solver (method/solver), residual (of the solve; NaN without a report) and note (the error, else
        the output folder of an applied request)."""
        return [{"seq": e.seq, "update": e.batch, "time": e.updated, "status": e.status,
                 "request": e.request_sha256[:12], "edits": e.request.summary(),
                 "input": e.input_sha256[:12], "output": (e.output_sha256 or e.staged_sha256 or "")[:12],
                 "solver": f"{e.report['method']}/{e.report['solver']}" if e.report else "",
                 "residual": e.report["solve"]["residual"] if e.report else float("nan"),
                 "note": e.error or (e.output_adapter if e.status == "applied" else "")}
                for e in self.entries()]

    def find(self, request: Request) -> Entry | None:
        row = self.db.execute("SELECT * FROM requests WHERE request_sha256 = ?", (request.hash,)).fetchone()
        return _entry(row) if row else None

    def head(self) -> tuple[str, str]:
        """(path, sha256) of the lineage's current adapter: the last applied output, else the root."""
        applied = self.entries("applied")
        if applied:
            return applied[-1].output_adapter, applied[-1].output_sha256 or ""
        root = self.root()
        if root is None:
            raise LedgerError(f"the ledger at {str(self.folder)!r} has no lineage yet")
        return root["root_adapter"], root["root_sha256"]

    def effective_train(self, original: Sequence[Example]) -> list[Example]:
        """The training set after every applied request, replayed in order from `original`."""
        train = list(original)
        for entry in self.entries("applied"):
            train = apply_request(train, entry.request)
        return train

    # ----------------------------------------------------------------------------------------------- checking
    def prepare(self, adapter: str | Path, original: Sequence[Example],
                requests: Request | Sequence[Request]) -> list[Example]:
        """Check that `requests` (one, or several applied in order as one update) may be applied to `adapter` in this
        lineage and return the effective training set.

        A new ledger takes `adapter` as its root and `original` as its training set. Otherwise `original` must be
        the lineage's training set (same hash), `adapter` its head (same weights), and no edit may touch an id that
        an earlier request removed.

        Raises:
            LedgerError: naming what does not fit. RequestError: as `resolve` against the effective set (several:
                `merge_requests`, each against the set the ones before it left).
        """
        requests = as_requests(requests)
        sha, train_sha = adapter_hash(adapter), examples_hash(original)
        with self._transaction():
            root = self.root()
            if root is None:
                self.db.execute("INSERT INTO lineage VALUES (1, ?, ?, ?, ?, ?)",
                                (_now(), str(Path(adapter).resolve()), sha, train_sha, len(original)))
                root = self.root()
        self.check_train(original)
        head_path, head_sha = self.head()
        if sha != head_sha:
            raise LedgerError(f"adapter {str(adapter)!r} (sha256 {sha[:12]}…) is not the head of this lineage: "
                              f"requests apply to {head_path!r} (sha256 {head_sha[:12]}…)")
        train = self.effective_train(original)
        self.check_edits(requests, train)
        return train

    def check_train(self, original: Sequence[Example]) -> None:
        """`original` must be the lineage's training set (LedgerError naming both hashes)."""
        root, train_sha = self.root(), examples_hash(original)
        if train_sha != root["train_sha256"]:
            raise LedgerError(
                f"--train is not this lineage's training set (sha256 {train_sha[:12]}…, {len(original)} examples; "
                f"the ledger started from {root['train_sha256'][:12]}…, {root['n_train']} examples): give the "
                f"ORIGINAL training set, the ledger replays the applied requests itself")

    def check_edits(self, requests: Sequence[Request], train: Sequence[Example]) -> None:
        """No edit may touch an id an applied request removed; the requests must apply in order to `train`."""
        removed = {e.id: entry.seq for entry in self.entries("applied") for e in entry.request.edits
                   if e.op == "remove"}
        for k, request in enumerate(requests):
            for i, edit in enumerate(request.edits):
                if edit.id in removed:
                    which = f"request {k + 1} of {len(requests)}, " if len(requests) > 1 else ""
                    raise LedgerError(f"{which}edits[{i}] (0-based): example {edit.id!r} was removed by request "
                                      f"#{removed[edit.id]}; it can no longer be edited")
        if len(requests) > 1:
            merge_requests(requests, train)
        else:
            resolve(requests[0], train)

    # ----------------------------------------------------------------------------------------------- writing
    def queue(self, requests: Sequence[Request], submitted: datetime, due: datetime | None = None) -> None:
        """Put `requests` in the backlog, submitted at `submitted` (each a microsecond after the one before: their
        order within one submission) and due by `due` (None: with the next batch), in one transaction. With `finish`
        (which takes them out as they are applied) the only writer of the backlog; checking them against the lineage
        is the caller's (`backlog.submit`). A request already queued is refused (LedgerError), nothing written."""
        rows = [(r.hash, canonical_json(r.to_dict()), (submitted + timedelta(microseconds=k)).isoformat(),
                 due.isoformat() if due else None) for k, r in enumerate(requests)]
        try:
            with self._transaction():
                self.db.executemany("INSERT INTO backlog VALUES (?, ?, ?, ?)", rows)
        except sqlite3.IntegrityError:
            raise LedgerError("a request is already in the backlog (or given twice); nothing was queued") from None

    def begin(self, requests: Request | Sequence[Request], train: Sequence[Example], adapter: str | Path,
              out: str | Path) -> int:
        """Record `requests` — one, or several applied in order as one update — as pending: a row each (new, or a
        new attempt of a pending/failed one) in a new batch, which places them after every update before. Returns
        the batch's number (what `stage`, `finish` and `fail` take)."""
        requests = as_requests(requests)
        adapter_sha, now = adapter_hash(adapter), _now()
        rows, after = [], list(train)
        for request in requests:  # each request's edits against the set the ones before it left
            rows.append(json.dumps([{"id": old.id, "op": edit.op, "old_sha256": example_hash(old),
                                     "new_sha256": example_hash(new) if new is not None else None}
                                    for edit, (old, new) in zip(request.edits, resolve(request, after),
                                                                strict=True)]))
            after = apply_request(after, request)
        where = (str(Path(adapter).resolve()), adapter_sha, str(Path(out).resolve()))
        with self._transaction():
            batch = 1 + (self.db.execute("SELECT MAX(batch) FROM requests").fetchone()[0] or 0)
            for pos, (request, edited) in enumerate(zip(requests, rows, strict=True)):
                entry = self.find(request)
                if entry is not None and entry.status == "applied":
                    raise LedgerError(f"request {request.hash[:12]}… is already applied (#{entry.seq})")
                if entry is None:
                    self.db.execute(
                        "INSERT INTO requests (request_sha256, request_json, edited, created, updated, status, "
                        "input_adapter, input_sha256, output_adapter, batch, pos) "
                        "VALUES (?, ?, ?, ?, ?, 'pending', ?, ?, ?, ?, ?)",
                        (request.hash, canonical_json(request.to_dict()), edited, now, now, *where, batch, pos))
                else:
                    self.db.execute(
                        "UPDATE requests SET edited = ?, updated = ?, attempts = attempts + 1, status = 'pending', "
                        "input_adapter = ?, input_sha256 = ?, output_adapter = ?, staged_sha256 = NULL, "
                        "output_sha256 = NULL, report = NULL, error = NULL, batch = ?, pos = ? WHERE seq = ?",
                        (edited, now, *where, batch, pos, entry.seq))
        return batch

    def stage(self, batch: int, folder: str | Path) -> None:
        """Record the hash of the finished output, still under its temporary name, before it is renamed."""
        with self._transaction():
            self.db.execute("UPDATE requests SET staged_sha256 = ?, files = ?, updated = ? WHERE batch = ? AND "
                            "status = 'pending'", (adapter_hash(folder), json.dumps(folder_files(folder)), _now(),
                                                   batch))

    def finish(self, batch: int, report: dict | None = None) -> list[Entry]:
        """Mark the batch's requests applied: their output folder exists and holds the staged weights (else
        LedgerMismatch). Those of them waiting in the backlog leave it in the same transaction."""
        entries = self.batch(batch)
        out = Path(entries[0].output_adapter)
        sha = adapter_hash(out) if has_adapter(out) else None
        if sha is None or sha != entries[0].staged_sha256:
            raise LedgerMismatch(f"{numbers(entries)}: output {str(out)!r} is missing or differs from the staged "
                                 f"weights; nothing was marked applied")
        with self._transaction():
            self.db.execute("UPDATE requests SET status = 'applied', output_sha256 = ?, updated = ?, "
                            "report = COALESCE(?, report) WHERE batch = ?",
                            (sha, _now(), None if report is None else json.dumps(report), batch))
            self.db.executemany("DELETE FROM backlog WHERE request_sha256 = ?",
                                [(e.request_sha256,) for e in entries])
        return self.batch(batch)

    def fail(self, batch: int, error: BaseException) -> None:
        """Mark the batch's pending requests failed, keeping the first line of the error (or its type, e.g.
        KeyboardInterrupt)."""
        message = (str(error).splitlines() or [type(error).__name__])[0][:2000]
        with self._transaction():
            self.db.execute("UPDATE requests SET status = 'failed', error = ?, updated = ? WHERE batch = ? AND "
                            "status = 'pending'", (message, _now(), batch))

    def recover(self, requests: Request | Sequence[Request]) -> list[Entry] | None:
        """Finish the record of an update whose run was cut off (killed or interrupted) after its output was renamed
        into place (the output's hash equals the staged one, and the update was these requests); None when there is
        nothing to recover."""
        requests = as_requests(requests)
        entry = self.find(requests[0])
        if entry is None or entry.status == "applied" or entry.staged_sha256 is None:
            return None
        if [e.request_sha256 for e in self.batch(entry.batch)] != [r.hash for r in requests]:
            return None
        out = Path(entry.output_adapter)
        if has_adapter(out) and adapter_hash(out) == entry.staged_sha256:
            report_path = out / "report.json"
            report = json.loads(report_path.read_text(encoding="utf-8")) if report_path.is_file() else None
            return self.finish(entry.batch, report)
        return None

    def _row(self, seq: int) -> sqlite3.Row:
        return self.db.execute("SELECT * FROM requests WHERE seq = ?", (seq,)).fetchone()

    # ---------------------------------------------------------------------------------------------- verifying
    def verify(self) -> list[str]:
        """Recompute the hash of every adapter on record; return the problems found (empty: all match).

        Checks the root, each applied update's output (every file it recorded), and the chain: each update's input
        is the previous update's output (the root for the first); the requests of one update share its input and
        output."""
        root = self.root()
        if root is None:
            return [f"the ledger at {str(self.folder)!r} has no lineage"]
        problems = []

        def check(label: str, path: str, sha: str) -> None:
            if not has_adapter(path):
                problems.append(f"{label}: {path!r} is missing ({ADAPTER_WEIGHTS} not found)")
            elif adapter_hash(path) != sha:
                problems.append(f"{label}: {path!r} has sha256 {adapter_hash(path)[:12]}…, the ledger recorded "
                                f"{sha[:12]}…")

        check("root", root["root_adapter"], root["root_sha256"])
        previous = root["root_sha256"]
        for entries in self.updates():
            first, label = entries[0], numbers(entries)
            if {e.input_sha256 for e in entries} != {previous}:
                problems.append(f"{label}: its input {first.input_sha256[:12]}… is not the previous adapter "
                                f"{previous[:12]}… (the chain is broken)")
            if len({(e.output_adapter, e.output_sha256, json.dumps(e.files)) for e in entries}) > 1:
                problems.append(f"{label}: one update, but its requests record different outputs")
            check(label, first.output_adapter, first.output_sha256 or "")
            if first.files is not None and Path(first.output_adapter).is_dir():
                now = folder_files(first.output_adapter)
                for name in sorted(set(first.files) | set(now)):
                    if first.files.get(name) != now.get(name):
                        state = "is missing" if name not in now else "was added" if name not in first.files \
                            else f"has sha256 {now[name][:12]}…, the ledger recorded {first.files[name][:12]}…"
                        problems.append(f"{label}: {name} in {first.output_adapter!r} {state}")
            previous = first.output_sha256 or ""
        return problems


def as_requests(requests: Request | Sequence[Request]) -> list[Request]:
    """One request or several as a list, none twice (RequestError naming the repeat)."""
    requests = [requests] if isinstance(requests, Request) else list(requests)
    if not requests:
        raise RequestError("no request given")
    seen: dict[str, int] = {}
    for k, request in enumerate(requests):
        if request.hash in seen:
            raise RequestError(f"request {k + 1} of {len(requests)} is request {seen[request.hash] + 1} again")
        seen[request.hash] = k
    return requests


def numbers(entries: Sequence[Entry]) -> str:
    """'request #3' or 'requests #3, #4, #5' (one update's)."""
    return (f"request #{entries[0].seq}" if len(entries) == 1
            else "requests " + ", ".join(f"#{e.seq}" for e in entries))


def _entry(row: sqlite3.Row) -> Entry:
    d = dict(row)
    return Entry(seq=d["seq"], request=Request.from_dict(json.loads(d["request_json"])),
                 request_sha256=d["request_sha256"], edited=json.loads(d["edited"]), created=d["created"],
                 updated=d["updated"], attempts=d["attempts"], status=d["status"], input_adapter=d["input_adapter"],
                 input_sha256=d["input_sha256"], output_adapter=d["output_adapter"],
                 staged_sha256=d["staged_sha256"], output_sha256=d["output_sha256"],
                 report=json.loads(d["report"]) if d["report"] else None, error=d["error"],
                 files=json.loads(d["files"]) if d.get("files") else None, batch=d["batch"], pos=d["pos"])


def folder_files(folder: str | Path) -> dict[str, str]:
    """Every regular file under `folder` (relative path → sha256): what `verify` holds an applied output to — the
    adapter, its report, request and recording alike."""
    folder = Path(folder)
    return {str(f.relative_to(folder)): sha256_file(f) for f in sorted(folder.rglob("*")) if f.is_file()}

