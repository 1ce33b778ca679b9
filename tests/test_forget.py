"""The unlearners that need no recording (`updates.forget`) and their stop rule (`updates.stop`).

Each objective against its closed form computed another way (the sequence log-likelihood gathered from the model's
full logits, not the task's response-position logits); NPO's value and gradient at θ = θ_ref derived by hand; the KL
retain term's zero at θ̂ and the step gradient's θ̂ toggle against an explicitly stored reference; the membership test
against hand-counted pairs. Then on a tiny model fine-tuned here to memorise random facts: the unlearner stops when
the forgotten facts look like a holdout (never past it), a correction is learned, the cap says 'not met', and auto
picks the unlearner only with a holdout and no recording.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F
from fixtures.tiny import tiny_lora_lm
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from llmeraser.data import Example, Message
from llmeraser.errors import ConfigError, UserInputError
from llmeraser.evidence import CALIBRATED, evidence
from llmeraser.finetune import FinetuneArguments, finetune
from llmeraser.params import ParamView
from llmeraser.replay import PathArguments
from llmeraser.request import Edit, Request
from llmeraser.task import IGNORE_INDEX, CausalLMTask, Rendering, per_example_loss
from llmeraser.testing import tiny_llama, tiny_lora
from llmeraser.updates import RequestContext, UnlearnOptions, get_method, method_names
from llmeraser.updates.choose import StepCosts, choose_update, would_add
from llmeraser.updates.forget import DEFAULT, KEPT_PER_FORGOTTEN, Knobs, _Run, forget_loss, resolve_defaults, retain_kl
from llmeraser.updates.stop import (
    LESS,
    LOOKS_LIKE,
    MORE,
    STALE_MARGIN,
    STALE_RUN,
    ForgetArguments,
    HoldoutStop,
    token_floor,
    token_nll,
)

ANIMALS = ["cat", "dog", "fox", "owl", "bee", "cow", "eel", "yak", "ant", "bat"]
COLORS = ["red", "blue", "green", "black", "white", "gold", "pink", "grey", "teal", "plum"]
FT_LR, FT_EPOCHS, FT_BATCH = 1e-2, 100, 8


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the facts' 28 words (a small softmax keeps the model cheap)."""
    words = ["<pad>", "<s>", "</s>", "Does", "the", "like", "?", *ANIMALS, *COLORS]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def random_facts(seed: int = 0) -> list[Example]:
    """100 facts: each (animal, colour) question answered by two random words, so an unseen fact's answer is one of
    100 and only memorisation gets a trained one right."""
    rng = random.Random(seed)
    pairs = [(a, c) for a in ANIMALS for c in COLORS]
    rng.shuffle(pairs)
    return [Example(id=f"f{i}", prompt=f"Does the {a} like {c} ?",
                    response=f" {rng.choice(ANIMALS)} {rng.choice(COLORS)}") for i, (a, c) in enumerate(pairs)]


@pytest.fixture(scope="module")
def memorised():
    """(model, task, train (60), holdout (40), θ̂): a float64 tiny Llama (logit scale 25, as test_tiny_lm's) with LoRA
    r = 8 on every projection, fine-tuned by llmeraser's own loop for 100 epochs on 60 random facts (~10 s)."""
    tok = word_tokenizer()
    base = tiny_llama(len(tok), hidden=16, dtype=torch.float64)
    with torch.no_grad():
        base.model.norm.weight.mul_(25.0)
    model = tiny_lora(base, r=8, targets=("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj",
                                          "gate_proj"))
    task = CausalLMTask(tok, max_length=24)
    facts = random_facts()
    train, holdout = facts[:60], facts[60:]
    finetune(model, task, train, FinetuneArguments(epochs=FT_EPOCHS, lr=FT_LR, batch_size=FT_BATCH, record=False,
                                                   final_check=False))
    return model, task, train, holdout, ParamView(model).vector()


def context(memorised, request, **kw) -> RequestContext:
    model, task, train, holdout, theta_hat = memorised
    ParamView(model).set_vector(theta_hat)
    ctx = RequestContext.build(model, task, train, request, holdout=kw.pop("holdout", holdout), **kw)
    ctx.report["task"] = {"optimizer": {"lr": FT_LR, "batch_size": FT_BATCH, "epochs": FT_EPOCHS}}
    return ctx


def mean_loss(model, task, examples, theta) -> float:
    ParamView(model).set_vector(theta)
    with torch.no_grad():
        return float(per_example_loss(task, model, task.collate(examples)).mean())


def sequence_logprob(model, task, examples) -> tuple[torch.Tensor, torch.Tensor]:
    """(log π(y|x), |y|) per example from the model's logits at every position (not the task's positions), with the
    graph: the independent closed form the objectives are checked against."""
    batch = task.collate(examples)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    valid = labels != IGNORE_INDEX
    logp = F.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return (logp * valid).sum(1), valid.sum(1).to(logp.dtype)


def grad(value: torch.Tensor, model) -> torch.Tensor:
    view = ParamView(model)
    return view.flatten(list(torch.autograd.grad(value, view.params, allow_unused=True)))


# ------------------------------------------------------------------------------------------------ the objectives
def test_npo_at_the_reference_is_2_over_beta_log_2_with_gradient_ascent_on_the_summed_nll():
    """NPO(θ) = (2/β) log(1 + (π_θ/π_ref)^β). At θ = θ_ref the ratio is 1: the value is (2/β) log 2 per example, and
    ∇ = (2/β) · σ(0) · β · ∇log π = ∇log π = −∇(Σ token NLL), gradient ascent on the summed NLL. Away from θ_ref it
    equals the closed form evaluated from log π gathered on the full logits. float64: agreement to rounding."""
    model, task, examples = tiny_lora_lm(6)
    beta = 0.1
    batch = task.collate(examples)
    loss, mean, total, _ = token_nll(task, model, batch)
    value = forget_loss("npo", loss, mean, total, total.detach(), beta, 0.0)
    assert torch.allclose(value, torch.full_like(value, 2 / beta * math.log(2)), rtol=0, atol=1e-12)
    logp, _ = sequence_logprob(model, task, examples)
    assert torch.allclose(-total, logp, rtol=1e-10, atol=1e-12)  # Σ NLL is −log π(y|x)
    assert torch.allclose(grad(value.sum(), model), grad(logp.sum(), model), rtol=1e-9, atol=1e-12)
    # away from θ_ref: the closed form (2/β) log(1 + exp(β (log π − log π_ref))), value and gradient
    reference = total.detach()
    view = ParamView(model)
    view.set_vector(view.vector() + 0.05 * torch.randn(view.dim, generator=torch.Generator().manual_seed(1),
                                                      dtype=torch.float64))
    loss, mean, total, _ = token_nll(task, model, task.collate(examples))
    ours = forget_loss("npo", loss, mean, total, reference, beta, 0.0)
    logp, _ = sequence_logprob(model, task, examples)
    closed = 2 / beta * torch.log1p((beta * (logp + reference)).exp())
    assert not torch.allclose(ours, torch.full_like(ours, 2 / beta * math.log(2)))  # moved off the reference
    assert torch.allclose(ours, closed, rtol=1e-10)
    assert torch.allclose(grad(ours.sum(), model), grad(closed.sum(), model), rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("normalization", ["example", "token"])
def test_the_token_floor_caps_each_token_at_the_base_models_nll(normalization):
    """With the floor, −log π(y|x) is Σ_t min(NLL_θ,t, NLL_base,t): checked against both NLLs gathered per token on the
    full logits (the adapter on, then disabled), value and gradient (a token past its floor adds nothing). A floor of
    +inf is the unfloored objective; a floor of 0 leaves nothing to gain (value and gradient 0). float64 throughout:
    agreement to rounding."""
    model, task, examples = tiny_lora_lm(5)
    if normalization == "token":
        task = CausalLMTask(task.tokenizer, max_length=24, rendering=Rendering(normalization="token"))
        task.calibrate(examples)
    view = ParamView(model)  # move off θ̂ so the adapter changes the NLLs (LoRA's B starts at 0)
    view.set_vector(view.vector() + 0.3 * torch.randn(view.dim, generator=torch.Generator().manual_seed(2),
                                                     dtype=torch.float64))
    batch = task.collate(examples)
    floor = token_floor(task, model, batch)
    assert floor is not None and not floor.requires_grad
    full = task.collate(examples)
    logits = model(input_ids=full["input_ids"], attention_mask=full["attention_mask"]).logits[:, :-1]
    with model.disable_adapter():
        base_logits = model(input_ids=full["input_ids"], attention_mask=full["attention_mask"]).logits[:, :-1]
    labels = full["labels"][:, 1:]
    valid = labels != IGNORE_INDEX

    def nll(z):
        return -F.log_softmax(z, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0] * valid

    capped = torch.minimum(nll(logits), nll(base_logits).detach())
    assert bool(((nll(logits) > nll(base_logits)) & valid).any())  # some token is past its floor: the cap bites
    loss, mean, total, _ = token_nll(task, model, batch, floor)
    assert torch.allclose(total, capped.sum(1), rtol=1e-10, atol=1e-12)
    assert torch.allclose(mean, capped.sum(1) / valid.sum(1), rtol=1e-10, atol=1e-12)
    divisor = task.token_scale if normalization == "token" else valid.sum(1)
    assert torch.allclose(loss, capped.sum(1) / divisor, rtol=1e-10, atol=1e-12)
    assert torch.allclose(grad(total.sum(), model), grad(capped.sum(), model), rtol=1e-8, atol=1e-12)
    plain = token_nll(task, model, batch)
    inf = token_nll(task, model, batch, torch.full_like(floor, math.inf))
    for a, b in zip(plain[:3], inf[:3], strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    zero = token_nll(task, model, batch, torch.zeros_like(floor))[2]
    assert torch.equal(zero, torch.zeros_like(zero)) and not grad(zero.sum(), model).any()
    assert token_floor(task, torch.nn.Identity(), batch) is None  # nothing to disable: no floor


@pytest.mark.parametrize("normalization", ["example", "token"])
def test_simnpo_and_gradient_difference_against_their_closed_forms(normalization):
    """SimNPO = −(2/β) log σ(−(β/|y|) log π_θ(y|x) − γ), with log π and |y| counted on the full logits and labels;
    gradient difference's forget part is −ℓ, the task's own loss. Under the token-weighted mean (ℓ = Σ NLL / t̄) the
    length-normalised NLL must still be Σ NLL / |y|, not ℓ."""
    model, task, examples = tiny_lora_lm(5)
    if normalization == "token":
        task = CausalLMTask(task.tokenizer, max_length=24, rendering=Rendering(normalization="token"))
        task.calibrate(examples + [Example(id="long", prompt="Does the fox", response=" like red? Yes")])
    beta, gamma = 0.5, 0.3
    loss, mean, total, _ = token_nll(task, model, task.collate(examples))
    logp, length = sequence_logprob(model, task, examples)
    closed = -2 / beta * F.logsigmoid(-(beta / length) * logp - gamma)
    ours = forget_loss("simnpo", loss, mean, total, None, beta, gamma)
    assert torch.allclose(ours, closed, rtol=1e-10)
    assert torch.allclose(grad(ours.sum(), model), grad(closed.sum(), model), rtol=1e-8, atol=1e-12)
    assert torch.equal(forget_loss("gradient-difference", loss, mean, total, None, beta, gamma), -loss)
    with pytest.raises(ValueError, match="unknown forget objective"):
        forget_loss("nope", loss, mean, total, None, beta, gamma)


def test_the_retain_term_takes_the_kept_facts_that_share_rare_tokens_with_the_forgotten_first():
    """`retain_order`: the kept fact with the forgotten fact's value ("librarian") comes first; facts sharing only the
    template follow; one that shares no response token (a token every kept response has weighs log(5/5) = 0) comes
    last; ties stay in the seeded random order; "random" is that order. Checked against the weights by hand."""
    import random as rnd

    from llmeraser.task import CausalLMTask
    from llmeraser.testing import tiny_tokenizer
    from llmeraser.updates.forget import retain_order

    texts = ["Ann works as a librarian.", "Bob works as a librarian.", "Cy works as a sailor.",
             "Dee lives in Oslo.", "Eve works as a sailor.", "Job?"] * 20
    task = CausalLMTask(tiny_tokenizer(texts, vocab_size=320), max_length=32)
    forgotten = [Example("f", "Job?", " Ann works as a librarian.")]
    kept = [Example("k1", "Job?", " Bob works as a librarian."), Example("k2", "Job?", " Cy works as a sailor."),
            Example("k3", "Job?", " Dee lives in Oslo."), Example("k4", "Job?", " Eve works as a sailor.")]
    order = list(range(4))
    rnd.Random(3).shuffle(order)
    assert [e.id for e in retain_order(task, forgotten, kept, "random", 3)] == [kept[i].id for i in order]
    ranked = [e.id for e in retain_order(task, forgotten, kept, "overlap", 3)]
    assert ranked[0] == "k1" and ranked[-1] == "k3"
    assert ranked[1:3] == [kept[i].id for i in order if kept[i].id in ("k2", "k4")]  # a tie: the random order
    assert retain_order(task, [], kept, "overlap", 3) == [kept[i] for i in order]


def test_kl_retain_term_is_zero_with_zero_gradient_at_the_original_and_positive_away():
    """KL(p ‖ q) = Σ p (log p − log q) ≥ 0, = 0 iff q = p, and its gradient in q's logits is q − p: both exactly 0 at
    θ̂ (the same logits; float64 rounding of log_softmax is identical on identical inputs, so the bound is tiny)."""
    model, task, examples = tiny_lora_lm(4)
    batch = task.collate(examples)
    outputs = task.forward(model, batch)
    reference = F.log_softmax(outputs.detach(), -1)
    kl = retain_kl(reference, outputs, batch)
    assert kl.abs().max() <= 1e-15
    assert grad(kl.sum(), model).abs().max() <= 1e-14
    view = ParamView(model)
    view.set_vector(view.vector() + 0.1)
    moved = task.forward(model, batch)
    kl = retain_kl(reference, moved, batch)
    valid = batch["targets"] != IGNORE_INDEX
    by_torch = (F.kl_div(F.log_softmax(moved, -1), reference, log_target=True, reduction="none").sum(-1) * valid)
    assert torch.allclose(kl, by_torch.sum(1) / valid.sum(1), rtol=1e-10) and (kl > 0).all()


def test_a_step_gradient_is_the_full_objective_with_the_original_adapter_as_reference(memorised):
    """`_Run.gradient` sets θ to θ̂ for the retain batch's reference distribution and back: its result must be the
    autograd gradient of NPO + corrected NLL + KL computed here with the reference taken directly at θ̂ — and at θ̂
    the KL contributes nothing (previous test), so there it is the forget and correction terms' alone."""
    model, task, train, holdout, theta_hat = memorised
    request = Request([Edit("remove", train[0].id), Edit("correct_response", train[1].id, response=" cat red")])
    ctx = context(memorised, request)
    args = ForgetArguments(retain_weight=0.7, retain="kl")
    knobs = Knobs(lr=1e-3, max_steps=5, batch_size=4, check_every=1, source={})
    kept = [e for e in ctx.effective if e.id not in ctx.edits]
    run = _Run(ctx, args, knobs, "npo", ParamView(model), [train[0], train[1]], kept)
    retain = run.kept[:4]
    view = ParamView(model)
    with torch.no_grad():
        view.set_vector(theta_hat)
        reference_nll = token_nll(task, model, task.collate(train[:2]))[2]
        reference = F.log_softmax(task.forward(model, task.collate(retain)), -1)
    for theta in (theta_hat, theta_hat + 0.01 * torch.randn(view.dim, generator=torch.Generator().manual_seed(2),
                                                             dtype=torch.float64)):
        got = run.gradient(theta, 0)
        view.set_vector(theta)
        loss, mean, total, _ = token_nll(task, model, task.collate(train[:2]))
        fixes = task.collate([ctx.edits[train[1].id]])
        retain_batch = task.collate(retain)
        value = (forget_loss("npo", loss, mean, total, reference_nll, args.beta, 0.0).mean()
                 + 0.7 * per_example_loss(task, model, fixes).mean()
                 + 0.7 * retain_kl(reference, task.forward(model, retain_batch), retain_batch).mean())
        assert torch.allclose(got, grad(value, model), rtol=1e-9, atol=1e-12)
    # retain "nll": the kept batch's own loss in place of the KL (no reference pass); a run starts at θ̂
    view.set_vector(theta_hat)
    nll = _Run(ctx, ForgetArguments(retain_weight=0.7, retain="nll"), knobs, "npo", view, [train[0], train[1]], kept)
    got = nll.gradient(theta, 0)
    view.set_vector(theta)
    loss, mean, total, _ = token_nll(task, model, task.collate(train[:2]))
    value = (forget_loss("npo", loss, mean, total, reference_nll, args.beta, 0.0).mean()
             + 0.7 * per_example_loss(task, model, fixes).mean()
             + 0.7 * per_example_loss(task, model, retain_batch).mean())
    assert torch.allclose(got, grad(value, model), rtol=1e-9, atol=1e-12)
    view.set_vector(theta_hat)


# ------------------------------------------------------------------------------------------------- the stop rule
def test_a_holdout_too_small_or_unusable_is_refused_in_one_line(memorised):
    model, task, train, holdout, _ = memorised
    # the exact test can reach p < α/2 with 2 examples only against ≥ 12, with 1 only against ≥ 80 (evidence)
    with pytest.raises(UserInputError, match="a holdout of 5 is too small for 2 examples.*≥ 12"):
        HoldoutStop(task, train[:2], holdout[:5])
    with pytest.raises(UserInputError, match="a holdout of 40 is too small for 1 examples.*≥ 80"):
        HoldoutStop(task, train[:1], holdout)
    with pytest.raises(UserInputError, match="in the training set"):
        RequestContext.build(model, task, train, Request.remove(train[0].id), holdout=[*holdout, train[5]])
    other = Example(id="chat", prompt=(Message("user", "hi"),), response=(Message("assistant", "yo"),),
                    shape="messages")
    with pytest.raises(UserInputError, match="same kind and format"):
        RequestContext.build(model, task, train, Request.remove(train[0].id), holdout=[*holdout, other])
    with pytest.raises(UserInputError, match="no holdout"):
        get_method("npo").run(context(memorised, Request.remove(train[0].id), holdout=None), UnlearnOptions())
    for bad in ({"lr": 0.0}, {"beta": -1.0}, {"max_steps": 0}, {"retain": "mse"}, {"retain_weight": float("nan")}):
        with pytest.raises(ConfigError):
            ForgetArguments(**bad)


def test_defaults_come_from_the_training_record_else_from_llmeraser_finetune(memorised):
    ctx = context(memorised, Request.remove("f0", "f1"))
    knobs = resolve_defaults(ctx, ForgetArguments(), 12, 52)
    assert (knobs.lr, knobs.batch_size, knobs.max_steps) == (FT_LR, FT_BATCH, 10 * FT_EPOCHS * 2)
    assert knobs.source["lr"] == "the training record"
    ctx.report["task"] = {}
    ours = FinetuneArguments()
    knobs = resolve_defaults(ctx, ForgetArguments(lr=3e-4), 12, 52)
    assert (knobs.lr, knobs.batch_size, knobs.max_steps) == (3e-4, ours.batch_size, 10 * ours.epochs * 2)
    assert knobs.source["lr"] == "given" and "default" in knobs.source["batch_size"]


# -------------------------------------------------------------------------------------- on memorised facts
def forgotten(memorised, method="npo", **args):
    model, task, train, holdout, theta_hat = memorised
    ctx = context(memorised, Request.remove(*[e.id for e in train[:12]]))
    update = get_method(method).run(ctx, UnlearnOptions(forget=ForgetArguments(**args)))
    assert torch.equal(ParamView(model).vector(), theta_hat)  # θ is left at θ̂
    return update, update.report[method]


@pytest.mark.parametrize("method", ["npo", "simnpo", "gradient-difference"])
def test_the_unlearner_stops_when_the_forgotten_facts_look_like_the_holdout(memorised, method):
    """At θ̂ the 12 memorised facts are more familiar than the 40 unseen ones (the case is what it claims); the
    unlearner stops at the first check where the calibrated loss AUC is at most 0.5 and the test says "looks like the
    holdout", and the report's statistic is the one recomputed here at the returned θ. The kept facts' loss moves far
    less than the forgotten ones' (nothing bounds it in theory; the assertion leaves a margin of 2)."""
    model, task, train, holdout, theta_hat = memorised
    update, report = forgotten(memorised, method)
    checks = report["stop"]["checks"]
    assert checks[0]["verdict"] == MORE and checks[0]["auc"] > 0.9 and checks[0]["calibration"] == CALIBRATED
    # it ran to the first whole-step check that met the rule, then refined back on the segment before it (regula falsi,
    # `refine` evaluations at fractional steps): the returned point is the earliest accepted one
    whole = [c for c in checks if float(c["step"]).is_integer()]
    met = [c for c in whole if c["verdict"] == LOOKS_LIKE and c["auc"] <= 0.5]
    assert report["stop"]["met"] and met and met[0] is whole[-1]
    refined = checks[checks.index(whole[-1]) + 1:]
    assert len(refined) <= 1 and all(whole[-2]["step"] < c["step"] < whole[-1]["step"] for c in refined)
    accepted = [c for c in [*refined, whole[-1]] if c["verdict"] == LOOKS_LIKE and c["auc"] <= 0.5]
    returned = min(accepted, key=lambda c: c["step"])
    assert report["returned_step"] == returned["step"]
    # a check that skipped the holdout said "not yet" on every score's AUC ≥ 0.5 + STALE_MARGIN against the holdout's
    # last scores; the first check, every accepted one and the returned one scored it
    skipped = [c for c in checks if not c["holdout_scored"]]
    assert checks[0]["holdout_scored"] and returned["holdout_scored"] and all(c["holdout_scored"] for c in accepted)
    assert all(min(c["auc"], c["auc_min_k_pp"]) >= 0.5 + STALE_MARGIN for c in skipped)
    theta = update.theta
    ParamView(model).set_vector(theta)
    # the report's test, recomputed at the returned θ: the same scores up to the batching's rounding, and an AUC is
    # a count of ordered pairs, unchanged unless two scores lie within rounding of each other
    again = evidence(model, task, train[:12], holdout, batch_size=report["batch_size"])
    assert again.score("loss").auc == pytest.approx(returned["auc"], abs=1e-12) and again.verdict == LOOKS_LIKE
    forget_rise = mean_loss(model, task, train[:12], theta) - mean_loss(model, task, train[:12], theta_hat)
    kept = train[12:]
    kept_rise = mean_loss(model, task, kept, theta) - mean_loss(model, task, kept, theta_hat)
    assert forget_rise > 1.0 and kept_rise < 0.5 * forget_rise, (forget_rise, kept_rise)
    # the report's kept-loss check is over KEPT_PER_FORGOTTEN × 12 = 12 of the 48 kept facts, every fourth (evenly
    # spaced), the same sums in float64
    check, sample = report["kept_loss_check"], kept[::4]
    assert KEPT_PER_FORGOTTEN == 1 and check["examples"] == 12
    assert check["result"] == pytest.approx(mean_loss(model, task, sample, theta), rel=1e-12)
    assert ("kept_warning" in report) == (check["ratio"] > 1.2)
    assert update.report["method"] == method and update.report["n_effective"] == 48
    # where the seconds went: disjoint parts of one wall-clock span (checks and the kept check each ran at least once,
    # so they are positive on any clock that advances; the rest, steps and set-up, is what they leave: not negative
    # unless a span were counted twice)
    seconds = report["seconds"]
    assert seconds["checks"] > 0 and seconds["kept_loss_check"] > 0 and seconds["steps_and_setup"] >= 0
    ParamView(model).set_vector(theta_hat)


class _ScriptedProbe:
    """A `evidence.Probe` stand-in whose "model" is a check's index into `script` (members' scores, holdout's
    scores), uncalibrated; counts the holdout passes it was asked for."""

    calibrate = False

    def __init__(self, members, holdout, script):
        self.members, self.holdout, self.script, self.holdout_passes = members, holdout, script, 0

    def reference(self, model):
        return None

    def scores(self, model, holdout=None):
        members, fresh = self.script[model]
        if holdout is None:
            self.holdout_passes += 1
        return members, fresh if holdout is None else holdout


def test_a_check_skips_the_holdout_only_while_the_forgotten_examples_are_plainly_familiar_and_its_drift_is_measured():
    """HoldoutStop on scripted scores (12 members, 24 holdout; min-k%++ set to mirror the loss): members far more
    familiar than the holdout (AUC 1) skip the holdout, once two full checks have measured its drift, for STALE_RUN
    checks, then a full check scores it; a holdout that drifted between full checks is measured (the AUC against the
    old scores minus the AUC against the new ones, per check since) and widens the margin; once the members come
    within the margin every check is full, and the stop and the overshoot are decided on full ones."""
    from llmeraser.evidence import Scores

    m_ids, h_ids = tuple(f"m{i}" for i in range(12)), tuple(f"h{i}" for i in range(24))

    def scores(ids, losses):
        return Scores(ids, tuple(losses), tuple(-v for v in losses))

    holdout = scores(h_ids, [1.0 + 0.01 * i for i in range(24)])  # losses 1.00 … 1.23
    # the holdout drifted: 9 of its losses now below 0.6, 15 above
    drifted = scores(h_ids, [0.5 + 0.01 * i for i in range(9)] + [0.61 + 0.01 * i for i in range(15)])
    far = scores(m_ids, [0.1] * 12)  # AUC 1 against either
    near = scores(m_ids, [0.6] * 12)  # AUC 1 against the old holdout, 15/24 = 0.625 against the drifted one
    like = scores(m_ids, [1.005 + 0.02 * i for i in range(12)])  # interleaved with the old one: AUC 144/288 = 0.5
    gone = scores(m_ids, [2.0] * 12)  # AUC 0: less familiar (an overshoot)
    script = [(far, holdout)] * 5 + [(near, drifted), (near, drifted), (like, holdout), (gone, holdout)]
    examples = [Example(id=i, prompt=f"q {i}", response="a") for i in (*m_ids, *h_ids)]
    probe = _ScriptedProbe(examples[:12], examples[12:], script)
    rule = HoldoutStop(None, examples[:12], examples[12:], calibrate=False, probe=probe)
    out, drift = [], []
    for k in range(len(script)):
        out.append(rule.check(k))
        drift.append(rule.drift)
    scored = [st["holdout_scored"] for _, st in out]
    # checks 0 and 1 full (no skip before the drift is measured: 0 here), then STALE_RUN = 3 skips, then a full one
    assert STALE_RUN == 3 and scored[:6] == [True, True, False, False, False, True] and drift[1] == 0
    assert [st["auc"] for _, st in out[:5]] == [1.0] * 5 and not any(stop for stop, _ in out[:5])
    # check 5, full: AUC 1 against the old holdout's scores, 0.625 against the drifted ones: moved 0.375 over 4 checks
    assert out[5][1]["auc"] == 0.625 and out[5][1]["holdout_drift"] == 0.375 and drift[5] == 0.375 / 4
    # check 6: 0.625 would clear 0.5 + STALE_MARGIN alone, but not with the drift measured (0.09375 per check)
    assert 0.625 >= 0.5 + STALE_MARGIN and scored[6] and out[6][1]["auc"] == 0.625
    assert scored[7] and out[7][0] and out[7][1]["verdict"] == LOOKS_LIKE and out[7][1]["auc"] == 0.5  # a stop: full
    assert scored[8] and not out[8][0] and rule.overshot(out[8][1])  # an overshoot: on a full check
    assert probe.holdout_passes == sum(scored)


def test_a_timed_rule_sums_its_checks_wall_time_and_delegates(monkeypatch):
    """`forget._Timed`: the seconds are the sum of the checks' spans on the clock (a fake one here, advanced 2 by each
    check and 5 between checks: only the 2s count), the rule's answers pass through, and a check that raises is
    timed too."""
    from llmeraser.updates import forget as fg

    clock = [0.0]
    monkeypatch.setattr(fg.time, "perf_counter", lambda: clock[0])

    class Rule:
        def check(self, model):
            clock[0] += 2.0
            if model == "bad":
                raise RuntimeError("bad")
            return model == "stop", {"auc": 0.4}

        def distance(self, stats):
            return 0.1

        def overshot(self, stats):
            return True

    timed = fg._Timed(Rule())
    assert timed.check("go") == (False, {"auc": 0.4})
    clock[0] += 5.0
    assert timed.check("stop")[0] and timed.distance({}) == 0.1 and timed.overshot({})
    with pytest.raises(RuntimeError):
        timed.check("bad")
    assert timed.seconds == 6.0


class _LineRule:
    """A stop rule on a one-parameter model whose loss AUC is `auc(p)`: accepted at AUC ≤ 0.5 unless `reject` says
    otherwise (a score saying either side)."""

    def __init__(self, auc, reject=lambda p: False):
        self.auc, self.reject = auc, reject

    def check(self, model):
        p = float(model.weight.detach().flatten()[0])
        a = self.auc(p)
        ok = a <= 0.5 and not self.reject(p)
        return ok, {"auc": a, "p": 1.0, "auc_min_k_pp": a, "p_min_k_pp": 1.0,
                    "verdict": LOOKS_LIKE if ok or a > 0.5 else "less"}

    def distance(self, stats):
        return abs(stats["auc"] - 0.5)

    def overshot(self, stats):
        return stats["verdict"] == "less"


def test_refine_stops_near_where_the_auc_crosses_the_target_never_at_a_rejected_point():
    """`_Run._refine` between the previous check (p = 0.01, AUC 0.9) and the accepting one (p = 0.81, AUC 0.1), the
    AUC 1 − √p crossing 0.5 at p = 0.25: the first regula-falsi evaluation lands at t = 0.4 / 0.8 = 0.5 (p = 0.41, AUC
    0.36, accepted: earlier than the check; up to float32 rounding of the ends); each further one moves to an earlier
    accepted point, closer to the crossing and never before it (the AUC is decreasing: every accepted point has
    p ≥ 0.25). refine 0 is the check; with every earlier point rejected (a score saying either side) the check is
    returned whatever refine is."""
    from types import SimpleNamespace

    model = torch.nn.Linear(1, 1, bias=False)
    rule = _LineRule(lambda p: 1 - math.sqrt(max(p, 0.0)))
    a, b = torch.tensor([0.01]), torch.tensor([0.81])
    ends = [(3, a, rule.check(SimpleNamespace(weight=a))[1]), (4, b, rule.check(SimpleNamespace(weight=b))[1])]
    returned = []
    for refine in (0, 1, 2, 3):
        run = _Run.__new__(_Run)
        run.view, run.ctx, run.args = ParamView(model), SimpleNamespace(model=model), ForgetArguments(refine=refine)
        theta, out = run._refine(rule, *ends, [{"step": k, **st} for k, _, st in ends])
        assert out["stop"]["met"] and len(out["stop"]["checks"]) == 2 + refine
        returned.append((out["returned_step"], float(theta[0])))
    assert returned[0] == (4, pytest.approx(0.81))
    assert returned[1][0] == pytest.approx(3.5, abs=1e-6) and returned[1][1] == pytest.approx(0.41, abs=1e-6)
    assert all(0.25 <= p2 < p1 and s2 < s1 for (s1, p1), (s2, p2) in zip(returned[1:-1], returned[2:], strict=True))
    run.args = ForgetArguments(refine=3)
    theta, out = run._refine(_LineRule(rule.auc, reject=lambda p: p < 0.8), *ends,
                             [{"step": k, **st} for k, _, st in ends])
    assert out["returned_step"] == 4 and torch.equal(theta, b) and out["stop"]["met"]


def test_an_overshooting_step_is_bisected_back_never_past_the_holdout(memorised):
    """Checked only every 20 steps at the fine-tune's rate, the run passes the holdout between two checks (the
    check at step 20 says 'less familiar': the test would be vacuous otherwise); the returned point lies on the
    segment back to the previous check and is either accepted by the rule or the closest point evaluated — never
    the overshooting one when a closer one was seen."""
    _, report = forgotten(memorised, check_every=40)
    checks = report["stop"]["checks"]
    over = [c for c in checks if c["verdict"] == LESS]
    assert over and over[0]["step"] == 40, [(c["step"], round(c["auc"], 3), c["verdict"]) for c in checks]
    assert 0 < report["returned_step"] < 40
    returned = [c for c in checks if c["step"] == report["returned_step"]][-1]
    assert returned["verdict"] == LOOKS_LIKE or abs(returned["auc"] - 0.5) <= min(abs(c["auc"] - 0.5) for c in checks)


def test_the_cap_returns_the_closest_point_and_says_the_rule_was_not_met(memorised):
    _, report = forgotten(memorised, max_steps=2, lr=1e-5, check_every=1)
    assert not report["stop"]["met"] and "max_steps" in report["stop"]["why"]
    assert report["steps_taken"] == 2 and report["returned_step"] in (0, 1, 2)


def test_a_corrected_response_is_learned_while_the_old_one_is_forgotten(memorised):
    """correct_response: the new versions join the retain term, and the rule stops only once their loss is below
    where it started, so at a met stop the new versions' loss is lower than at θ̂ by construction."""
    model, task, train, holdout, theta_hat = memorised
    edits = [Edit("correct_response", e.id, response=" owl teal") for e in train[:6]]
    edits += [Edit("remove", e.id) for e in train[6:12]]
    ctx = context(memorised, Request(edits))
    update = get_method("npo").run(ctx, UnlearnOptions())
    report = update.report["npo"]
    new = [ctx.edits[e.id] for e in train[:6]]
    assert report["stop"]["met"] and report["corrected_examples"] == 6
    assert mean_loss(model, task, new, update.theta) < mean_loss(model, task, new, theta_hat)
    assert mean_loss(model, task, train[:6], update.theta) > mean_loss(model, task, train[:6], theta_hat)
    ParamView(model).set_vector(theta_hat)


# ----------------------------------------------------------------------------------------------------- auto
def test_auto_picks_the_unlearner_only_with_a_holdout_and_no_recording(memorised):
    model, task, train, holdout, theta_hat = memorised
    request = Request.remove(*[e.id for e in train[:12]])
    assert DEFAULT in method_names()
    name, why = choose_update(None, "no recording", context(memorised, request), PathArguments())
    assert name == DEFAULT and "holdout of 40" in why
    name, why = choose_update(None, "no recording", context(memorised, request, holdout=None), PathArguments())
    assert (name, why) == ("first-order", "auto chose first-order: no recording")
    name, why = choose_update(None, "no recording", context(memorised, Request.remove(train[0].id)), PathArguments())
    assert name == "first-order" and "too small for 1 examples" in why
    # with a recording, auto replays the fine-tune (rewind or path), holdout or not
    small, small_task, facts = tiny_lora_lm(8)
    result = finetune(small, small_task, facts, FinetuneArguments(epochs=2, batch_size=4, final_check=False))
    ctx = RequestContext.build(small, small_task, facts, Request.remove(facts[0].id, facts[1].id),
                               holdout=random_facts()[:20])
    counting = StepCosts(call=0.0, example=1.0, update=0.0, replay=0.0, forward=0.0)
    name, _ = choose_update(result.trajectory, "", ctx, PathArguments(), counting, {"before": 1, "after": 1,
                                                                                   "share": 1.0})
    assert name in ("rewind", "path")
    # the runs: auto → npo with a holdout, saying why; without one the one-step update, saying what a holdout and a
    # recording would add
    update = get_method("auto").run(context(memorised, request), UnlearnOptions())
    assert update.report["method"] == DEFAULT and update.report["update_choice"].startswith(f"auto chose {DEFAULT}")
    ParamView(model).set_vector(theta_hat)
    ctx = RequestContext.build(small, small_task, facts, Request.remove(facts[0].id, facts[1].id))
    update = get_method("auto").run(ctx, UnlearnOptions())
    assert update.report["method"] == "first-order" and would_add(False) in update.report["update_choice"]
    assert "holdout" in would_add(False) and "holdout" not in would_add(True) and "rewind" in would_add(True)


def test_min_steps_holds_the_stop_rule_back(memorised):
    """With min_steps the run steps on past checks that would have stopped it (the device check relies on it to run
    the loop on a device whatever the evidence); the checks before min_steps are recorded, not obeyed."""
    _, plain = forgotten(memorised, check_every=1)
    _, held = forgotten(memorised, check_every=1, min_steps=plain["returned_step"] + 2)
    assert held["steps_taken"] >= plain["returned_step"] + 2
    early = [c for c in held["stop"]["checks"] if 0 < c["step"] < plain["returned_step"] + 2]
    assert any(c["verdict"] == LOOKS_LIKE for c in early)  # a check that would have stopped it, passed over
