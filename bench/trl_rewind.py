"""A chat adapter fine-tuned with TRL's SFTTrainer, unlearned by rewinding its recorded run: fidelity and cost against
an SFTTrainer retrain, in one run (docs/data.md#replaying-the-run).

    python bench/trl_rewind.py                 # the embedded SmolLM2-135M-Instruct on chat facts about people (minutes)
    python bench/trl_rewind.py --tiny          # a tiny offline chat Llama (seconds)
    python bench/trl_rewind.py --out DIR       # also results.json
    python bench/trl_rewind.py --no-recording --out DIR   # the same adapter trained without the callback (below)
    python bench/trl_rewind.py --no-recording --rows simnpo/stop:nll --out DIR   # only these unlearner rows

The data: the `people` facts as chats (user asks, assistant answers, the model's own chat template). SFTTrainer
fine-tunes LoRA on every linear layer with its defaults where they matter (AdamW, weight decay 0.01, linear decay,
clipping 1.0, random sampler) and `LLMEraserCallback` records the run. The request removes every fact of one
person. Reported: how well the recording replays (our step gradients vs the recorded ones; the replayed end vs the
saved adapter), then rewind and path replay against an SFTTrainer retrain without the person: seconds (the ratios
are the cost),
the removed person's and the kept facts' loss (token-weighted, as trained), and the distance between the adapters
(the retrain takes other batches: the rewind and it differ by SGD noise, which `noise` measures as the distance
between two SFTTrainer runs on the full set, same init, another data order).

`--no-recording`: the adapter SFTTrainer trained without `LLMEraserCallback` (most adapters in the wild), on
conversational prompt/completion records (TRL's completion-only loss), `--remove` whole people removed. Rows: doing
nothing, an SFTTrainer retrain without them, `llmeraser unlearn` with no options (auto: the one-step update), gradient
ascent and NPO at fixed learning rates (5 epochs over the removed facts), and the library's unlearners without a
recording (`npo`, `simnpo`, `gradient-difference`; `unlearn --method M --holdout FILE`, through `AdapterJob`) with
their stop rule, the holdout being `--heldout` held-out people's facts in the same format, never trained on. Each row:
TOFU's forget quality (KS p-value of the removed facts' truth ratios against the retrain's), model utility (TOFU's
harmonic mean on kept people's facts and general probes), time against the retrain, and the membership test of the
removed facts against the holdout (loss and min-k%++ AUC, verdict) with its distance to the retrain's own AUC
(`llmeraser_experiments.norecord`). `--spread` adds a second retrain from another seed (retrain@1): how far retraining
itself moves every measure. Writes results.json and table.md under --out.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

MAX_LENGTH = 96  # SFTTrainer's max_length
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def chats(n_people: int, seed: int = 0) -> tuple[list[dict], list[str]]:
    """(chat records of the people facts, the ids of the last person's facts)."""
    from llmeraser_experiments.people import build_people

    data = build_people(n_people, facts=5, seed=seed)
    records = [{"id": e.id, "messages": [{"role": "user", "content": e.prompt.strip()},
                                         {"role": "assistant", "content": e.response.strip()}]} for e in data.train]
    removed = [e.id for e in data.train if e.extra["person"] == data.people[-1]]
    return records, removed


def sft(base: Path, records: list[dict], out: Path, *, epochs: int, data_seed: int = 0, seed: int = 0,
        callback=None) -> float:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import SFTConfig, SFTTrainer

    set_seed(seed)  # LoRA's initial A, drawn before the Trainer seeds: the same for every run of one seed
    model = AutoModelForCausalLM.from_pretrained(base, attn_implementation="eager", dtype=torch.float32)
    config = SFTConfig(output_dir=str(out), max_length=MAX_LENGTH, per_device_train_batch_size=8,
                       num_train_epochs=epochs,
                       learning_rate=2e-3, weight_decay=0.01, max_grad_norm=1.0, bf16=False,
                       gradient_checkpointing=False, report_to=[], save_strategy="no", use_cpu=True, seed=seed,
                       data_seed=data_seed,
                       disable_tqdm=True, logging_steps=10**6)
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(records),
                         processing_class=AutoTokenizer.from_pretrained(base),
                         peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0),
                         callbacks=[callback] if callback else [])
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    trainer.save_model(str(out))
    return seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a tiny offline chat model instead of the embedded one")
    p.add_argument("--people", type=int, default=20, help="people (5 facts each)")
    p.add_argument("--epochs", type=int, default=3, help="SFTTrainer epochs")
    p.add_argument("--out", default=None, help="write results.json here")
    p.add_argument("--no-recording", action="store_true",
                   help="no callback: the unlearners without a recording against retraining (see above)")
    p.add_argument("--remove", type=int, default=3, help="--no-recording: people removed (5 facts each)")
    p.add_argument("--heldout", type=int, default=6, help="--no-recording: held-out people (the holdout)")
    p.add_argument("--rows", nargs="+", default=None, metavar="LABEL",
                   help="--no-recording: the library's unlearner rows (labels of llmeraser_experiments.norecord."
                        "NORECORD); default: its DECLARED rows")
    p.add_argument("--spread", action="store_true",
                   help="--no-recording: also a second retrain from another seed (row retrain@1; LoRA draw, data "
                        "order): retraining's own spread on every measure, the evidence's included")
    a = p.parse_args(argv)
    torch.set_num_threads(2)
    if a.no_recording:
        return no_recording(a)
    from llmeraser.callback import LLMEraserCallback
    from llmeraser.finetune import step_gradient
    from llmeraser.job import AdapterJob
    from llmeraser.params import ParamView, load_adapter
    from llmeraser.request import Request
    from llmeraser.table import format_table
    from llmeraser.task import per_example_loss

    root = Path(tempfile.mkdtemp(prefix="llmeraser-trl-"))
    records, removed = chats(a.people)
    if a.tiny:
        from llmeraser.testing import tiny_llama, tiny_tokenizer

        tok = tiny_tokenizer([m["content"] for r in records for m in r["messages"]], vocab_size=600, chat=True)
        tiny_llama(len(tok), hidden=64, layers=2, dtype=torch.float32, init_std=0.1).save_pretrained(root / "base")
        tok.save_pretrained(root / "base")
        base = root / "base"
    else:
        from llmeraser.models import embedded_model_dir

        base = embedded_model_dir()
    (root / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    kept = [r for r in records if r["id"] not in removed]
    t_train = sft(base, records, root / "adapter", epochs=a.epochs, callback=LLMEraserCallback(root / "chat.jsonl"))
    t_retrain = sft(base, kept, root / "retrain", epochs=a.epochs)
    sft(base, records, root / "noise", epochs=a.epochs, data_seed=1)

    job = AdapterJob(root / "adapter", root / "chat.jsonl", base_model=str(base))
    model, task = job.model_and_task()
    trajectory, why = job.trajectory(job.train)
    if trajectory is None:
        print(f"no usable recording: {why}", file=sys.stderr)
        return 1
    view = ParamView(model)
    theta_hat = view.vector()
    steps, errors = trajectory.schedule(job.train), []
    for k, theta, _ in trajectory.states(stop=min(10, trajectory.steps - 1)):
        view.set_vector(theta)
        g, _ = step_gradient(model, task, job.train, steps[k], view)
        errors.append(float((g - trajectory.grads[k]).norm() / trajectory.grads[k].norm()))
    view.set_vector(theta_hat)
    end = float((trajectory.final() - theta_hat).norm() / (theta_hat - trajectory.theta0).norm())
    from llmeraser.replay import PathArguments
    from llmeraser.updates import RequestContext, UnlearnOptions
    from llmeraser.updates.choose import choose_update

    request = Request.remove(*removed)
    _, choice = choose_update(trajectory, "", RequestContext.build(model, task, job.train, request), PathArguments())
    start = time.perf_counter()
    result = job.unlearn(request, root / "rewound", UnlearnOptions(method="rewind"))
    t_rewind = time.perf_counter() - start
    start = time.perf_counter()
    path = job.unlearn(request, root / "path", UnlearnOptions(method="path"))
    t_path = time.perf_counter() - start

    def load(name: str):
        from llmeraser.models import load_base_model

        b, _ = load_base_model(str(base))
        return load_adapter(b, root / name)

    forget = [e for e in job.train if e.id in set(removed)]
    keep = [e for e in job.train if e.id not in set(removed)][:64]
    thetas, rows = {}, []
    for name in ("adapter", "rewound", "path", "retrain", "noise"):
        m = load(name)
        thetas[name] = ParamView(m).vector()
        with torch.no_grad():
            rows.append({"adapter": name, "forget": float(per_example_loss(task, m, task.collate(forget)).mean()),
                         "kept": float(per_example_loss(task, m, task.collate(keep)).mean())})
    for row in rows:
        row["to_retrain"] = float((thetas[row["adapter"]] - thetas["retrain"]).norm())
    noise = float((thetas["noise"] - thetas["adapter"]).norm())  # the same data and init, another order
    r = result.update.report["rewind"]
    summary = {"model": "tiny chat Llama" if a.tiny else "SmolLM2-135M-Instruct", "examples": len(records),
               "removed": len(removed), "steps": trajectory.steps, "replayed_steps": r["replayed_steps"],
               "step_gradient_error_max": max(errors), "replayed_end_error": end,
               "seconds": {"sft_train": t_train, "sft_retrain": t_retrain, "rewind": t_rewind, "path": t_path},
               "rewind_vs_retrain_time": t_rewind / t_retrain, "path_vs_retrain_time": t_path / t_retrain,
               "path": {k: path.update.report["path"][k] for k in ("exact_steps", "predicted_steps",
                                                                     "gradient_cost_vs_retraining")},
               "auto": choice, "noise_between_orders": noise, "rows": rows}
    print(format_table(rows, [("adapter", "adapter", ""), ("forget", "removed person's loss", ".4f"),
                              ("kept", "kept facts' loss", ".4f"), ("to_retrain", "‖θ − θ_retrain‖", ".4f")]))
    print(f"\n{summary['model']}, {len(records)} chats, {trajectory.steps} steps; rewind replayed "
          f"{r['replayed_steps']} from step {r['rewound_to']}: {t_rewind:.1f} s vs SFTTrainer retrain "
          f"{t_retrain:.1f} s (ratio {t_rewind / t_retrain:.2f}); step gradients vs recorded ≤ {max(errors):.1e}, "
          f"replayed end vs saved adapter {end:.1e}; two data orders differ by {noise:.4f}")
    print(f"path replay: {path.update.report['path']['exact_steps']} exact, "
          f"{path.update.report['path']['predicted_steps']} predicted steps, {t_path:.1f} s (ratio "
          f"{t_path / t_retrain:.2f}); {choice}")
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "results.json").write_text(json.dumps(summary, indent=2))
    shutil.rmtree(root, ignore_errors=True)
    return 0



# ------------------------------------------------------------------------------------------- without a recording
def chat_people(a) -> dict:
    """The people as conversational prompt/completion Examples (their `extra` kept: paraphrases, perturbed answers,
    values): train, the removed people's facts, kept people's facts to score, the holdout, the general probes."""
    from llmeraser.data import Example, Message
    from llmeraser_experiments.people import build_people

    data = build_people(a.people, facts=5, n_heldout=a.heldout, seed=0)

    def chat(e: Example) -> Example:
        return Example(e.id, (Message("user", e.prompt.strip()),), (Message("assistant", e.response.strip()),),
                       dict(e.extra), "prompt-completion")

    train = [chat(e) for e in data.train]
    gone = set(data.people[-a.remove:])
    return {"train": train, "forget": [e for e in train if e.extra["person"] in gone],
            "retain": [e for e in train if e.extra["person"] in data.people[:a.remove]],
            "holdout": [chat(e) for e in data.heldout], "general": [chat(e) for e in data.general]}


def _record(e) -> dict:
    return {"id": e.id, "prompt": [m.to_dict() for m in e.prompt], "completion": [m.to_dict() for m in e.response]}


def score_row(model, task, view, theta, sets: dict, reference: dict | None) -> tuple[dict, dict]:
    """(the row's measures at θ, the forget set's scores): TOFU's forget quality against the retrain's truth ratios
    (`reference`; None: this is the retrain), utility, the removed facts said, and the holdout evidence."""
    from llmeraser_experiments import forgetting as fg
    from llmeraser_experiments import norecord as nr

    view.set_vector(theta)
    s = fg.score_questions(model, task, [*sets["forget"], *sets["retain"], *sets["general"]])
    s.update(fg.score_questions(model, task, sets["holdout"], generate=False))
    ids = {k: [e.id for e in sets[k]] for k in ("forget", "retain", "general", "holdout")}
    ref = reference or s
    out = {"forget": fg.summarise(s, ids["forget"], truth="forget"), "retain": fg.summarise(s, ids["retain"]),
           "general": fg.summarise(s, ids["general"])}
    out["forget_quality"] = fg.ks_pvalue([s[i]["truth_ratio"] for i in ids["forget"]],
                                         [ref[i]["truth_ratio"] for i in ids["forget"]])
    out["model_utility"] = fg.model_utility(out["retain"], out["general"])
    out["forget_facts_said"] = sum(e.extra["value"].lower() in s[e.id]["answer"].lower()
                                   for e in sets["forget"]) / len(sets["forget"])
    out["evidence"] = nr.evidence_entry(model, task, sets["forget"], sets["holdout"])
    return out, s


def no_recording(a) -> int:
    """The rows without a recording (the module's docstring); results.json and table.md under --out."""
    from llmeraser.job import AdapterJob
    from llmeraser.models import load_base_model
    from llmeraser.params import ParamView, load_adapter
    from llmeraser.request import Request
    from llmeraser.updates import UnlearnOptions
    from llmeraser.updates.stop import ForgetArguments
    from llmeraser_experiments import norecord as nr

    root = Path(tempfile.mkdtemp(prefix="llmeraser-trl-norecord-"))
    sets = chat_people(a)
    base = tiny_chat_base(root, sets) if a.tiny else None
    if base is None:
        from llmeraser.models import embedded_model_dir

        base = embedded_model_dir()
    removed = {e.id for e in sets["forget"]}
    (root / "chat.jsonl").write_text("".join(json.dumps(_record(e)) + "\n" for e in sets["train"]))
    t_train = sft(base, [_record(e) for e in sets["train"]], root / "adapter", epochs=a.epochs)

    def retrain(seed: int) -> tuple[torch.Tensor, float]:  # (θ, seconds) of an SFTTrainer run without the removed
        out = root / f"retrain{seed or ''}"
        seconds = sft(base, [_record(e) for e in sets["train"] if e.id not in removed], out, epochs=a.epochs,
                      seed=seed, data_seed=seed)
        return ParamView(load_adapter(load_base_model(str(base))[0], out)).vector(), seconds

    theta_retrain, t_retrain = retrain(0)
    request = Request.remove(*sorted(removed))
    # what a user passes for an adapter without a record: the fine-tune's max_length (`sft`'s), else 64 is assumed
    model, task = AdapterJob(root / "adapter", root / "chat.jsonl", base_model=str(base),
                             max_length=MAX_LENGTH).model_and_task()
    view = ParamView(model)
    theta_hat = view.vector()
    thetas = {"original": (theta_hat, 0.0, {}), "retrain": (theta_retrain, t_retrain, {})}
    if a.spread:
        thetas["retrain@1"] = (*retrain(1), {"seed": 1})

    def unlearn(name: str, options: UnlearnOptions, holdout=None):  # `llmeraser unlearn`, its own model load
        start = time.perf_counter()
        job = AdapterJob(root / "adapter", root / "chat.jsonl", base_model=str(base), max_length=MAX_LENGTH)
        result = job.unlearn(request, str(root / name.replace("/", "-").replace(":", "-")), options, holdout=holdout)
        seconds = time.perf_counter() - start
        update = result.update
        theta = (theta_hat if result.status != "applied" else update.theta if update.theta is not None
                 else theta_hat + update.delta.to(theta_hat.dtype))
        info = {"status": result.status, "method_run": update.report.get("method"),
                "report_evidence": update.report.get("evidence", {}).get("status")}
        if name in nr.NORECORD:
            info |= nr.stop_info(update.report[options.method])
        return theta.to(theta_hat.dtype), seconds, info

    thetas["one-step (unlearn, no options)"] = unlearn("one-step", UnlearnOptions())
    for objective, label in (("gradient-difference", "gradient-ascent"), ("npo", "npo")):
        for lr in (1e-4, 1e-3):
            theta, seconds = nr.fixed_rate(model, task, view, theta_hat, sets["forget"], objective, lr, 5)
            thetas[f"{label} lr={lr:g}"] = (theta, seconds, {"lr": lr, "epochs": 5})
    unknown = set(a.rows or ()) - set(nr.NORECORD)
    if unknown:
        print(f"error: unknown --rows {sorted(unknown)}; expected labels of {', '.join(nr.NORECORD)}", file=sys.stderr)
        return 2
    for name in a.rows or nr.DECLARED:
        method, overrides = nr.NORECORD[name]
        thetas[name] = unlearn(name, UnlearnOptions(method=method, forget=ForgetArguments(**overrides)),
                               holdout=sets["holdout"])
    _, reference = score_row(model, task, view, theta_retrain, sets, None)
    rows = []
    for name, (theta, seconds, info) in thetas.items():
        measures, _ = score_row(model, task, view, theta, sets, reference)
        rows.append({"split": f"remove{a.remove}", "method": name, "total": seconds, "time_ratio": seconds / t_retrain,
                     **info, **measures})
    nr.add_gaps(rows)
    summary = {"model": "tiny chat Llama" if a.tiny else "SmolLM2-135M-Instruct", "examples": len(sets["train"]),
               "removed": len(removed), "holdout": len(sets["holdout"]), "retain_scored": len(sets["retain"]),
               "general": len(sets["general"]), "epochs": a.epochs,
               "seconds": {"sft_train": t_train, "sft_retrain": t_retrain}, "rows": rows, "goals": nr.goals(rows)}
    columns = [("method", "method", ""), ("forget_quality", "forget quality", ".2g"),
               ("forget_facts_said", "removed facts said", ".2f"), ("model_utility", "utility", ".3f"),
               ("time_ratio", "time/retrain", ".3f"), ("evidence.loss_auc", "ev loss AUC", ".2f"),
               ("evidence.min_k_pp_auc", "ev min-k%++ AUC", ".2f"), ("evidence.says", "ev verdict", ""),
               ("evidence.gap", "|ΔAUC| vs retrain", ".2f"), ("steps", "steps", ".4g"), ("stop.met", "stop met", "")]
    table = "\n".join(["| " + " | ".join(h for _, h, _ in columns) + " |", "|---|" + "---:|" * (len(columns) - 1),
                       *("| " + " | ".join("—" if _get(r, k) is None else format(_get(r, k), f)
                                           for k, _, f in columns) + " |" for r in rows)])
    print(table)
    print(json.dumps(summary["goals"], indent=1))
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "results.json").write_text(json.dumps(summary, indent=2, default=str))
        (Path(a.out) / "table.md").write_text(table + "\n")
    shutil.rmtree(root, ignore_errors=True)
    return 0


def _get(row: dict, key: str):
    for part in key.split("."):
        row = row.get(part) if isinstance(row, dict) else None
    return row


def tiny_chat_base(root: Path, sets: dict) -> Path:
    """A tiny offline chat Llama whose tokenizer knows every text the run scores (answers, paraphrases, probes)."""
    from llmeraser.testing import tiny_llama, tiny_tokenizer

    examples = [e for k in ("train", "holdout", "general") for e in sets[k]]
    texts = [m.content for e in examples for m in (*e.prompt, *e.response)]
    texts += [t for e in examples for t in (e.extra["paraphrase"], *e.extra["perturbed"])]
    tok = tiny_tokenizer(texts, vocab_size=600, chat=True)
    tiny_llama(len(tok), hidden=64, layers=2, dtype=torch.float32, init_std=0.1).save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    return root / "base"


if __name__ == "__main__":
    sys.exit(main())
