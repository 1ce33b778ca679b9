"""The request ledger: every request applied to one adapter lineage, on record, in order, crash-safe.

A lineage starts at a fine-tuned adapter (the *root*) and its training set. Each request moves the lineage's *head*
from one adapter to the next; the training set the next request is computed against is the original with every
applied request replayed in order (removed examples gone, corrections applied). The ledger is a SQLite database
(`DIR/ledger.sqlite`, WAL journal, synchronous FULL, one transaction per state change) with, per request: its
sequence number, times, the request JSON and its hash, the hashes of the edited examples (old and new versions), the
input and output adapters (path and sha256 of the weights), the solver's report, and a status:

    pending  → the work started (or was cut off: a crash leaves the request pending, never applied)
    applied  → the output adapter is complete, renamed into place, and its hash recorded
    failed   → the work raised; the error is kept

Writing an output takes two steps that cannot be one atomic act: the adapter folder is built under a temporary
name, its hash recorded as *staged*, the folder renamed into place, and the request marked applied. A crash between
the rename and the last step leaves a complete folder whose hash the ledger staged; the next run of the same request
sees that and finishes the record (`Ledger.recover`) instead of redoing the work. Running a request that is already
applied is a no-op (keyed by the request hash). `verify` recomputes every adapter's hash against the record, and the
hash of every file an applied output carries (adapter, report, request, recording) against those staged.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from llmeraser.data import Example, examples_hash
from llmeraser.errors import LLMEraserRuntimeError, UserInputError
from llmeraser.io import LEDGER_FILE, canonical_json, check_new_output, sha256_bytes, sha256_file
from llmeraser.params import ADAPTER_WEIGHTS, adapter_hash, has_adapter
from llmeraser.request import Request, apply_request, resolve

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
    files TEXT
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
        query = "SELECT * FROM requests" + (" WHERE status = ?" if status else "") + " ORDER BY seq"
        return [_entry(r) for r in self.db.execute(query, (status,) if status else ())]

    def rows(self) -> list[dict]:
        """One row per request, in order, as `llmeraser ledger show` lists them: seq, time (last update, UTC), status,
        request (hash, 12 hex digits), edits (op=count), input and output (hashes; output: the staged one until
        applied), solver (method/solver), residual (of the solve; NaN without a report) and note (the error, else
        the output folder of an applied request)."""
        return [{"seq": e.seq, "time": e.updated, "status": e.status, "request": e.request_sha256[:12],
                 "edits": " ".join(f"{k}={v}" for k, v in e.request.counts().items() if v),
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
    def prepare(self, adapter: str | Path, original: Sequence[Example], request: Request) -> list[Example]:
        """Check that `request` may be applied to `adapter` in this lineage and return the effective training set.

        A new ledger takes `adapter` as its root and `original` as its training set. Otherwise `original` must be
        the lineage's training set (same hash), `adapter` its head (same weights), and no edit may touch an id that
        an earlier request removed.

        Raises:
            LedgerError: naming what does not fit. RequestError: as `resolve` against the effective set.
        """
        sha, train_sha = adapter_hash(adapter), examples_hash(original)
        with self._transaction():
            root = self.root()
            if root is None:
                self.db.execute("INSERT INTO lineage VALUES (1, ?, ?, ?, ?, ?)",
                                (_now(), str(Path(adapter).resolve()), sha, train_sha, len(original)))
                root = self.root()
        if train_sha != root["train_sha256"]:
            raise LedgerError(
                f"--train is not this lineage's training set (sha256 {train_sha[:12]}…, {len(original)} examples; "
                f"the ledger started from {root['train_sha256'][:12]}…, {root['n_train']} examples): give the "
                f"ORIGINAL training set, the ledger replays the applied requests itself")
        head_path, head_sha = self.head()
        if sha != head_sha:
            raise LedgerError(f"adapter {str(adapter)!r} (sha256 {sha[:12]}…) is not the head of this lineage: "
                              f"requests apply to {head_path!r} (sha256 {head_sha[:12]}…)")
        removed = {e.id: entry.seq for entry in self.entries("applied") for e in entry.request.edits
                   if e.op == "remove"}
        for i, edit in enumerate(request.edits):
            if edit.id in removed:
                raise LedgerError(f"edits[{i}] (0-based): example {edit.id!r} was removed by request "
                                  f"#{removed[edit.id]}; it can no longer be edited")
        train = self.effective_train(original)
        resolve(request, train)
        return train

    # ----------------------------------------------------------------------------------------------- writing
    def begin(self, request: Request, train: Sequence[Example], adapter: str | Path, out: str | Path) -> int:
        """Record `request` as pending (a new row, or a new attempt of a pending/failed one); return its seq."""
        edited = [{"id": old.id, "op": edit.op, "old_sha256": example_hash(old),
                   "new_sha256": example_hash(new) if new is not None else None}
                  for edit, (old, new) in zip(request.edits, resolve(request, train), strict=True)]
        values = (canonical_json(request.to_dict()), json.dumps(edited), _now(), str(Path(adapter).resolve()),
                  adapter_hash(adapter), str(Path(out).resolve()))
        with self._transaction():
            entry = self.find(request)
            if entry is not None and entry.status == "applied":
                raise LedgerError(f"request {request.hash[:12]}… is already applied (#{entry.seq})")
            if entry is None:
                self.db.execute(
                    "INSERT INTO requests (request_sha256, request_json, edited, created, updated, status, "
                    "input_adapter, input_sha256, output_adapter) VALUES (?, ?, ?, ?, ?, 'pending', ?, ?, ?)",
                    (request.hash, values[0], values[1], values[2], values[2], *values[3:]))
            else:
                self.db.execute(
                    "UPDATE requests SET edited = ?, updated = ?, attempts = attempts + 1, status = 'pending', "
                    "input_adapter = ?, input_sha256 = ?, output_adapter = ?, staged_sha256 = NULL, "
                    "output_sha256 = NULL, report = NULL, error = NULL WHERE seq = ?",
                    (values[1], values[2], *values[3:], entry.seq))
            return self.find(request).seq

    def stage(self, seq: int, folder: str | Path) -> None:
        """Record the hash of the finished output, still under its temporary name, before it is renamed."""
        with self._transaction():
            self.db.execute("UPDATE requests SET staged_sha256 = ?, files = ?, updated = ? WHERE seq = ? AND "
                            "status = 'pending'", (adapter_hash(folder), json.dumps(folder_files(folder)), _now(), seq))

    def finish(self, seq: int, report: dict | None = None) -> Entry:
        """Mark `seq` applied: its output folder exists and holds the staged weights (else LedgerMismatch)."""
        row = self._row(seq)
        out = Path(row["output_adapter"])
        sha = adapter_hash(out) if has_adapter(out) else None
        if sha is None or sha != row["staged_sha256"]:
            raise LedgerMismatch(f"request #{seq}: output {str(out)!r} is missing or differs from the staged "
                                 f"weights; nothing was marked applied")
        with self._transaction():
            self.db.execute("UPDATE requests SET status = 'applied', output_sha256 = ?, updated = ?, "
                            "report = COALESCE(?, report) WHERE seq = ?",
                            (sha, _now(), None if report is None else json.dumps(report), seq))
        return _entry(self._row(seq))

    def fail(self, seq: int, error: BaseException) -> None:
        """Mark a pending `seq` failed, keeping the first line of the error (or its type, e.g. KeyboardInterrupt)."""
        message = (str(error).splitlines() or [type(error).__name__])[0][:2000]
        with self._transaction():
            self.db.execute("UPDATE requests SET status = 'failed', error = ?, updated = ? WHERE seq = ? AND "
                            "status = 'pending'", (message, _now(), seq))

    def recover(self, request: Request) -> Entry | None:
        """Finish the record of a request whose run was cut off (killed or interrupted) after its output was renamed
        into place (the output's hash equals the staged one); None when there is nothing to recover."""
        entry = self.find(request)
        if entry is None or entry.status == "applied" or entry.staged_sha256 is None:
            return None
        out = Path(entry.output_adapter)
        if has_adapter(out) and adapter_hash(out) == entry.staged_sha256:
            report_path = out / "report.json"
            report = json.loads(report_path.read_text(encoding="utf-8")) if report_path.is_file() else None
            return self.finish(entry.seq, report)
        return None

    def _row(self, seq: int) -> sqlite3.Row:
        return self.db.execute("SELECT * FROM requests WHERE seq = ?", (seq,)).fetchone()

    # ---------------------------------------------------------------------------------------------- verifying
    def verify(self) -> list[str]:
        """Recompute the hash of every adapter on record; return the problems found (empty: all match).

        Checks the root, each applied request's output, and the chain: each request's input is the previous
        applied output (the root for the first)."""
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
        for entry in self.entries("applied"):
            if entry.input_sha256 != previous:
                problems.append(f"request #{entry.seq}: its input {entry.input_sha256[:12]}… is not the previous "
                                f"adapter {previous[:12]}… (the chain is broken)")
            check(f"request #{entry.seq}", entry.output_adapter, entry.output_sha256 or "")
            if entry.files is not None and Path(entry.output_adapter).is_dir():
                now = folder_files(entry.output_adapter)
                for name in sorted(set(entry.files) | set(now)):
                    if entry.files.get(name) != now.get(name):
                        state = "is missing" if name not in now else "was added" if name not in entry.files \
                            else f"has sha256 {now[name][:12]}…, the ledger recorded {entry.files[name][:12]}…"
                        problems.append(f"request #{entry.seq}: {name} in {entry.output_adapter!r} {state}")
            previous = entry.output_sha256 or ""
        return problems


def preamble(book: Ledger | None, adapter: str | Path, original: Sequence[Example], request: Request,
             out: str | Path) -> dict:
    """The ledger's say before any work on `request` (rank 0): {"status", "out", "done": message} when it is
    already applied (a no-op, keyed by the request's hash) or its cut-off run is recovered; else {"applied": the
    requests applied before it, as dicts}, after checking the request against the lineage (`prepare`), or without a
    ledger against `original`, and that `out` is free — before any model is loaded."""
    if book:
        done = book.find(request)
        if done is not None and done.status == "applied":
            return {"status": "done", "out": done.output_adapter,
                    "done": f"request {request.hash[:12]}… is already applied (#{done.seq}, {done.updated}): "
                            f"{done.output_adapter}; nothing to do"}
        recovered = book.recover(request)
        if recovered is not None:
            return {"status": "recovered", "out": recovered.output_adapter,
                    "done": f"request {request.hash[:12]}…: the previous run wrote {recovered.output_adapter} "
                            f"completely but stopped before recording it; recorded now (#{recovered.seq}), "
                            f"nothing recomputed"}
        book.prepare(adapter, original, request)
    else:
        resolve(request, original)
    check_new_output(out)
    return {"applied": [e.request.to_dict() for e in book.entries("applied")] if book else []}


def _entry(row: sqlite3.Row) -> Entry:
    d = dict(row)
    return Entry(seq=d["seq"], request=Request.from_dict(json.loads(d["request_json"])),
                 request_sha256=d["request_sha256"], edited=json.loads(d["edited"]), created=d["created"],
                 updated=d["updated"], attempts=d["attempts"], status=d["status"], input_adapter=d["input_adapter"],
                 input_sha256=d["input_sha256"], output_adapter=d["output_adapter"],
                 staged_sha256=d["staged_sha256"], output_sha256=d["output_sha256"],
                 report=json.loads(d["report"]) if d["report"] else None, error=d["error"],
                 files=json.loads(d["files"]) if d.get("files") else None)


def folder_files(folder: str | Path) -> dict[str, str]:
    """Every regular file under `folder` (relative path → sha256): what `verify` holds an applied output to — the
    adapter, its report, request and recording alike."""
    folder = Path(folder)
    return {str(f.relative_to(folder)): sha256_file(f) for f in sorted(folder.rglob("*")) if f.is_file()}

