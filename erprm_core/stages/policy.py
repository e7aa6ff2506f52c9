"""Stage 00_policy: the problem splits, the policy (tiny, trained from scratch, or a hub model), its evaluation.

:func:`run` writes ``runs/<profile>/problems/<split>.jsonl`` (:func:`write_problem_splits`), trains the
embedded tiny policy or loads a hub/local one (:func:`prepare_policy`), measures greedy accuracy and pass@k
on held-out problems (:func:`evaluate_policy`), writes the tables ``policy_training``, ``policy_eval``,
``policy_accuracy_by_steps`` and, for the synthetic task ``arith``, ``policy_errors`` (the ground-truth error
types of the greedy solutions, :func:`error_type_table`) and records the stage in the manifest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from erprm_core import evaluators, generation, models, rollouts, stats, tasks, training
from erprm_core.running import artifacts, numerics
from erprm_core.stages._common import StageConfig, record
from erprm_core.tasks import arith_truth
from erprm_core.tiny_lm import build_tiny_model, build_tokenizer

log = logging.getLogger(__name__)

STAGE = "00_policy"
WEIGHT_DECAY = 0.0
"""AdamW weight decay of the tiny policy's SFT (not a knob)."""
LOGGING_STEPS = 25
"""Optimizer steps between two logged losses of the tiny policy's SFT (not a knob)."""
PASS_AT_K = (1, 4, 16, 64)
"""The k of pass@k, up to ``n_samples``."""


@dataclass(frozen=True)
class PolicyConfig(StageConfig):
    """The knobs of 00_policy (the notebook's parameters cell)."""

    profile: str = "smoke"
    """results/<profile> and runs/<profile> folders to use"""
    seed: int = 0
    """seed of the problem generator, model initialisation, training and sampling"""
    task: str = "arith"
    """problem source: arith (generated), gsm8k or math (hub or local JSONL)"""
    source: str = ""
    """gsm8k/math only: local JSONL file or folder (empty: the hub dataset)"""
    n_train_sft: int = 3200
    """problems for the policy's supervised fine-tuning (train side)"""
    n_train_prm: int = 16
    """problems whose rollouts label the PRM training data (train side, 01_rollouts)"""
    n_raft: int = 32
    """RAFT prompts (train side, 05_rlhf_raft)"""
    n_test: int = 40
    """held-out test problems (best-of-N, RAFT evaluation, this notebook's evaluation)"""
    min_steps: int = 2
    """arith: fewest arithmetic steps per problem"""
    max_steps: int = 4
    """arith: most arithmetic steps per problem"""
    max_value: int = 99
    """arith: bound of every number (operands, intermediates, answers); tokenizer range"""
    max_operand: int = 10
    """arith: bound of the numbers added or subtracted"""
    max_factor: int = 5
    """arith: bound of the multipliers and divisors"""
    policy_name: str = ""
    """empty: train the tiny policy from scratch; else a hub name or folder to load"""
    hidden_size: int = 64
    """tiny model width"""
    num_layers: int = 2
    """tiny model depth (decoder layers)"""
    num_heads: int = 4
    """attention heads"""
    intermediate_size: int = 128
    """MLP width"""
    max_position_embeddings: int = 384
    """longest sequence (prompt + solution) in tokens"""
    epochs: float = 1.0
    """passes over the SFT problems"""
    train_steps: int = -1
    """optimizer steps (overrides epochs when > 0)"""
    lr: float = 0.01
    """peak learning rate (cosine schedule)"""
    batch_size: int = 16
    """sequences per optimizer step"""
    warmup_ratio: float = 0.03
    """share of steps for linear warm-up"""
    n_samples: int = 4
    """samples per problem at temperature 1.0 for pass@k (k in 1, 4, 16, 64 up to n_samples)"""
    n_passk_problems: int = 16
    """test problems used for pass@k (the first ones)"""
    temperature: float = 1.0
    """sampling temperature for pass@k"""
    max_new_tokens: int = 128
    """token limit of a generated solution"""
    eval_batch_size: int = 64
    """sequences per generation batch"""
    backend: str = "hf"
    """sampling backend: hf (CPU/GPU) or vllm (optional extra, GPU)"""
    prompt_template: str = "plain"
    """policy prompt format: plain (tiny policy) or metamath"""
    device: str = "auto"
    """auto, cpu or cuda"""
    dtype: str = "auto"
    """auto (bf16 on a GPU that has it, else float32), float32, bfloat16"""
    torch_threads: int = 0
    """CPU threads for torch (0: auto, the cores idle at the start)"""
    cpu_numerics: str = "portable"
    """CPU kernel paths: portable (pinned: the same bits on any x86-64 CPU with AVX2) or default"""


# ----------------------------------------------------------------------------------------------------
# Problems
# ----------------------------------------------------------------------------------------------------


def write_problem_splits(
    profile: str,
    task: str,
    sizes: dict[str, int],
    seed: int = 0,
    source: str | dict[str, str] | None = None,
    generator: dict[str, Any] | None = None,
) -> tuple[dict[str, list[dict[str, Any]]], pd.DataFrame]:
    """Write ``runs/<profile>/problems/<split>.jsonl`` for each split in ``sizes`` and return them.

    Train-side splits (``train_sft``, ``train_prm``, ``raft``) are consecutive, disjoint slices of one
    seeded train-side list (in that order); ``test`` comes from the test side. A size < 0 means "all"
    (hub tasks only). ``generator`` holds the difficulty knobs of a generated task (arith); hub tasks
    ignore it. Returns ``(problems by split, summary table)``; the summary has one row per split:
    split, n_problems, mean_steps (mean reference lines, the answer line excluded for arith), sha1
    (checksum of the ids, for the manifest).
    """
    unknown = sorted(set(sizes) - {*tasks.TRAIN_SPLITS, "test"})
    if unknown:
        raise ValueError(f"unknown split name(s) {unknown} in sizes; use {[*tasks.TRAIN_SPLITS, 'test']}")
    P = artifacts.paths(profile)
    kw = dict(generator or {}) if task == "arith" else {}
    out: dict[str, list[dict[str, Any]]] = {}
    train_names = [s for s in tasks.TRAIN_SPLITS if s in sizes]
    if train_names:
        if any(sizes[s] < 0 for s in train_names):
            if len(train_names) > 1 or task == "arith":
                raise ValueError("a train-side size < 0 ('all') is allowed only for one split of a hub task")
            total = None
        else:
            total = sum(sizes[s] for s in train_names)
        pool = tasks.load_problems(task, "train", total, seed, source, **kw)
        start = 0
        for name in train_names:
            stop = len(pool) if sizes[name] < 0 else start + sizes[name]
            out[name] = pool[start:stop]
            start = stop
    if "test" in sizes:
        n_test = sizes["test"]
        out["test"] = tasks.load_problems(task, "test", None if n_test < 0 else n_test, seed, source, **kw)
    rows = []
    for name, problems in out.items():
        artifacts.atomic_write_jsonl(P.problem_file(name), problems)
        steps = [
            p.get("n_steps", len([s for s in p.get("solution", "").splitlines() if s.strip()]))
            for p in problems
        ]
        digest = hashlib.sha1("\n".join(p["id"] for p in problems).encode()).hexdigest()
        rows.append(
            {
                "split": name,
                "n_problems": len(problems),
                "mean_steps": sum(steps) / len(steps) if steps else float("nan"),
                "sha1": digest,
            }
        )
    return out, pd.DataFrame(rows, columns=["split", "n_problems", "mean_steps", "sha1"])


# ----------------------------------------------------------------------------------------------------
# The policy: train the tiny one or load a hub/local one
# ----------------------------------------------------------------------------------------------------


@dataclass
class PolicyResult:
    """What :func:`prepare_policy` returns: the policy, where it lives, and what training did.

    ``source`` is the folder (tiny: ``runs/<profile>/policy``) or hub name that later stages load;
    ``log`` the loss per logged step (empty when nothing was trained); ``info`` the manifest entries.
    """

    model: Any
    tokenizer: Any
    source: str
    trained: bool
    log: pd.DataFrame
    info: dict[str, Any] = field(default_factory=dict)


def _load_hub_policy(P: artifacts.ProfilePaths, policy_name: str, device: str, dtype: str) -> PolicyResult:
    """Load ``policy_name`` and write nothing (a stale tiny policy of the profile is removed)."""
    model, tokenizer = models.load_causal_lm(policy_name, device=device, dtype=dtype)
    if P.policy.exists():  # a stale tiny policy would shadow the named one in later stages
        log.warning("removing %s: this profile now uses the policy %r", P.policy, policy_name)
        shutil.rmtree(P.policy)
    info = {
        "policy": policy_name,
        "policy_name": policy_name,  # read by stages._common.resolve_policy when runs/<profile>/policy is absent
        "trained": False,
        "n_parameters": models.count_parameters(model),
    }
    return PolicyResult(
        model,
        tokenizer,
        policy_name,
        False,
        pd.DataFrame(columns=["step", "epoch", "loss", "learning_rate"]),
        info,
    )


POLICY_INFO_FILE = "erprm_policy.json"  # written last into the policy folder: what it was trained from
POLICY_LOG_FILE = "policy_training.csv"
LOG_ATTRS = ("n_examples", "train_tokens", "global_steps", "n_truncated", "max_example_tokens")


def policy_key(train_problems: Sequence[dict[str, Any]], recipe: dict[str, Any]) -> str:
    """What decides the tiny policy's weights: the recipe, the training problems, the CPU numerics pins and
    the torch / transformers versions (not the host: under pinned numerics every host gives the same bits)."""
    import transformers

    pins = numerics.describe()["pins"]
    return artifacts.digest({"recipe": recipe, "problems": artifacts.digest(list(train_problems)), "pins": pins,
                             "torch": torch.__version__, "transformers": transformers.__version__})  # fmt: skip


def _finished_policy(P: artifacts.ProfilePaths, key: str) -> tuple[pd.DataFrame, float] | None:
    """The log and training wall time of the policy in ``runs/<profile>/policy`` when it was trained from
    ``key`` (:func:`policy_key`), else None."""
    info_file = P.policy / POLICY_INFO_FILE
    if not info_file.is_file() or json.loads(info_file.read_text()).get("key") != key:
        return None
    info = json.loads(info_file.read_text())
    train_log = pd.read_csv(P.policy / POLICY_LOG_FILE)
    train_log.attrs.update(info["attrs"])
    log.info("policy: %s was trained with this recipe, reused (delete the folder to retrain)", P.policy)
    return train_log, float(info["train_wall_s"])


def _train_tiny_policy(
    P: artifacts.ProfilePaths, train_problems: Sequence[dict[str, Any]], **recipe: Any
) -> tuple[pd.DataFrame, float]:
    """Build the tokenizer and the tiny model, train them into ``runs/<profile>/.policy.tmp``, then move the
    folder to ``runs/<profile>/policy``; a policy already there that was trained from the same recipe,
    problems, pins and versions (:func:`policy_key`) is reused instead, so a rerun of 00 after a code change
    elsewhere does not train again. Returns the loss log and the training wall time."""
    key = policy_key(train_problems, recipe)
    finished = _finished_policy(P, key)
    if finished is not None:
        return finished
    tokenizer = build_tokenizer(
        max_number=recipe["max_number"], model_max_length=recipe["max_position_embeddings"]
    )
    model = build_tiny_model(
        tokenizer,
        hidden_size=recipe["hidden_size"],
        num_layers=recipe["num_layers"],
        num_heads=recipe["num_heads"],
        intermediate_size=recipe["intermediate_size"],
        max_position_embeddings=recipe["max_position_embeddings"],
        seed=recipe["seed"],
    )
    tmp = P.run / ".policy.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    start = time.perf_counter()
    train_log = training.train_policy_sft(
        model,
        tokenizer,
        train_problems,
        tmp,
        epochs=recipe["epochs"],
        max_steps=recipe["max_steps"],
        lr=recipe["lr"],
        batch_size=recipe["batch_size"],
        seed=recipe["seed"],
        max_length=recipe["max_position_embeddings"],
        warmup_ratio=recipe["warmup_ratio"],
        weight_decay=recipe["weight_decay"],
        logging_steps=recipe["logging_steps"],
        prompt_template=recipe["prompt_template"],
    )
    wall = time.perf_counter() - start
    (tmp / "training_args.bin").unlink(missing_ok=True)  # not needed to load; holds run-specific paths
    train_log[["step", "epoch", "loss", "learning_rate"]].to_csv(tmp / POLICY_LOG_FILE, index=False)
    attrs = {k: int(train_log.attrs[k]) for k in LOG_ATTRS}
    info = {"key": key, "attrs": attrs, "train_wall_s": round(wall, 1)}
    (tmp / POLICY_INFO_FILE).write_text(json.dumps(info, indent=1, sort_keys=True))
    shutil.rmtree(P.policy, ignore_errors=True)
    tmp.replace(P.policy)
    return train_log, wall


def _policy_info(
    P: artifacts.ProfilePaths, loaded: Any, tok: Any, train_log: pd.DataFrame, wall: float
) -> dict:
    """The manifest entries of a trained tiny policy."""
    return {
        "policy": str(P.policy.relative_to(artifacts.runs_root().parent))
        if P.policy.is_relative_to(artifacts.runs_root().parent)
        else str(P.policy),
        "policy_name": "",
        "trained": True,
        "n_parameters": models.count_parameters(loaded),
        "vocab_size": len(tok),
        "train_examples": train_log.attrs["n_examples"],
        "train_tokens": train_log.attrs["train_tokens"],
        "train_steps": train_log.attrs["global_steps"],
        "train_truncated": train_log.attrs["n_truncated"],
        "max_example_tokens": train_log.attrs["max_example_tokens"],
        "train_wall_s": round(wall, 1),
        "final_loss": float(train_log["loss"].iloc[-1]) if len(train_log) else None,
    }


def prepare_policy(
    profile: str,
    train_problems: Sequence[dict[str, Any]] | None = None,
    *,
    policy_name: str = "",
    seed: int = 0,
    max_number: int = 999,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    intermediate_size: int = 256,
    max_position_embeddings: int = 256,
    epochs: float = 1.0,
    max_steps: int = -1,
    lr: float = 3e-3,
    batch_size: int = 32,
    warmup_ratio: float = 0.03,
    weight_decay: float = 0.0,
    logging_steps: int = 25,
    device: str = "auto",
    dtype: str = "auto",
    prompt_template: str = "plain",
) -> PolicyResult:
    """The embedded tiny policy, trained from scratch, or a hub/local policy.

    ``policy_name == ""``: build the word-level tokenizer (numbers ``0..max_number``) and a Llama model of
    the given size, train it on ``train_problems`` with :func:`erprm_core.training.train_policy_sft`, save
    it atomically to ``runs/<profile>/policy`` and load it back through
    :func:`erprm_core.models.load_causal_lm` (the same loader as any hub model; this is the model returned).
    Otherwise load ``policy_name`` (hub id or folder) and write nothing: later stages load it by that name.
    ``info`` holds the manifest entries (policy source, parameter count, seed, train tokens/examples/steps,
    train wall time, final loss).
    """
    P = artifacts.paths(profile)
    if policy_name:
        return _load_hub_policy(P, policy_name, device, dtype)

    if not train_problems:
        raise ValueError("train_problems is empty: the tiny policy needs SFT problems (split train_sft)")
    train_log, wall = _train_tiny_policy(
        P, train_problems, seed=seed, max_number=max_number, hidden_size=hidden_size, num_layers=num_layers,
        num_heads=num_heads, intermediate_size=intermediate_size, max_position_embeddings=max_position_embeddings,
        epochs=epochs, max_steps=max_steps, lr=lr, batch_size=batch_size, warmup_ratio=warmup_ratio,
        weight_decay=weight_decay, logging_steps=logging_steps, prompt_template=prompt_template,
    )  # fmt: skip
    loaded, tok = models.load_causal_lm(P.policy, device=device, dtype=dtype)
    info = _policy_info(P, loaded, tok, train_log, wall)
    return PolicyResult(loaded, tok, str(P.policy), True, train_log, info)


# ----------------------------------------------------------------------------------------------------
# Evaluation on held-out problems
# ----------------------------------------------------------------------------------------------------


@dataclass
class PolicyEval:
    """What :func:`evaluate_policy` returns (tables for the notebook, records for inspection)."""

    table: pd.DataFrame  # tidy: metric, k, value, ci_low, ci_high
    by_steps: pd.DataFrame  # n_steps, n_problems, accuracy, ci_low, ci_high (greedy)
    greedy: list[dict[str, Any]]
    samples: list[dict[str, Any]]
    generated_tokens: int


def evaluate_policy(
    model,
    tokenizer,
    problems: Sequence[dict[str, Any]],
    *,
    n_samples: int = 64,
    ks: Sequence[int] = PASS_AT_K,
    n_sample_problems: int | None = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 256,
    seed: int = 0,
    batch_size: int = 64,
    prompt_template: str = "plain",
    backend: str = "hf",
) -> PolicyEval:
    """Greedy accuracy (Wilson 95% interval) and pass@k at ``temperature`` on held-out ``problems``.

    Greedy decoding runs on every problem; ``n_samples`` samples per problem run on the first
    ``n_sample_problems`` (all when None) and give the unbiased pass@k estimator for each k in ``ks``
    (k > n_samples are left out) with a bootstrap 95% interval over problems. The table also has
    ``sample_accuracy`` (mean sample correctness, interval over problems) and ``truncated`` rates. ``by_steps`` breaks greedy
    accuracy down by the problems' ``n_steps`` (or number of reference lines when absent).
    """
    if not problems:
        raise ValueError("no problems to evaluate")
    common = dict(max_new_tokens=max_new_tokens, prompt_template=prompt_template)
    greedy = rollouts.sample_solutions(
        generation.make_sampler(model, tokenizer, backend, batch_size), problems, 1, temperature=0.0,
        seed=seed, **common,
    )  # fmt: skip
    outcome = np.array([r["outcome"] for r in greedy])
    acc, lo, hi = stats.accuracy_ci(outcome)
    rows = [
        {"metric": "greedy_accuracy", "k": 1, "value": acc, "ci_low": lo, "ci_high": hi},
        {"metric": "greedy_truncated", "k": 1, "value": float(np.mean([r["truncated"] for r in greedy]))},
    ]
    subset = list(problems[: n_sample_problems or len(problems)])
    samples: list[dict[str, Any]] = []
    if n_samples > 0 and subset:
        samples = rollouts.sample_solutions(
            generation.make_sampler(model, tokenizer, backend, batch_size), subset, n_samples,
            temperature=temperature, top_p=top_p, seed=seed, **common,
        )  # fmt: skip
        correct = np.array([r["outcome"] for r in samples]).reshape(len(subset), n_samples)
        n_correct = correct.sum(axis=1)
        for k in [k for k in ks if k <= n_samples]:
            per_problem = np.asarray(evaluators.pass_at_k(n_correct, n_samples, k), dtype=float)
            mean, lo, hi = stats.bootstrap_ci(per_problem, seed=seed)
            rows.append({"metric": "pass_at_k", "k": k, "value": mean, "ci_low": lo, "ci_high": hi})
        mean, lo, hi = stats.bootstrap_ci(correct.mean(axis=1), seed=seed)  # samples of a problem: one unit
        rows.append({"metric": "sample_accuracy", "k": 1, "value": mean, "ci_low": lo, "ci_high": hi})
        rows.append(
            {"metric": "sample_truncated", "k": 1, "value": float(np.mean([r["truncated"] for r in samples]))}
        )
    table = pd.DataFrame(rows, columns=["metric", "k", "value", "ci_low", "ci_high"])

    steps = np.array([p.get("n_steps", len(p.get("solution", "").splitlines())) for p in problems])
    by = []
    for s in sorted(set(steps.tolist())):
        a, lo, hi = stats.accuracy_ci(outcome[steps == s])
        by.append(
            {"n_steps": s, "n_problems": int((steps == s).sum()), "accuracy": a, "ci_low": lo, "ci_high": hi}
        )
    by_steps = pd.DataFrame(by, columns=["n_steps", "n_problems", "accuracy", "ci_low", "ci_high"])
    tokens = sum(r["n_tokens"] for r in greedy) + sum(r["n_tokens"] for r in samples)
    return PolicyEval(table, by_steps, greedy, samples, tokens)


def error_type_table(error_types: Sequence[str]) -> pd.DataFrame:
    """Counts of ground-truth error types (:data:`erprm_core.tasks.arith_truth.ERROR_TYPES`, in that order,
    zeros included; ``none`` = every step right): ``error_type, count, share`` (share of all solutions)."""
    error_types = list(error_types)
    unknown = sorted(set(error_types) - set(arith_truth.ERROR_TYPES))
    if unknown:
        raise ValueError(f"unknown error types {unknown}; expected {arith_truth.ERROR_TYPES}")
    total = len(error_types)
    rows = [
        {
            "error_type": kind,
            "count": (n := sum(e == kind for e in error_types)),
            "share": n / total if total else np.nan,
        }
        for kind in arith_truth.ERROR_TYPES
    ]
    return pd.DataFrame(rows, columns=["error_type", "count", "share"])


def greedy_error_types(problems: Sequence[dict[str, Any]], solutions: Sequence[dict[str, Any]]) -> list[str]:
    """The ground-truth error type (:func:`erprm_core.tasks.arith_truth.first_error`) of each of ``arith``
    ``solutions`` (records with ``problem_id`` and ``steps``, e.g. :attr:`PolicyEval.greedy`), in order."""
    by_id = {p["id"]: p for p in problems}
    return [arith_truth.first_error(by_id[s["problem_id"]], s["steps"])[1] for s in solutions]


def sample_examples(
    problems: Sequence[dict[str, Any]],
    samples: Sequence[dict[str, Any]],
    n_problems: int = 3,
    per_problem: int = 2,
) -> pd.DataFrame:
    """A few sampled solutions next to the reference (for display): problem, answer, sample text, outcome."""
    by_id = {p["id"]: p for p in problems}
    rows = []
    for pid in list(dict.fromkeys(r["problem_id"] for r in samples))[:n_problems]:
        for r in [r for r in samples if r["problem_id"] == pid][:per_problem]:
            rows.append(
                {
                    "problem_id": pid,
                    "question": by_id[pid]["question"],
                    "answer": by_id[pid]["answer"],
                    "sample_index": r["sample_index"],
                    "sample": r["text"],
                    "pred": r["pred"],
                    "outcome": r["outcome"],
                }
            )
    return pd.DataFrame(
        rows, columns=["problem_id", "question", "answer", "sample_index", "sample", "pred", "outcome"]
    )


# ----------------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------------


@dataclass
class PolicyStageResult:
    """What :func:`run` returns: everything 00_policy shows."""

    problems: dict[str, list[dict[str, Any]]]
    split_summary: pd.DataFrame
    sizes: dict[str, int]
    policy: PolicyResult
    evaluation: PolicyEval
    examples: pd.DataFrame
    numerics: dict[str, Any] = field(default_factory=dict)
    errors: pd.DataFrame | None = None


def _split_sizes(config: PolicyConfig) -> dict[str, int]:
    sizes = {"train_sft": config.n_train_sft, "train_prm": config.n_train_prm, "raft": config.n_raft,
             "test": config.n_test}  # fmt: skip
    if config.policy_name:
        sizes.pop("train_sft")  # a hub policy is not fine-tuned here
    return sizes


def _generator(config: PolicyConfig) -> dict[str, int]:
    return dict(min_steps=config.min_steps, max_steps=config.max_steps, max_value=config.max_value,
                max_operand=config.max_operand, max_factor=config.max_factor)  # fmt: skip


def run(config: PolicyConfig) -> PolicyStageResult:
    """Stage 00_policy: problem splits, the policy, its evaluation; writes the tables and the manifest entry.

    The config's ``train_steps`` and ``max_value`` feed :func:`prepare_policy`'s ``max_steps`` and
    ``max_number`` (the config's ``max_steps`` is the arith difficulty).
    """
    c = config
    numerics_info = numerics.configure(c.cpu_numerics, c.torch_threads)  # first: before any tensor operation
    torch_threads = numerics_info["torch_threads"]
    sizes = _split_sizes(c)
    ks = [k for k in PASS_AT_K if k <= c.n_samples]
    problems, split_summary = write_problem_splits(
        c.profile, c.task, sizes, seed=c.seed, source=c.source or None, generator=_generator(c)
    )
    policy = prepare_policy(
        c.profile, problems.get("train_sft"), policy_name=c.policy_name, seed=c.seed, max_number=c.max_value,
        hidden_size=c.hidden_size, num_layers=c.num_layers, num_heads=c.num_heads,
        intermediate_size=c.intermediate_size, max_position_embeddings=c.max_position_embeddings, epochs=c.epochs,
        max_steps=c.train_steps, lr=c.lr, batch_size=c.batch_size, warmup_ratio=c.warmup_ratio,
        weight_decay=WEIGHT_DECAY, logging_steps=LOGGING_STEPS, device=c.device, dtype=c.dtype,
        prompt_template=c.prompt_template,
    )  # fmt: skip
    artifacts.write_table(
        policy.log[["step", "epoch", "loss", "learning_rate"]], c.profile, "policy_training"
    )
    evaluation = evaluate_policy(
        policy.model, policy.tokenizer, problems["test"], n_samples=c.n_samples, ks=ks,
        n_sample_problems=c.n_passk_problems, temperature=c.temperature, max_new_tokens=c.max_new_tokens,
        seed=c.seed, batch_size=c.eval_batch_size, prompt_template=c.prompt_template, backend=c.backend,
    )  # fmt: skip
    artifacts.write_table(evaluation.table, c.profile, "policy_eval")
    artifacts.write_table(evaluation.by_steps, c.profile, "policy_accuracy_by_steps")
    errors = None
    if c.task == "arith":  # the other tasks have no step-level ground truth
        errors = error_type_table(greedy_error_types(problems["test"], evaluation.greedy))
        artifacts.write_table(errors, c.profile, "policy_errors")
    examples = sample_examples(problems["test"], evaluation.samples, n_problems=3, per_problem=2)
    record(
        c.profile, STAGE, c, split_sizes=sizes, torch_threads=torch_threads, numerics=numerics_info,
        split_checksums=dict(zip(split_summary["split"], split_summary["sha1"], strict=True)),
        eval_generated_tokens=evaluation.generated_tokens, **policy.info,
    )  # fmt: skip
    return PolicyStageResult(
        problems, split_summary, sizes, policy, evaluation, examples, numerics_info, errors
    )
