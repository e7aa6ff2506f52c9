"""Uncertainty and calibration statistics (pure numpy/scipy/pandas), all on fractions in [0, 1].

Uncertainty is over problems: :func:`bootstrap_ci` (scipy.stats.bootstrap) on per-problem values, and
:func:`paired_bootstrap_diff` for two methods on the same problems (bootstrap CI of the mean paired difference
and a two-sided sign-flip permutation p-value), with :func:`holm` for a family of such tests. Values of units
that share a problem (solutions, steps, candidates) are not independent: :func:`cluster_mean_ci` resamples
whole problems (:func:`problem_resample_weights`), never the units. Accuracies with one value per problem
(greedy decoding) use the Wilson interval (:func:`accuracy_ci`). Step scores against their labels:
:func:`brier_score`, :func:`calibration_bins`, :func:`expected_calibration_error` and :func:`auroc`.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import special, stats

log = logging.getLogger(__name__)

SeedLike = int | np.random.Generator | None


def base_seed(rng: SeedLike) -> int:
    """An integer seed from ``rng``: None -> 0, a Generator -> one draw from it, else a non-negative int."""
    if rng is None:
        return 0
    if isinstance(rng, np.random.Generator):
        return int(rng.integers(0, 2**63 - 1))
    if isinstance(rng, bool) or int(rng) != rng or rng < 0:
        raise ValueError(f"seed must be a non-negative integer or a numpy Generator, got {rng!r}")
    return int(rng)


def bootstrap_ci(
    per_problem_values: Any,
    n_boot: int = 2000,
    confidence: float = 0.95,
    seed: SeedLike = 0,
    method: str = "BCa",
) -> tuple[float, float, float]:
    """(mean, low, high): bootstrap CI of the mean over problems (scipy.stats.bootstrap).

    ``method`` is "BCa" (default), "percentile" or "basic". Constant data (including a single value) returns
    the constant as both ends; if BCa yields NaN (near-degenerate data) the percentile interval is used and a
    warning logged. Empty or non-finite input is an error. The same seed and length resample the same
    problem indices, so intervals of different methods on one pool are paired.
    """
    x = np.asarray(per_problem_values, dtype=float).ravel()
    if x.size == 0:
        raise ValueError("bootstrap_ci: no values")
    if not np.isfinite(x).all():
        raise ValueError("bootstrap_ci: values contain NaN/inf")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    mean = float(x.mean())
    if np.ptp(x) == 0:
        return mean, mean, mean
    seed_int = base_seed(seed)

    def run(how: str) -> tuple[float, float]:
        res = stats.bootstrap((x,), np.mean, n_resamples=n_boot, confidence_level=confidence, method=how,
                              vectorized=True, rng=np.random.default_rng(seed_int))  # fmt: skip
        return float(res.confidence_interval.low), float(res.confidence_interval.high)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        low, high = run(method)
        if not (np.isfinite(low) and np.isfinite(high)) and method.lower() != "percentile":
            log.warning("bootstrap_ci: %s interval undefined for these data; using percentile", method)
            low, high = run("percentile")
    return mean, low, high


@dataclass(frozen=True)
class PairedDiff:
    """Result of :func:`paired_bootstrap_diff`: mean of a, of b, of a - b, its CI, p-value and win counts."""

    mean_a: float
    mean_b: float
    diff: float
    ci_low: float
    ci_high: float
    p_value: float
    n_problems: int
    n_a_better: int
    n_b_better: int


def paired_bootstrap_diff(
    a: Any,
    b: Any,
    n_boot: int = 2000,
    confidence: float = 0.95,
    seed: SeedLike = 0,
    n_permutations: int = 9999,
    atol: float = 1e-9,
) -> PairedDiff:
    """Paired comparison of two methods on identical pools, from their per-problem values.

    diff = mean(a - b); its CI is :func:`bootstrap_ci` of the per-problem differences. The two-sided p-value
    is a sign-flip permutation test of mean(a - b) = 0 (scipy.stats.permutation_test with one sample:
    the null is that each problem's difference is symmetric around 0; exact when 2^P <= n_permutations).
    A per-problem difference within ``atol`` of 0 is a tie (0, no win): equal expectations computed in floating
    point (every best-of-n pick at n = 1) differ by rounding. All-zero differences give p = 1, a (0, 0) interval.
    """
    a = np.asarray(a, dtype=float).ravel()
    b = np.asarray(b, dtype=float).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired_bootstrap_diff: a has {a.size} problems, b has {b.size}")
    d = np.where(np.abs(a - b) <= atol, 0.0, a - b)
    _, low, high = bootstrap_ci(d, n_boot=n_boot, confidence=confidence, seed=seed)
    if np.all(d == 0):
        p_value = 1.0
    else:
        res = stats.permutation_test((d,), np.mean, permutation_type="samples", vectorized=True,
                                     n_resamples=n_permutations, alternative="two-sided",
                                     rng=np.random.default_rng(base_seed(seed)))  # fmt: skip
        p_value = float(res.pvalue)
    return PairedDiff(mean_a=float(a.mean()), mean_b=float(b.mean()), diff=float(d.mean()), ci_low=low,
                      ci_high=high, p_value=p_value, n_problems=int(d.size), n_a_better=int((d > 0).sum()),
                      n_b_better=int((d < 0).sum()))  # fmt: skip


def holm(p_values: Any) -> np.ndarray:
    """Holm's step-down adjustment of a family of p-values (controls the family-wise error rate): the k-th
    smallest p is multiplied by (m - k + 1), made monotone, capped at 1; returned in the input order.

    >>> holm([0.01, 0.04, 0.03, 0.2]).round(3).tolist()
    [0.04, 0.09, 0.09, 0.2]
    """
    p = np.asarray(p_values, dtype=float).ravel()
    if p.size and (np.isnan(p).any() or p.min() < 0 or p.max() > 1):
        raise ValueError(f"holm: p-values must lie in [0, 1], got {p.tolist()}")
    order = np.argsort(p, kind="stable")
    stepped = np.maximum.accumulate(p[order] * (p.size - np.arange(p.size)))
    out = np.empty_like(p)
    out[order] = np.minimum(stepped, 1.0)
    return out


def family_holm(p_values: Any, families: Any) -> np.ndarray:
    """:func:`holm` within each family (``families[i]`` names the family of test i), in the input order."""
    p = np.asarray(p_values, dtype=float).ravel()
    fam = pd.Series(list(families), dtype=object)
    if fam.size != p.size:
        raise ValueError(f"{p.size} p-values for {fam.size} family names")
    out = np.empty_like(p)
    for _, idx in fam.groupby(fam, sort=False).indices.items():
        out[idx] = holm(p[idx])
    return out


def problem_resample_weights(problems: Any, n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(problem index of every unit, ``n_boot`` x problems weights): how often each problem is drawn in each
    bootstrap resample of the problems with replacement (seeded by ``seed``). A statistic that is a ratio of
    sums over units is then evaluated on every resample at once (``weights @ per-problem sums``)."""
    _, group = np.unique(np.asarray(problems, dtype=str).ravel(), return_inverse=True)
    n_groups = int(group.max()) + 1 if group.size else 0
    draws = np.random.default_rng(seed).integers(0, max(n_groups, 1), size=(n_boot, n_groups))
    draws += n_groups * np.arange(n_boot)[:, None]  # one bincount for all resamples
    weights = np.bincount(draws.ravel(), minlength=n_boot * n_groups).reshape(n_boot, n_groups)
    return group, weights.astype(float)


def percentile_interval(boot: Any, confidence: float = 0.95) -> tuple[float, float]:
    """The percentile interval of bootstrap values (NaN values left out; NaN, NaN when none is left)."""
    b = np.asarray(boot, dtype=float).ravel()
    b = b[np.isfinite(b)]
    if b.size == 0:
        return float("nan"), float("nan")
    low, high = np.quantile(b, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(low), float(high)


def cluster_mean_ci(
    values: Any, problems: Any, n_boot: int = 2000, seed: int = 0, confidence: float = 0.95,
    weights: Any = None,
) -> tuple[float, float, float]:  # fmt: skip
    """(mean, low, high) of unit values (0/1 hits or any number) whose units share problems: the (optionally
    ``weights``-weighted) mean over all units, with a percentile bootstrap interval that resamples whole
    problems (``problems[i]`` names the problem of unit ``i``; :func:`problem_resample_weights`).

    Solutions of one problem succeed or fail together, so a Wilson interval over solutions treats them as
    more independent evidence than they are; this interval widens with that correlation (a test shows it).
    All NaN when there are no values.
    """
    x = np.asarray(values, dtype=float).ravel()
    if x.size == 0:
        return float("nan"), float("nan"), float("nan")
    if not np.isfinite(x).all():
        raise ValueError("cluster_mean_ci: values contain NaN/inf")
    w = np.ones_like(x) if weights is None else np.asarray(weights, dtype=float).ravel()
    group, draws = problem_resample_weights(problems, n_boot, seed)
    if group.size != x.size or w.size != x.size:
        raise ValueError(f"{x.size} values, {group.size} problems and {w.size} weights: one each per unit")
    sums, totals = np.bincount(group, weights=w * x), np.bincount(group, weights=w)
    mean = float((w * x).sum() / w.sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        boot = (draws @ sums) / (draws @ totals)
    return mean, *percentile_interval(boot, confidence)


def within_problem_pairwise(problem_ids: Any, outcomes: Any, scores: Any) -> pd.Series:
    """Per problem with at least one correct and one wrong solution: the share of its (correct, wrong)
    solution pairs whose correct solution has the higher score, a tie counting one half. Indexed by problem
    id (first-seen order); problems with one outcome only are left out.

    >>> within_problem_pairwise(["a", "a", "a"], [1, 0, 0], [0.9, 0.5, 0.9]).tolist()
    [0.75]
    """
    frame = pd.DataFrame({"problem_id": problem_ids, "outcome": outcomes, "score": scores})
    shares = {}
    for pid, g in frame.groupby("problem_id", sort=False):
        right = g.loc[g["outcome"] == 1, "score"].to_numpy(dtype=float)
        wrong = g.loc[g["outcome"] == 0, "score"].to_numpy(dtype=float)
        if right.size and wrong.size:
            diff = right[:, None] - wrong[None, :]
            shares[pid] = float(((diff > 0) + 0.5 * (diff == 0)).mean())
    return pd.Series(shares, dtype=float, name="pairwise")


def accuracy_ci(correct_vector: Any, confidence: float = 0.95) -> tuple[float, float, float]:
    """(accuracy, low, high) of a 0/1 vector with the Wilson score interval (scipy.stats.binomtest): for
    independent values, e.g. one greedy solution per problem (units sharing a problem: :func:`cluster_mean_ci`)."""
    x = np.asarray(correct_vector, dtype=float).ravel()
    if x.size == 0:
        raise ValueError("accuracy_ci: no values")
    if not np.isin(x, (0.0, 1.0)).all():
        raise ValueError("accuracy_ci: values must be 0/1 (or bool)")
    k, n = int(x.sum()), int(x.size)
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    return k / n, float(ci.low), float(ci.high)


def _pred_target(pred: Any, target: Any) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(pred, dtype=float).ravel()
    t = np.asarray(target, dtype=float).ravel()
    if p.shape != t.shape:
        raise ValueError(f"pred has {p.size} values, target has {t.size}")
    if p.size == 0:
        raise ValueError("no values")
    if not (np.isfinite(p).all() and np.isfinite(t).all()):
        raise ValueError("pred/target contain NaN/inf (filter missing labels, e.g. ORM's None, first)")
    if p.min() < 0 or p.max() > 1 or t.min() < 0 or t.max() > 1:
        raise ValueError("pred and target must lie in [0, 1]")
    return p, t


def brier_score(pred: Any, target: Any) -> float:
    """Mean squared error between predicted probabilities and (soft or 0/1) targets in [0, 1]."""
    p, t = _pred_target(pred, target)
    return float(np.mean((p - t) ** 2))


def excess_cross_entropy(pred: Any, target: Any, eps: float = 1e-6) -> tuple[float, float]:
    """``(cross_entropy, floor)``: mean binary cross-entropy of ``pred`` (clipped to [eps, 1 - eps]) against
    (soft) targets, and its floor, :func:`binary_entropy` of the targets (0 for 0/1 targets).

    >>> ce, floor = excess_cross_entropy([0.5, 0.5], [0.5, 0.5])
    >>> round(ce - floor, 12)
    0.0
    """
    p, t = _pred_target(pred, target)
    p = np.clip(p, eps, 1 - eps)
    return float(-(t * np.log(p) + (1 - t) * np.log1p(-p)).mean()), binary_entropy(t)


def binary_entropy(target: Any) -> float:
    """Mean binary entropy (nats) of targets in [0, 1]: the lowest mean cross-entropy any prediction reaches."""
    t = np.asarray(target, dtype=float)
    return float((special.entr(t) + special.entr(1 - t)).mean()) if t.size else float("nan")


def calibration_bins(
    pred: Any, target: Any, n_bins: int = 10, problems: Any = None, n_boot: int = 2000, seed: int = 0
) -> pd.DataFrame:
    """Reliability table: equal-width bins of ``pred`` on [0, 1] (last bin closed).

    Columns: bin, bin_low, bin_high, mean_pred, mean_target, count. All n_bins rows are returned; empty bins
    have count 0 and NaN means. Counts sum to the number of values. With ``problems`` (the problem of each
    value), also ``ci_low``/``ci_high``: the 95% interval of ``mean_target`` in the bin, resampling whole
    problems (:func:`cluster_mean_ci`), so a bin of 3 steps shows how little it says.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    p, t = _pred_target(pred, target)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    sum_p = np.bincount(idx, weights=p, minlength=n_bins)
    sum_t = np.bincount(idx, weights=t, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.where(count > 0, sum_p / np.maximum(count, 1), np.nan)
        mean_t = np.where(count > 0, sum_t / np.maximum(count, 1), np.nan)
    table = pd.DataFrame({"bin": np.arange(n_bins), "bin_low": edges[:-1], "bin_high": edges[1:],
                          "mean_pred": mean_p, "mean_target": mean_t, "count": count.astype(np.int64)})  # fmt: skip
    if problems is not None:
        groups = np.asarray(problems, dtype=str).ravel()
        if groups.size != p.size:
            raise ValueError(f"problems has {groups.size} values, pred has {p.size}")
        cis = [cluster_mean_ci(t[idx == b], groups[idx == b], n_boot, seed)[1:] for b in range(n_bins)]
        table["ci_low"], table["ci_high"] = [c[0] for c in cis], [c[1] for c in cis]
    return table


def expected_calibration_error(pred: Any, target: Any, n_bins: int = 10) -> float:
    """ECE: count-weighted mean |mean_pred - mean_target| over the :func:`calibration_bins` bins."""
    bins = calibration_bins(pred, target, n_bins)
    full = bins[bins["count"] > 0]
    return float(
        (full["count"] * (full["mean_pred"] - full["mean_target"]).abs()).sum() / full["count"].sum()
    )


def auroc(scores: Any, labels: Any) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (Mann-Whitney U with average ranks).

    Ties count one half. Returns NaN (and logs a warning) when only one class is present; labels that are
    not 0/1 (e.g. soft labels: threshold them explicitly first) or NaN scores are a ValueError.
    """
    s = np.asarray(scores, dtype=float).ravel()
    y = np.asarray(labels, dtype=float).ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores has {s.size} values, labels has {y.size}")
    if not np.isfinite(s).all():
        raise ValueError("auroc: scores contain NaN/inf")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("auroc: labels must be 0/1 (threshold soft labels explicitly)")
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        log.warning("auroc undefined: only one class among %d labels", y.size)
        return float("nan")
    ranks = stats.rankdata(s)
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def problem_bootstrap_auroc(
    scores: Any, truth: Any, problems: Any, n_boot: int = 2000, seed: int = 0, confidence: float = 0.95
) -> tuple[float, float, float]:
    """(AUROC, low, high): :func:`auroc` of ``scores`` for the 0/1 ``truth``, with a
    percentile bootstrap interval over problems (``problems[i]`` names the problem of value ``i``).

    Steps of one problem are not independent, so whole problems are resampled (``n_boot`` resamples of
    the problems with replacement, seeded by ``seed``: the same seed draws the same resamples as
    :func:`problem_bootstrap_brier`); each resample's AUROC is computed from the counts of positives and
    negatives at every distinct score (ties count one half, as in ``stats.auroc``), so the cost does not
    grow with ``n_boot`` times the number of steps. Resamples with one class only are left out. All NaN
    when ``truth`` has one class only (or is empty).
    """
    s = np.asarray(scores, dtype=float).ravel()
    y = np.asarray(truth, dtype=float).ravel()
    if s.size == 0 or np.ptp(y) == 0:
        return float("nan"), float("nan"), float("nan")
    value = auroc(s, y)  # checks shapes, NaN and 0/1 labels
    group, weights = problem_resample_weights(problems, n_boot, seed)
    if group.size != s.size:
        raise ValueError(f"problems has {group.size} values, scores has {s.size}")
    _, level = np.unique(s, return_inverse=True)
    pos, neg = np.zeros((weights.shape[1], level.max() + 1)), np.zeros((weights.shape[1], level.max() + 1))
    np.add.at(pos, (group[y == 1], level[y == 1]), 1.0)
    np.add.at(neg, (group[y == 0], level[y == 0]), 1.0)
    p, q = weights @ pos, weights @ neg  # resamples x score levels
    below = np.cumsum(q, axis=1) - q  # negatives scored strictly lower, per level
    num, den = (p * (below + 0.5 * q)).sum(axis=1), p.sum(axis=1) * q.sum(axis=1)
    return value, *percentile_interval(num[den > 0] / den[den > 0], confidence)


def problem_bootstrap_brier(
    scores: Any, truth: Any, problems: Any, n_boot: int = 2000, seed: int = 0, confidence: float = 0.95
) -> tuple[float, float, float]:
    """(Brier score, low, high): :func:`brier_score` of ``scores`` against ``truth``, with a
    percentile bootstrap interval over problems (the resamples of :func:`problem_bootstrap_auroc`). All NaN
    when there are no values."""
    s = np.asarray(scores, dtype=float).ravel()
    y = np.asarray(truth, dtype=float).ravel()
    if s.size == 0:
        return float("nan"), float("nan"), float("nan")
    value = brier_score(s, y)  # checks shapes, NaN and the [0, 1] range
    group, weights = problem_resample_weights(problems, n_boot, seed)
    if group.size != s.size:
        raise ValueError(f"problems has {group.size} values, scores has {s.size}")
    sums, counts = np.bincount(group, weights=(s - y) ** 2), np.bincount(group).astype(float)
    return value, *percentile_interval((weights @ sums) / (weights @ counts), confidence)
