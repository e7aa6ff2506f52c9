"""Stage 01_rollouts: solutions per training problem and graded Monte Carlo completions of every step prefix.

:func:`run_rollouts` runs :func:`erprm_core.rollouts.sample_solutions` and
:func:`erprm_core.rollouts.rollout_completions` over shards of problems (written atomically, resumable),
merges them into ``rollouts.jsonl`` and audits them; for the synthetic task ``arith`` every merged record also
gets its step-level ground truth (:func:`add_ground_truth`: ``first_error``, ``error_type``), which 02_labels
passes on. :func:`run` is the notebook's entry: it loads the
policy (and an optional separate completer), runs the rollouts, writes the tables ``rollouts_summary``,
``rollouts_audit`` and ``rollouts_prefixes`` and records the stage in the manifest.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from erprm_core import generation, io, rollouts
from erprm_core.running import artifacts, numerics
from erprm_core.running.workers import worker_count
from erprm_core.stages._common import StageConfig, record, repo_relative, resolve_policy, take_problems
from erprm_core.tasks import arith_truth

STAGE = "01_rollouts"


@dataclass(frozen=True)
class RolloutsConfig(StageConfig):
    """The knobs of 01_rollouts (the notebook's parameters cell)."""

    profile: str = "smoke"
    """results/<profile> and runs/<profile> folders to use"""
    seed: int = 0
    """base seed of this stage (per problem/solution/step/completion seeds derive from it)"""
    n_problems: int = 8
    """training problems to roll out (first n of the train_prm split; 0 for all)"""
    n_solutions: int = 2
    """solutions sampled per problem"""
    k: int = 4
    """completions per step prefix (the paper: 16)"""
    temperature: float = 1.0
    """sampling temperature of solutions and completions (the paper: 1.0)"""
    top_p: float = 1.0
    """nucleus sampling (the paper: 1.0)"""
    max_new_tokens: int = 128
    """token limit of a solution and of a completion (cut ones are audited)"""
    completer_name: str = ""
    """completer model: empty for the policy itself (pi_0), else a hub name or folder"""
    prompt_template: str = "plain"
    """policy prompt format: plain (tiny policy) or metamath"""
    backend: str = "hf"
    """sampling backend: hf (transformers, CPU/GPU) or vllm (optional extra, GPU)"""
    batch_size: int = 64
    """sequences decoded together"""
    shard_size: int = 8
    """problems per resumable shard"""
    device: str = "auto"
    """auto, cpu or cuda"""
    dtype: str = "auto"
    """auto (bf16 on a capable GPU, else fp32), float32, bfloat16, float16"""
    torch_threads: int = 0
    """CPU threads for torch (0: auto, the cores idle at the start)"""
    cpu_numerics: str = "portable"
    """CPU kernel paths: portable (pinned: the same bits on any x86-64 CPU with AVX2) or default"""
    vllm_memory: float = 0.0
    """vLLM gpu_memory_utilization per engine (0: 0.9, or 0.45 each with a completer)"""


@dataclass
class RolloutResult:
    """What :func:`run_rollouts` returns: the merged records, the audit and the compute accounting; :func:`run`
    adds the tables it writes (``summary``, ``prefixes``) and ``setup`` (what was rolled out, by which model)."""

    records: list[dict[str, Any]]
    audit: io.Audit
    stats: dict[str, Any] = field(default_factory=dict)
    summary: pd.DataFrame | None = None
    prefixes: pd.DataFrame | None = None
    setup: pd.DataFrame | None = None


def rollout_audit(records: Sequence[dict[str, Any]]) -> io.Audit:
    """Counts of rollout records by what went wrong (nothing is dropped; every record is kept).

    Reasons: ``solutions`` (all), ``solution_no_answer`` (no parseable final answer), ``solution_truncated``
    (cut at the token limit), ``solution_one_step`` (no prefix to complete), ``prefixes`` and
    ``completions`` (all), ``completion_truncated`` (completions cut at the token limit).
    """
    audit = io.Audit(STAGE)
    for rec in records:
        where = f"{rec['problem_id']}#{rec['sample_index']}"
        audit.count("solutions")
        if rec.get("pred") is None:
            audit.count("solution_no_answer", example=f"{where}: {' | '.join(rec['steps'])[-150:]}")
        if rec.get("truncated"):
            audit.count("solution_truncated", example=where)
        if not rec["steps"]:
            audit.count("solution_empty", example=where)
        elif len(rec["steps"]) == 1:
            audit.count("solution_one_step", example=f"{where}: {' | '.join(rec['steps'])}")
        n_prefix = len(rec["completion_rewards"])
        audit.count("prefixes", n_prefix)
        audit.count("completions", sum(len(r) for r in rec["completion_rewards"]))
        if rec.get("completions_truncated"):
            audit.count("completion_truncated", rec["completions_truncated"], example=where)
    return audit


def rollout_stats(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Token counts and accuracy figures of a rollout set (for the manifest and the notebook table)."""
    n = len(records)
    prefixes = [r for rec in records for r in rec["completion_rewards"]]
    return {
        "problems": len({rec["problem_id"] for rec in records}),
        "solutions": n,
        "solution_accuracy": sum(rec["outcome"] for rec in records) / n if n else float("nan"),
        "mean_steps": sum(len(rec["steps"]) for rec in records) / n if n else float("nan"),
        "prefixes": len(prefixes),
        "completions": sum(len(r) for r in prefixes),
        "completion_accuracy": (sum(map(sum, prefixes)) / sum(map(len, prefixes)))
        if prefixes
        else float("nan"),
        "solution_tokens": sum(rec["n_tokens"] for rec in records),
        "completion_tokens": sum(rec.get("completion_tokens", 0) for rec in records),
    }


def rollout_summary_table(stats: dict[str, Any]) -> pd.DataFrame:
    """Tidy ``metric, value`` table of :func:`rollout_stats` (wall time and this-run-only counts left out, so a
    resumed run and an uninterrupted one give the same table). Counts stay integers (shown and written as
    such, e.g. 1772893, not 1.77289e+06); rates keep 6 significant digits, written as every table's CSV
    writes them (``%.6g``: 0.0 as 0)."""

    def cell(v: Any) -> int | float:
        if isinstance(v, int | np.integer):
            return int(v)
        text = f"{float(v):.6g}"
        return int(text) if text.lstrip("-").isdigit() else float(text)

    kept = {k: v for k, v in stats.items() if k != "wall_s" and not k.startswith("computed_")}
    values = pd.Series([cell(v) for v in kept.values()], dtype=object)
    return pd.DataFrame({"metric": list(kept), "value": values})


def prefix_table(records: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """One row per completed prefix: ``problem_id, sample_index, step`` (1-based prefix length), ``n_steps``,
    ``outcome`` (of the whole solution), ``k``, ``n_correct`` and ``p`` (fraction of completions correct)."""
    rows = [
        {
            "problem_id": rec["problem_id"],
            "sample_index": rec["sample_index"],
            "step": i + 1,
            "n_steps": len(rec["steps"]),
            "outcome": rec["outcome"],
            "k": len(rewards),
            "n_correct": sum(rewards),
            "p": sum(rewards) / len(rewards),
        }
        for rec in records
        for i, rewards in enumerate(rec["completion_rewards"])
    ]
    cols = ["problem_id", "sample_index", "step", "n_steps", "outcome", "k", "n_correct", "p"]
    return pd.DataFrame(rows, columns=cols)


def add_ground_truth(records: Sequence[dict[str, Any]]) -> int:
    """Add ``first_error`` and ``error_type`` (:func:`erprm_core.tasks.arith_truth.first_error` of the
    question and steps; -1 / ``"none"`` when every step is right) to every record of task ``arith``, in place.

    Records of other tasks (no step-level ground truth) are left as they are. The new keys come after the
    existing ones, whose values do not change. Returns the number of records annotated.
    """
    n = 0
    for rec in records:
        if rec.get("task") == "arith":
            rec["first_error"], rec["error_type"] = arith_truth.first_error(rec["question"], rec["steps"])
            n += 1
    return n


def run_rollouts(
    out: artifacts.ProfilePaths | str,
    policy: Any,
    problems: Sequence[dict[str, Any]],
    n_solutions: int = 4,
    k: int = 8,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 128,
    seed: int = 0,
    shard_size: int = 16,
    batch_size: int = 64,
    prompt_template: str = "plain",
    backend: str = "hf",
    completer: Any = None,
    on_shard: Callable[[int], None] | None = None,
    workers: int = 1,
) -> RolloutResult:
    """Solutions, step-prefix completions, grading, shards, merge, audit.

    ``out`` is a profile name or its :class:`~erprm_core.running.artifacts.ProfilePaths`; ``policy`` and
    ``completer`` are samplers (:func:`erprm_core.generation.make_sampler` /
    :func:`~erprm_core.generation.load_sampler`); ``batch_size`` and ``backend`` name theirs in the shard
    fingerprint. Problems are processed in shards of ``shard_size`` under ``out.rollouts`` (atomic files; a
    rerun reuses finished shards and recomputes corrupt ones; a change of any parameter, problem set or model
    discards old shards). For each problem: ``n_solutions`` solutions from ``policy`` and, for each step
    prefix but the last, ``k`` completions from ``completer`` (default: the policy itself, pi_0). Every random
    draw is seeded per problem/sample/step, so an interrupted-and-resumed run writes the same
    ``rollouts.jsonl`` as an uninterrupted one. ``on_shard(index)`` is called after each computed shard.
    ``workers > 1`` computes shards in that many forked one-thread processes (HF samplers on the CPU only;
    the same records, :func:`erprm_core.running.workers.fork_map`).
    """
    paths = artifacts.paths(out) if isinstance(out, str) else out
    if not problems:
        raise ValueError("no problems to roll out")
    ids = [p["id"] for p in problems]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise ValueError(f"problem ids must be unique (seeds are per id); duplicated: {dup}")
    if shard_size < 1 or k < 1 or n_solutions < 1:
        raise ValueError(f"shard_size, k and n_solutions must be >= 1 (got {shard_size}, {k}, {n_solutions})")
    comp = policy if completer is None else completer
    settings = dict(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed,
                    batch_size=batch_size, prompt_template=prompt_template)  # fmt: skip
    fingerprint = {
        **settings,
        "n_solutions": n_solutions,
        "k": k,
        "shard_size": shard_size,
        "backend": backend,
        "problems": artifacts.digest(list(problems)),
        "policy": artifacts.fingerprint(policy),
        "completer": "policy" if completer is None else artifacts.fingerprint(comp),
    }
    artifacts.prepare_shard_folder(paths.rollouts, fingerprint)

    def compute(chunk: Sequence[dict[str, Any]], index: int) -> list[dict[str, Any]]:
        sols = rollouts.sample_solutions(policy, chunk, n_solutions, temperature, top_p, max_new_tokens, seed,
                                         prompt_template)  # fmt: skip
        by_id = {p["id"]: p for p in chunk}
        records = []
        for sol in sols:
            p = by_id[sol["problem_id"]]
            records.append({"problem_id": p["id"], "question": p["question"], "answer": p["answer"],
                            "task": p["task"], "sample_index": sol["sample_index"], "steps": sol["steps"],
                            "pred": sol["pred"], "outcome": sol["outcome"], "truncated": sol["truncated"],
                            "n_tokens": sol["n_tokens"]})  # fmt: skip
        comps = rollouts.rollout_completions(comp, records, k, temperature, top_p, max_new_tokens, seed,
                                             prompt_template)  # fmt: skip
        for rec, extra in zip(records, comps, strict=True):
            rec.update(extra)
        if on_shard is not None:
            on_shard(index)
        return records

    t0 = time.perf_counter()
    tallies = [policy.stats] if comp is policy else [policy.stats, comp.stats]
    records = artifacts.run_sharded(
        list(problems), shard_size, paths.rollouts, compute, rollouts.ROLLOUT_COLUMNS, "rollouts",
        workers=workers, tallies=tallies,
    )  # fmt: skip
    wall = time.perf_counter() - t0
    add_ground_truth(records)  # after the merge: the shards (and their random streams) stay as they were
    artifacts.atomic_write_jsonl(paths.rollouts_file, records)
    stats = rollout_stats(records)
    computed = {
        key: policy.stats[key] + (comp.stats[key] if comp is not policy else 0)
        for key in ("generated_tokens", "prompt_tokens", "forward_passes")
    }
    stats.update({f"computed_{key}": val for key, val in computed.items()}, wall_s=round(wall, 3))
    return RolloutResult(records, rollout_audit(records), stats)


def run(config: RolloutsConfig) -> RolloutResult:
    """Stage 01_rollouts: load the policy (and completer), roll out, write the tables and the manifest entry."""
    c = config
    P = artifacts.paths(c.profile)
    policy = resolve_policy(c.profile)  # names 00_policy when the policy is missing
    problems = take_problems(
        P.problem_file("train_prm"), c.n_problems, "PRM training problems", c.profile, "00_policy",
        strict=False, quiet=True,
    )  # fmt: skip
    numerics_info = numerics.configure(c.cpu_numerics, c.torch_threads)  # first: before any tensor operation
    torch_threads = numerics_info["torch_threads"]
    workers = worker_count(torch_threads, pinned=c.cpu_numerics != "default", backend=c.backend)
    memory = c.vllm_memory or (0.45 if c.completer_name else 0.0)
    policy_sampler = generation.load_sampler(policy, c.backend, c.device, c.dtype, c.batch_size, memory)
    completer = (
        generation.load_sampler(c.completer_name, c.backend, c.device, c.dtype, c.batch_size, memory)
        if c.completer_name
        else None
    )
    setup = pd.DataFrame({"problems": [len(problems)], "policy": [repo_relative(policy)],
                          "completer": [c.completer_name or "policy"], "backend": [c.backend]})  # fmt: skip
    res = run_rollouts(
        P, policy_sampler, problems, n_solutions=c.n_solutions, k=c.k, temperature=c.temperature, top_p=c.top_p,
        max_new_tokens=c.max_new_tokens, seed=c.seed, shard_size=c.shard_size, batch_size=c.batch_size,
        prompt_template=c.prompt_template, backend=c.backend, completer=completer, workers=workers,
    )  # fmt: skip
    res.summary = rollout_summary_table(res.stats)
    artifacts.write_table(res.summary, c.profile, "rollouts_summary")
    artifacts.write_table(res.audit.to_frame(), c.profile, "rollouts_audit")
    res.prefixes = prefix_table(res.records)
    artifacts.write_table(res.prefixes, c.profile, "rollouts_prefixes")
    res.setup = setup
    record(
        c.profile, STAGE, c, n_problems_used=len(problems), completer=c.completer_name or "policy",
        torch_threads=torch_threads, workers=workers, numerics=numerics_info, **res.stats,
    )  # fmt: skip
    return res
