"""Measurements against the step-level ground truth of the synthetic task arith (issues 14 and 16): the
error-type table of 00_policy, the ground truth that 01_rollouts adds and 02_labels passes on, 02's
``label_quality`` table (AUROC and Brier score of step labels against "before the first error") and 03's
``prm_truth`` checks (within-problem pairwise ranking, ProcessBench's first-error F1), each on hand-computed
cases."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from erprm_core import processbench, stats
from erprm_core.stages import labels, policy, processbench_eval, rollouts, train_prm
from erprm_core.tasks import arith_truth

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_prm import make_model, make_tokenizer  # noqa: E402

Q = (
    "Tom has 12 apples. On Monday, he buys 5 more apples. On Tuesday, he gives 3 apples to Mia. "
    "How many apples does Tom have now?"
)
MON = "On Monday, he buys 5 more apples, so Tom has 12 + 5 = 17 apples."
TUE = "On Tuesday, he gives 3 apples to Mia, so Tom has 17 - 3 = 14 apples."
SLIP = "On Tuesday, he gives 3 apples to Mia, so Tom has 17 - 3 = 13 apples."


# ----------------------------------------------------------------------------------------------------
# 00_policy and 01_rollouts
# ----------------------------------------------------------------------------------------------------


def test_error_type_table_counts_every_type_in_order():
    table = policy.error_type_table(["none", "arithmetic_slip", "none", "truncation"])
    assert table["error_type"].tolist() == list(arith_truth.ERROR_TYPES)
    counts = dict(zip(table["error_type"], table["count"], strict=True))
    assert counts == {"arithmetic_slip": 1, "wrong_operand_or_event": 0, "skipped_or_repeated_event": 0,
                      "bad_final_line": 0, "truncation": 1, "none": 2}  # fmt: skip
    assert table.set_index("error_type").loc["none", "share"] == 0.5
    assert table["share"].sum() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown error types"):
        policy.error_type_table(["slip"])


def test_greedy_error_types_use_the_problem_question():
    problems = [{"id": "p1", "question": Q}, {"id": "p2", "question": Q}]
    sols = [{"problem_id": "p2", "steps": [MON, SLIP, "The answer is: 13"]},
            {"problem_id": "p1", "steps": [MON, TUE, "The answer is: 14"]}]  # fmt: skip
    assert policy.greedy_error_types(problems, sols) == ["arithmetic_slip", "none"]


def test_add_ground_truth_annotates_arith_records_only():
    recs = [
        {"task": "arith", "question": Q, "steps": [MON, SLIP, "The answer is: 13"], "outcome": 0},
        {
            "task": "gsm8k",
            "question": "What is 1 + 1?",
            "steps": ["1 + 1 = 2", "The answer is: 2"],
            "outcome": 1,
        },
    ]
    assert rollouts.add_ground_truth(recs) == 1
    assert list(recs[0]) == ["task", "question", "steps", "outcome", "first_error", "error_type"]
    assert (recs[0]["first_error"], recs[0]["error_type"]) == (1, "arithmetic_slip")
    assert "first_error" not in recs[1]


def test_ground_truth_prefers_stored_values_and_skips_other_tasks():
    rec = {"task": "arith", "question": Q, "steps": [MON, TUE, "The answer is: 15"]}
    assert labels.ground_truth(rec) == (2, "bad_final_line")  # computed from the question
    assert labels.ground_truth({**rec, "first_error": 0, "error_type": "truncation"}) == (0, "truncation")
    assert labels.ground_truth({**rec, "task": "gsm8k"}) is None


def test_label_records_carry_the_ground_truth():
    base = {"problem_id": "p", "sample_index": 0, "question": Q, "answer": "14", "outcome": 0,
            "completion_rewards": [[1, 0], [0, 0]]}  # fmt: skip
    arith = {**base, "task": "arith", "steps": [MON, SLIP, "The answer is: 13"]}
    other = {**base, "task": "gsm8k", "steps": ["a", "b", "c"]}
    out = labels.label_records([arith, other], [0.0])
    assert (out[0]["first_error"], out[0]["error_type"]) == (1, "arithmetic_slip")
    assert "first_error" not in out[1] and "error_type" not in out[1]


# ----------------------------------------------------------------------------------------------------
# 02_labels: labels against the truth
# ----------------------------------------------------------------------------------------------------


def test_problem_bootstrap_auroc_value_by_hand():
    # positives 0.9, 0.8 against negatives 0.3, 0.8: 1 + 1 + 1 + 1/2 (the tie) of 4 pairs
    value, low, high = stats.problem_bootstrap_auroc([0.9, 0.8, 0.3, 0.8], [1, 1, 0, 0], ["a", "b", "c", "d"])
    assert value == 0.875
    assert 0.0 <= low <= value <= high <= 1.0 and low < high


def test_problem_bootstrap_auroc_resamples_whole_problems():
    # three identical problems: every resample has the same pairs, so the interval collapses to the value
    scores, truth = [0.9, 0.8, 0.3, 0.8] * 3, [1, 1, 0, 0] * 3
    problems = ["a"] * 4 + ["b"] * 4 + ["c"] * 4
    assert stats.problem_bootstrap_auroc(scores, truth, problems, n_boot=50) == (0.875, 0.875, 0.875)


def test_problem_bootstrap_auroc_matches_a_brute_force_bootstrap():
    rng = np.random.default_rng(3)
    problems = np.repeat([f"p{i}" for i in range(12)], 4)
    scores = rng.choice([0.0, 0.25, 0.5, 0.75, 1.0], size=problems.size)
    truth = (rng.random(problems.size) < 0.5).astype(int)
    n_boot, seed = 300, 11
    value, low, high = stats.problem_bootstrap_auroc(scores, truth, problems, n_boot=n_boot, seed=seed)
    assert value == stats.auroc(scores, truth)
    # the same resamples, one stats.auroc call each: problem g is drawn draws[b] times in resample b
    _, group = np.unique(problems, return_inverse=True)
    draws = np.random.default_rng(seed).integers(0, 12, size=(n_boot, 12))
    boot = []
    for row in draws:
        idx = np.concatenate([np.flatnonzero(group == g) for g in row])
        if 0 < truth[idx].sum() < idx.size:
            boot.append(stats.auroc(scores[idx], truth[idx]))
    assert (low, high) == pytest.approx(tuple(np.quantile(boot, [0.025, 0.975])), abs=1e-12)


def test_problem_bootstrap_auroc_one_class_is_nan():
    assert all(math.isnan(v) for v in stats.problem_bootstrap_auroc([0.2, 0.9], [1, 1], ["a", "b"]))


def test_problem_bootstrap_brier_value_and_interval():
    value, low, high = stats.problem_bootstrap_brier([1.0, 0.5, 0.0, 0.5], [1, 0, 0, 1], ["a", "a", "b", "b"])
    assert value == pytest.approx((0 + 0.25 + 0 + 0.25) / 4)
    assert (low, high) == (0.125, 0.125)  # both problems have the same mean square error


def _label_fixture():
    # A: three steps, first error at step 1 -> truth [1, 0, 0]; B: two right steps -> truth [1, 1]
    a = {"problem_id": "p1", "steps": ["s"] * 3, "first_error": 1,
         "labels": {"soft": [0.75, 0.25, 0.0], "orm": [None, None, 0.0]}}  # fmt: skip
    b = {"problem_id": "p2", "steps": ["s"] * 2, "first_error": -1,
         "labels": {"soft": [0.2, 1.0], "orm": [None, 1.0]}}  # fmt: skip
    no_truth = {"problem_id": "p3", "steps": ["s"] * 2, "labels": {"soft": [0.0, 0.0], "orm": [None, 0.0]}}
    return [a, b, no_truth]


def test_truth_steps_marks_steps_before_the_first_error():
    steps = labels.truth_steps(_label_fixture(), "soft")
    assert steps["truth"].tolist() == [1, 0, 0, 1, 1]
    assert steps["steps_remaining"].tolist() == [2, 1, 0, 1, 0]
    assert labels.truth_steps(_label_fixture(), "orm")["label"].tolist() == [0.0, 1.0]  # None left out


def test_label_quality_table_by_hand():
    table = labels.label_quality_table(_label_fixture(), n_boot=100)
    assert list(table.columns) == labels.QUALITY_COLUMNS
    t = table.set_index(["rule", "metric", "steps_remaining"])
    # soft, all steps: positives 0.75, 0.2, 1.0 against negatives 0.25, 0.0 -> 5 of 6 pairs
    assert t.loc[("soft", "auroc_vs_truth", "all"), "value"] == pytest.approx(5 / 6)
    assert t.loc[("soft", "auroc_vs_truth", "all"), "n"] == 5
    assert t.loc[("soft", "auroc_vs_truth", "0"), "value"] == 1.0  # last steps: 0.0 (wrong) < 1.0 (right)
    assert t.loc[("soft", "auroc_vs_truth", "1"), "value"] == 0.0  # 0.2 (right) < 0.25 (wrong)
    assert math.isnan(t.loc[("soft", "auroc_vs_truth", "2"), "value"])  # one step, one class
    brier = (0.25**2 + 0.25**2 + 0 + 0.8**2 + 0) / 5
    assert t.loc[("soft", "brier_vs_truth", "all"), "value"] == pytest.approx(brier)
    assert t.loc[("orm", "auroc_vs_truth", "all"), "value"] == 1.0
    assert t.loc[("orm", "auroc_vs_truth", "all"), "n"] == 2
    assert sorted(table.query("rule == 'orm'")["steps_remaining"].unique()) == ["0", "all"]
    assert labels.label_quality_table([_label_fixture()[2]]).empty  # no ground truth, no rows


# ----------------------------------------------------------------------------------------------------
# 03_train_prm: PRMs against the truth
# ----------------------------------------------------------------------------------------------------


def test_within_problem_pairwise_with_ties():
    pids = ["a", "a", "a", "a", "b", "c", "c"]
    outcomes = [1, 1, 0, 0, 1, 1, 0]
    scores = [0.9, 0.5, 0.5, 0.1, 0.7, 0.2, 0.8]
    shares = stats.within_problem_pairwise(pids, outcomes, scores)
    # a: (0.9 > 0.5) + (0.9 > 0.1) + (0.5 = 0.5: one half) + (0.5 > 0.1) = 3.5 of 4; b has no wrong one; c: 0
    assert shares.to_dict() == {"a": 0.875, "c": 0.0}


def test_predict_first_error_stops_at_unscored_steps():
    assert processbench.first_error([0.9, 0.4, np.nan]) == 1
    assert processbench.first_error([0.9, np.nan, 0.1]) is None
    assert processbench.first_error([0.9, 0.5]) == -1  # a tie with the threshold counts as right
    assert processbench.first_error([0.9, 0.7], threshold=0.8) == 1


def test_first_error_f1_known_confusion():
    truth = [2, 1, 0, 3, -1, -1, -1]
    preds = [2, -1, 0, 1, -1, 0, -1]  # 2 of 4 errors found exactly; 2 of 3 right solutions passed
    r = processbench_eval.first_error_f1(preds, truth, n_boot=500)
    assert (r["error_acc"], r["correct_acc"]) == (0.5, pytest.approx(2 / 3))
    assert r["f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert r["f1"] == processbench.f1(preds, truth)["f1"]
    assert (r["n"], r["n_error"], r["n_correct"]) == (7, 4, 3)
    assert 0.0 <= r["f1_low"] < r["f1"] < r["f1_high"] <= 1.0
    perfect = processbench_eval.first_error_f1(truth, truth, n_boot=100)
    assert (perfect["f1"], perfect["f1_low"], perfect["f1_high"]) == (1.0, 1.0, 1.0)


def _scores(rule, per_solution):
    rows = []
    for (pid, si, outcome), ss in per_solution.items():
        for i, s in enumerate(ss):
            rows.append({"rule": rule, "problem_id": pid, "sample_index": si, "step": i, "n_steps": len(ss),
                         "score": s, "label": np.nan, "hard_label": np.nan, "outcome": outcome})  # fmt: skip
    return pd.DataFrame(rows)


def _truth_fixture():
    soft = {
        ("p1", 0, 1): [0.9, 0.8],
        ("p1", 1, 0): [0.7, 0.3],
        ("p2", 0, 1): [0.6, 0.4],
        ("p2", 1, 0): [0.9, 0.6],
    }
    orm = {**soft, ("p2", 1, 0): [0.3, 0.6]}  # min would rank p2 right (0.4 > 0.3), last does not (0.4 < 0.6)
    scores = pd.concat([_scores("soft", soft), _scores("orm", orm)], ignore_index=True)
    records = [
        {"problem_id": "p1", "sample_index": 0, "first_error": -1},
        {"problem_id": "p1", "sample_index": 1, "first_error": 1},
        {"problem_id": "p2", "sample_index": 0, "first_error": -1},
        {"problem_id": "p2", "sample_index": 1, "first_error": 0},
    ]
    return scores, records


def test_truth_metrics_by_hand():
    scores, records = _truth_fixture()
    table = train_prm.truth_metrics(scores, records, n_boot=200)
    assert list(table.columns) == train_prm.TRUTH_COLUMNS
    assert set(table["threshold_source"]) == {"", "paper", "validation"}
    paper = table[table["threshold_source"] != "validation"]
    assert (paper.loc[paper["metric"] != "within_problem_pairwise", "threshold"] == 0.5).all()
    t = paper.set_index(["rule", "metric"])
    # soft, min: p1 0.8 > 0.3 -> 1; p2 0.4 < 0.6 -> 0; mean over the two problems
    assert t.loc[("soft", "within_problem_pairwise"), ["aggregation", "value", "n"]].tolist() == [
        "min",
        0.5,
        2,
    ]
    assert t.loc[("orm", "within_problem_pairwise"), ["aggregation", "value"]].tolist() == ["last", 0.5]
    # soft predictions: p1#0 -1 (right), p1#1 1 (right), p2#0 1 (truth -1), p2#1 -1 (truth 0)
    assert t.loc[("soft", "error_acc"), ["value", "n"]].tolist() == [0.5, 2]
    assert t.loc[("soft", "correct_acc"), ["value", "n"]].tolist() == [0.5, 2]
    assert t.loc[("soft", "first_error_f1"), ["value", "n"]].tolist() == [0.5, 4]
    # orm: p2#1 [0.3, 0.6] now predicts step 0, its true first error
    assert t.loc[("orm", "error_acc"), "value"] == 1.0
    assert t.loc[("orm", "first_error_f1"), "value"] == pytest.approx(2 / 3)
    # the interval resamples the two problems, not the solutions: p1's hit and p2's miss -> (0, 1)
    low, high = t.loc[("soft", "error_acc"), ["ci_low", "ci_high"]]
    assert (low, high) == (0.0, 1.0)
    # each rule's validation threshold is the one of the best F1 on these problems (ties nearest 0.5)
    tuned = table[(table["threshold_source"] == "validation") & (table["metric"] == "first_error_f1")]
    for rule, row in tuned.set_index("rule").iterrows():
        sweep = pd.DataFrame(processbench_eval.threshold_sweep(
            [g.sort_values("step")["score"].tolist() for _, g in scores[scores["rule"] == rule].groupby(["problem_id", "sample_index"], sort=False)],
            [-1, 1, -1, 0]))  # fmt: skip
        assert row["value"] == pytest.approx(sweep["f1"].max())
    assert train_prm.truth_metrics(scores, [{"problem_id": "p1", "sample_index": 0, "task": "gsm8k"}]).empty


def test_record_first_errors_computes_arith_truth_when_missing():
    recs = [{"problem_id": "p", "sample_index": 3, "task": "arith", "question": Q,
             "steps": [MON, SLIP, "The answer is: 13"]}]  # fmt: skip
    assert train_prm.record_first_errors(recs) == {("p", 3): 1}


@pytest.fixture(scope="module")
def prm_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_prm_truth")
    tok = make_tokenizer()
    make_model(tok).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _labelled(pid, si, outcome, first_error=None):
    rec = {"problem_id": pid, "sample_index": si, "question": "Tom has 3 apples .", "steps": ["3 + 2 = 5"] * 2,
           "outcome": outcome, "labels": {"soft": [0.5, float(outcome)], "orm": [None, float(outcome)]}}  # fmt: skip
    if first_error is not None:
        rec["first_error"] = first_error
    return rec


def test_evaluate_prm_rules_appends_truth_rows_after_the_others(prm_folder):
    plain = [_labelled("a", 0, 1), _labelled("a", 1, 0)]
    before = train_prm.evaluate_prm_rules({"soft": prm_folder}, plain, device="cpu")
    assert before["truth"] is None
    truthful = [_labelled("a", 0, 1, -1), _labelled("a", 1, 0, 1)]
    ev = train_prm.evaluate_prm_rules({"soft": prm_folder}, truthful, device="cpu")
    n_old = len(before["metrics"])
    pd.testing.assert_frame_equal(ev["metrics"].iloc[:n_old], before["metrics"])  # existing rows unchanged
    added = ev["metrics"].iloc[n_old:]
    assert added["metric"].tolist() == list(train_prm.TRUTH_METRICS)
    assert (added["scoring"] == "two_token").all()
    truth = ev["truth"][ev["truth"]["threshold_source"] != "validation"].set_index("metric")
    assert added["value"].tolist() == pytest.approx(
        truth.loc[list(train_prm.TRUTH_METRICS), "value"].tolist()
    )
    # the same checkpoint scores both (identical) solutions alike, up to the last bits of their batch rows
    # (MKL's portable GEMM rounds rows by position): the pair's share follows the two minima exactly
    mins = ev["scores"].groupby("sample_index")["score"].min()
    assert mins[0] == pytest.approx(mins[1], abs=1e-6)
    expected = 0.5 if mins[0] == mins[1] else float(mins[0] > mins[1])  # solution 0 is the correct one
    assert truth.loc["within_problem_pairwise", "value"] == expected
