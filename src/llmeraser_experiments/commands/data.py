"""`llmeraser data movielens|people`: build the experiments' datasets (the `data` command's plug-in datasets)."""

from __future__ import annotations

import argparse
from pathlib import Path

from llmeraser.cli.common import FMT


def add_parser(datasets) -> None:
    """`data movielens` and `data people`, added to the `data` command's DATASET subparsers."""
    _add_movielens(datasets)
    _add_people(datasets)


def _add_movielens(datasets) -> None:
    q = datasets.add_parser("movielens", formatter_class=FMT, help="MovieLens-100k → train/valid/test JSONL",
                            description="The user's recent liked and disliked titles, then 'Will the user like X?'; "
                                        "response ' Yes' (rating ≥ 4) or ' No'. Split by time; ids 'u<user>-<item>'.",
                            epilog="example: llmeraser data movielens --out data --n-train 400")
    q.add_argument("--out", required=True, help="folder for train/valid/test.jsonl and meta.json")
    q.add_argument("--n-train", type=int, default=400, help="training examples")
    q.add_argument("--n-valid", type=int, default=100, help="validation examples")
    q.add_argument("--n-test", type=int, default=200, help="test examples")
    q.add_argument("--seed", type=int, default=0, help="sampling seed")
    q.add_argument("--folder", default=None, help="an ml-100k folder in recbole's format (default: recbole's)")
    q.set_defaults(func=run_movielens)


def _add_people(datasets) -> None:
    q = datasets.add_parser("people", formatter_class=FMT, help="fictitious people's facts → QA JSONL + requests",
                            description="A TOFU-shaped set built offline from our own word lists (docs/people.md): "
                                        "each person's facts as 'Question: …\\nAnswer:' records with paraphrased "
                                        "and perturbed answers in each record's extra keys; held-out people (never to "
                                        "be trained on); general-knowledge probes; and requests: forget01/05/10 "
                                        "(remove every fact of 1/5/10% of the people, at least one) and correct "
                                        "(one person's facts replaced). The same sizes and seed give the same bytes.",
                            epilog="example (the benchmark's fine-tune, which memorises the facts): llmeraser data "
                                   "people --out people && llmeraser finetune --train people/train.jsonl --out "
                                   "adapters/people --epochs 8 --lr 2e-3 --lora-targets q_proj,k_proj,v_proj,"
                                   "o_proj,gate_proj,up_proj,down_proj && llmeraser unlearn --adapter "
                                   "adapters/people --train people/train.jsonl --request "
                                   "people/requests/forget05.json --out adapters/people-forget05")
    q.add_argument("--out", required=True, help="folder for train/heldout/general.jsonl, requests/ and meta.json")
    q.add_argument("--n-people", type=int, default=30, help="people trained on")
    q.add_argument("--facts", type=int, default=6, help="facts per person")
    q.add_argument("--n-heldout", type=int, default=4, help="people never trained on (membership inference)")
    q.add_argument("--seed", type=int, default=0, help="seed of every draw")
    q.set_defaults(func=run_people)


def run_movielens(args: argparse.Namespace) -> int:
    from llmeraser_experiments.movielens import build_splits, default_folder, write_splits, yes_ratio

    folder = args.folder or default_folder()
    splits = build_splits(folder, n_train=args.n_train, n_valid=args.n_valid, n_test=args.n_test, seed=args.seed)
    write_splits(splits, args.out, seed=args.seed, source=folder)
    for name, examples in splits.items():
        print(f"{name:5s} {len(examples):5d} examples, {yes_ratio(examples):.0%} Yes -> {Path(args.out) / name}.jsonl")
    return 0


def run_people(args: argparse.Namespace) -> int:
    from llmeraser_experiments.people import build_people, write_people

    data = build_people(args.n_people, facts=args.facts, n_heldout=args.n_heldout, seed=args.seed)
    paths = write_people(data, args.out, seed=args.seed, sizes={"n_people": args.n_people, "facts": args.facts,
                                                                "n_heldout": args.n_heldout})
    for name, path in paths.items():
        print(f"{name:9s} -> {path}")
    return 0
