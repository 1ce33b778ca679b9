"""The fictitious-people benchmark: TOFU's forget quality and model utility for every method (docs/people.md).

One run: build the people (`llmeraser_experiments.people`), fine-tune the original adapter on every trained
person's facts until it has memorised them, then for each split — forget01/05/10 (remove every fact of 1/5/10% of
the people, at least one person; nested) and `correct` (one person's facts replaced by new values) —

1. retrain on the edited set from the same init and data order (the reference), and once more from another seed
   (`retrain@1`: how far apart two retrains are, i.e. what the measures can tell apart at this size);
2. run each method from θ̂ with the options a user gets (influence methods at their default damping, λ relative to
   the curvature's scale; `cli-defaults` is `llmeraser unlearn` with no options, through `AdapterJob`);
   the baselines (gradient ascent, NPO, fine-tuning on the corrected facts) at each learning rate of their grid,
   one row per rate — no method is tuned on the forget set or on retraining;
3. score every model with `llmeraser_experiments.forgetting`: forget quality (KS p-value of truth ratios against the
   retrain's on the forget set), answer probability, ROUGE-L recall and value recall of greedy answers, truth
   ratio on forget / retain / general; membership-inference AUCs (forget vs held-out people, by loss and by min-k%
   probability); model utility; for `correct` the same on the new facts; time against retraining and peak memory.

Writes results.json (with the git commit), tables.md and forget_quality.png (forget quality against model utility,
one point per method) under `out`, after every split so a long run keeps what it finished.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from llmeraser.data import Example
from llmeraser.eraser import EraserArguments, UnlearningProblem, factor_arguments
from llmeraser.errors import ConfigError, SolverError
from llmeraser.factors import fit_factors
from llmeraser.io import atomic_write_json, atomic_write_text
from llmeraser.record import DEFAULT_MAX_LENGTH, LoraSettings
from llmeraser.solvers.api import is_fitted, solver_arguments, solver_names
from llmeraser_experiments import forgetting as fg
from llmeraser_experiments import norecord as nr
from llmeraser_experiments.benchmark import (
    PATH,
    Bench,
    PeakMemory,
    Setting,
    _descend,
    _objective,
    git_commit,
    path_method,
    theta_key,
)
from llmeraser_experiments.people import PeopleData, build_people
from llmeraser_experiments.people_report import COLUMNS, _get, plot, tables  # noqa: F401 (this module's API)

logger = logging.getLogger(__name__)

SPLITS = ("forget01", "forget05", "forget10", "correct")
INFLUENCE = ("first-order/cg", "newton/cg", "first-order/kfac", "first-order/ekfac", "first-order/woodbury",
             "first-order/datainf", "newton/ekfac", "newton/woodbury")
BASELINES = ("gradient-ascent", "npo", "fine-tune-corrected")
METHODS = ("original", "retrain", "retrain@1", *INFLUENCE, "cli-defaults", *BASELINES, *PATH, *nr.NORECORD)
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class PeopleBenchArguments:
    """What a run covers. The defaults fit about an hour on 2 CPU cores with the embedded model (docs/people.md);
    `tofu_sized()` is TOFU's size, for a GPU; `tiny()` runs in seconds on a tiny random model (the tests)."""

    base_model: str = "default"
    n_people: int = 30
    facts: int = 6
    n_heldout: int = 4
    retain_people: int = 3  # retained people whose facts are scored (TOFU's retain set); never edited
    data_seed: int = 0
    splits: tuple[str, ...] = SPLITS
    methods: tuple[str, ...] = METHODS
    # fine-tuning (the original and every retrain): long enough to memorise. LoRA on every linear layer: on q and v
    # alone 8 epochs left a third of the facts' values unlearnt (docs/people.md#the-fine-tune)
    epochs: int = 8
    lr: float = 2e-3
    batch_size: int = 8
    max_length: int = DEFAULT_MAX_LENGTH
    lora: dict = field(default_factory=lambda: LoraSettings(targets=ALL_LINEAR).to_peft())
    seed: int = 0  # the LoRA init and data order of the original and the reference retrain; retrain@1 uses seed + 1
    # influence methods: cg on a curvature sample, fitted solvers on all training facts (fit once at θ̂)
    curvature_samples: int = 8
    max_iters: int = 20
    factor_samples: int = 0
    # baselines: `baseline_epochs` passes of Adam over the forget (or corrected) facts, one row per learning rate
    baseline_epochs: int = 5
    baseline_lrs: dict = field(default_factory=lambda: {"gradient-ascent": (1e-4, 1e-3), "npo": (1e-4, 1e-3),
                                                        "fine-tune-corrected": (1e-4, 1e-3)})
    npo_beta: float = 0.1
    refine_steps: int = 2  # refine: Newton-CG steps at most
    progress: bool = True

    def __post_init__(self) -> None:
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown:
            raise ConfigError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}")
        if "retrain" not in self.methods:
            raise ConfigError("every run needs the 'retrain' method: it is the reference of forget quality")
        for name in self.splits:
            if name != "correct" and not (name.startswith("forget") and name[6:].isdigit() and 0 < int(name[6:]) < 100):
                raise ConfigError(f"unknown split {name!r}; expected forgetNN (NN a percentage) or correct")
        largest = max([max(1, round(int(s[6:]) / 100 * self.n_people)) for s in self.splits if s != "correct"] or [0])
        if 1 + self.retain_people + largest > self.n_people:
            raise ConfigError(f"{self.n_people} people cannot hold the corrected person, {self.retain_people} retain "
                              f"people and a forget set of {largest}")

    @classmethod
    def tofu_sized(cls, **kw) -> PeopleBenchArguments:
        """TOFU's size: 200 people × 20 facts… capped at the 13 attributes there are (for a GPU: hours on a CPU)."""
        return cls(**{"n_people": 200, "facts": 13, "n_heldout": 20, "retain_people": 20, "epochs": 5, "lr": 1e-3,
                      "factor_samples": 1000, **kw})

    @classmethod
    def tiny(cls, **kw) -> PeopleBenchArguments:
        """A few people on a tiny random Llama (`run_people_benchmark(tiny=True)`): seconds, for the tests."""
        return cls(**{"base_model": "tiny", "n_people": 8, "facts": 3, "n_heldout": 3, "retain_people": 3,
                      "splits": ("forget10", "correct"), "epochs": 40, "lr": 1e-2, "max_iters": 10,
                      "lora": {"r": 1, "lora_alpha": 2, "target_modules": ["q_proj", "v_proj"]},
                      "baseline_epochs": 2, "baseline_lrs": {"gradient-ascent": (1e-2,), "npo": (1e-2,),
                                                             "fine-tune-corrected": (1e-2,)},
                      "progress": False, **kw})


def tiny_base(data: PeopleData, folder: Path) -> tuple[torch.nn.Module, object, str]:
    """A tiny random Llama with a byte-level BPE tokenizer trained on the data's text, saved to `folder` (so the
    `cli-defaults` job can load it as a base model folder)."""
    from llmeraser.testing import tiny_llama, tiny_tokenizer

    corpus = [t for e in (*data.train, *data.heldout, *data.general)
              for t in (e.prompt, e.response, e.extra["paraphrase"], *e.extra["perturbed"])]
    corpus += list(data.correction.values())
    tokenizer = tiny_tokenizer(corpus, vocab_size=400)
    model = tiny_llama(len(tokenizer), hidden=32, layers=1, seed=0)
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    return model, tokenizer, str(folder)


class PeopleBench(Bench):
    """`benchmark.Bench`'s fine-tuning (memoised, seeded init and id-hash order) with question scores."""

    def __init__(self, args: PeopleBenchArguments, data: PeopleData, base_model, tokenizer, base_path: str):
        super().__init__(args, {}, base_model, tokenizer)
        self.data, self.base_path = data, base_path  # base_path: what the `cli-defaults` job loads
        self._scores: dict[tuple[str, str], dict] = {}

    def scores(self, theta: torch.Tensor, questions: list[Example], *, generate: bool = True) -> dict[str, dict]:
        """`forgetting.score_questions` at θ, memoised per (θ, question id)."""
        key = theta_key(theta)
        todo = [q for q in questions if (key, q.id) not in self._scores
                or (generate and "answer" not in self._scores[key, q.id])]
        if todo:
            self.view.set_vector(theta)
            for qid, row in fg.score_questions(self.model, self.task, todo, generate=generate).items():
                self._scores[key, qid] = row
        return {q.id: self._scores[key, q.id] for q in questions}

    def evaluate(self, theta: torch.Tensor, examples: list[Example]) -> dict:
        """The per-example losses `benchmark._objective` (NPO's reference) reads."""
        return {"losses": {i: r["nll"] for i, r in self.scores(theta, examples, generate=False).items()}}


@dataclass
class Split:
    """One request and what it is scored on."""

    setting: Setting
    forget: list[Example]  # the edited facts as trained
    corrected: list[Example]  # correct: the new facts (no paraphrases: scored on probability and greedy answers)
    values: dict[str, str]  # question id → the value its answer must contain (forget: old; corrected: new)
    theta: torch.Tensor = None
    theta_retrain: torch.Tensor = None
    retrain_seconds: float = 0.0
    retrain_mib: float = 0.0


def make_split(data: PeopleData, name: str, seed: int) -> Split:
    request = data.requests([name] if name != "correct" else [])[name]
    setting = Setting(name, seed, data.train, request)
    forget, corrected = setting.edited, [Example(id=f"{e.id}#new", prompt=e.prompt, response=e.response)
                                         for e in setting.corrected]
    values = {e.id: e.extra["value"] for e in forget}
    values.update({f"{i}#new": v for i, v in data.correction_values.items()} if corrected else {})
    return Split(setting, forget, corrected, values)


def retain_questions(data: PeopleData, n: int) -> list[Example]:
    """Facts of `n` people who are in no forget set and not the corrected person (people[1 : 1 + n])."""
    return data.questions_of(data.people[1:1 + n])


def _values(questions: list[Example]) -> dict[str, str]:
    return {e.id: e.extra["value"] for e in questions}


def value_recall(scores: dict[str, dict], values: dict[str, str], ids: list[str]) -> float:
    """Share of greedy answers that contain their fact's value (case-insensitive): is the fact still said?"""
    return statistics.fmean(values[i].lower() in scores[i]["answer"].lower() for i in ids)


def measure(bench: PeopleBench, split: Split, theta: torch.Tensor, retain: list[Example]) -> dict:
    s = bench.scores(theta, [*split.forget, *retain, *bench.data.general, *split.corrected])
    s.update(bench.scores(theta, bench.data.heldout, generate=False))
    out = summarise_split(bench, split, s, retain)
    delta, target = theta - split.theta, split.theta_retrain - split.theta
    out["delta_norm"] = float(delta.norm())
    out["cosine"] = float(torch.nn.functional.cosine_similarity(delta, target, dim=0)) if delta.any() else math.nan
    bench.view.set_vector(theta)  # the report's membership test of the forget set against the held-out people
    out["evidence"] = nr.evidence_entry(bench.model, bench.task, split.forget, bench.data.heldout)
    return out


def summarise_split(bench: PeopleBench, split: Split, s: dict[str, dict], retain: list[Example]) -> dict:
    """Every measure of one model from its per-question scores `s` (greedy answers but on held-out questions; a
    sharded model's come from several adapters): forget quality against the retrain's, facts said, utility, MIA."""
    data = bench.data
    ref = bench.scores(split.theta_retrain, split.forget)
    forget_ids = [e.id for e in split.forget]
    out = {"forget": fg.summarise(s, forget_ids, truth="forget"),
           "retain": fg.summarise(s, [e.id for e in retain]),
           "general": fg.summarise(s, [e.id for e in data.general])}
    out["forget"]["value_recall"] = value_recall(s, split.values, forget_ids)
    for part, questions in (("retain", retain), ("general", data.general)):
        out[part]["value_recall"] = value_recall(s, _values(questions), [e.id for e in questions])
    if split.corrected:
        ids = [e.id for e in split.corrected]
        out["corrected"] = {**fg.summarise(s, ids), "value_recall": value_recall(s, split.values, ids)}
    out["forget_quality"] = fg.ks_pvalue([s[i]["truth_ratio"] for i in forget_ids],
                                         [ref[i]["truth_ratio"] for i in forget_ids])
    out["model_utility"] = fg.model_utility(out["retain"], out["general"])
    for key, by in (("mia_loss_auc", "nll"), ("mia_mink_auc", "min_k")):
        out[key] = fg.mia_auc(s, forget_ids, [e.id for e in data.heldout], by)
    return out


# ----------------------------------------------------------------------------------------------------- methods
def _influence(bench: PeopleBench, split: Split, name: str, fits: dict) -> tuple[torch.Tensor, dict]:
    """An influence method at its default damping (λ = relative_damping × the curvature's largest eigenvalue)."""
    a, (variant, solver) = bench.args, name.split("/")
    eraser = EraserArguments(method=variant, solver=solver, seed=a.seed, batch_size=a.batch_size,
                             curvature_samples=0 if is_fitted(solver) else a.curvature_samples,
                             solver_args=None if is_fitted(solver) else solver_arguments(
                                 solver, max_iters=a.max_iters, tol=1e-3))
    bench.view.set_vector(split.theta)
    problem = UnlearningProblem(bench.model, bench.task, split.setting.train, split.setting.request, eraser,
                                factors=fits.get(solver))
    update = problem.solve()
    seconds = update.report["seconds"]
    return split.theta + update.delta, {"total": seconds["gradients"] + seconds["solve"],
                                        "damping": update.solve.damping, "residual": update.solve.residual,
                                        "fit": fits[solver].fit_seconds if solver in fits else 0.0}


def _cli_defaults(bench: PeopleBench, split: Split, workdir: Path) -> tuple[torch.Tensor, dict]:
    """`llmeraser unlearn --adapter original --train train.jsonl --request <split>.json`, no options, through
    the job API (its own model copy; factors stored beside the adapter on the first split and reused)."""
    from llmeraser.job import AdapterJob

    job = AdapterJob(workdir / "original", split.setting.train, base_model=bench.base_path,
                     progress=bench.args.progress)
    start = time.perf_counter()
    result = job.unlearn(split.setting.request, str(workdir / f"unlearned-{split.setting.name}"))
    seconds = time.perf_counter() - start
    delta = result.update.delta if result.status == "applied" else torch.zeros_like(split.theta)
    report = result.report or {}
    return split.theta + delta.to(split.theta.dtype), {
        "total": seconds, "status": result.status, "solver": report.get("solver"),
        "damping": (report.get("damping_rule") or {}).get("damping", report.get("damping")),
        "fit": (report.get("seconds") or {}).get("fit", 0.0)}


def _baseline(bench: PeopleBench, split: Split, name: str, lr: float) -> tuple[torch.Tensor, dict]:
    theta, seconds = _descend(bench, split.theta, *_objective(bench, split, name), lr, split.setting.seed)
    return theta, {"total": seconds, "lr": lr}


def run_methods(bench: PeopleBench, split: Split, methods: tuple[str, ...], fits: dict, workdir: Path,
                retain: list[Example], on_row=None) -> list[dict]:
    """Every method's row on the split; `on_row(rows so far)` after each (a long run keeps what it finished)."""
    rows = []
    for name in methods:
        if name == "fine-tune-corrected" and not split.corrected:
            continue
        variants = [(f"{name} lr={lr:g}", lr) for lr in bench.args.baseline_lrs[name]] if name in BASELINES \
            else [(name, None)]
        for label, lr in variants:
            row = {"split": split.setting.name, "method": label}
            try:
                with PeakMemory() as mem:
                    theta, info = _run(bench, split, name, lr, fits, workdir)
            except SolverError as e:  # a diverged solver is a result, not a crash
                logger.warning("%s %s failed: %s", split.setting.name, label, e)
                rows.append({**row, "failed": str(e)})
                continue
            row.update(info, peak_mib=split.retrain_mib if name == "retrain" else mem.mib,
                       time_ratio=info["total"] / split.retrain_seconds)
            row.update(measure(bench, split, theta, retain))
            logger.info("%s %s: forget quality %.3g, utility %.3f", split.setting.name, label,
                        row["forget_quality"], row["model_utility"])
            rows.append(row)
            if on_row is not None:
                nr.add_gaps(rows)
                on_row(rows)
    nr.add_gaps(rows)
    return rows


def _run(bench, split, name, lr, fits, workdir) -> tuple[torch.Tensor, dict]:
    if name == "original":
        return split.theta, {"total": 0.0}
    if name == "retrain":
        return split.theta_retrain, {"total": split.retrain_seconds}
    if name.startswith("retrain@"):
        theta, seconds, _ = bench.fit(split.setting.clean, split.setting.seed + int(name[len("retrain@"):]))
        return theta, {"total": seconds}
    if name == "cli-defaults":
        return _cli_defaults(bench, split, workdir)
    if name in BASELINES:
        return _baseline(bench, split, name, lr)
    if name in PATH:
        return path_method(bench, split.theta, split.setting, name)
    if name in nr.NORECORD:  # the library's unlearner, its holdout the held-out people's facts (never trained on)
        return nr.run_forget(bench.model, bench.task, bench.view, split.theta, split.setting.train,
                             split.setting.request, bench.data.heldout, name)
    return _influence(bench, split, name, fits)


# ------------------------------------------------------------------------------------------------------- run
def run_people_benchmark(args: PeopleBenchArguments, out: str | Path, *, work: str | Path | None = None) -> dict:
    """Run every split × method; write results.json, tables.md and forget_quality.png under `out`. `work`: keep the
    fine-tuned θs there (reused by a rerun) when no method needs the recording."""
    from llmeraser.finetune import save_finetuned
    from llmeraser.io import check_new_output

    out = Path(out)
    check_new_output(out)
    started = time.perf_counter()
    commit = git_commit()  # the code this run imported (HEAD may move while it runs)
    data = build_people(args.n_people, facts=args.facts, n_heldout=args.n_heldout, seed=args.data_seed)
    with tempfile.TemporaryDirectory(prefix="llmeraser-people-") as tmp:
        workdir = Path(tmp)
        if args.base_model == "tiny":
            base, tokenizer, base_path = tiny_base(data, workdir / "base")
        else:
            from llmeraser.models import load_base_model

            (base, tokenizer), base_path = load_base_model(args.base_model), args.base_model
        bench = PeopleBench(args, data, base, tokenizer, base_path)
        # recorded, like 'llmeraser finetune', when the path methods or the CLI's defaults (auto) replay it
        recorded = any(m in PATH or m == "cli-defaults" for m in args.methods)
        theta, seconds, _ = _fit(bench, data.train, args.seed, None if recorded else work, record=recorded)
        if recorded:
            bench.view.set_vector(theta)
            save_finetuned(bench.model, workdir / "original", data.train, lora=LoraSettings.from_peft(args.lora),
                           max_length=args.max_length, trajectory=bench.trajectory(data.train, args.seed))
        ids, trained = [e.id for e in data.train], bench.scores(theta, data.train)
        memorised = {**fg.summarise(trained, ids), "value_recall": value_recall(trained, _values(data.train), ids)}
        logger.info("original: %s", memorised)
        fits: dict = {}
        fitted = [m.split("/")[1] for m in args.methods if "/" in m and is_fitted(m.split("/")[1])]
        if fitted:
            bench.view.set_vector(theta)
            fit_args = factor_arguments(EraserArguments(seed=args.seed, batch_size=args.batch_size,
                                                        progress=args.progress), samples=args.factor_samples)
            fits = fit_factors(bench.model, bench.task, data.train,
                               [k for k in solver_names(fitted=True) if k in fitted], fit_args)
        retain = retain_questions(data, args.retain_people)
        rows: list[dict] = []
        result: dict = {}
        for i, name in enumerate(tqdm(args.splits, desc="splits", disable=not args.progress)):
            split = make_split(data, name, args.seed)
            split.theta = theta
            split.theta_retrain, split.retrain_seconds, split.retrain_mib = _fit(bench, split.setting.clean,
                                                                                 args.seed, work)
            done = list(rows)

            def save(rows: list[dict], complete: bool) -> dict:
                result = {"commit": commit, "arguments": dataclasses.asdict(args), "rows": rows,
                          "complete": complete, "seconds": time.perf_counter() - started,
                          "finetune_seconds": seconds, "memorised": memorised, "n_params": bench.view.dim,
                          "sizes": {"train": len(data.train), "heldout": len(data.heldout),
                                    "general": len(data.general), "retain_scored": len(retain),
                                    "people": len(data.people)},
                          "forget_people": {n: data.forget_people(float(n[6:])) for n in args.splits
                                            if n != "correct"},
                          "fit_seconds": {k: f.fit_seconds for k, f in fits.items()}, "goals": nr.goals(rows)}
                out.mkdir(parents=True, exist_ok=True)
                atomic_write_json(out / "results.json", result)
                atomic_write_text(out / "tables.md", tables(rows))
                return result

            rows = done + run_methods(bench, split, args.methods, fits, workdir, retain,
                                      on_row=lambda so_far: save(done + so_far, False))  # noqa: B023 (called now)
            result = save(rows, i + 1 == len(args.splits))
    plot(rows, out)
    return result


def _fit(bench: PeopleBench, train: list[Example], seed: int, work, *, record: bool = False):
    """`bench.fit`, kept under `work` when given (`sharded_bench.cached_fit`)."""
    if work is None:
        return bench.fit(train, seed, record=record)
    from llmeraser_experiments.sharded_bench import cached_fit

    Path(work).mkdir(parents=True, exist_ok=True)
    return cached_fit(bench, train, seed, Path(work))
