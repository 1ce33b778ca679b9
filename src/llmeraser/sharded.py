"""Sharded adapters (SISA, Bourtoule et al. 2021; one PEFT adapter per shard as in APA, Hu et al. 2024): the training
set is partitioned by data subject (`shards.Partition`), one adapter is fine-tuned and recorded on each shard with
the same recipe, and a request retrains only the shards it touches — each by an exact rewind of its own recording —
so the result is, bit for bit, retraining those shards on the edited data, at the share of the whole run they replay.

A sharded adapter is one folder:

    sharded.json      the manifest: format, shard names, each shard adapter's weights hash, the router's hash, the
                      training set's hash
    partition.json    which shard each example id is in (`shards.Partition`)
    router.safetensors  the base model's embedding of every training prompt, with its shard (`router.Router`)
    shard-00/ …       one llmeraser adapter each (PEFT weights, report.json, trajectory.safetensors): loadable with
                      `PeftModel.from_pretrained(base, folder, subfolder="shard-00")`

Every write goes to a temporary folder renamed into place; the input folder is never touched.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from llmeraser.data import Example, examples_hash
from llmeraser.errors import AdapterError, RequestError
from llmeraser.evidence import check_holdout, report_entry
from llmeraser.io import atomic_dir, atomic_write_json, sha256_file
from llmeraser.params import SHARDED_MANIFEST, adapter_hash
from llmeraser.record import earlier_request_hint
from llmeraser.recording import recorded_steps
from llmeraser.request import Request, apply_request, merge_requests, resolve
from llmeraser.router import ROUTER, Router, embed_prompts
from llmeraser.schema import read_json
from llmeraser.shards import Partition

logger = logging.getLogger(__name__)

MANIFEST, PARTITION = SHARDED_MANIFEST, "partition.json"
FORMAT = 1


def shard_names(shards: int) -> list[str]:
    """shard-00, shard-01, … (zero-padded to the widest index, so they sort in shard order)."""
    width = max(2, len(str(shards - 1)))
    return [f"shard-{k:0{width}d}" for k in range(shards)]


def is_sharded(folder: str | os.PathLike) -> bool:
    """Whether `folder` holds a sharded adapter (its manifest)."""
    return (Path(folder) / MANIFEST).is_file()


@dataclass
class ShardedAdapter:
    """A sharded adapter folder, read and checked: the manifest, the partition and every shard's weights hash."""

    folder: Path
    names: list[str]
    partition: Partition
    train_sha256: str
    manifest: dict

    @classmethod
    def read(cls, folder: str | os.PathLike) -> ShardedAdapter:
        """Read and check the folder: a manifest whose shards match the partition and the folders, and each shard's
        weights as the manifest recorded them (a shard edited by hand is refused)."""
        folder = Path(folder)
        where = str(folder / MANIFEST)
        m = read_json(folder / MANIFEST, AdapterError)
        if not isinstance(m, dict) or m.get("format") != FORMAT or m.get("kind") != "sharded":
            raise AdapterError(f"{where}: not a sharded adapter manifest of format {FORMAT}")
        names, hashes = m.get("names"), m.get("adapter_sha256")
        if not isinstance(names, list) or not names or names != shard_names(len(names)):
            raise AdapterError(f"{where}: 'names' must list the shard folders shard-00 … in order")
        if not isinstance(hashes, dict) or set(hashes) != set(names):
            raise AdapterError(f"{where}: 'adapter_sha256' must give a hash for every shard")
        partition = Partition.from_json(read_json(folder / PARTITION, AdapterError), str(folder / PARTITION))
        if partition.shards != len(names):
            raise AdapterError(f"{folder}: the partition has {partition.shards} shards, the manifest {len(names)}")
        empty = partition.empty()
        for k, name in enumerate(names):
            if k in empty:  # every example of it was removed: retraining on nothing leaves no adapter
                if hashes[name] is not None or (folder / name).exists():
                    raise AdapterError(f"{folder}: shard {name!r} holds no example in the partition but the manifest "
                                       f"or the folder still has an adapter for it")
                continue
            if not (folder / name).is_dir():
                raise AdapterError(f"{folder}: shard folder {name!r} is missing")
            if adapter_hash(folder / name) != hashes[name]:
                raise AdapterError(f"{folder / name}: the weights are not the ones the manifest recorded (the shard "
                                   f"was changed after it was written)")
        if not isinstance(m.get("train_sha256"), str):
            raise AdapterError(f"{where}: 'train_sha256' is missing")
        if not (folder / ROUTER).is_file() or sha256_file(folder / ROUTER) != m.get("router_sha256"):
            raise AdapterError(f"{folder / ROUTER}: missing, or not the router the manifest recorded")
        return cls(folder, names, partition, m["train_sha256"], m)

    def router(self) -> Router:
        """The router, checked against the partition (one row per partitioned example, in its shard)."""
        router = Router.load(self.folder)
        if router.n_shards != self.partition.shards or set(router.ids) != set(self.partition.shard_of) or any(
                self.partition.shard_of[i] != int(s) for i, s in zip(router.ids, router.shards.tolist(),
                                                                       strict=True)):
            raise AdapterError(f"{self.folder / ROUTER}: its rows do not match the partition's examples and shards")
        return router

    def shard_dir(self, k: int) -> Path:
        return self.folder / self.names[k]

    @property
    def live(self) -> list[int]:
        """The shards that hold an adapter (not emptied by a request), in order."""
        empty = self.partition.empty()
        return [k for k in range(len(self.names)) if k not in empty]

    def load(self, base: torch.nn.Module, *, prefix: str = ""):
        """`base` with every shard's adapter loaded frozen, side by side under the shard names, each after `prefix`
        (peft's named adapters; `set_adapter(name)` picks one). A `base` that is already a peft model (another
        folder's shards, under another prefix) takes these beside its own: one base model serves both folders."""
        from peft import PeftModel

        from llmeraser.params import check_adapter_dir, load_adapter

        model, rest = base, self.live
        if not isinstance(base, PeftModel):
            first, *rest = rest
            model = load_adapter(base, self.shard_dir(first), trainable=False, adapter_name=prefix + self.names[first])
        for k in rest:
            model.load_adapter(str(check_adapter_dir(self.shard_dir(k))), adapter_name=prefix + self.names[k],
                               is_trainable=False)
        return model.eval()

    def route(self, model: torch.nn.Module, task, examples: Sequence[Example]) -> list[str]:
        """The shard name that answers each example: its router's top-1 on the base model's prompt embedding."""
        return [self.names[k] for k in self.router().route(embed_prompts(model, task, examples)).tolist()]

    def load_train(self, path: str | os.PathLike, fields=None) -> list[Example]:
        """The training set at `path`, read with `fields` (default: the record fields it was fine-tuned with)."""
        from llmeraser.data import DataFields, load_examples

        return load_examples(path, fields or DataFields.from_dict(self.manifest.get("data_fields")))

    def check_train(self, train: Sequence[Example]) -> None:
        """Refuse a training set other than the one this folder stands for (naming the request it came from)."""
        given = examples_hash(train)
        if not (hint := earlier_request_hint(self.folder, given)):  # "" for the set it stands for: not its input
            self.partition.check(train)
        if given != self.train_sha256:
            hint = hint or ": pass that set, with earlier requests applied"
            raise RequestError(f"the training set (sha256 {given[:12]}…) is not the one {self.folder} stands for "
                               f"(sha256 {self.train_sha256[:12]}…){hint}")


class ShardPlan:
    """Sharded training under your own `Trainer` / `SFTTrainer`: the partition, the records of each shard, and where
    each shard's adapter goes; `assemble` turns the trained shards into a sharded folder (router included) and puts it
    in place, so the folder appears only when complete.

        plan = ShardPlan(dataset, "adapters/sharded", shards=4, by="user")  # a path, a datasets Dataset, or records
        for name in plan.names:
            trainer = SFTTrainer(model=..., args=SFTConfig(output_dir=plan.folder(name), ...),
                                 train_dataset=dataset.select(plan.indices(name)), peft_config=...,
                                 callbacks=[LLMEraserCallback(plan.records(name))])
            trainer.train(); trainer.save_model(plan.folder(name))
        plan.assemble(base_model="path/to/base")

    Shards are trained into `OUT.training/` (its `partition.json` is written first); `assemble` checks every shard
    (a PEFT adapter, recorded by the callback, trained on exactly its part) and renames the folder to OUT.
    """

    def __init__(self, train, out: str | os.PathLike, *, shards: int, by: str | None = None, fields=None):
        from llmeraser.callback import _examples
        from llmeraser.data import DataFields
        from llmeraser.io import check_new_output

        self.fields = fields or DataFields()
        self._rows = self._records_of(train, self.fields)
        self.examples = _examples(self._rows, self.fields)
        self.partition = Partition.build(self.examples, shards, by)
        self.names = shard_names(shards)
        self.out = Path(out)
        check_new_output(self.out)
        self.staging = self.out.with_name(self.out.name + ".training")
        self.staging.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.staging / PARTITION, self.partition.to_json())

    @staticmethod
    def _records_of(train, fields) -> list:
        from llmeraser.data import load_examples

        if isinstance(train, str | os.PathLike):
            return [e.to_dict(fields) for e in load_examples(train, fields)]
        return train.to_list() if hasattr(train, "to_list") else list(train)

    def indices(self, name: str) -> list[int]:
        """The positions, in the data given, of shard `name`'s examples (for `dataset.select`)."""
        k = self.names.index(name)
        return [i for i, e in enumerate(self.examples) if self.partition.shard(e.id) == k]

    def records(self, name: str) -> list:
        """Shard `name`'s records as given (for `Dataset.from_list` and the callback)."""
        return [self._rows[i] for i in self.indices(name)]

    def folder(self, name: str) -> str:
        """Where shard `name`'s trainer saves (`output_dir` and `save_model`)."""
        return str(self.staging / name)

    def assemble(self, *, base_model: str = "default", dtype: str = "float32", device: str = "auto") -> ShardedAdapter:
        """Check every trained shard, build the router on the base model, write the manifest and rename the folder
        into place. Raises AdapterError naming a shard that is missing, unrecorded or trained on other data."""
        from llmeraser.params import check_adapter_dir
        from llmeraser.record import TrainingRecord

        for name in self.names:
            shard = check_adapter_dir(self.staging / name)
            record = TrainingRecord.read(shard)
            members = [self.examples[i] for i in self.indices(name)]
            if record.train_sha256 != examples_hash(members):
                raise AdapterError(f"{shard} was not trained on exactly its part of the data (its record's training "
                                   f"set differs); train it on plan.records({name!r})")
            _steps(shard)  # recorded: a shard must be rewound
        first = TrainingRecord.read(self.staging / self.names[0])
        model, task = _base_and_task(base_model, dtype, device, first.length, first.rendering)
        router = Router.build(model, task, self.examples, self.partition.shard_of, len(self.names))
        _write_index(self.staging, self.names, self.partition, self.examples, router,
                     {"data_fields": self.fields.to_dict(), "trained_by": "your trainer with LLMEraserCallback"})
        os.rename(self.staging, self.out)
        return ShardedAdapter.read(self.out)


def _write_index(tmp: Path, names: list[str], partition: Partition, train: Sequence[Example], router: Router,
                 extra: dict) -> None:
    """The router, the partition and the manifest, beside the finished shard folders inside `tmp`."""
    router.save(tmp)
    atomic_write_json(tmp / PARTITION, partition.to_json())
    atomic_write_json(tmp / MANIFEST, {
        "format": FORMAT, "kind": "sharded", "shards": len(names), "by": partition.by, "names": names,
        "sizes": partition.sizes(), "train_sha256": examples_hash(train), "n_train": len(train),
        "adapter_sha256": {name: adapter_hash(tmp / name) if (tmp / name).is_dir() else None for name in names},
        "router_sha256": sha256_file(tmp / ROUTER), **extra})


def _base_and_task(base_model: str, dtype: str, device: str, max_length: int, rendering=None):
    """The base model (no adapter) and the task that renders prompts as the shards were trained: the router's."""
    from llmeraser.models import load_base_model
    from llmeraser.task import CausalLMTask

    model, tokenizer = load_base_model(base_model, dtype=dtype, device=device)
    return model, CausalLMTask(tokenizer, max_length=max_length, rendering=rendering)


def finetune_sharded(train: Sequence[Example], out: str | os.PathLike, *, shards: int, by: str | None = None,
                     **finetune: object) -> ShardedAdapter:
    """Partition `train` into `shards` by data subject (`by`: a record field; None: each example its own) and
    fine-tune one recorded adapter per shard with `finetune_adapter`'s recipe (`finetune`: its keyword arguments,
    the same for every shard), written as one sharded folder `out`."""
    from llmeraser.finetune import finetune_adapter
    from llmeraser.record import DEFAULT_MAX_LENGTH

    partition = Partition.build(train, shards, by)
    names = shard_names(shards)
    fields = finetune.get("fields")
    start = time.perf_counter()
    with atomic_dir(out) as tmp:
        for k, name in enumerate(names):
            members = partition.members(k, train)
            logger.info("shard %d of %d: %d examples", k + 1, shards, len(members))
            finetune_adapter(members, tmp / name, **finetune)
        model, task = _base_and_task(*(finetune.get(k, d) for k, d in (
            ("base_model", "default"), ("dtype", "float32"), ("device", "auto"), ("max_length", DEFAULT_MAX_LENGTH))))
        router = Router.build(model, task, train, partition.shard_of, shards)
        _write_index(tmp, names, partition, train, router, {"seconds": time.perf_counter() - start,
                                                    "data_fields": fields.to_dict() if fields else None})
    return ShardedAdapter.read(out)


def unlearn_sharded(folder: str | os.PathLike, train: Sequence[Example], request: Request | Sequence[Request],
                    out: str | os.PathLike, *, ledger: str | os.PathLike | None = None,
                    holdout: Sequence[Example] | None = None, **job: object) -> dict:
    """Apply `request` — or several, in order, batched into one replay (`request.merge_requests`) — to the sharded
    adapter `folder` (fine-tuned on `train`): rewind each shard the requests touch, once, on its edited members, copy
    the others, and write the new sharded folder `out` standing for the edited set. `job`: `AdapterJob`'s keyword
    arguments (base model, dtype, device, progress).

    With `ledger` the requests are on record as for a single adapter (`ledger.Ledger`: one row each, applied as one
    update; the lineage's head, applied requests a no-op, a cut-off run recovered, `ledger verify` over every file),
    and `train` is the lineage's ORIGINAL set, the applied requests replayed on it. With `holdout`, the report's
    `evidence` is the membership test of the edited examples against it, as the folder serves them (each example
    scored by the shard its router picks), before and after (`evidence.report_entry`).

    Returns the report (also written as `out`/report.json, the requests as `out`/requests.json): status (applied;
    done or recovered with a ledger, with its message), the touched shards, each shard's rewind report, and the
    share of all shards' steps replayed."""
    from llmeraser.ledger import Ledger, as_requests, preamble

    requests = as_requests(request)
    holdout = None if holdout is None else list(holdout)
    job = job | {"holdout": holdout}
    if ledger is None:
        return _unlearn_shards(folder, train, requests, out, job)
    book = Ledger(ledger)
    try:
        decision = preamble(book, folder, train, requests, out)
        if "done" in decision:
            return {"status": decision["status"], "out": decision["out"], "message": decision["done"]}
        for earlier in decision["applied"]:  # the set the lineage's head stands for
            train = apply_request(train, Request.from_dict(earlier))
        _merged(requests, train, holdout)  # a bad holdout is refused before anything is recorded
        batch = book.begin(requests, train, folder, out)
        try:
            report = _unlearn_shards(folder, train, requests, out, job, lambda tmp: book.stage(batch, tmp))
            seqs = [e.seq for e in book.finish(batch, report)]
        except BaseException as e:
            book.fail(batch, e)
            raise
        return report | {"seqs": seqs}
    finally:
        book.close()


def _unlearn_shards(folder, train: Sequence[Example], requests: list[Request], out, job: dict,
                    before_rename=None) -> dict:
    """`unlearn_sharded`'s work, after the ledger's say: check, rewind the touched shards, write `out`."""
    from llmeraser.job import AdapterJob
    from llmeraser.updates import UnlearnOptions

    sharded = ShardedAdapter.read(folder)
    sharded.check_train(train)
    partition = sharded.partition
    # unknown ids, duplicates: the requests' own errors, before any work
    holdout = job.pop("holdout", None)
    request, members = _merged(requests, train, holdout)
    touched = sorted({partition.shard(e.id) for e in request.edits})
    new_train = apply_request(train, request)
    emptied = {k for k in touched if not partition.members(k, new_train)}
    if not new_train:
        raise RequestError("the request removes every example of every shard: nothing would be left to answer")
    start = time.perf_counter()
    steps = {k: _steps(sharded.shard_dir(k)) for k in sharded.live}  # every shard recorded, up front
    reports, replayed = {}, 0
    with atomic_dir(out, protect=(folder,), before_rename=before_rename) as tmp:
        for k, name in enumerate(sharded.names):
            if k in emptied or k not in steps:  # retraining on nothing leaves no adapter (nor router row); no step
                continue
            if k not in touched:
                shutil.copytree(sharded.shard_dir(k), tmp / name)
                continue
            sub = Request([e for e in request.edits if partition.shard(e.id) == k])
            result = AdapterJob(sharded.shard_dir(k), partition.members(k, train), **job).unlearn(
                sub, tmp / name, UnlearnOptions(method="rewind"))
            reports[name] = result.report
            replayed += result.report["rewind"]["replayed_steps"]
        kept = {e.id for e in new_train}
        new_partition = Partition(partition.shards, partition.by,
                                  {i: s for i, s in partition.shard_of.items() if i in kept})
        report = {"status": "applied", "kind": "sharded-unlearn", "method": "rewind", "request": request.to_dict(),
                  "requests_sha256": [r.hash for r in requests],
                  "touched_shards": [sharded.names[k] for k in touched], "shards": len(sharded.names),
                  "emptied_shards": [sharded.names[k] for k in sorted(emptied)],
                  "replayed_steps": replayed, "steps": sum(steps.values()),
                  "replayed_share": replayed / max(1, sum(steps.values())),
                  "seconds": time.perf_counter() - start, "input": str(folder),
                  "input_train_sha256": sharded.train_sha256, "shard_reports": reports}
        _write_index(tmp, sharded.names, new_partition, new_train, _router_after(sharded, request, new_train, job), {
            "data_fields": sharded.manifest.get("data_fields"),
            "lineage": {"from": sharded.manifest["adapter_sha256"], "request_sha256": request.hash,
                        "requests_sha256": [r.hash for r in requests]}})
        # before and after on one base-model load, once the rewinds are done (`folder` is protected: still the input)
        tests = (None, None) if holdout is None else membership([folder, tmp], members, holdout, job)
        report["evidence"] = report_entry(*tests, holdout)
        atomic_write_json(tmp / "report.json", report)
        atomic_write_json(tmp / "requests.json", [r.to_dict() for r in requests])
    return report


def _merged(requests: list[Request], train: Sequence[Example], holdout) -> tuple[Request, list[Example]]:
    """The requests as one (`merge_requests`), the edited examples as they were, and the holdout checked for them."""
    request = merge_requests(requests, train) if len(requests) > 1 else requests[0]
    members = [old for old, _ in resolve(request, train)]
    if holdout is not None:
        check_holdout(holdout, train=train, members=members)
    return request, members


def membership(folders: Sequence[str | os.PathLike], members: Sequence[Example], holdout: Sequence[Example],
               job: dict) -> list:
    """`evidence.membership_test` of `members` against `holdout` as each sharded folder in `folders` serves them (a
    request's before and after, or `verify`'s one): each example scored by the shard its router picks (after a removal
    the router holds no row of the removed examples: they go where the nearest remaining prompt is). One base-model
    load for all: every folder's shards side by side (peft names prefixed by the folder's place), each group embedded
    once (routing reads the base alone), only the picked shard active when an example is scored, so each test is
    exactly its folder's alone. The folders share one recipe: the first one's recording says how prompts are rendered.
    `job`: base_model, dtype, device; verify's k, batch_size, alpha, calibrated (default: the evidence's own)."""
    from llmeraser.evidence import ALPHA, MIN_K, Scores, membership_scores, membership_test, references
    from llmeraser.record import TrainingRecord

    folders = [ShardedAdapter.read(f) for f in folders]
    record = TrainingRecord.read(folders[0].shard_dir(folders[0].live[0]))
    model, task = _base_and_task(job.get("base_model", "default"), job.get("dtype", "float32"),
                                 job.get("device", "auto"), record.length, record.rendering)
    for v, sharded in enumerate(folders):
        model = sharded.load(model, prefix=f"v{v}-")
    groups = [(group, embed_prompts(model, task, group)) for group in (members, holdout)]
    k, size = job.get("k", MIN_K), job.get("batch_size", 8)  # verify's options (a request's evidence: the defaults)
    tests, reference = [], references(model, task, members, holdout, k=k, batch_size=size) if job.get(
        "calibrated", True) else None  # the base model's: every shard disabled
    for v, sharded in enumerate(folders):
        router, scores = sharded.router(), []
        for group, vectors in groups:
            names, by_id = [f"v{v}-{sharded.names[r]}" for r in router.route(vectors).tolist()], {}
            for name in dict.fromkeys(names):
                model.set_adapter(name)
                s = membership_scores(model, task, [e for e, n in zip(group, names, strict=True) if n == name],
                                      k=k, batch_size=size)
                by_id |= {i: (loss, mink) for i, loss, mink in zip(s.ids, s.loss, s.min_k_pp, strict=True)}
            scores.append(Scores(tuple(e.id for e in group), *(tuple(by_id[e.id][j] for e in group) for j in (0, 1)),
                                 k=k))
        tests.append(membership_test(*scores, reference=reference, alpha=job.get("alpha", ALPHA)))
    return tests


def _router_after(sharded: ShardedAdapter, request: Request, new_train: Sequence[Example], job: dict) -> Router:
    """The router without the removed examples' rows, with the edited prompts' rows recomputed (a corrected response
    leaves its prompt's row as it was)."""
    from llmeraser.record import TrainingRecord

    kept = {e.id for e in new_train}
    router = sharded.router().without({e.id for e in request.edits if e.id not in kept})
    asked = [e.id for e in request.edits if e.op == "modify_query" and e.id in kept]
    if not asked:
        return router
    record = TrainingRecord.read(sharded.shard_dir(sharded.live[0]))
    model, task = _base_and_task(job.get("base_model", "default"), job.get("dtype", "float32"),
                                 job.get("device", "auto"), record.length, record.rendering)
    by_id = {e.id: e for e in new_train}
    return router.replace(asked, embed_prompts(model, task, [by_id[i] for i in asked]))


def _steps(shard: Path) -> int:
    """The recorded steps of a shard's fine-tune (its recording's header), for the replayed share."""
    steps = recorded_steps(shard)
    if steps is None:
        raise AdapterError(f"{shard} has no readable recording (trajectory.safetensors): a shard must be recorded")
    return steps
