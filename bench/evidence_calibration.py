"""Why the membership test is calibrated by the base model
(docs/evidence.md#calibration-each-example-against-itself-under-the-base-model): on the people benchmark,
the forgotten people against the held-out ones under models that saw neither group (the base model, the retrain
without the forgotten people) and under the original adapter, raw and calibrated; and pairs of held-out people
against the others, which no model here saw.

    python bench/evidence_calibration.py --work /tmp/rows-work --out bench/results/evidence-calibration

`--work`: the people benchmark's folder of fine-tuned θs (`bench/people.py --work`), reused (else fine-tunes the
original and the retrain: about 15 min on 2 cores). Writes OUT/results.json and prints the table.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

from llmeraser.evidence import membership_scores, membership_test
from llmeraser.io import atomic_write_json, check_new_output


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--split", default="forget05")
    p.add_argument("--work", default=None, metavar="DIR", help="the people benchmark's cached θs")
    p.add_argument("--out", required=True, help="output folder (new)")
    a = p.parse_args(argv)
    from llmeraser.models import load_base_model
    from llmeraser_experiments.people import build_people
    from llmeraser_experiments.people_bench import PeopleBench, PeopleBenchArguments, _fit, make_split

    check_new_output(Path(a.out))
    args = PeopleBenchArguments()
    data = build_people(args.n_people, facts=args.facts, n_heldout=args.n_heldout, seed=args.data_seed)
    base, tokenizer = load_base_model(args.base_model)
    bench = PeopleBench(args, data, base, tokenizer, args.base_model)
    split = make_split(data, a.split, args.seed)
    thetas = {"original": _fit(bench, data.train, args.seed, a.work)[0],
              "retrain": _fit(bench, split.setting.clean, args.seed, a.work)[0]}

    def test(name: str, members, holdout) -> dict:
        bench.view.set_vector(thetas["retrain" if name == "base" else name])
        if name == "base":
            with bench.model.disable_adapter():
                scores = [membership_scores(bench.model, bench.task, s) for s in (members, holdout)]
            return {"raw": {t.score: t.auc for t in membership_test(*scores).tests}}
        scores = [membership_scores(bench.model, bench.task, s) for s in (members, holdout)]
        with bench.model.disable_adapter():
            ref = tuple(membership_scores(bench.model, bench.task, s) for s in (members, holdout))
        t = membership_test(*scores, reference=ref)
        return {"raw": t.raw_auc, "calibrated": {s.score: s.auc for s in t.tests}, "verdict": t.verdict}

    people: dict[str, list] = {}
    for e in data.heldout:
        people.setdefault(e.extra["person"], []).append(e)
    rows = [{"members": f"{a.split} ({len(split.forget)} facts)", "holdout": f"held-out people ({len(data.heldout)})",
             **{m: test(m, split.forget, data.heldout) for m in ("base", "retrain", "original")}}]
    names = sorted(people)
    for pair in itertools.combinations(names, 2):
        if names[0] not in pair:  # the complements give the same comparison mirrored
            continue
        members = [e for n in pair for e in people[n]]
        others = [e for n in names if n not in pair for e in people[n]]
        rows.append({"members": " + ".join(pair), "holdout": "the other held-out people",
                     **{m: test(m, members, others) for m in ("base", "retrain", "original")}})
    out = Path(a.out)
    out.mkdir(parents=True)
    atomic_write_json(out / "results.json", {"split": a.split, "rows": rows})
    print("| members | holdout | base raw loss | retrain raw loss | retrain calibrated loss | retrain calibrated "
          "min-k%++ | original raw loss | original calibrated loss |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['members']} | {r['holdout']} | {r['base']['raw']['loss']:.3f} | {r['retrain']['raw']['loss']:.3f}"
              f" | {r['retrain']['calibrated']['loss']:.3f} | {r['retrain']['calibrated']['min_k_pp']:.3f} | "
              f"{r['original']['raw']['loss']:.3f} | {r['original']['calibrated']['loss']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
