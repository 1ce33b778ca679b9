"""Unlearning requests: which training examples to remove or change, and how they map onto a training set.

A request file is a JSON object::

    {"edits": [{"op": "remove", "id": "u1-1"},
               {"op": "modify_query", "id": "u1-2", "prompt": "new prompt"},
               {"op": "correct_response", "id": "u1-3", "response": "new response"}]}

For a chat example, a string `response` replaces the content of its final assistant message and a string `prompt`
that of the last user message in its prompt; a list of messages `[{role, content}, ...]` replaces the whole
response (or prompt), a response starting with an assistant message as in a training file. Error messages name
edits as ``edits[i]`` with a 0-based index ``i``, the position in the ``edits`` list.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from llmeraser.data import Example, Message, Text, _check_unicode, _messages, check_response
from llmeraser.errors import DataError, RequestError
from llmeraser.io import canonical_json, sha256_bytes

OPS = ("remove", "modify_query", "correct_response")
_EDIT_KEYS = ("op", "id", "prompt", "response")
# The text field each op replaces (None: the example is dropped).
_FIELD = {"remove": None, "modify_query": "prompt", "correct_response": "response"}


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


@dataclass(frozen=True)
class Edit:
    """One change to one training example.

    Attributes:
        op: One of `OPS`.
        id: The id of the example to change.
        prompt: The new prompt (``modify_query`` only).
        response: The new response (``correct_response`` only).

    Raises:
        RequestError: If the op is unknown, the id is not a non-empty string, or prompt/response do not fit the op.
    """

    op: str
    id: str
    prompt: Text | None = None
    response: Text | None = None

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise RequestError(f"unknown op {self.op!r}; valid ops are {', '.join(map(repr, OPS))}")
        if not isinstance(self.id, str):
            raise RequestError(f"'id' must be a string, found {_type_name(self.id)}")
        if not self.id:
            raise RequestError("'id' is empty")
        needed = _FIELD[self.op]
        for name in ("prompt", "response"):
            value = getattr(self, name)
            if isinstance(value, list):
                try:
                    value = _messages(value, name, name)
                except DataError as e:
                    raise RequestError(str(e)) from None
                object.__setattr__(self, name, value)
            if name == needed and not (isinstance(value, str) or _is_chat(value)):
                raise RequestError(f"op {self.op!r} needs a string {name!r}, found {_type_name(value)} (or a list "
                                   f"of chat messages)")
            if name != needed and value is not None:
                raise RequestError(f"op {self.op!r} takes no {name!r}")
        for name in ("id", "prompt", "response"):
            value = getattr(self, name)
            try:
                _check_unicode(value if not _is_chat(value) else [m.to_dict() for m in value], name, name)
            except DataError:
                raise RequestError(f"{name!r} is not valid Unicode (a lone surrogate such as \\ud800)") from None

    def to_dict(self) -> dict:
        """Return the JSON object of this edit (only the keys its op uses)."""
        d = {"op": self.op, "id": self.id}
        for name in ("prompt", "response"):
            value = getattr(self, name)
            if value is not None:
                d[name] = [m.to_dict() for m in value] if _is_chat(value) else value
        return d


def _is_chat(value: object) -> bool:
    return isinstance(value, tuple) and bool(value) and all(isinstance(m, Message) for m in value)


@dataclass(frozen=True)
class Request:
    """An ordered, non-empty list of edits.

    Attributes:
        edits: The edits, in request order (a list is accepted and stored as a tuple).

    Raises:
        RequestError: If there are no edits or an item is not an `Edit`.
    """

    edits: tuple[Edit, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "edits", tuple(self.edits))
        if not self.edits:
            raise RequestError("the request has no edits")
        for i, edit in enumerate(self.edits):
            if not isinstance(edit, Edit):
                raise RequestError(f"edits[{i}] (0-based): expected an Edit, found {_type_name(edit)}")

    @classmethod
    def from_dict(cls, obj: object) -> Request:
        """Build a request from its JSON object.

        Args:
            obj: The parsed JSON, ``{"edits": [{"op": ..., "id": ..., ...}, ...]}``.

        Returns:
            The request.

        Raises:
            RequestError: If the structure or a value is wrong; the message names the edit as ``edits[i]`` (0-based).
        """
        if not isinstance(obj, dict):
            raise RequestError(f"a request must be a JSON object, found {_type_name(obj)}")
        if "edits" not in obj:
            raise RequestError("the request has no 'edits' key; a request is {\"edits\": [{\"op\": \"remove\", "
                               "\"id\": \"...\"}, {\"op\": \"correct_response\", \"id\": \"...\", \"response\": "
                               "\"...\"}, ...]} (README.md#formats)")
        unknown = sorted(set(obj) - {"edits"})
        if unknown:
            raise RequestError(f"unknown request key(s) {', '.join(map(repr, unknown))}; expected only 'edits'")
        items = obj["edits"]
        if not isinstance(items, list):
            raise RequestError(f"'edits' must be a list, found {_type_name(items)}")
        edits = []
        for i, item in enumerate(items):
            where = f"edits[{i}] (0-based)"
            if not isinstance(item, dict):
                raise RequestError(f"{where}: expected a JSON object, found {_type_name(item)}")
            unknown = sorted(set(item) - set(_EDIT_KEYS))
            if unknown:
                allowed = ", ".join(map(repr, _EDIT_KEYS))
                raise RequestError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; allowed: {allowed}")
            for key in ("op", "id"):
                if key not in item:
                    raise RequestError(f"{where}: missing key {key!r}")
            for key in ("prompt", "response"):
                if key in item and not isinstance(item[key], str | list):
                    raise RequestError(f"{where}: {key!r} must be a string, found {_type_name(item[key])}")
            try:
                edits.append(Edit(item["op"], item["id"], item.get("prompt"), item.get("response")))
            except (RequestError, DataError) as e:
                raise RequestError(f"{where}: {e}") from None
        return cls(tuple(edits))

    @classmethod
    def remove(cls, *ids: str) -> Request:
        """Return a request that removes the examples `ids`, in that order."""
        return cls(tuple(Edit("remove", i) for i in ids))

    @classmethod
    def modify_query(cls, prompts: Mapping[str, str]) -> Request:
        """Return a request that gives each example id in `prompts` its new prompt."""
        return cls(tuple(Edit("modify_query", i, prompt=p) for i, p in prompts.items()))

    @classmethod
    def correct_response(cls, responses: Mapping[str, str]) -> Request:
        """Return a request that gives each example id in `responses` its new response."""
        return cls(tuple(Edit("correct_response", i, response=r) for i, r in responses.items()))

    def to_dict(self) -> dict:
        """Return the JSON object of this request (`from_dict` reads it back)."""
        return {"edits": [e.to_dict() for e in self.edits]}

    @property
    def hash(self) -> str:
        """The sha256 hex digest of the request's canonical JSON; independent of key order in the source file."""
        return sha256_bytes(canonical_json(self.to_dict()).encode("utf-8"))

    def counts(self) -> dict[str, int]:
        """Return the number of edits of each op, e.g. ``{"remove": 2, "modify_query": 0, "correct_response": 1}``."""
        counts = dict.fromkeys(OPS, 0)
        for e in self.edits:
            counts[e.op] += 1
        return counts

    def summary(self) -> str:
        """The counts as one line, e.g. ``"remove=2 correct_response=1"``."""
        return " ".join(f"{k}={v}" for k, v in self.counts().items() if v)


def load_request(path: str | os.PathLike) -> Request:
    """Read a request from a JSON file.

    Args:
        path: The request file (UTF-8 JSON).

    Returns:
        The request.

    Raises:
        RequestError: If the file is missing, not UTF-8, not valid JSON (the message gives line and column),
            or not a valid request (see `Request.from_dict`). The message names the file.
    """
    name = repr(str(path))
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise RequestError(f"{name}: request file does not exist") from None
    except IsADirectoryError:
        raise RequestError(f"{name}: is a folder, expected a JSON request file") from None
    except UnicodeDecodeError as e:
        raise RequestError(f"{name}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise RequestError(f"{name}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except RecursionError:
        raise RequestError(f"{name}: JSON nested too deeply") from None
    try:
        return Request.from_dict(obj)
    except RequestError as e:
        raise RequestError(f"{name}: {e}") from None


def resolve(request: Request, examples: Sequence[Example]) -> list[tuple[Example, Example | None]]:
    """Match each edit with the example it changes.

    Args:
        request: The request.
        examples: The training set (ids unique).

    Returns:
        For each edit in request order, ``(old, new)``: the example as it is, and as it becomes (same id and
        extra keys), or None when it is removed.

    Raises:
        RequestError: If an id is not in the training set, an id is edited more than once, an edit changes
            nothing (same prompt or same response), or a chat's new response has roles a training file may not
            give it (`data.check_response`).
    """
    by_id = {ex.id: ex for ex in examples}
    first_edit: dict[str, int] = {}
    pairs: list[tuple[Example, Example | None]] = []
    for i, edit in enumerate(request.edits):
        where = f"edits[{i}] (0-based)"
        old = by_id.get(edit.id)
        if old is None:
            sample = f", e.g. {examples[0].id!r}" if examples else ""
            raise RequestError(
                f"{where}: unknown example id {edit.id!r} in request (train set has {len(by_id):,} ids{sample})"
            )
        if edit.id in first_edit:
            raise RequestError(
                f"example id {edit.id!r} is edited twice in one request: edits[{first_edit[edit.id]}] and "
                f"edits[{i}] (0-based); give at most one edit per example"
            )
        first_edit[edit.id] = i
        field = _FIELD[edit.op]
        if field is None:
            pairs.append((old, None))
            continue
        value = _new_text(old, field, getattr(edit, field), where)
        if value == getattr(old, field):
            raise RequestError(f"{where}: {edit.op} for id {edit.id!r} changes nothing (the {field} is the same)")
        pairs.append((old, dataclasses.replace(old, **{field: value}, extra=dict(old.extra))))
    return pairs


def _new_text(old: Example, field: str, value: Text, where: str) -> Text:
    """The example's new prompt or response. For a chat, a string replaces the content of the final assistant
    message (response) or of the last user message (prompt); messages replace the whole part, a response's with the
    roles the data loader requires of it (`data.check_response`)."""
    if old.shape == "text" and field == "prompt":
        raise RequestError(f"{where}: example {old.id!r} is a document (a text record): it has no prompt to modify; "
                           f"correct its text with correct_response, or remove it")
    if not old.is_chat:
        if not isinstance(value, str):
            raise RequestError(f"{where}: example {old.id!r} is text; give its new {field} as a string")
        return value
    if not isinstance(value, str):
        if field == "response":
            try:
                check_response(value, where, "response", old.shape)
            except DataError as e:
                raise RequestError(str(e)) from None
        return value
    part = list(getattr(old, field))
    at = 0 if field == "response" else max((j for j, m in enumerate(part) if m.role == "user"), default=None)
    if at is None:
        raise RequestError(f"{where}: example {old.id!r} has no user message to modify; give the new prompt as a "
                           f"list of messages")
    part[at] = dataclasses.replace(part[at], content=value)
    return tuple(part)


def apply_request(examples: Sequence[Example], request: Request) -> list[Example]:
    """Return the training set as it is after the request.

    Removed examples are dropped, changed ones replaced in place (same id, extra keys kept); the order is
    preserved. The result may be empty if every example is removed.

    Args:
        examples: The training set.
        request: The request; validated through `resolve`.

    Returns:
        A new list; `examples` is not modified.

    Raises:
        RequestError: As `resolve`.
    """
    changes = {old.id: new for old, new in resolve(request, examples)}
    result = []
    for ex in examples:
        if ex.id not in changes:
            result.append(ex)
        elif changes[ex.id] is not None:
            result.append(changes[ex.id])
    return result


def merge_requests(requests: Sequence[Request], examples: Sequence[Example]) -> Request:
    """One request with the effect of `requests` applied in order to `examples`: each is validated against the set
    its predecessors left (an id removed by an earlier one is unknown to a later one), and the merged request takes
    every touched example from its original to its final state — so one replay serves k requests, and its target
    is retraining on the set after all of them. An example whose final prompt and response both differ from the
    original cannot be one edit: refused, naming it. Edits that cancel out (a response corrected and corrected back)
    are dropped; if nothing is left the merge is refused.

    Raises:
        RequestError: as `resolve`, for the first request that does not fit; or the cases above.
    """
    if not requests:
        raise RequestError("no requests to merge")
    after = list(examples)
    for k, request in enumerate(requests):
        try:
            after = apply_request(after, request)
        except RequestError as e:
            raise RequestError(f"request {k + 1} of {len(requests)} (after the ones before it): {e}") from None
    final, by_id = {e.id: e for e in after}, {e.id: e for e in examples}
    edits = []
    for i in dict.fromkeys(edit.id for request in requests for edit in request.edits):
        old, new = by_id[i], final.get(i)
        if new is None:
            edits.append(Edit("remove", i))
            continue
        prompt, response = new.prompt != old.prompt, new.response != old.response
        if prompt and response:
            raise RequestError(f"example {i!r}: the requests change both its prompt and its response, which one "
                               f"request cannot; apply them one at a time")
        if prompt:
            edits.append(Edit("modify_query", i, prompt=new.prompt))
        elif response:
            edits.append(Edit("correct_response", i, response=new.response))
    if not edits:
        raise RequestError("the requests cancel out: the training set after them is the one before")
    return Request(edits)
