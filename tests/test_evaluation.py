"""Tests of the best-of-N evaluators, statistics and tables on hand-computed pools and brute force."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from erprm_core import evaluators, stats
from erprm_core.stages import bon_tables


def enumerate_all(m: int, n: int, p: int = 1) -> np.ndarray:
    combos = np.array(list(itertools.combinations(range(m), n)))
    return np.broadcast_to(combos, (p, *combos.shape))


def brute_bon(scores: np.ndarray, correct: np.ndarray, n: int) -> np.ndarray:
    """Expected accuracy over all n-subsets, exact tie expectation, by plain Python loops."""
    out = []
    for s, c in zip(scores, correct, strict=True):
        vals = []
        for sub in itertools.combinations(range(len(s)), n):
            best = max(s[i] for i in sub)
            tied = [i for i in sub if s[i] == best]
            vals.append(sum(c[i] for i in tied) / len(tied))
        out.append(np.mean(vals))
    return np.array(out)


# ----------------------------------------------------------------------------------------- best-of-N
TIE_SCORES = np.array([[0.9, 0.9, 0.5, 0.1]])
TIE_CORRECT = np.array([[1, 0, 1, 0]])


@pytest.mark.parametrize("n, expected", [(1, 0.5), (2, 3.5 / 6), (3, 0.5), (4, 0.5)])
def test_bon_exact_with_ties_hand_computed(n, expected):
    # n=2: {01}: tie 1/2, {02}:1, {03}:1, {12}:0, {13}:0, {23}:1 -> 3.5/6
    got = evaluators.best_of_n_accuracy(TIE_SCORES, TIE_CORRECT, n)
    assert got.shape == (1,)
    assert got[0] == pytest.approx(expected, abs=1e-12)
    on_all = evaluators.best_of_n_accuracy(TIE_SCORES, TIE_CORRECT, n, subsets=enumerate_all(4, n))
    assert on_all[0] == pytest.approx(expected, abs=1e-12)


def test_bon_exact_matches_brute_force_on_random_tied_pools():
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 4, size=(20, 7)).astype(float)  # many ties
    correct = rng.integers(0, 2, size=(20, 7))
    for n in range(1, 8):
        np.testing.assert_allclose(
            evaluators.best_of_n_accuracy(scores, correct, n), brute_bon(scores, correct, n), atol=1e-12
        )


def test_bon_n1_is_mean_correct_and_nM_is_argmax():
    rng = np.random.default_rng(2)
    scores = rng.random((30, 16))
    correct = rng.integers(0, 2, size=(30, 16))
    np.testing.assert_allclose(
        evaluators.best_of_n_accuracy(scores, correct, 1), correct.mean(axis=1), atol=1e-12
    )
    top = correct[np.arange(30), scores.argmax(axis=1)]
    np.testing.assert_allclose(evaluators.best_of_n_accuracy(scores, correct, 16), top, atol=1e-12)
    # sampled estimator at n=M also uses the full pool
    np.testing.assert_allclose(evaluators.best_of_n_accuracy(scores, correct, 16, n_subsets=50, rng=0), top)


def test_bon_sampled_close_to_exact_and_deterministic():
    rng = np.random.default_rng(3)
    scores = rng.random((40, 32))
    correct = rng.integers(0, 2, size=(40, 32))
    exact = evaluators.best_of_n_accuracy(scores, correct, 8)
    a = evaluators.best_of_n_accuracy(scores, correct, 8, n_subsets=4000, rng=5)
    b = evaluators.best_of_n_accuracy(scores, correct, 8, n_subsets=4000, rng=5)
    np.testing.assert_array_equal(a, b)
    assert abs(a.mean() - exact.mean()) < 0.01


def test_perfect_and_inverted_scorer():
    correct = np.array([[0, 0, 1, 0, 1, 0]])
    good = correct + 0.01 * np.arange(6)
    for n in range(1, 7):
        oracle = evaluators.oracle_accuracy(correct, n)
        assert evaluators.best_of_n_accuracy(good, correct, n)[0] == pytest.approx(oracle[0])
        assert evaluators.best_of_n_accuracy(-good, correct, n)[0] <= correct.mean() + 1e-12


# ----------------------------------------------------------------------------------------- baselines
def test_random_pick_is_mean_correct_for_any_n_and_on_subsets():
    correct = np.array([[1, 0, 0, 1, 1], [0, 0, 0, 0, 1]])
    for n in range(1, 6):
        np.testing.assert_allclose(evaluators.random_pick_accuracy(correct, n), [0.6, 0.2])
        np.testing.assert_allclose(
            evaluators.random_pick_accuracy(correct, subsets=enumerate_all(5, n, 2)), [0.6, 0.2]
        )


def test_oracle_exact_equals_enumeration_and_is_monotone():
    correct = np.array([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0] * 6, [1] * 6])
    prev = np.zeros(4)
    for n in range(1, 7):
        exact = evaluators.oracle_accuracy(correct, n)
        np.testing.assert_allclose(
            exact, evaluators.oracle_accuracy(correct, n, subsets=enumerate_all(6, n, 4))
        )
        assert np.all(exact >= prev - 1e-12)
        prev = exact
    np.testing.assert_allclose(evaluators.oracle_accuracy(correct, 2), [1 - 10 / 15, 1 - 6 / 15, 0, 1])
    np.testing.assert_allclose(prev, [1, 1, 0, 1])


MAJ_ANSWERS = np.array([["a", "a", "b", "b", None], [None] * 5], dtype=object)
MAJ_CORRECT = np.array([[1, 1, 0, 0, 0], [0] * 5])


@pytest.mark.parametrize("n, expected", [(1, 0.4), (2, 0.5), (5, 0.5)])
def test_majority_vote_ties_and_none(n, expected):
    # n=1: a,a right, b,b wrong, None -> wrong: 2/5.  n=2 (10 subsets): {aa}=1, 4x{ab} tie=.5, 2x{a,None}=1,
    # {bb}=0, 2x{b,None}=0 -> 5/10.  n=5: a vs b tie -> 0.5.  Second problem: only None answers -> 0.
    got = evaluators.majority_vote_accuracy(MAJ_ANSWERS, MAJ_CORRECT, n, subsets=enumerate_all(5, n, 2))
    np.testing.assert_allclose(got, [expected, 0.0], atol=1e-12)
    # default path enumerates too (C(5, n) <= 200)
    np.testing.assert_allclose(evaluators.majority_vote_accuracy(MAJ_ANSWERS, MAJ_CORRECT, n), got)


def test_majority_none_never_wins_over_single_answer():
    answers = np.array([[None, None, None, "7"]], dtype=object)
    correct = np.array([[0, 0, 0, 1]])
    assert evaluators.majority_vote_accuracy(answers, correct, 4)[0] == 1.0


def test_weighted_vote_hand_computed():
    answers = np.array([["a", "a", "b"]], dtype=object)
    correct = np.array([[1, 1, 0]])
    scores = np.array([[0.3, 0.3, 0.5]])
    # n=3: a has 0.6 > b 0.5 -> right, while best-of-3 picks b -> wrong
    assert evaluators.weighted_vote_accuracy(answers, scores, correct, 3)[0] == pytest.approx(1.0)
    assert evaluators.best_of_n_accuracy(scores, correct, 3)[0] == pytest.approx(0.0)
    # n=2: {01}: a; {02}: b (0.5 > 0.3); {12}: b -> 1/3
    assert evaluators.weighted_vote_accuracy(answers, scores, correct, 2)[0] == pytest.approx(1 / 3)
    # floating tie 0.1 + 0.2 vs 0.3 is split
    tie = np.array([[0.1, 0.2, 0.3]])
    assert evaluators.weighted_vote_accuracy(answers, tie, correct, 3)[0] == pytest.approx(0.5)


def test_weighted_vote_with_constant_scores_equals_majority_on_shared_subsets():
    rng = np.random.default_rng(4)
    answers = rng.choice(np.array(["1", "2", "3", None], dtype=object), size=(25, 20))
    correct = (answers == "1").astype(int)
    sub = evaluators.draw_subsets(25, 20, 6, 100, seed=9)
    maj = evaluators.majority_vote_accuracy(answers, correct, 6, subsets=sub)
    wv = evaluators.weighted_vote_accuracy(answers, np.full((25, 20), 0.7), correct, 6, subsets=sub)
    np.testing.assert_array_equal(maj, wv)


def test_vote_blocks_do_not_change_results(monkeypatch):
    rng = np.random.default_rng(5)
    answers = rng.choice(np.array(["1", "2", None], dtype=object), size=(13, 10))
    correct = (answers == "2").astype(int)
    sub = evaluators.draw_subsets(13, 10, 4, 50, seed=1)
    full = evaluators.majority_vote_accuracy(answers, correct, 4, subsets=sub)
    monkeypatch.setattr(evaluators, "VOTE_BLOCK_CELLS", 1)
    np.testing.assert_array_equal(evaluators.majority_vote_accuracy(answers, correct, 4, subsets=sub), full)


# ----------------------------------------------------------------------------------------- subsets
def test_draw_subsets_shapes_distinct_and_deterministic():
    sub = evaluators.draw_subsets(5, 10, 3, 40, seed=1)
    assert sub.shape == (5, 40, 3)
    assert all(len(set(row)) == 3 for row in sub.reshape(-1, 3))
    np.testing.assert_array_equal(sub, evaluators.draw_subsets(5, 10, 3, 40, seed=1))
    assert not np.array_equal(sub, evaluators.draw_subsets(5, 10, 3, 40, seed=2))
    # per-problem keys: a problem's subsets do not depend on the other problems
    keys = evaluators.problem_keys(["p0", "p1", "p2"])
    s3 = evaluators.draw_subsets(3, 10, 3, 40, seed=1, keys=keys)
    s1 = evaluators.draw_subsets(1, 10, 3, 40, seed=1, keys=keys[2:])
    np.testing.assert_array_equal(s3[2], s1[0])
    # enumeration when C(m, n) <= n_subsets; n == m -> the full pool
    assert evaluators.draw_subsets(2, 10, 1, 40).shape == (2, 10, 1)
    np.testing.assert_array_equal(evaluators.draw_subsets(2, 10, 10, 40)[1, 0], np.arange(10))


def test_same_subsets_make_methods_paired():
    rng = np.random.default_rng(6)
    scores = rng.random((10, 12))
    correct = rng.integers(0, 2, size=(10, 12))
    sub = evaluators.draw_subsets(10, 12, 4, 30, seed=3)
    a = evaluators.best_of_n_accuracy(scores, correct, 4, subsets=sub)
    # the value on given subsets is the mean over exactly THOSE subsets (brute force), not the exact one
    brute = [
        np.mean([correct[i, sub[i, k][np.argmax(scores[i, sub[i, k]])]] for k in range(30)])
        for i in range(10)
    ]
    np.testing.assert_allclose(a, brute, atol=1e-12)
    assert not np.allclose(a, evaluators.best_of_n_accuracy(scores, correct, 4))
    # a second method on the same subsets: its per-subset picks come from the same draws (paired)
    other = rng.random((10, 12))
    b = evaluators.best_of_n_accuracy(other, correct, 4, subsets=sub)
    brute_b = [
        np.mean([correct[i, sub[i, k][np.argmax(other[i, sub[i, k]])]] for k in range(30)]) for i in range(10)
    ]
    np.testing.assert_allclose(b, brute_b, atol=1e-12)
    np.testing.assert_array_equal(a, evaluators.best_of_n_accuracy(scores, correct, 4, n_subsets=30, rng=3))


# ----------------------------------------------------------------------------------------- pass@k
def test_pass_at_k_matches_brute_force():
    for m in range(1, 8):
        for c in range(m + 1):
            vec = [1] * c + [0] * (m - c)
            for k in range(1, m + 1):
                brute = np.mean([max(s) for s in itertools.combinations(vec, k)])
                assert evaluators.pass_at_k(c, m, k) == pytest.approx(brute, abs=1e-12)
    got = evaluators.pass_at_k(np.array([0, 1, 5, 64]), 64, 8)
    assert got.shape == (4,)
    assert got[1] == pytest.approx(8 / 64)
    assert evaluators.pass_at_k(3, 1000, 500) == pytest.approx(1 - math.comb(997, 500) / math.comb(1000, 500))
    with pytest.raises(ValueError):
        evaluators.pass_at_k(5, 4, 1)
    with pytest.raises(ValueError):
        evaluators.pass_at_k(1, 4, 5)


# ----------------------------------------------------------------------------------------- intervals
def test_bootstrap_covers_known_mean_and_handles_constants():
    x = (np.random.default_rng(0).random(2000) < 0.3).astype(float)
    mean, low, high = stats.bootstrap_ci(x, n_boot=2000, seed=0)
    assert low < 0.3 < high
    assert low < mean < high and high - low < 0.06
    assert stats.bootstrap_ci(x, n_boot=2000, seed=0) == (mean, low, high)
    assert stats.bootstrap_ci([0.25] * 10) == (0.25, 0.25, 0.25)
    assert stats.bootstrap_ci([1.0]) == (1.0, 1.0, 1.0)
    # one differing value: BCa may be undefined -> finite interval anyway
    _, lo2, hi2 = stats.bootstrap_ci([0.0] * 49 + [1.0], n_boot=500)
    assert np.isfinite(lo2) and np.isfinite(hi2) and lo2 <= 0.02 <= hi2
    with pytest.raises(ValueError):
        stats.bootstrap_ci([])
    with pytest.raises(ValueError):
        stats.bootstrap_ci([0.1, np.nan])


HALF = np.array([0.0] * 200 + [1.0] * 200)  # the bootstrap mean is Binomial(400, 1/2) / 400 exactly


def binomial_quantiles(confidence: float) -> tuple[float, float]:
    a = (1 - confidence) / 2
    return scipy_stats.binom.ppf(a, 400, 0.5) / 400, scipy_stats.binom.isf(a, 400, 0.5) / 400


@pytest.mark.parametrize("confidence", [0.5, 0.9, 0.95, 0.99])
@pytest.mark.parametrize("method", ["percentile", "basic", "BCa"])
def test_bootstrap_ci_is_the_bootstrap_distributions_quantiles(confidence, method):
    # exact bootstrap quantiles are binomial ones; 20000 resamples land within one atom (1/400); neighbouring
    # confidence levels (0.9 vs 0.95: 0.46 vs 0.45) are 4 atoms apart
    mean, low, high = stats.bootstrap_ci(HALF, n_boot=20000, confidence=confidence, seed=0, method=method)
    exact_low, exact_high = binomial_quantiles(confidence)
    assert mean == 0.5
    assert low == pytest.approx(exact_low, abs=1 / 400 + 1e-9)
    assert high == pytest.approx(exact_high, abs=1 / 400 + 1e-9)


def test_bootstrap_ci_method_is_used():
    x = np.random.default_rng(0).exponential(size=60) ** 2  # strongly right-skewed
    m, p_lo, p_hi = stats.bootstrap_ci(x, n_boot=4000, seed=1, method="percentile")
    _, b_lo, b_hi = stats.bootstrap_ci(x, n_boot=4000, seed=1, method="basic")
    _, c_lo, c_hi = stats.bootstrap_ci(x, n_boot=4000, seed=1, method="BCa")
    # basic = the percentile interval reflected about the mean (same resamples: same seed and length)
    assert (b_lo, b_hi) == pytest.approx((2 * m - p_hi, 2 * m - p_lo), abs=1e-12)
    # BCa corrects for the right skew: both ends move right of the percentile interval, clearly
    assert c_lo > p_lo + 0.1 and c_hi > p_hi + 0.3
    assert b_lo < p_lo - 0.2  # and basic moves left
    with pytest.raises(ValueError, match="confidence"):
        stats.bootstrap_ci(x, confidence=1.0)


def test_wilson_interval_known_value():
    acc, low, high = stats.accuracy_ci([1] * 50 + [0] * 50)
    assert acc == 0.5
    assert low == pytest.approx(0.4038, abs=1e-4) and high == pytest.approx(0.5962, abs=1e-4)
    acc, low, high = stats.accuracy_ci([0] * 10)
    assert (acc, low) == (0.0, 0.0) and 0.25 < high < 0.35  # Wilson upper bound for 0/10 ~ 0.278
    with pytest.raises(ValueError):
        stats.accuracy_ci([0.5])


def test_paired_diff_sign_and_exact_permutation_p():
    rng = np.random.default_rng(7)
    b = rng.random(300)
    a = b + 0.05 + 0.02 * rng.standard_normal(300)
    res = stats.paired_bootstrap_diff(a, b, n_boot=1000, seed=0)
    assert res.diff > 0 and res.ci_low > 0 and res.p_value < 0.01
    assert res.n_a_better > res.n_b_better and res.n_problems == 300
    rev = stats.paired_bootstrap_diff(b, a, n_boot=1000, seed=0)
    assert rev.diff == pytest.approx(-res.diff) and rev.ci_high < 0
    # five wins of 1: exact sign-flip two-sided p = 2 / 2^5
    five = stats.paired_bootstrap_diff(np.ones(5), np.zeros(5))
    assert five.p_value == pytest.approx(2 / 32)
    same = stats.paired_bootstrap_diff(b, b)
    assert (same.diff, same.ci_low, same.ci_high, same.p_value) == (0.0, 0.0, 0.0, 1.0)


def sign_flip_p(d) -> float:
    """Exact two-sided sign-flip p-value by enumerating every sign pattern."""
    d = np.asarray(d, dtype=float)
    means = [abs((d * np.array(s)).mean()) for s in itertools.product((1, -1), repeat=len(d))]
    return float(np.mean(np.array(means) >= abs(d.mean()) - 1e-12))


def test_paired_diff_values_hand_computed():
    a = np.array([1, 1, 0, 1, 1, 0, 1, 0])
    b = np.array([0, 1, 0, 0, 1, 1, 0, 0])  # d = [1, 0, 0, 1, 0, -1, 1, 0]
    res = stats.paired_bootstrap_diff(a, b)
    assert (res.mean_a, res.mean_b, res.diff) == (0.625, 0.375, 0.25)
    assert (res.n_problems, res.n_a_better, res.n_b_better) == (8, 3, 1)
    assert res.p_value == pytest.approx(sign_flip_p(a - b), abs=1e-12)
    assert res.p_value == pytest.approx(0.625, abs=1e-12)  # 2^8 = 256 <= 9999 sign patterns: exact


@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
def test_paired_diff_interval_is_the_bootstrap_quantile_interval(confidence):
    # differences 0 or 1, half each: the bootstrap mean difference is Binomial(400, 1/2) / 400
    a = np.array([1.0, 0.0] * 200)
    b = np.zeros(400)
    res = stats.paired_bootstrap_diff(a, b, n_boot=20000, confidence=confidence, n_permutations=999)
    exact_low, exact_high = binomial_quantiles(confidence)
    assert res.diff == 0.5 and res.n_a_better == 200
    assert res.ci_low == pytest.approx(exact_low, abs=1 / 400 + 1e-9)
    assert res.ci_high == pytest.approx(exact_high, abs=1 / 400 + 1e-9)


# ----------------------------------------------------------------------------------------- calibration
def test_auroc_hand_examples():
    assert stats.auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert stats.auroc([0.5, 0.5], [0, 1]) == pytest.approx(0.5)
    # pairs (pos, neg): (.9,.2)=1, (.9,.9)=.5 tie, (.1,.2)=0, (.1,.9)=0 -> 1.5 / 4
    assert stats.auroc([0.2, 0.9, 0.9, 0.1], [0, 1, 0, 1]) == pytest.approx(0.375)
    assert stats.auroc([1, 2, 3], [0, 1, 1]) == 1.0
    assert math.isnan(stats.auroc([0.1, 0.2], [1, 1]))
    with pytest.raises(ValueError):
        stats.auroc([0.1, 0.2], [0.3, 1])


def test_brier_and_calibration_bins():
    pred = np.array([0.0, 0.05, 0.15, 0.5, 0.95, 1.0])
    target = np.array([0, 0, 1, 0.5, 1, 1])
    assert stats.brier_score(pred, target) == pytest.approx(np.mean((pred - target) ** 2))
    bins = stats.calibration_bins(pred, target, n_bins=10)
    assert list(bins.columns) == ["bin", "bin_low", "bin_high", "mean_pred", "mean_target", "count"]
    assert len(bins) == 10 and bins["count"].sum() == 6
    assert bins["count"].tolist() == [2, 1, 0, 0, 0, 1, 0, 0, 0, 2]
    assert bins.loc[0, "mean_pred"] == pytest.approx(0.025) and bins.loc[9, "mean_target"] == 1.0
    assert math.isnan(bins.loc[2, "mean_pred"])
    assert stats.expected_calibration_error(pred, target) == pytest.approx(
        (2 * 0.025 + 1 * 0.85 + 0 + 2 * 0.025) / 6
    )
    with pytest.raises(ValueError):
        stats.brier_score([0.5, np.nan], [1, 0])


# ----------------------------------------------------------------------------------------- tables
def make_pool(p: int = 30, m: int = 8, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(p):
        skill = rng.random()
        for j in range(m):
            ok = int(rng.random() < skill)
            ans = str(i) if ok else rng.choice(["x", "y", None])
            rows.append(
                dict(
                    problem_id=f"q{i}",
                    candidate_index=j,
                    correct=ok,
                    answer=ans,
                    good=0.6 * ok + 0.4 * rng.random(),
                    noise=rng.random(),
                    const=1.0,
                )
            )
    return pd.DataFrame(rows)


def test_pool_arrays_order_invariant_and_validated():
    df = make_pool()
    a = bon_tables.pool_arrays(df, ["good", "noise"])
    b = bon_tables.pool_arrays(df.sample(frac=1.0, random_state=1), ["good", "noise"])
    assert a.problem_ids == b.problem_ids and (a.n_problems, a.n_candidates) == (30, 8)
    np.testing.assert_array_equal(a.scores["good"], b.scores["good"])
    np.testing.assert_array_equal(a.codes, b.codes)
    with pytest.raises(ValueError, match="duplicated"):
        bon_tables.pool_arrays(pd.concat([df, df.iloc[:1]]), ["good"])
    with pytest.raises(ValueError, match="same number of candidates"):
        bon_tables.pool_arrays(df.iloc[1:], ["good"])
    bad = df.copy()
    bad.loc[3, "good"] = np.nan
    with pytest.raises(ValueError, match="'good'.*q0"):
        bon_tables.pool_arrays(bad, ["good"])
    with pytest.raises(ValueError, match="no score column"):
        bon_tables.pool_arrays(df, ["missing"])


def test_best_of_n_table_schema_values_and_determinism():
    df = make_pool()
    kw = dict(methods=["good", "noise", "const"], ns=[1, 2, 4, 8], n_subsets=50, seed=3, n_boot=300)
    t = bon_tables.best_of_n_table(df, weighted=["good", "const"], **kw)
    assert list(t.columns) == bon_tables.TABLE_COLUMNS
    methods = ["good", "noise", "const", "weighted_good", "weighted_const", "random", "majority", "oracle"]
    assert t["method"].unique().tolist() == methods
    assert len(t) == len(methods) * 4
    assert (t["metric"] == "accuracy").all() and (t["n_problems"] == 30).all()
    assert ((t["ci_low"] <= t["value"] + 1e-12) & (t["value"] <= t["ci_high"] + 1e-12)).all()
    v = t.set_index(["method", "n"])["value"]
    arrays = bon_tables.pool_arrays(df, ["good"])
    assert v["random", 4] == pytest.approx(arrays.correct.mean())
    for n in (1, 2, 4, 8):
        assert v["oracle", n] >= v["good", n] - 1e-12
        assert v["const", n] == pytest.approx(v["random", n])  # all tied -> random pick
        assert v["weighted_const", n] == v["majority", n]  # shared subsets -> identical
    assert v["good", 1] == pytest.approx(v["random", 1])
    assert v["good", 8] > v["noise", 8]
    est = t.set_index(["method", "n"])["estimator"]
    assert (
        est["good", 4] == "exact" and est["majority", 1] == "enumerated" and est["majority", 4] == "sampled"
    )
    pd.testing.assert_frame_equal(
        t, bon_tables.best_of_n_table(df.iloc[::-1], weighted=["good", "const"], **kw)
    )
    with pytest.raises(ValueError, match="n must be"):
        bon_tables.best_of_n_table(df, ["good"], [9])


def test_paired_comparisons_table():
    df = make_pool(p=60)
    t = bon_tables.paired_comparisons(
        df, [("good", "noise"), ("noise", "good"), ("good", "majority")], n=8, n_boot=300
    )
    assert t.shape[0] == 3
    assert t.loc[0, "diff"] > 0 and t.loc[0, "p_value"] < 0.05
    assert t.loc[1, "diff"] == pytest.approx(-t.loc[0, "diff"])
    # n = M = 8: best-of-8 picks each problem's top-scored candidate (scores are continuous: no ties)
    by_problem = df.sort_values("candidate_index").groupby("problem_id", sort=False)
    top_good = by_problem.apply(
        lambda g: g["correct"].to_numpy()[g["good"].to_numpy().argmax()], include_groups=False
    )
    top_noise = by_problem.apply(
        lambda g: g["correct"].to_numpy()[g["noise"].to_numpy().argmax()], include_groups=False
    )
    assert t.loc[0, "acc_a"] == pytest.approx(top_good.mean(), abs=1e-12)
    assert t.loc[0, "acc_b"] == pytest.approx(top_noise.mean(), abs=1e-12)
    assert t.loc[0, "diff"] == pytest.approx(top_good.mean() - top_noise.mean(), abs=1e-12)
    d = top_good.to_numpy() - top_noise.to_numpy()
    assert (t.loc[0, "n_a_better"], t.loc[0, "n_b_better"]) == ((d > 0).sum(), (d < 0).sum())
    assert set(t.columns) >= {"method_a", "method_b", "n", "diff", "ci_low", "ci_high", "p_value"}


# ------------------------------------------------------------------ intervals that respect problems


def _correlated(n_problems=40, per_problem=20, seed=3):
    """Solutions of one problem succeed or fail together (a problem is either easy or hard)."""
    rng = np.random.default_rng(seed)
    easy = rng.random(n_problems) < 0.5
    hits = np.repeat(easy.astype(float), per_problem)
    flip = rng.random(hits.size) < 0.05  # a little noise inside problems
    hits = np.where(flip, 1 - hits, hits)
    return hits, np.repeat([f"p{i}" for i in range(n_problems)], per_problem)


def test_cluster_interval_is_wider_than_wilson_on_correlated_solutions():
    hits, problems = _correlated()
    mean, low, high = stats.cluster_mean_ci(hits, problems, n_boot=2000, seed=0)
    _, w_low, w_high = stats.accuracy_ci(hits)
    assert mean == pytest.approx(hits.mean())
    # 800 solutions but only 40 independent problems: about sqrt(20) times wider
    assert (high - low) > 3 * (w_high - w_low)
    # with one solution per problem the two agree roughly (nothing to correct)
    one = hits[::20]
    c = stats.cluster_mean_ci(one, problems[::20], n_boot=4000, seed=0)
    w = stats.accuracy_ci(one)
    assert abs((c[2] - c[1]) - (w[2] - w[1])) < 0.06


def test_cluster_interval_matches_a_plain_resampling_loop():
    """The reference: draw problems with replacement, pool all their solutions, take the mean, percentiles."""
    hits, problems = _correlated(n_problems=12, per_problem=5)
    hits[3] = 0.5  # any value, not only 0/1
    mean, low, high = stats.cluster_mean_ci(hits, problems, n_boot=500, seed=7)
    names = np.unique(problems)  # the function indexes problems in sorted order
    members = {n: hits[problems == n] for n in names}
    rng = np.random.default_rng(7)
    draws = rng.integers(0, len(names), size=(500, len(names)))
    boot = [np.concatenate([members[names[j]] for j in row]).mean() for row in draws]
    ref_low, ref_high = np.quantile(boot, [0.025, 0.975])
    assert (low, high) == pytest.approx((ref_low, ref_high), abs=1e-12)
    assert mean == pytest.approx(hits.mean())


def test_weighted_cluster_mean_counts_each_unit_by_its_weight():
    mean, low, high = stats.cluster_mean_ci([1.0, 0.0], ["a", "b"], weights=[3, 1], n_boot=200)
    assert mean == 0.75 and (low, high) == (0.0, 1.0)


def test_holm_within_families():
    p = [0.01, 0.04, 0.03, 0.2, 0.01]
    fam = ["a", "a", "a", "a", "b"]
    assert stats.family_holm(p, fam).round(3).tolist() == [0.04, 0.09, 0.09, 0.2, 0.01]
    with pytest.raises(ValueError, match="p-values must lie in"):
        stats.holm([0.1, 1.2])


def test_calibration_bins_carry_a_problem_interval():
    pred = [0.05, 0.05, 0.95, 0.95, 0.95]
    target = [0.0, 0.0, 1.0, 1.0, 0.0]
    bins = stats.calibration_bins(pred, target, n_bins=2, problems=["a", "a", "b", "b", "c"], n_boot=300)
    assert bins["count"].tolist() == [2, 3]
    assert bins.loc[0, ["ci_low", "ci_high"]].tolist() == [0.0, 0.0]  # one problem, both 0
    assert bins.loc[1, "ci_low"] == 0.0 and bins.loc[1, "ci_high"] == 1.0
