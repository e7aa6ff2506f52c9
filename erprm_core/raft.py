"""One RAFT step (reward-ranked fine-tuning, paper.md section 2 step 7): sample, score, select, fine-tune.

One iteration from the current policy pi_i (the loop, shards and resume are ``erprm_core.stages.raft``):

1. sample ``m`` solutions per training prompt (temperature 1 in the paper) through a sampler
   (:func:`erprm_core.rollouts.sample_solutions`);
2. score every candidate with the reward model (:func:`score_candidates`: ``score_batch`` -> step scores,
   aggregated by :func:`erprm_core.prm.aggregate`: ``min`` for PRMs as in the paper, ``last`` for the ORM);
3. keep the best-scoring candidate per prompt (:func:`select`, :func:`select_best`; exact ties broken by an
   rng seeded per prompt, so the pick does not depend on batch or shard layout);
4. fine-tune pi_i on the (prompt, best solution) pairs with :func:`erprm_core.training.train_policy_sft`
   (loss on the solution tokens only), learning rate ``lr * lr_decay ** (i - 1)`` or, with
   ``lr_schedule="linear"`` (the authors' RAFT/sft.py), ``lr * (T - i + 1) / T`` (:func:`iteration_lr`);
5. measure greedy accuracy on the test problems with a Wilson interval (:func:`evaluate_greedy`).

A candidate is *eligible* when it has at least one step, its score is finite and (with ``exclude_truncated``,
the default) it was not cut at the token limit. Ineligible candidates and prompts left without any eligible
candidate are counted by reason in the iteration's audit, never dropped silently; an iteration in which no
prompt has an eligible candidate fails. Besides greedy accuracy each iteration records how well the reward
model picks, over ALL prompts (a prompt without a pick counts as wrong): ``selected_outcome`` (mean
correctness of the picked solutions), ``sample_outcome`` (mean correctness of all samples = a random pick),
``oracle_outcome`` (share of prompts with a correct eligible candidate = a perfect reward model)
(:func:`selection_stats`).

Reward models are PRM checkpoints named by label rule (``er_1``, ``hard``, ``soft``, ``orm``), any object
with ``score_batch(questions, list_of_steps)``, or the two controls ``random`` (uniform pick among eligible
candidates: plain self-training) and ``oracle`` (a uniform pick among the CORRECT candidates, prompts without
one are not trained on: rejection-sampling fine-tuning with the answer key, an outcome-only reference).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from erprm_core import io, prm, rollouts, stats
from erprm_core.sampler import Sampler, row_seed

CONTROLS = ("random", "oracle")  # reward "models" that need no checkpoint
LR_SCHEDULES = ("geometric", "linear")
SAMPLE_COLUMNS = ("problem_id", "sample_index", "steps", "pred", "outcome", "truncated", "n_tokens")
SCORE_COLUMNS = ("problem_id", "sample_index", "score", "status")
BASELINE = "baseline"


@dataclass(frozen=True)
class RaftSettings:
    """Every knob of a RAFT run but the reward model (recorded with each iteration, part of its fingerprint).

    ``m`` samples per prompt; ``temperature``/``top_p``/``max_new_tokens`` for sampling (evaluation is
    greedy); ``lr`` at iteration 1, then decayed by ``lr_schedule`` (``geometric``: times ``lr_decay`` per
    further iteration; ``linear``: ``lr * (T - i + 1) / T`` for T iterations); ``epochs`` of SFT per
    iteration; ``aggregation`` of step scores (the ORM always uses ``last``); ``batch_size`` for sampling
    and scoring, ``train_batch_size`` for SFT; ``shard_size`` prompts per resumable shard.
    """

    m: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 128
    lr: float = 1e-4
    lr_decay: float = 0.5
    lr_schedule: str = "geometric"
    epochs: float = 1.0
    aggregation: str = "min"
    seed: int = 0
    batch_size: int = 64
    train_batch_size: int = 8
    shard_size: int = 256
    exclude_truncated: bool = True
    prompt_template: str = "plain"
    backend: str = "hf"
    device: str = "auto"

    def check(self) -> None:
        """Raise ValueError naming the first bad parameter."""
        if self.m < 1:
            raise ValueError(f"m (samples per prompt) must be >= 1, got {self.m}")
        if not self.lr > 0 or not 0 < self.lr_decay <= 1:
            raise ValueError(f"need lr > 0 and 0 < lr_decay <= 1, got lr={self.lr}, lr_decay={self.lr_decay}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule {self.lr_schedule!r} unknown; choose one of {LR_SCHEDULES}")
        if not self.epochs > 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")
        if self.aggregation not in prm.AGGREGATIONS:
            raise ValueError(f"aggregation {self.aggregation!r} unknown; choose one of {prm.AGGREGATIONS}")
        if min(self.batch_size, self.train_batch_size, self.shard_size, self.max_new_tokens) < 1:
            raise ValueError("batch_size, train_batch_size, shard_size and max_new_tokens must be >= 1")


def iteration_lr(
    lr: float, lr_decay: float, iteration: int, schedule: str = "geometric", total: int | None = None
) -> float:
    """Learning rate of RAFT iteration ``iteration`` (1-based).

    ``geometric``: ``lr * lr_decay ** (iteration - 1)``; ``linear`` (the authors' RAFT/sft.py, which ignores
    ``lr_decay``): ``lr * (total - iteration + 1) / total`` for ``total`` iterations.
    """
    if iteration < 1:
        raise ValueError(f"RAFT iterations are numbered from 1, got {iteration}")
    if not lr > 0 or not 0 < lr_decay <= 1:
        raise ValueError(f"need lr > 0 and 0 < lr_decay <= 1, got lr={lr}, lr_decay={lr_decay}")
    if schedule == "geometric":
        return lr * lr_decay ** (iteration - 1)
    if schedule == "linear":
        if total is None or not iteration <= total:
            raise ValueError(
                f"linear lr schedule needs total >= iteration, got total={total}, iteration={iteration}"
            )
        return lr * (total - iteration + 1) / total
    raise ValueError(f"lr schedule {schedule!r} unknown; choose one of {LR_SCHEDULES}")


def iteration_seed(seed: int, iteration: int) -> int:
    """Seed of iteration ``iteration``: depends on (seed, iteration) only, so every reward model's iteration
    sees the same random numbers (common random numbers; iteration 1 even shares its samples)."""
    return row_seed(seed, "raft", iteration) % (2**31 - 1)


def select_best(
    candidates: Sequence[dict[str, Any]], seed: int, audit: io.Audit | None = None
) -> list[dict[str, Any]]:
    """The best eligible candidate per prompt, in order of first appearance of each ``problem_id``.

    ``candidates`` are dicts with ``problem_id``, ``sample_index`` and ``score`` (a finite float, or None
    for an ineligible candidate). The highest score wins; exact ties are broken uniformly by an rng seeded
    with (``seed``, problem id), so the choice is reproducible and independent of the other prompts.
    Returned dicts are copies with ``n_tied`` added (how many candidates shared the best score). A prompt
    without an eligible candidate is counted in ``audit`` as ``prompt_no_candidate`` (else
    ``prompt_selected``; ``selected_by_tiebreak`` counts picks among ties).
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for cand in candidates:
        groups.setdefault(str(cand["problem_id"]), []).append(cand)
    selected = []
    for pid, group in groups.items():
        eligible = [c for c in group if c.get("score") is not None and math.isfinite(c["score"])]
        if not eligible:
            if audit is not None:
                audit.count("prompt_no_candidate", example=pid)
            continue
        best = max(c["score"] for c in eligible)
        tied = sorted((c for c in eligible if c["score"] == best), key=lambda c: c["sample_index"])
        pick = tied[0]
        if len(tied) > 1:
            rng = np.random.default_rng(row_seed(seed, "raft-tie", pid))
            pick = tied[int(rng.integers(len(tied)))]
            if audit is not None:
                audit.count("selected_by_tiebreak", example=f"{pid}: {len(tied)} tied at {best:.4g}")
        if audit is not None:
            audit.count("prompt_selected")
        selected.append({**pick, "n_tied": len(tied)})
    return selected


def score_candidates(
    reward_model: Any,
    reward_name: str,
    problems: dict[str, dict[str, Any]],
    samples: Sequence[dict[str, Any]],
    aggregation: str,
    settings: RaftSettings,
) -> list[dict[str, Any]]:
    """One score record per sample: ``score`` (None when ineligible) and ``status`` (why).

    ``problems`` maps problem id -> problem record (for the question). ``reward_name`` ``random`` gives every
    eligible candidate 0.0 and ``oracle`` 1.0 to the correct ones only; otherwise ``reward_model.score_batch``
    scores the eligible candidates and their step scores are aggregated with ``aggregation``.
    """
    out = []
    to_score = []
    for s in samples:
        rec = {
            "problem_id": s["problem_id"],
            "sample_index": s["sample_index"],
            "score": None,
            "step_scores": None,
        }
        if not s["steps"]:
            rec["status"] = "candidate_empty"
        elif settings.exclude_truncated and s["truncated"]:
            rec["status"] = "candidate_truncated"
        else:
            rec["status"] = "candidate_eligible"
            to_score.append(len(out))
        out.append(rec)
    if not to_score:
        return out
    if reward_name == "random":
        for i in to_score:
            out[i]["score"] = 0.0
        return out
    if reward_name == "oracle":  # rejection sampling with the answer key: only correct candidates qualify
        for i in to_score:
            if samples[i]["outcome"]:
                out[i]["score"] = 1.0
            else:
                out[i]["status"] = "candidate_wrong_answer"
        return out
    questions = [problems[str(samples[i]["problem_id"])]["question"] for i in to_score]
    steps = [list(samples[i]["steps"]) for i in to_score]
    kwargs = {}
    if "batch_size" in inspect.signature(reward_model.score_batch).parameters:
        kwargs["batch_size"] = settings.batch_size
    step_scores = reward_model.score_batch(questions, steps, **kwargs)
    if len(step_scores) != len(to_score):
        raise ValueError(
            f"reward model returned {len(step_scores)} score lists for {len(to_score)} candidates"
        )
    for i, scores in zip(to_score, step_scores, strict=True):
        scores = [float(x) for x in scores]
        out[i]["step_scores"] = [x if math.isfinite(x) else None for x in scores]
        if len(scores) != len(samples[i]["steps"]):
            out[i]["status"] = "candidate_score_count_mismatch"
            continue
        try:
            value = prm.aggregate(scores, aggregation)
        except ValueError:  # every step score NaN: no tag located
            value = float("nan")
        if math.isfinite(value):
            out[i]["score"] = value
        else:
            out[i]["status"] = "candidate_unscored"
    return out


def selection_stats(
    prompts: Sequence[dict[str, Any]],
    samples: Sequence[dict[str, Any]],
    scores: Sequence[dict[str, Any]],
    selected: Sequence[dict[str, Any]],
    seed: int,
) -> dict[str, Any]:
    """selected/sample/oracle outcome over ALL prompts (no pick = wrong), with intervals (the record stats)."""
    by_prompt: dict[str, list[int]] = {str(p["id"]): [] for p in prompts}
    oracle: dict[str, int] = {str(p["id"]): 0 for p in prompts}
    for s, sc in zip(samples, scores, strict=True):
        pid = str(s["problem_id"])
        by_prompt[pid].append(int(s["outcome"]))
        if sc["score"] is not None and s["outcome"]:
            oracle[pid] = 1
    picked = {str(c["problem_id"]): int(c["outcome"]) for c in selected}
    sel_vec = [picked.get(pid, 0) for pid in by_prompt]
    sel, sel_lo, sel_hi = stats.accuracy_ci(sel_vec)
    orc, orc_lo, orc_hi = stats.accuracy_ci(list(oracle.values()))
    per_prompt = [float(np.mean(v)) for v in by_prompt.values()]
    smp, smp_lo, smp_hi = stats.bootstrap_ci(per_prompt, seed=seed)
    eligible: dict[str, list[int]] = {}  # random pick among eligible candidates (a useless reward model)
    for s, sc in zip(samples, scores, strict=True):
        if sc["score"] is not None:
            eligible.setdefault(str(s["problem_id"]), []).append(int(s["outcome"]))
    eligible_mean = [float(np.mean(eligible[pid])) for pid in picked]
    return {
        "n_prompts": len(by_prompt),
        "n_selected": len(picked),
        "n_samples": len(samples),
        "selected_outcome": [sel, sel_lo, sel_hi],
        "sample_outcome": [smp, smp_lo, smp_hi],
        "oracle_outcome": [orc, orc_lo, orc_hi],
        "eligible_outcome_of_selected_prompts": float(np.mean(eligible_mean)) if eligible_mean else None,
        "selected_outcome_of_selected_prompts": float(np.mean(list(picked.values()))) if picked else None,
    }


def select(
    samples: Sequence[dict[str, Any]],
    scores: Sequence[dict[str, Any]],
    seed: int,
    prompts: Sequence[dict[str, Any]],
    *,
    sources: tuple[Any, Any] = ("the samples", "the scores"),
) -> tuple[list[dict[str, Any]], io.Audit, dict[str, Any]]:
    """RAFT's selection step: the best eligible candidate per prompt, the audit and the selection stats.

    ``samples`` (``SAMPLE_COLUMNS``) and their ``scores`` (``SCORE_COLUMNS``, from :func:`score_candidates`)
    are in the same order (``sources`` names where they come from in the error when not). Every candidate
    is counted by status in the audit; :func:`select_best` picks (ties by ``seed``); picks without a final
    answer are counted too. No eligible candidate at all is a ValueError. Returns ``(selected, audit,
    stats)`` with ``stats`` from :func:`selection_stats`.
    """
    audit = io.Audit("05_rlhf_raft")
    for s, sc in zip(samples, scores, strict=True):
        if (s["problem_id"], s["sample_index"]) != (sc["problem_id"], sc["sample_index"]):
            raise ValueError(f"candidate order differs between {sources[0]} and {sources[1]}")
        audit.count(sc["status"], example=f"{s['problem_id']}#{s['sample_index']}")
        if sc["score"] is not None and None in (sc.get("step_scores") or []):  # aggregated over the rest
            audit.count("candidate_some_steps_unscored", example=f"{s['problem_id']}#{s['sample_index']}")
    candidates = [{**s, "score": sc["score"]} for s, sc in zip(samples, scores, strict=True)]
    selected = select_best(candidates, seed, audit)
    if not selected:
        raise ValueError(
            f"no prompt has an eligible candidate ({dict(audit.counts)}); nothing to fine-tune on - "
            "raise max_new_tokens or m, or check the policy"
        )
    for c in selected:
        if c["pred"] is None:
            audit.count("selected_no_answer", example=f"{c['problem_id']}#{c['sample_index']}")
    return selected, audit, selection_stats(prompts, samples, scores, selected, seed)


def evaluate_greedy(
    sampler: Sampler, test_problems: Sequence[dict[str, Any]], settings: RaftSettings
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Greedy accuracy of a policy (its ``sampler``) on ``test_problems`` with its Wilson 95% interval.

    Returns (summary, per-problem records): the summary has ``greedy_accuracy``, ``ci_low``, ``ci_high``,
    ``n_test``, ``eval_tokens`` and ``eval_truncated``.
    """
    if not test_problems:
        raise ValueError("no test problems to evaluate on")
    recs = rollouts.sample_solutions(sampler, test_problems, n=1, temperature=0.0, top_p=1.0,
                                     max_new_tokens=settings.max_new_tokens, seed=0,
                                     prompt_template=settings.prompt_template)  # fmt: skip
    acc, low, high = stats.accuracy_ci([r["outcome"] for r in recs])
    summary = {
        "greedy_accuracy": acc,
        "ci_low": low,
        "ci_high": high,
        "n_test": len(recs),
        "eval_tokens": int(sum(r["n_tokens"] for r in recs)),
        "eval_truncated": int(sum(bool(r["truncated"]) for r in recs)),
        "eval_outcomes": [int(r["outcome"]) for r in recs],  # in test order: paired comparisons
    }
    keep = ("problem_id", "text", "pred", "outcome", "truncated", "n_tokens")
    return summary, [{k: r[k] for k in keep} for r in recs]
