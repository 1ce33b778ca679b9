"""Updates along the recorded path (docs/path.md): the recording, exact rewind, path replay, refine, auto.

References: torch.optim.Adam (the flat Adam), fine-tuning itself (a rewind IS retraining: compared bit for bit; path
replay with every step exact IS retraining over the recorded batches: bit for bit), the closed-form ridge
leave-k-out solution (refine), the secant equations (Secant). The last test is the issue's goal on memorised
facts: a person-level removal through the command line with default options.
"""

from __future__ import annotations

import json

import pytest
import torch
from fixtures.tabular import TabularTask, linear_model, make_examples, regression_data, ridge_solution
from fixtures.tiny import fact_examples, tiny_llama, tiny_lora, tiny_tokenizer
from safetensors.torch import load_file

from llmeraser.cli import main
from llmeraser.data import load_examples, save_examples
from llmeraser.eraser import EraserArguments
from llmeraser.errors import AdapterError, ConfigError
from llmeraser.finetune import FinetuneArguments, finetune, run_steps
from llmeraser.metrics import evaluate
from llmeraser.params import ParamView
from llmeraser.recording import read, write
from llmeraser.replay import PathArguments, RefineArguments, Secant
from llmeraser.request import Request, apply_request, load_request, resolve
from llmeraser.task import CausalLMTask
from llmeraser.trajectory import Adam, AdamConfig, Trajectory
from llmeraser.updates import RequestContext
from llmeraser.updates.along_path import path_replay, refine, rewind
from llmeraser.updates.choose import StepCosts
from llmeraser.updates.choose import choose_update as choose
from llmeraser_experiments.memorised import PEOPLE_TARGETS, memorised_people

ARGS = FinetuneArguments(epochs=3, lr=1e-2, batch_size=4, final_check=False)


def ctx_of(model, task, train, request_) -> RequestContext:
    return RequestContext.build(model, task, train, request_)


# auto's forecast from fixed costs (no timing in tests): a gradient call costs its examples, nothing else costs
COUNTING = StepCosts(call=0.0, example=1.0, update=0.0, replay=0.0, forward=0.0)
NOT_MEMORISED = {"before": 1.0, "after": 1.0, "share": 1.0}  # the edited examples' loss as before they were seen


def choose_update(trajectory, why_not, train, request_, path, costs=COUNTING):
    return choose(trajectory, why_not, ctx_of(None, None, train, request_), path, costs, NOT_MEMORISED)


@pytest.fixture()
def lm():
    """A float64 tiny LoRA Llama at its init, the task, 22 facts (6 steps an epoch), and θ₀."""
    tok = tiny_tokenizer()
    model = tiny_lora(tiny_llama(len(tok), hidden=16, dtype=torch.float64, init_std=0.3), r=2)
    return model, CausalLMTask(tok, max_length=24), fact_examples(22, seed=3), ParamView(model).vector()


def fit(model, task, examples, theta0, args=ARGS):
    ParamView(model).set_vector(theta0)
    result = finetune(model, task, examples, args)
    return ParamView(model).vector(), result.trajectory


def test_flat_adam_is_torch_adam():
    gen = torch.Generator().manual_seed(0)
    theta = torch.randn(50, generator=gen, dtype=torch.float64)
    p = torch.nn.Parameter(theta.clone())
    opt = torch.optim.Adam([p], lr=1e-2, foreach=False)
    adam = Adam(AdamConfig(lr=1e-2, l2=0.1), theta)
    for _ in range(20):
        g = torch.randn(50, generator=gen, dtype=torch.float64)
        p.grad = g + 0.1 * p.detach()  # torch's Adam is given the l2 term in the gradient, as fine-tuning used to
        opt.step()
        theta = adam.step(theta, g)
    # the same elementwise formula; torch adds l2·θ to the gradient before the step, as Adam.step does, so the
    # only difference is whether that sum is formed inside or outside: one rounding of a float64 add per step
    assert torch.allclose(theta, p.detach(), rtol=0, atol=1e-13)


def test_flat_adamw_with_clipping_and_a_schedule_is_torchs():
    """The Trainer's step: clip_grad_norm_ to max_grad_norm, then AdamW (decoupled decay), at each step's lr."""
    gen = torch.Generator().manual_seed(1)
    theta = torch.randn(40, generator=gen, dtype=torch.float64)
    p = torch.nn.Parameter(theta.clone())
    opt = torch.optim.AdamW([p], lr=1e-2, weight_decay=0.1, foreach=False)
    adam = Adam(AdamConfig(lr=1e-2, weight_decay=0.1, max_grad_norm=1.0), theta)
    clipped = 0
    for k in range(20):
        lr = 1e-2 * (1 - k / 20)  # a linear schedule, as the Trainer's default
        g = torch.randn(40, generator=gen, dtype=torch.float64) * (0.05 if k % 2 else 1.0)  # some steps clip
        p.grad = g.clone()
        clipped += float(torch.nn.utils.clip_grad_norm_([p], 1.0)) > 1.0
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        theta = adam.step(theta, g, lr)
    assert clipped >= 5
    # the same formulas; torch computes the clip coefficient from a norm of norms and multiplies in place: a few
    # float64 roundings per step
    assert torch.allclose(theta, p.detach(), rtol=0, atol=1e-12)


def test_the_trajectory_rebuilds_the_fine_tune_bit_for_bit(lm, tmp_path):
    model, task, train, theta0 = lm
    theta, traj = fit(model, task, train, theta0)
    assert traj.steps == 18 and traj.grads.shape == (18, theta.numel())
    assert torch.equal(traj.final(), theta)  # replaying the recorded gradients is the fine-tune itself
    write(traj, tmp_path)
    back = read(tmp_path)
    assert back.meta == traj.meta and torch.equal(back.grads[:], traj.grads[:]) and torch.equal(back.theta0, theta0)
    back.check(train, theta)
    with pytest.raises(AdapterError, match="another training set"):
        back.check(train[:-1], theta)
    with pytest.raises(AdapterError, match="changed after fine-tuning"):
        back.check(train, theta + 1e-12)
    (tmp_path / "trajectory.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(AdapterError, match="unreadable"):
        read(tmp_path)
    # a readable file whose header lacks what a replay needs, or whose tensors do not fit together
    write(Trajectory({k: v for k, v in traj.meta.items() if k != "lr"}, traj.theta0, traj.grads, {}), tmp_path)
    with pytest.raises(AdapterError, match="'lr' is missing"):
        read(tmp_path)
    write(Trajectory(traj.meta, traj.theta0, traj.grads[:-1], {}), tmp_path)
    with pytest.raises(AdapterError, match="gradients of shape"):
        read(tmp_path)
    # checkpoints only: the adapter is still identified by the final θ's hash, and path replay refuses
    small = fit(model, task, train, theta0, FinetuneArguments(**{**vars(ARGS), "record_max_gib": 2e-6}))[1]
    small.check(train, theta)
    with pytest.raises(AdapterError, match="changed after fine-tuning"):
        small.check(train, theta + 1e-12)
    ParamView(model).set_vector(theta)
    with pytest.raises(ConfigError, match="checkpoints only"):
        path_replay(ctx_of(model, task, train, Request.remove("ex1")), small)


@pytest.mark.parametrize("request_", [
    Request.remove("ex9", "ex14"),
    Request.from_dict({"edits": [{"op": "correct_response", "id": "ex5", "response": " Maybe"},
                                 {"op": "modify_query", "id": "ex11", "prompt": "Does the owl like gold?"},
                                 {"op": "remove", "id": "ex2"}]}),
], ids=["remove", "mixed"])
@pytest.mark.parametrize("budget", [None, 2e-6], ids=["every-step", "checkpoints"])
def test_rewind_is_retraining_bit_for_bit(lm, request_, budget):
    model, task, train, theta0 = lm
    args = ARGS if budget is None else FinetuneArguments(**{**vars(ARGS), "record_max_gib": budget})
    theta, traj = fit(model, task, train, theta0, args)
    assert (traj.grads is None) == (budget is not None)  # 2e-6 GiB holds a few checkpoints, not 18 gradients
    ParamView(model).set_vector(theta)
    update = rewind(ctx_of(model, task, train, request_), traj)
    assert torch.equal(ParamView(model).vector(), theta)  # the model is left at θ̂
    edited = apply_request(train, request_)
    retrained, _ = fit(model, task, edited, theta0, args)
    assert torch.equal(update.theta, retrained)
    r = update.report["rewind"]
    assert r["rewound_to"] <= r["first_edited_step"] and r["replayed_steps"] == r["steps"] - r["rewound_to"]
    if budget is None:  # with checkpoints only: the latest checkpoint at or before it
        assert r["rewound_to"] == r["first_edited_step"]
    if request_.counts()["remove"] == 2:
        assert r["first_edited_step"] > 0  # so the shared prefix is really skipped
    # the rewound adapter carries its own exact recording: a second request rewinds from it, and equals
    # retraining on the twice-edited set
    if budget is None:
        update.trajectory.check(edited, retrained)
    second = Request.remove(edited[-1].id)
    ParamView(model).set_vector(retrained)
    again = rewind(ctx_of(model, task, edited, second), update.trajectory)
    twice, _ = fit(model, task, apply_request(edited, second), theta0, args)
    assert torch.equal(again.theta, twice)


@pytest.mark.parametrize("request_", [
    Request.remove("ex9", "ex14", "ex0"),
    Request.from_dict({"edits": [{"op": "correct_response", "id": "ex5", "response": " Maybe"},
                                 {"op": "modify_query", "id": "ex11", "prompt": "Does the owl like gold?"}]}),
], ids=["remove", "correct"])
def test_path_replay_with_every_step_exact_is_retraining_over_the_recorded_batches(lm, request_):
    model, task, train, theta0 = lm
    theta, traj = fit(model, task, train, theta0)
    ParamView(model).set_vector(theta)
    update = path_replay(ctx_of(model, task, train, request_), traj, PathArguments(exact_every=1, exact_tail=0))
    # the reference: fine-tuning's own loop over the recorded batches, edited examples dropped or replaced in place
    edits = {old.id: new for old, new in resolve(request_, train)}
    rows = [e if e.id not in edits else edits[e.id] for e in train]
    steps = [[i for i in b if rows[i] is not None] for b in traj.schedule(train)]
    first = next(k for k, b in enumerate(traj.schedule(train)) if any(train[i].id in edits for i in b))
    theta_first, adam = traj.state(first)
    ParamView(model).set_vector(theta_first)
    run_steps(model, task, rows, [s for s in steps if s], ParamView(model), adam, start=first)
    assert torch.equal(update.theta, ParamView(model).vector())
    r = update.report["path"]
    assert r["exact_steps"] == r["replayed_steps"] and r["predicted_steps"] == 0
    if request_.counts()["remove"] == 0:  # corrections keep the batches: this is retraining itself
        retrained, _ = fit(model, task, apply_request(train, request_), theta0)
        assert torch.equal(update.theta, retrained)


def test_path_replay_predicts_between_exact_steps_and_reports_it(lm):
    model, task, train, theta0 = lm
    theta, traj = fit(model, task, train, theta0)
    ParamView(model).set_vector(theta)
    request_ = Request.remove("ex9", "ex14")
    for args in (PathArguments(exact_every=3, exact_tail=0.25), PathArguments(exact_every=3, history=3)):
        r = path_replay(ctx_of(model, task, train, request_), traj, args).report["path"]
        assert r["exact_steps"] + r["predicted_steps"] + r["skipped_empty_steps"] == r["replayed_steps"]
        assert r["predicted_steps"] > 0 and r["exact_steps"] >= r["steps"] - r["exact_from_step"]
        assert 0 < r["gradient_cost_vs_retraining"] < 1
        # the prediction's error is measured on the exact steps with a secant model (without, it is 1 by definition)
        assert r["prediction_error"]["checks"] == (r["exact_steps"] if args.history else 0)
        assert r["kept_loss_check"]["examples"] == 20 and r["kept_loss_check"]["ratio"] > 0  # every kept example
        # auto's forecast counts the gradients exactly as the run does
        edits = {old.id: new for old, new in resolve(request_, train)}
        assert args.cost(traj.schedule(train), r["first_edited_step"], train, edits, 4) == \
            pytest.approx(r["gradient_cost_vs_retraining"], rel=1e-12)
    assert r["secant_pairs"] > 0


def test_secant_satisfies_the_newest_secant_equation_and_stays_positive_definite():
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    h = a @ a.T + 0.5 * torch.eye(6, dtype=torch.float64)
    sec = Secant(history=3)
    assert torch.equal(sec.matvec(torch.ones(6, dtype=torch.float64)), torch.zeros(6, dtype=torch.float64))
    for _ in range(5):
        s = torch.randn(6, generator=gen, dtype=torch.float64)
        assert sec.add(s, h @ s)
    assert len(sec.S) == 3
    assert torch.allclose(sec.matvec(sec.S[-1]), sec.Y[-1], atol=1e-10)  # B s = y for the newest pair (BFGS)
    b = torch.stack([sec.matvec(e) for e in torch.eye(6, dtype=torch.float64)])
    assert torch.allclose(b, b.T, atol=1e-10) and torch.linalg.eigvalsh((b + b.T) / 2)[0] > 0
    assert not sec.add(torch.ones(6, dtype=torch.float64), -torch.ones(6, dtype=torch.float64))  # sᵀy < 0: skipped
    assert sec.skipped == 1 and len(sec.S) == 3


def test_refine_reaches_the_leave_k_out_ridge_solution_and_certifies_it():
    x, y = regression_data(30, 4, seed=2)
    train, l2 = make_examples(x, y), 0.1
    model, task = linear_model(4), TabularTask()
    ParamView(model).set_vector(ridge_solution(train, l2))
    request_ = Request.remove("r3", "r17")
    # R′ is quadratic, so one undamped Newton step (4 CG iterations span the 4-dim space) lands on its minimiser
    update = refine(ctx_of(model, task, train, request_), torch.zeros(4, dtype=torch.float64),
                    RefineArguments(steps=3, tol=1e-8, cg_iters=8), EraserArguments(l2=l2), damping=0.0)
    target = ridge_solution(apply_request(train, request_), l2)
    assert torch.allclose(update.theta, target, atol=1e-10)
    r = update.report["refine"]
    assert r["residual_at_original"] > 1e-3 and r["residual_final"] < 1e-10 and len(r["history"]) == 2


def test_auto_rewinds_late_edits_replays_early_ones_and_falls_back_without_a_recording(lm):
    model, task, train, theta0 = lm
    theta, traj = fit(model, task, train, theta0)
    steps = traj.schedule(train)
    last = train[steps[-1][0]].id  # seen last in the final epoch, but also in every earlier epoch
    early = train[steps[0][0]].id
    path = PathArguments()
    assert choose_update(None, "no trajectory", train, Request.remove(early), path) == \
        ("first-order", "auto chose first-order: no trajectory")
    name, why = choose_update(traj, "", train, Request.remove(early), path)
    assert name == "path" and "step 0 of 18" in why
    one_epoch, traj1 = fit(model, task, train, theta0, FinetuneArguments(**{**vars(ARGS), "epochs": 1}))
    order = traj1.schedule(train)
    # one epoch: the exact tail cannot revisit every kept example, so even an early edit is rewound
    name, why = choose_update(traj1, "", train, Request.remove(train[order[0][0]].id), path)
    assert name == "rewind" and "would not revisit every kept example" in why
    assert choose_update(traj1, "", train, Request.remove(train[order[-1][0]].id), path)[0] == "rewind"
    assert choose_update(traj, "", train, Request.remove(last), path)[0] in ("path", "rewind")
    # correcting many examples: their gradients are taken twice on predicted steps, so path replay would not save
    # the margin over a rewind
    many = Request.from_dict({"edits": [{"op": "correct_response", "id": e.id, "response": " Maybe"}
                                        for e in train[:12]]})
    name, why = choose_update(traj, "", train, many, path)
    assert name == "rewind" and "margin" in why


def test_methods_through_the_command_line_and_their_errors(tmp_path, capsys):
    from fixtures.tiny import save_tiny_base

    save_tiny_base(tmp_path / "base")
    train = fact_examples(16, seed=1)
    save_examples(train, tmp_path / "train.jsonl")
    common = ["--base-model", str(tmp_path / "base"), "--dtype", "float64", "--quiet"]
    ft = ["--epochs", "2", "--lr", "1e-2", "--batch-size", "4", "--lora-r", "1", "--max-length", "24"]
    assert main(["finetune", *common, "--train", str(tmp_path / "train.jsonl"), "--out", str(tmp_path / "ft"),
                 *ft]) == 0
    assert (tmp_path / "ft" / "trajectory.safetensors").is_file()
    request_ = Request.remove("ex3", "ex8")
    (tmp_path / "r.json").write_text(json.dumps(request_.to_dict()))
    save_examples(apply_request(train, request_), tmp_path / "edited.jsonl")
    assert main(["finetune", *common, "--train", str(tmp_path / "edited.jsonl"), "--out", str(tmp_path / "re"),
                 *ft]) == 0
    un = ["unlearn", *common, "--adapter", str(tmp_path / "ft"), "--train", str(tmp_path / "train.jsonl"),
          "--request", str(tmp_path / "r.json")]
    assert main([*un, "--out", str(tmp_path / "rw"), "--method", "rewind"]) == 0
    ours, theirs = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("rw", "re"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)  # bit for bit
    report = json.loads((tmp_path / "rw" / "report.json").read_text())
    assert report["method"] == "rewind" and report["trajectory"]["per_step_gradients"]
    assert (tmp_path / "rw" / "trajectory.safetensors").is_file()  # exact: the next request can rewind too
    for method in ("path", "refine"):
        assert main([*un, "--out", str(tmp_path / method), "--method", method, "--refine-steps", "1"]) == 0
        assert json.loads((tmp_path / method / "report.json").read_text())["method"] == method
        assert not (tmp_path / method / "trajectory.safetensors").exists()  # approximate: no recording handed on
    # an adapter without a recording: path / rewind refuse with the reason, auto falls back to first-order
    (tmp_path / "bare").mkdir()
    for f in (tmp_path / "ft").iterdir():
        if f.name != "trajectory.safetensors":
            (tmp_path / "bare" / f.name).write_bytes(f.read_bytes())
    bare = [*un[:un.index("--adapter") + 1], str(tmp_path / "bare"), *un[un.index("--adapter") + 2:]]
    capsys.readouterr()
    assert main([*bare, "--out", str(tmp_path / "x"), "--method", "path"]) == 2
    assert "no trajectory.safetensors" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert main([*bare, "--out", str(tmp_path / "auto")]) == 0
    report = json.loads((tmp_path / "auto" / "report.json").read_text())
    assert report["method"] == "first-order" and "no trajectory" in report["update_choice"]
    # a recording that is not this adapter's fine-tune (weights changed afterwards): refused by name
    (tmp_path / "bare" / "trajectory.safetensors").write_bytes((tmp_path / "rw" / "trajectory.safetensors")
                                                                .read_bytes())
    assert main([*bare, "--out", str(tmp_path / "y"), "--method", "rewind"]) == 2
    assert "another training set" in capsys.readouterr().err


def test_memorised_person_removal_through_the_cli_with_default_options(tmp_path):
    """The issue's goal: pre-train a tiny Llama on question templates, fine-tune LoRA until it memorises 5 facts
    about each of 16 people, remove one whole person with `llmeraser unlearn` and no options: auto sees the facts
    were memorised and rewinds (retraining itself). Path replay, asked by name, must move the forgotten facts' loss at
    least 70% of the way to retraining's with the kept facts' no more than 10% above the original. Measured (float64,
    this CPU, 2 threads): forgotten 0.10 → 2.10 retrained, → 2.60 by path replay (1.25 of the way; retrains with
    other order seeds move 1.0–1.3 on this measure, docs/path.md#overshoot-on-memorised-removals); kept 0.196 → 0.201
    (1.02×). The margins (0.7 vs 1.25, 1.1 vs 1.02) are far above what rounding across CPUs can move in float64."""
    case = memorised_people(tmp_path)
    common = ["--base-model", str(case["base"]), "--dtype", "float64", "--quiet"]
    ft = ["--epochs", "30", "--lr", "1e-2", "--batch-size", "8", "--lora-r", "4", "--lora-alpha", "8",
          "--lora-targets", ",".join(PEOPLE_TARGETS), "--max-length", "32"]
    train = load_examples(case["train"])
    edited = apply_request(train, load_request(case["request"]))
    save_examples(edited, tmp_path / "edited.jsonl")
    assert main(["finetune", *common, "--train", str(case["train"]), "--out", str(tmp_path / "ft"), *ft]) == 0
    assert main(["finetune", *common, "--train", str(tmp_path / "edited.jsonl"), "--out", str(tmp_path / "re"),
                 *ft]) == 0
    unlearn = ["unlearn", *common, "--adapter", str(tmp_path / "ft"), "--train", str(case["train"]), "--request",
               str(case["request"])]
    assert main([*unlearn, "--out", str(tmp_path / "un")]) == 0
    report = json.loads((tmp_path / "un" / "report.json").read_text())
    # auto rewinds: the person's facts were memorised (their loss fell to ~0.05 of what it was before the run saw
    # them, far below the 0.5 line: no rounding moves that), where path replay overshoots retraining
    # (docs/path.md#overshoot-on-memorised-removals); a rewind is retraining, bit for bit
    assert report["method"] == "rewind" and report["update_choice"].startswith("auto chose rewind: fine-tuning "
                                                                              "memorised")
    assert report["update_memorised"]["share"] < 0.2
    # path replay by name: how far it forgets, and the kept facts intact
    assert main([*unlearn, "--out", str(tmp_path / "path"), "--method", "path"]) == 0
    report = json.loads((tmp_path / "path" / "report.json").read_text())
    from llmeraser.models import load_base_model
    from llmeraser.params import load_adapter

    forget = [e for e in train if e.id in set(case["removed"])]
    loss = {}
    for name in ("ft", "re", "un", "path"):
        base, tok = load_base_model(str(case["base"]), dtype="float64")
        model, task = load_adapter(base, tmp_path / name), CausalLMTask(tok, max_length=32)
        loss[name] = (evaluate(model, task, forget)["loss"], evaluate(model, task, edited)["loss"])
    (f0, k0), (f_re, _), (f_un, k_un) = loss["ft"], loss["re"], loss["path"]
    # the rewind is retraining: the same losses (float64 evaluation of equal weights)
    assert loss["un"] == loss["re"]
    assert f0 < 0.3 and f_re > 1.5  # memorised, and retraining forgets: the case is what it claims to be
    assert (f_un - f0) / (f_re - f0) >= 0.7
    assert k_un <= 1.1 * k0
    assert report["method"] == "path"
    check = report["path"]["kept_loss_check"]  # the report's own evidence agrees: a sample of kept facts
    assert check["examples"] == 64 and check["ratio"] < 1.1


# ------------------------------------------------------------------------------------------------ on disk, bfloat16
BF16 = FinetuneArguments(**{**vars(ARGS), "record_dtype": "bfloat16"})


def test_the_recording_is_spooled_to_disk_never_held_whole(lm, tmp_path):
    """No (steps × p) array exists at any point of fine-tuning, writing, reading and replaying: every tensor an
    operator makes is watched (a dispatch mode sees torch.empty, stack, cat, … alike) for a matrix of p columns
    and half the steps or more as rows (or as many elements flat); the old recorder's torch.empty((steps, p)) would
    be caught here. (p = 128 is also the vocabulary: the logits' rows, 24 or more, are above the 18 steps.)"""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    model, task, train, theta0 = lm
    p, n = theta0.numel(), 18
    big: list[tuple] = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            big.extend(tuple(t.shape) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and (
                (t.dim() == 2 and t.shape[1] == p and n // 2 <= t.shape[0] <= n)
                or (t.dim() == 1 and n * p // 2 <= t.numel() <= n * p)))
            return out

    ParamView(model).set_vector(theta0)
    with Watch():
        result = finetune(model, task, train, ARGS, record_dir=tmp_path / "spool")
        traj = result.trajectory
        spooled = list((tmp_path / "spool").glob(".trajectory.safetensors.*.tmp"))
        assert len(spooled) == 1 and traj.grads.keep.path == spooled[0]
        assert traj.grads.keep.size == p * 8 * n  # every step, float64
        write(traj, tmp_path)
        back = read(tmp_path)
        end = back.final()
    assert not big, big
    assert torch.equal(end, ParamView(model).vector()) and torch.equal(back.grads[3], traj.grads[3])
    del result, traj
    import gc

    gc.collect()
    assert not list((tmp_path / "spool").iterdir())  # the spool goes with the trajectory


def test_a_failed_run_leaves_no_spool(lm, tmp_path, monkeypatch):
    import importlib

    ft = importlib.import_module("llmeraser.finetune")  # the package exports a function of that name
    model, task, train, theta0 = lm
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("interrupted")
        return real(*args, **kwargs)

    real = ft.step_gradient
    monkeypatch.setattr(ft, "step_gradient", failing)
    with pytest.raises(RuntimeError, match="interrupted"):
        finetune(model, task, train, ARGS, record_dir=tmp_path)
    assert not list(tmp_path.iterdir())


def test_a_bfloat16_recording_round_trips_and_is_checksummed(lm, tmp_path):
    import struct

    model, task, train, theta0 = lm
    theta, traj = fit(model, task, train, theta0, BF16)
    assert traj.low_precision and traj.grads.dtype == torch.bfloat16 and traj.meta["checkpoint_every"] == 5
    assert sorted(traj.checkpoints) == [0, 5, 10, 15]  # ⌈√18⌉ = 5
    write(traj, tmp_path)
    back = read(tmp_path)
    assert back.meta == traj.meta and back.integrity.startswith("header and every tensor verified")
    assert all(torch.equal(back.grads.raw(k), traj.grads.raw(k)) for k in range(18))
    assert all(torch.equal(a, b) for k in traj.checkpoints for a, b in zip(back.checkpoints[k], traj.checkpoints[k],
                                                                             strict=True))
    back.replay_check(theta)  # each checkpoint interval within its rounding bound
    # a flipped byte in the last gradient row is named by its step
    path = tmp_path / "trajectory.safetensors"
    data = bytearray(path.read_bytes())
    assert struct.unpack("<Q", data[:8])[0] % 8 == 0
    data[-3] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(AdapterError, match="step 17's recorded gradient fails its checksum"):
        read(tmp_path)


def test_the_replay_check_of_a_bfloat16_recording_is_bounded_and_still_catches_a_forged_rate(lm):
    """Replaying rounded gradients from each checkpoint lands within `rounding_bound` of the next (the bound is a
    worst case over gradients: measured well inside it), while a doubled learning rate lands O(the move) away."""
    model, task, train, theta0 = lm
    theta, traj = fit(model, task, train, theta0, BF16)
    gaps = []
    for _k, _, _ in traj.states(anchor=lambda k, replayed, exact: gaps.append(
            (float((replayed - exact).abs().max()), traj.rounding_bound(k - 5, k)))):
        pass
    assert len(gaps) == 3 and all(0 < gap <= bound for gap, bound in gaps), gaps
    traj.meta["lr"] *= 2
    with pytest.raises(AdapterError, match="the header's learning rates"):
        traj.replay_check(theta)


@pytest.mark.parametrize("args", [ARGS, BF16], ids=["full", "bfloat16"])
def test_states_on_a_device_with_their_gradients_are_the_host_replay(lm, args):
    """What path replay iterates (`states(device=, with_grads=True)`) is the plain replay, state for state, with each
    step's recorded gradient beside its state: the same steps on the same values (the CPU is the device here; on a
    GPU the same loop runs there), checkpoint restarts included for a bfloat16 recording. Asking for states up to
    `stop` takes no Adam step past it (the yielded Adam is live: its step count tells)."""
    model, task, train, theta0 = lm
    _, traj = fit(model, task, train, theta0, args)
    plain = list(traj.states())
    rich = list(traj.states(device=ParamView(model).device, with_grads=True))
    assert [k for k, *_ in rich] == list(range(traj.steps + 1))
    for (k, theta, _), (k2, theta2, _, g) in zip(plain, rich, strict=True):
        assert k == k2 and torch.equal(theta, theta2)
        assert g is None if k == traj.steps else torch.equal(g, traj.grads[k])
    stop = 7
    *_, (k, _, adam) = traj.states(stop=stop)
    assert k == stop and adam.t == stop


@pytest.mark.parametrize("request_", [Request.remove("ex9", "ex14"), Request.remove("ex2")], ids=["late", "early"])
def test_a_bfloat16_recording_rewinds_exactly_as_a_full_one(lm, request_):
    """Bit for bit, whatever the gradients' precision: the full recording rebuilds θ_first by replaying its exact
    gradients (the fine-tune's state, bit for bit); the bfloat16 one restarts from the full-precision checkpoint
    c ≤ first (the fine-tune's state at c, copied) and retrains steps c … first−1, which hold no edited example:
    the same batches from the same state through the same deterministic loop (`run_steps`), so it reaches the very
    same θ_first, m, v, and from there both runs are one computation."""
    model, task, train, theta0 = lm
    theta, full = fit(model, task, train, theta0)
    theta_b, low = fit(model, task, train, theta0, BF16)
    assert torch.equal(theta, theta_b)  # recording does not change the fine-tune
    ParamView(model).set_vector(theta)
    a = rewind(ctx_of(model, task, train, request_), full)
    b = rewind(ctx_of(model, task, train, request_), low)
    assert torch.equal(a.theta, b.theta)
    ra, rb = a.report["rewind"], b.report["rewind"]
    assert rb["rewound_to"] <= ra["rewound_to"] == ra["first_edited_step"] and rb["rewound_to"] % 5 == 0
    assert b.trajectory.low_precision and b.trajectory.checkpoints  # the output's recording: the same kind


def test_path_replay_from_a_bfloat16_recording_stays_near_the_full_one(lm):
    """Path replay feeds the recorded gradients into Adam on its predicted steps, so rounding them by u = 2⁻⁸ moves
    its result by about what it moves the replay of the recording itself: within `rounding_bound` over the replayed
    steps (per coordinate), doubled for the exact steps' feedback through the curvature (their gradients are taken
    at a point that moved by that much). Not a theorem for the exact steps; bench/record_precision.py measured 0.005
    of the distance path replay moves (docs/path.md)."""
    model, task, train, theta0 = lm
    theta, full = fit(model, task, train, theta0)
    _, low = fit(model, task, train, theta0, BF16)
    ParamView(model).set_vector(theta)
    request_ = Request.remove("ex9", "ex14")
    a = path_replay(ctx_of(model, task, train, request_), full)
    b = path_replay(ctx_of(model, task, train, request_), low)
    first = a.report["path"]["first_edited_step"]
    gap = float((a.theta - b.theta).abs().max())
    assert 0 < gap <= 2 * low.rounding_bound(low.start_before(first), low.steps)
    assert float((a.theta - b.theta).norm()) < 0.05 * float((a.theta - theta).norm())


def test_a_format_2_recording_is_still_read_and_verified(lm, tmp_path):
    """Format 2 is format 3's full-precision layout: a file saved by safetensors itself (its own tensor order and
    padding) with a format-2 header is read lazily and verified as before."""
    import json as _json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from llmeraser.recording import _header_sha256

    model, task, train, theta0 = lm
    theta, traj = fit(model, task, train, theta0)
    write(traj, tmp_path)
    path = tmp_path / "trajectory.safetensors"
    with safe_open(str(path), framework="pt") as f:
        header = _json.loads(f.metadata()["llmeraser"])
        # copies: older safetensors map the file, and save_file below rewrites it in place
        tensors = {k: f.get_tensor(k).clone() for k in f.keys()}  # noqa: SIM118
    header["format"] = 2
    header["header_sha256"] = _header_sha256({k: v for k, v in header.items() if k != "header_sha256"})
    save_file(tensors, str(path), metadata={"llmeraser": _json.dumps(header)})
    back = read(tmp_path)
    assert back.integrity.startswith("header and every tensor verified") and not back.low_precision
    assert torch.equal(back.grads[:], tensors["grads"]) and torch.equal(back.final(), theta)
