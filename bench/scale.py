"""llmeraser's costs against the number of training examples N and the model's size, every operation whole, as a
user runs it (the library's API: `finetune_adapter`, `AdapterJob.fit_curvature`, `AdapterJob.unlearn`).

    python bench/scale.py --cpu-tiny --n 250 1000 10000 100000      # a tiny random Llama on the CPU
    python bench/scale.py --cpu-embedded --n 250 1000 10000         # the embedded SmolLM2-135M on the CPU
    python bench/scale.py --gpu                                     # TinyLlama-1.1B and LLaMA-2-7B shapes, bf16, cuda
    python bench/scale.py --gpu --device cpu --shape tiny --n 64    # the GPU code path on a tiny shape (seconds)

For each (model, LoRA, N): fine-tune (recorded) and one epoch; fit per fitted kind (`--kinds`) and the fit in epochs;
a request per fitted kind (the stored fit reused) and with cg, each split into gradients and solve (the update's
report); exact rewind and path replay; retraining (measured when forecast to take at most --max-seconds, else
estimated from the fine-tune's step time × retraining's steps, and the row says "estimated"); peak memory (host RSS
above the operation's start; the GPU's max allocated); recording bytes. Every ratio is taken within one run.

Every operation loads its own model (as a command would). One forecast to exceed --max-seconds (linear in N from the
same operation at a smaller N) is skipped, and the row says so; one that runs past it is stopped there; one that
fails is recorded with its error. The data are synthetic: prompts of random words cut from the left so every example
is --tokens tokens, and a short response. The request removes --removed examples spread over the training set.

Writes OUT/rows.json (the rows, the arguments, versions and the device), OUT/rows.csv, OUT/table.md and
OUT/scale.png (log-log seconds vs N, one line per operation, one panel per model and LoRA), after every
configuration. Columns: docs/benchmarks.md#the-scale-benchmark.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import platform
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import torch
from scale_output import FIELDS, write_results  # noqa: F401 (FIELDS: the columns, for callers)

from llmeraser.data import Example
from llmeraser.eraser import EraserArguments
from llmeraser.errors import UserInputError
from llmeraser.factors import FactorArguments
from llmeraser.finetune import FinetuneArguments, finetune_adapter
from llmeraser.job import AdapterJob
from llmeraser.models import resolve_device
from llmeraser.params import ParamView
from llmeraser.record import LoraSettings
from llmeraser.request import Request, apply_request
from llmeraser.solvers.api import solver_names
from llmeraser.updates import UnlearnOptions
from llmeraser_experiments.benchmark import PeakMemory

RESULTS = Path(__file__).parent / "results" / "scale"
SHAPES = {  # random-weight Llamas: the costs depend on the shapes, not on the weights' values
    "tiny": {"hidden_size": 32, "num_hidden_layers": 2, "intermediate_size": 64, "num_attention_heads": 2,
             "num_key_value_heads": 2, "vocab_size": 512},
    "tinyllama-1.1b": {"hidden_size": 2048, "num_hidden_layers": 22, "intermediate_size": 5632,
                       "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000},
    "llama-2-7b": {"hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 11008,
                   "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000}}
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORAS = {"r8-qv": LoraSettings(r=8, alpha=16, targets=("q_proj", "v_proj")),
         "r16-all": LoraSettings(r=16, alpha=32, targets=ALL_LINEAR)}
MODES = {  # mode → (models, default N, default LoRAs, device, dtype)
    "cpu-tiny": (["tiny"], [250, 1000, 10_000, 100_000], ["r8-qv"], "cpu", "float32"),
    "cpu-embedded": (["embedded"], [250, 1000, 10_000], ["r8-qv"], "cpu", "float32"),
    "gpu": (["tinyllama-1.1b", "llama-2-7b"], [1000, 10_000], ["r8-qv", "r16-all"], "cuda", "bfloat16")}
WORDS = ("time year people way day man thing woman life child world school state family student group country "
         "problem hand part place case week company system program question work government number night point "
         "home water room mother area money story fact month lot right study book eye job word business issue side "
         "kind head house service friend father power hour game line end member law car city name team minute idea "
         "body information back parent face others level office door health person art war history party result "
         "change morning reason research girl guy moment air teacher force education").split()


class Stopped(BaseException):
    """--max-seconds ran out inside an operation (a BaseException, so no `except Exception` in the library eats it)."""


@contextlib.contextmanager
def watchdog(seconds: float):
    """Interrupt the block with `Stopped` after `seconds` (SIGALRM, main thread only; elsewhere no limit)."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def fire(signum, frame):
        raise Stopped

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def synthetic(n: int, tokens: int, seed: int = 0) -> list[Example]:
    """n examples: a prompt of 2 × `tokens` random words, each at least one token, so longer than max_length =
    `tokens` (`CausalLMTask` cuts it from the left: every example has exactly `tokens` tokens), and an 8-word
    response."""
    rng = random.Random(seed)
    return [Example(id=f"s{i:06d}", prompt=" ".join(rng.choices(WORDS, k=2 * tokens)),
                    response=" " + " ".join(rng.choices(WORDS, k=8))) for i in range(n)]


def random_base(shape: str, folder: Path, *, dtype: str, device: str) -> str:
    """A random-weight Llama of `shape` with a small BPE tokenizer (ids < its vocabulary; the head keeps the shape's
    vocabulary, so its cost is the real one), built on `device` in `dtype` and saved as a model folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmeraser.models import DTYPES
    from llmeraser.testing import tiny_tokenizer

    if (folder / "config.json").is_file():
        return str(folder)
    tok = tiny_tokenizer([" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))], vocab_size=400)
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(resolve_device(device)):
        model = LlamaForCausalLM._from_config(config, dtype=DTYPES[dtype])
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    del model
    _free()
    return str(folder)


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Runner:
    """Runs operations whole, timed, with their memory, forecasts and failures, and writes the results."""

    def __init__(self, a: argparse.Namespace, out: Path):
        self.a, self.out, self.rows = a, out, []
        self.device = resolve_device(a.device)
        self.seen: dict[tuple, tuple[int, float]] = {}  # (model, lora, operation) → (N, seconds) measured last

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def forecast(self, cfg: dict, name: str) -> float | None:
        """The operation's seconds at cfg's N, linear in N from the largest smaller N measured (None: none yet)."""
        seen = self.seen.get((cfg["model"], cfg["lora"], name))
        return None if seen is None else seen[1] * cfg["n"] / seen[0]

    def op(self, cfg: dict, name: str, fn, forecast: float | None = None) -> dict:
        """Run `fn()` (→ a dict of further fields) as operation `name`, or skip it when forecast too long."""
        row = {**cfg, "operation": name, "status": "ok", "seconds": math.nan}
        forecast = self.forecast(cfg, name) if forecast is None else forecast
        limit = self.a.max_seconds
        if limit and forecast is not None and forecast > limit:
            row.update(status="skipped", note=f"forecast {forecast:.0f} s > --max-seconds {limit:g}")
            self.rows.append(row)
            return row
        _free()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._sync()
        start = time.perf_counter()
        try:
            with PeakMemory() as mem, watchdog(limit):
                row.update(fn() or {})
                self._sync()
        except Stopped:
            row.update(status="stopped", note=f"stopped at --max-seconds {limit:g}: takes longer")
        except Exception as e:  # recorded, not raised: one failure must not end the bench
            first = (str(e).strip().splitlines() or [""])[0][:300]
            row.update(status="failed", note=f"{type(e).__name__}: {first}")
            if self.a.debug:
                traceback.print_exc()
        row["seconds"] = time.perf_counter() - start
        row["rss_mib"] = mem.mib
        if self.device.type == "cuda":
            row["gpu_mib"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        if row["status"] in ("ok", "stopped"):  # a stopped one's seconds are a lower bound: larger N is skipped
            self.seen[(cfg["model"], cfg["lora"], name)] = (cfg["n"], row["seconds"])
        self.rows.append(row)
        print(f"  {name:<22} {row['status']:<9} {row['seconds']:9.2f} s  {row.get('note', '')}", flush=True)
        return row

    def write(self) -> None:
        """rows.json, rows.csv, table.md and scale.png, rewritten after every configuration (when rows changed)."""
        if getattr(self, "_written", None) == len(self.rows):
            return
        self._written = len(self.rows)
        self.out.mkdir(parents=True, exist_ok=True)
        meta = {"arguments": vars(self.a), "commit": _commit(), "torch": torch.__version__,
                "transformers": _version("transformers"), "peft": _version("peft"), "python": platform.python_version(),
                "device": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else platform.machine(),
                "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        write_results(self.rows, meta, self.out)


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "absent"


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _recording_bytes(adapter: Path) -> int:
    """The recording's bytes on disk (trajectory*, whatever files it is split into)."""
    return sum(p.stat().st_size for p in adapter.rglob("trajectory*") if p.is_file())


def run_config(r: Runner, cfg: dict, base: str, lora: LoraSettings, work: Path) -> None:
    """Every operation on one (model, LoRA, N): fine-tune, retrain, fits, requests, rewind, path."""
    a, n = r.a, cfg["n"]
    train = synthetic(n, a.tokens, seed=a.seed)
    k = min(a.removed, max(1, n // 10))
    request = Request.remove(*[train[(2 * i + 1) * n // (2 * k)].id for i in range(k)])
    adapter = work / "adapter"
    ft = FinetuneArguments(epochs=a.epochs, lr=a.lr, batch_size=a.batch_size, seed=a.seed, record=True,
                           final_check=False, record_max_gib=a.record_max_gib)
    common = {"base_model": base, "dtype": cfg["dtype"], "device": cfg["device"]}
    stages: dict[str, float] = {}

    def timed(name, fn):
        r._sync()
        start = time.perf_counter()
        out = fn()
        r._sync()
        stages[name] = time.perf_counter() - start
        return out

    def fine_tune() -> dict:
        made = finetune_adapter(train, adapter, lora=lora, args=ft, max_length=a.tokens, step=timed, **common)
        cfg["params"] = ParamView(made.model).dim
        cfg["base_params"] = sum(p.numel() for p in made.model.parameters()) - cfg["params"]
        cfg["tokens"] = round(made.task.mean_tokens(train), 1)
        cfg["steps"] = made.result.steps
        return {"recording_bytes": _recording_bytes(adapter), "detail": f"{made.result.steps} steps"}

    tuned = r.op(cfg, "fine-tune (recorded)", fine_tune)
    if tuned["status"] != "ok":
        for name in ("epoch", "retrain"):
            r.rows.append({**cfg, "operation": name, "status": "skipped", "note": "no adapter: the fine-tune did not"
                                                                                   " finish"})
        return
    tuned.update({key: cfg[key] for key in ("params", "base_params", "tokens")})
    epoch = stages["fine-tune"] / a.epochs
    r.rows.append({**cfg, "operation": "epoch", "status": "ok", "seconds": epoch,
                   "detail": "the recorded fine-tune's steps / epochs"})
    step = stages["fine-tune"] / cfg["steps"]
    edited = apply_request(train, request)
    retrain_steps = a.epochs * math.ceil(len(edited) / a.batch_size)
    estimate = step * retrain_steps + stages.get("load base", 0.0) + stages.get("write adapter", 0.0)
    retrain = r.op(cfg, "retrain", lambda: _retrain(edited, work / "retrained", lora, ft, a.tokens, common),
                   forecast=estimate)
    if retrain["status"] != "ok":
        retrain.update(status="estimated", seconds=estimate, note=f"estimated: step time {step:.4g} s × "
                       f"{retrain_steps} steps + load and write ({retrain['status']}: {retrain.get('note', '')})")
    _requests(r, cfg, adapter, train, request, common, work, stages)
    for row in r.rows:
        if row.get("n") == n and row["model"] == cfg["model"] and row["lora"] == cfg["lora"]:
            row.update({key: cfg.get(key) for key in ("params", "base_params", "tokens")})
            if row["status"] in ("ok", "estimated") and row["seconds"] > 0:
                row["epochs"] = row["seconds"] / epoch
                row["retrain_over"] = retrain["seconds"] / row["seconds"]


def _retrain(edited: list[Example], out: Path, lora, ft: FinetuneArguments, tokens: int, common: dict) -> dict:
    """Retraining as a user would: `finetune_adapter` on the edited set, same recipe, no recording."""
    import dataclasses

    finetune_adapter(edited, out, lora=lora, args=dataclasses.replace(ft, record=False), max_length=tokens,
                     **common)
    shutil.rmtree(out, ignore_errors=True)
    return {"detail": f"{len(edited)} examples"}


def _requests(r: Runner, cfg: dict, adapter: Path, train, request: Request, common: dict, work: Path,
              stages: dict) -> None:
    """Fit each kind (`fit-curvature --kind KIND`), then a request per fitted kind, cg, rewind and path."""
    a = r.a

    def job() -> AdapterJob:
        return AdapterJob(adapter, train, **common)

    def fit(kind: str) -> dict:
        row = job().fit_curvature([kind], FactorArguments(batch_size=a.batch_size))[0]
        return {"detail": f"pass {row['pass']:.3g} s + {row['extra']:.3g} s; {row['mib']:.1f} MiB stored"}

    def unlearn(label: str, options: UnlearnOptions) -> dict:
        out = work / f"unlearned-{label}"
        try:
            done = job().unlearn(request, out, options)
        finally:
            shutil.rmtree(out, ignore_errors=True)
        report = done.report or {}
        seconds, extra = report.get("seconds", {}), {}
        if "gradients" in seconds:
            extra = {"gradients_s": seconds["gradients"], "solve_s": seconds.get("solve"),
                     "detail": f"report total {seconds.get('total', math.nan):.3g} s"
                               + (f", fit {seconds['fit']:.3g} s" if seconds.get("fit") else "")}
        for key, what in (("rewind", "replayed_fraction"), ("path", "gradient_cost_vs_retraining")):
            if key in report and what in report[key]:
                extra["detail"] = f"{what} {report[key][what]:.3f}"
        return extra

    fitted = {}
    for kind in a.kinds:
        fitted[kind] = r.op(cfg, f"fit {kind}", lambda kind=kind: fit(kind))["status"] == "ok"
    for kind in a.kinds:
        if not fitted[kind]:
            r.rows.append({**cfg, "operation": f"request {kind}", "status": "skipped",
                           "note": "its fit did not finish"})
            continue
        r.op(cfg, f"request {kind}", lambda kind=kind: unlearn(kind, UnlearnOptions(
            method="first-order", eraser=EraserArguments(solver=kind, batch_size=a.batch_size))))
    r.op(cfg, "request cg", lambda: unlearn("cg", UnlearnOptions(
        method="first-order", eraser=EraserArguments(solver="cg", batch_size=a.batch_size,
                                                     curvature_samples=a.cg_samples),
        solver_options={"max_iters": a.cg_iters} if a.cg_iters else {})))
    replay = stages["fine-tune"] + stages.get("load base", 0.0)  # a rewind replays at most every step
    for method in ("rewind", "path"):
        r.op(cfg, method, lambda method=method: unlearn(method, UnlearnOptions(method=method)),
             forecast=r.forecast(cfg, method) or replay)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group(required=True)
    for name in MODES:
        mode.add_argument(f"--{name}", dest="mode", action="store_const", const=name,
                          help=f"models {', '.join(MODES[name][0])}, N {' '.join(map(str, MODES[name][1]))}, "
                               f"LoRA {' '.join(MODES[name][2])}, {MODES[name][3]} {MODES[name][4]}")
    p.add_argument("--n", type=int, nargs="+", default=None, help="training set sizes (default: the mode's)")
    p.add_argument("--shape", nargs="+", default=None, choices=list(SHAPES),
                   help="--gpu: the random-weight shapes (default tinyllama-1.1b llama-2-7b; tiny checks the path)")
    p.add_argument("--lora", nargs="+", default=None, choices=list(LORAS), help="adapter layouts (default: the mode's)")
    p.add_argument("--device", default=None, help="default: the mode's (cpu, or cuda for --gpu)")
    p.add_argument("--dtype", default=None, help="of the base (default: float32, or bfloat16 for --gpu)")
    p.add_argument("--kinds", nargs="*", default=list(solver_names(fitted=True)),
                   choices=list(solver_names(fitted=True)), help="fitted kinds to fit and request with")
    p.add_argument("--tokens", type=int, default=128, help="tokens an example (max_length)")
    p.add_argument("--epochs", type=int, default=1, help="of the fine-tune and of retraining")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--removed", type=int, default=10, help="examples the request removes (at most N/10)")
    p.add_argument("--cg-samples", type=int, default=0, help="cg's curvature sample (0 = all N, the default)")
    p.add_argument("--cg-iters", type=int, default=0, help="cg's iteration budget (0 = its preset)")
    p.add_argument("--record-max-gib", type=float, default=FinetuneArguments.record_max_gib)
    p.add_argument("--max-seconds", type=float, default=600.0,
                   help="per operation: skip one forecast to take longer, stop one that does (0 = no limit)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="results folder (default bench/results/scale/MODE)")
    p.add_argument("--work", default=None, help="where bases and adapters are written (default: a temp folder)")
    p.add_argument("--debug", action="store_true", help="print the traceback of a failed operation")
    a = p.parse_args(argv)
    models, ns, loras, device, dtype = MODES[a.mode]
    if a.shape and a.mode != "gpu":
        p.error("--shape is for --gpu")
    a.models = a.shape or models
    a.n, a.lora = sorted(set(a.n or ns)), a.lora or loras
    a.device, a.dtype = a.device or device, a.dtype or dtype
    try:
        resolve_device(a.device)
    except UserInputError as e:
        p.error(f"{e} (--gpu --device cpu --shape tiny runs the GPU's code path on the CPU)")
    if min(a.n) < 2 or a.tokens < 8 or a.epochs < 1 or a.batch_size < 1 or a.removed < 1 or a.max_seconds < 0:
        p.error("--n ≥ 2, --tokens ≥ 8, --epochs, --batch-size and --removed ≥ 1, --max-seconds ≥ 0")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    out = Path(a.out or RESULTS / a.mode)
    work = Path(a.work or tempfile.mkdtemp(prefix="llmeraser-scale-"))
    r = Runner(a, out)
    print(f"{a.mode}: models {' '.join(a.models)}, N {' '.join(map(str, a.n))}, LoRA {' '.join(a.lora)}, {a.device} "
          f"{a.dtype}, {torch.get_num_threads()} threads; results in {out}", flush=True)
    try:
        for model in a.models:
            try:
                base = "default" if model == "embedded" else random_base(model, work / f"base-{model}", dtype=a.dtype,
                                                                          device=a.device)
            except Exception as e:  # noqa: BLE001 (recorded: the other models still run)
                for lora in a.lora:
                    r.rows += [{"mode": a.mode, "model": model, "lora": lora, "n": n, "device": a.device,
                                "dtype": a.dtype, "operation": "fine-tune (recorded)", "status": "failed",
                                "note": f"building the base: {type(e).__name__}: {e}"[:300]} for n in a.n]
                continue
            for lora in a.lora:
                for n in a.n:
                    print(f"{model}, LoRA {lora}, N = {n:,}", flush=True)
                    cfg = {"mode": a.mode, "model": model, "lora": lora, "n": n, "device": a.device, "dtype": a.dtype}
                    folder = work / f"{model}-{lora}-{n}"
                    try:
                        run_config(r, cfg, base, LORAS[lora], folder)
                    finally:
                        shutil.rmtree(folder, ignore_errors=True)
                        shutil.rmtree(folder.with_name(folder.name + ".factors"), ignore_errors=True)
                    r.write()
    finally:
        r.write()
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    print((out / "table.md").read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
