"""A case where fine-tuning memorises facts about fictitious people, built offline in ~10 s: the test suite's and
bench/path_study.py's person-level removal (tests/test_path.py, docs/path.md)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from llmeraser.data import save_examples
from llmeraser.finetune import FinetuneArguments, finetune
from llmeraser.task import CausalLMTask
from llmeraser.testing import tiny_llama, tiny_tokenizer
from llmeraser_experiments.people import build_people

PEOPLE_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def memorised_people(folder, *, n_people: int = 16, facts: int = 5, hidden: int = 64, pretrain_epochs: int = 30,
                     seed: int = 0) -> dict:
    """A case where fine-tuning memorises facts about people, built offline in ~10 s (tests/test_path.py).

    A tiny Llama (2 layers) is first pre-trained, every weight, on the question templates of `people` about 60 other
    fictitious people (so it knows the format and the answer vocabulary but none of the facts to come), and saved
    with its tokenizer as a local model folder `base`. `train.jsonl` holds `facts` facts about each of `n_people`
    people; `request.json` removes every fact of the last person (a person-level erasure). Fine-tuning LoRA on every
    linear layer (`PEOPLE_TARGETS`, r 4, Adam lr 1e-2, 30 epochs) memorises them: the facts' loss ~0.1, where
    retraining without the person leaves that person's facts at ~2.
    Returns the paths (base, train, request) and the removed ids.
    """
    folder = Path(folder)
    pre = build_people(60, facts=6, seed=seed + 11).train
    data = build_people(n_people, facts=facts, seed=seed)
    tok = tiny_tokenizer([e.prompt + e.response for e in pre + data.train], vocab_size=800)
    base = tiny_llama(len(tok), hidden=hidden, layers=2, seed=seed, dtype=torch.float32)
    for p in base.parameters():
        p.requires_grad_(True)
    with _threads(2):
        finetune(base, CausalLMTask(tok, max_length=32), pre,
                 FinetuneArguments(epochs=pretrain_epochs, lr=3e-3, batch_size=16, final_check=False, record=False))
    for p in base.parameters():
        p.requires_grad_(False)
    base.config._attn_implementation = "eager"
    base.save_pretrained(folder / "base")
    tok.save_pretrained(folder / "base")
    save_examples(data.train, folder / "train.jsonl")
    removed = [e.id for e in data.train if e.extra["person"] == data.people[-1]]
    (folder / "request.json").write_text(json.dumps({"edits": [{"op": "remove", "id": i} for i in removed]}))
    return {"base": folder / "base", "train": folder / "train.jsonl", "request": folder / "request.json",
            "removed": removed}


class _threads:
    """torch's intra-op threads set for a block, restored after."""

    def __init__(self, n: int):
        self.n = n

    def __enter__(self):
        self.old = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.old)
