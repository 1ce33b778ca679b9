"""The jobs on an adapter folder, as one library API: unlearn a request, fit curvature, choose the damping.

    job = AdapterJob("adapters/original", "data/train.jsonl", base_model="default")
    result = job.unlearn("request.json", "adapters/unlearned", UnlearnOptions(ledger="runs/ledger"))
    print(result.message)

`AdapterJob` owns what the command line, the benchmarks and a notebook would otherwise each redo: the adapter's
training record (`record`), the factor store beside the adapter and its reuse and inheritance, the ledger's replay
and checks, the `auto` choices, the damping `tune-damping` chose (and its refusal to write a worse adapter), and a
report built once. Under torchrun every rank runs the same job: rank 0 alone reads and writes state (ledger, store,
outputs) and hands its decisions to the others (`distributed.on_rank0`). See docs/architecture.md.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from llmeraser import distributed
from llmeraser.data import DataFields, Example, examples_hash, load_examples
from llmeraser.eraser import EraserArguments, Update, choose_solver, example_tokens, fit_for_solver, save_unlearned
from llmeraser.errors import UserInputError
from llmeraser.evidence import check_holdout, report_entry
from llmeraser.factors import FactorArguments, Factors, FactorStore, default_store, fit_factors
from llmeraser.factors.fit import sample_size
from llmeraser.params import ParamView, adapter_hash, check_adapter_dir
from llmeraser.record import TrainingRecord, earlier_request_hint
from llmeraser.recording import locate
from llmeraser.replay import verify_recording
from llmeraser.request import Request, apply_request, load_request, merge_requests, resolve
from llmeraser.resources import OOM_ADVICE, device_memory
from llmeraser.solvers.api import is_fitted
from llmeraser.trajectory import Trajectory
from llmeraser.updates import RequestContext, UnlearnOptions, get_method
from llmeraser.updates.summary import summarise

logger = logging.getLogger(__name__)


@dataclass
class UnlearnResult:
    """What `AdapterJob.unlearn` did. `status`: applied (a new adapter was written), declined (written unchanged,
    because the validation evidence says no update beats none), done (already applied: nothing to do), recovered
    (a previous run wrote it but stopped before recording it)."""

    status: str
    message: str
    out: str | None = None
    update: Update | None = None
    seqs: list[int] | None = None  # with a ledger: the numbers of the requests this update applied
    factors_note: str | None = None

    @property
    def report(self) -> dict | None:
        return self.update.report if self.update else None

    @property
    def seq(self) -> int | None:
        """The ledger's number of the (last) request applied."""
        return self.seqs[-1] if self.seqs else None


class AdapterJob:
    """One fine-tuned adapter, the training set it was fine-tuned on, and the jobs on them.

    Args:
        adapter: the PEFT adapter folder (never modified).
        train: the training set the adapter was fine-tuned on (a JSONL path or examples); with a ledger, the
            ORIGINAL set (the ledger replays the applied requests on it).
        base_model: 'default' (the embedded model) or a local Hugging Face model folder.
        dtype: of the base model (float32, float64, bfloat16, float16; the adapter, its gradients, curvature
            products and solves stay float32).
        device: auto (a CUDA GPU when there is one, else the CPU; a rank's own GPU under torchrun with nccl), cpu,
            cuda or cuda:N.
        max_length, l2: override the adapter's training record (`record.TrainingRecord`); without a record they are
            assumed, with a warning that names them.
        fields: which record fields of `train` hold what (default: the record's, else `DataFields()`).
        factors: the factor store (default: `<adapter>.factors`, beside the adapter).
        progress: show progress bars.
    """

    def __init__(self, adapter: str | os.PathLike, train: str | os.PathLike | Sequence[Example], *,
                 base_model: str = "default", dtype: str = "float32", device: str = "auto",
                 max_length: int | None = None, l2: float | None = None, fields: DataFields | None = None,
                 factors: str | os.PathLike | None = None, progress: bool = False):
        check_adapter_dir(adapter)
        self.adapter = str(adapter)
        self.record = TrainingRecord.read(adapter, max_length=max_length, l2=l2)
        self.fields = fields = fields or DataFields.from_dict(self.record.data_fields)
        self.train = load_examples(train, fields) if isinstance(train, str | os.PathLike) else list(train)
        self.holdout: list[Example] | None = None
        self.base_model, self.dtype, self.device, self.progress = base_model, dtype, device, progress
        if distributed.rank() == 0:
            for line in filter(None, [self.record.warning(adapter), *self.record.notes()]):
                logger.warning("%s", line)
        self.store = FactorStore(factors or default_store(adapter))
        self.adapter_sha256 = adapter_hash(adapter)
        self._model = self._task = None

    # ------------------------------------------------------------------------------------------------ pieces
    def check_data(self, train: Sequence[Example]) -> None:
        """Warn when `train` is not the set the record says the adapter was fine-tuned on (or, for an unlearned
        adapter, the set it stands for)."""
        recorded, given = self.record.train_sha256, examples_hash(train)
        if recorded and recorded != given and distributed.rank() == 0:
            advice = (earlier_request_hint(self.adapter, given)
                      or "; pass the set it was trained on (with a ledger: the original, before any request)")
            logger.warning("the training set (%d examples, sha256 %s…) is not the one %s was fine-tuned on or "
                           "stands for (sha256 %s…): the update differentiates the objective of the data given%s",
                           len(train), given[:12], self.adapter, recorded[:12], advice)

    def model_and_task(self):
        """(the base model with the adapter loaded, trainable; the task as the record says the adapter was trained),
        loaded once."""
        if self._model is None:
            from llmeraser.models import load_base_model
            from llmeraser.params import load_adapter
            from llmeraser.task import CausalLMTask

            base, tokenizer = load_base_model(self.base_model, dtype=self.dtype, device=self.device)
            self._model = load_adapter(base, self.adapter)
            self._task = CausalLMTask(tokenizer, max_length=self.record.length, rendering=self.record.rendering)
            self._task.calibrate(self.train)  # the token-weighted mean's t̄, fixed by the original training set
        return self._model, self._task

    def eraser_arguments(self, args: EraserArguments | None = None) -> EraserArguments:
        """`args` with the record's l2 (the objective the adapter was trained on) unless l2 was set explicitly."""
        args = args or EraserArguments()
        return args if args.l2 else dataclasses.replace(args, l2=self.record.l2)

    def factors(self, train: Sequence[Example], args: EraserArguments) -> tuple[Factors, float]:
        """(the fit of fitted solver `args.solver` for this adapter and `train`, seconds spent fitting now): the
        stored one when its keys match, else a new fit, saved in the store for the next request."""
        model, task = self.model_and_task()
        kind, t_sha = args.solver, examples_hash(train)
        found, why = self.store.load(kind, self.adapter_sha256, t_sha)
        distributed.check_same({"factor store": why}, "reading the factor store")  # every rank loaded, or none did
        if found is not None:
            found.meta["source"] = why
            return found, 0.0
        logger.warning("%s: fitting %s factors on %s examples (once; later requests reuse them)", why, kind,
                       _fit_size(len(train), args.curvature_samples))
        start = time.perf_counter()
        fitted = fit_for_solver(model, task, train, args)
        path = distributed.on_rank0(lambda: str(self.store.save(fitted, self.adapter_sha256, t_sha,
                                                                n_train=len(train))), "saving the factors")
        fitted.meta["source"] = f"fitted for this request ({why}); saved in {path}"
        return fitted, time.perf_counter() - start

    def damping_record(self, train: Sequence[Example]) -> dict:
        """The damping `tune-damping` chose for this adapter and `train` (for damping='auto')."""
        record, why = distributed.on_rank0(
            lambda: list(self.store.load_damping(self.adapter_sha256, examples_hash(train))), "reading the damping")
        if record is None:
            raise UserInputError(f"--damping auto: {why}; run 'llmeraser tune-damping' on this adapter first (or give "
                                 f"--damping a number)")
        return record

    # ------------------------------------------------------------------------------------------------ unlearn
    def unlearn(self, request: Request | str | os.PathLike | Sequence[Request | str | os.PathLike],
                out: str | os.PathLike, options: UnlearnOptions | None = None, *,
                holdout: str | os.PathLike | Sequence[Example] | None = None) -> UnlearnResult:
        """Apply `request` to the adapter and write the new adapter, its report.json and request.json to `out`
        (atomically; the input is never touched).

        Args:
            request: a Request or a request JSON path; or several, applied in order as one update
                (`request.merge_requests`: one replay for all of them), each on record in the ledger.
            out: the new adapter folder (must not exist, or be empty).
            options: the update method and all it can be told (`updates.UnlearnOptions`: method, one-step, path and
                refine arguments, damping, force, refit fraction, ledger, solver options); default: auto.
            holdout: examples of the training data's kind the adapter never saw (a path, read with the training
                set's fields, or examples): the report's `evidence` is the membership test of the edited examples
                against them before and after the update (`evidence.Comparison`); without, it says what it cannot
                show.
        """
        from llmeraser.io import check_output_paths
        from llmeraser.ledger import Ledger, as_requests

        options = options or UnlearnOptions()
        given = [request] if isinstance(request, Request | str | os.PathLike) else list(request)
        paths = {f"request {k + 1}" if len(given) > 1 else "request": r for k, r in enumerate(given)
                 if isinstance(r, str | os.PathLike)}
        check_output_paths(out, ledger=options.ledger, inputs={  # before anything is written, the ledger included
            "adapter": self.adapter, **paths, "base model": None if self.base_model == "default" else self.base_model,
            "holdout": holdout if isinstance(holdout, str | os.PathLike) else None})
        self.holdout = (load_examples(holdout, self.fields) if isinstance(holdout, str | os.PathLike)
                        else None if holdout is None else list(holdout))
        requests = as_requests([load_request(r) if isinstance(r, str | os.PathLike) else r for r in given])
        out = str(out)
        distributed.check_same({"adapter": self.adapter_sha256, "training set": examples_hash(self.train),
                                "requests": [r.hash for r in requests]}, "checking the inputs")
        book = Ledger(options.ledger) if options.ledger and distributed.rank() == 0 else None  # rank 0's state
        try:
            return self._unlearn(book, requests, out, options)
        finally:
            if book:
                book.close()

    def _unlearn(self, book, requests: list[Request], out: str, options: UnlearnOptions) -> UnlearnResult:
        decision = distributed.on_rank0(lambda: self._preamble(book, requests, out), "checking the request")
        if "done" in decision:
            return UnlearnResult(status=decision["status"], message=decision["done"], out=decision.get("out"))
        train = list(self.train)
        for earlier in decision["applied"]:  # the training set after the lineage's applied requests
            train = apply_request(train, Request.from_dict(earlier))
        self.check_data(train)
        request = merge_requests(requests, train) if len(requests) > 1 else requests[0]
        if self.holdout is not None:  # before anything is recorded: a holdout the test cannot use is bad input
            check_holdout(self.holdout, train=self.train, members=[old for old, _ in resolve(request, train)])
        batch = distributed.on_rank0(lambda: book.begin(requests, train, self.adapter, out) if book else None,
                                     "recording the request")
        try:
            ctx = self.context(train, request)
            if len(requests) > 1:
                ctx.report["requests_sha256"] = [r.hash for r in requests]
            # the membership test of every edited example as it was against the holdout (None without one): its
            # base-model reference and its scores at θ̂ serve the stop rule's checks too
            before = None if ctx.probe is None else ctx.probe.test(ctx.model)
            with device_memory(f"the {options.method!r} update of {len(train):,} examples", OOM_ADVICE["unlearn"]):
                update = get_method(options.method).run(ctx, options)
            model, _ = self.model_and_task()
            if update.theta is not None:  # a path update knows the new θ itself (a rewind: bit for bit)
                ParamView(model).set_vector(update.theta)
            elif update.report.get("decision") != "declined":
                ParamView(model).add_(update.delta)
            update.report["evidence"] = report_entry(before, before and ctx.probe.test(model), self.holdout)

            def write() -> list[int] | None:  # rank 0 writes; the others wait for it: every rank exits with its outcome
                save_unlearned(model, out, update, input_adapter=self.adapter,
                               requests=requests if len(requests) > 1 else None,
                               before_rename=(lambda tmp: book.stage(batch, tmp)) if book else None)
                return [e.seq for e in book.finish(batch, update.report)] if book else None

            seqs = distributed.on_rank0(write, "writing the adapter")
        except BaseException as e:
            if book:
                book.fail(batch, e)
            raise
        note = None
        if update.factors is not None and distributed.rank() == 0:
            note = self._hand_on(update.factors, ctx, out, options.refit_fraction)
        status = "declined" if update.report.get("decision") == "declined" else "applied"
        return UnlearnResult(status=status, message=summarise(update, out, options.ledger, seqs), out=out,
                             update=update, seqs=seqs, factors_note=note)

    def context(self, train: list[Example], request: Request) -> RequestContext:
        """The request's context on this adapter: its model and task, the record's l2 and the report's record
        entries (the objective the output was trained on, over the set it now stands for), the verified recording,
        the factor store and the damping `tune-damping` stored."""
        model, task = self.model_and_task()
        ctx = RequestContext.build(model, task, train, request, l2=self.record.l2, progress=self.progress,
                                   holdout=self.holdout,
                                   recording=lambda: self.trajectory(train), fit=lambda a: self.factors(train, a),
                                   damping_choice=lambda: self.damping_record(train))
        ctx.report["task"] = self.record.to_dict() | {"train_sha256": examples_hash(ctx.effective)}
        if notes := self.record.notes():
            ctx.report["record_notes"] = notes
        return ctx

    def _preamble(self, book, requests: list[Request], out: str) -> dict:
        """Rank 0: the ledger's say (already done, or the requests applied before these) and the output check."""
        from llmeraser.ledger import preamble

        return preamble(book, self.adapter, self.train, requests, out)

    def trajectory(self, train: Sequence[Example]) -> tuple[Trajectory | None, str]:
        """(the adapter's recorded trajectory when it is the fine-tune of this adapter on `train`, else None; why
        not). Loaded once. Beside the adapter, else where the run left it (`recording.locate`: a checkpoint's pointer,
        the run above a checkpoint, the Trainer's output_dir): one found elsewhere passes the same checks, and the
        report (`trajectory.verified.recording`) and the log name where it came from."""
        from llmeraser.trajectory import tensor_sha256

        if not hasattr(self, "_trajectory"):
            model, task = self.model_and_task()
            found = None
            try:
                found = locate(self.adapter)
                traj = found.trajectory
                if traj is None:
                    why = _why_no_recording(self.adapter, found.looked)
                    self._trajectory = (None, f"{self.adapter} has no trajectory.safetensors ({why})")
                else:
                    view = ParamView(model)
                    theta = view.vector()
                    end = traj.meta.get("final_sha256")
                    if end is None:  # a checkpoint's step with no recorded hash: the replay below ties it
                        traj.meta["final_sha256"] = tensor_sha256(theta)
                    traj.check(train, theta, view.names)
                    verified = verify_recording(model, task, train, traj, dropout=self.record.dropout)
                    if not found.beside:
                        # a file outside the adapter folder: said where the CLI shows it, not only in the report
                        logger.warning("the adapter's recording, not beside it: %s", found.where)
                        verified = {"recording": found.where, **verified}
                        if end is None:
                            verified["end"] = "no hash of the checkpoint's weights was recorded: the replay ties them"
                    traj.verification = verified
                    self._trajectory = (traj, "")
            except UserInputError as e:
                where = f"the run's recording {found.where}: " if found is not None and not found.beside else ""
                self._trajectory = (None, f"{where}{e}")
            # every rank read its own copy: they must agree, or they would take different updates
            distributed.check_same({"trajectory": self._trajectory[1] or "usable"}, "reading the trajectory")
        return self._trajectory

    def _hand_on(self, factors: Factors, ctx: RequestContext, out: str, refit_fraction: float) -> str | None:
        """Hand the fit on to the new adapter (or say why the next request refits); a cache: failures only warn."""
        try:
            _, why = FactorStore(default_store(out)).derive(
                factors, self.store, adapter_hash(out), examples_hash(ctx.effective), edited=len(ctx.request.edits),
                refit_fraction=refit_fraction, request_sha256=ctx.request.hash)
            return why
        except OSError as e:
            logger.warning("could not record the factors for %s: %s", out, e)
            return None

    # ------------------------------------------------------------------------------------------ fit curvature
    def fit_curvature(self, kinds: Sequence[str] = ("ekfac",), args: FactorArguments | None = None) -> list[dict]:
        """Fit `kinds` from one pass over the training set (or its sample: `FactorArguments.samples`) and store them;
        one row per kind (sizes, seconds)."""
        distributed.check_same({"adapter": self.adapter_sha256, "training set": examples_hash(self.train)},
                               "checking the inputs")
        self.check_data(self.train)
        model, task = self.model_and_task()
        fits = fit_factors(model, task, self.train, tuple(dict.fromkeys(kinds)), args or FactorArguments())
        t_sha = examples_hash(self.train)

        def save() -> list[dict]:  # rank 0 writes the store
            rows = []
            for kind, f in fits.items():
                path = self.store.save(f, self.adapter_sha256, t_sha, n_train=len(self.train))
                sec = f.meta["seconds"]
                rows.append({"kind": kind, "n": f.meta["n_examples"], "tokens": f.meta["n_tokens"],
                             "pass": sec.get("pass", 0.0), "extra": sec["total"] - sec.get("pass", 0.0),
                             "total": sec["total"], "mib": sum(p.stat().st_size for p in path.iterdir()) / 2**20,
                             "path": str(path)})
            return rows

        return distributed.on_rank0(save, "saving the factors")

    # ---------------------------------------------------------------------------------------------- evaluate
    @classmethod
    def evaluate(cls, adapter: str | os.PathLike | None, data: str | os.PathLike | Sequence[Example], *,
                 base_model: str = "default", dtype: str = "float32", device: str = "auto",
                 max_length: int | None = None, fields: DataFields | None = None, batch_size: int = 8,
                 progress: bool = False) -> dict:
        """`metrics.evaluate` of `adapter` (None: the base model alone) on `data` (a path or examples): the base model
        with the adapter loaded frozen, the task as the adapter's training record says it was trained (`max_length`
        overrides it), t̄ calibrated on `data`. A classmethod: evaluating needs no training set, so no job is built
        (and none of its warnings about the update's objective are given; only an assumed max length is named)."""
        from llmeraser.metrics import evaluate
        from llmeraser.models import load_base_model
        from llmeraser.params import load_adapter
        from llmeraser.record import DEFAULT_MAX_LENGTH
        from llmeraser.task import CausalLMTask

        data = load_examples(data, fields) if isinstance(data, str | os.PathLike) else list(data)
        record = TrainingRecord(max_length=DEFAULT_MAX_LENGTH if max_length is None else max_length)
        if adapter:
            record = TrainingRecord.read(adapter, max_length=max_length)
            if record.warning(adapter) and "max_length" in record.assumed:
                logger.warning("%s", record.warning(adapter))
        base, tokenizer = load_base_model(base_model, dtype=dtype, device=device)
        model = load_adapter(base, adapter, trainable=False) if adapter else base
        task = CausalLMTask(tokenizer, max_length=record.length, rendering=record.rendering)
        task.calibrate(data)
        return evaluate(model, task, data, batch_size=batch_size, progress=progress)

    # ------------------------------------------------------------------------------------------ tune damping
    def tune_damping(self, valid: str | os.PathLike | Sequence[Example], args=None, *, solver: str = "auto",
                     fisher: str = "mc", seed: int = 0) -> tuple[dict, str]:
        """Choose λ on validation data (`damping.select_damping`) for `solver` and store it for damping='auto'.
        Returns (the record, where it was saved)."""
        from llmeraser.damping import DampingArguments, select_damping

        valid = load_examples(valid) if isinstance(valid, str | os.PathLike) else list(valid)
        overlap = {e.id for e in self.train} & {e.id for e in valid}
        if overlap:
            raise UserInputError(f"--valid shares {len(overlap)} id(s) with --train (e.g. {sorted(overlap)[0]!r}); "
                                 f"validation examples must be held out")
        model, task = self.model_and_task()
        if solver == "auto":
            solver = choose_solver(model, len(self.train), need_path=True, tokens=example_tokens(task, self.train))[0]
        eraser = self.eraser_arguments(EraserArguments(solver=solver, fisher=fisher, seed=seed,
                                                       progress=self.progress))
        factors = self.factors(self.train, eraser)[0] if is_fitted(solver) else None
        result = select_damping(model, task, self.train, valid, eraser, args or DampingArguments(), factors=factors,
                                progress=self.progress)
        path = distributed.on_rank0(lambda: str(self.store.save_damping(result, self.adapter_sha256,
                                                                        examples_hash(self.train))),
                                    "saving the damping")
        return result, path


def _fit_size(n: int, samples: int) -> str:
    """'N' examples, or 'k of the N' when the fit takes a sample."""
    k = sample_size(n, samples)
    return f"{n:,}" if k == n else f"{k:,} of the {n:,}"


def _why_no_recording(adapter: str, looked: Sequence[str] = ()) -> str:
    """Why an adapter has no recording, as far as its report says (a path replay's output carries none), with the
    places a run's recording was looked for."""
    from llmeraser.schema import read_json

    try:
        method = read_json(Path(adapter) / "report.json").get("method")
    except (UserInputError, AttributeError):
        method = None
    if method == "path":
        return ("it was written by a path replay, which predicts most steps and so carries no recording; a rewind's "
                "output carries one")
    elsewhere = looked[1:]  # the first is the adapter's own trajectory.safetensors
    return ((f"nor where its run would have left one: {'; '.join(elsewhere)}; " if elsewhere else
             "and nothing beside it names where its run left one (no llmeraser_recording.json, no output_dir in a "
             "training_record.json or training_args.bin, not a checkpoint-N folder); ")
            + "adapters fine-tuned with 'llmeraser finetune' or LLMEraserCallback record one (the callback writes it "
              "beside the adapter when the trained model is saved, and into the Trainer's output_dir; copy it "
              "beside the adapter, or unlearn the adapter saved there)")
