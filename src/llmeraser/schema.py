"""The validated schema of what llmeraser reads back from disk: every value is checked for its type and range
before anything is built from it, and a violation names the file and the field.

What is read: a recording's header (`trajectory.safetensors`, `recording.read`), an adapter's training
record (`report.json`'s `task` block or `training_record.json`, `record.TrainingRecord.read`). These files may have
been edited, truncated or forged, so a value that is out of range (β₁ = 1, batch size 0, epochs 3.5, a string lr,
JSON nested 200,000 deep) is refused here, with exit code 2 in the command line, rather than failing later inside
the arithmetic with a raw exception — or worse, being used.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path

from llmeraser.errors import UserInputError

MAX_DEPTH = 64  # nesting of the JSON llmeraser reads back; its own files nest 4 deep
MAX_BYTES = 256 * 2**20  # a record or header larger than this is not one llmeraser wrote
_HEX64 = re.compile(r"[0-9a-f]{64}")


def parse_json(text: str | bytes, where: str, error: type[UserInputError] = UserInputError) -> object:
    """`text` parsed as JSON, refused (as `error`, naming `where`) when invalid, over MAX_BYTES or nested deeper
    than MAX_DEPTH (json's recursion would otherwise raise RecursionError, or take the stack)."""
    if len(text) > MAX_BYTES:
        raise error(f"{where} is {len(text):,} bytes, more than the {MAX_BYTES:,} llmeraser reads")
    depth = _max_depth(text)
    if depth > MAX_DEPTH:
        raise error(f"{where} nests {depth} levels deep (at most {MAX_DEPTH})")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        raise error(f"{where} is not valid JSON: {e}") from None


def _max_depth(text: str | bytes) -> int:
    """The deepest nesting of brackets outside strings (an upper bound of the JSON's depth, found without
    recursion)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def read_json(path: str | Path, error: type[UserInputError] = UserInputError) -> object:
    """The JSON file at `path`, parsed as `parse_json` does (a file that cannot be read is refused too)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise error(f"{path} is {size:,} bytes, more than the {MAX_BYTES:,} llmeraser reads")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"{path} is unreadable: {e}") from None
    return parse_json(text, str(path), error)


class Fields:
    """Typed access to one JSON object read from `where` (a file, and the path of the object inside it): each getter
    returns the value or raises `error` naming `where` and the field."""

    def __init__(self, data: object, where: str, error: type[UserInputError] = UserInputError):
        if not isinstance(data, dict):
            raise error(f"{where} must be a JSON object, got {type(data).__name__}")
        self.data, self.where, self.error = data, where, error

    def fail(self, name: str, message: str) -> UserInputError:
        return self.error(f"{self.where}: '{name}' {message}")

    def has(self, name: str) -> bool:
        return self.data.get(name) is not None

    def _get(self, name: str, optional: bool):
        if name not in self.data or self.data[name] is None:
            if optional:
                return None
            raise self.fail(name, "is missing")
        return self.data[name]

    def number(self, name: str, *, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
               hi_open: bool = False, integer: bool = False, optional: bool = False) -> float | int | None:
        """A finite number (not a boolean) in [lo, hi] (open ends where asked); `integer`: an integral value,
        returned as int."""
        v = self._get(name, optional)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise self.fail(name, f"must be a number, got {json.dumps(v)[:40]}")
        if not math.isfinite(v):
            raise self.fail(name, f"must be finite, got {v}")
        if integer and v != int(v):
            raise self.fail(name, f"must be a whole number, got {v}")
        if lo is not None and (v < lo or (lo_open and v == lo)):
            raise self.fail(name, f"must be {'>' if lo_open else '≥'} {lo:g}, got {v:g}")
        if hi is not None and (v > hi or (hi_open and v == hi)):
            raise self.fail(name, f"must be {'<' if hi_open else '≤'} {hi:g}, got {v:g}")
        return int(v) if integer else float(v)

    def string(self, name: str, *, optional: bool = False, choices: tuple[str, ...] | None = None,
               sha256: bool = False, max_len: int = 1 << 20) -> str | None:
        v = self._get(name, optional)
        if v is None:
            return None
        if not isinstance(v, str):
            raise self.fail(name, f"must be a string, got {json.dumps(v)[:40]}")
        if len(v) > max_len:
            raise self.fail(name, f"is {len(v):,} characters long (at most {max_len:,})")
        if choices is not None and v not in choices:
            raise self.fail(name, f"must be one of {', '.join(choices)}, got {v[:40]!r}")
        if sha256 and not _HEX64.fullmatch(v):
            raise self.fail(name, "must be a sha256 (64 lowercase hex digits)")
        return v

    def boolean(self, name: str, *, optional: bool = False) -> bool | None:
        v = self._get(name, optional)
        if v is not None and not isinstance(v, bool):
            raise self.fail(name, f"must be true or false, got {json.dumps(v)[:40]}")
        return v

    def mapping(self, name: str, *, optional: bool = False) -> Fields | None:
        v = self._get(name, optional)
        if v is None:
            return None
        if not isinstance(v, dict):
            raise self.fail(name, f"must be a JSON object, got {type(v).__name__}")
        return Fields(v, f"{self.where}: '{name}'", self.error)

    def sequence(self, name: str, item: Callable[[object], bool], what: str, *, length: int | None = None,
                 optional: bool = False) -> list | None:
        """A list whose every element passes `item` (`what` names what they must be), of `length` when given."""
        v = self._get(name, optional)
        if v is None:
            return None
        if not isinstance(v, list):
            raise self.fail(name, f"must be a list, got {type(v).__name__}")
        if length is not None and len(v) != length:
            raise self.fail(name, f"has {len(v)} entries, expected {length}")
        for i, x in enumerate(v):
            if not item(x):
                raise self.fail(name, f"[{i}] must be {what}, got {json.dumps(x)[:40]}")
        return v


def is_number(x: object) -> bool:
    """A finite number that is not a boolean."""
    return not isinstance(x, bool) and isinstance(x, int | float) and math.isfinite(x)
