"""Best-of-N evaluators of reward models on fixed candidate pools (pure numpy/scipy); the intervals are in
:mod:`erprm_core.stats`.

Data model. A pool holds P problems with M candidate solutions each, as (P, M) arrays:
``correct`` (0/1), ``answers`` (normalised answer strings or None, for voting) and, per method, ``scores``
(the solution score, already aggregated over steps by :func:`erprm_core.prm.aggregate`), held by
:class:`PoolArrays` (04_best_of_n builds it from its pool table: ``erprm_core.stages.bon_tables.pool_arrays``).

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
"""

from __future__ import annotations

import itertools
import math
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import special, stats

from erprm_core.stats import SeedLike, base_seed

WEIGHTED_TIE_RTOL = 1e-9  # weighted-vote sums within this relative distance count as tied
VOTE_BLOCK_CELLS = 1 << 20  # problems are voted in blocks of about this many (problem, subset, answer) cells


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


def check_n(n: int, m: int) -> int:
    """``n`` as an int, checked to lie in [1, m] (m = candidates per problem)."""
    if isinstance(n, bool) or int(n) != n or not 1 <= int(n) <= m:
        raise ValueError(f"n must be an integer in [1, {m}] (candidates per problem), got {n!r}")
    return int(n)


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
    n = check_n(n, m)
    if n_subsets < 1:
        raise ValueError(f"n_subsets must be >= 1, got {n_subsets}")
    base = base_seed(seed)
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


def bon_exact_from_ranks(lo: np.ndarray, hi: np.ndarray, correct: np.ndarray, n: int) -> np.ndarray:
    """Exact per-problem best-of-n accuracy from :func:`score_ranks` (closed form, ties split; see the module
    docstring)."""
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
    n = check_n(n, correct.shape[1])
    if subsets is None and n_subsets is None:
        lo, hi = score_ranks(scores)
        return bon_exact_from_ranks(lo, hi, correct, n)
    sub = _subsets_for(*correct.shape, n, n_subsets, rng, subsets)
    return _bon_on_subsets(scores, correct, sub)


def random_pick_accuracy(correct: Any, n: int | None = None, *, subsets: Any = None) -> np.ndarray:
    """Per-problem expected accuracy of a uniformly random pick: the mean correctness (any n).

    With ``subsets`` (P, S, n): the mean correctness within those subsets.
    """
    correct = _check_correct(correct)
    if subsets is None:
        if n is not None:
            check_n(n, correct.shape[1])
        return correct.mean(axis=1)
    sub = np.asarray(subsets)
    sub = _subsets_for(*correct.shape, sub.shape[-1], None, None, sub)
    return _gather(correct, sub).mean(axis=(1, 2))


def oracle_accuracy(correct: Any, n: int, *, subsets: Any = None) -> np.ndarray:
    """Per-problem oracle pass@n: probability that a random n-subset holds a correct candidate.

    Exact (:func:`pass_at_k` with the pool's counts) unless ``subsets`` is given.
    """
    correct = _check_correct(correct)
    n = check_n(n, correct.shape[1])
    if subsets is None:
        return pass_at_k(correct.sum(axis=1), correct.shape[1], n)
    sub = _subsets_for(*correct.shape, n, None, None, subsets)
    return _gather(correct, sub).max(axis=2).mean(axis=1)


def vote_on_subsets(
    codes: np.ndarray, weights: np.ndarray, correct: np.ndarray, subsets: np.ndarray, rtol: float
) -> np.ndarray:
    """Expected accuracy of the answer with the largest total weight, ties split exactly, None never wins.

    Works on blocks of problems so that the (problems, subsets, answers) tallies stay around 1M cells.
    """
    p, s, _ = subsets.shape
    k = max(int(codes.max()) + 1, 1)
    block = max(1, VOTE_BLOCK_CELLS // (s * k))
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
    n = check_n(n, correct.shape[1])
    sub = _subsets_for(*correct.shape, n, n_subsets, rng, subsets)
    return vote_on_subsets(codes, np.ones(correct.shape), correct, sub, rtol=0.0)


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
    n = check_n(n, correct.shape[1])
    sub = _subsets_for(*correct.shape, n, n_subsets, rng, subsets)
    return vote_on_subsets(codes, scores, correct, sub, rtol=WEIGHTED_TIE_RTOL)


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
