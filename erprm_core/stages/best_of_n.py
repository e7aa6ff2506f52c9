"""Stage 04_best_of_n: a candidate pool from the policy, scores from every PRM, best-of-N tables and paired tests.

The pool and its scores come from :mod:`erprm_core.stages.bon_pool` (every PRM, and the two verifiers that
need no training: the policy's likelihood and "fewer steps"); the tables from
:mod:`erprm_core.stages.bon_tables`. :func:`run` is the notebook's entry: it writes ``pool_audit``, ``bon``,
``bon_paired``, ``bon_picks``, ``bon_ranking`` and the manifest entry.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from erprm_core import io, labels
from erprm_core.prm import AGGREGATIONS
from erprm_core.report import figures
from erprm_core.running import artifacts, numerics
from erprm_core.running.config import parse_names
from erprm_core.running.workers import worker_count
from erprm_core.stages import bon_tables
from erprm_core.stages._common import (
    StageConfig,
    record,
    repo_relative,
    resolve_policy,
    take_problems,
    trained_rules,
)
from erprm_core.stages.bon_pool import (
    POOL_STAGE,
    SCORE_BASELINES,
    CandidatePool,
    ScoredPool,
    build_candidate_pool,
    score_baselines,
    score_pool,
)

log = logging.getLogger(__name__)

BASELINE_METHODS = ("majority", "random", "oracle", *SCORE_BASELINES)
GREEDY_TABLES = ("policy_eval", "policy_accuracy_by_steps")
"""00_policy's tables that give the greedy-decoding line of the best-of-N figures (when they exist)."""
MANIFEST_STATS = ("problems", "candidates", "generated_tokens", "distinct_solutions", "prm_forward_passes",
                  "prm_tokens_scored", "rules", "unanswered_last", "best_er_rule_post_hoc", "prms")  # fmt: skip
"""The statistics of :func:`run` that go to the manifest (beside the config)."""


@dataclass(frozen=True)
class BestOfNConfig(StageConfig):
    """The knobs of 04_best_of_n (the notebook's parameters cell)."""

    profile: str = "smoke"
    """results/<profile> and runs/<profile> folders to use"""
    seed: int = 0
    """base seed: candidate sampling, vote subsets and bootstrap"""
    n_max: int = 8
    """candidates per test problem (the paper: 64)"""
    n_test: int = 16
    """test problems in the pool (first n of the test split; 0 for all)"""
    temperature: float = 1.0
    """sampling temperature of the candidates (the paper: 1.0)"""
    top_p: float = 1.0
    """nucleus sampling of the candidates"""
    max_new_tokens: int = 128
    """token limit of a candidate (truncated candidates are kept, graded wrong)"""
    batch_size: int = 64
    """sequences per sampling batch"""
    shard_size: int = 16
    """test problems per resumable pool shard"""
    score_batch_size: int = 16
    """solutions per PRM forward batch"""
    aggregation: str = "min"
    """headline step-score aggregation: min (the paper), prod, last, mean"""
    er_rule: str = "er_1"
    """the ER-PRM of the headline comparison (fixed before looking at results)"""
    orm_aggregation: str = "last"
    """aggregation of the ORM (it is trained on the last step only)"""
    rules: str = ""
    """comma-separated PRM rules to evaluate (empty: every PRM that 03 trained)"""
    weighted_rules: str = ""
    """comma-separated rules for PRM-weighted votes (empty: er_rule, hard, soft)"""
    n_subsets: int = 200
    """random subsets per problem and N for the votes"""
    n_boot: int = 2000
    """bootstrap resamples for the 95% intervals"""
    scoring: str = "two_token"
    """step score: two_token (softmax over +/-) or full_vocab"""
    unanswered_last: bool = True
    """rank candidates without a final answer (or truncated) below answered ones"""
    prompt_template: str = "plain"
    """policy prompt format: plain (tiny policy) or metamath"""
    backend: str = "hf"
    """sampling backend: hf or vllm"""
    device: str = "auto"
    """auto, cpu or cuda"""
    dtype: str = "auto"
    """weights dtype of the policy and the PRMs: auto, float32, bfloat16"""
    torch_threads: int = 0
    """CPU threads for torch (0: auto, the cores idle at the start)"""
    cpu_numerics: str = "portable"
    """CPU kernel paths: portable (pinned: the same bits on any x86-64 CPU with AVX2) or default"""


# ----------------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------------


@dataclass
class BestOfNResult:
    """Everything 04_best_of_n shows and writes (see :func:`run`)."""

    pool: pd.DataFrame
    bon: pd.DataFrame
    paired: pd.DataFrame
    audit: pd.DataFrame
    picks: pd.DataFrame
    ranking: pd.DataFrame
    example: (
        pd.DataFrame
    )  # one wrong candidate's step scores under every rule (bon_tables.step_score_example)
    example_note: str
    best_eta: dict[str, Any]
    headline: dict[str, str]
    stats: dict[str, Any] = field(default_factory=dict)
    aggregations: pd.DataFrame | None = None
    sweep: pd.DataFrame | None = None
    greedy: dict[str, Any] | None = None  # the policy's greedy accuracy (00_policy), a line of figs. 2 and 3

    def headline_methods(self) -> list[str]:
        """The headline reward-model methods (ER, hard, soft, ORM) and the baselines, for tables and figures."""
        return [m for m in self.headline.values() if m] + list(BASELINE_METHODS)


def _inputs(c: BestOfNConfig, p: artifacts.ProfilePaths) -> tuple[Any, list[dict[str, Any]], dict, list[str]]:
    """Check the upstream artifacts and the knobs: (policy, test problems, trained PRMs, rules to evaluate)."""
    if c.aggregation not in AGGREGATIONS or c.orm_aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation/orm_aggregation must be in {AGGREGATIONS}")
    policy = resolve_policy(c.profile)
    problems = take_problems(
        p.problem_file("test"), c.n_test, "test problems", c.profile, "00_policy", strict=False
    )
    available = trained_rules(c.profile)
    artifacts.require(p.prm(c.er_rule), "03_train_prm", c.profile, f"PRM of rule {c.er_rule}")
    if not available:
        artifacts.require(p.run / "prms" / c.er_rule, "03_train_prm", c.profile, "trained PRMs")
    wanted = parse_names(c.rules) or list(available)
    missing = [r for r in wanted if r not in available]
    if missing:
        raise io.ArtifactError(
            f"no trained PRM for rule(s) {missing} under {p.run / 'prms'} (found {list(available)}); "
            f"run `erprm reproduce --profile {c.profile} --from 03 --to 03`"
        )
    for needed in (c.er_rule, "hard", "soft"):
        if needed not in wanted:
            raise ValueError(f"rule {needed!r} is needed for the headline comparison; rules are {wanted}")
    return policy, problems, available, wanted


def _pool_and_scores(
    c: BestOfNConfig, p: artifacts.ProfilePaths, policy: Any, problems: list[dict[str, Any]], prms: dict,
    t0: float, workers: int,
) -> tuple[CandidatePool, ScoredPool, float, float]:  # fmt: skip
    """The candidate pool and its scores (with the scoring audit merged into the pool's), and their wall times
    (``workers``: one-thread processes for the pool's shards; the PRMs score in this process)."""
    cands = build_candidate_pool(
        policy, problems, c.n_max, temperature=c.temperature, top_p=c.top_p, max_new_tokens=c.max_new_tokens,
        seed=c.seed, batch_size=c.batch_size, shard_size=c.shard_size, out_dir=p.pool,
        prompt_template=c.prompt_template, backend=c.backend, device=c.device, dtype=c.dtype, workers=workers,
    )  # fmt: skip
    t_pool = time.perf_counter() - t0
    scored = score_pool(
        cands.records, prms, AGGREGATIONS, c.score_batch_size, p.pool, scoring=c.scoring, device=c.device,
        dtype=c.dtype,
    )  # fmt: skip
    baselines, counts = score_baselines(
        cands.records, policy, p.pool, prompt_template=c.prompt_template, batch_size=c.score_batch_size,
        device=c.device, dtype=c.dtype,
    )  # fmt: skip
    scored.table = pd.concat([scored.table, baselines], axis=1)
    scored.stats.update(counts)
    if counts["likelihood_empty"]:
        cands.audit.count("likelihood_empty", counts["likelihood_empty"])
    t_score = time.perf_counter() - t0 - t_pool
    io.atomic_write_text(p.pool / "pool.csv", scored.table.to_csv(index=False, lineterminator="\n"))
    for reason, count in scored.audit.counts.items():
        cands.audit.count(reason, count, scored.audit.examples.get(reason))
    return cands, scored, t_pool, t_score


def bon_sizes(n_max: int) -> list[int]:
    """N = 1, 2, 4, ... up to ``n_max`` (``n_max`` itself appended when it is not a power of two)."""
    if isinstance(n_max, bool) or int(n_max) != n_max or n_max < 1:
        raise ValueError(f"n_max must be a positive integer, got {n_max!r}")
    out = [2**i for i in range(int(math.log2(n_max)) + 1)]
    return out if out[-1] == n_max else [*out, int(n_max)]


def _tables(c: BestOfNConfig, cands: CandidatePool, scored: ScoredPool, wanted: list[str]) -> dict[str, Any]:
    """Best-of-N table, paired comparisons in their families (Holm-adjusted), pick audit, within-problem
    ranking and the headline methods."""
    methods = [
        labels.method_name(r, a) for r in sorted(wanted, key=labels.rule_sort_key) for a in AGGREGATIONS
    ] + list(SCORE_BASELINES)
    weighted = [
        labels.method_name(r, c.aggregation)
        for r in (parse_names(c.weighted_rules) or [c.er_rule, "hard", "soft"])
    ]
    bad = [w for w in weighted if w not in methods]
    if bad:
        raise ValueError(f"weighted_rules: no scores for {bad}; rules are {wanted}")
    ns = bon_sizes(c.n_max)
    ranked = bon_tables.rank_unanswered_last(scored.table, methods) if c.unanswered_last else scored.table
    arrays = bon_tables.pool_arrays(ranked, methods)
    bon = bon_tables.best_of_n_table(arrays, methods, ns, c.n_subsets, c.seed, c.n_boot, weighted=weighted)
    headline = {
        "er": labels.method_name(c.er_rule, c.aggregation),
        "hard": labels.method_name("hard", c.aggregation),
        "soft": labels.method_name("soft", c.aggregation),
        "orm": labels.method_name("orm", c.orm_aggregation) if "orm" in wanted else "",
    }
    reward_models = [m for m in headline.values() if m]
    paired = _paired(c, arrays, bon, headline, ns)
    picks = [bon_tables.pick_audit(scored.table, cands.records, methods).assign(ranking="raw scores")]
    if c.unanswered_last:
        picks.append(bon_tables.pick_audit(ranked, cands.records, methods).assign(ranking="answered first"))
    ranking = bon_tables.ranking_table(ranked, [*reward_models, *SCORE_BASELINES], c.n_boot, c.seed)
    example = bon_tables.step_score_example(
        cands.records, {r: scored.step_scores[r] for r in sorted(wanted, key=labels.rule_sort_key)},
        ranked[headline["er"]].to_numpy(dtype=float),
    )  # fmt: skip
    return {"bon": bon, "paired": paired["table"], "picks": pd.concat(picks, ignore_index=True),
            "best": paired["best"], "headline": headline, "ranking": ranking, "example": example}  # fmt: skip


def _paired(
    c: BestOfNConfig, arrays: Any, bon: pd.DataFrame, headline: dict[str, str], ns: list[int]
) -> dict:
    """The paired comparisons of 04 in four families, each Holm-adjusted (``family``, ``p_holm``):

    1. prespecified, at N_max (the headline): the ER method of ``er_rule`` against hard, soft and the ORM;
    2. prespecified, the same at every smaller N (the curve; one family per N);
    3. prespecified, every headline reward model against the random pick and the policy's likelihood at N_max
       (do the trained verifiers beat the ones that need no training?);
    4. post hoc: the best ER eta on this pool (:func:`~erprm_core.stages.bon_tables.best_er_rule`) against
       hard, soft and the ORM at N_max, exploratory by construction.
    """
    er, others = headline["er"], [m for k, m in headline.items() if m and k != "er"]
    curve = bon_tables.paired_table(arrays, er, others, ns, c.n_subsets, c.seed, c.n_boot,
                                    family="{a} vs {b} at N={n}")  # fmt: skip
    curve.loc[curve["n"] == c.n_max, "family"] = f"headline: {er} vs {', '.join(others)} at N={c.n_max}"
    vs_free = pd.concat([
        bon_tables.paired_table(arrays, m, ["random", "likelihood"], [c.n_max], c.n_subsets, c.seed, c.n_boot,
                                family="reward models vs random pick and likelihood at N={n}")
        for m in [er, *others]
    ], ignore_index=True)  # fmt: skip
    best = bon_tables.best_er_rule(bon, c.n_max, c.aggregation)
    post_hoc = bon_tables.paired_table(
        arrays, best["method"], others, [c.n_max], c.n_subsets, c.seed, c.n_boot, selection=best["selection"],
        family="post hoc: best eta vs {b} at N={n}",
    )  # fmt: skip
    table = bon_tables.with_holm(pd.concat([curve, vs_free, post_hoc], ignore_index=True))
    table.insert(3, "aggregation", c.aggregation)
    return {"table": table, "best": best}


def _stats(
    c: BestOfNConfig, cands: CandidatePool, scored: ScoredPool, wanted: list[str], best: dict[str, Any],
    timings: tuple[float, float, float], p: artifacts.ProfilePaths,
) -> dict[str, Any]:  # fmt: skip
    """The stage's accounting: pool and scoring counts, the rules, the PRMs used, wall times."""
    t_pool, t_score, t_eval = timings
    return {
        **cands.stats,
        **scored.stats,
        "rules": wanted,
        "aggregation": c.aggregation,
        "orm_aggregation": c.orm_aggregation,
        "er_rule": c.er_rule,
        "unanswered_last": c.unanswered_last,
        "best_er_rule_post_hoc": best["rule"],
        "prms": {
            rule: {**info, "prm": repo_relative(info.get("prm", ""))}
            for rule, info in scored.prm_info.items()
        },
        "wall_s_pool": round(t_pool, 2),
        "wall_s_scoring": round(t_score, 2),
        "wall_s_tables": round(t_eval, 2),
    }


def run(config: BestOfNConfig) -> BestOfNResult:
    """Stage 04_best_of_n: candidate pool, scores from every reward model, BoN table, paired tests.

    1. Pool: ``n_max`` candidates for each of the first ``n_test`` test problems (0 = all) from the profile's
       policy, by :func:`build_candidate_pool` under ``paths(profile).pool``.
    2. Scores: every PRM that 03 trained (or the comma-separated subset ``rules``; the ``orm`` folder is the
       ORM) scores every distinct candidate once (:func:`score_pool`), all four aggregations; the policy's
       likelihood and "fewer steps" score it too (:func:`score_baselines`).
    3. Table (:func:`~erprm_core.stages.bon_tables.best_of_n_table`) at N = 1, 2, 4, ... ``n_max``: every
       ``<rule>:<agg>`` column, ``likelihood``, ``fewer_steps``, the baselines random / majority / oracle,
       and PRM-weighted votes for ``weighted_rules`` (default: the ER rule, hard and soft) at ``aggregation``.
    4. Paired comparisons in families, Holm-adjusted within each (:func:`_paired`): which ones were fixed in
       advance and which one was chosen post hoc is in ``selection``.
    5. Within-problem ranking of the headline reward models and the two training-free verifiers over the
       pool's problems with both outcomes (``bon_ranking``).

    With ``unanswered_last`` (default), candidates without a final answer (or truncated) rank below every
    answered candidate for every reward model and verifier; they stay in the pool for the random and oracle
    baselines. ``picks`` shows what each model picks at N_max with the raw and with the evaluated ranking.
    Writes the tables ``pool_audit``, ``bon``, ``bon_paired``, ``bon_picks``, ``bon_ranking``, ``bon_example`` and the
    manifest entry. Same seed and inputs -> identical tables.
    """
    c = config
    p = artifacts.paths(c.profile)
    policy, problems, available, wanted = _inputs(c, p)
    numerics_info = numerics.configure(c.cpu_numerics, c.torch_threads)  # first: before any tensor operation
    torch_threads = numerics_info["torch_threads"]
    workers = worker_count(torch_threads, pinned=c.cpu_numerics != "default", backend=c.backend)

    t0 = time.perf_counter()
    cands, scored, t_pool, t_score = _pool_and_scores(
        c, p, policy, problems, {r: available[r] for r in wanted}, t0, workers
    )
    tables = _tables(c, cands, scored, wanted)
    t_eval = time.perf_counter() - t0 - t_pool - t_score
    stats = _stats(c, cands, scored, wanted, tables["best"], (t_pool, t_score, t_eval), p)
    res = BestOfNResult(
        pool=scored.table,
        bon=tables["bon"],
        paired=tables["paired"],
        audit=cands.audit.to_frame(),
        picks=tables["picks"],
        ranking=tables["ranking"],
        example=tables["example"][0],
        example_note=tables["example"][1],
        best_eta=tables["best"],
        headline=tables["headline"],
        stats=stats,
    )
    artifacts.write_table(res.audit, c.profile, "pool_audit")
    artifacts.write_table(res.bon, c.profile, "bon")
    artifacts.write_table(res.paired, c.profile, "bon_paired")
    artifacts.write_table(res.picks, c.profile, "bon_picks")
    artifacts.write_table(res.ranking, c.profile, "bon_ranking")
    artifacts.write_table(res.example, c.profile, "bon_example")
    res.sweep = figures.eta_sweep_table(res.bon, c.n_max, c.aggregation)
    res.aggregations = bon_tables.aggregation_table(res.bon, c.n_max)
    policy = {t: artifacts.read_table(c.profile, t) for t in GREEDY_TABLES if p.table(t).is_file()}
    res.greedy = figures.greedy_reference(*(policy.get(t) for t in GREEDY_TABLES))
    record(
        c.profile, POOL_STAGE, c, torch_threads=torch_threads, workers=workers, numerics=numerics_info,
        **{k: res.stats[k] for k in MANIFEST_STATS},
    )  # fmt: skip
    return res
