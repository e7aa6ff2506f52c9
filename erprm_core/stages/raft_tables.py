"""The tables of 05_rlhf_raft, read from the finished iteration records under ``runs/<profile>/raft``.

:func:`raft_table` (greedy accuracy, gain over the starting policy and selection quality per reward model and
iteration), :func:`raft_paired_table` (ER-PRM minus every other reward model on the same test problems),
:func:`raft_audit` (candidates and prompts by reason) and :func:`manifest_info` (token counts for the
manifest). Used by :mod:`erprm_core.stages.raft`; 06_figures reads the written ``raft`` table.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from erprm_core import stats
from erprm_core.raft import BASELINE
from erprm_core.running import artifacts
from erprm_core.running.config import parse_names

log = logging.getLogger(__name__)

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
    "family",
    "selection",
    "p_holm",
]


def reward_names(reward_models: str | Sequence[str]) -> list[str]:
    """The reward-model names of a comma list or sequence; empty or repeated names are errors."""
    names = parse_names(reward_models)
    if not names:
        raise ValueError("reward_models is empty: name at least one (e.g. 'er_1,hard,soft,orm')")
    if len(set(names)) != len(names):
        raise ValueError(f"reward_models lists a name twice: {names}")
    return names


def read_record(path: Path) -> dict[str, Any] | None:
    """An iteration record (``record.json``), or None when it is missing or corrupt (then it is redone)."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        log.warning("%s is corrupt: the iteration is redone", path)
        return None


def load_records(profile: str, reward_models: str | Sequence[str], iterations: int) -> list[dict[str, Any]]:
    """The finished records (baseline first, then each reward model's iterations 1..``iterations``)."""
    P = artifacts.paths(profile)
    out = []
    base = read_record(P.raft / BASELINE / "record.json")
    if base is not None:
        out.append(base)
    for name in reward_names(reward_models):
        for it in range(1, iterations + 1):
            rec = read_record(P.raft / name / f"iter_{it:02d}" / "record.json")
            if rec is not None:
                out.append(rec)
    return out


def _paired(a: Sequence[int], b: Sequence[int]) -> stats.PairedDiff:
    return stats.paired_bootstrap_diff(a, b, seed=0)


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


def raft_paired_table(records: Sequence[dict[str, Any]], reference_prefix: str = "er_") -> pd.DataFrame:
    """Paired greedy-accuracy differences on the identical test problems, per iteration: every reward model
    whose name starts with ``reference_prefix`` (the ER-PRMs) minus every other reward model.

    ``diff`` = accuracy(reward_model) - accuracy(versus) with a 95% bootstrap interval over problems and a
    sign-flip permutation p-value (:func:`erprm_core.stats.paired_bootstrap_diff`); ``n_better`` /
    ``n_worse``: problems only the reward_model's policy / only the other one solves. The comparisons of one
    reward model at one iteration form a ``family`` (fixed in advance by the design: ``selection``
    "prespecified"); ``p_holm`` is Holm's adjustment of ``p_value`` within it.
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
                        "family": f"iteration {it}: {ref} vs the other reward models",
                        "selection": "prespecified",
                    }
                )
    out = pd.DataFrame(rows, columns=PAIRED_COLUMNS[:-1])
    return out.assign(p_holm=stats.family_holm(out["p_value"], out["family"]))


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
        "reward_models": reward_names(reward_models),
        "finished_iterations": len(runs),
        "generated_tokens": int(sum(sample_tokens.values()) + eval_tokens),
        "sampled_tokens": int(sum(sample_tokens.values())),
        "eval_tokens": int(eval_tokens),
        "train_tokens": int(sum(r["train"].get("train_tokens", 0) for r in runs)),
        "sft_examples": int(sum(r["train"].get("n_examples", 0) for r in runs)),
        "sft_steps": int(sum(r["train"].get("global_steps", 0) for r in runs)),
    }
