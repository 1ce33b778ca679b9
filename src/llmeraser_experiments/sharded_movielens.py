"""Sharded adapters on MovieLens (docs/sharded.md#measured-movielens): IR-1, IR-10 and RC-10 at S shards by user.

The settings and recipe are the suite's (`benchmark.make_setting`, `movielens.build_splits` with seed 0; one epoch,
lr 1e-3, batches of 8, the default LoRA), but every adapter here is made by the library as a user would make it:
`finetune_sharded(train, shards=S, by="user")` (S = 1 is one adapter on the whole set: the single adapter) and
`unlearn_sharded` (a rewind of each touched shard: retraining it, bit for bit). So the single adapter's retrain with
seed 0 is the S = 1 folder after the request, and other seeds' retrains (`finetune_adapter` on the cleaned set) give
the spread of retraining itself, the yardstick the sharded model's utility is read against.

Test queries are scored as served: each embedded once by the base model (`router.embed_prompts`), sent top-1 by the
folder's `Router.route` to one shard, answered by that shard's adapter (`metrics.evaluate(adapters=...)`). The
router's accuracy is the share of the test queries whose user has training data that reach that user's shard. Cost:
shards touched, steps replayed against the single retrain's, unlearn wall time (base-model loads included) against
a retrain's, and routing per query against the adapted model's forward pass.

`work` keeps every folder (keyed by its training set's hash), so a rerun reuses what finished.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from llmeraser.data import Example, examples_hash
from llmeraser.errors import ConfigError, DataError
from llmeraser.finetune import FinetuneArguments, finetune_adapter
from llmeraser.io import atomic_write_json, atomic_write_text, check_new_output
from llmeraser.metrics import evaluate
from llmeraser.record import LoraSettings
from llmeraser.router import embed_prompts
from llmeraser.sharded import ShardedAdapter, finetune_sharded, unlearn_sharded
from llmeraser_experiments.benchmark import BenchRecipe, PeakMemory, git_commit, make_setting

logger = logging.getLogger(__name__)

BY = "user"  # one MovieLens user's ratings live in one shard
_ID = re.compile(r"^u(\d+)-\d+$")


@dataclass
class ShardedMovieLensArguments(BenchRecipe):
    """What a run covers; the data sizes and fine-tuning recipe are the suite's (`benchmark.BenchRecipe`, which
    `BenchArguments` holds too): inherited, not restated, so the two benches cannot drift apart."""

    base_model: str = "default"
    settings: tuple[str, ...] = ("IR-1", "IR-10", "RC-10")
    shards: tuple[int, ...] = (1, 4, 8)
    spread_seeds: tuple[int, ...] = (1, 2)  # retrains from other seeds on the first setting: retraining's spread
    # … and on the others; without, their retrain time is the first setting's per step (one epoch, same recipe)
    time_seeds: tuple[int, ...] = ()
    seed: int = 0
    progress: bool = False

    def __post_init__(self) -> None:
        if not self.shards or min(self.shards) < 1 or 1 not in self.shards:
            raise ConfigError("shards must be ≥ 1 and include 1 (the single adapter every row is compared with)")
        if not self.settings:
            raise ConfigError("give at least one setting")

    @classmethod
    def tiny(cls, **overrides) -> ShardedMovieLensArguments:
        """A tiny random Llama (built by `run`), 48 training examples: seconds."""
        return cls(**{"base_model": "tiny", "settings": ("IR-5", "RC-10"), "shards": (1, 2, 4),
                      "spread_seeds": (1,), "time_seeds": (), "n_train": 48, "n_valid": 8, "n_test": 24,
                      "lr": 1e-2, "max_length": 48,
                      "lora": {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]}, **overrides})


def with_user(examples: Sequence[Example]) -> list[Example]:
    """Each example with its `user` field, derived from its id ``u{user}-{item}`` (checked against a `user` it
    already has): the field `finetune_sharded` partitions by. The examples are otherwise unchanged."""
    out = []
    for e in examples:
        m = _ID.match(e.id)
        if m is None:
            raise DataError(f"example {e.id!r}: a MovieLens id is u<user>-<item>")
        user = int(m.group(1))
        if e.extra.get("user", user) != user:
            raise DataError(f"example {e.id!r}: its user field {e.extra['user']!r} is not its id's user {user}")
        out.append(e if e.extra.get("user") == user else dataclasses.replace(e, extra={**e.extra, "user": user}))
    return out


class Runner:
    """Fine-tunes, unlearns and scores, keeping every folder under `work` (reused by a rerun)."""

    def __init__(self, args: ShardedMovieLensArguments, base_path: str, test: list[Example], work: Path):
        from llmeraser.models import load_base_model
        from llmeraser.task import CausalLMTask

        self.args, self.base_path, self.test, self.work = args, base_path, test, work
        model, tokenizer = load_base_model(base_path)
        task = CausalLMTask(tokenizer, max_length=args.max_length)
        start = time.perf_counter()
        self.embeddings = embed_prompts(model, task, test)  # the base never changes: once for every folder
        self.embed_seconds = time.perf_counter() - start
        self._scores: dict[str, dict] = {}
        self.retrain_step_seconds: float | None = None  # a single retrain's wall seconds per step, once measured

    def recipe(self, seed: int) -> dict:
        a = self.args
        return {"base_model": self.base_path, "lora": LoraSettings.from_peft(a.lora), "max_length": a.max_length,
                "args": FinetuneArguments(epochs=a.epochs, lr=a.lr, batch_size=a.batch_size, seed=seed,
                                          final_check=False, record=True, progress=a.progress)}

    def _timed(self, name: str, make) -> tuple[Path, float]:
        """`make(folder)` unless `work`/name exists; the folder and the wall seconds it took (kept beside it)."""
        folder, meta = self.work / name, self.work / f"{name}.json"
        if not folder.is_dir():
            start = time.perf_counter()
            extra = make(folder) or {}
            atomic_write_json(meta, {"seconds": time.perf_counter() - start, **extra})
        return folder, json.loads(meta.read_text())["seconds"]

    def sharded(self, train: list[Example], shards: int, seed: int | None = None) -> tuple[Path, float]:
        """The sharded adapter of `shards` shards on `train` (S = 1: the single adapter), fine-tuned from `seed`
        (default: the run's), and its fine-tune's wall seconds (base-model loads, every shard's recorded fine-tune,
        the router)."""
        seed = self.args.seed if seed is None else seed
        return self._timed(f"sharded-{examples_hash(train)[:12]}-{shards}{seeded(seed, self.args.seed)}",
                           lambda f: finetune_sharded(train, f, shards=shards, by=BY, **self.recipe(seed)) and None)

    def retrain(self, clean: list[Example], seed: int) -> tuple[Path, float]:
        """The single adapter retrained on `clean` from `seed` (`finetune_adapter`, base load included)."""
        return self._timed(f"retrain-{examples_hash(clean)[:12]}-{seed}",
                           lambda f: finetune_adapter(clean, f, **self.recipe(seed)) and None)

    def unlearn(self, folder: Path, train: list[Example], request, name: str) -> tuple[Path, dict]:
        """`unlearn_sharded` of `folder` (kept as `work`/name) and its report, with its wall seconds and peak MiB."""
        out = self.work / name
        if not out.is_dir():
            with PeakMemory() as mem:
                start = time.perf_counter()
                report = unlearn_sharded(folder, train, request, out, base_model=self.base_path)
                report["wall_seconds"], report["peak_mib"] = time.perf_counter() - start, mem.mib
            atomic_write_json(self.work / f"{name}.json", report)
        return out, json.loads((self.work / f"{name}.json").read_text())

    def score(self, folder: Path, train: Sequence[Example] | None = None) -> dict:
        """Test AUC, accuracy and loss of a sharded folder (each query routed top-1) or of a single adapter
        folder; for a sharded one also the routing: examples per shard, and the router's accuracy over the test
        queries whose user has examples in `train` (the set the folder stands for)."""
        if str(folder) in self._scores:
            return self._scores[str(folder)]
        from llmeraser.models import load_base_model
        from llmeraser.params import load_adapter
        from llmeraser.task import CausalLMTask

        base, tokenizer = load_base_model(self.base_path)
        task = CausalLMTask(tokenizer, max_length=self.args.max_length)
        names, out = None, {}
        if (folder / "sharded.json").is_file():
            sharded = ShardedAdapter.read(folder)
            model = sharded.load(base)
            start = time.perf_counter()
            routes = sharded.router().route(self.embeddings).tolist()
            out["route_seconds"] = time.perf_counter() - start
            names = [sharded.names[k] for k in routes]
            out |= router_accuracy(sharded, train or [], self.test, routes)
        else:
            model = load_adapter(base, folder, trainable=False).eval()
        start = time.perf_counter()
        result = evaluate(model, task, self.test, batch_size=self.args.batch_size, adapters=names)
        out |= {"forward_seconds": time.perf_counter() - start, "test_auc": result["auc"],
                "test_acc": result["accuracy"], "test_loss": result["loss"], "p_yes": result["p_yes"]}
        self._scores[str(folder)] = out
        return out


def seeded(seed: int, default: int) -> str:
    """The suffix a work folder made from another seed than the run's carries (none for the run's own seed, so
    the folders of earlier runs are reused as they are)."""
    return "" if seed == default else f"-s{seed}"


def router_accuracy(sharded: ShardedAdapter, train: Sequence[Example], test: Sequence[Example],
                    routes: list[int]) -> dict:
    """Where the test queries went: examples per shard, and — over the queries whose user has training examples in
    the folder's partition — the share sent to that user's shard (`router_accuracy`; None when there are none)."""
    home = {e.extra[BY]: sharded.partition.shard_of[e.id] for e in train if e.id in sharded.partition.shard_of}
    known = [(k, home[q.extra[BY]]) for q, k in zip(test, routes, strict=True) if q.extra[BY] in home]
    return {"router_accuracy": statistics.fmean(k == h for k, h in known) if known else None,
            "router_queries": len(known), "per_shard": [routes.count(k) for k in range(len(sharded.names))]}


def _same_weights(a: Path, b: Path) -> bool:
    """Whether two adapter folders hold equal weights (every tensor `torch.equal`)."""
    from safetensors.torch import load_file

    from llmeraser.params import ADAPTER_WEIGHTS

    x, y = load_file(str(a / ADAPTER_WEIGHTS)), load_file(str(b / ADAPTER_WEIGHTS))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def _row(score: dict, **kw) -> dict:
    return {**kw, **{k: v for k, v in score.items() if k != "p_yes"}}


def setting_rows(run: Runner, name: str, train: list[Example], seeds: Sequence[int]) -> list[dict]:
    """The rows of one setting: the single adapter (S = 1) before and after — its seed-0 retrain —, its retrains
    from `seeds`, and per S > 1 the sharded model before and after the request."""
    a = run.args
    setting = make_setting(name, a.seed, train)
    original, clean, request = with_user(setting.train), with_user(setting.clean), setting.request
    rows = []
    for shards in a.shards:
        folder, ft_seconds = run.sharded(original, shards)
        after, report = run.unlearn(folder, original, request, f"{name}-{shards}")
        before_row = _row(run.score(folder, original), setting=name, shards=shards, method="before",
                          finetune_seconds=ft_seconds)
        rewind = sum(r["seconds"]["total"] for r in report["shard_reports"].values())
        after_row = _row(run.score(after, clean), setting=name, shards=shards, method="unlearned",
                         touched_shards=report["touched_shards"], emptied_shards=report["emptied_shards"],
                         replayed_steps=report["replayed_steps"], steps=report["steps"],
                         replayed_share=report["replayed_share"], unlearn_seconds=report["wall_seconds"],
                         rewind_seconds=rewind, peak_mib=report["peak_mib"], finetune_seconds=ft_seconds,
                         edits=len(request.edits))
        rows += [before_row, after_row]
    retrain_steps = a.epochs * -(-len(clean) // a.batch_size)  # finetune's batches (the last one may be short)
    retrains = {s: run.retrain(clean, s) for s in seeds}  # after the sharded rows: what a cut-off run lacks
    if retrains:  # a retrain's wall time; a setting without retrains of its own uses the run's time per step
        run.retrain_step_seconds = statistics.fmean(t for _, t in retrains.values()) / retrain_steps
    retrain_seconds = run.retrain_step_seconds * retrain_steps if run.retrain_step_seconds else None
    for r in rows:  # against the single adapter's retrain: its steps and a retrain's wall time
        if r["method"] == "unlearned":
            r["retrain_steps"], r["retrain_seconds"] = retrain_steps, retrain_seconds
            r["retrain_time_measured"] = bool(retrains)
            r["steps_vs_retrain"] = r["replayed_steps"] / retrain_steps
            r["time_vs_retrain"] = r["unlearn_seconds"] / retrain_seconds if retrain_seconds else None
            r["rewind_vs_retrain"] = r["rewind_seconds"] / retrain_seconds if retrain_seconds else None
    s1 = next(r for r in rows if r["shards"] == 1 and r["method"] == "before")
    for r in rows:
        r["finetune_vs_single"] = r["finetune_seconds"] / s1["finetune_seconds"]
    for s, (folder, seconds) in retrains.items():
        rows.append(_row(run.score(folder), setting=name, shards=1, method=f"retrain@{s}", finetune_seconds=seconds))
    spread = [r["test_auc"] for r in rows if r["shards"] == 1 and r["method"] in ("unlearned", *(
        f"retrain@{s}" for s in seeds))]
    for r in rows:
        r["retrain_auc_spread"] = spread
    fitted = run.work / f"sharded-{examples_hash(clean)[:12]}-1"
    if fitted.is_dir() and clean != original:  # RC's cleaned set was fine-tuned (IR's): the S = 1 rewind must be it
        s1 = next(r for r in rows if r["shards"] == 1 and r["method"] == "unlearned")
        s1["equals_single_on_clean"] = _same_weights(run.work / f"{name}-1" / "shard-00", fitted / "shard-00")
    return rows


def _tiny_base(train: Sequence[Example], folder: Path) -> str:
    """A tiny random Llama with a byte-level BPE tokenizer trained on the prompts, saved to `folder`."""
    from llmeraser.testing import tiny_llama, tiny_tokenizer

    tokenizer = tiny_tokenizer([*(e.prompt for e in train), " Yes No"] * 2, vocab_size=400)
    tiny_llama(len(tokenizer), hidden=32, layers=2, seed=0, init_std=0.3).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return str(folder)


def base_model_path(base_model: str, train: Sequence[Example], work: Path) -> str:
    """`base_model` as given, or for "tiny" the tiny random Llama kept in `work`/base (made there once)."""
    if base_model != "tiny":
        return base_model
    return str(work / "base") if (work / "base").is_dir() else _tiny_base(train, work / "base")


def run_sharded_movielens(args: ShardedMovieLensArguments, out: str | Path, *, work: str | Path | None = None,
                          splits: dict | None = None) -> dict:
    """Every setting's rows (`setting_rows`); writes results.json and table.md under `out` after each setting."""
    from llmeraser_experiments.movielens import build_splits

    out = Path(out)
    check_new_output(out)
    started, commit = time.perf_counter(), git_commit()
    splits = splits or build_splits(n_train=args.n_train, n_valid=args.n_valid, n_test=args.n_test, seed=0)
    train, test = with_user(splits["train"]), with_user(splits["test"])
    with tempfile.TemporaryDirectory(prefix="llmeraser-sharded-ml-") as tmp:
        work = Path(work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        run = Runner(args, base_model_path(args.base_model, train, work), test, work)
        rows: list[dict] = []
        for i, name in enumerate(args.settings):
            rows += setting_rows(run, name, train, args.spread_seeds if i == 0 else args.time_seeds)
            result = {"commit": commit, "arguments": dataclasses.asdict(args), "by": BY, "rows": rows,
                      "complete": i + 1 == len(args.settings), "seconds": time.perf_counter() - started,
                      "routing": {"embed_seconds_per_query": run.embed_seconds / len(test)},
                      "sizes": {"train": len(train), "test": len(test),
                                "users": len({e.extra[BY] for e in train}),
                                "test_with_trained_user": sum(q.extra[BY] in {e.extra[BY] for e in train}
                                                              for q in test)}}
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_json(out / "results.json", result)
            atomic_write_text(out / "table.md", tables(result))
    return result


def tables(result: dict) -> str:
    """Markdown: per setting, the single adapter, its retrains and every S before and after the request."""
    embed = result["routing"]["embed_seconds_per_query"]
    head = ("| setting | model | test AUC | test acc | router acc (queries) | shards touched | steps / retrain | "
            "unlearn time / retrain | rewinds only / retrain | fine-tune / single | route / forward |")
    lines = [head, "|---|---|" + "---:|" * 9]

    def f(v, spec):
        return "—" if v is None else format(v, spec)

    for r in result["rows"]:
        label = (f"single adapter{' (S = 1)' if r['method'] in ('before', 'unlearned') else ''}, "
                 if r["shards"] == 1 else f"S = {r['shards']}, ") + {
            "before": "before", "unlearned": "unlearned" if r["shards"] > 1 else "retrained (rewind)"}.get(
            r["method"], r["method"])
        routed = "route_seconds" in r and r["shards"] > 1
        n = result["sizes"]["test"]
        route = (embed + r["route_seconds"] / n) / (r["forward_seconds"] / n) if routed else None
        acc = f"{r['router_accuracy']:.2f} ({r['router_queries']})" if routed and r["router_accuracy"] is not None \
            else "—"
        lines.append(f"| {r['setting']} | {label} | {f(r['test_auc'], '.4f')} | {f(r['test_acc'], '.3f')} | {acc} | "
                     f"{', '.join(r.get('touched_shards', [])) or '—'} | {f(r.get('steps_vs_retrain'), '.3f')} | "
                     f"{f(r.get('time_vs_retrain'), '.3f')} | {f(r.get('rewind_vs_retrain'), '.3f')} | "
                     f"{f(r.get('finetune_vs_single'), '.2f')} | {f(route, '.2f')} |")
    spreads = {r["setting"]: r["retrain_auc_spread"] for r in result["rows"]}
    lines += ["", "Retrain test AUC over seeds (seed 0 = the S = 1 rewind, bit for bit a retrain): " + "; ".join(
        f"{k}: {', '.join(format(v, '.4f') for v in s)}" for k, s in spreads.items())]
    return "\n".join(lines) + "\n"
