"""`llmeraser verify`: do examples look more familiar to a model than a holdout it never saw? (`evidence`)"""

from __future__ import annotations

import argparse
import os

from llmeraser.cli.common import FMT, add_common, add_data_flags, fields

EPILOG = """\
verdicts (MUSE's PrivLeak sense; the examples against the holdout, by two per-example scores: the response loss and
min-k%++):
  looks like the holdout            the test cannot tell the examples from examples the model never saw: what a
                                    good erasure leaves (and what any model shows on examples it was never trained on)
  more familiar than the holdout    the model still recognises the examples: not forgotten (or never unlearned)
  less familiar than the holdout    the examples now look stranger than unseen ones: over-forgotten, a trace of its
                                    own that erasure happened
  scores are calibrated: each is the example's score minus its score under the base model alone (the adapter
  disabled), i.e. what the fine-tune did to it (Watson et al. 2022); --uncalibrated tests the raw scores.
  AUC: the chance that an example looks more familiar than a holdout example (0.5 indistinguishable). The verdict is
  the Mann-Whitney test of AUC = 0.5 at alpha/2 per score (exact when small); the interval is DeLong's; KS p is the
  two-sample Kolmogorov-Smirnov p-value of the two score distributions (TOFU's forget-quality statistic).

the holdout: examples of the same kind and format as the training data (text or chat, the same record shape), from
the same source, that the adapter never saw (ids and contents are checked against --train). How many: the test can
say anything only when m examples perfectly separated from n holdout examples would be significant, 2/C(m+n, m) <
alpha/2: 1 example needs 80, 2 need 12, 3 need 6, 5 need 4, 10 need 3 (fewer: exit 2, saying how many). To tell
|AUC - 0.5| >= 0.15: 20 examples and 281 holdout, or 50 and 31; >= 0.1: 50 and 263, or 100 and 73 (the table says
what the test can see at your sizes). A membership test shows what a model's scores reveal, not what its weights
hold: docs/evidence.md.

examples:
  llmeraser verify --adapter adapters/unlearned --request request.json --train data/train.jsonl \\
      --holdout data/holdout.jsonl --json evidence.json
  llmeraser verify --adapter adapters/original --data forget.jsonl --holdout data/holdout.jsonl
exit codes: 0 the test ran (whatever its verdict), 2 bad input (a holdout in another format, holdout ids in the
training set, a holdout too small), 1 internal failure."""


class _Format(argparse.RawDescriptionHelpFormatter, FMT):
    """The description and the epilog as written (a table of verdicts), each flag's default shown once."""


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("verify", formatter_class=_Format,
                       help="membership test: do examples look more familiar to an adapter than a holdout?",
                       description="Evidence that examples were forgotten (or not): score the examples and a holdout\n"
                                   "under the model (the response loss and min-k%++ of each), then test whether the\n"
                                   "examples look more familiar, less familiar, or like the holdout. Prints the\n"
                                   "table; --json writes it with every example's scores.",
                       epilog=EPILOG)
    add_common(p)
    p.add_argument("--adapter", default=None,
                   help="PEFT adapter folder (default: the base model alone), or a sharded adapter: each example "
                        "scored by the shard its router picks, as the folder serves it (docs/sharded.md#unlearn)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--data", help="the examples to test (the formats of --train)")
    which.add_argument("--request", help="test the examples a request edits, as they are in --train (the old "
                                         "versions: what should be forgotten)")
    p.add_argument("--holdout", required=True, help="examples the adapter never saw, of the training data's format")
    p.add_argument("--train", default=None, help="the training set: the holdout's ids and contents are checked "
                                                 "against it; needed with --request")
    add_data_flags(p)
    p.add_argument("--max-length", type=int, default=None, help="tokens per example (default: the adapter's)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per forward pass")
    p.add_argument("--k", type=float, default=0.2, help="the fraction of lowest token scores min-k%%++ averages")
    p.add_argument("--alpha", type=float, default=0.05, help="the test's level (split over the two scores)")
    p.add_argument("--uncalibrated", action="store_true",
                   help="test the raw scores, not each example's change from the base model's score (calibration "
                        "takes out how hard an example is in itself: without it, unseen examples of different "
                        "difficulty can look more or less familiar than the holdout)")
    p.add_argument("--json", default=None, metavar="OUT", help="write the test and every example's scores here")
    p.set_defaults(func=run)
    return p


def _check_json(args: argparse.Namespace) -> None:
    """--json is a new file beside the inputs, never one of them (checked before any work: nothing is written on bad
    input)."""
    from llmeraser.errors import UserInputError

    out = os.path.abspath(args.json)
    for given in (args.adapter, args.data, args.request, args.holdout, args.train):
        if given and (out == os.path.abspath(given) or out.startswith(os.path.abspath(given) + os.sep)):
            raise UserInputError(f"--json {args.json!r} would overwrite or lie inside the input {given!r}")
    if os.path.exists(out):
        raise UserInputError(f"--json {args.json!r} already exists; choose another path (outputs never overwrite)")
    if not os.path.isdir(os.path.dirname(out)) or not os.access(os.path.dirname(out), os.W_OK):
        raise UserInputError(f"--json {args.json!r}: its folder does not exist or cannot be written")


def _examples(args: argparse.Namespace, data_fields):
    """(the examples to test, the holdout, the training set or None), loaded and checked."""
    from llmeraser.data import load_examples
    from llmeraser.errors import ConfigError
    from llmeraser.evidence import check_holdout
    from llmeraser.request import load_request, resolve

    train = load_examples(args.train, data_fields) if args.train else None
    if args.request:
        if train is None:
            raise ConfigError("--request takes the edited examples from the training set: give --train")
        members = [old for old, _ in resolve(load_request(args.request), train)]
    else:
        members = load_examples(args.data, data_fields)
    holdout = load_examples(args.holdout, data_fields)
    check_holdout(holdout, train=train, members=members, alpha=args.alpha)
    return members, holdout


def run(args: argparse.Namespace) -> int:
    from llmeraser.data import DataFields
    from llmeraser.errors import ConfigError
    from llmeraser.evidence import membership_scores, membership_test, references
    from llmeraser.io import atomic_write_json
    from llmeraser.models import load_base_model
    from llmeraser.params import check_adapter_dir, load_adapter
    from llmeraser.record import DEFAULT_MAX_LENGTH, TrainingRecord
    from llmeraser.sharded import is_sharded
    from llmeraser.task import CausalLMTask

    if not 0 < args.alpha < 1 or not 0 < args.k <= 1 or args.batch_size < 1:
        raise ConfigError(f"--alpha must be in (0, 1), --k in (0, 1], --batch-size ≥ 1; got {args.alpha}, {args.k}, "
                          f"{args.batch_size}")
    if args.json:
        _check_json(args)
    record = TrainingRecord(max_length=DEFAULT_MAX_LENGTH if args.max_length is None else args.max_length)
    if args.adapter and is_sharded(args.adapter):
        return _run_sharded(args)
    if args.adapter:
        check_adapter_dir(args.adapter)
        record = TrainingRecord.read(args.adapter, max_length=args.max_length)
    members, holdout = _examples(args, fields(args) or DataFields.from_dict(record.data_fields))
    base, tokenizer = load_base_model(args.base_model, dtype=args.dtype, device=args.device)
    model = load_adapter(base, args.adapter, trainable=False) if args.adapter else base
    task = CausalLMTask(tokenizer, max_length=record.length, rendering=record.rendering)
    scores = [membership_scores(model, task, s, k=args.k, batch_size=args.batch_size) for s in (members, holdout)]
    reference = None if args.uncalibrated else references(model, task, members, holdout, k=args.k,
                                                          batch_size=args.batch_size)
    test = membership_test(*scores, alpha=args.alpha, reference=reference)
    print(test.table())
    if args.json:
        atomic_write_json(args.json, {**test.to_dict(), "adapter": args.adapter, "holdout": args.holdout,
                                      "examples": args.data or args.request, "base_model": args.base_model,
                                      "per_example": {"examples": scores[0].to_dict(), "holdout": scores[1].to_dict()},
                                      "base_model_scores": reference and {"examples": reference[0].to_dict(),
                                                                          "holdout": reference[1].to_dict()}})
    return 0


def _run_sharded(args: argparse.Namespace) -> int:
    """A sharded adapter's test as the folder serves the examples: each scored by the shard its router picks
    (`sharded.membership`, as `unlearn --holdout` reports it; the shards' own recipe sets the length)."""
    from llmeraser.data import DataFields
    from llmeraser.errors import ConfigError
    from llmeraser.io import atomic_write_json
    from llmeraser.sharded import ShardedAdapter, membership

    if args.max_length is not None:
        raise ConfigError("--max-length: a sharded adapter is scored at its shards' recorded length")
    sharded = ShardedAdapter.read(args.adapter)
    members, holdout = _examples(args, fields(args) or DataFields.from_dict(sharded.manifest.get("data_fields")))
    job = {"base_model": args.base_model, "dtype": args.dtype, "device": args.device, "k": args.k,
           "batch_size": args.batch_size, "alpha": args.alpha, "calibrated": not args.uncalibrated}
    test = membership([args.adapter], members, holdout, job)[0]
    print(test.table())
    if args.json:
        atomic_write_json(args.json, {**test.to_dict(), "adapter": args.adapter, "holdout": args.holdout,
                                      "examples": args.data or args.request, "base_model": args.base_model,
                                      "served_by": "each example's shard, as its router picks (sharded.membership)"})
    return 0
