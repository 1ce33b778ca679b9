"""Evidence (llmeraser.evidence): membership scores against a token-by-token reference, the two-sample statistics
against scipy and brute force, the verdict on cases whose answer is known, the holdout checks, `llmeraser verify`."""

from __future__ import annotations

import itertools
import json
import math
import random

import pytest
import torch
from fixtures.tiny import tiny_lora_lm

from llmeraser import evidence as ev
from llmeraser import twosample as ts
from llmeraser.data import Example, Message
from llmeraser.errors import ConfigError
from llmeraser.task import IGNORE_INDEX


def reference_scores(model, task, example: Example, k: float) -> tuple[float, float]:
    """(mean response NLL, Min-K%++) of one example, one full forward per response token on its prefix alone (no
    batch, no padding, no position selection), the vocabulary statistics summed in float64 from the definitions."""
    ids, labels = task.encode(example)
    logps, zs = [], []
    with torch.no_grad():
        for t in range(1, len(ids)):
            if labels[t] == IGNORE_INDEX:
                continue
            logits = model(input_ids=torch.tensor([ids[:t]])).logits[0, -1].double()
            logp = torch.log_softmax(logits, -1)
            p = logp.exp()
            mu = float((p * logp).sum())
            sigma = math.sqrt(float((p * (logp - mu) ** 2).sum()))
            logps.append(float(logp[ids[t]]))
            zs.append((logps[-1] - mu) / sigma)
    m = max(1, int(k * len(zs)))
    return -sum(logps) / len(logps), sum(sorted(zs)[:m]) / m


@pytest.fixture(scope="module")
def lm():
    return tiny_lora_lm(n=10, seed=3)


@pytest.mark.parametrize("k", [0.2, 0.5, 1.0])
def test_scores_match_the_token_by_token_reference(lm, k):
    """Each example's scores equal the reference to 1e-10: the model is float64 and the two differ only in summation
    order (a batched, padded forward with selected positions against one forward per prefix), so they agree to a
    few hundred ε of the values involved (|log p| < 10, the vocabulary 300)."""
    model, task, examples = lm
    examples = [*examples, Example("long", "Does the fox like red? Does the owl like", " gold? The cat likes blue.")]
    scores = ev.membership_scores(model, task, examples, k=k, batch_size=4)
    assert scores.ids == tuple(e.id for e in examples)
    for i, e in enumerate(examples):
        loss, mink = reference_scores(model, task, e, k)
        assert abs(scores.loss[i] - loss) <= 1e-10 and abs(scores.min_k_pp[i] - mink) <= 1e-10, e.id


def test_chat_scores_match_the_reference_under_trls_rendering():
    """Chats rendered as TRL's SFTTrainer does (the chat template, the loss on the completion): the same 1e-10."""
    from llmeraser.data import parse_records
    from llmeraser.task import CausalLMTask, Rendering
    from llmeraser.testing import chat_records, tiny_llama, tiny_tokenizer

    tok = tiny_tokenizer(chat=True)
    model = tiny_llama(len(tok), hidden=16, dtype=torch.float64, init_std=0.3)
    examples = parse_records((f"record {i}", r) for i, r in enumerate(chat_records(6)))
    task = CausalLMTask(tok, max_length=48, rendering=Rendering(format="trl"))
    scores = ev.membership_scores(model, task, examples, batch_size=4)
    for i, e in enumerate(examples):
        loss, mink = reference_scores(model, task, e, ev.MIN_K)
        assert abs(scores.loss[i] - loss) <= 1e-10 and abs(scores.min_k_pp[i] - mink) <= 1e-10, e.id


def test_scores_do_not_depend_on_batching_or_padding(lm):
    """Batch sizes 1, 3 and all, and the examples' order, give the same scores to 1e-12 (float64: padding only adds
    masked keys, whose weights are exactly 0; the batched products sum in another order, ~ε relative)."""
    model, task, examples = lm
    examples = [*examples, Example("long", "Does the fox like red? Does the owl like", " gold? The cat likes blue.")]
    one = ev.membership_scores(model, task, examples, batch_size=1)
    for batch_size in (3, len(examples)):
        other = ev.membership_scores(model, task, examples, batch_size=batch_size)
        for a, b in ((one.loss, other.loss), (one.min_k_pp, other.min_k_pp)):
            assert max(abs(x - y) for x, y in zip(a, b, strict=True)) <= 1e-12
    rev = ev.membership_scores(model, task, examples[::-1], batch_size=4)
    assert rev.ids == one.ids[::-1]
    assert max(abs(x - y) for x, y in zip(rev.loss[::-1], one.loss, strict=True)) <= 1e-12


def test_loss_is_the_tasks_example_mean(lm):
    """The loss score is the task's own per-example loss (example normalization), to 1e-12."""
    model, task, examples = lm
    batch = task.collate(examples)
    with torch.no_grad():
        expected = task.loss(task.forward(model, batch), batch).tolist()
    got = ev.membership_scores(model, task, examples).loss
    assert max(abs(a - b) for a, b in zip(got, expected, strict=True)) <= 1e-12


def test_min_k_pp_on_degenerate_distributions():
    """A uniform next-token distribution has σ = 0: z is exactly 0 there (σ within rounding is taken as flat). A
    token masked to −inf (p = 0) changes nothing: μ, σ as without it (to 1e-14 relative: the same sums)."""
    logits = torch.zeros(1, 2, 5, dtype=torch.float64)
    tok, mu, sigma = ev.token_statistics(logits, torch.tensor([[1, 3]]))
    z = (tok - mu) / sigma
    assert (z == 0).all()
    masked = torch.tensor([[[0.3, -math.inf, 1.2, -0.4]]], dtype=torch.float64)  # a vocabulary entry masked out
    got = ev.token_statistics(masked, torch.tensor([[2]]))
    want = ev.token_statistics(masked[..., [0, 2, 3]], torch.tensor([[1]]))
    assert all(torch.allclose(a, b, rtol=1e-14, atol=0) for a, b in zip(got, want, strict=True))


def test_scores_bad_input(lm):
    model, task, examples = lm
    for kwargs, expect in (({"k": 0}, "must be in (0, 1]"), ({"batch_size": 0}, "batch_size")):
        with pytest.raises(ev.ConfigError, match=expect.replace("(", r"\(").replace(")", r"\)")):
            ev.membership_scores(model, task, examples, **kwargs)
    with pytest.raises(ev.ConfigError, match="at least one example"):
        ev.membership_scores(model, task, [])


# ------------------------------------------------------------------------------------------ two-sample statistics
def samples(m: int, n: int, seed: int, *, ties: bool = False, shift: float = 0.0):
    rng = random.Random(seed)
    draw = (lambda: round(rng.gauss(0, 1), 1)) if ties else (lambda: rng.gauss(0, 1))
    return [draw() + shift for _ in range(m)], [draw() for _ in range(n)]


SIZES = [(1, 1), (1, 7), (3, 5), (5, 5), (4, 12), (7, 13), (20, 20), (30, 45), (12, 9)]


@pytest.mark.parametrize("m, n", SIZES)
@pytest.mark.parametrize("ties", [False, True])
def test_ks_matches_scipy_exact(m, n, ties):
    """D equals scipy's exactly (both are counts over m·n); p agrees to 1e-12 absolute or 1e-9 relative: ours is
    exact (integer path counts, one rounding), scipy's sums the same counts in floats."""
    from scipy.stats import ks_2samp

    for seed, shift in itertools.product(range(3), (0.0, 0.8, 3.0)):
        x, y = samples(m, n, seed, ties=ties, shift=shift)
        d, p = ev.ks_2samp(x, y)
        ref = ks_2samp(x, y, method="exact")
        assert d == pytest.approx(ref.statistic, abs=1e-15)
        assert p == pytest.approx(ref.pvalue, rel=1e-9, abs=1e-12), (m, n, seed, shift)


def test_ks_asymptotic_is_kolmogorovs_limit(monkeypatch):
    """Beyond EXACT_KS the p-value is Kolmogorov's limit at √(mn/(m+n))·D (scipy's kstwobign), D as scipy's; the
    limit itself matches kstwobign to 1e-12 on both sides of z = 1 (the two series)."""
    from scipy.stats import ks_2samp, kstwobign

    for z in (0.05, 0.3, 0.7, 0.99, 1.0, 1.3, 2.0, 4.0):
        assert ts.kolmogorov_sf(z) == pytest.approx(float(kstwobign.sf(z)), abs=1e-12)
    monkeypatch.setattr(ts, "EXACT_KS", 100)
    x, y = samples(30, 45, 1, shift=0.5)
    d, p = ev.ks_2samp(x, y)
    assert d == pytest.approx(ks_2samp(x, y).statistic, abs=1e-15)
    assert p == pytest.approx(float(kstwobign.sf(math.sqrt(30 * 45 / 75) * d)), abs=1e-12)


def test_mann_whitney_counts_and_p_match_enumeration_and_scipy(monkeypatch):
    """The U counts equal a brute-force enumeration of orderings; p matches scipy's exact mannwhitneyu without ties
    (1e-12: both exact, ours in integers) and its asymptotic one (tie and continuity corrected) with ties (1e-12)."""
    from scipy.stats import mannwhitneyu

    for m, n in ((1, 4), (3, 3), (2, 5), (4, 6)):
        counts = [0] * (m * n + 1)
        for xs in itertools.combinations(range(m + n), m):  # positions of the x's in the sorted order
            counts[sum(p - i for i, p in enumerate(xs))] += 1  # each x is above the y's before it
        assert ts._mw_counts(m, n) == counts
    for (m, n), shift in itertools.product(SIZES, (0.0, 1.0)):
        x, y = samples(m, n, 7, shift=shift)
        ref = mannwhitneyu(x, y, method="exact").pvalue
        assert ev.mann_whitney_p(x, y) == pytest.approx(ref, rel=1e-9, abs=1e-12)
        x, y = samples(m, n, 7, ties=True, shift=shift)
        if len(set(x + y)) > 1:  # rounded draws: mostly tied (asymptotic), a few draws without a tie (exact)
            ref = mannwhitneyu(x, y, method="exact" if len(set(x + y)) == m + n else "asymptotic").pvalue
            assert ev.mann_whitney_p(x, y) == pytest.approx(ref, rel=1e-9, abs=1e-12)
    monkeypatch.setattr(ts, "EXACT_MW", 10)  # large samples without ties: the normal approximation
    x, y = samples(30, 45, 2, shift=0.3)
    assert ev.mann_whitney_p(x, y) == pytest.approx(mannwhitneyu(x, y, method="asymptotic").pvalue, rel=1e-9)


def test_delong_matches_its_definition():
    """AUC and DeLong's standard error equal the O(mn) definitions (placements over all pairs), to 1e-12."""
    from llmeraser.metrics import roc_auc

    for ties in (False, True):
        x, y = samples(9, 14, 3, ties=ties, shift=0.4)
        psi = [[1.0 if a > b else 0.5 if a == b else 0.0 for b in y] for a in x]
        v10, v01 = [sum(r) / len(y) for r in psi], [sum(c) / len(x) for c in zip(*psi, strict=True)]
        auc = sum(v10) / len(x)
        var = (sum((v - auc) ** 2 for v in v10) / (len(x) - 1) / len(x)
               + sum((v - auc) ** 2 for v in v01) / (len(y) - 1) / len(y))
        got, se = ev.auc_delong(x, y)
        assert got == pytest.approx(auc, abs=1e-12) and se == pytest.approx(math.sqrt(var), abs=1e-12)
        assert got == pytest.approx(roc_auc(x + y, [1] * len(x) + [0] * len(y)), abs=1e-12)
    assert ev.auc_delong([1.0], [0.0, 2.0])[1] is None


def test_min_holdout_is_where_perfect_separation_becomes_significant():
    """min_holdout(m) is the least n at which m examples all above n holdout scores give p < α/2, by both the exact
    Mann–Whitney and the exact KS p-value; with one fewer neither test can."""
    for m in (1, 2, 3, 5, 8):
        n = ev.min_holdout(m)
        for size, significant in ((n, True), (n - 1, False)):
            if size < 1:
                continue
            x, y = [1000.0 + i for i in range(m)], [float(j) for j in range(size)]
            assert (ev.mann_whitney_p(x, y) < ev.ALPHA / 2) is significant, (m, size)
            assert (ev.ks_2samp(x, y)[1] < ev.ALPHA / 2) is significant, (m, size)
    assert ev.min_holdout(1) == 80  # 2 / (1 + n) < 0.025
    with pytest.raises(ev.HoldoutError):
        ev.min_holdout(0)


def test_holdout_size_reaches_the_resolution():
    z = ev.NormalDist().inv_cdf(1 - ev.ALPHA / 4)
    for m, r in ((20, 0.15), (50, 0.1), (200, 0.05)):
        n = ev.holdout_size(m, r)
        assert z * math.sqrt((m + n + 1) / (12 * m * n)) <= r < z * math.sqrt((m + n) / (12 * m * (n - 1)))
    assert ev.holdout_size(5, 0.1) is None  # five examples never resolve 0.1, however large the holdout


# ------------------------------------------------------------------------------------------------ the verdict
def synthetic(m: int, n: int, seed: int, shift: float) -> tuple[ev.Scores, ev.Scores]:
    """Member and holdout scores; shift > 0 makes the members' loss lower (more familiar), min-k%++ higher."""
    x, y = samples(m, n, seed, shift=shift)
    mk_x, mk_y = samples(m, n, seed + 1000, shift=shift)
    return (ev.Scores(tuple(f"m{i}" for i in range(m)), tuple(-v for v in x), tuple(mk_x)),
            ev.Scores(tuple(f"h{i}" for i in range(n)), tuple(-v for v in y), tuple(mk_y)))


def test_verdict_on_known_cases():
    more = ev.membership_test(*synthetic(20, 40, 0, 2.0))
    less = ev.membership_test(*synthetic(20, 40, 0, -2.0))
    like = ev.membership_test(*synthetic(20, 40, 0, 0.0))
    assert more.verdict == ev.MORE and all(t.auc > 0.8 and t.ci[0] > 0.5 for t in more.tests)
    assert less.verdict == ev.LESS and all(t.auc < 0.2 for t in less.tests)
    assert like.verdict == ev.LIKE and all(t.p_auc >= ev.ALPHA / 2 for t in like.tests)
    assert more.score("loss").mean_members < more.score("loss").mean_holdout
    members, holdout = synthetic(20, 40, 0, 0.0)
    with pytest.raises(ev.HoldoutError, match="scored with k = 0.2 and 0.5"):
        ev.membership_test(members, ev.Scores(holdout.ids, holdout.loss, holdout.min_k_pp, k=0.5))


def test_false_alarms_stay_below_alpha():
    """Members and holdout drawn from one distribution: over 300 draws the test says anything but LIKE at most α of
    the time, plus 3 binomial standard deviations (√(0.05·0.95/300) = 0.0126)."""
    alarms = sum(ev.membership_test(*synthetic(15, 25, seed, 0.0)).verdict != ev.LIKE for seed in range(300))
    assert alarms / 300 <= ev.ALPHA + 3 * 0.0126


def test_records_round_trip_through_json():
    before = ev.membership_test(*synthetic(12, 30, 1, 2.0))
    after = ev.membership_test(*synthetic(12, 30, 1, 0.0))
    record = ev.Comparison(before, after)
    back = ev.Comparison.from_dict(json.loads(json.dumps(record.to_dict())))
    assert back == record
    d = record.to_dict()
    assert d["auc_change"]["loss"] == pytest.approx(after.score("loss").auc - before.score("loss").auc)
    assert before.verdict in record.summary() and "membership test: 12 examples" in before.table()


def codes(n: int, seed: int, start: int = 0) -> list[Example]:
    """n examples from one generator: a random code and four random words (nothing to learn but by heart). The
    prompt must not depend on the id: members numbered 0-3 against a holdout numbered 100-129 differ in their
    prompts, and the base model's scores tell them apart (min-k%++ did here, p = 0.013)."""
    from llmeraser.testing import ANIMALS, COLORS

    rng = random.Random(seed)
    words = ANIMALS + COLORS
    return [Example(f"c{start + i}", f"Code {rng.randrange(100, 1000)}:",
                    " " + " ".join(rng.choice(words) for _ in range(4))) for i in range(n)]


def test_the_verdict_on_a_model_that_memorised_its_examples():
    """Eight examples, and a holdout of 30 from the same generator: on the model before fine-tuning they look like
    the holdout; after fine-tuning hard on the eight, they are more familiar (AUC 1 by both scores)."""
    from llmeraser.task import CausalLMTask
    from llmeraser.testing import tiny_llama, tiny_lora, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_lora(tiny_llama(len(tok), hidden=16, dtype=torch.float32, init_std=0.3), r=4)
    task = CausalLMTask(tok, max_length=24)
    members, holdout = codes(8, 0), codes(30, 1, start=100)
    ev.check_holdout(holdout, train=members, members=members)
    before = ev.evidence(model, task, members, holdout)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=3e-2)
    batch = task.collate(members)
    model.train()
    for _ in range(150):
        opt.zero_grad()
        task.loss(task.forward(model, batch), batch).mean().backward()
        opt.step()
    after = ev.evidence(model, task, members, holdout)
    assert before.verdict == ev.LIKE, before.table()
    # the raw scores separate perfectly; the calibrated ones (each minus the base model's score, which differs per
    # example) need not, but memorised examples still stand far apart from the holdout
    assert after.calibration == ev.CALIBRATED and after.raw_auc["loss"] == 1.0, after.table()
    assert after.verdict == ev.MORE and after.score("loss").auc > 0.9, after.table()
    assert after.score("min_k_pp").auc > 0.9, after.table()
    assert "before: looks like the holdout; after: more familiar" in ev.Comparison(before, after).summary()


def test_calibration_takes_out_how_hard_each_example_is():
    """Members that are hard in themselves (the base model's loss 5) and a holdout that is easy (loss 2), both changed
    alike by the fine-tune (the same draw of changes): the raw test calls the members less familiar, the test on each
    example's change from the base model says they look like the holdout — and it is exactly the raw test of the
    differences."""
    m, n = 12, 30
    change_m, change_h = samples(m, n, 5, shift=0.0)
    mids, hids = tuple(f"m{i}" for i in range(m)), tuple(f"h{i}" for i in range(n))
    ref_m = ev.Scores(mids, tuple(5.0 + 0.01 * i for i in range(m)), tuple(-5.0 + 0.01 * i for i in range(m)))
    ref_h = ev.Scores(hids, tuple(2.0 + 0.01 * i for i in range(n)), tuple(-2.0 + 0.01 * i for i in range(n)))
    now_m = ev.Scores(mids, tuple(a + c for a, c in zip(ref_m.loss, change_m, strict=True)),
                      tuple(a - c for a, c in zip(ref_m.min_k_pp, change_m, strict=True)))
    now_h = ev.Scores(hids, tuple(a + c for a, c in zip(ref_h.loss, change_h, strict=True)),
                      tuple(a - c for a, c in zip(ref_h.min_k_pp, change_h, strict=True)))
    raw = ev.membership_test(now_m, now_h)
    calibrated = ev.membership_test(now_m, now_h, reference=(ref_m, ref_h))
    assert raw.verdict == ev.LESS and raw.calibration == ev.UNCALIBRATED
    assert calibrated.verdict == ev.LIKE and calibrated.calibration == ev.CALIBRATED
    assert calibrated.raw_auc == {t.score: t.auc for t in raw.tests}
    by_hand = ev.membership_test(now_m.calibrated(ref_m), now_h.calibrated(ref_h))
    assert [t.auc for t in by_hand.tests] == [t.auc for t in calibrated.tests]
    assert now_m.calibrated(ref_m).loss == pytest.approx(change_m, abs=1e-12)  # (5 + c) − 5: float rounding only
    assert ev.MembershipTest.from_dict(calibrated.to_dict()) == calibrated
    with pytest.raises(ConfigError):
        now_m.calibrated(ref_h)  # other examples


def test_reference_scores_are_the_base_model_and_leave_the_adapter_on():
    """`references` scores under the adapters disabled: equal to the base model scored before LoRA was attached (its
    own copy; float32 on the same CPU, so equal up to rounding of the same operations), and the adapter is on again
    afterwards. A model without adapters has no reference."""
    import copy

    from llmeraser.task import CausalLMTask
    from llmeraser.testing import tiny_llama, tiny_lora, tiny_tokenizer

    tok = tiny_tokenizer()
    base = tiny_llama(len(tok), hidden=16, dtype=torch.float32, init_std=0.3)
    plain = copy.deepcopy(base)
    model = tiny_lora(base, r=4)
    with torch.no_grad():  # a non-zero adapter, so that the base and the adapted model differ
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    task = CausalLMTask(tok, max_length=24)
    members, holdout = codes(4, 0), codes(12, 1, start=100)
    adapted = ev.membership_scores(model, task, members)
    ref = ev.references(model, task, members, holdout)
    alone = ev.membership_scores(plain, task, members)
    assert ref[0].loss == pytest.approx(alone.loss, rel=1e-5) and ref[0].min_k_pp == pytest.approx(alone.min_k_pp,
                                                                                                   rel=1e-5, abs=1e-6)
    assert max(abs(a - b) for a, b in zip(adapted.loss, alone.loss, strict=True)) > 1e-2
    assert ev.membership_scores(model, task, members) == adapted
    assert ev.references(plain, task, members, holdout) is None
    uncalibrated = ev.evidence(model, task, members, holdout, calibrate=False)
    assert uncalibrated.calibration == ev.UNCALIBRATED and uncalibrated.raw_auc is None


def test_a_probe_scores_each_theta_once_and_the_base_model_once(monkeypatch):
    """`Probe`: the test at a θ equals `evidence`'s (the same functions on the same batches: equal exactly); testing
    the same θ again, θ̂ after another θ, or one of the latest two θs again reads back the kept scores (no forward
    pass); a new θ is scored; the base model's reference is computed once in all."""
    from llmeraser.params import ParamView
    from llmeraser.task import CausalLMTask
    from llmeraser.testing import tiny_llama, tiny_lora, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_lora(tiny_llama(len(tok), hidden=16, dtype=torch.float32, init_std=0.3), r=4)
    task = CausalLMTask(tok, max_length=24)
    members, holdout = codes(4, 0), codes(12, 1, start=100)
    view = ParamView(model)
    theta_hat = view.vector()
    calls = {"scores": 0, "reference": 0}
    scores, reference = ev.membership_scores, ev.references

    def counted(name, f):
        def wrap(*a, **kw):
            calls[name] += 1
            return f(*a, **kw)
        return wrap

    monkeypatch.setattr(ev, "membership_scores", counted("scores", scores))
    monkeypatch.setattr(ev, "references", counted("reference", reference))
    probe = ev.Probe(task, members, holdout)
    first = probe.test(model)
    assert calls == {"scores": 4, "reference": 1}  # members and holdout under the base model, then at θ̂
    # the same functions on the same batches as by hand: equal exactly
    assert first == ev.membership_test(*(scores(model, task, s) for s in (members, holdout)),
                                       reference=reference(model, task, members, holdout))
    calls.update(scores=0, reference=0)
    assert probe.test(model) == first and calls["scores"] == 0  # the same θ again
    view.set_vector(theta_hat + 0.3)
    moved = probe.test(model)
    assert calls["scores"] == 2 and moved != first
    view.set_vector(theta_hat)
    assert probe.test(model) == first and calls["scores"] == 2  # θ̂ (the first θ) is kept
    view.set_vector(theta_hat + 0.3)
    assert probe.test(model) == moved and calls["scores"] == 2  # and the latest
    view.set_vector(theta_hat + 0.5)
    farther = probe.test(model)
    assert calls["scores"] == 4
    view.set_vector(theta_hat + 0.3)
    assert probe.test(model) == moved and calls["scores"] == 4  # the one before the latest is kept too
    view.set_vector(theta_hat + 0.7)
    probe.test(model)
    view.set_vector(theta_hat + 0.5)
    assert probe.test(model) == farther and calls["scores"] == 6  # two latest: +0.7 and +0.5 (θ̂ + 0.3 is gone)
    view.set_vector(theta_hat + 0.3)
    assert probe.test(model) == moved and calls["scores"] == 8
    assert calls["reference"] == 0  # once, at the first test
    view.set_vector(theta_hat)


# ----------------------------------------------------------------------------------------------- holdout checks
def test_bad_holdouts_are_refused_with_one_line():
    from llmeraser.errors import UserInputError

    train, members = codes(20, 0), codes(20, 0)[:4]
    chat = [Example(f"h{i}", (Message("user", "hi"),), (Message("assistant", f"hello {i}"),), shape="messages")
            for i in range(30)]
    completion = [Example(f"h{i}", "Code:", " cat", shape="prompt-completion") for i in range(30)]
    cases = [
        (chat, "holdout holds chat 'messages' records, the training data text 'prompt-response'"),
        (completion, "text 'prompt-completion' records"),
        (codes(30, 5, start=15), "5 holdout example(s) are in the training set or among the examples tested (by id "
                                 "or by content): 'c15', 'c16', 'c17', 'c18', 'c19'"),
        ([Example("new", train[3].prompt, train[3].response), *codes(30, 9, start=100)], "'new'"),
        (codes(4, 9, start=100), "a holdout of 4 is too small for 4 examples"),
    ]
    for holdout, expect in cases:
        with pytest.raises(ev.HoldoutError) as info:
            ev.check_holdout(holdout, train=train, members=members)
        assert isinstance(info.value, UserInputError)
        message = str(info.value)
        assert expect in message and "\n" not in message, message
    n = ev.min_holdout(4)
    ev.check_holdout(codes(n, 9, start=100), train=train, members=members)  # just big enough
    with pytest.raises(ev.HoldoutError, match=f"only with ≥ {n} holdout examples"):
        ev.check_holdout(codes(n - 1, 9, start=100), train=train, members=members)


# ---------------------------------------------------------------------------------------------- llmeraser verify
@pytest.fixture(scope="module")
def lineage(tmp_path_factory):
    """A tiny base model folder, 16 training examples, an adapter fine-tuned hard on them (through the CLI), a
    holdout of 30 from the same generator, and a request removing four."""
    from fixtures.tiny import save_tiny_base

    from llmeraser.cli import main
    from llmeraser.data import save_examples

    root = tmp_path_factory.mktemp("verify")
    save_tiny_base(root / "base")
    save_examples(codes(16, 0), root / "train.jsonl")
    save_examples(codes(16, 0)[:4], root / "forget.jsonl")
    save_examples(codes(30, 1, start=100), root / "holdout.jsonl")
    (root / "request.json").write_text(json.dumps({"edits": [{"op": "remove", "id": f"c{i}"} for i in range(4)]}))
    assert main(["finetune", "--base-model", str(root / "base"), "--train", str(root / "train.jsonl"), "--out",
                 str(root / "adapter"), "--epochs", "40", "--lr", "3e-2", "--batch-size", "16", "--lora-r", "4",
                 "--max-length", "24", "--no-final-check", "--quiet"]) == 0
    return root


def test_verify_through_the_cli(lineage, tmp_path, capsys):
    """The adapter remembers the four examples (more familiar); the base model alone sees them like the holdout;
    --request takes the same four from --train as --data gives them."""
    from llmeraser.cli import main

    common = ["verify", "--base-model", str(lineage / "base"), "--holdout", str(lineage / "holdout.jsonl"), "--quiet"]
    assert main([*common, "--adapter", str(lineage / "adapter"), "--request", str(lineage / "request.json"),
                 "--train", str(lineage / "train.jsonl"), "--json", str(tmp_path / "a.json")]) == 0
    out = capsys.readouterr().out
    assert "membership test: 4 examples against a holdout of 30" in out and f"verdict: {ev.MORE}" in out
    record = json.loads((tmp_path / "a.json").read_text())
    assert record["verdict"] == ev.MORE and record["n_members"] == 4 and record["n_holdout"] == 30
    assert record["per_example"]["examples"]["ids"] == ["c0", "c1", "c2", "c3"]
    assert ev.MembershipTest.from_dict(record).verdict == ev.MORE
    assert main([*common, "--adapter", str(lineage / "adapter"), "--data", str(lineage / "forget.jsonl"),
                 "--json", str(tmp_path / "b.json")]) == 0
    same = json.loads((tmp_path / "b.json").read_text())
    assert same["scores"] == record["scores"]
    assert main([*common, "--data", str(lineage / "forget.jsonl")]) == 0  # the base model alone
    assert f"verdict: {ev.LIKE}" in capsys.readouterr().out


@pytest.mark.parametrize("problem, expect", [
    ("in-train", "holdout example(s) are in the training set"),
    ("format", "a holdout must be of the same kind and format"),
    ("small", "a holdout of 4 is too small for 4 examples"),
    ("request-alone", "--request takes the edited examples from the training set: give --train"),
    ("json-exists", "already exists"),
])
def test_verify_bad_input_is_one_line_exit_2_nothing_written(lineage, tmp_path, capsys, problem, expect):
    from llmeraser.cli import main
    from llmeraser.data import save_examples

    holdout = lineage / "holdout.jsonl"
    if problem == "in-train":
        save_examples([*codes(16, 0)[10:], *codes(30, 1, start=100)], holdout := tmp_path / "h.jsonl")
    elif problem == "format":
        save_examples([Example(f"h{i}", "Code:", f" cat {i}", shape="prompt-completion") for i in range(30)],
                      holdout := tmp_path / "h.jsonl")
    elif problem == "small":
        save_examples(codes(4, 1, start=100), holdout := tmp_path / "h.jsonl")
    out = tmp_path / "out.json"
    if problem == "json-exists":
        out.write_text("{}")
    argv = ["verify", "--base-model", str(lineage / "base"), "--adapter", str(lineage / "adapter"), "--request",
            str(lineage / "request.json"), "--holdout", str(holdout), "--json", str(out), "--quiet"]
    if problem != "request-alone":
        argv += ["--train", str(lineage / "train.jsonl")]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert expect in err and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert out.exists() == (problem == "json-exists")


def test_verify_help_numbers_are_the_rules():
    """The sizes `verify --help` quotes are what min_holdout and holdout_size compute."""
    from llmeraser.cli.verify import EPILOG

    for m, n in ((1, 80), (2, 12), (3, 6), (5, 4), (10, 3)):
        assert ev.min_holdout(m) == n
        assert (f"{m} need {n}" if m > 1 else f"1 example needs {n}") in EPILOG.replace("\n", " ")
    assert (ev.holdout_size(20, 0.15), ev.holdout_size(50, 0.15)) == (281, 31)
    assert (ev.holdout_size(50, 0.1), ev.holdout_size(100, 0.1)) == (263, 73)


def test_unlearn_reports_the_membership_test_before_and_after(lineage, tmp_path, capsys):
    """`unlearn --holdout`: the report's evidence holds the test at the adapter as given (the four examples it was
    fine-tuned hard on: more familiar than the holdout) and after the update (a rewind: retraining without them, so
    their loss AUC against the holdout falls); without a holdout the report says it cannot tell; a holdout the test
    cannot use is refused before anything is recorded or written."""
    from llmeraser.cli import main
    from llmeraser.data import save_examples
    from llmeraser.ledger import Ledger

    common = ["unlearn", "--base-model", str(lineage / "base"), "--adapter", str(lineage / "adapter"), "--train",
              str(lineage / "train.jsonl"), "--request", str(lineage / "request.json"), "--method", "rewind",
              "--quiet"]
    assert main([*common, "--holdout", str(lineage / "holdout.jsonl"), "--out", str(tmp_path / "a")]) == 0
    assert "evidence: before: more familiar" in capsys.readouterr().out
    proof = json.loads((tmp_path / "a" / "report.json").read_text())["evidence"]
    record = ev.Comparison.from_dict(proof)
    assert proof["status"] == "measured" and proof["n_holdout"] == 30 and record.before.verdict == ev.MORE
    assert record.before.n_members == record.after.n_members == 4
    before, after = record.before.score("loss").auc, record.after.score("loss").auc
    assert after < before and proof["auc_change"]["loss"] == pytest.approx(after - before)
    assert main([*common, "--out", str(tmp_path / "b")]) == 0
    assert "evidence: not measured" in capsys.readouterr().out
    assert json.loads((tmp_path / "b" / "report.json").read_text())["evidence"]["status"] == "not measured"
    save_examples(codes(4, 1, start=100), tmp_path / "small.jsonl")
    assert main([*common, "--holdout", str(tmp_path / "small.jsonl"), "--out", str(tmp_path / "c"), "--ledger",
                 str(tmp_path / "book")]) == 2
    assert "too small" in capsys.readouterr().err and not (tmp_path / "c").exists()
    with Ledger(tmp_path / "book", create=False) as book:
        assert book.entries() == []


def test_without_a_recording_a_holdout_makes_auto_unlearn_until_the_test_says_unseen(lineage, tmp_path, capsys,
                                                                                     monkeypatch):
    """The same adapter without its recording: auto takes npo (docs/forget.md) and stops where the membership test
    — the one the report's evidence holds — first says the edited examples look like the holdout; the report's
    'after' is that test at the returned adapter (the same scores: the same model, examples and batches). Nothing is
    scored twice: the base model's reference once, and the report's before and after are the rule's first and last
    checks (the request's `Probe`)."""
    import shutil

    from llmeraser.cli import main
    from llmeraser.updates.forget import DEFAULT

    passes = {"scores": 0, "reference": 0}
    for name, f in (("scores", ev.membership_scores), ("reference", ev.references)):
        monkeypatch.setattr(ev, {"scores": "membership_scores", "reference": "references"}[name],
                            lambda *a, _f=f, _n=name, **kw: passes.__setitem__(_n, passes[_n] + 1) or _f(*a, **kw))

    shutil.copytree(lineage / "adapter", tmp_path / "plain")
    (tmp_path / "plain" / "trajectory.safetensors").unlink()
    argv = ["unlearn", "--base-model", str(lineage / "base"), "--adapter", str(tmp_path / "plain"), "--train",
            str(lineage / "train.jsonl"), "--request", str(lineage / "request.json"), "--quiet"]
    assert main([*argv, "--holdout", str(lineage / "holdout.jsonl"), "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["method"] == DEFAULT and "holdout of 30" in report["update_choice"], out
    proof = ev.Comparison.from_dict(report["evidence"])
    assert proof.before.verdict == ev.MORE
    if report[DEFAULT]["stop"]["met"]:
        assert proof.after.verdict == ev.LIKE
    checks = report[DEFAULT]["stop"]["checks"]
    # a check scores the forgotten examples, and the holdout unless it skipped it (`holdout_scored`, updates.stop);
    # the report's "after" scores both again when a bisection returned a point before the last two checks (the Probe
    # keeps θ̂'s scores and the latest two), the holdout alone when the cap returned a check that skipped it
    scored = sum(1 + c["holdout_scored"] for c in checks)
    step = report[DEFAULT]["returned_step"]
    last = [c for c in checks[-2:] if c["step"] == step]
    after = 2 if not last else 1 - last[-1]["holdout_scored"]
    assert passes == {"reference": 1, "scores": 2 + scored + after}, (passes, len(checks))
    assert main([*argv, "--out", str(tmp_path / "b")]) == 0  # no holdout: the one-step update, saying why
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert report["method"] == "first-order" and "holdout" in report["update_choice"]
