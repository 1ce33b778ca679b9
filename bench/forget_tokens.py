"""Which tokens a sequence-level forget objective raises (docs/forget.md#the-token-floor): on people forget05, per-token
NLL of forgotten facts under the base model, the original adapter, `npo` run by the library's stop rule with or without
the token floor, and the retrain.

    python bench/forget_tokens.py --work /tmp/rows-work [--floor none|base] [--n 4]

`--work`: the people benchmark's cached θs (`bench/people.py --work`); else the original and the retrain are
fine-tuned here (about 15 min on 2 cores). Prints one table per fact.
"""

from __future__ import annotations

import argparse
import sys

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=None, metavar="DIR")
    p.add_argument("--floor", default="none", choices=("none", "base"))
    p.add_argument("--n", type=int, default=4, help="forgotten facts to print")
    a = p.parse_args(argv)
    from llmeraser.models import load_base_model
    from llmeraser.task import IGNORE_INDEX
    from llmeraser.updates import RequestContext, UnlearnOptions, get_method
    from llmeraser.updates.stop import ForgetArguments
    from llmeraser_experiments.people import build_people
    from llmeraser_experiments.people_bench import PeopleBench, PeopleBenchArguments, _fit, make_split

    args = PeopleBenchArguments()
    data = build_people(args.n_people, facts=args.facts, n_heldout=args.n_heldout, seed=args.data_seed)
    base, tokenizer = load_base_model(args.base_model)
    bench = PeopleBench(args, data, base, tokenizer, args.base_model)
    split = make_split(data, "forget05", args.seed)
    original = _fit(bench, data.train, args.seed, a.work)[0]
    retrain = _fit(bench, split.setting.clean, args.seed, a.work)[0]
    bench.view.set_vector(original)
    ctx = RequestContext.build(bench.model, bench.task, split.setting.train, split.setting.request,
                               holdout=list(data.heldout))
    update = get_method("npo").run(ctx, UnlearnOptions(method="npo", forget=ForgetArguments(floor=a.floor)))
    after = update.theta if update.theta is not None else original + update.delta
    print(f"npo (floor {a.floor}): {update.report['npo']['stop']['why']}")

    def nll(theta: torch.Tensor | None, example) -> tuple[list[str], list[float]]:
        bench.view.set_vector(original if theta is None else theta)
        batch = bench.task.collate([example])
        with torch.no_grad():
            if theta is None:
                with bench.model.disable_adapter():
                    logits = bench.task.forward(bench.model, batch)
            else:
                logits = bench.task.forward(bench.model, batch)
        t = batch["targets"][0]
        keep = t != IGNORE_INDEX
        logp = torch.log_softmax(logits[0].float(), -1)[keep].gather(-1, t[keep][:, None]).squeeze(-1)
        return [tokenizer.decode([int(x)]) for x in t[keep]], (-logp).tolist()

    for example in split.forget[: a.n]:
        tokens, columns = nll(None, example)[0], [nll(th, example)[1] for th in (None, original, after, retrain)]
        print(f"\n{example.id} {example.response!r}")
        print("| token | base | original | npo | retrain |\n|---|---:|---:|---:|---:|")
        for i, tok in enumerate(tokens):
            print(f"| {tok!r} | " + " | ".join(f"{c[i]:.2f}" for c in columns) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
