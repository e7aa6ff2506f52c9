"""The candidate pool of 04_best_of_n and its scores: what the best-of-N tables are computed from.

:func:`build_candidate_pool` samples ``n_max`` candidates per test problem (resumable shards), grades them
and gives each its vote key; :func:`score_pool` scores every distinct candidate once with every PRM (step
scores cached per rule) and aggregates them into solution-score columns ``<rule>:<aggregation>``;
:func:`score_baselines` adds the two verifiers that need no training (:data:`SCORE_BASELINES`).

Files under ``runs/<profile>/pool``::

    candidates/params.json, candidates/shard-*.jsonl   sampled and graded candidates (resumable)
    candidates.jsonl                                   all candidates, merged
    scores/<rule>/params.json, scores/<rule>/shard-*.jsonl step scores of each distinct solution, per rule
    likelihood/params.json, likelihood/shard-*.jsonl   the policy's mean token log-probability of each solution
    pool.csv                                           the tidy pool (correct, answer, score columns)
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from erprm_core import generation, grading, io, labels, models, rollouts
from erprm_core.prm import AGGREGATIONS, ProcessRewardModel, aggregate
from erprm_core.running import artifacts
from erprm_core.stages import bon_tables
from erprm_core.steps import policy_prompt

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
# Verifiers without training: the policy's likelihood, and fewer steps
# ----------------------------------------------------------------------------------------------------

SCORE_BASELINES = ("likelihood", "fewer_steps")
"""Score columns of verifiers that need no training, ranked like a reward model: ``likelihood`` is the
policy's mean token log-probability of the candidate in the format it was sampled in
(:func:`erprm_core.models.mean_token_logprobs`); ``fewer_steps`` is minus the number of steps (every PRM's
picks are shorter than the pool's mean: this row says how far length alone goes)."""


class _LikelihoodScorer:
    """The shard computation of :func:`score_baselines`; the policy is loaded at the first shard only."""

    def __init__(self, policy: Any, template: str, batch_size: int, device: str, dtype: str):
        self.policy, self.template, self.batch_size, self.device, self.dtype = (
            policy, template, batch_size, device, dtype,
        )  # fmt: skip
        self.loaded: tuple[Any, Any] | None = None

    def __call__(self, chunk: Sequence[dict[str, Any]], index: int) -> list[dict[str, Any]]:
        if self.loaded is None:
            self.loaded = (
                self.policy if isinstance(self.policy, tuple)
                else models.load_causal_lm(self.policy, device=self.device, dtype=self.dtype, padding_side="right")
            )  # fmt: skip
        model, tokenizer = self.loaded
        prompts = [policy_prompt(it["question"], self.template) for it in chunk]
        values = models.mean_token_logprobs(
            model, tokenizer, prompts, [it["text"] for it in chunk], self.batch_size
        )
        return [
            {"key": it["key"], "likelihood": None if math.isnan(v) else v}
            for it, v in zip(chunk, values, strict=True)
        ]


def score_baselines(
    pool_records: Sequence[Mapping[str, Any]], policy: Any, out_dir: Any, *, prompt_template: str = "plain",
    batch_size: int = 32, shard_size: int = 2048, device: str = "auto", dtype: str = "auto",
) -> tuple[pd.DataFrame, dict[str, Any]]:  # fmt: skip
    """The :data:`SCORE_BASELINES` columns of the pool, one row per record (pool order), and accounting.

    Each distinct (problem, text) is scored once by the policy (a folder or hub name, loaded only if a shard
    is left; or a ready ``(model, tokenizer)``), cached in shards under ``out_dir/likelihood`` (a change of
    the pool, the policy or the prompt format discards them). A candidate with no token scores the lowest
    value of the pool (counted: ``likelihood_empty``).
    """
    index: dict[tuple[str, str], str] = {}
    items, keys = [], []
    for rec in pool_records:
        k = (str(rec["problem_id"]), rec["text"])
        if k not in index:
            index[k] = f"{len(items):07d}"
            items.append({"key": index[k], "question": rec["question"], "text": rec["text"]})
        keys.append(index[k])
    folder = Path(out_dir) / "likelihood"
    artifacts.prepare_shard_folder(folder, {
        "pool": artifacts.digest([[it["question"], it["text"]] for it in items], ensure_ascii=False),
        "policy": artifacts.fingerprint(policy[0] if isinstance(policy, tuple) else policy),
        "prompt_template": prompt_template, "shard_size": shard_size,
    })  # fmt: skip
    scorer = _LikelihoodScorer(policy, prompt_template, batch_size, device, dtype)
    shards = artifacts.run_sharded(items, shard_size, folder, scorer, ("key", "likelihood"), "likelihood")
    by_key = {r["key"]: r["likelihood"] for r in shards}
    raw = np.array([np.nan if by_key[k] is None else by_key[k] for k in keys], dtype=float)
    empty = int(np.isnan(raw).sum())
    lowest = np.nanmin(raw) - 1.0 if empty < raw.size else 0.0
    table = pd.DataFrame({
        "likelihood": np.where(np.isnan(raw), lowest, raw),
        "fewer_steps": [-float(len(r["steps"])) for r in pool_records],
    })  # fmt: skip
    if scorer.loaded is not None and not isinstance(policy, tuple):
        scorer.loaded = None
        generation.free_accelerator_memory()
    return table, {"likelihood_solutions": len(items), "likelihood_empty": empty}
