"""What batching weighted (APA-style) serving saves: one run, wall time of evaluating a sharded adapter's weighted
mixture per query (`serving.mixture`, one forward pass a query: the serving before `row_mixture`) and per batch row
(`serving.row_mixture` through `metrics.evaluate(each_batch=)`) at batch 1 and 8, reported as ratios, on a small
random Llama trained as S shards here. The model is loaded and routed once; only the evaluations are timed, each the
best of `--repeats`.

    OMP_NUM_THREADS=1 python bench/weighted_batch.py --shards 4 --n 128 --hidden 64 --layers 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    from llmeraser.finetune import FinetuneArguments
    from llmeraser.metrics import evaluate
    from llmeraser.record import LoraSettings
    from llmeraser.router import embed_prompts
    from llmeraser.serving import TEMPERATURE, mixture, row_mixture
    from llmeraser.sharded import ShardedAdapter, _base_and_task, finetune_sharded
    from llmeraser.testing import fact_examples, tiny_llama, tiny_tokenizer

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--n", type=int, default=128, help="queries evaluated (and examples trained on)")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="weighted-batch-"))
    tok = tiny_tokenizer()
    tiny_llama(len(tok), hidden=a.hidden, layers=a.layers, dtype=torch.float32, init_std=0.1).save_pretrained(
        root / "base")
    tok.save_pretrained(root / "base")
    data = [dataclasses.replace(e, extra={"user": f"u{i % (2 * a.shards)}"})
            for i, e in enumerate(fact_examples(a.n, seed=3))]
    finetune_sharded(data, root / "in", shards=a.shards, by="user", base_model=str(root / "base"), max_length=32,
                     lora=LoraSettings(r=4, targets=("q_proj", "v_proj")),
                     args=FinetuneArguments(epochs=1, batch_size=8, lr=1e-2))
    sharded = ShardedAdapter.read(root / "in")
    base, task = _base_and_task(str(root / "base"), "float32", "cpu", 32)
    model = sharded.load(base)
    task.calibrate(data)
    live = [sharded.names[k] for k in sharded.live]
    weights = sharded.router().weights(embed_prompts(model, task, data), TEMPERATURE)[:, sharded.live]
    settings = [tuple(zip(live, row, strict=True)) for row in weights.tolist()]

    def per_query():
        return evaluate(model, task, data, batch_size=1, adapters=settings,
                        activate=lambda s: mixture(model, dict(s)))

    def rows(batch_size):
        def run():
            with row_mixture(model, live) as weigh:
                return evaluate(model, task, data, batch_size=batch_size, each_batch=lambda r: weigh(weights[r]))
        return run

    seconds, losses = {}, {}
    for name, run in [("per_query_mixture", per_query), ("row_mixture_batch_1", rows(1)),
                      ("row_mixture_batch_8", rows(8))]:
        times = []
        for _ in range(a.repeats):
            start = time.perf_counter()
            losses[name] = run()["loss"]
            times.append(time.perf_counter() - start)
        seconds[name] = min(times)
    print(json.dumps({"args": vars(a), "torch_threads": torch.get_num_threads(), "seconds": seconds,
                      "mean_loss": losses,
                      "batch_1_over_batch_8": seconds["row_mixture_batch_1"] / seconds["row_mixture_batch_8"],
                      "per_query_over_batch_8": seconds["per_query_mixture"] / seconds["row_mixture_batch_8"]},
                     indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
