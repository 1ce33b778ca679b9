"""Data as people have it: file formats, record shapes, field names, content ids, chat requests, and the rendering of
chats and TRL records into tokens and loss masks (checked against TRL's own preparation of the same records)."""

from __future__ import annotations

import json

import pytest

from llmeraser.data import DataFields, Example, Message, content_id, examples_hash, load_examples, save_examples
from llmeraser.errors import DataError, RequestError
from llmeraser.request import Request, apply_request, resolve
from llmeraser.task import IGNORE_INDEX, CausalLMTask, Rendering
from llmeraser.testing import chat_records, tiny_tokenizer

TEXT = [{"id": "a", "prompt": "Does the cat like red?", "response": " Yes", "note": 1},
        {"id": "b", "prompt": "Does the dog like blue?", "response": " No"}]
COMPLETION = [{"id": "c", "prompt": "Does the owl like gold?", "completion": " Yes"}]
CONVERSATIONAL = [{"id": "d", "prompt": [{"role": "user", "content": "Which colour does the fox like?"}],
                   "completion": [{"role": "assistant", "content": "The fox likes green."}]}]


def write_all(tmp_path, records):
    """The same records as JSONL, a JSON list, JSON lines named .json, parquet, a datasets folder and a DatasetDict."""
    from datasets import Dataset, DatasetDict

    paths = {}
    paths["jsonl"] = tmp_path / "t.jsonl"
    paths["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    paths["json"] = tmp_path / "t.json"
    paths["json"].write_text(json.dumps(records), encoding="utf-8")
    paths["json-lines"] = tmp_path / "lines.json"
    paths["json-lines"].write_text(paths["jsonl"].read_text(encoding="utf-8"), encoding="utf-8")
    ds = Dataset.from_list(records)
    paths["parquet"] = tmp_path / "t.parquet"
    ds.to_parquet(str(paths["parquet"]))
    paths["datasets"] = tmp_path / "ds"
    ds.save_to_disk(str(paths["datasets"]))
    paths["datasetdict"] = tmp_path / "dd"
    DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(paths["datasetdict"]))
    return paths


DOCUMENTS = [{"id": "d0", "text": "The cat likes red."}, {"id": "d1", "text": "The dog likes blue."}]


@pytest.mark.parametrize("records", [TEXT, COMPLETION, CONVERSATIONAL, chat_records(3), DOCUMENTS],
                         ids=["prompt-response", "prompt-completion", "conversational", "messages", "text"])
def test_every_file_format_reads_the_same_examples(tmp_path, records):
    paths = write_all(tmp_path, records)
    reference = load_examples(paths["jsonl"])
    assert len(reference) == len(records)
    for name, path in paths.items():
        got = load_examples(path)
        assert got == reference, name
        assert examples_hash(got) == examples_hash(reference), name
    # and what is saved reads back the same, in its own shape
    save_examples(reference, tmp_path / "again.jsonl")
    assert load_examples(tmp_path / "again.jsonl") == reference
    first = json.loads((tmp_path / "again.jsonl").read_text(encoding="utf-8").split("\n")[0])
    assert set(first) >= set(records[0]) - {"note"}


def test_shapes_and_what_they_hold():
    from llmeraser.data import parse_records

    text, completion = parse_records(enumerate_records(TEXT[:1] + COMPLETION))
    assert (text.shape, completion.shape) == ("prompt-response", "prompt-completion")
    assert text.extra == {"note": 1} and not text.is_chat
    chat = parse_records(enumerate_records(chat_records(2)))[1]
    assert chat.shape == "messages" and chat.is_chat
    assert [m.role for m in chat.prompt] == ["system", "user"] and [m.role for m in chat.response] == ["assistant"]
    assert chat.messages() == chat_records(2)[1]["messages"]
    # a tool call or other message keys survive a round trip
    tool = {"id": "t", "messages": [{"role": "user", "content": "hi"},
                                    {"role": "assistant", "content": "x", "tool_calls": [{"name": "f"}]}]}
    (ex,) = parse_records(enumerate_records([tool]))
    assert ex.to_dict() == tool
    # the chat hash depends on the messages; text keeps its old hash (what older ledgers and caches recorded)
    assert examples_hash([Example("a", "p", "r")]) == examples_hash([Example("a", "p", "r", {"k": 2})])
    other = Example(chat.id, chat.prompt, (Message("assistant", "other"),), shape="messages")
    assert examples_hash([chat]) != examples_hash([other])


def test_documents_carry_the_loss_on_every_token_and_have_no_prompt_to_modify(chat_tok):
    from llmeraser.data import parse_records

    (doc,) = parse_records(enumerate_records(DOCUMENTS[:1]))
    assert (doc.shape, doc.prompt, doc.response) == ("text", "", "The cat likes red.")
    ids, labels = CausalLMTask(chat_tok, max_length=64).encode(doc)
    assert ids[0] == chat_tok.bos_token_id and loss_text(chat_tok, ids, labels) == "The cat likes red."
    with pytest.raises(RequestError, match="is a document .* no prompt to modify"):
        resolve(Request.modify_query({"d0": "x"}), [doc])
    (_, new), = resolve(Request.correct_response({"d0": "The cat likes nothing."}), [doc])
    assert new.response == "The cat likes nothing." and new.shape == "text"


def enumerate_records(records):
    return [(f"record {i}", r) for i, r in enumerate(records)]


def test_field_names_are_configurable(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"uid": 7, "question": "q?", "answer": "a"}) + "\n", encoding="utf-8")
    fields = DataFields(id_field="uid", prompt_field="question", response_field="answer")
    (ex,) = load_examples(path, fields)
    assert (ex.id, ex.prompt, ex.response) == ("7", "q?", "a")  # an integer id becomes its string
    save_examples([ex], tmp_path / "back.jsonl", fields)
    assert json.loads((tmp_path / "back.jsonl").read_text()) == {"uid": "7", "question": "q?", "answer": "a"}
    chat = tmp_path / "conv.jsonl"
    chat.write_text(json.dumps({"id": "x", "conversation": chat_records(1)[0]["messages"]}) + "\n")
    assert load_examples(chat, DataFields(messages_field="conversation"))[0].is_chat


def test_content_ids_are_stable_and_unique(tmp_path):
    records = [{"prompt": "p1", "response": "r"}, {"prompt": "p2", "response": "r"}, {"prompt": "p1", "response": "r"}]
    path = tmp_path / "noid.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    ids = [e.id for e in load_examples(path)]
    assert ids[0].startswith("sha-") and len(ids[0]) == 20 and ids[2] == ids[0] + "-2" and len(set(ids)) == 3
    path.write_text("".join(json.dumps(r) + "\n" for r in records[1::-1]))  # reordered: each keeps its id
    assert [e.id for e in load_examples(path)] == [ids[1], ids[0]]
    assert ids[0] == content_id(Example("", "p1", "r"))
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps({"id": "a", "prompt": "p", "response": "r"}) + "\n" + json.dumps(records[0]) + "\n")
    with pytest.raises(DataError, match=r"mixed\.jsonl', line 2: missing field 'id' \(other records have one"):
        load_examples(mixed)


@pytest.mark.parametrize(("record", "pattern"), [
    ({"id": "a", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 3}]},
     r"record 0: messages\[1\]\.content must be a string, found int"),
    ({"id": "a", "messages": [{"role": "user", "content": "q"}]}, r"record 0: field 'messages' has no assistant"),
    ({"id": "a", "messages": []}, r"record 0: field 'messages' must be a non-empty list"),
    ({"id": "a", "messages": ["hi"]}, r"record 0: messages\[0\] must be an object"),
    ({"id": "a", "prompt": "p", "completion": [{"role": "assistant", "content": "x"}]},
     r"record 0: 'prompt' and 'completion' must both be text or both be chat messages"),
    ({"id": "a", "prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "user", "content": "x"}]},
     r"record 0: completion\[0\] has role 'user'; the response of a chat must start with an assistant message"),
    ({"id": "a", "prompt": "p"}, r"record 0: missing field 'response' \(or 'completion'\)"),
    ({"id": "a", "body": "p"}, r"record 0: missing field 'prompt' \(or 'messages' for a chat, 'text' for a doc"),
    ({"id": "a", "text": ""}, r"record 0: field 'text' must be a non-empty string, found an empty string"),
])
def test_errors_name_the_record_and_the_field(tmp_path, record, pattern):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([record]), encoding="utf-8")
    with pytest.raises(DataError, match=pattern):
        load_examples(path)


def test_file_level_errors(tmp_path):
    from datasets import Dataset, DatasetDict

    (tmp_path / "obj.json").write_text('"text"')
    with pytest.raises(DataError, match="must hold a list of records \\(or JSON lines\\), found str"):
        load_examples(tmp_path / "obj.json")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="not a readable parquet file"):
        load_examples(tmp_path / "bad.parquet")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="not one written by datasets' save_to_disk"):
        load_examples(tmp_path / "plain")
    ds = Dataset.from_list(TEXT)
    DatasetDict({"a": ds, "b": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match="a DatasetDict with splits a, b; choose one with --split"):
        load_examples(tmp_path / "dd")
    assert load_examples(tmp_path / "dd", DataFields(split="b")) == load_examples(tmp_path / "dd",
                                                                                 DataFields(split="a"))
    with pytest.raises(DataError, match="'c' is not one"):
        load_examples(tmp_path / "dd", DataFields(split="c"))


def test_chat_requests_replace_the_final_assistant_message_or_the_user_turn():
    from llmeraser.data import parse_records

    train = parse_records(enumerate_records(chat_records(3)))
    chat = train[1]  # system, user, assistant
    (_, new), = resolve(Request.correct_response({chat.id: "The cat likes blue."}), train)
    assert new.response[0].content == "The cat likes blue." and new.response[0].role == "assistant"
    assert new.prompt == chat.prompt and new.shape == "messages"
    (_, new), = resolve(Request.modify_query({chat.id: "Which colour, really?"}), train)
    assert [m.content for m in new.prompt] == ["Answer briefly.", "Which colour, really?"]
    whole = Request.from_dict({"edits": [{"op": "modify_query", "id": chat.id,
                                          "prompt": [{"role": "user", "content": "Only this."}]}]})
    (_, new), = resolve(whole, train)
    assert [m.to_dict() for m in new.prompt] == [{"role": "user", "content": "Only this."}]
    assert whole.hash == Request.from_dict(whole.to_dict()).hash
    edited = apply_request(train, Request.correct_response({chat.id: "The cat likes blue."}))
    assert examples_hash(edited) != examples_hash(train) and len(edited) == 3
    with pytest.raises(RequestError, match="changes nothing"):
        resolve(Request.correct_response({chat.id: chat.response[0].content}), train)
    text = [Example("t", "p", "r")]
    with pytest.raises(RequestError, match="example 't' is text; give its new response as a string"):
        resolve(Request.from_dict({"edits": [{"op": "correct_response", "id": "t",
                                              "response": [{"role": "assistant", "content": "x"}]}]}), text)
    with pytest.raises(RequestError, match=r"edits\[0\].*response\[0\]\.role must be a string"):
        Request.from_dict({"edits": [{"op": "correct_response", "id": "t", "response": [{"content": "x"}]}]})


def test_a_chat_response_given_in_a_request_has_the_roles_a_training_file_needs():
    from llmeraser.data import parse_records

    train = parse_records(enumerate_records(chat_records(2) + CONVERSATIONAL))
    assistant, user = {"role": "assistant", "content": "The cat likes gold."}, {"role": "user", "content": "And?"}

    def edit(example_id, response):
        return Request.from_dict({"edits": [{"op": "correct_response", "id": example_id, "response": response}]})

    for example_id in ("chat1", "d"):  # a messages record, a conversational prompt-completion record
        with pytest.raises(RequestError, match=r"edits\[0\] \(0-based\): response\[0\] has role 'user'; the "
                                               r"response of a chat must start with an assistant message"):
            resolve(edit(example_id, [user]), train)
        (_, new), = resolve(edit(example_id, [assistant, user]), train)
        assert [m.role for m in new.response] == ["assistant", "user"]
    # a messages record's response is its final assistant message: a second one would move the split on reading back
    with pytest.raises(RequestError, match="response holds more than one assistant message"):
        resolve(edit("chat1", [assistant, user, assistant]), train)
    (_, new), = resolve(edit("d", [assistant, user, assistant]), train)
    assert len(new.response) == 3
    # a new prompt may hold any turns
    (_, new), = resolve(Request.from_dict({"edits": [{"op": "modify_query", "id": "chat1",
                                                       "prompt": [user, assistant, user]}]}), train)
    assert [m.role for m in new.prompt] == ["user", "assistant", "user"]


# ------------------------------------------------------------------------------------------------------ rendering
@pytest.fixture(scope="module")
def chat_tok():
    return tiny_tokenizer([m["content"] for r in chat_records(40) for m in r["messages"]], vocab_size=400, chat=True)


def loss_text(tok, ids, labels):
    return tok.decode([t for t in labels if t != IGNORE_INDEX])


def test_llmeraser_chat_rendering_puts_the_loss_on_the_final_assistant_message(chat_tok):
    from llmeraser.data import parse_records

    (ex,) = parse_records(enumerate_records(chat_records(2)[1:]))
    ids, labels = CausalLMTask(chat_tok, max_length=200).encode(ex)
    assert chat_tok.decode(ids) == chat_tok.apply_chat_template(ex.messages(), tokenize=False)
    assert loss_text(chat_tok, ids, labels) == ex.response[0].content + "<|im_end|>\n"
    # text records are unchanged: BOS + prompt + response, loss on the response
    ids, labels = CausalLMTask(chat_tok, max_length=200).encode(Example("t", "Does the cat", " like red"))
    assert ids[0] == chat_tok.bos_token_id and loss_text(chat_tok, ids, labels) == " like red"


TRL_CASES = {  # name: (records, SFTConfig options, Rendering)
    "messages": (chat_records(6), {}, Rendering(format="trl")),
    "messages-assistant-only": (chat_records(6), {"assistant_only_loss": True},
                                Rendering(format="trl", assistant_only=True)),
    "prompt-completion-text": (COMPLETION + [{"id": "e", "prompt": "Does the cow like black?", "completion": " No"}],
                               {}, Rendering(format="trl")),
    "prompt-completion-chat": (CONVERSATIONAL, {}, Rendering(format="trl")),
    "prompt-completion-full-loss": (CONVERSATIONAL, {"completion_only_loss": False},
                                    Rendering(format="trl", completion_only=False)),
    "truncated": (chat_records(4), {"max_length": 12}, Rendering(format="trl")),
    "text": ([{"id": "t0", "text": "The cat likes red. The dog likes blue."},
              {"id": "t1", "text": "The owl likes gold."}], {}, Rendering(format="trl")),
}


@pytest.mark.parametrize("case", list(TRL_CASES))
def test_trl_rendering_matches_sfttrainers_own_preparation(tmp_path, chat_tok, case):
    """Our token ids and labels for each record equal the ones TRL's SFTTrainer prepares from the same records."""
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from llmeraser.data import parse_records
    from llmeraser.testing import tiny_llama

    records, options, rendering = TRL_CASES[case]
    config = SFTConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False,
                       gradient_checkpointing=False, max_length=options.pop("max_length", 64), **options)
    model = tiny_llama(len(chat_tok), hidden=16, seed=0, dtype=torch.float32)
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(records),
                         processing_class=chat_tok)
    task = CausalLMTask(chat_tok, max_length=config.max_length, rendering=rendering)
    prepared = trainer.train_dataset
    examples = parse_records(enumerate_records(records))
    assert len(prepared) == len(examples)
    for row, ex in zip(prepared, examples, strict=True):
        ids, labels = task.encode(ex)
        assert ids == row["input_ids"], ex.id
        assert labels == row["labels"], ex.id
