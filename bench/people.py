"""The generative benchmark on fictitious people: TOFU's forget quality and model utility, for every method.

    make bench-people   # python bench/people.py   the embedded model, every split and method: ~3 h on 2 cores
    python bench/people.py --tiny                  a tiny random model, seconds (what the tests run)
    python bench/people.py --tofu-sized            200 people × 13 facts: for a GPU (hours on a CPU)
    python bench/people.py --splits forget05 --methods original retrain retrain@1 first-order/ekfac --out DIR
    python bench/people.py --splits forget05 --shards 4 8 --out DIR   sharded adapters (docs/sharded.md)
    python bench/people.py --splits forget01 forget05 forget10 --methods original retrain first-order/cg \
        gradient-ascent npo npo/stop simnpo/stop gradient-difference/stop npo/stop:b0.5-rw3 --work W --out DIR
                                                   rows without a recording
                                                   (docs/forget.md#measured-the-people-benchmark-and-the-trl-chat-removal)

Builds the people (`llmeraser data people` writes the same records), fine-tunes the embedded model on their facts
until it has memorised them (recording its trajectory, as `llmeraser finetune` does), and for forget01/05/10 and the
correction runs every method from the original adapter with the options a user gets — the one-step updates, the
path updates (rewind, path replay and its variants, refine: docs/path.md) and the baselines — next to retraining,
a second retrain from another seed (the noise floor) and doing nothing. Writes OUT/results.json (every number, the
git commit, all arguments), OUT/tables.md and OUT/forget_quality.png. What the measures mean:
`llmeraser_experiments.forgetting` and docs/people.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

from llmeraser.errors import ConfigError
from llmeraser.record import LoraSettings
from llmeraser_experiments.people_bench import (
    METHODS,
    SPLITS,
    PeopleBenchArguments,
    plot,
    run_people_benchmark,
    tables,
)

RESULTS = Path(__file__).parent / "results"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--tiny", action="store_true", help="a tiny random Llama and 8 people: seconds")
    size.add_argument("--tofu-sized", action="store_true", help="200 people × 13 facts, TOFU's size (GPU)")
    p.add_argument("--splits", nargs="+", default=None, metavar="SPLIT",
                   help=f"forgetNN (NN a percentage of the people) or correct; default: {' '.join(SPLITS)}")
    p.add_argument("--methods", nargs="+", default=None, choices=list(METHODS), metavar="METHOD",
                   help=f"default: all of {' '.join(METHODS)}")
    p.add_argument("--shards", nargs="+", type=int, default=None, metavar="S",
                   help="sharded adapters of S shards by person (finetune_sharded / unlearn_sharded, routed), next to "
                        "the single adapter's --methods (default then: original retrain); writes results.json, "
                        "table.md")
    p.add_argument("--work", default=None, metavar="DIR",
                   help="keep the fine-tuned θs (with --shards: and sharded folders) here, reused by a rerun (not "
                        "with the path methods or cli-defaults: they need the recorded fine-tune)")
    p.add_argument("--n-people", type=int, default=None, help="people trained on (default 30)")
    p.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs (default 8)")
    p.add_argument("--lr", type=float, default=None, help="fine-tuning learning rate (default 2e-3)")
    p.add_argument("--lora-targets", default=None, metavar="NAMES",
                   help="comma-separated LoRA target modules (default: every linear layer of a Llama block)")
    p.add_argument("--out", default=None, help="output folder (new); default bench/results/people-<size>-<time>")
    p.add_argument("--tables-from", default=None, metavar="DIR",
                   help="only rewrite DIR/tables.md and DIR/forget_quality.png from DIR/results.json")
    p.add_argument("--check-general", action="store_true",
                   help="only score the general-knowledge probes on the base model (no adapter) and print its answers")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def check_general() -> int:
    """The embedded base model's greedy answers to the general probes: it must know them before any fine-tune."""
    from llmeraser.models import load_base_model
    from llmeraser.task import CausalLMTask
    from llmeraser_experiments import forgetting as fg
    from llmeraser_experiments.people import general_probes

    model, tokenizer = load_base_model("default")
    probes = general_probes()
    scores = fg.score_questions(model, CausalLMTask(tokenizer), probes)
    for q in probes:
        said = q.extra["value"].lower() in scores[q.id]["answer"].lower()
        print(f"{'✓' if said else '✗'} {q.prompt.splitlines()[0][10:]:50s} {scores[q.id]['answer']}")
    summary = fg.summarise(scores, [q.id for q in probes])
    said = sum(q.extra["value"].lower() in scores[q.id]["answer"].lower() for q in probes)
    print(f"facts said {said}/{len(probes)}, ROUGE-L recall {summary['rouge']:.3f}, "
          f"option-normalised probability {summary['p_options']:.3f}, truth ratio {summary['truth_ratio']:.3f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    if a.check_general:
        return check_general()
    if a.tables_from:
        folder = Path(a.tables_from)
        rows = json.loads((folder / "results.json").read_text())["rows"]
        (folder / "tables.md").write_text(tables(rows))
        plot(rows, folder)
        print(tables(rows))
        return 0
    kind = "tiny" if a.tiny else "tofu" if a.tofu_sized else "default"
    if a.tiny:
        torch.set_num_threads(1)
    overrides = {k: v for k, v in {"splits": tuple(a.splits) if a.splits else None,
                                   "methods": tuple(a.methods) if a.methods else
                                   ("original", "retrain") if a.shards else None, "n_people": a.n_people,
                                   "epochs": a.epochs, "lr": a.lr}.items() if v is not None}
    if a.lora_targets:
        overrides["lora"] = LoraSettings(targets=tuple(a.lora_targets.split(","))).to_peft()
    if a.quiet:
        overrides["progress"] = False
    try:
        make = PeopleBenchArguments.tiny if a.tiny else PeopleBenchArguments.tofu_sized if a.tofu_sized \
            else PeopleBenchArguments
        args = make(**overrides)
        out = Path(a.out or RESULTS / f"people-{kind}-{time.strftime('%Y%m%d-%H%M%S')}")
        if a.shards:
            from llmeraser_experiments.sharded_bench import run_sharded_people_benchmark

            result = run_sharded_people_benchmark(args, a.shards, out, work=a.work)
        else:
            result = run_people_benchmark(args, out, work=a.work)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    table = "table.md" if a.shards else "tables.md"
    print((out / table).read_text())
    print(f"{len(result['rows'])} rows in {result['seconds']:.0f} s -> {out}/results.json, {table}"
          + ("" if a.shards else ", forget_quality.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
