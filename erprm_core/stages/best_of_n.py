"""Stage 04_best_of_n: a candidate pool from the policy, scores from every PRM, best-of-N tables and paired tests.

:func:`build_candidate_pool` samples ``n_max`` candidates per test problem (resumable shards), grades them
and gives each its vote key; :func:`score_pool` scores every distinct candidate once with every PRM (step
scores cached per rule) and aggregates them into solution-score columns ``<rule>:<aggregation>``.
:func:`run` is the notebook's entry: pool, scores, the tables of :mod:`erprm_core.stages.bon_tables`
(``bon``, ``bon_paired``, ``bon_picks``, ``pool_audit``) and the manifest entry.

Files under ``runs/<profile>/pool``::

    candidates/params.json, candidates/shard-*.jsonl   sampled and graded candidates (resumable)
    candidates.jsonl                                   all candidates, merged
    scores/<rule>/params.json, scores/<rule>/shard-*.jsonl step scores of each distinct solution, per rule
    pool.csv                                           the tidy pool (correct, answer, score columns)
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from erprm_core import generation, grading, io, labels, models, rollouts
from erprm_core.prm import AGGREGATIONS, ProcessRewardModel, aggregate
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

log = logging.getLogger(__name__)

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
UNSCORABLE_SCORE = 0.0  # solution score of a candidate with no scorable step (no steps, or every tag lost)
BASELINE_METHODS = ("majority", "random", "oracle")
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
# The candidate pool
# ----------------------------------------------------------------------------------------------------


@dataclass
class CandidatePool:
    """What :func:`build_candidate_pool` returns: candidate records, their audit and compute accounting."""

    records: list[dict[str, Any]]
    audit: io.Audit
    stats: dict[str, Any] = field(default_factory=dict)


def _load_policy(policy: Any, device: str, dtype: str) -> tuple[Any, Any]:
    if isinstance(policy, tuple):
        return policy
    return models.load_causal_lm(policy, device=device, dtype=dtype)


def pool_audit(records: Sequence[Mapping[str, Any]], audit: io.Audit | None = None) -> io.Audit:
    """Count pool candidates by what is notable about them (all are kept; see :func:`build_candidate_pool`).

    Reasons: ``candidates``, ``correct``, ``no_answer`` (no parseable final answer: graded wrong, no vote),
    ``truncated`` (cut at the token limit: graded wrong, no vote), ``truncated_with_answer`` (of those, how
    many had a parseable answer that was discarded), ``empty_solution`` (no step), ``one_step``,
    ``duplicate_text`` (same steps as an earlier candidate of the problem; scored once).
    """
    audit = audit if audit is not None else io.Audit(POOL_STAGE)
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


def vote_answer(pred: str | None, correct: bool, reference: str, task: str) -> str | None:
    """The answer a candidate votes for: one string per equivalence class, consistent with grading.

    A correct candidate votes for the problem's normalised reference (so every answer that grading accepts,
    e.g. ``"1,000"``, ``"1000.0"`` or ``\\frac{1}{2}`` vs ``0.5`` in MATH, lands in one class); a wrong one
    votes for its extracted answer, which :func:`erprm_core.grading.extract_answer` already canonicalises for
    numbers (``"$1,000."`` -> ``"1000"``); MATH expressions also lose their whitespace. None stays None.
    """
    if pred is None:
        return None
    if correct:
        try:
            return grading.normalize_reference(reference, task)
        except ValueError:
            return str(reference)
    return re.sub(r"\s+", "", pred) if task == "math" else pred


def _candidate_record(prob: Mapping[str, Any], sol: Mapping[str, Any]) -> dict[str, Any]:
    """One pool record: a truncated candidate counts as wrong and casts no vote."""
    correct = bool(sol["outcome"]) and not sol["truncated"]
    voted = None if sol["truncated"] else vote_answer(sol["pred"], correct, prob["answer"], prob["task"])
    return {
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


class _PoolSampler:
    """The shard computation of :func:`build_candidate_pool`; the policy is loaded at the first shard only
    (vLLM: an engine started from the folder or hub name, no Hugging Face copy)."""

    def __init__(self, policy: Any, n_max: int, settings: dict[str, Any]):
        self.policy, self.n_max, self.st = policy, n_max, settings
        self.sampler: Any = None

    def __call__(self, chunk: Sequence[Mapping[str, Any]], index: int) -> list[dict[str, Any]]:
        st = self.st
        self.load()
        sols = rollouts.sample_solutions(
            self.sampler, list(chunk), self.n_max, st["temperature"], st["top_p"], st["max_new_tokens"],
            st["seed"], st["prompt_template"],
        )  # fmt: skip
        by_id = {str(p["id"]): p for p in chunk}
        return [_candidate_record(by_id[str(sol["problem_id"])], sol) for sol in sols]

    def load(self) -> Any:
        """The sampler, loaded at the first call."""
        st = self.st
        if self.sampler is None and st["backend"] == "vllm":
            if not isinstance(self.policy, str | Path):
                raise TypeError("backend='vllm' needs the policy as a folder or hub name, not a loaded model")
            self.sampler = generation.load_sampler(
                self.policy, "vllm", st["device"], st["dtype"], st["batch_size"]
            )
        elif self.sampler is None:
            model, tokenizer = _load_policy(self.policy, st["device"], st["dtype"])
            self.sampler = generation.make_sampler(model, tokenizer, st["backend"], st["batch_size"])
        return self.sampler


def _pool_stats(problems: Sequence[Any], records: Sequence[dict[str, Any]], sampler: Any) -> dict[str, Any]:
    computed = sampler.stats if sampler is not None else {}
    return {
        "problems": len(problems),
        "candidates": len(records),
        "generated_tokens": int(sum(r["n_tokens"] for r in records)),
        "computed_generated_tokens": int(computed.get("generated_tokens", 0)),
        "computed_prompt_tokens": int(computed.get("prompt_tokens", 0)),
        "candidate_accuracy": float(np.mean([r["correct"] for r in records])),
    }


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
    workers: int = 1,
) -> CandidatePool:
    """Sample ``n_max`` solutions per problem from the policy, grade them, write resumable shards.

    ``policy`` is a local checkpoint folder or hub name (loaded with
    :func:`erprm_core.models.load_causal_lm` only if a shard is left to compute), or a ready
    ``(model, tokenizer)`` pair. Problems are processed in shards of ``shard_size`` under
    ``out_dir/candidates`` (atomic files; a rerun reuses finished shards; a change of any parameter, of the
    problems or of the policy discards them). Sample ``j`` of problem ``p`` is seeded by
    ``row_seed(seed, "solution", p["id"], j)`` (:func:`erprm_core.rollouts.sample_solutions`), so a resumed
    run equals an uninterrupted one. All candidates are merged into ``out_dir/candidates.jsonl``. The sampler
    is released before returning (a vLLM engine is shut down), so scoring finds the GPU free.

    Every candidate is kept. ``correct`` is the grade (:func:`erprm_core.grading.is_correct`), except that a
    truncated candidate (cut at ``max_new_tokens``) counts as wrong and casts no vote; ``answer`` is the
    vote key (:func:`vote_answer`); ``pred``/``outcome`` keep the raw extraction and grade.

    ``workers > 1`` (the HF backend on the CPU) samples shards in that many forked one-thread processes
    (:func:`erprm_core.running.workers.fork_map`): the same candidates.
    """
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
        "problems": artifacts.digest([dict(p) for p in problems], ensure_ascii=False),
        "policy": artifacts.fingerprint(policy),
    }
    artifacts.prepare_shard_folder(folder, fingerprint)
    compute = _PoolSampler(
        policy, n_max, dict(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed,
                            batch_size=batch_size, prompt_template=prompt_template, backend=backend,
                            device=device, dtype=dtype),
    )  # fmt: skip
    if workers > 1 and backend == "hf":  # loaded once here, inherited by the workers
        tallies = [compute.load().stats]
    else:
        workers, tallies = 1, []
    records = artifacts.run_sharded(
        list(problems), shard_size, folder, compute, CANDIDATE_COLUMNS, "pool shards", workers=workers,
        tallies=tallies,
    )  # fmt: skip
    artifacts.atomic_write_jsonl(out_dir / "candidates.jsonl", records)
    stats = _pool_stats(problems, records, compute.sampler)
    if compute.sampler is not None:  # the engine leaves the GPU before any PRM is loaded for scoring
        sampler, compute.sampler = compute.sampler, None
        generation.release_sampler(sampler)
    return CandidatePool(records, pool_audit(records), stats)


# ----------------------------------------------------------------------------------------------------
# Scores of every PRM
# ----------------------------------------------------------------------------------------------------


@dataclass
class ScoredPool:
    """What :func:`score_pool` returns: the tidy pool table, per-rule step scores and accounting."""

    table: pd.DataFrame
    step_scores: dict[str, list[list[float]]]
    audit: io.Audit
    stats: dict[str, Any] = field(default_factory=dict)
    prm_info: dict[str, dict[str, Any]] = field(default_factory=dict)


def _aggregate_all(step_scores: Sequence[float | None], aggregations: Sequence[str]) -> list[float] | None:
    """All aggregations of one solution's step scores (NaN/None ignored); None when nothing is scorable."""
    vals = [float("nan") if s is None else float(s) for s in step_scores]
    if not vals or all(math.isnan(v) for v in vals):
        return None
    return [aggregate(vals, how) for how in aggregations]


class _RuleScorer:
    """The shard computation of one rule in :func:`score_pool`; the PRM is loaded at the first shard only."""

    def __init__(self, source: Any, is_model: bool, scoring: str, max_length: int | None, device: str,
                 dtype: str, batch_size: int):  # fmt: skip
        self.source, self.is_model, self.scoring, self.max_length = source, is_model, scoring, max_length
        self.device, self.dtype, self.batch_size = device, dtype, batch_size
        self.prm: Any = None
        self.start: tuple[int, int] = (0, 0)

    def __call__(self, chunk: Sequence[dict[str, Any]], shard_index: int) -> list[dict[str, Any]]:
        if self.prm is None:
            if self.is_model:
                self.prm = self.source
            else:
                extra = {} if self.max_length is None else {"max_length": self.max_length}
                self.prm = ProcessRewardModel.from_pretrained(
                    self.source, scoring=self.scoring, device=self.device, dtype=self.dtype, **extra
                )
            self.start = (self.prm.forward_passes, self.prm.tokens_scored)
        scores = self.prm.score_batch(
            [it["question"] for it in chunk], [it["steps"] for it in chunk], batch_size=self.batch_size
        )
        return [
            {"key": it["key"], "step_scores": [None if math.isnan(v) else v for v in s]}
            for it, s in zip(chunk, scores, strict=True)
        ]


def _score_rule(
    rule: str, source: Any, items: list[dict[str, Any]], folder: Path, pool_digest: str, *, scoring: str,
    max_length: int | None, device: str, dtype: str, batch_size: int, shard_size: int,
) -> tuple[dict[str, list[Any]], dict[str, Any], dict[str, int]]:  # fmt: skip
    """Step scores of every distinct solution by one rule (cached shards): (by key, PRM info, compute totals)."""
    is_model = isinstance(source, ProcessRewardModel)
    fingerprint = {
        "pool": pool_digest,
        "prm": artifacts.fingerprint(source.model if is_model else source),
        "scoring": source.scoring if is_model else scoring,
        "max_length": source.max_length if is_model else max_length,
        "shard_size": shard_size,
    }
    artifacts.prepare_shard_folder(folder, fingerprint)
    scorer = _RuleScorer(source, is_model, scoring, max_length, device, dtype, batch_size)
    shards = artifacts.run_sharded(
        items, shard_size, folder, scorer, ("key", "step_scores"), f"scoring {rule}"
    )
    by_key = {r["key"]: r["step_scores"] for r in shards}
    missing = [it["key"] for it in items if it["key"] not in by_key]
    if missing:
        raise io.ArtifactError(f"{folder}: step scores missing for {len(missing)} solution(s)")
    totals = {"prm_forward_passes": 0, "prm_tokens_scored": 0, "rules_computed": 0}
    if scorer.prm is not None:
        p = scorer.prm
        totals["prm_forward_passes"] += p.forward_passes - scorer.start[0]
        totals["prm_tokens_scored"] += p.tokens_scored - scorer.start[1]
        totals["rules_computed"] += 1
        info = {**p.info(), "prm": str(source) if not is_model else p.name}
        io.atomic_write_json(folder / "info.json", info)
        if not is_model:  # one PRM on the GPU at a time
            scorer.prm = p = None
            generation.free_accelerator_memory()
    elif (folder / "info.json").is_file():
        info = json.loads((folder / "info.json").read_text())
    else:
        info = {"prm": str(source), "scoring": fingerprint["scoring"]}
    return by_key, info, totals


def _aggregate_columns(
    pool_records: Sequence[Mapping[str, Any]], per_cand: list[list[float]], aggregations: Sequence[str],
    rule: str, audit: io.Audit,
) -> np.ndarray:  # fmt: skip
    """(candidates, aggregations) solution scores of one rule; unscorable candidates get UNSCORABLE_SCORE."""
    cols = np.empty((len(per_cand), len(aggregations)))
    for i, (rec, s) in enumerate(zip(pool_records, per_cand, strict=True)):
        n_lost = sum(math.isnan(v) for v in s)
        where = f"{rec['problem_id']}#{rec['candidate_index']}"
        if n_lost:
            audit.count(f"steps_unscored[{rule}]", n_lost, example=where)
        agg = _aggregate_all(s, aggregations)
        if agg is None:
            audit.count(f"unscorable[{rule}]", example=f"{where}: {len(s)} step(s), none scored")
            agg = [UNSCORABLE_SCORE] * len(aggregations)
        for j, how in enumerate(aggregations):
            if math.isnan(agg[j]):  # "last" of a solution whose final tag was lost: no score
                audit.count(f"unscorable[{rule}:{how}]", example=f"{where}: final step unscored")
                agg[j] = UNSCORABLE_SCORE
        cols[i] = agg
    return cols


def score_pool(
    pool_records: Sequence[Mapping[str, Any]],
    prm_paths: Mapping[str, Any],
    aggregations: Sequence[str] = AGGREGATIONS,
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
    ``labels.method_name(rule, agg)`` per rule and aggregation (:func:`erprm_core.prm.aggregate`; steps whose
    tag was lost are ignored). A candidate with no scorable step (empty solution, or every tag lost) gets
    ``UNSCORABLE_SCORE`` = 0.0, the lowest probability, for every aggregation; counted in the audit as
    ``unscorable[<rule>]``, and lost steps as ``steps_unscored[<rule>]``. ``last`` of a candidate whose final
    tag was lost is NaN: it gets ``UNSCORABLE_SCORE`` too, counted as ``unscorable[<rule>:last]``.
    """
    if out_dir is None:
        raise ValueError("score_pool: out_dir is required (the step-score cache lives there)")
    bad = [a for a in aggregations if a not in AGGREGATIONS]
    if bad:
        raise ValueError(f"unknown aggregation(s) {bad}; choose from {AGGREGATIONS}")
    if not pool_records:
        raise ValueError("score_pool: the pool is empty")
    out_dir = Path(out_dir)
    keys, items, pool_digest = bon_tables.distinct_solutions(pool_records)

    audit = io.Audit(POOL_STAGE)
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
    for rule in sorted(prm_paths, key=labels.rule_sort_key):
        by_key, infos[rule], rule_totals = _score_rule(
            rule, prm_paths[rule], items, out_dir / "scores" / rule, pool_digest, scoring=scoring,
            max_length=max_length, device=device, dtype=dtype, batch_size=batch_size, shard_size=shard_size,
        )  # fmt: skip
        for name, value in rule_totals.items():
            totals[name] += value
        per_cand = [[float("nan") if v is None else float(v) for v in by_key[k]] for k in keys]
        step_scores[rule] = per_cand
        cols = _aggregate_columns(pool_records, per_cand, aggregations, rule, audit)
        for j, how in enumerate(aggregations):
            table[labels.method_name(rule, how)] = cols[:, j]
    stats = {"distinct_solutions": len(items), "scoring": scoring, **totals}
    return ScoredPool(table, step_scores, audit, stats, infos)


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
    """Best-of-N table, paired comparisons (prespecified and post hoc), pick audit, headline methods."""
    methods = [
        labels.method_name(r, a) for r in sorted(wanted, key=labels.rule_sort_key) for a in AGGREGATIONS
    ]
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

    er_method = labels.method_name(c.er_rule, c.aggregation)
    against = [labels.method_name("hard", c.aggregation), labels.method_name("soft", c.aggregation)]
    if "orm" in wanted:
        against.append(labels.method_name("orm", c.orm_aggregation))
    paired = bon_tables.paired_table(arrays, er_method, against, ns, c.n_subsets, c.seed, c.n_boot)
    best = bon_tables.best_er_rule(bon, c.n_max, c.aggregation)
    post_hoc = bon_tables.paired_table(
        arrays, best["method"], against, [c.n_max], c.n_subsets, c.seed, c.n_boot, selection=best["selection"]
    )
    paired = pd.concat([paired, post_hoc], ignore_index=True)
    paired.insert(3, "aggregation", c.aggregation)
    picks = [bon_tables.pick_audit(scored.table, cands.records, methods).assign(ranking="raw scores")]
    if c.unanswered_last:
        picks.append(bon_tables.pick_audit(ranked, cands.records, methods).assign(ranking="answered first"))
    headline = {
        "er": er_method,
        "hard": against[0],
        "soft": against[1],
        "orm": labels.method_name("orm", c.orm_aggregation) if "orm" in wanted else "",
    }
    return {"bon": bon, "paired": paired, "picks": pd.concat(picks, ignore_index=True), "best": best,
            "headline": headline}  # fmt: skip


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
       ORM) scores every distinct candidate once (:func:`score_pool`), all four aggregations.
    3. Table (:func:`~erprm_core.stages.bon_tables.best_of_n_table`) at N = 1, 2, 4, ... ``n_max``: every
       ``<rule>:<agg>`` column, the baselines random / majority / oracle, and PRM-weighted votes for
       ``weighted_rules`` (default: the ER rule, hard and soft) at the headline ``aggregation``.
    4. Paired comparisons at every N of the headline ER method ``<er_rule>:<aggregation>`` against hard and
       soft at ``aggregation`` and the ORM at ``orm_aggregation``; plus, at N_max only, the same for the
       best ER eta CHOSEN POST HOC, labelled as such in the ``selection`` column.

    With ``unanswered_last`` (default), candidates without a final answer (or truncated) rank below every
    answered candidate for every reward model; they stay in the pool for the random and oracle baselines.
    ``picks`` shows what each model picks at N_max with the raw and with the evaluated ranking. Writes the
    tables ``pool_audit``, ``bon``, ``bon_paired``, ``bon_picks`` and the manifest entry. Same seed and
    inputs -> identical tables.
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
        best_eta=tables["best"],
        headline=tables["headline"],
        stats=stats,
    )
    artifacts.write_table(res.audit, c.profile, "pool_audit")
    artifacts.write_table(res.bon, c.profile, "bon")
    artifacts.write_table(res.paired, c.profile, "bon_paired")
    artifacts.write_table(res.picks, c.profile, "bon_picks")
    res.sweep = figures.eta_sweep_table(res.bon, c.n_max, c.aggregation)
    res.aggregations = bon_tables.aggregation_table(res.bon, c.n_max)
    policy = {t: artifacts.read_table(c.profile, t) for t in GREEDY_TABLES if p.table(t).is_file()}
    res.greedy = figures.greedy_reference(*(policy.get(t) for t in GREEDY_TABLES))
    record(
        c.profile, POOL_STAGE, c, torch_threads=torch_threads, workers=workers, numerics=numerics_info,
        **{k: res.stats[k] for k in MANIFEST_STATS},
    )  # fmt: skip
    return res
