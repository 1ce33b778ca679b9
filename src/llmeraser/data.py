"""Training examples: the JSONL format, loading with precise error messages, saving, and hashing.

One JSON object per line with string fields ``id``, ``prompt`` and ``response``; other keys are kept in
`Example.extra` and written back on save, but play no part in equality or hashing. Blank lines are skipped.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from llmeraser.errors import DataError
from llmeraser.io import atomic_write_text, canonical_json, sha256_bytes

FIELDS = ("id", "prompt", "response")


@dataclass(frozen=True)
class Example:
    """One training example.

    Attributes:
        id: Unique, non-empty identifier within a training set.
        prompt: The query text.
        response: The target text.
        extra: Any other JSON keys of the line; kept and written back, ignored otherwise.
    """

    id: str
    prompt: str
    response: str
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def to_dict(self) -> dict:
        """Return the JSON object of this example: id, prompt, response, then the extra keys."""
        extra = {k: v for k, v in self.extra.items() if k not in FIELDS}
        return {"id": self.id, "prompt": self.prompt, "response": self.response, **extra}


def _is_unicode(text: str | None) -> bool:
    """False for a string Python holds but UTF-8 cannot encode (JSON escapes like \\ud800 produce them)."""
    try:
        text is None or text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


def parse_examples(lines: Iterable[str], source: str = "<memory>") -> list[Example]:
    """Parse JSONL lines into examples.

    Args:
        lines: The lines of the file (trailing newlines allowed).
        source: The name used in error messages (usually the file path).

    Returns:
        The examples in file order.

    Raises:
        DataError: On invalid JSON, a non-object line, a missing, non-string or empty field, a duplicate id,
            or no examples at all. The message names `source` and the 1-based line number.
    """
    examples: list[Example] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{source}, line {lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: invalid JSON ({e})") from None
        except RecursionError:
            raise DataError(f"{where}: JSON nested too deeply") from None
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object, found {_type_name(obj)}")
        for name in FIELDS:
            if name not in obj:
                raise DataError(f"{where}: missing field {name!r}")
            if not isinstance(obj[name], str):
                raise DataError(f"{where}: field {name!r} must be a string, found {_type_name(obj[name])}")
        for name, value in obj.items():
            if not _is_unicode(name) or (isinstance(value, str) and not _is_unicode(value)):
                raise DataError(f"{where}: field {name!r} is not valid Unicode (a lone surrogate such as \\ud800)")
        ex_id = obj["id"]
        if not ex_id:
            raise DataError(f"{where}: field 'id' is empty")
        if ex_id in seen:
            raise DataError(f"{where}: duplicate id {ex_id!r} (first seen on line {seen[ex_id]})")
        seen[ex_id] = lineno
        extra = {k: v for k, v in obj.items() if k not in FIELDS}
        examples.append(Example(ex_id, obj["prompt"], obj["response"], extra))
    if not examples:
        raise DataError(f"{source}: no examples (the file is empty or holds only blank lines)")
    return examples


def load_examples(path: str | os.PathLike) -> list[Example]:
    """Load a JSONL training file.

    Args:
        path: The file to read (UTF-8, with or without a byte-order mark).

    Returns:
        The examples in file order.

    Raises:
        DataError: If the file does not exist, is not UTF-8, or is malformed (see `parse_examples`).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: accept (and drop) a byte-order mark
    except FileNotFoundError:
        raise DataError(f"{str(path)!r}: training file does not exist") from None
    except IsADirectoryError:
        raise DataError(f"{str(path)!r}: is a folder, expected a JSONL training file") from None
    except UnicodeDecodeError as e:
        line = path.read_bytes().count(b"\n", 0, e.start) + 1
        raise DataError(f"{str(path)!r}, line {line}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    # split on "\n" only: str.splitlines would also split on U+2028 etc., which JSON strings may hold raw
    return parse_examples(text.split("\n"), source=repr(str(path)))


def save_examples(examples: Iterable[Example], path: str | os.PathLike) -> None:
    """Write examples as JSONL (UTF-8, non-ASCII kept as is, extra keys included), atomically.

    Args:
        examples: The examples to write, in order.
        path: The target file; replaced in one step.
    """
    text = "".join(json.dumps(ex.to_dict(), ensure_ascii=False) + "\n" for ex in examples)
    atomic_write_text(path, text)


def examples_hash(examples: Iterable[Example]) -> str:
    """Return the sha256 identifying a training set: its (id, prompt, response) triples, in order.

    Args:
        examples: The training set.

    Returns:
        A 64-character hex digest; `extra` keys do not affect it.
    """
    triples = [[ex.id, ex.prompt, ex.response] for ex in examples]
    return sha256_bytes(canonical_json(triples).encode("utf-8"))
