"""Best-of-N evaluation of reward models on fixed candidate pools, with uncertainty.

Used by notebook 04_best_of_n (BoN curves and paired comparisons), 03_train_prm (calibration and AUROC of
step scores against their labels), 05_rlhf_raft (greedy accuracy intervals) and 06_figures (tables only).
The statistics are pure numpy/scipy/pandas. The last section (candidate pools: :func:`build_candidate_pool`,
:func:`score_pool` and the stage function :func:`run_best_of_n_stage` of 04_best_of_n) imports torch and
the model modules lazily, inside its functions, so the statistics stay importable without torch.

Data model. A pool holds P problems with M candidate solutions each, as (P, M) arrays:
``correct`` (0/1), ``answers`` (normalised answer strings or None, for voting) and, per method, ``scores``
(the solution score, already aggregated over steps by :func:`erprm_core.prm.aggregate`). A tidy pool table
(columns ``problem_id, candidate_index, correct, answer`` + one score column per method) becomes arrays
with :func:`pool_arrays`.

What "best-of-N accuracy" means here. For a problem and a size ``n``, draw a subset of ``n`` of the M
candidates uniformly at random without replacement, pick one candidate with the rule, and score 1 if it is
correct. The reported per-problem value is the EXPECTATION of that score over all C(M, n) subsets (and over
uniform tie-breaking), so the pool is used fully and no candidate is privileged (not "the first n").

- Reward-model pick (highest score): computed EXACTLY in closed form over all C(M, n) subsets, ties
  included. Sort the candidates by score; a candidate whose score group has ``lo`` candidates strictly below
  it and ``hi`` at or below it heads the subset's maximum with probability (C(hi, n) - C(lo, n)) / C(M, n),
  and then the tied candidates in the subset are a uniform sample of its group, so a uniformly random
  tie-break is correct with probability (correct in group) / (group size). No Monte Carlo noise at all.
- Random pick: exactly the pool's mean correctness (for every n). Oracle pass@n: exactly the unbiased
  estimator 1 - C(M - c, n) / C(M, n) (:func:`pass_at_k`).
- Majority vote and PRM-weighted vote have no closed form; they are averaged over ``n_subsets`` random
  subsets per problem (:func:`draw_subsets`), the SAME subsets for every voting method at a given
  (n, seed), so comparisons between them are paired. When C(M, n) <= n_subsets all subsets are enumerated
  (exact). Ties between answers are split exactly (expected value of a uniform tie-break). Candidates with no
  answer (None) never receive votes; a subset whose answers are all None counts as wrong. The correctness
  of a winning answer is the mean correctness of the subset's candidates holding it (all equal when grading
  is consistent).

Subsets are drawn per problem from a generator seeded by (seed, n, stable hash of the problem id), so a
problem's value does not depend on which other problems are in the pool or on their order.

Uncertainty is over problems: :func:`bootstrap_ci` (scipy.stats.bootstrap) on the per-problem values, and
:func:`paired_bootstrap_diff` for two methods on the same pool (bootstrap CI of the mean paired difference and
a two-sided sign-flip permutation p-value). Plain accuracies (greedy decoding) use the Wilson interval
(:func:`accuracy_ci`). All values are fractions in [0, 1], not percentages.
"""

from __future__ import annotations

import itertools
import logging
import math
import warnings
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy import special, stats

log = logging.getLogger(__name__)

POOL_COLUMNS = ("problem_id", "candidate_index", "correct", "answer")
BASELINES = ("random", "majority", "oracle")
WEIGHTED_PREFIX = "weighted_"
TABLE_COLUMNS = [
    "method",
    "n",
    "metric",
    "value",
    "ci_low",
    "ci_high",
    "n_problems",
    "n_candidates",
    "estimator",
    "n_subsets",
    "seed",
]
_WEIGHTED_TIE_RTOL = 1e-9
_VOTE_BLOCK_CELLS = 1 << 20

SeedLike = int | np.random.Generator | None


# --------------------------------------------------------------------------------------------- pool arrays
@dataclass
class PoolArrays:
    """A candidate pool as arrays: P problems x M candidates (see the module docstring).

    ``codes`` are the answers encoded per problem as small integers (-1 for None), used by the votes.
    """

    problem_ids: list[str]
    correct: np.ndarray
    answers: np.ndarray | None = None
    scores: dict[str, np.ndarray] = field(default_factory=dict)
    codes: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.correct = _check_correct(self.correct)
        p, m = self.correct.shape
        if len(self.problem_ids) != p:
            raise ValueError(f"problem_ids has {len(self.problem_ids)} entries, correct has {p} rows")
        if self.answers is not None:
            self.answers = np.asarray(self.answers, dtype=object)
            if self.answers.shape != (p, m):
                raise ValueError(f"answers has shape {self.answers.shape}, correct has {(p, m)}")
            if self.codes is None:
                self.codes = encode_answers(self.answers)
        self.scores = {name: _check_scores(s, (p, m), name) for name, s in self.scores.items()}

    @property
    def n_problems(self) -> int:
        """P, the number of problems."""
        return self.correct.shape[0]

    @property
    def n_candidates(self) -> int:
        """M, the number of candidates per problem."""
        return self.correct.shape[1]

    @property
    def problem_keys(self) -> np.ndarray:
        """Stable 32-bit keys of the problem ids (CRC32), used to seed per-problem subset draws."""
        return problem_keys(self.problem_ids)


def problem_keys(problem_ids: Iterable[Any]) -> np.ndarray:
    """Stable per-problem integer keys: CRC32 of ``str(problem_id)`` (independent of order and process)."""
    return np.array([zlib.crc32(str(pid).encode("utf-8")) for pid in problem_ids], dtype=np.int64)


def encode_answers(answers: np.ndarray) -> np.ndarray:
    """Encode a (P, M) array of answer strings as per-problem integer codes; None/NaN -> -1.

    Answers are compared as exact strings (they are expected to be normalised by erprm_core.grading).
    """
    answers = np.asarray(answers, dtype=object)
    if answers.ndim != 2:
        raise ValueError(f"answers must be 2-D (problems x candidates), got shape {answers.shape}")
    codes = np.full(answers.shape, -1, dtype=np.int64)
    for i, row in enumerate(answers):
        seen: dict[str, int] = {}
        for j, a in enumerate(row):
            if a is None or (isinstance(a, float) and math.isnan(a)):
                continue
            codes[i, j] = seen.setdefault(str(a), len(seen))
    return codes


def pool_arrays(
    records: pd.DataFrame | Sequence[Mapping[str, Any]], methods: Sequence[str] | None = None
) -> PoolArrays:
    """Build :class:`PoolArrays` from a tidy pool (DataFrame or list of records).

    Columns: ``problem_id``, ``candidate_index``, ``correct`` (0/1), optional ``answer`` (str or null), and
    one float score column per method in ``methods`` (default: every numeric column that is not one of the
    pool columns). Problems are sorted by id (as strings) and candidates by ``candidate_index``, so the result
    does not depend on row order. Every problem must have the same number of candidates; duplicate
    (problem_id, candidate_index) pairs, missing columns and NaN scores are errors naming the culprit.
    """
    df = records if isinstance(records, pd.DataFrame) else pd.DataFrame(list(records))
    missing = [c for c in ("problem_id", "candidate_index", "correct") if c not in df.columns]
    if missing:
        raise ValueError(f"pool is missing column(s) {missing}; has {list(df.columns)}")
    if methods is None:
        methods = [c for c in df.columns if c not in POOL_COLUMNS and pd.api.types.is_numeric_dtype(df[c])]
        log.info("pool_arrays: score columns inferred as %s", methods)
    absent = [m for m in methods if m not in df.columns]
    if absent:
        raise ValueError(f"pool has no score column(s) {absent}; has {list(df.columns)}")
    if df.empty:
        raise ValueError("pool is empty")
    dup = df.duplicated(["problem_id", "candidate_index"], keep=False)
    if dup.any():
        first = df.loc[dup, ["problem_id", "candidate_index"]].iloc[0].tolist()
        raise ValueError(
            f"pool has {int(dup.sum())} duplicated (problem_id, candidate_index) rows, e.g. {first}"
        )
    df = df.assign(_pid=df["problem_id"].astype(str)).sort_values(["_pid", "candidate_index"], kind="stable")
    sizes = df.groupby("_pid", sort=True).size()
    if sizes.nunique() != 1:
        m_mode = int(sizes.mode().iloc[0])
        odd = sizes[sizes != m_mode]
        raise ValueError(
            f"every problem needs the same number of candidates; most have {m_mode}, but "
            f"{len(odd)} differ, e.g. {odd.index[0]!r} has {int(odd.iloc[0])}"
        )
    p, m = len(sizes), int(sizes.iloc[0])
    correct = df["correct"].to_numpy()
    if pd.isna(df["correct"]).any():
        bad = df.loc[pd.isna(df["correct"]), "_pid"].iloc[0]
        raise ValueError(f"pool column 'correct' has missing values, e.g. problem {bad!r}")
    answers = None
    if "answer" in df.columns:
        answers = np.array([None if pd.isna(a) else str(a) for a in df["answer"]], dtype=object).reshape(p, m)
    scores = {}
    for name in methods:
        col = pd.to_numeric(df[name], errors="coerce").to_numpy(dtype=float)
        if not np.isfinite(col).all():
            bad = df.loc[~np.isfinite(col), "_pid"].iloc[0]
            raise ValueError(f"score column {name!r} has non-numeric/NaN/inf values, e.g. problem {bad!r}")
        scores[name] = col.reshape(p, m)
    return PoolArrays(
        problem_ids=list(sizes.index), correct=correct.reshape(p, m), answers=answers, scores=scores
    )


def _check_correct(correct: Any) -> np.ndarray:
    arr = np.asarray(correct)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(
            f"correct must be a non-empty 2-D array (problems x candidates), got shape {arr.shape}"
        )
    if arr.dtype == bool:
        return arr.astype(np.int8)
    arr = arr.astype(float)
    if not np.isin(arr, (0.0, 1.0)).all():
        raise ValueError("correct must hold only 0/1 (or bool) values")
    return arr.astype(np.int8)


def _check_scores(scores: Any, shape: tuple[int, int], name: str = "scores") -> np.ndarray:
    arr = np.asarray(scores, dtype=float)
    if arr.shape != shape:
        raise ValueError(f"{name} has shape {arr.shape}, expected {shape} (problems x candidates)")
    if not np.isfinite(arr).all():
        bad = np.argwhere(~np.isfinite(arr))[0].tolist()
        raise ValueError(f"{name} has NaN/inf values, e.g. at [problem, candidate] = {bad}")
    return arr


def _check_n(n: int, m: int) -> int:
    if isinstance(n, bool) or int(n) != n or not 1 <= int(n) <= m:
        raise ValueError(f"n must be an integer in [1, {m}] (candidates per problem), got {n!r}")
    return int(n)


# --------------------------------------------------------------------------------------------- subsets
def _base_seed(rng: SeedLike) -> int:
    if rng is None:
        return 0
    if isinstance(rng, np.random.Generator):
        return int(rng.integers(0, 2**63 - 1))
    if isinstance(rng, bool) or int(rng) != rng or rng < 0:
        raise ValueError(f"seed must be a non-negative integer or a numpy Generator, got {rng!r}")
    return int(rng)


def draw_subsets(
    n_problems: int,
    m: int,
    n: int,
    n_subsets: int,
    seed: SeedLike = 0,
    keys: Sequence[int] | np.ndarray | None = None,
) -> np.ndarray:
    """Candidate index subsets, shape (P, S, n): S subsets of size n per problem, without replacement.

    If C(m, n) <= n_subsets, all C(m, n) subsets are enumerated (the same for every problem, exact; n == m
    gives the single full pool). Otherwise S = n_subsets uniform random subsets per problem, from a generator
    seeded by (seed, n, keys[i]) (``keys`` default: the problem index; use :func:`problem_keys` for
    order-independent draws). Pass the result to several methods to make them paired.
    """
    n = _check_n(n, m)
    if n_subsets < 1:
        raise ValueError(f"n_subsets must be >= 1, got {n_subsets}")
    base = _base_seed(seed)
    keys_arr = np.arange(n_problems) if keys is None else np.asarray(keys, dtype=np.int64)
    if len(keys_arr) != n_problems:
        raise ValueError(f"keys has {len(keys_arr)} entries for {n_problems} problems")
    if math.comb(m, n) <= n_subsets:
        combos = np.array(list(itertools.combinations(range(m), n)), dtype=np.int64)
        return np.broadcast_to(combos, (n_problems, *combos.shape))
    out = np.empty((n_problems, n_subsets, n), dtype=np.int64)
    for i, key in enumerate(keys_arr):
        gen = np.random.default_rng([base, n, int(key)])
        out[i] = np.argsort(gen.random((n_subsets, m)), axis=1, kind="stable")[:, :n]
    return out


def _subsets_for(p: int, m: int, n: int, n_subsets: int | None, rng: SeedLike, subsets: Any) -> np.ndarray:
    if subsets is not None:
        sub = np.asarray(subsets)
        if sub.ndim != 3 or sub.shape[0] != p or sub.shape[2] != n:
            raise ValueError(f"subsets must have shape ({p}, S, {n}), got {sub.shape}")
        if sub.min() < 0 or sub.max() >= m:
            raise ValueError(f"subsets hold candidate indices outside [0, {m})")
        return sub
    if n_subsets is None:
        raise ValueError("n_subsets is required for sampled estimates (or pass subsets=)")
    return draw_subsets(p, m, n, n_subsets, rng)


def _gather(values: np.ndarray, subsets: np.ndarray) -> np.ndarray:
    """values (P, M), subsets (P, S, n) -> (P, S, n)."""
    return np.take_along_axis(values[:, None, :], subsets, axis=2)


# --------------------------------------------------------------------------------------------- best-of-N
def _log_comb(a: np.ndarray, k: int) -> np.ndarray:
    """log C(a, k) elementwise, -inf where a < k."""
    a = np.asarray(a, dtype=float)
    with np.errstate(invalid="ignore"):
        out = special.gammaln(a + 1) - special.gammaln(k + 1) - special.gammaln(np.maximum(a - k, 0) + 1)
    return np.where(a >= k, out, -np.inf)


def score_ranks(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row (lo, hi): number of candidates with a strictly lower score, and with a lower-or-equal score."""
    hi = stats.rankdata(scores, method="max", axis=1).astype(np.int64)
    lo = stats.rankdata(scores, method="min", axis=1).astype(np.int64) - 1
    return lo, hi


def _bon_exact_from_ranks(lo: np.ndarray, hi: np.ndarray, correct: np.ndarray, n: int) -> np.ndarray:
    m = correct.shape[1]
    log_total = float(_log_comb(np.array(m), n))
    p_hi = np.exp(_log_comb(hi, n) - log_total)
    p_lo = np.exp(_log_comb(lo, n) - log_total)
    return ((p_hi - p_lo) / (hi - lo) * correct).sum(axis=1)


def _bon_on_subsets(scores: np.ndarray, correct: np.ndarray, subsets: np.ndarray) -> np.ndarray:
    s = _gather(scores, subsets)
    c = _gather(correct, subsets)
    tied = s == s.max(axis=2, keepdims=True)
    return ((tied & (c == 1)).sum(axis=2) / tied.sum(axis=2)).mean(axis=1)


def best_of_n_accuracy(
    scores: Any,
    correct: Any,
    n: int,
    n_subsets: int | None = None,
    rng: SeedLike = None,
    *,
    subsets: Any = None,
) -> np.ndarray:
    """Per-problem expected accuracy (length P) of picking the highest-scoring of n random candidates.

    Ties are counted exactly: the value of a subset is the fraction of its tied-at-max candidates that are
    correct (the expectation of a uniform random tie-break).

    - Default (``n_subsets=None``, no ``subsets``): exact expectation over all C(M, n) subsets (closed form,
      see the module docstring). n = 1 gives the mean correctness, n = M the (tie-averaged) argmax.
    - ``n_subsets`` given: Monte Carlo over subsets from :func:`draw_subsets` (seed ``rng``).
    - ``subsets`` given (P, S, n): those subsets (e.g. shared with other methods).
    """
    correct = _check_correct(correct)
    scores = _check_scores(scores, correct.shape)
    n = _check_n(n, correct.shape[1])
    if subsets is None and n_subsets is None:
        lo, hi = score_ranks(scores)
        return _bon_exact_from_ranks(lo, hi, correct, n)
    sub = _subsets_for(*correct.shape, n, n_subsets, rng, subsets)
    return _bon_on_subsets(scores, correct, sub)


def random_pick_accuracy(correct: Any, n: int | None = None, *, subsets: Any = None) -> np.ndarray:
    """Per-problem expected accuracy of a uniformly random pick: the mean correctness (any n).

    With ``subsets`` (P, S, n): the mean correctness within those subsets.
    """
    correct = _check_correct(correct)
    if subsets is None:
        if n is not None:
            _check_n(n, correct.shape[1])
        return correct.mean(axis=1)
    sub = np.asarray(subsets)
    sub = _subsets_for(*correct.shape, sub.shape[-1], None, None, sub)
    return _gather(correct, sub).mean(axis=(1, 2))


def oracle_accuracy(correct: Any, n: int, *, subsets: Any = None) -> np.ndarray:
    """Per-problem oracle pass@n: probability that a random n-subset holds a correct candidate.

    Exact (:func:`pass_at_k` with the pool's counts) unless ``subsets`` is given.
    """
    correct = _check_correct(correct)
    n = _check_n(n, correct.shape[1])
    if subsets is None:
        return pass_at_k(correct.sum(axis=1), correct.shape[1], n)
    sub = _subsets_for(*correct.shape, n, None, None, subsets)
    return _gather(correct, sub).max(axis=2).mean(axis=1)


def _vote_on_subsets(
    codes: np.ndarray, weights: np.ndarray, correct: np.ndarray, subsets: np.ndarray, rtol: float
) -> np.ndarray:
    """Expected accuracy of the answer with the largest total weight, ties split exactly, None never wins.

    Works on blocks of problems so that the (problems, subsets, answers) tallies stay around 1M cells.
    """
    p, s, _ = subsets.shape
    k = max(int(codes.max()) + 1, 1)
    block = max(1, _VOTE_BLOCK_CELLS // (s * k))
    out = np.empty(p)
    for start in range(0, p, block):
        sl = slice(start, min(start + block, p))
        out[sl] = _vote_block(codes[sl], weights[sl], correct[sl], subsets[sl], k, rtol)
    return out


def _vote_block(
    codes: np.ndarray, weights: np.ndarray, correct: np.ndarray, subsets: np.ndarray, k: int, rtol: float
) -> np.ndarray:
    p, s, _ = subsets.shape
    c = _gather(codes, subsets)
    valid = c >= 0
    cell = ((np.arange(p)[:, None, None] * s + np.arange(s)[None, :, None]) * k + c)[valid]
    size = p * s * k
    votes = np.bincount(cell, weights=_gather(weights, subsets)[valid], minlength=size).reshape(p, s, k)
    count = np.bincount(cell, minlength=size).reshape(p, s, k)
    n_right = (
        np.bincount(cell, weights=_gather(correct, subsets)[valid], minlength=size)
        .reshape(p, s, k)
        .astype(float)
    )
    present = count > 0
    votes = np.where(present, votes, -np.inf)
    best = votes.max(axis=2, keepdims=True)
    tol = rtol * np.abs(np.where(np.isfinite(best), best, 0.0))
    winners = present & (votes >= best - tol)
    frac_right = np.divide(n_right, count, out=np.zeros_like(n_right), where=present)
    n_win = winners.sum(axis=2)
    value = np.divide((frac_right * winners).sum(axis=2), n_win, out=np.zeros((p, s)), where=n_win > 0)
    return value.mean(axis=1)


def _codes_of(answers: Any, shape: tuple[int, int]) -> np.ndarray:
    codes = encode_answers(answers)
    if codes.shape != shape:
        raise ValueError(f"answers has shape {codes.shape}, expected {shape} (problems x candidates)")
    return codes


def majority_vote_accuracy(
    answers: Any,
    correct: Any,
    n: int,
    n_subsets: int | None = 200,
    rng: SeedLike = 0,
    *,
    subsets: Any = None,
    codes: np.ndarray | None = None,
) -> np.ndarray:
    """Per-problem expected accuracy of majority voting (self-consistency) over random n-subsets.

    The most frequent non-None answer wins; ties are split exactly; a subset with only None answers is
    wrong. ``codes`` (from :func:`encode_answers`) may replace ``answers`` to skip re-encoding.
    """
    correct = _check_correct(correct)
    codes = _codes_of(answers, correct.shape) if codes is None else codes
    n = _check_n(n, correct.shape[1])
    sub = _subsets_for(*correct.shape, n, n_subsets, rng, subsets)
    return _vote_on_subsets(codes, np.ones(correct.shape), correct, sub, rtol=0.0)


def weighted_vote_accuracy(
    answers: Any,
    scores: Any,
    correct: Any,
    n: int,
    n_subsets: int | None = 200,
    rng: SeedLike = 0,
    *,
    subsets: Any = None,
    codes: np.ndarray | None = None,
) -> np.ndarray:
    """Per-problem expected accuracy of reward-weighted voting over random n-subsets.

    Each non-None answer gets the sum of its candidates' scores (used as given; PRM scores are
    probabilities); the largest sum wins; sums within a relative 1e-9 count as tied and are split exactly.
    """
    correct = _check_correct(correct)
    scores = _check_scores(scores, correct.shape)
    codes = _codes_of(answers, correct.shape) if codes is None else codes
    n = _check_n(n, correct.shape[1])
    sub = _subsets_for(*correct.shape, n, n_subsets, rng, subsets)
    return _vote_on_subsets(codes, scores, correct, sub, rtol=_WEIGHTED_TIE_RTOL)


# --------------------------------------------------------------------------------------------- pass@k
def pass_at_k(n_correct: Any, n_total: Any, k: Any) -> np.ndarray | float:
    """Unbiased pass@k of Chen et al. (2021): 1 - C(n - c, k) / C(n, k), elementwise (broadcasting).

    ``n_correct`` c correct among ``n_total`` n independent samples; requires 0 <= c <= n and 1 <= k <= n.
    Computed with log-gamma (no overflow). Scalars in -> float out.
    """
    c, n, kk = np.broadcast_arrays(*(np.asarray(x) for x in (n_correct, n_total, k)))
    for name, arr in (("n_correct", c), ("n_total", n), ("k", kk)):
        if arr.size and (np.any(np.asarray(arr, dtype=float) % 1 != 0)):
            raise ValueError(f"pass_at_k: {name} must be integers")
    c, n, kk = (np.asarray(x, dtype=np.int64) for x in (c, n, kk))
    if np.any(c < 0) or np.any(c > n):
        raise ValueError("pass_at_k: need 0 <= n_correct <= n_total")
    if np.any(kk < 1) or np.any(kk > n):
        raise ValueError("pass_at_k: need 1 <= k <= n_total")
    wrong = (n - c).astype(float)
    gl = special.gammaln
    with np.errstate(invalid="ignore"):
        log_ratio = gl(wrong + 1) - gl(np.maximum(wrong - kk, 0) + 1) - gl(n + 1.0) + gl(n - kk + 1.0)
    out = np.where(wrong >= kk, 1.0 - np.exp(log_ratio), 1.0)
    out = np.where(c == 0, 0.0, out)  # exact zero, not a rounding residue
    out = np.clip(out, 0.0, 1.0)
    return float(out) if out.ndim == 0 else out


# --------------------------------------------------------------------------------------------- intervals
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
    seed_int = _base_seed(seed)

    def run(how: str) -> tuple[float, float]:
        res = stats.bootstrap(
            (x,),
            np.mean,
            n_resamples=n_boot,
            confidence_level=confidence,
            method=how,
            vectorized=True,
            rng=np.random.default_rng(seed_int),
        )
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
) -> PairedDiff:
    """Paired comparison of two methods on identical pools, from their per-problem values.

    diff = mean(a - b); its CI is :func:`bootstrap_ci` of the per-problem differences. The two-sided p-value
    is a sign-flip permutation test of mean(a - b) = 0 (scipy.stats.permutation_test with one sample:
    the null is that each problem's difference is symmetric around 0; exact when 2^P <= n_permutations).
    All-zero differences give p = 1 and a (0, 0) interval.
    """
    a = np.asarray(a, dtype=float).ravel()
    b = np.asarray(b, dtype=float).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired_bootstrap_diff: a has {a.size} problems, b has {b.size}")
    d = a - b
    _, low, high = bootstrap_ci(d, n_boot=n_boot, confidence=confidence, seed=seed)
    if np.all(d == 0):
        p_value = 1.0
    else:
        res = stats.permutation_test(
            (d,),
            np.mean,
            permutation_type="samples",
            vectorized=True,
            n_resamples=n_permutations,
            alternative="two-sided",
            rng=np.random.default_rng(_base_seed(seed)),
        )
        p_value = float(res.pvalue)
    return PairedDiff(
        mean_a=float(a.mean()),
        mean_b=float(b.mean()),
        diff=float(d.mean()),
        ci_low=low,
        ci_high=high,
        p_value=p_value,
        n_problems=int(d.size),
        n_a_better=int((d > 0).sum()),
        n_b_better=int((d < 0).sum()),
    )


def accuracy_ci(correct_vector: Any, confidence: float = 0.95) -> tuple[float, float, float]:
    """(accuracy, low, high) of a 0/1 vector with the Wilson score interval (scipy.stats.binomtest)."""
    x = np.asarray(correct_vector, dtype=float).ravel()
    if x.size == 0:
        raise ValueError("accuracy_ci: no values")
    if not np.isin(x, (0.0, 1.0)).all():
        raise ValueError("accuracy_ci: values must be 0/1 (or bool)")
    k, n = int(x.sum()), int(x.size)
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    return k / n, float(ci.low), float(ci.high)


# --------------------------------------------------------------------------------------------- tables
PoolLike = PoolArrays | pd.DataFrame | Sequence[Mapping[str, Any]]


def _as_pool(pool: PoolLike, methods: Sequence[str]) -> PoolArrays:
    if isinstance(pool, PoolArrays):
        return pool
    return pool_arrays(pool, methods=list(methods))


def _baseline_needs_subsets(method: str) -> bool:
    return method == "majority" or method.startswith(WEIGHTED_PREFIX)


class _Evaluator:
    """Per-problem values of every method on one pool, sharing ranks and vote subsets (paired)."""

    def __init__(self, pool: PoolArrays, n_subsets: int, seed: int) -> None:
        self.pool, self.n_subsets, self.seed = pool, n_subsets, seed
        self._ranks: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._subsets: dict[int, np.ndarray] = {}

    def subsets(self, n: int) -> np.ndarray:
        if n not in self._subsets:
            p = self.pool
            self._subsets[n] = draw_subsets(
                p.n_problems, p.n_candidates, n, self.n_subsets, self.seed, p.problem_keys
            )
        return self._subsets[n]

    def estimator(self, method: str, n: int) -> tuple[str, int]:
        if not _baseline_needs_subsets(method):
            return "exact", 0
        s = self.subsets(n).shape[1]
        return ("enumerated" if math.comb(self.pool.n_candidates, n) <= self.n_subsets else "sampled"), s

    def values(self, method: str, n: int) -> np.ndarray:
        p = self.pool
        n = _check_n(n, p.n_candidates)
        if method == "random":
            return random_pick_accuracy(p.correct, n)
        if method == "oracle":
            return oracle_accuracy(p.correct, n)
        if _baseline_needs_subsets(method):
            if p.codes is None:
                raise ValueError(
                    f"method {method!r} needs the pool's 'answer' column; drop it from baselines/weighted"
                )
            if method == "majority":
                weights, rtol = np.ones(p.correct.shape), 0.0
            else:
                weights, rtol = self._scores(method[len(WEIGHTED_PREFIX) :]), _WEIGHTED_TIE_RTOL
            return _vote_on_subsets(p.codes, weights, p.correct, self.subsets(n), rtol)
        if method not in self._ranks:
            self._ranks[method] = score_ranks(self._scores(method))
        lo, hi = self._ranks[method]
        return _bon_exact_from_ranks(lo, hi, p.correct, n)

    def _scores(self, method: str) -> np.ndarray:
        if method not in self.pool.scores:
            raise ValueError(f"unknown method {method!r}; pool has scores for {sorted(self.pool.scores)}")
        return self.pool.scores[method]


def _method_list(methods: Sequence[str], baselines: Sequence[str], weighted: Sequence[str]) -> list[str]:
    for b in baselines:
        if b not in BASELINES:
            raise ValueError(f"unknown baseline {b!r}; choose from {BASELINES}")
    bad = [w for w in weighted if w not in methods]
    if bad:
        raise ValueError(f"weighted vote requested for {bad}, which are not in methods {list(methods)}")
    clash = [m for m in methods if m in BASELINES or m.startswith(WEIGHTED_PREFIX)]
    if clash:
        raise ValueError(f"method names {clash} clash with baseline names; rename the score columns")
    out = list(methods) + [WEIGHTED_PREFIX + w for w in weighted] + list(baselines)
    return out


def best_of_n_table(
    pool: PoolLike,
    methods: Sequence[str],
    ns: Sequence[int],
    n_subsets: int = 200,
    seed: int = 0,
    n_boot: int = 2000,
    *,
    weighted: Sequence[str] = (),
    baselines: Sequence[str] = BASELINES,
    confidence: float = 0.95,
) -> pd.DataFrame:
    """Tidy best-of-N table: one row per method x n, metric "accuracy" (a fraction), with bootstrap CI.

    Rows for every reward model in ``methods`` (highest-score pick, exact), ``weighted_<m>`` for m in
    ``weighted`` (reward-weighted vote), and ``baselines`` among "random", "majority", "oracle". Columns:
    ``TABLE_COLUMNS`` (``estimator`` is exact / enumerated / sampled, ``n_subsets`` the subsets per problem
    used by the votes, 0 when exact). Vote subsets are drawn once per n and shared by all voting methods; the
    bootstrap resamples the same problems for every row. Deterministic for a fixed seed.
    """
    arrays = _as_pool(pool, list(methods) + [w for w in weighted if w not in methods])
    names = _method_list(methods, baselines, weighted)
    ev = _Evaluator(arrays, n_subsets, _base_seed(seed))
    rows = []
    for n in ns:
        n = _check_n(n, arrays.n_candidates)
        for name in names:
            vals = ev.values(name, n)
            mean, low, high = bootstrap_ci(vals, n_boot=n_boot, confidence=confidence, seed=seed)
            estimator, n_sub = ev.estimator(name, n)
            rows.append(
                dict(
                    method=name,
                    n=n,
                    metric="accuracy",
                    value=mean,
                    ci_low=low,
                    ci_high=high,
                    n_problems=arrays.n_problems,
                    n_candidates=arrays.n_candidates,
                    estimator=estimator,
                    n_subsets=n_sub,
                    seed=seed,
                )
            )
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def paired_comparisons(
    pool: PoolLike,
    pairs: Sequence[tuple[str, str]],
    n: int,
    n_subsets: int = 200,
    seed: int = 0,
    n_boot: int = 2000,
    confidence: float = 0.95,
    n_permutations: int = 9999,
) -> pd.DataFrame:
    """Paired comparisons (a vs b) at one n on the same pool, e.g. [("er_1", "hard"), ("er_1", "soft")].

    Each name is a score column (best-of-n pick) or a baseline ("random", "majority", "oracle",
    "weighted_<m>"). One row per pair: method_a, method_b, n, acc_a, acc_b, diff (a - b), ci_low, ci_high,
    p_value (two-sided sign-flip permutation), n_problems, n_a_better, n_b_better, seed.
    """
    score_names = sorted(
        {
            (x[len(WEIGHTED_PREFIX) :] if x.startswith(WEIGHTED_PREFIX) else x)
            for pair in pairs
            for x in pair
            if x not in BASELINES
        }
    )
    arrays = _as_pool(pool, score_names)
    ev = _Evaluator(arrays, n_subsets, _base_seed(seed))
    rows = []
    for a, b in pairs:
        res = paired_bootstrap_diff(
            ev.values(a, n),
            ev.values(b, n),
            n_boot=n_boot,
            confidence=confidence,
            seed=seed,
            n_permutations=n_permutations,
        )
        rows.append(
            dict(
                method_a=a,
                method_b=b,
                n=n,
                acc_a=res.mean_a,
                acc_b=res.mean_b,
                diff=res.diff,
                ci_low=res.ci_low,
                ci_high=res.ci_high,
                p_value=res.p_value,
                n_problems=res.n_problems,
                n_a_better=res.n_a_better,
                n_b_better=res.n_b_better,
                seed=seed,
            )
        )
    return pd.DataFrame(rows)


def method_accuracy(
    pool: PoolLike,
    method: str,
    n: int,
    n_subsets: int = 200,
    seed: int = 0,
) -> np.ndarray:
    """Per-problem expected accuracy of one method or baseline at n, exactly as the tables compute it."""
    name = method[len(WEIGHTED_PREFIX) :] if method.startswith(WEIGHTED_PREFIX) else method
    arrays = _as_pool(pool, [] if name in BASELINES else [name])
    return _Evaluator(arrays, n_subsets, _base_seed(seed)).values(method, n)


# --------------------------------------------------------------------------------------------- calibration
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


def calibration_bins(pred: Any, target: Any, n_bins: int = 10) -> pd.DataFrame:
    """Reliability table: equal-width bins of ``pred`` on [0, 1] (last bin closed).

    Columns: bin, bin_low, bin_high, mean_pred, mean_target, count. All n_bins rows are returned; empty bins
    have count 0 and NaN means. Counts sum to the number of values.
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
    return pd.DataFrame(
        {
            "bin": np.arange(n_bins),
            "bin_low": edges[:-1],
            "bin_high": edges[1:],
            "mean_pred": mean_p,
            "mean_target": mean_t,
            "count": count.astype(np.int64),
        }
    )


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


# =============================================================================================================
# Candidate pools for the 04_best_of_n stage: sample, grade, score with every PRM, tabulate.
#
# Everything below needs torch/transformers only inside its functions (imported lazily), so the statistics
# above stay importable without them. Folder layout under ``out_dir`` (``artifacts.paths(profile).pool``):
#
#     candidates/params.json, candidates/shard-NNNNN.jsonl   sampled + graded candidates (resumable shards)
#     candidates.jsonl                                       all candidates, merged
#     scores/<rule>/params.json, scores/<rule>/shard-*.jsonl step scores of each distinct solution, per rule
#     pool.csv                                               the tidy pool (correct, answer, score columns)
# =============================================================================================================

POOL_STAGE = "04_best_of_n"
CANDIDATE_COLUMNS = (
    "problem_id",
    "candidate_index",
    "question",
    "task",
    "steps",
    "pred",
    "answer",
    "correct",
    "truncated",
    "n_tokens",
)
SCORE_AGGREGATIONS = ("min", "prod", "last", "mean")
UNSCORABLE_SCORE = 0.0  # solution score of a candidate with no scorable step (no steps, or every tag lost)


def score_column(rule: str, aggregation: str) -> str:
    """Name of a solution-score column: ``"<rule>:<aggregation>"`` (e.g. ``"er_1:min"``, ``"orm:last"``)."""
    return f"{rule}:{aggregation}"


def bon_sizes(n_max: int) -> list[int]:
    """N = 1, 2, 4, ... up to ``n_max`` (``n_max`` itself appended when it is not a power of two)."""
    if isinstance(n_max, bool) or int(n_max) != n_max or n_max < 1:
        raise ValueError(f"n_max must be a positive integer, got {n_max!r}")
    out = [2**i for i in range(int(math.log2(n_max)) + 1)]
    return out if out[-1] == n_max else [*out, int(n_max)]


def rule_sort_key(rule: str) -> tuple[int, float, str]:
    """Order of label rules in tables: soft, ER by increasing eta, hard, then ORM and anything else."""
    from erprm_core import labels

    try:
        return (0, labels.rule_eta(rule), rule)
    except ValueError:
        return (1 if rule == "orm" else 2, 0.0, rule)


def vote_answer(pred: str | None, correct: bool, reference: str, task: str) -> str | None:
    """The answer a candidate votes for: one string per equivalence class, consistent with grading.

    A correct candidate votes for the problem's normalised reference (so every answer that grading accepts,
    e.g. ``"1,000"``, ``"1000.0"`` or ``\\frac{1}{2}`` vs ``0.5`` in MATH, lands in one class); a wrong one
    votes for its extracted answer, which :func:`erprm_core.grading.extract_answer` already canonicalises for
    numbers (``"$1,000."`` -> ``"1000"``); MATH expressions also lose their whitespace. None stays None.
    """
    import re

    from erprm_core import grading

    if pred is None:
        return None
    if correct:
        try:
            return grading.normalize_reference(reference, task)
        except ValueError:
            return str(reference)
    return re.sub(r"\s+", "", pred) if task == "math" else pred


def _file_fingerprint(folder: Any) -> str:
    """Digest of a checkpoint folder: names, sizes and contents of its files (size + mtime above 64 MiB)."""
    import hashlib
    from pathlib import Path

    folder = Path(folder)
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        st = path.stat()
        h.update(f"{path.relative_to(folder)}|{st.st_size}|".encode())
        if st.st_size <= 64 << 20:
            h.update(hashlib.sha256(path.read_bytes()).digest())
        else:
            h.update(str(st.st_mtime_ns).encode())
    return h.hexdigest()[:16]


def model_source_fingerprint(source: Any) -> str:
    """A short digest naming a model: a local folder's files, a hub name, or an in-memory model's weights."""
    from pathlib import Path

    if isinstance(source, str | Path):
        path = Path(source).expanduser()
        return _file_fingerprint(path) if path.is_dir() else f"hub:{source}"
    from erprm_core import sampling

    model = source[0] if isinstance(source, tuple) else getattr(source, "model", source)
    return sampling.model_fingerprint(model)


def _digest(obj: Any) -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


@dataclass
class CandidatePool:
    """What :func:`build_candidate_pool` returns: candidate records, their audit and compute accounting."""

    records: list[dict[str, Any]]
    audit: Any  # artifacts.Audit
    stats: dict[str, Any] = field(default_factory=dict)


def _load_policy(policy: Any, device: str, dtype: str) -> tuple[Any, Any]:
    if isinstance(policy, tuple):
        return policy
    from erprm_core import models

    return models.load_causal_lm(policy, device=device, dtype=dtype)


def pool_audit(records: Sequence[Mapping[str, Any]], audit: Any = None) -> Any:
    """Count pool candidates by what is notable about them (all are kept; see :func:`build_candidate_pool`).

    Reasons: ``candidates``, ``correct``, ``no_answer`` (no parseable final answer: graded wrong, no vote),
    ``truncated`` (cut at the token limit: graded wrong, no vote), ``truncated_with_answer`` (of those, how
    many had a parseable answer that was discarded), ``empty_solution`` (no step), ``one_step``,
    ``duplicate_text`` (same steps as an earlier candidate of the problem; scored once).
    """
    from erprm_core import artifacts

    audit = audit if audit is not None else artifacts.Audit(POOL_STAGE)
    seen: set[tuple[str, tuple[str, ...]]] = set()
    for rec in records:
        where = f"{rec['problem_id']}#{rec['candidate_index']}"
        audit.count("candidates")
        if rec["correct"]:
            audit.count("correct")
        if rec.get("pred") is None:
            audit.count("no_answer", example=f"{where}: {' | '.join(rec['steps'])[-150:]}")
        if rec.get("truncated"):
            audit.count("truncated", example=where)
            if rec.get("pred") is not None:
                audit.count("truncated_with_answer", example=f"{where}: pred {rec['pred']!r}")
        if not rec["steps"]:
            audit.count("empty_solution", example=where)
        elif len(rec["steps"]) == 1:
            audit.count("one_step", example=f"{where}: {rec['steps'][0][:150]}")
        key = (str(rec["problem_id"]), tuple(rec["steps"]))
        if key in seen:
            audit.count("duplicate_text", example=where)
        seen.add(key)
    return audit


def build_candidate_pool(
    policy: Any,
    problems: Sequence[Mapping[str, Any]],
    n_max: int,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 128,
    seed: int = 0,
    batch_size: int = 64,
    shard_size: int = 16,
    out_dir: Any,
    prompt_template: str = "plain",
    backend: str = "hf",
    device: str = "auto",
    dtype: str = "auto",
) -> CandidatePool:
    """Sample ``n_max`` solutions per problem from the policy, grade them, write resumable shards.

    ``policy`` is a local checkpoint folder or hub name (loaded with
    :func:`erprm_core.models.load_causal_lm` only if a shard is left to compute), or a ready
    ``(model, tokenizer)`` pair. Problems are processed in shards of ``shard_size`` under
    ``out_dir/candidates`` (atomic files; a rerun reuses finished shards; a change of any parameter, of the
    problems or of the policy discards them). Sample ``j`` of problem ``p`` is seeded by
    ``row_seed(seed, "solution", p["id"], j)`` (:func:`erprm_core.sampling.sample_solutions`), so a resumed
    run equals an uninterrupted one. All candidates are merged into ``out_dir/candidates.jsonl``.

    Every candidate is kept. ``correct`` is the grade (:func:`erprm_core.grading.is_correct`), except that a
    truncated candidate (cut at ``max_new_tokens``) counts as wrong and casts no vote; ``answer`` is the
    vote key (:func:`vote_answer`); ``pred``/``outcome`` keep the raw extraction and grade.
    """
    from pathlib import Path

    from erprm_core import artifacts, sampling

    if not problems:
        raise ValueError("build_candidate_pool: no problems")
    ids = [str(p["id"]) for p in problems]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise ValueError(f"problem ids must be unique (seeds are per id); duplicated: {dup}")
    if n_max < 1 or shard_size < 1:
        raise ValueError(f"n_max and shard_size must be >= 1, got {n_max}, {shard_size}")
    out_dir = Path(out_dir)
    folder = out_dir / "candidates"
    fingerprint = {
        "n_max": int(n_max),
        "temperature": temperature,
        "top_p": top_p,
        "max_new_tokens": max_new_tokens,
        "seed": seed,
        "batch_size": batch_size,
        "shard_size": shard_size,
        "prompt_template": prompt_template,
        "backend": backend,
        "problems": _digest([dict(p) for p in problems]),
        "policy": model_source_fingerprint(policy),
    }
    artifacts.prepare_shard_folder(folder, fingerprint)
    state: dict[str, Any] = {}

    def compute(chunk: Sequence[Mapping[str, Any]], index: int) -> list[dict[str, Any]]:
        if "sampler" not in state:
            model, tokenizer = _load_policy(policy, device, dtype)
            state["sampler"] = sampling.make_sampler(model, tokenizer, backend, batch_size)
        sols = sampling.sample_solutions(
            state["sampler"], None, list(chunk), n_max, temperature, top_p, max_new_tokens, seed,
            batch_size, prompt_template, backend,
        )  # fmt: skip
        by_id = {str(p["id"]): p for p in chunk}
        out = []
        for sol in sols:
            prob = by_id[str(sol["problem_id"])]
            correct = bool(sol["outcome"]) and not sol["truncated"]
            voted = (
                None if sol["truncated"] else vote_answer(sol["pred"], correct, prob["answer"], prob["task"])
            )
            out.append(
                {
                    "problem_id": prob["id"],
                    "candidate_index": sol["sample_index"],
                    "question": prob["question"],
                    "reference": prob["answer"],
                    "task": prob["task"],
                    "text": sol["text"],
                    "steps": sol["steps"],
                    "pred": sol["pred"],
                    "outcome": sol["outcome"],
                    "answer": voted,
                    "correct": int(correct),
                    "truncated": bool(sol["truncated"]),
                    "n_tokens": sol["n_tokens"],
                    "finish": sol.get("finish"),
                }
            )
        return out

    records = artifacts.run_sharded(
        list(problems), shard_size, folder, compute, CANDIDATE_COLUMNS, "pool shards"
    )
    artifacts.atomic_write_jsonl(out_dir / "candidates.jsonl", records)
    computed = state["sampler"].stats if "sampler" in state else {}
    stats = {
        "problems": len(problems),
        "candidates": len(records),
        "generated_tokens": int(sum(r["n_tokens"] for r in records)),
        "computed_generated_tokens": int(computed.get("generated_tokens", 0)),
        "computed_prompt_tokens": int(computed.get("prompt_tokens", 0)),
        "candidate_accuracy": float(np.mean([r["correct"] for r in records])),
    }
    return CandidatePool(records, pool_audit(records), stats)


@dataclass
class ScoredPool:
    """What :func:`score_pool` returns: the tidy pool table, per-rule step scores and accounting."""

    table: pd.DataFrame
    step_scores: dict[str, list[list[float]]]
    audit: Any  # artifacts.Audit
    stats: dict[str, Any] = field(default_factory=dict)
    prm_info: dict[str, dict[str, Any]] = field(default_factory=dict)


def _aggregate_all(step_scores: Sequence[float | None], aggregations: Sequence[str]) -> list[float] | None:
    """All aggregations of one solution's step scores (NaN/None ignored); None when nothing is scorable."""
    from erprm_core import prm

    vals = [float("nan") if s is None else float(s) for s in step_scores]
    if not vals or all(math.isnan(v) for v in vals):
        return None
    return [prm.aggregate(vals, how) for how in aggregations]


def score_pool(
    pool_records: Sequence[Mapping[str, Any]],
    prm_paths: Mapping[str, Any],
    aggregations: Sequence[str] = SCORE_AGGREGATIONS,
    batch_size: int = 32,
    out_dir: Any = None,
    *,
    scoring: str = "two_token",
    shard_size: int = 2048,
    max_length: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
) -> ScoredPool:
    """Score every candidate with every reward model once, and aggregate into solution-score columns.

    ``prm_paths`` maps a rule name (``er_1``, ``hard``, ``soft``, ``orm``, ...) to a PRM checkpoint folder /
    hub name (loaded with :meth:`erprm_core.prm.ProcessRewardModel.from_pretrained` with ``scoring``), or
    to a ready :class:`~erprm_core.prm.ProcessRewardModel`. Each DISTINCT solution of a problem (same
    steps) is scored once, in one forward pass; its step scores are cached in shards under
    ``out_dir/scores/<rule>`` (a rerun skips finished shards and, when a rule is complete, never loads its
    model; a change of the pool, the checkpoint or the scoring mode discards the cache).

    The table has ``problem_id, candidate_index, correct, answer`` and one column
    ``score_column(rule, agg)`` per rule and aggregation (:func:`erprm_core.prm.aggregate`; steps whose
    tag was lost are ignored). A candidate with no scorable step (empty solution, or every tag lost) gets
    ``UNSCORABLE_SCORE`` = 0.0, the lowest probability, for every aggregation; counted in the audit as
    ``unscorable[<rule>]``, and lost steps as ``steps_unscored[<rule>]``.
    """
    import json
    from pathlib import Path

    from erprm_core import artifacts
    from erprm_core import prm as prm_mod

    if out_dir is None:
        raise ValueError("score_pool: out_dir is required (the step-score cache lives there)")
    bad = [a for a in aggregations if a not in prm_mod.AGGREGATIONS]
    if bad:
        raise ValueError(f"unknown aggregation(s) {bad}; choose from {prm_mod.AGGREGATIONS}")
    if not pool_records:
        raise ValueError("score_pool: the pool is empty")
    out_dir = Path(out_dir)
    # Distinct solutions (question, steps) in pool order: each is scored once per rule.
    keys: list[str] = []
    items: list[dict[str, Any]] = []
    index: dict[tuple[str, str, tuple[str, ...]], str] = {}
    for rec in pool_records:
        k = (str(rec["problem_id"]), rec["question"], tuple(rec["steps"]))
        if k not in index:
            index[k] = f"{len(items):07d}"
            items.append({"key": index[k], "question": rec["question"], "steps": list(rec["steps"])})
        keys.append(index[k])
    pool_digest = _digest([[it["question"], it["steps"]] for it in items])

    audit = artifacts.Audit(POOL_STAGE)
    table = pd.DataFrame(
        {
            "problem_id": [r["problem_id"] for r in pool_records],
            "candidate_index": [int(r["candidate_index"]) for r in pool_records],
            "correct": [int(r["correct"]) for r in pool_records],
            "answer": [r.get("answer") for r in pool_records],
        }
    )
    step_scores: dict[str, list[list[float]]] = {}
    infos: dict[str, dict[str, Any]] = {}
    totals = {"prm_forward_passes": 0, "prm_tokens_scored": 0, "rules_computed": 0}
    for rule in sorted(prm_paths, key=rule_sort_key):
        source = prm_paths[rule]
        is_model = isinstance(source, prm_mod.ProcessRewardModel)
        fingerprint = {
            "pool": pool_digest,
            "prm": model_source_fingerprint(source.model if is_model else source),
            "scoring": source.scoring if is_model else scoring,
            "max_length": source.max_length if is_model else max_length,
            "shard_size": shard_size,
        }
        folder = out_dir / "scores" / rule
        artifacts.prepare_shard_folder(folder, fingerprint)
        state: dict[str, Any] = {}

        def compute(chunk, shard_index, source=source, is_model=is_model, state=state):
            if "prm" not in state:
                if is_model:
                    state["prm"] = source
                else:
                    extra = {} if max_length is None else {"max_length": max_length}
                    state["prm"] = prm_mod.ProcessRewardModel.from_pretrained(
                        source, scoring=scoring, device=device, dtype=dtype, **extra
                    )
                state["start"] = (state["prm"].forward_passes, state["prm"].tokens_scored)
            scores = state["prm"].score_batch(
                [it["question"] for it in chunk], [it["steps"] for it in chunk], batch_size=batch_size
            )
            return [
                {"key": it["key"], "step_scores": [None if math.isnan(v) else v for v in s]}
                for it, s in zip(chunk, scores, strict=True)
            ]

        shards = artifacts.run_sharded(
            items, shard_size, folder, compute, ("key", "step_scores"), f"scoring {rule}"
        )
        by_key = {r["key"]: r["step_scores"] for r in shards}
        missing = [it["key"] for it in items if it["key"] not in by_key]
        if missing:
            raise artifacts.ArtifactError(f"{folder}: step scores missing for {len(missing)} solution(s)")
        if "prm" in state:
            p = state["prm"]
            totals["prm_forward_passes"] += p.forward_passes - state["start"][0]
            totals["prm_tokens_scored"] += p.tokens_scored - state["start"][1]
            totals["rules_computed"] += 1
            infos[rule] = {**p.info(), "prm": str(source) if not is_model else p.name}
            artifacts.atomic_write_json(folder / "info.json", infos[rule])
            if not is_model:
                del state["prm"]
        elif (folder / "info.json").is_file():
            infos[rule] = json.loads((folder / "info.json").read_text())
        else:
            infos[rule] = {"prm": str(source), "scoring": fingerprint["scoring"]}
        per_cand = [[float("nan") if v is None else float(v) for v in by_key[k]] for k in keys]
        step_scores[rule] = per_cand
        cols = np.empty((len(keys), len(aggregations)))
        for i, (rec, s) in enumerate(zip(pool_records, per_cand, strict=True)):
            n_lost = sum(math.isnan(v) for v in s)
            where = f"{rec['problem_id']}#{rec['candidate_index']}"
            if n_lost:
                audit.count(f"steps_unscored[{rule}]", n_lost, example=where)
            agg = _aggregate_all(s, aggregations)
            if agg is None:
                audit.count(f"unscorable[{rule}]", example=f"{where}: {len(s)} step(s), none scored")
                agg = [UNSCORABLE_SCORE] * len(aggregations)
            cols[i] = agg
        for j, how in enumerate(aggregations):
            table[score_column(rule, how)] = cols[:, j]
    stats = {"distinct_solutions": len(items), "scoring": scoring, **totals}
    return ScoredPool(table, step_scores, audit, stats, infos)


# --------------------------------------------------------------------------------------------- the stage
def resolve_policy(profile: str) -> Any:
    """The policy of a profile: the 00_policy checkpoint folder, else the manifest's ``policy_name``.

    Paper profiles may load a hub policy without saving a copy; 00_policy then records its name in the
    manifest entry ``stages["00_policy"]["policy_name"]``. Raises an ArtifactError naming 00_policy when
    neither exists.
    """
    from erprm_core import artifacts

    p = artifacts.paths(profile)
    if (p.policy / "config.json").is_file():
        return p.policy
    name = artifacts.load_manifest(profile).get("stages", {}).get("00_policy", {}).get("policy_name")
    if name:
        return str(name)
    return artifacts.require(p.policy / "config.json", "00_policy", profile, "policy checkpoint")


def trained_rules(profile: str) -> dict[str, Any]:
    """Rule name -> checkpoint folder of every PRM that 03_train_prm saved (``runs/<profile>/prms/<rule>``)."""
    from erprm_core import artifacts

    p = artifacts.paths(profile)
    root = p.run / "prms"
    found = {}
    if root.is_dir():
        for d in root.iterdir():
            if d.is_dir() and (p.prm(d.name) / "config.json").is_file():
                found[d.name] = p.prm(d.name)
    return {rule: found[rule] for rule in sorted(found, key=rule_sort_key)}


def _rule_rows(bon: pd.DataFrame, n: int, aggregation: str | None = None) -> pd.DataFrame:
    """Rows of ``bon`` at ``n`` whose method is a ``<rule>:<agg>`` score column, with ``rule``/``aggregation``."""
    at_n = bon[(bon["n"] == n) & bon["method"].astype(str).str.contains(":", regex=False)].copy()
    parts = at_n["method"].astype(str).str.partition(":")
    at_n["rule"], at_n["aggregation"] = parts[0], parts[2]
    at_n = at_n[~at_n["rule"].str.startswith(WEIGHTED_PREFIX)]
    if aggregation is not None:
        at_n = at_n[at_n["aggregation"] == aggregation]
    return at_n


def aggregation_table(bon: pd.DataFrame, n: int) -> pd.DataFrame:
    """Best-of-``n`` accuracy of every rule at every aggregation: rule, aggregation, value, ci_low, ci_high.

    Rules in :func:`rule_sort_key` order, aggregations in ``SCORE_AGGREGATIONS`` order (for the per-
    aggregation comparison of 04_best_of_n).
    """
    rows = _rule_rows(bon, n)
    order = {a: i for i, a in enumerate(SCORE_AGGREGATIONS)}
    rows = rows.assign(
        _r=rows["rule"].map(rule_sort_key), _a=rows["aggregation"].map(lambda a: order.get(a, len(order)))
    )
    cols = ["rule", "aggregation", "n", "value", "ci_low", "ci_high"]
    return rows.sort_values(["_r", "_a"], kind="stable")[cols].reset_index(drop=True)


def best_er_rule(bon: pd.DataFrame, n: int, aggregation: str = "min") -> dict[str, Any]:
    """The ER rule (finite eta > 0) with the highest best-of-``n`` accuracy at ``aggregation``.

    CHOSEN POST HOC on the evaluation pool itself: report it as exploratory, never as the headline (the
    headline ER rule is fixed in advance by the ``er_rule`` parameter). Ties go to the smaller eta.
    """
    from erprm_core import labels

    rows = _rule_rows(bon, n, aggregation)
    etas = []
    for rule in rows["rule"]:
        try:
            etas.append(labels.rule_eta(rule))
        except ValueError:
            etas.append(float("nan"))
    rows = rows.assign(eta=etas)
    er = rows[np.isfinite(rows["eta"]) & (rows["eta"] > 0)]
    if er.empty:
        raise ValueError(f"no ER rule at aggregation {aggregation!r} and n={n} in the table")
    best = er.sort_values(["value", "eta"], ascending=[False, True], kind="stable").iloc[0]
    return {
        "rule": best["rule"],
        "eta": float(best["eta"]),
        "method": best["method"],
        "n": int(n),
        "value": float(best["value"]),
        "ci_low": float(best["ci_low"]),
        "ci_high": float(best["ci_high"]),
        "selection": "post hoc (best ER eta on this pool at N_max)",
    }


def paired_table(
    pool: PoolLike,
    er_method: str,
    against: Sequence[str],
    ns: Sequence[int],
    n_subsets: int = 200,
    seed: int = 0,
    n_boot: int = 2000,
    selection: str = "prespecified",
) -> pd.DataFrame:
    """:func:`paired_comparisons` of ``er_method`` against each of ``against`` at every n in ``ns``.

    Adds a ``selection`` column saying how ``er_method`` was chosen ("prespecified" or "post hoc ...").
    """
    frames = [
        paired_comparisons(pool, [(er_method, b) for b in against], n, n_subsets, seed, n_boot) for n in ns
    ]
    out = pd.concat(frames, ignore_index=True)
    out["selection"] = selection
    return out


def rank_unanswered_last(pool_table: pd.DataFrame, methods: Sequence[str]) -> pd.DataFrame:
    """A copy of the pool in which every candidate without a vote (``answer`` null: no final answer, or
    truncated) scores 2 below its raw score in every column of ``methods``.

    Scores are probabilities in [0, 1], so every answered candidate then outranks every unanswered one,
    and the order within each group is unchanged. Why: a PRM scores prefixes, so a solution that stopped
    early (no answer) keeps the optimistic value of its prefix; nobody would submit it. Votes are not
    affected (unanswered candidates never vote).
    """
    out = pool_table.copy()
    unanswered = out["answer"].isna().to_numpy()
    for m in methods:
        out[m] = out[m].to_numpy(dtype=float) - 2.0 * unanswered
    return out


def pick_audit(
    pool_table: pd.DataFrame, records: Sequence[Mapping[str, Any]], methods: Sequence[str]
) -> pd.DataFrame:
    """What each reward model picks from the FULL pool (N = N_max): shares of its picks that are correct,
    have no final answer, or were truncated, and their mean number of steps (ties split evenly).

    ``records`` are the candidate records in the row order of ``pool_table`` (as :func:`score_pool` makes
    it). The first row, ``pool``, gives the same shares over all candidates (a uniform pick). A reward
    model that favours unfinished or one-step solutions shows up here before it shows up in the accuracy.
    """
    if len(records) != len(pool_table):
        raise ValueError(f"{len(records)} records for a pool of {len(pool_table)} rows")
    pid = pool_table["problem_id"].astype(str).to_numpy()
    feats = pd.DataFrame(
        {
            "correct": pool_table["correct"].to_numpy(dtype=float),
            "no_answer": [float(r.get("pred") is None or bool(r.get("truncated"))) for r in records],
            "truncated": [float(bool(r.get("truncated"))) for r in records],
            "steps": [float(len(r["steps"])) for r in records],
        }
    )
    names = {"correct": "picked_correct", "no_answer": "picked_no_vote", "truncated": "picked_truncated",
             "steps": "picked_steps"}  # fmt: skip
    rows = [{"method": "pool", **{names[c]: float(feats[c].mean()) for c in feats}}]
    for method in methods:
        score = pool_table[method].to_numpy(dtype=float)
        best = pd.Series(score).groupby(pid).transform("max").to_numpy()
        tied = (score == best).astype(float)
        weight = tied / pd.Series(tied).groupby(pid).transform("sum").to_numpy()
        per_problem = feats.mul(weight, axis=0).groupby(pid).sum()
        rows.append({"method": method, **{names[c]: float(per_problem[c].mean()) for c in feats}})
    out = pd.DataFrame(rows)
    out.insert(1, "n_problems", int(pd.Series(pid).nunique()))
    return out


@dataclass
class BestOfNResult:
    """Everything 04_best_of_n shows and writes (see :func:`run_best_of_n_stage`)."""

    pool: pd.DataFrame
    bon: pd.DataFrame
    paired: pd.DataFrame
    audit: pd.DataFrame
    picks: pd.DataFrame
    best_eta: dict[str, Any]
    headline: dict[str, str]
    stats: dict[str, Any] = field(default_factory=dict)


def _relative_to(path: str, root: Any) -> str:
    """``path`` relative to ``root`` when it lies inside it (manifests hold no machine-specific paths)."""
    from pathlib import Path

    try:
        return str(Path(path).resolve().relative_to(Path(root).resolve()))
    except (ValueError, OSError):
        return str(path)


def _split_list(value: str | Sequence[str] | None) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [str(v) for v in value]


def run_best_of_n_stage(
    profile: str,
    *,
    seed: int = 0,
    n_max: int = 64,
    n_test: int = 0,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 128,
    batch_size: int = 64,
    shard_size: int = 16,
    score_batch_size: int = 32,
    aggregation: str = "min",
    er_rule: str = "er_1",
    orm_aggregation: str = "last",
    rules: str | Sequence[str] | None = None,
    weighted_rules: str | Sequence[str] | None = None,
    n_subsets: int = 200,
    n_boot: int = 2000,
    scoring: str = "two_token",
    unanswered_last: bool = True,
    prompt_template: str = "plain",
    backend: str = "hf",
    device: str = "auto",
    dtype: str = "auto",
) -> BestOfNResult:
    """The 04_best_of_n stage: candidate pool, scores from every reward model, BoN table, paired tests.

    1. Pool: ``n_max`` candidates for each of the first ``n_test`` test problems (0 = all) from the profile's
       policy (:func:`resolve_policy`), by :func:`build_candidate_pool` under ``paths(profile).pool``.
    2. Scores: every PRM of :func:`trained_rules` (or the comma-separated subset ``rules``; the ``orm`` folder
       is the ORM) scores every distinct candidate once (:func:`score_pool`), all four aggregations.
    3. Table (:func:`best_of_n_table`) at N = :func:`bon_sizes` (n_max): every ``<rule>:<agg>`` column, the
       baselines random / majority / oracle, and PRM-weighted votes for ``weighted_rules`` (default: the
       ER rule, hard and soft) at the headline ``aggregation``.
    4. Paired comparisons at every N (:func:`paired_table`) of the headline ER method
       ``<er_rule>:<aggregation>`` against hard and soft at ``aggregation`` and the ORM at
       ``orm_aggregation``; plus, at N_max only, the same for the best ER eta CHOSEN POST HOC
       (:func:`best_er_rule`), labelled as such in the ``selection`` column.

    With ``unanswered_last`` (default), candidates without a final answer (or truncated) rank below every
    answered candidate for every reward model (:func:`rank_unanswered_last`); they stay in the pool for
    the random and oracle baselines. ``picks`` (:func:`pick_audit`) shows what each model picks at N_max
    with the raw and with the evaluated ranking.

    Same seed and inputs -> identical tables. Returns a :class:`BestOfNResult` (tables are not written
    here: the notebook writes them with artifacts.write_table).
    """
    import time

    from erprm_core import artifacts

    p = artifacts.paths(profile)
    if aggregation not in SCORE_AGGREGATIONS or orm_aggregation not in SCORE_AGGREGATIONS:
        raise ValueError(f"aggregation/orm_aggregation must be in {SCORE_AGGREGATIONS}")
    policy = resolve_policy(profile)
    artifacts.require(p.problem_file("test"), "00_policy", profile, "test problems")
    problems = artifacts.read_jsonl(p.problem_file("test"), ("id", "question", "answer", "task"))
    if n_test < 0:
        raise ValueError(f"n_test must be >= 0 (0 = all), got {n_test}")
    if n_test:
        if n_test > len(problems):
            log.warning(
                "n_test=%d but %s holds %d problems: using all", n_test, p.problem_file("test"), len(problems)
            )
        problems = problems[:n_test]
    available = trained_rules(profile)
    if not available:
        artifacts.require(p.run / "prms" / er_rule, "03_train_prm", profile, "trained PRMs")
    wanted = _split_list(rules) or list(available)
    missing = [r for r in wanted if r not in available]
    if missing:
        raise artifacts.ArtifactError(
            f"no trained PRM for rule(s) {missing} under {p.run / 'prms'} (found {list(available)}); "
            f"run `erprm reproduce --profile {profile} --from 03 --to 03`"
        )
    for needed in (er_rule, "hard", "soft"):
        if needed not in wanted:
            raise ValueError(f"rule {needed!r} is needed for the headline comparison; rules are {wanted}")

    t0 = time.perf_counter()
    cands = build_candidate_pool(
        policy, problems, n_max, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
        seed=seed, batch_size=batch_size, shard_size=shard_size, out_dir=p.pool,
        prompt_template=prompt_template, backend=backend, device=device, dtype=dtype,
    )  # fmt: skip
    t_pool = time.perf_counter() - t0
    scored = score_pool(
        cands.records, {r: available[r] for r in wanted}, SCORE_AGGREGATIONS, score_batch_size, p.pool,
        scoring=scoring, device=device, dtype=dtype,
    )  # fmt: skip
    t_score = time.perf_counter() - t0 - t_pool
    artifacts.atomic_write_text(p.pool / "pool.csv", scored.table.to_csv(index=False, lineterminator="\n"))
    for reason, count in scored.audit.counts.items():
        cands.audit.count(reason, count, scored.audit.examples.get(reason))

    methods = [score_column(r, a) for r in sorted(wanted, key=rule_sort_key) for a in SCORE_AGGREGATIONS]
    weighted = [
        score_column(r, aggregation) for r in (_split_list(weighted_rules) or [er_rule, "hard", "soft"])
    ]
    bad = [w for w in weighted if w not in methods]
    if bad:
        raise ValueError(f"weighted_rules: no scores for {bad}; rules are {wanted}")
    ns = bon_sizes(n_max)
    ranked = rank_unanswered_last(scored.table, methods) if unanswered_last else scored.table
    arrays = pool_arrays(ranked, methods)
    bon = best_of_n_table(arrays, methods, ns, n_subsets, seed, n_boot, weighted=weighted)

    er_method = score_column(er_rule, aggregation)
    against = [score_column("hard", aggregation), score_column("soft", aggregation)]
    if "orm" in wanted:
        against.append(score_column("orm", orm_aggregation))
    paired = paired_table(arrays, er_method, against, ns, n_subsets, seed, n_boot)
    best = best_er_rule(bon, n_max, aggregation)
    post_hoc = paired_table(
        arrays, best["method"], against, [n_max], n_subsets, seed, n_boot, selection=best["selection"]
    )
    paired = pd.concat([paired, post_hoc], ignore_index=True)
    paired.insert(3, "aggregation", aggregation)
    picks = [pick_audit(scored.table, cands.records, methods).assign(ranking="raw scores")]
    if unanswered_last:
        picks.append(pick_audit(ranked, cands.records, methods).assign(ranking="answered first"))
    t_eval = time.perf_counter() - t0 - t_pool - t_score
    headline = {
        "er": er_method,
        "hard": against[0],
        "soft": against[1],
        "orm": score_column("orm", orm_aggregation) if "orm" in wanted else "",
    }
    stats = {
        **cands.stats,
        **scored.stats,
        "rules": wanted,
        "aggregation": aggregation,
        "orm_aggregation": orm_aggregation,
        "er_rule": er_rule,
        "unanswered_last": unanswered_last,
        "best_er_rule_post_hoc": best["rule"],
        "prms": {
            rule: {**info, "prm": _relative_to(info.get("prm", ""), p.run)}
            for rule, info in scored.prm_info.items()
        },
        "wall_s_pool": round(t_pool, 2),
        "wall_s_scoring": round(t_score, 2),
        "wall_s_tables": round(t_eval, 2),
    }
    return BestOfNResult(
        pool=scored.table,
        bon=bon,
        paired=paired,
        audit=cands.audit.to_frame(),
        picks=pd.concat(picks, ignore_index=True),
        best_eta=best,
        headline=headline,
        stats=stats,
    )
