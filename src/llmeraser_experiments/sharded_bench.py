"""Sharded adapters on the fictitious-people benchmark (docs/sharded.md#measured-the-people-benchmark).

For each S: fine-tune a sharded adapter (`llmeraser.sharded.finetune_sharded`) on the people benchmark's training
set with the single adapter's recipe (epochs, learning rate, batch size, seed, LoRA layout), partitioned by person
(the `person` field: one person's facts in one shard); for each split apply the request with `unlearn_sharded`
(a rewind of each touched shard: exactly retraining it); score the sharded model before and after as a user would
serve it — each question embedded by the base model (`router.embed_prompts`), sent to one shard by the folder's
`Router.route`, answered by that shard's adapter — with `people_bench.summarise_split`: the same measures as every
other method, forget quality against the *single* adapter's retrain. Also: the router's accuracy (the share of
questions sent to the shard holding their person), where questions about no trained person go, the fine-tune's
and the unlearning's time against the single adapter's, and what routing costs per query against a forward pass.

A shard's adapter is scored by loading its weights into the bench's one peft model (`shard_thetas`: the same
numbers `PeftModel.from_pretrained(base, folder, subfolder=name)` holds — tested), so every answer goes through the
bench's memoised scoring. `work` (optional) keeps the fine-tuned θs and sharded folders, so a rerun reuses them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch

from llmeraser.data import Example, examples_hash
from llmeraser.errors import AdapterError, ConfigError, RequestError
from llmeraser.finetune import FinetuneArguments
from llmeraser.io import atomic_write_json, atomic_write_text, check_new_output
from llmeraser.params import ADAPTER_WEIGHTS
from llmeraser.record import LoraSettings
from llmeraser.router import Router, embed_prompts
from llmeraser.sharded import ShardedAdapter, finetune_sharded, unlearn_sharded
from llmeraser_experiments import forgetting as fg
from llmeraser_experiments.benchmark import PeakMemory, git_commit
from llmeraser_experiments.people import ATTRIBUTES, PeopleData, build_people
from llmeraser_experiments.people_bench import (
    PeopleBench,
    PeopleBenchArguments,
    Split,
    make_split,
    retain_questions,
    run_methods,
    summarise_split,
    tables,
    tiny_base,
)

logger = logging.getLogger(__name__)

BY = "person"  # the record field naming the data subject: one person, one shard


def shard_thetas(bench: PeopleBench, folder: Path, names: Sequence[str]) -> list[torch.Tensor | None]:
    """Each shard adapter's weights as a θ of the bench's peft model (same LoRA layout), read from its safetensors
    with peft's own loader; the bench's θ is left as it was."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    saved, out = bench.view.vector(), []
    device = next(bench.model.parameters()).device
    for name in names:
        if not (folder / name).is_dir():  # emptied by the request: no adapter, and the router sends nothing there
            out.append(None)
            continue
        result = set_peft_model_state_dict(bench.model, load_file(str(folder / name / ADAPTER_WEIGHTS),
                                                                  device=str(device)))
        if result.unexpected_keys:
            raise AdapterError(f"{folder / name}: weights the bench's adapter does not have: "
                               f"{result.unexpected_keys[:3]}")
        out.append(bench.view.vector())
    bench.view.set_vector(saved)
    return out


def unseen_questions(data: PeopleData) -> list[Example]:
    """One question per trained person about an attribute they were not trained on (the first such): a new query
    about a known subject — what the router must send to that person's shard. The trained questions themselves are
    in the router's data (each its own nearest prompt), so their accuracy says little."""
    out = []
    for i, person in enumerate(data.people):
        have = {e.extra["attribute"] for e in data.questions_of([person])}
        attr = next((a for a in ATTRIBUTES if a.name not in have), None)
        if attr is not None:
            out.append(Example(id=f"unseen-{i:03d}", prompt=f"Question: {attr.question.format(name=person)}\nAnswer:",
                               response=" -", extra={"person": person}))
    return out


class Embeddings:
    """The base model's prompt embedding of every question, computed once (the base never changes)."""

    def __init__(self, bench: PeopleBench):
        self.bench, self._rows = bench, {}

    def __call__(self, questions: Sequence[Example]) -> torch.Tensor:
        todo = [q for q in questions if q.id not in self._rows]
        if todo:
            self._rows.update(zip((q.id for q in todo), embed_prompts(self.bench.model, self.bench.task, todo),
                                  strict=True))
        return torch.stack([self._rows[q.id] for q in questions])


def routed_scores(bench: PeopleBench, router: Router, thetas: list[torch.Tensor], embed: Embeddings,
                  questions: Sequence[Example], *, generate: bool = True) -> tuple[dict[str, dict], dict[str, int]]:
    """(per-question scores, per-question shard): each question answered by the adapter of the shard it is routed to
    (grouped by shard: one adapter load per shard)."""
    shards = router.route(embed(questions)).tolist()
    groups: dict[int, list[Example]] = {}
    for q, k in zip(questions, shards, strict=True):
        groups.setdefault(k, []).append(q)
    scores = {}
    for k, group in sorted(groups.items()):
        scores.update(bench.scores(thetas[k], group, generate=generate))
    return scores, {q.id: k for q, k in zip(questions, shards, strict=True)}


def measure_sharded(bench: PeopleBench, split: Split, folder: Path, shard_of: dict[str, int], embed: Embeddings,
                    retain: list[Example], unseen: list[Example]) -> dict:
    """`summarise_split`'s measures of the sharded model in `folder`, and its router's accuracy: per group of
    questions, the share sent to the shard that holds (or held, for removed people: `shard_of` is the partition
    before the request) their person."""
    sharded = ShardedAdapter.read(folder)
    router, thetas = sharded.router(), shard_thetas(bench, folder, sharded.names)
    data = bench.data
    home = {e.extra["person"]: shard_of[e.id] for e in data.train}
    s, route = routed_scores(bench, router, thetas, embed, [*split.forget, *retain, *data.general, *split.corrected])
    held, held_route = routed_scores(bench, router, thetas, embed, data.heldout, generate=False)
    out = summarise_split(bench, split, {**s, **held}, retain)
    _, unseen_route = routed_scores(bench, router, thetas, embed, unseen, generate=False)
    forgotten = {e.extra["person"] for e in split.forget}

    def accuracy(routes: dict[str, int], questions: Sequence[Example]) -> float | None:
        return statistics.fmean(routes[q.id] == home[q.extra["person"]] for q in questions) if questions else None

    def spread(routes: dict[str, int], questions: Sequence[Example]) -> dict:
        counts = Counter(routes[q.id] for q in questions)
        return {"top_share": max(counts.values()) / len(questions), "shards_used": len(counts)}

    out["router"] = {
        "forget": accuracy(route, split.forget), "retain": accuracy(route, retain),
        "unseen_kept": accuracy(unseen_route, [q for q in unseen if q.extra["person"] not in forgotten]),
        "unseen_forgotten": accuracy(unseen_route, [q for q in unseen if q.extra["person"] in forgotten]),
        "heldout": spread(held_route, data.heldout), "general": spread(route, data.general)}
    out["shards"] = len(sharded.names)
    return out


def routing_cost(bench: PeopleBench, folder: Path, questions: Sequence[Example]) -> dict:
    """Seconds per query of embedding and routing (`embed_prompts` + `Router.route`, batches of 16) against one
    teacher-forced forward pass of the adapted model over the question and its answer (same batches), measured
    back to back in one run: a ratio, not a promise about other machines."""
    router = ShardedAdapter.read(folder).router()
    start = time.perf_counter()
    router.route(embed_prompts(bench.model, bench.task, questions))
    routed = time.perf_counter() - start
    start = time.perf_counter()
    fg.token_logprobs(bench.model, bench.task, questions)
    forward = time.perf_counter() - start
    n = len(questions)
    return {"route_s_per_query": routed / n, "forward_s_per_query": forward / n, "route_vs_forward": routed / forward,
            "queries": n}


def cached_fit(bench: PeopleBench, train: list[Example], seed: int, work: Path) -> tuple[torch.Tensor, float, float]:
    """`bench.fit`, kept under `work` (θ, seconds, MiB) so a rerun of a long benchmark reuses it."""
    from safetensors.torch import load_file, save_file

    path = work / f"theta-{examples_hash(train)[:16]}-{seed}.safetensors"
    key = (examples_hash(train), seed)
    if key not in bench._finetuned and path.is_file():
        meta = json.loads(path.with_suffix(".json").read_text())
        bench._finetuned[key] = (load_file(str(path))["theta"], meta["seconds"], meta["mib"])
    theta, seconds, mib = bench.fit(train, seed)
    if not path.is_file():
        save_file({"theta": theta.cpu().contiguous()}, str(path))
        atomic_write_json(path.with_suffix(".json"), {"seconds": seconds, "mib": mib})
    return theta, seconds, mib


def sharded_finetune(bench: PeopleBench, shards: int, work: Path) -> tuple[Path, float]:
    """The sharded adapter of `shards` shards on the training set (reused from `work` if there), and the fine-tune's
    wall seconds (base model loads, every shard's fine-tune and recording, the router)."""
    folder, a = work / f"sharded-{shards}", bench.args
    if not folder.is_dir():
        start = time.perf_counter()
        finetune_sharded(bench.data.train, folder, shards=shards, by=BY, base_model=bench.base_path,
                         lora=LoraSettings.from_peft(a.lora), max_length=a.max_length,
                         args=FinetuneArguments(epochs=a.epochs, lr=a.lr, batch_size=a.batch_size, seed=a.seed,
                                                final_check=False, record=True))
        atomic_write_json(work / f"sharded-{shards}.json", {"seconds": time.perf_counter() - start})
    return folder, json.loads((work / f"sharded-{shards}.json").read_text())["seconds"]


def _ratio(a: float, b: float) -> float | None:
    """a / b, None where b is 0 (a tiny random model's utility can be: a harmonic mean with a zero in it)."""
    return a / b if b else None


def sharded_rows(bench: PeopleBench, split: Split, shards: int, work: Path, embed: Embeddings,
                 retain: list[Example], unseen: list[Example], finetune_seconds: float, original: dict) -> list[dict]:
    """Two rows: the sharded model before the request and after `unlearn_sharded`."""
    folder, ft_seconds = sharded_finetune(bench, shards, work)
    shard_of = ShardedAdapter.read(folder).partition.shard_of
    before = {"split": split.setting.name, "method": f"sharded S={shards} before", "total": 0.0, "time_ratio": 0.0,
              "finetune_seconds": ft_seconds, "finetune_ratio": ft_seconds / finetune_seconds,
              **measure_sharded(bench, split, folder, shard_of, embed, retain, unseen)}
    before["utility_vs_single"] = _ratio(before["model_utility"], original["model_utility"])
    after_dir = work / f"sharded-{shards}-{split.setting.name}"
    if not after_dir.is_dir():
        try:
            with PeakMemory() as mem:
                start = time.perf_counter()
                report = unlearn_sharded(folder, bench.data.train, split.setting.request, after_dir,
                                         base_model=bench.base_path)
                report["wall_seconds"], report["peak_mib"] = time.perf_counter() - start, mem.mib
        except RequestError as e:  # a request unlearn_sharded refuses: a result of this S, not a crash
            logger.warning("%s S=%d: %s", split.setting.name, shards, e)
            return [before, {"split": split.setting.name, "method": f"sharded S={shards}", "failed": str(e)}]
        atomic_write_json(work / f"{after_dir.name}.json", report)
    report = json.loads((work / f"{after_dir.name}.json").read_text())
    rewind = sum(r["seconds"]["total"] for r in report["shard_reports"].values())
    after = {"split": split.setting.name, "method": f"sharded S={shards}", "total": report["wall_seconds"],
             "time_ratio": report["wall_seconds"] / split.retrain_seconds,
             "rewind_ratio": rewind / split.retrain_seconds, "peak_mib": report["peak_mib"],
             "touched_shards": report["touched_shards"], "emptied_shards": report.get("emptied_shards", []),
             "replayed_share": report["replayed_share"],
             "finetune_seconds": ft_seconds, "finetune_ratio": ft_seconds / finetune_seconds,
             **measure_sharded(bench, split, after_dir, shard_of, embed, retain, unseen)}
    after["cost"] = routing_cost(bench, after_dir, [*split.forget, *retain, *bench.data.general, *bench.data.heldout])
    return [before, after]


# ------------------------------------------------------------------------------------------------------- run
def run_sharded_people_benchmark(args: PeopleBenchArguments, shards: Sequence[int], out: str | Path, *,
                                 work: str | Path | None = None) -> dict:
    """The single adapter's rows (`args.methods`: original, retrain, …) and two rows per S of `shards` per split;
    writes results.json and table.md under `out` after every S."""
    if not {"original", "retrain"} <= set(args.methods):
        raise ConfigError("the sharded rows are compared with the single adapter: methods must include original and "
                          "retrain")
    out = Path(out)
    check_new_output(out)
    started, commit = time.perf_counter(), git_commit()
    data = build_people(args.n_people, facts=args.facts, n_heldout=args.n_heldout, seed=args.data_seed)
    with tempfile.TemporaryDirectory(prefix="llmeraser-sharded-") as tmp:
        work = Path(work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.base_model == "tiny":
            base, tokenizer, base_path = tiny_base(data, work / "base")
        else:
            from llmeraser.models import load_base_model

            (base, tokenizer), base_path = load_base_model(args.base_model), args.base_model
        bench = PeopleBench(args, data, base, tokenizer, base_path)
        theta, seconds, _ = cached_fit(bench, data.train, args.seed, work)
        retain, unseen, embed = retain_questions(data, args.retain_people), unseen_questions(data), Embeddings(bench)
        rows: list[dict] = []
        for name in args.splits:
            split = make_split(data, name, args.seed)
            split.theta = theta
            split.theta_retrain, split.retrain_seconds, split.retrain_mib = cached_fit(
                bench, split.setting.clean, args.seed, work)
            single = run_methods(bench, split, args.methods, {}, work, retain)
            rows += single
            by = {r["method"]: r for r in single}
            for k in shards:
                pair = sharded_rows(bench, split, k, work, embed, retain, unseen, seconds, by["original"])
                for r in (r for r in pair if "failed" not in r):
                    r["utility_vs_retrain"] = _ratio(r["model_utility"], by["retrain"]["model_utility"])
                rows += pair
                result = {"commit": commit, "arguments": dataclasses.asdict(args), "shards": list(shards),
                          "by": BY, "rows": rows, "seconds": time.perf_counter() - started,
                          "finetune_seconds": seconds, "n_params": bench.view.dim,
                          "sizes": {"train": len(data.train), "heldout": len(data.heldout),
                                    "general": len(data.general), "retain_scored": len(retain),
                                    "unseen": len(unseen), "people": len(data.people)},
                          "forget_people": {n: data.forget_people(float(n[6:])) for n in args.splits
                                            if n != "correct"}}
                out.mkdir(parents=True, exist_ok=True)
                atomic_write_json(out / "results.json", result)
                atomic_write_text(out / "table.md", sharded_tables(rows))
    return result


SHARDED_COLUMNS = (("touched_shards", "touched", None), ("replayed_share", "replayed share", ".3f"),
                   ("time_ratio", "unlearn time/retrain", ".3f"), ("rewind_ratio", "rewinds only/retrain", ".3f"),
                   ("finetune_ratio", "fine-tune time/single", ".2f"), ("utility_vs_retrain", "utility/retrain", ".3f"),
                   ("utility_vs_single", "utility/single", ".3f"), ("router.retain", "router: retain", ".2f"),
                   ("router.forget", "router: forget", ".2f"), ("router.unseen_kept", "router: new questions", ".2f"),
                   ("router.unseen_forgotten", "router: new q. forgotten", ".2f"),
                   ("router.heldout.top_share", "held-out: top shard", ".2f"),
                   ("router.general.top_share", "general: top shard", ".2f"),
                   ("cost.route_s_per_query", "route s/query", ".4f"),
                   ("cost.route_vs_forward", "route/forward", ".2f"))


def sharded_tables(rows: list[dict]) -> str:
    """The benchmark's table (the same columns as every method), then the sharded rows' own columns."""
    from llmeraser_experiments.people_bench import _get

    lines = ["| method | " + " | ".join(h for _, h, _ in SHARDED_COLUMNS) + " |",
             "|---|" + "---:|" * len(SHARDED_COLUMNS)]
    for r in rows:
        if not r["method"].startswith("sharded"):
            continue
        values = [(_get(r, k), f) for k, _, f in SHARDED_COLUMNS]
        cells = ["—" if v is None else ", ".join(v) if isinstance(v, list) else format(v, f) for v, f in values]
        lines.append(f"| {r['split']} {r['method']}{' (failed)' if 'failed' in r else ''} | " + " | ".join(cells)
                     + " |")
    return tables(rows) + "\n### sharded adapters\n\n" + "\n".join(lines) + "\n"
