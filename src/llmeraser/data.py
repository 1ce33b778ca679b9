"""Training examples as people have them: loading with precise error messages, saving, hashing (docs/data.md).

Files: JSONL (one record per line), JSON (a list of records; JSON lines under a .json name are read as JSONL too),
parquet, and a folder written by `datasets`' `save_to_disk` (a DatasetDict needs `split`). Records come in four
shapes, told apart by their fields (names configurable with `DataFields`):

- `{id, prompt, response}`: llmeraser's own (text);
- `{id, prompt, completion}`: TRL's prompt-completion, text or conversational (lists of `{role, content}`);
- `{id, messages}`: a chat, `[{role, content}, ...]`: the prompt is every message before the final assistant
  message, the response that message (and any after it). It is rendered with the tokenizer's chat template;
- `{id, text}`: a document (TRL's language-modelling records): an empty prompt, the loss on every token.

Other keys are kept in `Example.extra` and written back on save, but play no part in equality or hashing. Without an
id field in any record, each example gets a stable id from its content (`content_id`). Errors name the file, the
line (JSONL) or 0-based record index, and the field.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from llmeraser.errors import DataError
from llmeraser.io import atomic_write_text, canonical_json, sha256_bytes

SHAPES = ("prompt-response", "prompt-completion", "messages", "text")  # how a record was written (and is written back)
CONTENT_ID_PREFIX = "sha-"


@dataclass(frozen=True)
class Message:
    """One chat message. `more`: its other keys (e.g. tool calls) as canonical JSON, so a message stays hashable."""

    role: str
    content: str
    more: str = ""

    def to_dict(self) -> dict:
        return {"role": self.role, "content": self.content, **(json.loads(self.more) if self.more else {})}


Text = str | tuple[Message, ...]  # a prompt or response: text, or chat messages


@dataclass(frozen=True)
class Example:
    """One training example.

    Attributes:
        id: Unique, non-empty identifier within a training set.
        prompt: The query: text, or the chat messages before the final assistant message.
        response: The target: text, or the final assistant message (and any message after it).
        extra: Any other keys of the record; kept and written back, ignored otherwise.
        shape: How the record was written (`SHAPES`); TRL's loss masking depends on it (docs/data.md).
    """

    id: str
    prompt: Text
    response: Text
    extra: dict = field(default_factory=dict, compare=False, hash=False)
    shape: str = "prompt-response"

    @property
    def is_chat(self) -> bool:
        return not isinstance(self.response, str)

    def messages(self) -> list[dict]:
        """The whole conversation as `[{role, content}, ...]` (chat examples only)."""
        if not self.is_chat:
            raise DataError(f"example {self.id!r} is text, not a chat")
        return [m.to_dict() for m in (*self.prompt, *self.response)]

    def to_dict(self, fields: DataFields | None = None) -> dict:
        """The record of this example in its shape, with the extra keys."""
        f = fields or DataFields()
        head = {f.id_field or "id": self.id}
        if self.shape == "messages":
            body = {f.messages_field: self.messages()}
        elif self.shape == "text":
            body = {f.text_field: self.response}
        else:
            out = f.response_field or ("completion" if self.shape == "prompt-completion" else "response")
            body = {f.prompt_field: _plain(self.prompt), out: _plain(self.response)}
        return {**head, **body, **{k: v for k, v in self.extra.items() if k not in head and k not in body}}


def _plain(text: Text) -> str | list[dict]:
    return text if isinstance(text, str) else [m.to_dict() for m in text]


@dataclass(frozen=True)
class DataFields:
    """Which record fields hold what (the CLI's --id-field etc.)."""

    id_field: str | None = field(default="id", metadata={
        "help": "the field holding each record's unique id; when no record has it, ids come from the content "
                "(sha- + 16 hex digits of sha256 of prompt and response; docs/data.md)"})
    prompt_field: str = field(default="prompt", metadata={"help": "the field holding the prompt"})
    response_field: str | None = field(default=None, metadata={
        "help": "the field holding the response; default: 'response' or TRL's 'completion', whichever is there"})
    messages_field: str = field(default="messages", metadata={"help": "the field holding a chat's messages"})
    text_field: str = field(default="text", metadata={
        "help": "the field holding a document (records with neither prompt nor messages; the loss on every token)"})
    split: str | None = field(default=None, metadata={
        "help": "the split of a datasets DatasetDict folder (default: 'train' when there is one)"})

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}

    @classmethod
    def from_dict(cls, d: Mapping | None) -> DataFields:
        """From a training record's `data_fields` (keys this version does not know are ignored)."""
        return cls(**{k: v for k, v in (d or {}).items() if k in cls.__dataclass_fields__})


def _is_unicode(text: str | None) -> bool:
    """False for a string Python holds but UTF-8 cannot encode (JSON escapes like \\ud800 produce them)."""
    try:
        text is None or text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _check_unicode(obj: object, where: str, name: str) -> None:
    if isinstance(obj, str):
        if not _is_unicode(obj):
            raise DataError(f"{where}: field {name!r} is not valid Unicode (a lone surrogate such as \\ud800)")
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            _check_unicode(k, where, name)
            _check_unicode(v, where, name)
    elif isinstance(obj, list | tuple):
        for v in obj:
            _check_unicode(v, where, name)


def _messages(value: object, where: str, name: str) -> tuple[Message, ...]:
    if not isinstance(value, list | tuple) or not value:
        raise DataError(f"{where}: field {name!r} must be a non-empty list of messages {{role, content}}, found "
                        f"{_type_name(value) if value is None or not isinstance(value, list | tuple) else '[]'}")
    out = []
    for j, m in enumerate(value):
        at = f"{where}: {name}[{j}]"
        if not isinstance(m, Mapping):
            raise DataError(f"{at} must be an object {{role, content}}, found {_type_name(m)}")
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                raise DataError(f"{at}.{key} must be a string, found {_type_name(m.get(key))}")
        more = {k: v for k, v in m.items() if k not in ("role", "content") and v is not None}
        out.append(Message(m["role"], m["content"], canonical_json(more) if more else ""))
    return tuple(out)


def check_response(response: tuple[Message, ...], where: str, name: str, shape: str) -> None:
    """The one rule for the messages of a chat's response: it starts with an assistant message (what the model learns
    to write); in a `messages` record, where the response is the final assistant message and any after it, it holds no
    other assistant message (the record would split elsewhere when read back).

    Raises:
        DataError: naming `where` and the field `name`.
    """
    if response[0].role != "assistant":
        raise DataError(f"{where}: {name}[0] has role {response[0].role!r}; the response of a chat must start with an "
                        f"assistant message (the turns before it belong to the prompt)")
    if shape == "messages" and any(m.role == "assistant" for m in response[1:]):
        raise DataError(f"{where}: {name} holds more than one assistant message; a chat's response is its final "
                        f"assistant message (and any message after it): the earlier turns belong to the prompt")


def _text(value: object, where: str, name: str) -> Text:
    if isinstance(value, str):
        return value
    if isinstance(value, list | tuple) and value and all(isinstance(m, Mapping) for m in value):
        return _messages(value, where, name)
    raise DataError(f"{where}: field {name!r} must be a string, found {_type_name(value)} (or a list of chat "
                    f"messages {{role, content}})")


def _record(obj: object, where: str, f: DataFields) -> tuple[str | None, Example]:
    """(the record's id or None when it has none, the example with a placeholder id)."""
    if not isinstance(obj, Mapping):
        raise DataError(f"{where}: expected a JSON object, found {_type_name(obj)}")
    for name, value in obj.items():
        _check_unicode(name, where, str(name))
        _check_unicode(value, where, str(name))
    ex_id = None
    if f.id_field is not None and f.id_field in obj:
        ex_id = obj[f.id_field]
        if isinstance(ex_id, int) and not isinstance(ex_id, bool):
            ex_id = str(ex_id)  # parquet and datasets often hold integer ids; requests name them as strings
        if not isinstance(ex_id, str):
            raise DataError(f"{where}: field {f.id_field!r} must be a string, found {_type_name(ex_id)}")
        if not ex_id:
            raise DataError(f"{where}: field {f.id_field!r} is empty")
    used = {f.id_field}
    if f.messages_field in obj and f.prompt_field not in obj:
        chat = _messages(obj[f.messages_field], where, f.messages_field)
        last = max((j for j, m in enumerate(chat) if m.role == "assistant"), default=None)
        if last is None:
            raise DataError(f"{where}: field {f.messages_field!r} has no assistant message (nothing to learn)")
        used.add(f.messages_field)
        example = Example("", chat[:last], chat[last:], shape="messages")
    elif f.text_field in obj and f.prompt_field not in obj:
        text = obj[f.text_field]
        if not isinstance(text, str) or not text:
            raise DataError(f"{where}: field {f.text_field!r} must be a non-empty string, found "
                            f"{_type_name(text) if not isinstance(text, str) else 'an empty string'}")
        used.add(f.text_field)
        example = Example("", "", text, shape="text")
    else:
        names = [f.response_field] if f.response_field else ["response", "completion"]
        out = next((n for n in names if n in obj), None)
        if f.prompt_field not in obj:
            raise DataError(f"{where}: missing field {f.prompt_field!r} (or {f.messages_field!r} for a chat, "
                            f"{f.text_field!r} for a document)")
        if out is None:
            raise DataError(f"{where}: missing field {' (or '.join(map(repr, names))}{')' if len(names) > 1 else ''}")
        prompt, response = _text(obj[f.prompt_field], where, f.prompt_field), _text(obj[out], where, out)
        if isinstance(prompt, str) != isinstance(response, str):
            raise DataError(f"{where}: {f.prompt_field!r} and {out!r} must both be text or both be chat messages")
        if not isinstance(response, str):
            check_response(response, where, out, "prompt-completion")
        used |= {f.prompt_field, out}
        example = Example("", prompt, response,
                          shape="prompt-completion" if out == "completion" else "prompt-response")
    extra = {k: v for k, v in obj.items() if k not in used}
    return ex_id, Example(ex_id or "", example.prompt, example.response, extra, example.shape)


def content_id(example: Example) -> str:
    """The id of a record without one: sha- and 16 hex digits of the sha256 of its prompt and response (as JSON).
    Stable under reordering and re-saving; two records with equal content get -2, -3, ... in file order."""
    body = [_plain(example.prompt), _plain(example.response)]
    return CONTENT_ID_PREFIX + sha256_bytes(canonical_json(body).encode("utf-8"))[:16]


def parse_records(records: Iterable[tuple[str, object]], source: str = "<memory>",
                  fields: DataFields | None = None) -> list[Example]:
    """Parse `(where, record)` pairs (where: 'line 3' or 'record 2') into examples.

    Raises:
        DataError: a malformed record, a missing or non-string field, a duplicate id, some records with an id and
            others without, or no records at all. The message names `source`, the record and the field.
    """
    f = fields or DataFields()
    parsed = [(where, *_record(obj, f"{source}, {where}", f)) for where, obj in records]
    if not parsed:
        raise DataError(f"{source}: no examples (the file is empty or holds only blank lines)")
    with_id = [p for p in parsed if p[1] is not None]
    if with_id and len(with_id) < len(parsed):
        where = next(w for w, i, _ in parsed if i is None)
        raise DataError(f"{source}, {where}: missing field {f.id_field!r} (other records have one; give every "
                        f"record an id, or none and let ids come from the content)")
    examples, seen = [], {}
    for where, ex_id, ex in parsed:
        if ex_id is None:  # content ids, made unique in file order
            base = content_id(ex)
            ex_id, k = base, 2
            while ex_id in seen:
                ex_id, k = f"{base}-{k}", k + 1
        elif ex_id in seen:
            raise DataError(f"{source}, {where}: duplicate id {ex_id!r} (first seen on {seen[ex_id]})")
        seen[ex_id] = where
        examples.append(Example(ex_id, ex.prompt, ex.response, ex.extra, ex.shape))
    return examples


def _json_lines(lines: Iterable[str], source: str) -> Iterable[tuple[str, object]]:
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield f"line {lineno}", json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{source}, line {lineno}: invalid JSON ({e})") from None
        except RecursionError:
            raise DataError(f"{source}, line {lineno}: JSON nested too deeply") from None


def parse_examples(lines: Iterable[str], source: str = "<memory>", fields: DataFields | None = None) -> list[Example]:
    """Parse JSONL lines (trailing newlines allowed, blank lines skipped) into examples; see `parse_records`."""
    return parse_records(_json_lines(lines, source), source, fields)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # -sig: accept (and drop) a byte-order mark
    except UnicodeDecodeError as e:
        line = path.read_bytes().count(b"\n", 0, e.start) + 1
        raise DataError(f"{str(path)!r}, line {line}: not valid UTF-8 ({e.reason} at byte {e.start})") from None


def _records(path: Path, split: str | None) -> Iterable[tuple[str, object]]:
    """The file's (where, record) pairs."""
    source = repr(str(path))
    if path.is_dir():
        return _dataset_records(path, split, source)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{source}: reading parquet needs pyarrow (pip install pyarrow)") from None
        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises its own error types for a damaged file
            raise DataError(f"{source}: not a readable parquet file ({str(e).splitlines()[0]})") from None
        return ((f"record {i}", r) for i, r in enumerate(rows))
    # split on "\n" only: str.splitlines would also split on U+2028 etc., which JSON strings may hold raw
    text = _read_text(path)
    if suffix == ".json":
        try:
            whole = json.loads(text)
        except json.JSONDecodeError as e:
            if "Extra data" not in e.msg:  # JSON lines under a .json name (datasets' to_json writes them) go on below
                raise DataError(f"{source}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
        except RecursionError:
            raise DataError(f"{source}: JSON nested too deeply") from None
        else:
            if isinstance(whole, list):
                return ((f"record {i}", r) for i, r in enumerate(whole))
            if not isinstance(whole, dict):
                raise DataError(f"{source}: a .json training file must hold a list of records (or JSON lines), "
                                f"found {_type_name(whole)}")
            # one object: JSON lines of a single record (a {"data": [...]} wrapper then fails on its fields)
    return _json_lines(text.split("\n"), source)


def _dataset_records(path: Path, split: str | None, source: str) -> Iterable[tuple[str, object]]:
    if not any((path / n).is_file() for n in ("dataset_info.json", "state.json", "dataset_dict.json")):
        raise DataError(f"{source}: is a folder but not one written by datasets' save_to_disk (no dataset_info.json, "
                        f"state.json or dataset_dict.json); give a JSONL, JSON or parquet file")
    try:
        from datasets import DatasetDict, load_from_disk
    except ImportError:
        raise DataError(f"{source}: reading a datasets folder needs the datasets package (pip install "
                        f"datasets)") from None
    try:
        data = load_from_disk(str(path))
    except Exception as e:  # datasets raises FileNotFoundError, ValueError or its own errors
        raise DataError(f"{source}: cannot load the datasets folder ({str(e).splitlines()[0]})") from None
    if isinstance(data, DatasetDict):
        names = list(data)
        name = split or ("train" if "train" in data else None)
        if name not in data:
            raise DataError(f"{source}: a DatasetDict with splits {', '.join(names)}; choose one with --split"
                            + (f" ({split!r} is not one)" if split else ""))
        data = data[name]
    elif split:
        raise DataError(f"{source}: --split {split!r} given, but the folder holds a single Dataset (no splits)")
    return ((f"record {i}", r) for i, r in enumerate(data.to_list()))


def load_examples(path: str | os.PathLike, fields: DataFields | None = None) -> list[Example]:
    """Load a training set: a JSONL, JSON or parquet file, or a datasets `save_to_disk` folder.

    Args:
        path: The file or folder.
        fields: Which record fields hold the id, prompt, response or messages, and a DatasetDict's split.

    Returns:
        The examples in file order.

    Raises:
        DataError: If the file does not exist, is not UTF-8, or is malformed (see `parse_records`).
    """
    path, fields = Path(path), fields or DataFields()
    if not path.exists():
        raise DataError(f"{str(path)!r}: training file does not exist")
    return parse_records(_records(path, fields.split), repr(str(path)), fields)


def save_examples(examples: Iterable[Example], path: str | os.PathLike, fields: DataFields | None = None) -> None:
    """Write examples as JSONL (UTF-8, non-ASCII kept as is, each record in its shape with its extra keys),
    atomically."""
    text = "".join(json.dumps(ex.to_dict(fields), ensure_ascii=False) + "\n" for ex in examples)
    atomic_write_text(path, text)


_HASHED: list[tuple[tuple[Example, ...], str]] = []  # the last HASHES_KEPT sets hashed, newest first
HASHES_KEPT = 2


def examples_hash(examples: Iterable[Example]) -> str:
    """Return the sha256 identifying a training set: its (id, prompt, response) triples in order, chats as their
    messages and with their shape (text examples hash as they always did); `extra` keys do not affect it.

    One command hashes the same set several times (the job's input check, the data check, the request's context, the
    recording's check): 0.14 s each at 10,000 examples of 128 tokens, most of an `unlearn`'s fixed cost. The last
    HASHES_KEPT results are kept with the examples they hashed, and the very same objects in the same order
    (Examples are frozen, their texts immutable) return the kept digest after an identity check.

    Returns:
        A 64-character hex digest.
    """
    examples = tuple(examples)
    for seen, digest in _HASHED:
        if len(seen) == len(examples) and all(a is b for a, b in zip(seen, examples, strict=True)):
            return digest
    rows = [[ex.id, ex.prompt, ex.response] if not ex.is_chat and ex.shape == "prompt-response"
            else [ex.id, _plain(ex.prompt), _plain(ex.response), ex.shape] for ex in examples]
    digest = sha256_bytes(canonical_json(rows).encode("utf-8"))
    _HASHED[:] = [(examples, digest), *_HASHED][:HASHES_KEPT]
    return digest


def describe(example: Example, width: int = 60) -> str:
    """A one-line preview of an example's prompt and response (for `llmeraser data ids`)."""
    def flat(t: Text) -> str:
        return t if isinstance(t, str) else " | ".join(f"{m.role}: {m.content}" for m in t)

    text = f"{flat(example.prompt)} → {flat(example.response)}".replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"

