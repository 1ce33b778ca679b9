"""How a sharded adapter answers a query: top-1 or weighted aggregation of its shards (docs/sharded.md#serving).

- **top-1** (the default): the shard whose stored prompt is nearest to the query answers it alone (`Router.route`):
  peft's per-example adapter, or a multi-LoRA server's adapter per request. Exact unlearning holds per shard, and a
  query is answered by one adapter that never saw a removed example.
- **weighted** (APA-style, Hu et al. 2024: sample-adaptive aggregation): every shard contributes, weighted per query
  by the router (`Router.weights`, a softmax of each shard's nearest-prompt cosine over a temperature). The shards'
  LoRA updates are summed in weight space — the layer computes W x + Σ_k w_k s_k B_k A_k x = (W + Σ_k w_k ΔW_k) x —
  by scaling each adapter's LoRA scale s_k by w_k and activating all of them (`mixture`). This is the parameter-level
  aggregate of the shards' weight updates; averaging the A and B factors separately would not be (their products
  mix across shards). It needs LoRA layers whose update is linear in its scale: plain LoRA, not DoRA or other PEFT
  kinds (refused, naming the layer). A removal stays exact: the retrained shards hold nothing of the removed
  examples, and the router's weights come from the remaining prompts only.

A weighted query runs alone (its weights are its own), so weighted evaluation makes one forward pass per example.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence

import torch

from llmeraser.data import Example
from llmeraser.errors import ConfigError
from llmeraser.sharded import ShardedAdapter, _base_and_task

AGGREGATES = ("top1", "weighted")
TEMPERATURE = 0.05  # the router's softmax temperature over cosines: 0.05 puts e^-2 on a shard 0.1 further away


def _lora_layers(model: torch.nn.Module, names: Sequence[str]) -> list:
    """The model's adapter layers, each checked to be plain LoRA for every named adapter (ConfigError otherwise)."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = []
    for where, module in model.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        variant = getattr(module, "lora_variant", {})
        if not isinstance(module, LoraLayer) or any(
                module.use_dora.get(n, False) or variant.get(n) is not None for n in names if n in module.scaling):
            raise ConfigError(f"weighted aggregation sums LoRA updates, which {where} ({type(module).__name__}) is not "
                              f"(DoRA and other PEFT kinds are not linear in their scale): use top-1 routing")
        layers.append(module)
    return layers


@contextlib.contextmanager
def mixture(model: torch.nn.Module, weights: dict[str, float]) -> Iterator[None]:
    """Within the block, every adapter in `weights` is active with its LoRA scale multiplied by its weight: the model
    computes with W + Σ_k w_k ΔW_k. The scales and the active adapter are restored on exit."""
    names = list(weights)
    layers = _lora_layers(model, names)
    saved = [(layer, dict(layer.scaling), list(layer.active_adapters)) for layer in layers]
    try:
        for layer in layers:
            held = [n for n in names if n in layer.scaling]
            for n in held:
                layer.scaling[n] = layer.scaling[n] * weights[n]
            layer.set_adapter(held)
        yield
    finally:
        for layer, scaling, active in saved:
            layer.scaling.clear()
            layer.scaling.update(scaling)
            layer.set_adapter(active)


def evaluate_sharded(folder: str | os.PathLike, data: Sequence[Example], *, base_model: str = "default",
                     dtype: str = "float32", device: str = "auto", max_length: int | None = None,
                     batch_size: int = 8, progress: bool = False, aggregate: str = "top1",
                     temperature: float = TEMPERATURE) -> dict:
    """`metrics.evaluate` of a sharded adapter on `data`, each example answered as `aggregate` says (top-1: the shard
    its router picks; weighted: every shard, weighted by the router), the shards loaded side by side on one base and
    the task as their training record says. The result adds `routing`: each example's top shard and the examples per
    shard, and with weighted aggregation each example's weights."""
    from llmeraser.metrics import evaluate
    from llmeraser.record import TrainingRecord
    from llmeraser.router import embed_prompts

    if aggregate not in AGGREGATES:
        raise ConfigError(f"aggregate must be one of {', '.join(AGGREGATES)}, got {aggregate!r}")
    if not temperature > 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    sharded = ShardedAdapter.read(folder)
    record = TrainingRecord.read(sharded.shard_dir(sharded.live[0]), max_length=max_length)
    base, task = _base_and_task(base_model, dtype, device, record.length, record.rendering)
    model = sharded.load(base)
    task.calibrate(data)
    router, queries = sharded.router(), embed_prompts(model, task, data)
    top = [sharded.names[k] for k in router.route(queries).tolist()]
    routing = {"shard_of": {e.id: n for e, n in zip(data, top, strict=True)},
               "examples_per_shard": {n: top.count(n) for n in sharded.names}, "aggregate": aggregate}
    if aggregate == "top1":
        return evaluate(model, task, data, batch_size=batch_size, progress=progress, adapters=top) | {
            "routing": routing}
    live = [sharded.names[k] for k in sharded.live]
    rows = router.weights(queries, temperature)[:, sharded.live].tolist()  # one transfer: the weights are few
    settings = [tuple(zip(live, row, strict=True)) for row in rows]
    out = evaluate(model, task, data, batch_size=1, progress=progress, adapters=settings,
                   activate=lambda setting: mixture(model, dict(setting)))
    routing["weights"] = {e.id: dict(s) for e, s in zip(data, settings, strict=True)}
    return out | {"routing": routing}
