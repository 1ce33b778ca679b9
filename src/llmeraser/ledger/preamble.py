"""The ledger's say before any work on a request (`preamble`), shared by single adapters (`AdapterJob`) and sharded
ones (`sharded.unlearn_sharded`): a no-op, a recovery, or the lineage's checks."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from llmeraser.data import Example
from llmeraser.io import check_new_output
from llmeraser.ledger.book import Ledger, LedgerError, as_requests, numbers
from llmeraser.request import Request, merge_requests, resolve


def preamble(book: Ledger | None, adapter: str | Path, original: Sequence[Example],
             requests: Request | Sequence[Request], out: str | Path) -> dict:
    """The ledger's say before any work on `requests` (rank 0; one request, or several applied in order as one
    update): {"status", "out", "done": message} when they are already applied (a no-op, keyed by the requests'
    hashes) or their cut-off run is recovered; else {"applied": the requests applied before them, as dicts}, after
    checking them against the lineage (`prepare`), or without a ledger against `original`, and that `out` is free —
    before any model is loaded. Some of a batch applied and others not is refused, naming the applied one."""
    requests = as_requests(requests)
    if book:
        found = [book.find(r) for r in requests]
        applied = [(k, e) for k, e in enumerate(found) if e is not None and e.status == "applied"]
        if len(applied) == len(requests):
            last = applied[-1][1]
            what = (f"request {requests[0].hash[:12]}… is" if len(requests) == 1
                    else f"these {len(requests)} requests are")
            return {"status": "done", "out": last.output_adapter,
                    "done": f"{what} already applied ({', '.join(f'#{e.seq}' for _, e in applied)}, {last.updated}): "
                            f"{last.output_adapter}; nothing to do"}
        if applied:
            k, e = applied[0]
            raise LedgerError(f"request {k + 1} of {len(requests)} ({e.request_sha256[:12]}…) is already applied "
                              f"(#{e.seq}); leave it out of the batch")
        recovered = book.recover(requests)
        if recovered is not None:
            return {"status": "recovered", "out": recovered[0].output_adapter,
                    "done": f"{numbers(recovered)}: the previous run wrote {recovered[0].output_adapter} "
                            f"completely but stopped before recording it; recorded now, nothing recomputed"}
        book.prepare(adapter, original, requests)
    elif len(requests) > 1:
        merge_requests(requests, original)
    else:
        resolve(requests[0], original)
    check_new_output(out)
    return {"applied": [e.request.to_dict() for e in book.entries("applied")] if book else []}
