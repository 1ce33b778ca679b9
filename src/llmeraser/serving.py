"""How a sharded adapter answers a query: top-1 or weighted aggregation of its shards
(docs/sharded.md#serving-top-1-weighted-or-ensemble).

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

- **ensemble** (SISA's aggregation, Bourtoule et al. 2021, weighted by the router): every shard answers the query on
  its own and their answers are mixed, P(y | x) = Σ_k w_k P_k(y | x) (`ensemble`): S forward passes a query, any PEFT
  kind. Each shard's output is on its own scale (a shard of 1/S of the data leans its own way), which top-1 carries
  into the scores of the queries it routes and a mixture of the outputs averages out
  (docs/sharded.md#serving-top-1-weighted-or-ensemble).
  Exact unlearning holds as for the others: each answer comes from shards that never saw a removed example.

Weighted queries are batched (`row_mixture`): every shard's adapter is active and a forward hook on each shard's
`lora_B` multiplies its output by the row's weight, so row i of one forward pass computes W x_i + Σ_k w_{i,k} s_k
B_k A_k x_i — each query its own weights, `batch_size` queries per pass; `mixture` is the one-weight-vector form.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence

import torch

from llmeraser.data import Example
from llmeraser.errors import ConfigError
from llmeraser.sharded import ShardedAdapter, _base_and_task

AGGREGATES = ("top1", "weighted", "ensemble")
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
def _restored(layers: list) -> Iterator[list]:
    """Within the block the layers may be changed (scales, active adapters, which parameters need grad, hooks put in
    the list it yields); on exit, exception or not, the hooks are removed and the rest is put back as it was."""
    saved = [(layer, dict(layer.scaling), list(layer.active_adapters),
              [(q, q.requires_grad) for q in layer.parameters()]) for layer in layers]
    hooks: list = []
    try:
        yield hooks
    finally:
        for hook in hooks:
            hook.remove()
        for layer, scaling, active, grads in saved:
            layer.scaling.clear()
            layer.scaling.update(scaling)
            layer.set_adapter(active)
            for q, needs in grads:
                q.requires_grad_(needs)


@contextlib.contextmanager
def mixture(model: torch.nn.Module, weights: dict[str, float]) -> Iterator[None]:
    """Within the block, every adapter in `weights` is active with its LoRA scale multiplied by its weight: the model
    computes with W + Σ_k w_k ΔW_k. The scales and the active adapter are restored on exit."""
    names = list(weights)
    layers = _lora_layers(model, names)
    with _restored(layers):
        for layer in layers:
            held = [n for n in names if n in layer.scaling]
            for n in held:
                layer.scaling[n] = layer.scaling[n] * weights[n]
            layer.set_adapter(held)  # (its grad flags are put back on exit: peft < 0.18 has no inference_mode)
        yield


@contextlib.contextmanager
def row_mixture(model: torch.nn.Module, names: Sequence[str]
                ) -> Iterator[Callable[[torch.Tensor], contextlib.AbstractContextManager]]:
    """`mixture` with a weight vector per batch row. Yields `weigh`: within `weigh(w)`, w a (batch, len(names))
    tensor on the model's device, row i of a forward pass computes with W + Σ_k w[i, k] ΔW_k.

    Every named adapter is active at its own scale, and a forward hook on its `lora_B` in each layer multiplies that
    output by w[:, k] (batch is dim 0): peft's LoRA forward adds lora_B(lora_A(dropout(x))) · s_k per active adapter,
    so the hook makes it w[i, k] s_k B_k A_k x_i, row by row. A merged layer (its update already in W, the hooks never
    run) or a LoRA embedding (no `lora_B` module) is refused; hooks, scales, active adapters and grad flags are
    restored on exit, also on an exception."""
    names = list(names)
    layers = _lora_layers(model, names)
    current: list[torch.Tensor] = []

    def scaled(k: int) -> Callable:
        def hook(module, args, output: torch.Tensor) -> torch.Tensor:
            if not current:
                raise ConfigError("row_mixture: a forward pass outside `weigh(weights)` has no weights for its rows")
            w = current[0]
            if w.shape[0] != output.shape[0]:
                raise ConfigError(f"row_mixture: {w.shape[0]} weight rows for a batch of {output.shape[0]}")
            return output * w[:, k].to(output.dtype).reshape(-1, *[1] * (output.dim() - 1))
        return hook

    @contextlib.contextmanager
    def weigh(weights: torch.Tensor) -> Iterator[None]:
        if weights.dim() != 2 or weights.shape[1] != len(names):
            raise ConfigError(f"row_mixture: weights must be (batch, {len(names)}), got {tuple(weights.shape)}")
        current.append(weights)
        try:
            yield
        finally:
            current.clear()

    with _restored(layers) as hooks:
        for layer in layers:
            held = [n for n in names if n in layer.scaling]
            if layer.merged or any(n not in layer.lora_B for n in held):
                raise ConfigError(f"row_mixture needs unmerged LoRA layers with a lora_B module, which "
                                  f"{type(layer).__name__} ({'merged' if layer.merged else 'an embedding'}) is not")
            hooks.extend(layer.lora_B[n].register_forward_hook(scaled(names.index(n))) for n in held)
            layer.set_adapter(held)  # (its grad flags are put back on exit: peft < 0.18 has no inference_mode)
        yield weigh


def evaluate_sharded(folder: str | os.PathLike, data: Sequence[Example], *, base_model: str = "default",
                     dtype: str = "float32", device: str = "auto", max_length: int | None = None,
                     batch_size: int = 8, progress: bool = False, aggregate: str = "top1",
                     temperature: float = TEMPERATURE) -> dict:
    """`metrics.evaluate` of a sharded adapter on `data`, each example answered as `aggregate` says (top-1: the shard
    its router picks; weighted: every shard's update summed, weighted by the router; ensemble: every shard's answer
    mixed, weighted by the router), the shards loaded side by side on one base and the task as their training record
    says. The result adds `routing`: each example's top shard and the examples per shard, and with weighted or
    ensemble aggregation each example's weights (and with ensemble each shard's own result on all of `data`)."""
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
    weights = router.weights(queries, temperature)[:, sharded.live]  # (n, live) on the model's device
    if aggregate == "ensemble":  # (a dropped shard's weight is 0 already: the router's -inf similarity)
        out, routing["each_shard"] = ensemble(model, task, data, live, weights, batch_size=batch_size,
                                              progress=progress)
    else:
        with row_mixture(model, live) as weigh:
            out = evaluate(model, task, data, batch_size=batch_size, progress=progress,
                           each_batch=lambda rows: weigh(weights[rows]))
    routing["weights"] = {e.id: dict(zip(live, row, strict=True))
                          for e, row in zip(data, weights.tolist(), strict=True)}  # one transfer, at the end
    return out | {"routing": routing}


def ensemble(model: torch.nn.Module, task, data: Sequence[Example], names: Sequence[str], weights: torch.Tensor, *,
             batch_size: int = 8, progress: bool = False) -> tuple[dict, dict]:
    """`metrics.evaluate` of the mixture of the named adapters' answers: each example answered by every adapter on its
    own (one `evaluate` pass each), mixed with its row of `weights` ((len(data), len(names)), rows summing to 1): for
    a yes/no task P(yes) = Σ_k w_k P_k(yes), and each example's loss −log Σ_k w_k exp(−ℓ_k) — the mixture's NLL of a
    one-token response (of each adapter's per-token geometric mean probability for a longer one). Returns (the
    mixture's result, {name: that adapter's own loss and AUC on `data`}). Leaves the last named adapter active."""
    from llmeraser.metrics import evaluate, summarize

    if weights.shape != (len(data), len(names)):
        raise ConfigError(f"ensemble: weights must be ({len(data)}, {len(names)}), got {tuple(weights.shape)}")
    runs = [evaluate(model, task, data, batch_size=batch_size, progress=progress, adapters=[n] * len(data))
            for n in names]
    w = weights.detach().to("cpu", torch.float64).T  # (S, n): one transfer; every result below is on the host
    losses = torch.tensor([[run["losses"][e.id] for e in data] for run in runs], dtype=torch.float64)
    loss = -torch.logsumexp(w.log() - losses, dim=0)  # a weight of 0 adds exp(−inf) = 0
    p = None
    if "p_yes" in runs[0]:
        p = (w * torch.tensor([[run["p_yes"][e.id] for e in data] for run in runs], dtype=torch.float64)).sum(0)
    return summarize(data, loss, p), {n: {"loss": run["loss"], "auc": run.get("auc")}
                                      for n, run in zip(names, runs, strict=True)}
