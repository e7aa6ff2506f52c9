"""RLHF by RAFT (reward-ranked / rejection-sampling fine-tuning), paper.md section 2 step 7 (05_rlhf_raft).

One iteration (:func:`raft_iteration`) from the current policy pi_i:

1. sample ``m`` solutions per training prompt (temperature 1 in the paper) with :mod:`erprm_core.sampling`;
2. score every candidate with the reward model (``score_batch`` -> step scores, aggregated by
   :func:`erprm_core.prm.aggregate`: ``min`` for PRMs as in the paper, ``last`` for the ORM);
3. keep the best-scoring candidate per prompt (:func:`select_best`; exact ties broken by an rng seeded per
   prompt, so the pick does not depend on batch or shard layout);
4. fine-tune pi_i on the (prompt, best solution) pairs with :func:`erprm_core.training.train_policy_sft`
   (loss on the solution tokens only), learning rate ``lr * lr_decay ** (i - 1)`` or, with
   ``lr_schedule="linear"`` (the authors' RAFT/sft.py), ``lr * (T - i + 1) / T`` (:func:`iteration_lr`);
5. save the checkpoint and measure greedy accuracy on the test problems with a Wilson interval.

A candidate is *eligible* when it has at least one step, its score is finite and (with ``exclude_truncated``,
the default) it was not cut at the token limit. Ineligible candidates and prompts left without any eligible
candidate are counted by reason in the iteration's audit, never dropped silently; an iteration in which no
prompt has an eligible candidate fails. Besides greedy accuracy each iteration records how well the reward
model picks, over ALL prompts (a prompt without a pick counts as wrong): ``selected_outcome`` (mean
correctness of the picked solutions), ``sample_outcome`` (mean correctness of all samples = a random pick),
``oracle_outcome`` (share of prompts with a correct eligible candidate = a perfect reward model).

Reward models are PRM checkpoints named by label rule (``er_1``, ``hard``, ``soft``, ``orm``), any object
with ``score_batch(questions, list_of_steps)``, or the two controls ``random`` (uniform pick among eligible
candidates: plain self-training) and ``oracle`` (a uniform pick among the CORRECT candidates, prompts without
one are not trained on: rejection-sampling fine-tuning with the answer key, an outcome-only reference). The
no-RLHF baseline (iteration 0, the starting policy's greedy accuracy) is computed once. Every policy is
evaluated on the same test problems, so comparisons are paired (``greedy_gain`` in the table,
:func:`raft_paired_table`).

Files under ``runs/<profile>/raft`` (the loop's state; everything is written atomically)::

    baseline/record.json               iteration 0 (greedy accuracy of the starting policy)
    samples/<digest>/shard-*.jsonl     candidates of one (policy, seed, settings); shared when identical,
                                       e.g. by every reward model's iteration 1
    <reward>/iter_01/scores/           scored candidates (shards)
    <reward>/iter_01/policy/           the fine-tuned checkpoint (save_pretrained)
    <reward>/iter_01/eval.jsonl        greedy test outputs
    <reward>/iter_01/record.json       written LAST: the iteration is finished

Resume: :func:`run_raft` skips an iteration whose record exists with the same fingerprint (settings, reward
model identity, and the previous iteration's fingerprint, so a change anywhere upstream - a retrained PRM
or policy, other prompts - redoes the chain). An interrupted iteration is redone, reusing its finished
sample/score shards and, when complete, its saved checkpoint. An exception inside an iteration is re-raised
as :class:`RaftError` naming the reward model and the iteration. :func:`run_raft_stage` is the notebook's
stage function (all reward models, the tidy ``raft`` table); :func:`raft_paired_table`, :func:`raft_audit`,
:func:`manifest_info` and :func:`plot_raft` serve the notebook and 06_figures.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from erprm_core import artifacts

log = logging.getLogger(__name__)

__all__ = [
    "CONTROLS",
    "PROBLEM_COLUMNS",
    "TABLE_COLUMNS",
    "RaftError",
    "RaftSettings",
    "checkpoint_id",
    "iteration_lr",
    "iteration_seed",
    "select_best",
    "raft_iteration",
    "evaluate_greedy",
    "baseline_record",
    "run_raft",
    "run_raft_stage",
    "reward_paths",
    "load_records",
    "raft_table",
    "raft_paired_table",
    "raft_audit",
    "manifest_info",
    "plot_raft",
]

CONTROLS = ("random", "oracle")  # reward "models" that need no checkpoint
LR_SCHEDULES = ("geometric", "linear")
PROBLEM_COLUMNS = ("id", "question", "answer", "task")
SAMPLE_COLUMNS = ("problem_id", "sample_index", "steps", "pred", "outcome", "truncated", "n_tokens")
SCORE_COLUMNS = ("problem_id", "sample_index", "score", "status")
TABLE_COLUMNS = [
    "reward_model",
    "aggregation",
    "iteration",
    "lr",
    "metric",
    "value",
    "ci_low",
    "ci_high",
    "n",
]
METRICS = ("greedy_accuracy", "greedy_gain", "selected_outcome", "sample_outcome", "oracle_outcome")
BASELINE = "baseline"
RECORD_VERSION = 2


class RaftError(RuntimeError):
    """A RAFT iteration failed; the message names the reward model and the iteration."""


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
        from erprm_core.prm import AGGREGATIONS

        if self.m < 1:
            raise ValueError(f"m (samples per prompt) must be >= 1, got {self.m}")
        if not self.lr > 0 or not 0 < self.lr_decay <= 1:
            raise ValueError(f"need lr > 0 and 0 < lr_decay <= 1, got lr={self.lr}, lr_decay={self.lr_decay}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule {self.lr_schedule!r} unknown; choose one of {LR_SCHEDULES}")
        if not self.epochs > 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation {self.aggregation!r} unknown; choose one of {AGGREGATIONS}")
        if min(self.batch_size, self.train_batch_size, self.shard_size, self.max_new_tokens) < 1:
            raise ValueError("batch_size, train_batch_size, shard_size and max_new_tokens must be >= 1")


# ----------------------------------------------------------------------------------------------------
# Small pure pieces: schedule, seeds, identities, selection
# ----------------------------------------------------------------------------------------------------


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
    from erprm_core.sampling import row_seed

    return row_seed(seed, "raft", iteration) % (2**31 - 1)


def _digest(obj: Any, n: int = 16) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def checkpoint_id(path: Path | str) -> str:
    """A content digest of a checkpoint folder: names, sizes and the first/last MiB of every file.

    Cheap for any model size, unchanged by copying, changed by retraining (used to notice a stale PRM or
    policy on resume).
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder {path} not found")
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
        size = f.stat().st_size
        h.update(f"{f.relative_to(path).as_posix()}|{size}|".encode())
        with f.open("rb") as fh:
            h.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(-(1 << 20), os.SEEK_END)
                h.update(fh.read())
    return h.hexdigest()[:16]


def select_best(
    candidates: Sequence[dict[str, Any]], seed: int, audit: artifacts.Audit | None = None
) -> list[dict[str, Any]]:
    """The best eligible candidate per prompt, in order of first appearance of each ``problem_id``.

    ``candidates`` are dicts with ``problem_id``, ``sample_index`` and ``score`` (a finite float, or None
    for an ineligible candidate). The highest score wins; exact ties are broken uniformly by an rng seeded
    with (``seed``, problem id), so the choice is reproducible and independent of the other prompts.
    Returned dicts are copies with ``n_tied`` added (how many candidates shared the best score). A prompt
    without an eligible candidate is counted in ``audit`` as ``prompt_no_candidate`` (else
    ``prompt_selected``; ``selected_by_tiebreak`` counts picks among ties).
    """
    from erprm_core.sampling import row_seed

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


# ----------------------------------------------------------------------------------------------------
# Sampling, scoring, evaluation
# ----------------------------------------------------------------------------------------------------


def _sampling_key(st: RaftSettings) -> dict[str, Any]:
    """The settings that decide the candidates (not the learning rate, the aggregation, ...)."""
    keys = (
        "m",
        "temperature",
        "top_p",
        "max_new_tokens",
        "seed",
        "batch_size",
        "shard_size",
        "prompt_template",
        "backend",
    )
    return {k: getattr(st, k) for k in keys}


def _problems_digest(problems: Sequence[dict[str, Any]]) -> str:
    return _digest([{k: p.get(k) for k in PROBLEM_COLUMNS} for p in problems])


def _sample(
    model: Any,
    tokenizer: Any,
    problems: Sequence[dict[str, Any]],
    n: int,
    temperature: float,
    seed: int,
    settings: RaftSettings,
) -> list[dict[str, Any]]:
    from erprm_core import sampling

    return sampling.sample_solutions(
        model,
        tokenizer,
        problems,
        n=n,
        temperature=temperature,
        top_p=settings.top_p if temperature > 0 else 1.0,
        max_new_tokens=settings.max_new_tokens,
        seed=seed,
        batch_size=settings.batch_size,
        prompt_template=settings.prompt_template,
        backend=settings.backend,
    )


def evaluate_greedy(
    model: Any, tokenizer: Any, test_problems: Sequence[dict[str, Any]], settings: RaftSettings
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Greedy accuracy of a policy on ``test_problems`` with its Wilson 95% interval.

    Returns (summary, per-problem records): the summary has ``greedy_accuracy``, ``ci_low``, ``ci_high``,
    ``n_test``, ``eval_tokens`` and ``eval_truncated``.
    """
    from erprm_core.evaluation import accuracy_ci

    if not test_problems:
        raise ValueError("no test problems to evaluate on")
    recs = _sample(model, tokenizer, test_problems, 1, 0.0, 0, settings)
    acc, low, high = accuracy_ci([r["outcome"] for r in recs])
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


def _score_candidates(
    reward_model: Any,
    reward_name: str,
    problems: dict[str, dict[str, Any]],
    samples: Sequence[dict[str, Any]],
    aggregation: str,
    settings: RaftSettings,
) -> list[dict[str, Any]]:
    """One score record per sample: ``score`` (None when ineligible) and ``status`` (why)."""
    from erprm_core.prm import aggregate

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
            value = aggregate(scores, aggregation)
        except ValueError:  # every step score NaN: no tag located
            value = float("nan")
        if math.isfinite(value):
            out[i]["score"] = value
        else:
            out[i]["status"] = "candidate_unscored"
    return out


def _mean_ci(values: Sequence[float], seed: int) -> tuple[float, float, float]:
    from erprm_core.evaluation import bootstrap_ci

    return bootstrap_ci(values, seed=seed)


def _selection_stats(
    prompts: Sequence[dict[str, Any]],
    samples: Sequence[dict[str, Any]],
    scores: Sequence[dict[str, Any]],
    selected: Sequence[dict[str, Any]],
    seed: int,
) -> dict[str, Any]:
    """selected/sample/oracle outcome over ALL prompts (no pick = wrong), with intervals."""
    from erprm_core.evaluation import accuracy_ci

    by_prompt: dict[str, list[int]] = {str(p["id"]): [] for p in prompts}
    oracle: dict[str, int] = {str(p["id"]): 0 for p in prompts}
    for s, sc in zip(samples, scores, strict=True):
        pid = str(s["problem_id"])
        by_prompt[pid].append(int(s["outcome"]))
        if sc["score"] is not None and s["outcome"]:
            oracle[pid] = 1
    picked = {str(c["problem_id"]): int(c["outcome"]) for c in selected}
    sel_vec = [picked.get(pid, 0) for pid in by_prompt]
    sel, sel_lo, sel_hi = accuracy_ci(sel_vec)
    orc, orc_lo, orc_hi = accuracy_ci(list(oracle.values()))
    per_prompt = [float(np.mean(v)) for v in by_prompt.values()]
    smp, smp_lo, smp_hi = _mean_ci(per_prompt, seed)
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


# ----------------------------------------------------------------------------------------------------
# One iteration
# ----------------------------------------------------------------------------------------------------


def _load_policy(path: Path | str, settings: RaftSettings):
    from erprm_core.models import load_causal_lm

    return load_causal_lm(path, device=settings.device)


class _Policy:
    """What an iteration needs from one checkpoint, loaded lazily: the Hugging Face model (fine-tuning and
    the ``hf`` sampling backend) and, with ``backend="vllm"``, a vLLM sampler of the same folder."""

    def __init__(self, path: Path | str, settings: RaftSettings):
        self.path, self.settings = Path(path), settings
        self.model: Any = None
        self.tokenizer: Any = None
        self.sampler: Any = None

    def hf(self) -> tuple[Any, Any]:
        """(model, tokenizer) from the checkpoint (a vLLM sampler is released first to free its memory)."""
        if self.model is None:
            self.release_sampler()
            self.model, self.tokenizer = _load_policy(self.path, self.settings)
        return self.model, self.tokenizer

    def for_sampling(self) -> tuple[Any, Any]:
        """The ``(model, tokenizer)`` arguments of sample_solutions for the configured backend."""
        if self.settings.backend != "vllm":
            return self.hf()
        if self.sampler is None:
            from erprm_core import sampling

            self.model = self.tokenizer = None
            _free_accelerator_memory()
            self.sampler = sampling.make_sampler(str(self.path), None, "vllm", self.settings.batch_size)
        return self.sampler, None

    def release_sampler(self) -> None:
        """Drop the vLLM engine (if any) before the HF model needs the accelerator."""
        if self.sampler is not None:
            self.sampler = None
            _free_accelerator_memory()

    def close(self) -> None:
        """Drop everything."""
        self.model = self.tokenizer = None
        self.release_sampler()
        _free_accelerator_memory()


def _save_checkpoint_atomically(folder: Path, write: Callable[[Path], None], fingerprint: str) -> None:
    """``write(tmp)`` fills a temp folder, then renamed to ``folder`` (never a half-written checkpoint)."""
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    write(tmp)
    artifacts.atomic_write_text(tmp / "raft_fingerprint.txt", fingerprint + "\n")
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)


def _finished_checkpoint(folder: Path, fingerprint: str) -> bool:
    marker = folder / "raft_fingerprint.txt"
    return marker.is_file() and marker.read_text().strip() == fingerprint


def raft_iteration(
    policy_path: Path | str,
    reward_model: Any,
    prompts: Sequence[dict[str, Any]],
    *,
    m: int = 4,
    temperature: float = 1.0,
    lr: float = 1e-4,
    epochs: float = 1.0,
    aggregation: str = "min",
    seed: int = 0,
    out_dir: Path | str,
    test_problems: Sequence[dict[str, Any]],
    reward_name: str = "reward",
    iteration: int = 1,
    samples_dir: Path | str | None = None,
    fingerprint: str | None = None,
    settings: RaftSettings | None = None,
) -> dict[str, Any]:
    """One RAFT iteration from the checkpoint ``policy_path``; returns its record (also written last to
    ``out_dir/record.json``).

    ``reward_model`` is any object with ``score_batch(questions, list_of_steps) -> list[list[float]]``
    (ignored for the controls ``reward_name`` = ``random`` / ``oracle``). ``prompts`` and
    ``test_problems`` are problem records (``id, question, answer, task``). ``m``, ``temperature``, ``lr``
    (this iteration's, already decayed), ``epochs``, ``aggregation`` and ``seed`` (this iteration's) override
    ``settings``. The fine-tuned checkpoint goes to ``out_dir/policy``; candidates are cached in
    ``samples_dir`` (default ``out_dir/samples``) and scores in ``out_dir/scores`` as resumable shards.
    ``fingerprint`` identifies the iteration's inputs (default: a digest of the arguments); finished shards
    and a complete checkpoint with the same fingerprint are reused, anything else is redone.
    """
    from erprm_core import training
    from erprm_core.steps import join_steps

    base = settings or RaftSettings()
    st = RaftSettings(
        **{
            **asdict(base),
            "m": m,
            "temperature": temperature,
            "lr": lr,
            "epochs": epochs,
            "aggregation": aggregation,
            "seed": seed,
        }
    )
    st.check()
    if not prompts:
        raise ValueError("no RAFT prompts")
    ids = [str(p["id"]) for p in prompts]
    if len(set(ids)) != len(ids):
        raise ValueError("RAFT prompt ids must be unique (seeds and selection are per id)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    policy_path = Path(policy_path)
    prompts_digest = _problems_digest(prompts)
    if fingerprint is None:
        fingerprint = _digest(
            {
                "policy": checkpoint_id(policy_path),
                "reward": reward_name,
                "settings": asdict(st),
                "prompts": prompts_digest,
                "test": _problems_digest(test_problems),
            }
        )
    by_id = {str(p["id"]): p for p in prompts}
    t0 = time.perf_counter()

    # 1. candidates (shards; content-addressed so identical sampling is shared between reward models)
    sample_fp = {"policy": checkpoint_id(policy_path), **_sampling_key(st), "prompts": prompts_digest}
    samples_dir = Path(samples_dir) if samples_dir is not None else out_dir / "samples"
    artifacts.prepare_shard_folder(samples_dir, sample_fp)
    current = _Policy(policy_path, st)

    def sample_shard(chunk: Sequence[dict[str, Any]], index: int) -> list[dict[str, Any]]:
        model, tok = current.for_sampling()
        return _sample(model, tok, chunk, st.m, st.temperature, st.seed, st)

    computed_before = len(artifacts.shard_status(samples_dir))
    samples = artifacts.run_sharded(
        list(prompts),
        st.shard_size,
        samples_dir,
        sample_shard,
        SAMPLE_COLUMNS,
        desc=f"RAFT {reward_name} it{iteration}: sampling",
    )
    sampled_here = len(artifacts.shard_status(samples_dir)) - computed_before

    # 2. scores (shards)
    scores_dir = out_dir / "scores"
    artifacts.prepare_shard_folder(scores_dir, {"fingerprint": fingerprint, "samples": sample_fp})
    samples_by_prompt: dict[str, list[dict[str, Any]]] = {}
    for s in samples:
        samples_by_prompt.setdefault(str(s["problem_id"]), []).append(s)

    def score_shard(chunk: Sequence[dict[str, Any]], index: int) -> list[dict[str, Any]]:
        part = [s for p in chunk for s in samples_by_prompt.get(str(p["id"]), [])]
        return _score_candidates(reward_model, reward_name, by_id, part, st.aggregation, st)

    scores = artifacts.run_sharded(
        list(prompts),
        st.shard_size,
        scores_dir,
        score_shard,
        SCORE_COLUMNS,
        desc=f"RAFT {reward_name} it{iteration}: scoring",
    )
    if len(scores) != len(samples):
        raise ValueError(
            f"{len(samples)} candidates but {len(scores)} scores (corrupt shards in {scores_dir}?)"
        )

    # 3. selection
    audit = artifacts.Audit("05_rlhf_raft")
    for s, sc in zip(samples, scores, strict=True):
        if (s["problem_id"], s["sample_index"]) != (sc["problem_id"], sc["sample_index"]):
            raise ValueError(f"candidate order differs between {samples_dir} and {scores_dir}")
        audit.count(sc["status"], example=f"{s['problem_id']}#{s['sample_index']}")
        if sc["score"] is not None and None in (sc.get("step_scores") or []):  # aggregated over the rest
            audit.count("candidate_some_steps_unscored", example=f"{s['problem_id']}#{s['sample_index']}")
    candidates = [{**s, "score": sc["score"]} for s, sc in zip(samples, scores, strict=True)]
    selected = select_best(candidates, st.seed, audit)
    if not selected:
        raise ValueError(
            f"no prompt has an eligible candidate ({dict(audit.counts)}); nothing to fine-tune on - "
            "raise max_new_tokens or m, or check the policy"
        )
    for c in selected:
        if c["pred"] is None:
            audit.count("selected_no_answer", example=f"{c['problem_id']}#{c['sample_index']}")
    stats = _selection_stats(prompts, samples, scores, selected, st.seed)

    # 4. fine-tune on (prompt, best solution); 5. save
    ckpt = out_dir / "policy"
    trained: _Policy | None = None
    if _finished_checkpoint(ckpt, fingerprint) and (out_dir / "train.json").is_file():
        train_info = json.loads((out_dir / "train.json").read_text())
    else:
        model, tok = current.hf()
        examples = [
            {"question": by_id[str(c["problem_id"])]["question"], "solution": join_steps(c["steps"])}
            for c in selected
        ]
        holder: dict[str, Any] = {}

        def write(tmp: Path) -> None:
            holder["log"] = training.train_policy_sft(
                model,
                tok,
                examples,
                tmp,
                lr=st.lr,
                epochs=st.epochs,
                batch_size=st.train_batch_size,
                seed=st.seed,
                prompt_template=st.prompt_template,
                save=True,
                disable_tqdm=True,
            )

        _save_checkpoint_atomically(ckpt, write, fingerprint)
        attrs = holder["log"].attrs
        train_info = {
            "n_examples": int(attrs.get("n_examples", len(examples))),
            "n_truncated": int(attrs.get("n_truncated", 0)),
            "global_steps": int(attrs.get("global_steps", 0)),
            "train_tokens": int(attrs.get("train_tokens", 0)),
            "final_train_loss": attrs.get("final_train_loss"),
        }
        artifacts.atomic_write_json(out_dir / "train.json", train_info)
        trained = _Policy(ckpt, st)  # the fine-tuned model in memory is exactly the saved checkpoint
        trained.model, trained.tokenizer = model, tok
        current.model = current.tokenizer = model = tok = None
    current.close()

    # 6. greedy evaluation of the new policy (from disk when it was saved before an interruption)
    trained = trained or _Policy(ckpt, st)
    evaluation, eval_records = evaluate_greedy(*trained.for_sampling(), test_problems, st)
    trained.close()
    artifacts.atomic_write_jsonl(out_dir / "eval.jsonl", eval_records)

    record = {
        "version": RECORD_VERSION,
        "reward_model": reward_name,
        "iteration": iteration,
        "fingerprint": fingerprint,
        "aggregation": st.aggregation,
        "lr": st.lr,
        "seed": st.seed,
        "settings": asdict(st),
        **stats,
        **evaluation,
        "audit": dict(sorted(audit.counts.items())),
        "audit_examples": dict(sorted(audit.examples.items())),
        "sample_tokens": int(sum(s["n_tokens"] for s in samples)),
        "samples_dir": samples_dir.name,
        "train": train_info,
        "checkpoint": "policy",
    }
    artifacts.atomic_write_json(
        out_dir / "timing.json",
        {"wall_s": round(time.perf_counter() - t0, 2), "sample_shards_computed": sampled_here},
    )
    artifacts.atomic_write_json(out_dir / "record.json", record)
    return record


def _free_accelerator_memory() -> None:
    import gc

    import torch

    if torch.cuda.is_available():  # a full gc costs ~0.4 s with transformers loaded: only worth it on GPU
        gc.collect()
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------


def _read_record(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        log.warning("%s is corrupt: the iteration is redone", path)
        return None


def _reward_identity(reward: Any, reward_name: str) -> str:
    if reward_name in CONTROLS:
        return reward_name
    if isinstance(reward, str | Path):
        return checkpoint_id(reward)
    return str(getattr(reward, "fingerprint", None) or getattr(reward, "name", None) or type(reward).__name__)


def _load_reward(reward: Any, reward_name: str, settings: RaftSettings) -> Any:
    if reward_name in CONTROLS:
        return None
    if isinstance(reward, str | Path):
        from erprm_core.prm import ProcessRewardModel

        return ProcessRewardModel.from_pretrained(reward, device=settings.device)
    if not hasattr(reward, "score_batch"):
        raise TypeError(
            f"reward model {reward_name!r}: expected a checkpoint path or an object with score_batch"
        )
    return reward


def _aggregation_for(reward_name: str, aggregation: str) -> str:
    """The ORM scores whole solutions: its 'last' score is the outcome estimate, whatever ``aggregation``."""
    return "last" if reward_name == "orm" else aggregation


def baseline_record(
    policy_path: Path | str,
    test_problems: Sequence[dict[str, Any]],
    settings: RaftSettings,
    out_dir: Path | str,
) -> dict[str, Any]:
    """Iteration 0: greedy accuracy of the starting policy, computed once (``out_dir/record.json``)."""
    out_dir = Path(out_dir)
    fp = _digest(
        {
            "policy": checkpoint_id(policy_path),
            "test": _problems_digest(test_problems),
            "max_new_tokens": settings.max_new_tokens,
            "prompt_template": settings.prompt_template,
            "backend": settings.backend,
            "batch_size": settings.batch_size,
            "version": RECORD_VERSION,
        }
    )
    old = _read_record(out_dir / "record.json")
    if old is not None and old.get("fingerprint") == fp:
        return old
    start = _Policy(policy_path, settings)
    evaluation, eval_records = evaluate_greedy(*start.for_sampling(), test_problems, settings)
    start.close()
    artifacts.atomic_write_jsonl(out_dir / "eval.jsonl", eval_records)
    record = {
        "version": RECORD_VERSION,
        "reward_model": BASELINE,
        "iteration": 0,
        "fingerprint": fp,
        **evaluation,
    }
    artifacts.atomic_write_json(out_dir / "record.json", record)
    return record


def run_raft(
    reward_name: str,
    reward: Any,
    *,
    start_policy: Path | str,
    prompts: Sequence[dict[str, Any]],
    test_problems: Sequence[dict[str, Any]],
    out_root: Path | str,
    iterations: int = 3,
    settings: RaftSettings | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """RAFT with one reward model for ``iterations`` iterations; returns one record per iteration.

    ``reward`` is a PRM checkpoint folder (loaded with ProcessRewardModel.from_pretrained, only if an
    iteration must run), an object with ``score_batch``, or None for the controls ``random``/``oracle``.
    Iteration ``i`` starts from iteration ``i - 1``'s checkpoint (``start_policy`` for i = 1) and uses
    ``iteration_lr(lr, lr_decay, i, lr_schedule, iterations)`` and ``iteration_seed(seed, i)``.
    Folders: ``out_root/<reward_name>/iter_NN`` and the shared ``out_root/samples``. Finished iterations (same fingerprint) are reused;
    an exception is re-raised as :class:`RaftError` naming ``reward_name`` and the iteration.
    """
    from tqdm.auto import tqdm

    st = settings or RaftSettings()
    st.check()
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    if reward is None and reward_name not in CONTROLS:
        raise ValueError(
            f"reward model {reward_name!r} needs a checkpoint path or a scorer (None is only for {CONTROLS})"
        )
    out_root = Path(out_root)
    folder = out_root / reward_name
    aggregation = _aggregation_for(reward_name, st.aggregation)
    common = {
        "reward": _reward_identity(reward, reward_name),
        "reward_model": reward_name,
        "aggregation": aggregation,
        "settings": asdict(st),
        "prompts": _problems_digest(prompts),
        "test": _problems_digest(test_problems),
        "version": RECORD_VERSION,
    }
    previous = f"start:{checkpoint_id(start_policy)}"
    policy_path = Path(start_policy)
    scorer = None
    records = []
    bar = tqdm(range(1, iterations + 1), desc=f"RAFT {reward_name}", unit="iter", disable=not progress)
    for it in bar:
        lr_i = iteration_lr(st.lr, st.lr_decay, it, st.lr_schedule, iterations)
        fp = _digest({**common, "iteration": it, "lr": lr_i, "previous": previous})
        it_dir = folder / f"iter_{it:02d}"
        rec = _read_record(it_dir / "record.json")
        if rec is not None and rec.get("fingerprint") == fp:
            log.info("RAFT %s iteration %d: finished earlier, reused", reward_name, it)
        else:
            if rec is not None:  # made with other settings or inputs: never report it again
                log.info("RAFT %s iteration %d: inputs or settings changed, redone", reward_name, it)
                (it_dir / "record.json").unlink()
            try:
                if scorer is None and reward_name not in CONTROLS:
                    scorer = _load_reward(reward, reward_name, st)
                key = {**_sampling_key(st), "seed": iteration_seed(st.seed, it)}
                samples_dir = (
                    out_root / "samples" / _digest({"policy": previous, **key, "prompts": common["prompts"]})
                )
                rec = raft_iteration(
                    policy_path,
                    scorer,
                    prompts,
                    m=st.m,
                    temperature=st.temperature,
                    lr=lr_i,
                    epochs=st.epochs,
                    aggregation=aggregation,
                    seed=iteration_seed(st.seed, it),
                    out_dir=it_dir,
                    test_problems=test_problems,
                    reward_name=reward_name,
                    iteration=it,
                    samples_dir=samples_dir,
                    fingerprint=fp,
                    settings=st,
                )
            except Exception as exc:
                raise RaftError(
                    f"RAFT with reward model {reward_name!r} failed at iteration {it} of {iterations} "
                    f"({type(exc).__name__}: {exc}); finished iterations are kept in {folder}, "
                    "rerun to resume"
                ) from exc
            log.info(
                "RAFT %s iteration %d: greedy accuracy %.3f [%.3f, %.3f], selected %.3f vs sample %.3f",
                reward_name,
                it,
                rec["greedy_accuracy"],
                rec["ci_low"],
                rec["ci_high"],
                rec["selected_outcome"][0],
                rec["sample_outcome"][0],
            )
        records.append(rec)
        previous = fp
        policy_path = it_dir / "policy"
    return records


# ----------------------------------------------------------------------------------------------------
# The stage (notebook 05_rlhf_raft)
# ----------------------------------------------------------------------------------------------------


def _names(reward_models: str | Sequence[str]) -> list[str]:
    names = (
        [n.strip() for n in reward_models.split(",")]
        if isinstance(reward_models, str)
        else list(reward_models)
    )
    names = [n for n in names if n]
    if not names:
        raise ValueError("reward_models is empty: name at least one (e.g. 'er_1,hard,soft,orm')")
    if len(set(names)) != len(names):
        raise ValueError(f"reward_models lists a name twice: {names}")
    return names


def reward_paths(profile: str, reward_models: str | Sequence[str]) -> dict[str, Path | None]:
    """Checkpoint folder of every named reward model (None for the controls); a missing one raises an
    ArtifactError naming stage 03_train_prm."""
    P = artifacts.paths(profile)
    out: dict[str, Path | None] = {}
    for name in _names(reward_models):
        if name in CONTROLS:
            out[name] = None
        else:
            out[name] = artifacts.require(
                P.prm(name), "03_train_prm", profile, f"PRM checkpoint for rule {name!r}"
            )
    return out


def _take(path: Path, n: int, what: str, profile: str, stage: str) -> list[dict[str, Any]]:
    artifacts.require(path, stage, profile, what)
    problems = artifacts.read_jsonl(path, PROBLEM_COLUMNS)
    if n < 0:
        raise ValueError(f"{what}: the count must be >= 0 (0 = all), got {n}")
    if n > len(problems):
        raise ValueError(f"{what}: asked for {n} but {path} holds only {len(problems)} problems")
    return problems[:n] if n else problems


def run_raft_stage(
    profile: str,
    *,
    reward_models: str | Sequence[str] = "er_1,hard,soft,orm",
    iterations: int = 3,
    n_prompts: int = 64,
    n_test: int = 100,
    keep_going: bool = True,
    progress: bool = True,
    **settings: Any,
) -> pd.DataFrame:
    """Run RAFT for every reward model of ``reward_models`` and return the tidy ``raft`` table.

    Inputs: the policy of 00_policy (``P.policy``), the first ``n_prompts`` RAFT prompts
    (``P.problem_file("raft")``) and the first ``n_test`` test problems (0 = all), one PRM checkpoint per
    rule from 03_train_prm (``random``/``oracle`` need none). ``settings`` are :class:`RaftSettings` fields.
    With ``keep_going`` a failing reward model does not stop the others; the failures are raised together
    at the end (a :class:`RaftError` naming each reward model and iteration) after all finished work is
    saved. Table columns: see :func:`raft_table`.
    """
    from erprm_core.evaluation import resolve_policy

    P = artifacts.paths(profile)
    start_policy = resolve_policy(profile)  # the 00 checkpoint, or the hub policy 00 recorded
    rewards = reward_paths(profile, reward_models)
    prompts = _take(P.problem_file("raft"), n_prompts, "RAFT prompts (n_prompts)", profile, "00_policy")
    test = _take(P.problem_file("test"), n_test, "test problems (n_test)", profile, "00_policy")
    unknown = set(settings) - set(RaftSettings.__dataclass_fields__)
    if unknown:
        raise TypeError(
            f"unknown RAFT setting(s) {sorted(unknown)}; known: {sorted(RaftSettings.__dataclass_fields__)}"
        )
    st = RaftSettings(**settings)
    st.check()
    base = baseline_record(start_policy, test, st, P.raft / BASELINE)
    records: list[dict[str, Any]] = []
    failures: list[str] = []
    for name, path in rewards.items():
        try:
            records += run_raft(
                name,
                path,
                start_policy=start_policy,
                prompts=prompts,
                test_problems=test,
                out_root=P.raft,
                iterations=iterations,
                settings=st,
                progress=progress,
            )
        except RaftError as exc:
            if not keep_going:
                raise
            log.error("%s", exc)
            failures.append(str(exc))
    if failures:
        raise RaftError("; ".join(failures))
    return raft_table(base, records)


def load_records(profile: str, reward_models: str | Sequence[str], iterations: int) -> list[dict[str, Any]]:
    """The finished records (baseline first, then each reward model's iterations 1..``iterations``)."""
    P = artifacts.paths(profile)
    out = []
    base = _read_record(P.raft / BASELINE / "record.json")
    if base is not None:
        out.append(base)
    for name in _names(reward_models):
        for it in range(1, iterations + 1):
            rec = _read_record(P.raft / name / f"iter_{it:02d}" / "record.json")
            if rec is not None:
                out.append(rec)
    return out


def raft_table(baseline: dict[str, Any] | None, records: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Tidy table: one row per (reward_model, iteration, metric) with ``value, ci_low, ci_high, n``.

    Metrics: ``greedy_accuracy`` (Wilson interval, n = test problems; the ``baseline`` row at iteration 0
    is the starting policy), ``greedy_gain`` (accuracy minus the baseline's on the same test problems,
    paired bootstrap interval), ``selected_outcome`` (correctness of the picked solutions, Wilson),
    ``sample_outcome`` (mean correctness of all samples, bootstrap over prompts) and ``oracle_outcome``
    (prompts with a correct eligible candidate, Wilson); the last three have n = prompts, a prompt without
    a pick counting as wrong.
    """
    rows = []
    if baseline is not None:
        rows.append(
            {
                "reward_model": BASELINE,
                "aggregation": "",
                "iteration": 0,
                "lr": float("nan"),
                "metric": "greedy_accuracy",
                "value": baseline["greedy_accuracy"],
                "ci_low": baseline["ci_low"],
                "ci_high": baseline["ci_high"],
                "n": baseline["n_test"],
            }
        )
    for rec in records:
        if rec["reward_model"] == BASELINE:
            continue
        head = {
            "reward_model": rec["reward_model"],
            "aggregation": rec["aggregation"],
            "iteration": rec["iteration"],
            "lr": rec["lr"],
        }
        rows.append(
            {
                **head,
                "metric": "greedy_accuracy",
                "value": rec["greedy_accuracy"],
                "ci_low": rec["ci_low"],
                "ci_high": rec["ci_high"],
                "n": rec["n_test"],
            }
        )
        if baseline is not None and len(baseline["eval_outcomes"]) == len(rec["eval_outcomes"]):
            gain = _paired(rec["eval_outcomes"], baseline["eval_outcomes"])
            rows.append(
                {
                    **head,
                    "metric": "greedy_gain",
                    "value": gain.diff,
                    "ci_low": gain.ci_low,
                    "ci_high": gain.ci_high,
                    "n": gain.n_problems,
                }
            )
        for metric in ("selected_outcome", "sample_outcome", "oracle_outcome"):
            value, low, high = rec[metric]
            rows.append(
                {
                    **head,
                    "metric": metric,
                    "value": value,
                    "ci_low": low,
                    "ci_high": high,
                    "n": rec["n_prompts"],
                }
            )
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def _paired(a: Sequence[int], b: Sequence[int]):
    from erprm_core.evaluation import paired_bootstrap_diff

    return paired_bootstrap_diff(a, b, seed=0)


PAIRED_COLUMNS = [
    "reward_model",
    "versus",
    "iteration",
    "diff",
    "ci_low",
    "ci_high",
    "p_value",
    "n",
    "n_better",
    "n_worse",
]


def raft_paired_table(records: Sequence[dict[str, Any]], reference_prefix: str = "er_") -> pd.DataFrame:
    """Paired greedy-accuracy differences on the identical test problems, per iteration: every reward model
    whose name starts with ``reference_prefix`` (the ER-PRMs) minus every other reward model.

    ``diff`` = accuracy(reward_model) - accuracy(versus) with a 95% bootstrap interval over problems and a
    sign-flip permutation p-value (:func:`erprm_core.evaluation.paired_bootstrap_diff`); ``n_better`` /
    ``n_worse``: problems only the reward_model's policy / only the other one solves.
    """
    runs = [r for r in records if r["reward_model"] != BASELINE]
    by_key = {(r["reward_model"], r["iteration"]): r for r in runs}
    names = list(dict.fromkeys(r["reward_model"] for r in runs))
    rows = []
    for ref in (n for n in names if n.startswith(reference_prefix)):
        for other in (n for n in names if n != ref):
            for (name, it), rec in sorted(by_key.items(), key=lambda kv: kv[0][1]):
                if name != ref or (other, it) not in by_key:
                    continue
                d = _paired(rec["eval_outcomes"], by_key[(other, it)]["eval_outcomes"])
                rows.append(
                    {
                        "reward_model": ref,
                        "versus": other,
                        "iteration": it,
                        "diff": d.diff,
                        "ci_low": d.ci_low,
                        "ci_high": d.ci_high,
                        "p_value": d.p_value,
                        "n": d.n_problems,
                        "n_better": d.n_a_better,
                        "n_worse": d.n_b_better,
                    }
                )
    return pd.DataFrame(rows, columns=PAIRED_COLUMNS)


def raft_audit(profile: str, reward_models: str | Sequence[str], iterations: int) -> pd.DataFrame:
    """Candidates and prompts by reason, per reward model and iteration (columns reward_model, iteration,
    reason, count, example): eligible, empty, truncated, unscored, some steps unscored, score-count
    mismatch, prompts without a candidate, picks decided by a tie-break, picks without a final answer."""
    rows = []
    for rec in load_records(profile, reward_models, iterations):
        for reason, count in rec.get("audit", {}).items():
            rows.append(
                {
                    "reward_model": rec["reward_model"],
                    "iteration": rec["iteration"],
                    "reason": reason,
                    "count": count,
                    "example": rec.get("audit_examples", {}).get(reason, ""),
                }
            )
    return pd.DataFrame(rows, columns=["reward_model", "iteration", "reason", "count", "example"])


def manifest_info(profile: str, reward_models: str | Sequence[str], iterations: int) -> dict[str, Any]:
    """What 05_rlhf_raft records in the manifest: iterations, reward models, token counts (shared samples
    counted once), SFT examples and steps."""
    records = load_records(profile, reward_models, iterations)
    runs = [r for r in records if r["reward_model"] != BASELINE]
    sample_tokens = {r["samples_dir"]: r["sample_tokens"] for r in runs}
    eval_tokens = sum(r.get("eval_tokens", 0) for r in records)
    return {
        "iterations": iterations,
        "reward_models": _names(reward_models),
        "finished_iterations": len(runs),
        "generated_tokens": int(sum(sample_tokens.values()) + eval_tokens),
        "sampled_tokens": int(sum(sample_tokens.values())),
        "eval_tokens": int(eval_tokens),
        "train_tokens": int(sum(r["train"].get("train_tokens", 0) for r in runs)),
        "sft_examples": int(sum(r["train"].get("n_examples", 0) for r in runs)),
        "sft_steps": int(sum(r["train"].get("global_steps", 0) for r in runs)),
    }


def plot_raft(table: pd.DataFrame, metric: str = "greedy_accuracy", ax: Any = None):
    """Greedy accuracy (or another ``metric``) per iteration with interval bars, one line per reward model;
    every line starts at the no-RLHF baseline (iteration 0), also drawn as a grey band."""
    import matplotlib.pyplot as plt

    from erprm_core import plotting

    if ax is None:
        _, ax = plt.subplots(figsize=(5.2, 3.8))
    fig = ax.figure
    rows = table[table["metric"] == metric]
    base = rows[rows["reward_model"] == BASELINE]
    methods = plotting.method_order(r for r in rows["reward_model"].unique() if r != BASELINE)
    if not base.empty:
        b = base.iloc[0]
        ax.axhspan(b["ci_low"], b["ci_high"], color="0.5", alpha=0.12, lw=0)
        ax.axhline(b["value"], color="0.4", ls="--", lw=1, label=plotting.method_label(BASELINE))
    width = 0.08
    for k, method in enumerate(methods):
        part = rows[rows["reward_model"] == method].sort_values("iteration")
        if not base.empty:
            part = pd.concat([base.assign(reward_model=method), part])
        dx = (k - (len(methods) - 1) / 2) * width
        err = np.vstack([part["value"] - part["ci_low"], part["ci_high"] - part["value"]])
        ax.errorbar(
            part["iteration"] + dx,
            part["value"],
            yerr=np.clip(err, 0, None),
            marker="o",
            ms=3,
            capsize=2,
            lw=1.2,
            color=plotting.method_colour(method),
            label=plotting.method_label(method),
        )
    ax.set_xlabel("RAFT iteration (0 = starting policy)")
    ax.set_ylabel(metric.replace("_", " "))
    iters = sorted(rows["iteration"].unique())
    if iters:
        ax.set_xticks([int(i) for i in iters])
    ax.legend(fontsize=7)
    return fig
