"""The best-of-N tables of 04_best_of_n, computed from a scored candidate pool with the core evaluators.

:func:`best_of_n_table` (accuracy per method x N with bootstrap intervals), :func:`paired_comparisons` /
:func:`paired_table` (method a vs b on the same problems), :func:`method_accuracy` (per-problem values),
:func:`aggregation_table` and :func:`best_er_rule` (read a best-of-N table), :func:`rank_unanswered_last` and
:func:`pick_audit` (what each reward model picks); :func:`pool_arrays` turns the pool table into arrays. All
methods evaluated together share the vote subsets and the bootstrap resamples, so comparisons between them are
paired. What the estimators compute is explained in :mod:`erprm_core.evaluators`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from erprm_core import evaluators, labels, prm, stats
from erprm_core.running import artifacts

log = logging.getLogger(__name__)

POOL_COLUMNS = ("problem_id", "candidate_index", "correct", "answer")
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

PoolLike = evaluators.PoolArrays | pd.DataFrame | Sequence[Mapping[str, Any]]


def pool_arrays(
    records: pd.DataFrame | Sequence[Mapping[str, Any]], methods: Sequence[str] | None = None
) -> evaluators.PoolArrays:
    """Build :class:`~erprm_core.evaluators.PoolArrays` from a tidy pool (DataFrame or list of records).

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
    return evaluators.PoolArrays(
        problem_ids=list(sizes.index), correct=correct.reshape(p, m), answers=answers, scores=scores
    )


def _as_pool(pool: PoolLike, methods: Sequence[str]) -> evaluators.PoolArrays:
    if isinstance(pool, evaluators.PoolArrays):
        return pool
    return pool_arrays(pool, methods=list(methods))


def _baseline_needs_subsets(method: str) -> bool:
    return method == "majority" or labels.parse_method(method)[2]


class _Evaluator:
    """Per-problem values of every method on one pool, sharing ranks and vote subsets (paired)."""

    def __init__(self, pool: evaluators.PoolArrays, n_subsets: int, seed: int) -> None:
        self.pool, self.n_subsets, self.seed = pool, n_subsets, seed
        self._ranks: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._subsets: dict[int, np.ndarray] = {}

    def subsets(self, n: int) -> np.ndarray:
        if n not in self._subsets:
            p = self.pool
            self._subsets[n] = evaluators.draw_subsets(
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
        n = evaluators.check_n(n, p.n_candidates)
        if method == "random":
            return evaluators.random_pick_accuracy(p.correct, n)
        if method == "oracle":
            return evaluators.oracle_accuracy(p.correct, n)
        if _baseline_needs_subsets(method):
            if p.codes is None:
                raise ValueError(
                    f"method {method!r} needs the pool's 'answer' column; drop it from baselines/weighted"
                )
            if method == "majority":
                weights, rtol = np.ones(p.correct.shape), 0.0
            else:
                weights = self._scores(method.removeprefix(labels.WEIGHTED_PREFIX))
                rtol = evaluators.WEIGHTED_TIE_RTOL
            return evaluators.vote_on_subsets(p.codes, weights, p.correct, self.subsets(n), rtol)
        if method not in self._ranks:
            self._ranks[method] = evaluators.score_ranks(self._scores(method))
        lo, hi = self._ranks[method]
        return evaluators.bon_exact_from_ranks(lo, hi, p.correct, n)

    def _scores(self, method: str) -> np.ndarray:
        if method not in self.pool.scores:
            raise ValueError(f"unknown method {method!r}; pool has scores for {sorted(self.pool.scores)}")
        return self.pool.scores[method]


def _method_list(methods: Sequence[str], baselines: Sequence[str], weighted: Sequence[str]) -> list[str]:
    for b in baselines:
        if b not in labels.BASELINES:
            raise ValueError(f"unknown baseline {b!r}; choose from {labels.BASELINES}")
    bad = [w for w in weighted if w not in methods]
    if bad:
        raise ValueError(f"weighted vote requested for {bad}, which are not in methods {list(methods)}")
    clash = [m for m in methods if m in labels.BASELINES or m.startswith(labels.WEIGHTED_PREFIX)]
    if clash:
        raise ValueError(f"method names {clash} clash with baseline names; rename the score columns")
    out = list(methods) + [labels.WEIGHTED_PREFIX + w for w in weighted] + list(baselines)
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
    baselines: Sequence[str] = labels.BASELINES,
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
    ev = _Evaluator(arrays, n_subsets, stats.base_seed(seed))
    rows = []
    for n in ns:
        n = evaluators.check_n(n, arrays.n_candidates)
        for name in names:
            vals = ev.values(name, n)
            mean, low, high = stats.bootstrap_ci(vals, n_boot=n_boot, confidence=confidence, seed=seed)
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
        {x.removeprefix(labels.WEIGHTED_PREFIX) for pair in pairs for x in pair if x not in labels.BASELINES}
    )
    arrays = _as_pool(pool, score_names)
    ev = _Evaluator(arrays, n_subsets, stats.base_seed(seed))
    rows = []
    for a, b in pairs:
        res = stats.paired_bootstrap_diff(
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
    name = method.removeprefix(labels.WEIGHTED_PREFIX)
    arrays = _as_pool(pool, [] if name in labels.BASELINES else [name])
    return _Evaluator(arrays, n_subsets, stats.base_seed(seed)).values(method, n)


def _rule_rows(bon: pd.DataFrame, n: int, aggregation: str | None = None) -> pd.DataFrame:
    """Rows of ``bon`` at ``n`` whose method is a ``<rule>:<agg>`` score column, with ``rule``/``aggregation``."""
    at_n = bon[(bon["n"] == n) & bon["method"].astype(str).str.contains(":", regex=False)].copy()
    parsed = at_n["method"].astype(str).map(labels.parse_method)
    at_n["rule"] = parsed.map(lambda p: p[0])
    at_n["aggregation"] = parsed.map(lambda p: p[1] or "")
    at_n = at_n[~parsed.map(lambda p: p[2]).astype(bool)]
    if aggregation is not None:
        at_n = at_n[at_n["aggregation"] == aggregation]
    return at_n


def aggregation_table(bon: pd.DataFrame, n: int) -> pd.DataFrame:
    """Best-of-``n`` accuracy of every rule at every aggregation: rule, aggregation, value, ci_low, ci_high.

    Rules in :func:`erprm_core.labels.rule_sort_key` order, aggregations in ``prm.AGGREGATIONS`` order (for
    the per-aggregation comparison of 04_best_of_n).
    """
    rows = _rule_rows(bon, n)
    order = {a: i for i, a in enumerate(prm.AGGREGATIONS)}
    rows = rows.assign(
        _r=rows["rule"].map(labels.rule_sort_key),
        _a=rows["aggregation"].map(lambda a: order.get(a, len(order))),
    )
    cols = ["rule", "aggregation", "n", "value", "ci_low", "ci_high"]
    return rows.sort_values(["_r", "_a"], kind="stable")[cols].reset_index(drop=True)


def best_er_rule(bon: pd.DataFrame, n: int, aggregation: str = "min") -> dict[str, Any]:
    """The ER rule (finite eta > 0) with the highest best-of-``n`` accuracy at ``aggregation``.

    CHOSEN POST HOC on the evaluation pool itself: report it as exploratory, never as the headline (the
    headline ER rule is fixed in advance by the ``er_rule`` parameter). Ties go to the smaller eta.
    """
    rows = _rule_rows(bon, n, aggregation)
    etas = [labels.rule_eta(rule, default=float("nan")) for rule in rows["rule"]]
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
    family: str = "{a} vs {b} at N={n}",
) -> pd.DataFrame:
    """:func:`paired_comparisons` of ``er_method`` against each of ``against`` at every n in ``ns``.

    Adds a ``selection`` column saying how ``er_method`` was chosen ("prespecified" or "post hoc ...") and a
    ``family`` column: the family of tests each row belongs to (``family`` formatted with ``a`` = er_method,
    ``b`` = the ``against`` list, ``n``); :func:`with_holm` adjusts the p-values within each family.
    """
    frames = [
        paired_comparisons(pool, [(er_method, b) for b in against], n, n_subsets, seed, n_boot).assign(
            family=family.format(a=er_method, b=", ".join(against), n=n)
        )
        for n in ns
    ]
    out = pd.concat(frames, ignore_index=True)
    out["selection"] = selection
    return out


def with_holm(paired: pd.DataFrame) -> pd.DataFrame:
    """``paired`` with ``p_holm``: Holm's adjustment of ``p_value`` within each ``family`` of tests (the
    family-wise error rate of the comparisons a reader is shown together)."""
    return paired.assign(p_holm=stats.family_holm(paired["p_value"], paired["family"]))


def rank_unanswered_last(pool_table: pd.DataFrame, methods: Sequence[str]) -> pd.DataFrame:
    """A copy of the pool in which every candidate without a vote (``answer`` null: no final answer, or
    truncated) scores below every answered candidate in every column of ``methods``: its score minus the
    column's range plus 1, so the order within each group is unchanged (any scale: probabilities, log-
    likelihoods, step counts). Why: a PRM scores prefixes, so a solution that stopped early (no answer) keeps
    the optimistic value of its prefix; nobody would submit it. Votes are not affected (unanswered
    candidates never vote).
    """
    out = pool_table.copy()
    unanswered = out["answer"].isna().to_numpy()
    for m in methods:
        col = out[m].to_numpy(dtype=float)
        out[m] = col - (np.ptp(col) + 1.0) * unanswered
    return out


RANKING_COLUMNS = ["method", "value", "ci_low", "ci_high", "n_problems"]


def ranking_table(
    pool_table: pd.DataFrame, methods: Sequence[str], n_boot: int = 2000, seed: int = 0
) -> pd.DataFrame:
    """How well each method ranks the candidates of one problem: over the problems with a correct and a wrong
    candidate, the mean share of (correct, wrong) pairs whose correct one scores higher (ties one half;
    :func:`erprm_core.stats.within_problem_pairwise`), with a bootstrap interval over problems. 0.5 is a
    coin; duplicated candidates count as often as they occur (the pool a best-of-N pick is made from)."""
    rows = []
    for m in methods:
        shares = stats.within_problem_pairwise(pool_table["problem_id"], pool_table["correct"], pool_table[m])
        value = (
            stats.bootstrap_ci(shares.to_numpy(), n_boot=n_boot, seed=seed)
            if len(shares)
            else (math.nan,) * 3
        )
        rows.append((m, *value, len(shares)))
    return pd.DataFrame(rows, columns=RANKING_COLUMNS)


def pick_audit(
    pool_table: pd.DataFrame, records: Sequence[Mapping[str, Any]], methods: Sequence[str]
) -> pd.DataFrame:
    """What each reward model picks from the FULL pool (N = N_max): shares of its picks that are correct,
    have no final answer, or were truncated, and their mean number of steps (ties split evenly).

    ``records`` are the candidate records in the row order of ``pool_table`` (as
    ``erprm_core.stages.best_of_n.score_pool`` makes it). The first row, ``pool``, gives the same shares over
    all candidates (a uniform pick). A reward model that favours unfinished or one-step solutions shows up
    here before it shows up in the accuracy.
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


def distinct_solutions(
    pool_records: Sequence[Mapping[str, Any]],
) -> tuple[list[str], list[dict[str, Any]], str]:
    """Distinct solutions (question, steps) of a best-of-N pool in pool order, each scored once per rule: the
    key of every pool record, the distinct items (``key``, ``problem_id``, ``question``, ``steps``), and the
    digest of the items' text (part of each rule's score-cache fingerprint in 04_best_of_n)."""
    keys: list[str] = []
    items: list[dict[str, Any]] = []
    index: dict[tuple[str, str, tuple[str, ...]], str] = {}
    for rec in pool_records:
        k = (str(rec["problem_id"]), rec["question"], tuple(rec["steps"]))
        if k not in index:
            index[k] = f"{len(items):07d}"
            items.append({"key": index[k], "problem_id": str(rec["problem_id"]), "question": rec["question"],
                          "steps": list(rec["steps"])})  # fmt: skip
        keys.append(index[k])
    pool_digest = artifacts.digest([[it["question"], it["steps"]] for it in items], ensure_ascii=False)
    return keys, items, pool_digest


def step_score_example(
    records: Sequence[Mapping[str, Any]], step_scores: Mapping[str, Sequence[Sequence[float]]], ranked: np.ndarray,
) -> tuple[pd.DataFrame, str]:  # fmt: skip
    """One candidate's step scores under every rule, beside its ground truth: the wrong candidate (with an
    answer) that ``ranked`` (the headline reward model's evaluated scores, pool order) puts highest in the pool,
    ties to the first. Rows: each step (its full text, ``truth`` from :mod:`erprm_core.tasks.arith_truth` for
    the task arith: "right", "first error" or "after the error"; one score column per rule), then a row
    ``min at step`` naming where each rule's minimum falls, the step a ``min`` aggregation judges by.
    Returns the table and a sentence saying which candidate it is and why."""
    from erprm_core.tasks import arith_truth

    wrong = [
        i for i, r in enumerate(records) if not r["correct"] and r.get("answer") is not None and r["steps"]
    ]
    if not wrong:
        return pd.DataFrame(), "no wrong candidate with an answer in the pool"
    i = max(wrong, key=lambda j: (ranked[j], -j))
    rec = records[i]
    first = arith_truth.first_error(rec["question"], rec["steps"])[0] if rec.get("task") == "arith" else None
    truth = ["" if first is None else "right" if (first < 0 or k < first) else "first error" if k == first
             else "after the error" for k in range(len(rec["steps"]))]  # fmt: skip
    table = pd.DataFrame({"step": range(1, len(rec["steps"]) + 1), "text": rec["steps"], "truth": truth})
    mins = {
        "step": "min at step",
        "text": "",
        "truth": "" if first is None else f"first error: {first + 1 if first >= 0 else 'none'}",
    }
    for rule, per_candidate in step_scores.items():
        s = np.array([np.nan if v is None else v for v in per_candidate[i]], dtype=float)
        table[rule] = s
        mins[rule] = int(np.nanargmin(s)) + 1 if np.isfinite(s).any() else None
    table = pd.concat([table, pd.DataFrame([mins])], ignore_index=True)
    why = (f"problem {rec['problem_id']}, candidate {rec['candidate_index']}: the wrong candidate the headline "
           f"reward model ranks highest in the pool (its answer {rec.get('pred')!r}, the reference {rec.get('reference')!r})")  # fmt: skip
    return table, why
