"""The router of a sharded adapter: which shard's adapter answers a query.

Each training example's prompt is embedded by the base model (no adapter): the mean of its last hidden state over the
prompt's tokens, normalised. A query goes to the shard of its nearest training prompt (cosine; top-1, which maps onto
peft's per-example `adapter_names` and onto multi-LoRA serving), or is given a weight per shard from each shard's
nearest prompt (`weights`, for parameter- or output-level aggregation in the manner of APA). The router's data is
the training set's, so it is unlearned with it (`without`, `replace`): after a request it holds no row of a removed
example, and an edited prompt's row is recomputed.

Stored as `router.safetensors` (the embeddings and each row's shard) with the ids, in row order, in its metadata.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from llmeraser.data import Example
from llmeraser.errors import AdapterError

ROUTER = "router.safetensors"


@torch.no_grad()
def embed_prompts(model: torch.nn.Module, task, examples: Sequence[Example], batch_size: int = 16) -> torch.Tensor:
    """(n, hidden) unit vectors on the model's device: each example's prompt tokens' mean last hidden state under
    the base model (a peft model's adapters disabled), as `task` renders the example."""
    from contextlib import nullcontext

    from llmeraser.task import IGNORE_INDEX

    device = next(model.parameters()).device
    off = model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()
    out = []
    with off:
        for s in range(0, len(examples), batch_size):
            batch = task.collate(examples[s:s + batch_size])
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            prompt = (mask.bool() & (batch["labels"].to(device) == IGNORE_INDEX)).unsqueeze(-1)
            hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
            mean = (hidden.float() * prompt).sum(1) / prompt.sum(1).clamp(min=1)
            out.append(torch.nn.functional.normalize(mean, dim=1))
    return torch.cat(out) if out else torch.zeros(0, 1, device=device)


@dataclass
class Router:
    """Embeddings of the training prompts (`vectors`, n × hidden), each row's example id and shard."""

    ids: list[str]
    shards: torch.Tensor  # (n,) int64
    vectors: torch.Tensor  # (n, hidden) float32, unit rows
    n_shards: int

    def __post_init__(self) -> None:
        if len(self.ids) != len(set(self.ids)) or self.vectors.shape[0] != len(self.ids) or \
                self.shards.shape != (len(self.ids),):
            raise AdapterError("the router's ids, shards and embeddings do not match row for row")
        if len(self.ids) and not (0 <= int(self.shards.min()) and int(self.shards.max()) < self.n_shards):
            raise AdapterError(f"the router names shards outside 0..{self.n_shards - 1}")

    @classmethod
    def build(cls, model, task, examples: Sequence[Example], shard_of: dict[str, int], n_shards: int) -> Router:
        vectors = embed_prompts(model, task, examples)
        shards = torch.tensor([shard_of[e.id] for e in examples], dtype=torch.long, device=vectors.device)
        return cls([e.id for e in examples], shards, vectors, n_shards)

    def similarities(self, queries: torch.Tensor) -> torch.Tensor:
        """(q, n_shards): each query's cosine to each shard's nearest training prompt (-inf for an empty shard)."""
        sims = queries.to(self.vectors) @ self.vectors.T  # (q, n)
        best = torch.full((queries.shape[0], self.n_shards), float("-inf"), device=sims.device, dtype=sims.dtype)
        return best.scatter_reduce(1, self.shards.to(sims.device).expand_as(sims), sims, reduce="amax")

    def route(self, queries: torch.Tensor) -> torch.Tensor:
        """(q,) the shard of each query's nearest training prompt."""
        return self.similarities(queries).argmax(1)

    def weights(self, queries: torch.Tensor, temperature: float = 0.05) -> torch.Tensor:
        """(q, n_shards) softmax of the shards' nearest-prompt similarities / temperature: each query's weight on each
        shard's adapter (rows sum to 1)."""
        return torch.softmax(self.similarities(queries) / temperature, dim=1)

    def without(self, ids: set[str]) -> Router:
        """The router with the rows of `ids` dropped (removed examples: nothing of them is kept)."""
        keep = [i for i, x in enumerate(self.ids) if x not in ids]
        at = torch.tensor(keep, dtype=torch.long, device=self.vectors.device)
        return Router([self.ids[i] for i in keep], self.shards[at], self.vectors[at], self.n_shards)

    def replace(self, ids: Sequence[str], vectors: torch.Tensor) -> Router:
        """The router with the rows of `ids` recomputed (`vectors`, their new prompts' embeddings)."""
        new = self.vectors.clone()
        row = {x: i for i, x in enumerate(self.ids)}
        for x, v in zip(ids, vectors, strict=True):
            new[row[x]] = v.to(new)
        return Router(list(self.ids), self.shards, new, self.n_shards)

    def save(self, folder: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        save_file({"vectors": self.vectors.cpu().contiguous(), "shards": self.shards.cpu().contiguous()},
                  os.path.join(folder, ROUTER), metadata={"ids": json.dumps(self.ids),
                                                          "shards": str(self.n_shards)})

    @classmethod
    def load(cls, folder: str | os.PathLike) -> Router:
        from safetensors import SafetensorError, safe_open

        path = os.path.join(folder, ROUTER)
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                vectors, shards = f.get_tensor("vectors"), f.get_tensor("shards")
            ids, n = json.loads(meta["ids"]), int(meta["shards"])
        except (OSError, SafetensorError, KeyError, ValueError, TypeError) as e:
            raise AdapterError(f"{path}: unreadable router ({type(e).__name__}: {e})") from None
        if not (isinstance(ids, list) and all(isinstance(x, str) for x in ids)) or vectors.dim() != 2 or \
                shards.dtype != torch.long:
            raise AdapterError(f"{path}: the router's ids, shards or embeddings are malformed")
        return cls(ids, shards, vectors.float(), n)
