"""The fictitious-people data, the forgetting metrics against hand-computed values, and the benchmark's tiny run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from llmeraser.data import load_examples
from llmeraser.errors import ConfigError
from llmeraser.request import apply_request, load_request
from llmeraser.task import CausalLMTask, per_example_loss
from llmeraser.testing import tiny_llama, tiny_lora, tiny_tokenizer
from llmeraser_experiments import forgetting as fg
from llmeraser_experiments.people import ATTRIBUTES, build_people, write_people


# ------------------------------------------------------------------------------------------------------- data
def test_people_are_a_pure_function_of_sizes_and_seed(tmp_path):
    a, b = build_people(12, facts=5, n_heldout=3, seed=4), build_people(12, facts=5, n_heldout=3, seed=4)
    assert a == b
    write_people(a, tmp_path / "a", seed=4, sizes={})
    write_people(b, tmp_path / "b", seed=4, sizes={})
    for name in ("train.jsonl", "heldout.jsonl", "general.jsonl", "meta.json", "requests/forget10.json",
                 "requests/correct.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert build_people(12, facts=5, n_heldout=3, seed=5).train != a.train


def test_people_shape():
    data = build_people(20, facts=6, n_heldout=4, seed=0)
    assert len(data.train) == 120 and len(data.heldout) == 24 and len(data.people) == 20
    assert len({e.id for e in data.train + data.heldout}) == 144
    assert not {e.extra["person"] for e in data.train} & {e.extra["person"] for e in data.heldout}
    for e in data.train + data.heldout:
        attr = next(a for a in ATTRIBUTES if a.name == e.extra["attribute"])
        assert e.extra["value"] in e.response and e.extra["value"] in e.extra["paraphrase"]
        assert len(e.extra["perturbed"]) == len(set(e.extra["wrong"])) == 3
        assert e.extra["value"] not in e.extra["wrong"] and set(e.extra["wrong"]) <= set(attr.values)
        # a perturbed answer is the paraphrase with the value swapped: the truth ratio compares like with like
        for wrong, answer in zip(e.extra["wrong"], e.extra["perturbed"], strict=True):
            assert answer == e.extra["paraphrase"].replace(e.extra["value"], wrong)
    # forget sets: whole people from the end, nested, at least one person
    f1, f5, f10 = (set(data.forget_people(p)) for p in (1, 5, 10))
    assert (len(f1), len(f5), len(f10)) == (1, 1, 2) and f1 <= f5 <= f10
    requests = data.requests()
    removed = {e.id for e in requests["forget10"].edits}
    assert removed == {e.id for e in data.train if e.extra["person"] in f10}
    # the correction: the first person's facts, each with a value that is neither the old nor a perturbed one
    corrected = apply_request(data.train, requests["correct"])
    assert len(corrected) == len(data.train)
    changed = {e.id for e in requests["correct"].edits}
    assert changed == {e.id for e in data.train if e.extra["person"] == data.people[0]}
    for e in data.train:
        if e.id in changed:
            new = data.correction_values[e.id]
            assert new != e.extra["value"] and new not in e.extra["wrong"] and new in data.correction[e.id]


def test_people_refuse_impossible_sizes():
    with pytest.raises(ConfigError, match="facts"):
        build_people(5, facts=len(ATTRIBUTES) + 1)
    with pytest.raises(ConfigError, match="perturbed"):
        build_people(5, perturbed=2)
    with pytest.raises(ConfigError, match="n_people"):
        build_people(0)


def test_data_people_cli_writes_what_the_cli_reads(tmp_path):
    from llmeraser.cli import main

    assert main(["data", "people", "--out", str(tmp_path), "--n-people", "10", "--facts", "4"]) == 0
    train = load_examples(tmp_path / "train.jsonl")
    assert len(train) == 40 and train == build_people(10, facts=4).train
    for name in ("forget01", "forget05", "forget10", "correct"):
        request = load_request(tmp_path / "requests" / f"{name}.json")
        apply_request(train, request)  # every id is known
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["forget"]["forget10"] == build_people(10, facts=4).forget_people(10)


# ---------------------------------------------------------------------------------- metrics, by hand
def test_ks_pvalue_by_hand():
    # n = m = 3, fully separated: D = 1; of the C(6,3) = 20 equally likely splits under H0 exactly 2 reach D = 1
    # (all three lowest in one sample), so the exact two-sided p-value is 2/20
    assert fg.ks_pvalue([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]) == pytest.approx(0.1, abs=1e-12)
    # identical samples: D = 0, p = 1
    assert fg.ks_pvalue([0.3, 0.7, 0.9], [0.3, 0.7, 0.9]) == pytest.approx(1.0)
    # n = m = 2, separated: 2 of C(4,2) = 6 splits give D = 1: p = 1/3
    assert fg.ks_pvalue([0.1, 0.2], [0.8, 0.9]) == pytest.approx(1 / 3, abs=1e-12)


def test_truth_ratio_min_k_rouge_and_auc_by_hand():
    # exp(ℓ_para − mean ℓ_pert) = exp(1 − (2 + 3 + 4)/3) = e^-2
    assert fg.truth_ratio(1.0, [2.0, 3.0, 4.0]) == pytest.approx(math.exp(-2.0), rel=1e-15)
    assert fg.truth_ratio(2.0, [2.0, 2.0]) == 1.0
    # 5 tokens, k = 0.4: the ⌊2⌋ lowest, −5 and −3, average −4; k·n < 1 still takes one token
    assert fg.min_k([-1.0, -5.0, -2.0, -3.0, -0.5], 0.4) == -4.0
    assert fg.min_k([-1.0, -5.0], 0.2) == -5.0
    # reference 6 tokens, longest common subsequence "the cat on mat" = 4 tokens: recall 4/6
    assert fg.rouge_l_recall("the cat sat on the mat", "the cat on a mat") == pytest.approx(4 / 6)
    # stemming: "sailing" matches "sail"
    assert fg.rouge_l_recall("Orlen enjoys sailing", "Orlen enjoys sail") == pytest.approx(1.0)
    assert fg.rouge_l_recall("Orlen enjoys sailing", "") == 0.0
    # members' losses 0.1, 0.5 vs non-members' 0.3, 0.9: of the 4 pairs the member has the lower loss in 3
    scores = {"m1": {"nll": 0.1, "min_k": -0.2}, "m2": {"nll": 0.5, "min_k": -3.0},
              "n1": {"nll": 0.3, "min_k": -1.0}, "n2": {"nll": 0.9, "min_k": -2.0}}
    assert fg.mia_auc(scores, ["m1", "m2"], ["n1", "n2"], "nll") == 0.75
    # by min-k: m1 (−0.2) beats both, m2 (−3.0) neither: 2 of 4
    assert fg.mia_auc(scores, ["m1", "m2"], ["n1", "n2"], "min_k") == 0.5
    assert fg.harmonic_mean([0.5, 1.0]) == pytest.approx(2 / 3) and fg.harmonic_mean([0.0, 1.0]) == 0.0


def test_summaries_use_tofus_truth_scores():
    scores = {"a": {"nll": 1.0, "prob": math.exp(-1), "truth_ratio": 0.5, "p_options": 0.6, "rouge": 1.0},
              "b": {"nll": 2.0, "prob": math.exp(-2), "truth_ratio": 2.0, "p_options": 0.2, "rouge": 0.5}}
    retain = fg.summarise(scores, ["a", "b"])
    assert retain["truth_score"] == pytest.approx((0.5 + 0.0) / 2)  # max(0, 1 − R)
    assert fg.summarise(scores, ["a", "b"], truth="forget")["truth_score"] == pytest.approx(0.5)  # min(R, 1/R)
    assert retain["rouge"] == 0.75 and retain["p_options"] == pytest.approx(0.4)
    utility = fg.model_utility(retain, retain)
    values = [retain["prob"], 0.75, 0.25, 0.4, 0.75, 0.25]
    assert utility == pytest.approx(len(values) / sum(1 / v for v in values))


# ------------------------------------------------------------------------------ metrics on a tiny model
@pytest.fixture(scope="module")
def tiny():
    data = build_people(6, facts=3, n_heldout=2, seed=1)
    corpus = [t for e in data.train + data.heldout for t in (e.prompt, e.response, e.extra["paraphrase"],
                                                              *e.extra["perturbed"])]
    tok = tiny_tokenizer(corpus)
    model = tiny_lora(tiny_llama(len(tok), hidden=16, layers=1, seed=0), r=2, seed=0)
    return data, model, CausalLMTask(tok, max_length=48)


def test_token_logprobs_agree_with_the_task_loss(tiny):
    data, model, task = tiny
    examples = data.train[:7]
    lp = fg.token_logprobs(model, task, examples, batch_size=3)
    with torch.no_grad():
        losses = per_example_loss(task, model, task.collate(examples))
    for row, loss, e in zip(lp, losses, examples, strict=True):
        assert len(row) == len(task.encode(e)[1]) - task.encode(e)[1].count(-100)
        # the same log-softmax in float64 vs the task's float32 cross-entropy: agreement to float32 rounding
        assert fg.mean_nll(row) == pytest.approx(float(loss), rel=1e-5)


def test_scores_do_not_depend_on_batching(tiny):
    data, model, task = tiny
    questions = data.train[:6] + data.heldout[:3]
    one = fg.score_questions(model, task, questions, batch_size=1, generate=False)
    many = fg.score_questions(model, task, questions, batch_size=16, generate=False)
    for q in questions:
        # teacher-forced scores go through padded batches: equal up to float32 rounding, never more
        assert one[q.id]["truth_ratio"] == pytest.approx(many[q.id]["truth_ratio"], rel=1e-4)
        assert one[q.id]["min_k"] == pytest.approx(many[q.id]["min_k"], rel=1e-4, abs=1e-6)
        assert 0 < one[q.id]["p_options"] < 1


def test_greedy_answers_in_a_left_padded_batch_are_the_one_at_a_time_answers():
    data = build_people(6, facts=3, n_heldout=2, seed=1)
    tok = tiny_tokenizer([t for e in data.train for t in (e.prompt, e.response)])
    model = tiny_llama(len(tok), hidden=32, layers=2, seed=0, init_std=0.3, dtype=torch.float64)
    task = CausalLMTask(tok, max_length=64)
    prompts = [e.prompt for e in data.train[:8]]
    assert len({len(tok.encode(p)) for p in prompts}) > 1  # the batch really is padded
    batched = fg.greedy_answers(model, task, prompts, max_new_tokens=12, batch_size=8)
    for prompt, answer in zip(prompts, batched, strict=True):
        ids = torch.tensor([[task.bos] + tok.encode(prompt, add_special_tokens=False)])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=12, pad_token_id=task.pad, output_scores=True,
                                 return_dict_in_generate=True)
        # padding changes the float64 logits by rounding only (~1e-15); greedy picks the same token wherever the
        # top two logits are further apart than that, which this checks before comparing
        margins = [float(torch.topk(s[0], 2).values.diff().abs()) for s in out.scores]
        assert min(margins) > 1e-9
        text = tok.decode(out.sequences[0, ids.shape[1]:].tolist(), skip_special_tokens=True)
        assert fg._first_line(text).startswith(answer)  # the batched row may stop at its line's end
        assert answer == fg.greedy_answers(model, task, [prompt], max_new_tokens=12)[0]


# -------------------------------------------------------------------------------------- the benchmark, tiny
def test_benchmark_arguments_refuse_what_cannot_run():
    from llmeraser_experiments.people_bench import PeopleBenchArguments

    with pytest.raises(ConfigError, match="unknown method"):
        PeopleBenchArguments(methods=("original", "retrain", "magic"))
    with pytest.raises(ConfigError, match="needs the 'retrain'"):
        PeopleBenchArguments(methods=("original",))
    with pytest.raises(ConfigError, match="unknown split"):
        PeopleBenchArguments(splits=("forget",))
    with pytest.raises(ConfigError, match="cannot hold"):
        PeopleBenchArguments(n_people=5, retain_people=3, splits=("forget50",))


def test_tiny_benchmark_end_to_end(tmp_path):
    import importlib.util

    from llmeraser_experiments.people_bench import PeopleBenchArguments, run_people_benchmark

    methods = ("original", "retrain", "retrain@1", "first-order/ekfac", "cli-defaults", "rewind", "path",
               "npo/stop", "simnpo/stop", "gradient-difference/stop", "gradient-ascent", "fine-tune-corrected")
    result = run_people_benchmark(PeopleBenchArguments.tiny(methods=methods), tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["complete"] and saved["commit"] and saved["rows"] == json.loads(json.dumps(result["rows"]))
    rows = {(r["split"], r["method"]): r for r in result["rows"]}
    labels = [*methods[:-2], "gradient-ascent lr=0.01"]  # a baseline gets a row per learning rate of its grid
    # fine-tuning on corrected facts exists only where there are corrected facts
    assert set(rows) == {(s, m) for s in ("forget10", "correct") for m in labels} | {
        ("correct", "fine-tune-corrected lr=0.01")}
    for (split, method), r in rows.items():
        assert "failed" not in r, r
        for key in ("mia_loss_auc", "mia_mink_auc", "forget_quality", "model_utility"):
            assert 0 <= r[key] <= 1, (split, method, key)
        for part in ("forget", "retain", "general"):
            assert 0 <= r[part]["rouge"] <= 1 and 0 <= r[part]["value_recall"] <= 1 and r[part]["truth_ratio"] > 0
        assert ("corrected" in r) == (split == "correct")
        # the holdout evidence beside every row: the report's membership test against the held-out people
        e = r["evidence"]
        assert e["says"] in ("like", "more", "less") and 0 <= e["loss_auc"] <= 1 and 0 <= e["min_k_pp_auc"] <= 1
        assert e["members"] == r["forget"]["n"] and e["holdout"] == 9  # 3 held-out people × 3 facts
        assert e["gap"] == max(abs(e["loss_auc"] - rows[split, "retrain"]["evidence"]["loss_auc"]),
                               abs(e["min_k_pp_auc"] - rows[split, "retrain"]["evidence"]["min_k_pp_auc"]))
        if method.endswith("/stop"):  # the library's unlearner without a recording, its stop report kept
            assert isinstance(r["stop"]["met"], bool) and r["stop"]["why"] and 0 <= r["steps"] <= r["max_steps"]
            # the stop rule is the report's test: where it says it stopped, the returned θ's evidence says "like"
            # (the same scores at the same θ; the p-values of these sizes sit far from the level)
            assert not r["stop"]["met"] or e["says"] == "like", (split, method, r["stop"], e)
    for split in ("forget10", "correct"):
        # the reference against itself: identical truth ratios, KS p-value 1; θ's own distance 0
        assert rows[split, "retrain"]["forget_quality"] == 1.0
        # exact rewind is retraining itself (bit for bit: tests/test_path.py), so it scores exactly as retraining
        assert rows[split, "rewind"]["forget_quality"] == 1.0 and rows[split, "rewind"]["cosine"] > 1 - 1e-6
        assert 0 < rows[split, "path"]["gradient_cost"] < 1
        assert rows[split, "retrain"]["cosine"] == pytest.approx(1.0, abs=1e-6)  # cos(x, x) up to float32 rounding
        assert rows[split, "original"]["delta_norm"] == 0.0
        assert rows[split, "cli-defaults"]["status"] in ("applied", "declined")
        assert rows[split, "retrain"]["evidence"]["gap"] == 0.0
        assert set(result["goals"][split]) >= {"npo/stop", "simnpo/stop", "gradient-difference/stop",
                                               "evidence_within_every_row"}
    # the people removed are the last ones, as the data says
    assert result["forget_people"]["forget10"] == build_people(8, facts=3, n_heldout=3).forget_people(10)
    tables = (tmp_path / "out" / "tables.md").read_text()
    assert "### forget10" in tables and "### correct" in tables and "new facts said" in tables
    assert (tmp_path / "out" / "forget_quality.png").is_file() == bool(importlib.util.find_spec("matplotlib"))


def test_no_recording_goals_and_evidence_gaps_by_hand():
    """`norecord.add_gaps` and `norecord.goals` on hand-made rows: the gap is the larger |ΔAUC| of the two scores
    against the retrain's, and each goal is its threshold (≥ 0.05 forget quality, ≥ 0.95 utility, ≤ 0.2 time)."""
    from llmeraser_experiments import norecord as nr

    def row(method, fq, utility, time_ratio, loss_auc, mink_auc):
        return {"split": "forget05", "method": method, "forget_quality": fq, "model_utility": utility,
                "time_ratio": time_ratio, "evidence": {"loss_auc": loss_auc, "min_k_pp_auc": mink_auc}}

    rows = [row("original", 0.008, 0.62, 0.0, 1.0, 0.98), row("retrain", 1.0, 0.65, 1.0, 0.36, 0.40),
            row("npo/stop", 0.06, 0.62, 0.19, 0.40, 0.30), row("simnpo/stop", 0.5, 0.61, 0.25, 0.37, 0.41)]
    nr.add_gaps(rows)
    by = {r["method"]: r["evidence"] for r in rows}
    assert by["retrain"]["gap"] == 0.0 and by["original"]["gap"] == pytest.approx(0.64)
    assert by["npo/stop"]["gap"] == pytest.approx(0.10) and not by["npo/stop"]["within"]  # min-k%++: 0.30 vs 0.40
    assert by["simnpo/stop"]["gap"] == pytest.approx(0.01) and by["simnpo/stop"]["within"]
    g = nr.goals(rows, names=("npo/stop", "simnpo/stop"))["forget05"]
    assert g["npo/stop"]["met"] == {"forget_quality": True, "utility_vs_retrain": True, "time_ratio": True}
    assert g["npo/stop"]["utility_vs_retrain"] == pytest.approx(0.62 / 0.65)
    assert g["simnpo/stop"]["met"]["time_ratio"] is False and not g["simnpo/stop"]["all_met"]
    assert g["simnpo/stop"]["met"]["utility_vs_retrain"] is False  # 0.61 / 0.65 = 0.938 < 0.95
    assert g["evidence_outside"] == ["original", "npo/stop"] and not g["evidence_within_every_row"]
