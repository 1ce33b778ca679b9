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

from llmeraser.ledger.book import (
    FILE,
    Entry,
    Ledger,
    LedgerError,
    LedgerMismatch,
    as_requests,
    example_hash,
    folder_files,
)
from llmeraser.ledger.preamble import preamble

__all__ = ["FILE", "Entry", "Ledger", "LedgerError", "LedgerMismatch", "as_requests", "example_hash", "folder_files",
           "preamble"]
