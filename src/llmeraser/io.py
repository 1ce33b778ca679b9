"""Atomic writes: every output is written to a temporary path beside its target and renamed into place,
so a crash leaves either the old state or the complete new one, never half a file or half a directory.

Temporaries are named `.{target}.{host}-{pid}.{random}.tmp` after the process that owns them; the next write to the
same target removes those whose process (on this host) is gone, so a killed run leaves nothing behind for long. Files
and folders are created as `open` and `mkdir` create them, under the user's umask. `check_output_paths` refuses,
before any work, output paths that could not be written or that would land in an input.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

from llmeraser.errors import UserInputError

_HOST = hashlib.sha256(socket.gethostname().encode("utf-8", "surrogateescape")).hexdigest()[:8]
TEMP_ROOM = 32  # bytes a temporary's name adds to its target's: '.', '.', host, '-', pid (≤ 7 digits), random, '.tmp'
LEDGER_FILE = "ledger.sqlite"  # a ledger folder's database (`llmeraser.ledger`); its presence makes a re-run


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _alive(pid: int) -> bool:
    """Whether process `pid` of this host may still run (True when unsure: only a dead owner's files are removed)."""
    if pid <= 0 or pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process: it exists
        return True
    return True


def remove_stale_temporaries(target: str | os.PathLike) -> list[Path]:
    """Remove the temporaries `.{name}.*.tmp` beside `target` whose owner process on this host is gone; return them.

    A temporary of a live process, of another host, or not named by this module is kept."""
    target = Path(target)
    pattern = re.compile(rf"\.{re.escape(target.name)}\.([0-9a-f]{{8}})-([0-9]+)\.[0-9a-f]{{8}}\.tmp")
    removed = []
    with contextlib.suppress(OSError), os.scandir(target.parent) as entries:
        for entry in entries:
            found = pattern.fullmatch(entry.name)
            if found is None or found[1] != _HOST or _alive(int(found[2])):
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
            removed.append(Path(entry.path))
    return removed


def _new_temporary(target: Path, *, folder: bool) -> tuple[Path, int | None]:
    """(a new temporary beside `target` owned by this process, its open fd for a file): created under the umask, as
    `mkdir` (0777 & ~umask) and `open` (0666 & ~umask) create them; stale ones of dead processes are removed first."""
    remove_stale_temporaries(target)
    while True:
        tmp = target.with_name(f".{target.name}.{_HOST}-{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            if folder:
                os.mkdir(tmp, 0o777)
                return tmp, None
            return tmp, os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and an atomic rename."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_chunks(path, [data])


def atomic_write_chunks(path: str | os.PathLike, chunks: Iterable[bytes]) -> None:
    """Write the `chunks` in order to `path` (whose folder exists) through a temporary file beside it, synced, and an
    atomic rename: a large file streamed without holding it whole; the temporary is removed on any failure."""
    path = Path(path)
    tmp, fd = _new_temporary(path, folder=False)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: object) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def check_new_output(out: str | os.PathLike) -> None:
    """Refuse an output folder that exists and is not empty (outputs never overwrite anything)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserInputError(f"output {str(out)!r} already exists and is not an empty folder; choose another --out")


def _name_max(folder: str) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        return 255


def _check_place(path: Path, what: str, *, room: int, into: bool) -> None:
    """`path` can be made (or, `into`, an existing folder `path` written into): each name to create fits the file
    system with `room` bytes to spare for the last, and the nearest existing folder above is writable."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserInputError(f"{what} {str(path)!r} is a file, not a folder")
    place = path if into and os.path.isdir(path) else path.parent
    missing = [path] if place != path else []
    while not os.path.exists(place):  # False also below a file, or where a folder cannot be searched
        missing.append(place)
        place = place.parent
    if not os.path.isdir(place):
        raise UserInputError(f"{what} {str(path)!r} cannot be created: {str(place)!r} is a file, not a folder")
    limit = _name_max(str(place))
    for p in missing:
        size, spare = len(os.fsencode(p.name)), room if p == path else 0
        if size + spare > limit:
            extra = f", less {spare} for the temporary name it is written under" if spare else ""
            raise UserInputError(f"{what} {str(path)!r}: the name {p.name[:40]!r}… is {size} bytes; this file system "
                                 f"takes names of at most {limit} bytes{extra}")
    if not os.access(place, os.W_OK | os.X_OK):
        raise UserInputError(f"{what} {str(path)!r} cannot be written: no write permission in the folder "
                             f"{str(place)!r}")


def _overlap(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def check_output_paths(out: str | os.PathLike, *, ledger: str | os.PathLike | None = None,
                       inputs: Mapping[str, str | os.PathLike | None] | None = None, new: bool = True,
                       what: str = "output") -> None:
    """Refuse, before any work and without writing anything, an output that could not be written or would overwrite.

    Checks the output folder `out` and the `ledger` folder: each name to create within the file system's limit
    (`out`'s with room for its temporary name), the nearest existing folder above writable (a file there is refused),
    neither inside (or holding, or equal to) the other, nor inside or equal to any of `inputs` (label → path; None
    skipped). With `new`, `out` must not exist or be an empty folder, unless `ledger` holds a ledger already (a
    re-run: the ledger decides); without, `out` is a folder written into (a store) and may exist. Read-only, so every
    rank under torchrun may run it. Raises UserInputError naming the path and the problem.
    """
    out = Path(out).resolve()  # resolve: '..' and symlinks must not hide an input
    book = Path(ledger).resolve() if ledger else None
    for label, given in (inputs or {}).items():
        if given is None:
            continue
        p = Path(given).resolve()
        for name, path in ((what, out), ("ledger", book)):
            if path is not None and (path == p or p in path.parents):
                raise UserInputError(f"{name} {str(path)!r} lies inside the input {label} {str(p)!r}; inputs are "
                                     f"never written: choose another path")
    if book is not None and _overlap(out, book):
        raise UserInputError(f"the ledger {str(book)!r} and the {what} {str(out)!r} overlap (one is, or lies inside, "
                             f"the other): keep the ledger apart from the outputs it records")
    _check_place(out, what, room=TEMP_ROOM, into=not new)
    if book is not None:
        _check_place(book, "ledger", room=0, into=True)
    if new and not (book is not None and os.path.isfile(book / LEDGER_FILE)):
        check_new_output(out)


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, *, protect: tuple[str | os.PathLike, ...] = (),
               before_rename: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Yield a fresh temporary folder; on success rename it to `out`, on any error delete it.

    Refuses an `out` that exists and is not empty, and an `out` that is (or lies inside) one of `protect`
    (e.g. the input adapter): inputs are never overwritten. `before_rename(tmp)` runs on the finished, synced
    folder just before the rename (the ledger records the output's hash there).
    """
    out = Path(out).resolve()  # resolve, not absolute: '..' and symlinks must not sneak into a protected input
    for p in protect:
        p = Path(p).resolve()
        if out == p or p in out.parents:
            raise UserInputError(
                f"output folder {str(out)!r} would overwrite the input {str(p)!r}; choose another --out")
    check_new_output(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp, _ = _new_temporary(out, folder=True)
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if before_rename is not None:
            before_rename(tmp)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.rename(tmp, out)
        _fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def canonical_json(obj: object) -> str:
    """The JSON text used for hashing: sorted keys, no spaces, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
