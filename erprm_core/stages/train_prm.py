"""Stage 03_train_prm: one PRM per label rule from the same base model and recipe, and held-out checks.

:func:`train` is the training half (also what ``erprm train-prm`` runs, under ``accelerate launch`` too):
read the labels file, pick the rules (:func:`select_rules`), split problems into train / held-out
(:func:`split_heldout`) and train one PRM per rule (:func:`train_prm_rules`; finished checkpoints are
skipped). :func:`run` is the notebook's entry: training, then the held-out evaluation
(:func:`evaluate_prm_rules`), the tables ``prm_training``, ``prm_audit``, ``prm_eval``,
``prm_calibration``, ``prm_min_position`` and, for the synthetic task ``arith`` (which has a step-level
ground truth), ``prm_truth`` (:func:`truth_metrics`: within-problem ranking and ProcessBench's first-error
F1, with intervals; their values are also appended to ``prm_eval``), and the manifest entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from erprm_core import io, labels, processbench, stats, training
from erprm_core.prm import ProcessRewardModel
from erprm_core.running import artifacts, numerics
from erprm_core.running.config import parse_names
from erprm_core.stages._common import StageConfig, record
from erprm_core.stages.processbench_eval import first_error_f1, threshold_sweep
from erprm_core.tasks import arith_truth

log = logging.getLogger(__name__)

STAGE = "03_train_prm"
LABEL_RECORD_COLUMNS = ["problem_id", "question", "steps", "outcome", "labels"]


@dataclass(frozen=True)
class TrainPRMConfig(StageConfig):
    """The knobs of 03_train_prm (the notebook's parameters cell)."""

    profile: str = "smoke"
    """results/<profile> and runs/<profile> folders to use"""
    seed: int = 0
    """training seed, the same for every rule"""
    rules: str = "all"
    """label rules to train: "all" (every rule in the labels file) or a comma list, e.g. "er_1,soft,hard,orm\""""
    base_model: str = ""
    """base of every PRM: empty for the 00_policy checkpoint, else a hub name or local folder"""
    heldout_fraction: float = 0.2
    """share of problems (by id hash) kept out of training for the held-out checks"""
    epochs: float = 2.0
    """training epochs per PRM (the paper: 1)"""
    lr: float = 1e-3
    """peak learning rate (the paper: 5e-7 for an 8B model)"""
    batch_size: int = 8
    """sequences per device per optimizer step"""
    grad_accum: int = 1
    """gradient accumulation steps (global batch: batch_size x grad_accum x devices)"""
    max_length: int = 256
    """token limit of a formatted solution; tags beyond it lose their label (audited)"""
    lr_scheduler: str = "cosine"
    """learning-rate schedule (transformers name)"""
    warmup_ratio: float = 0.0
    """share of the steps used for linear warm-up"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    gradient_checkpointing: bool = False
    """recompute activations to save memory (multi-GPU runs)"""
    dtype: str = "float32"
    """weights dtype of the base model during training"""
    retrain: bool = False
    """retrain rules whose checkpoint is already complete"""
    scoring: str = "two_token"
    """held-out step score: two_token (softmax over " +"/" -") or full_vocab"""
    score_batch_size: int = 32
    """solutions per scoring forward pass"""
    device: str = "auto"
    """device for held-out scoring: auto, cpu or cuda (training: the Trainer's choice)"""
    torch_threads: int = 0
    """CPU threads for torch (0: auto, the cores idle at the start)"""
    cpu_numerics: str = "portable"
    """CPU kernel paths: portable (pinned: the same bits on any x86-64 CPU with AVX2) or default"""

    def recipe(self) -> dict[str, Any]:
        """The keyword arguments of :func:`erprm_core.training.train_prm` (the same for every rule)."""
        return dict(epochs=self.epochs, lr=self.lr, batch_size=self.batch_size, grad_accum=self.grad_accum,
                    max_length=self.max_length, seed=self.seed, lr_scheduler=self.lr_scheduler,
                    warmup_ratio=self.warmup_ratio, weight_decay=self.weight_decay,
                    gradient_checkpointing=self.gradient_checkpointing, dtype=self.dtype)  # fmt: skip


@dataclass
class TrainPRMResult:
    """What :func:`train` returns (rules, records, training tables); :func:`run` adds the held-out tables."""

    rules: list[str]
    train: list[dict[str, Any]]
    heldout: list[dict[str, Any]]
    log: pd.DataFrame
    audit: pd.DataFrame
    runs: pd.DataFrame
    base_model: str
    metrics: pd.DataFrame | None = None
    calibration: pd.DataFrame | None = None
    min_position: pd.DataFrame | None = None
    scores: pd.DataFrame | None = None
    scoring: pd.DataFrame | None = None
    numerics: dict[str, Any] = field(default_factory=dict)
    truth: pd.DataFrame | None = None


# ----------------------------------------------------------------------------------------------------
# Rules and the held-out split
# ----------------------------------------------------------------------------------------------------


def select_rules(records: Sequence[dict[str, Any]], rules: str | Sequence[str] = "all") -> list[str]:
    """The label rules to train: ``"all"`` = every rule in the labels file (soft, ER by eta, hard, ORM
    order), or a comma list / sequence, each checked against the file (unknown -> ValueError naming them)."""
    if not records:
        raise ValueError("no labelled records: nothing to choose rules from")
    available = set(records[0].get("labels") or {})
    for rec in records[1:]:
        available &= set(rec.get("labels") or {})
    names = parse_names(rules)
    if names == ["all"]:
        return labels.method_order(available)
    unknown = [r for r in names if r not in available]
    if unknown or not names:
        raise ValueError(
            f"rules {unknown or names} not in the labels file; available: {labels.method_order(available)}"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"rules lists a rule twice: {names}")
    return names


def heldout_fraction_of(problem_id: str, salt: str = "erprm-heldout") -> float:
    """A number in [0, 1) fixed by the problem id (SHA-256; the same in every process and Python version)."""
    digest = hashlib.sha256(f"{salt}|{problem_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2.0**64


def split_heldout(
    records: Sequence[dict[str, Any]], heldout_fraction: float, salt: str = "erprm-heldout"
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, held-out) by problem id: a problem's rollouts all go to held-out when
    ``heldout_fraction_of(problem_id) < heldout_fraction``; deterministic, independent of record order.

    With ``heldout_fraction > 0`` and at least two problems, both sides get at least one problem (the one
    with the smallest / largest hash value moves over), so small profiles always have something to check.
    """
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    u = {str(r["problem_id"]): heldout_fraction_of(str(r["problem_id"]), salt) for r in records}
    held_ids = {pid for pid, v in u.items() if v < heldout_fraction}
    if heldout_fraction > 0 and len(u) >= 2:
        if not held_ids:
            held_ids = {min(u, key=u.get)}
        elif len(held_ids) == len(u):
            held_ids.discard(max(u, key=u.get))
    train = [r for r in records if str(r["problem_id"]) not in held_ids]
    held = [r for r in records if str(r["problem_id"]) in held_ids]
    return train, held


# ----------------------------------------------------------------------------------------------------
# Training, one PRM per rule
# ----------------------------------------------------------------------------------------------------


def prm_checkpoint_complete(folder: str | Path) -> bool:
    """True when ``folder`` holds a PRM that :func:`~erprm_core.training.train_prm` finished saving (its info
    file is written last)."""
    folder = Path(folder)
    return (folder / training.PRM_INFO_FILE).is_file() and (folder / "config.json").is_file()


def label_entropy(records: Sequence[dict[str, Any]], rule: str) -> float:
    """Mean binary entropy of ``rule``'s step labels over the labelled steps of ``records``: the floor of the
    soft-label cross-entropy a PRM is trained on (0 for hard and ORM labels, above 0 for soft and ER ones),
    so training curves of different rules compare as loss minus floor."""
    values = [v for r in records for v in (r["labels"].get(rule) or []) if v is not None]
    return stats.binary_entropy(values)


def train_prm_rules(
    base_model: str | Path,
    records: Sequence[dict[str, Any]],
    rules: Sequence[str],
    output_dir_for: Callable[[str], Any],
    *,
    retrain: bool = False,
    **recipe: Any,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """One PRM per rule, all from ``base_model`` with the same recipe and seed.

    ``output_dir_for(rule)`` gives each PRM's folder (e.g. ``artifacts.paths(profile).prm``). A rule whose
    checkpoint is complete (:func:`prm_checkpoint_complete`) is skipped unless
    ``retrain``; its stored log and audit are read back, so the returned tables are the same as after an
    uninterrupted run. ``recipe`` goes to :func:`erprm_core.training.train_prm`. Returns ``(log, audit,
    runs)``: the loss log (rule, step, epoch, loss, loss_floor, learning_rate, grad_norm; ``loss_floor`` is
    :func:`label_entropy`, the lowest loss the rule's labels allow), the audit (rule, reason,
    count, example) and one row per rule (rule, trained, n_examples, labelled_tags, train_tokens, tag_id,
    good_id, bad_id, train_runtime_s, tokens_per_s).
    """
    logs, audits, runs = [], [], []
    for rule in io.progress(list(rules), desc="PRMs", unit="rule"):
        folder = Path(output_dir_for(rule))
        if prm_checkpoint_complete(folder) and not retrain:
            log.info("PRM %s: complete checkpoint in %s, skipped (retrain=True to redo)", rule, folder)
            info = json.loads((folder / training.PRM_INFO_FILE).read_text())
            log_df = pd.read_csv(folder / training.PRM_LOG_FILE)
            audit_df = pd.read_csv(folder / training.PRM_AUDIT_FILE, keep_default_na=False)
            run = {
                "rule": rule,
                "trained": False,
                "train_runtime_s": float("nan"),
                "tokens_per_s": float("nan"),
            }
        else:
            log_df = training.train_prm(base_model, None, records, rule, folder, **recipe)
            info = log_df.attrs
            audit_df = pd.DataFrame(log_df.attrs["audit"])
            run = {
                "rule": rule,
                "trained": True,
                "train_runtime_s": info["train_runtime_s"],
                "tokens_per_s": info["tokens_per_s"],
            }
        run.update({k: info[k] for k in ("n_examples", "labelled_tags", "train_tokens")})
        run.update({k: info["tokens"][k] for k in ("tag_id", "good_id", "bad_id")})
        log_df = log_df.assign(rule=rule, loss_floor=label_entropy(records, rule))
        log_df.attrs = {}
        logs.append(log_df)
        audits.append(audit_df.assign(rule=rule))
        runs.append(run)
    log_cols = ["rule", "step", "epoch", "loss", "loss_floor", "learning_rate", "grad_norm"]
    audit_cols = ["rule", "stage", "reason", "count", "example"]
    return (
        pd.concat(logs, ignore_index=True)[log_cols] if logs else pd.DataFrame(columns=log_cols),
        pd.concat(audits, ignore_index=True)[audit_cols] if audits else pd.DataFrame(columns=audit_cols),
        pd.DataFrame(runs),
    )


def train(config: TrainPRMConfig) -> TrainPRMResult:
    """The training half of 03_train_prm for ``config.profile`` (what ``erprm train-prm`` runs).

    Reads the labels file (02_labels), picks ``config.rules`` (:func:`select_rules`), splits problems into
    train / held-out (:func:`split_heldout`), and trains one PRM per rule from ``config.base_model`` ("" =
    the profile's policy checkpoint) into ``paths(profile).prm(rule)`` with :func:`train_prm_rules`
    (complete checkpoints skipped unless ``config.retrain``). The held-out tables of the result are empty.
    """
    c = config
    P = artifacts.paths(c.profile)
    base = c.base_model or artifacts.require(P.policy, "00_policy", c.profile, "policy checkpoint")
    labels_file = artifacts.require(P.labels_file, "02_labels", c.profile, "step labels")
    records = artifacts.read_jsonl(labels_file, LABEL_RECORD_COLUMNS)
    rule_list = select_rules(records, c.rules)
    train_records, heldout = split_heldout(records, c.heldout_fraction)
    if not train_records:
        raise ValueError(
            f"heldout_fraction={c.heldout_fraction} leaves no training problem ({len(records)} records)"
        )
    log_df, audit, runs = train_prm_rules(
        base, train_records, rule_list, P.prm, retrain=c.retrain, **c.recipe()
    )
    return TrainPRMResult(rule_list, train_records, heldout, log_df, audit, runs, str(base))


# ----------------------------------------------------------------------------------------------------
# Held-out evaluation
# ----------------------------------------------------------------------------------------------------


def heldout_step_scores(
    model: ProcessRewardModel, records: Sequence[dict[str, Any]], rule: str, batch_size: int = 32
) -> pd.DataFrame:
    """One row per held-out step: rule, problem_id, sample_index, step, n_steps, score, label (of ``rule``,
    NaN when unlabelled), outcome, and the hard label (NaN when the file has none)."""
    scores = model.score_batch([r["question"] for r in records], [r["steps"] for r in records], batch_size)
    rows = []
    for rec, ss in zip(records, scores, strict=True):
        own = rec["labels"].get(rule) or [None] * len(ss)
        hard = rec["labels"].get("hard") or [None] * len(ss)
        for i, s in enumerate(ss):
            rows.append(
                {
                    "rule": rule,
                    "problem_id": rec["problem_id"],
                    "sample_index": rec.get("sample_index", 0),
                    "step": i,
                    "n_steps": len(ss),
                    "score": s,
                    "label": np.nan if own[i] is None else float(own[i]),
                    "hard_label": np.nan if hard[i] is None else float(hard[i]),
                    "outcome": int(rec["outcome"]),
                }
            )
    return pd.DataFrame(rows)


def _solution_frame(scores: pd.DataFrame) -> pd.DataFrame:
    """Per solution: last-step score, min score, relative position of the min, first dead step."""
    rows = []
    for (rule, pid, si), g in scores.groupby(["rule", "problem_id", "sample_index"], sort=False):
        g = g.sort_values("step")
        s = g["score"].to_numpy()
        ok = ~np.isnan(s)
        if not ok.any():
            continue
        argmin = int(np.nanargmin(s))
        dead = np.flatnonzero(g["hard_label"].to_numpy() == 0.0)
        rows.append(
            {
                "rule": rule,
                "problem_id": pid,
                "sample_index": si,
                "outcome": int(g["outcome"].iloc[0]),
                "n_steps": len(s),
                "last": float(s[ok][-1]),
                "min": float(np.nanmin(s)),
                "argmin": argmin,
                "rel_argmin": argmin / (len(s) - 1) if len(s) > 1 else np.nan,
                "first_dead": int(dead[0]) if dead.size else -1,
            }
        )
    return pd.DataFrame(rows)


def _min_position_rows(rule: str, sr: pd.DataFrame, edges: np.ndarray, position_bins: int) -> list[dict]:
    """Histogram rows of the relative position of the min step score, per outcome (solutions of >= 2 steps)."""
    rows = []
    multi = sr[sr["n_steps"] > 1]
    for outcome in (0, 1):
        rel = multi[multi["outcome"] == outcome]["rel_argmin"].to_numpy()
        idx = np.clip(np.searchsorted(edges, rel, side="right") - 1, 0, position_bins - 1)
        count = np.bincount(idx, minlength=position_bins)
        for b in range(position_bins):
            rows.append(
                {
                    "rule": rule,
                    "outcome": outcome,
                    "bin": b,
                    "bin_low": edges[b],
                    "bin_high": edges[b + 1],
                    "count": int(count[b]),
                    "fraction": float(count[b] / count.sum()) if count.sum() else np.nan,
                }
            )
    return rows


def heldout_metrics(scores: pd.DataFrame, n_bins: int = 10, position_bins: int = 5) -> dict[str, Any]:
    """Tables of the held-out evaluation from :func:`heldout_step_scores` rows (several rules allowed).

    Returns ``{"metrics", "calibration", "min_position"}``:
    metrics (rule, metric, value, n): ``brier`` and ``ece`` of step scores against the rule's own labels,
    ``auroc_last`` / ``auroc_min`` (last-step / min score against the outcome), ``mean_score``,
    ``cross_entropy`` of the step scores against the rule's labels (the training loss, on held-out steps) and
    ``excess_cross_entropy`` (that minus its floor, :func:`erprm_core.stats.excess_cross_entropy`: 0 is a
    perfect fit for every rule), ``argmin_at_first_dead_step`` (incorrect solutions: the min falls on the first step whose hard label
    is 0, i.e. the first step after which no completion reached the answer);
    calibration (rule, bin, bin_low, bin_high, mean_pred, mean_target, count, ci_low, ci_high: the interval
    of ``mean_target`` resampling problems);
    min_position (rule, outcome, bin, bin_low, bin_high, count, fraction): where in the solution
    (relative position 0 = first step, 1 = last) the minimum step score falls, solutions of >= 2 steps.
    """
    metric_rows, calib, positions = [], [], []
    sols = _solution_frame(scores)
    edges = np.linspace(0.0, 1.0, position_bins + 1)
    for rule in scores["rule"].unique():
        g = scores[(scores["rule"] == rule) & scores["score"].notna()]
        lab = g[g["label"].notna()]
        if len(lab):
            metric_rows.append((rule, "brier", stats.brier_score(lab["score"], lab["label"]), len(lab)))
            metric_rows.append(
                (rule, "ece", stats.expected_calibration_error(lab["score"], lab["label"], n_bins), len(lab))
            )
            ce, floor = stats.excess_cross_entropy(lab["score"], lab["label"])
            metric_rows.append((rule, "cross_entropy", ce, len(lab)))
            metric_rows.append((rule, "excess_cross_entropy", ce - floor, len(lab)))
            calib.append(
                stats.calibration_bins(lab["score"], lab["label"], n_bins, lab["problem_id"]).assign(
                    rule=rule
                )
            )
        metric_rows.append((rule, "mean_score", float(g["score"].mean()), len(g)))
        sr = sols[sols["rule"] == rule]
        if len(sr):
            metric_rows.append((rule, "auroc_last", stats.auroc(sr["last"], sr["outcome"]), len(sr)))
            metric_rows.append((rule, "auroc_min", stats.auroc(sr["min"], sr["outcome"]), len(sr)))
            wrong = sr[(sr["outcome"] == 0) & (sr["first_dead"] >= 0)]
            if len(wrong):
                hit = float((wrong["argmin"] == wrong["first_dead"]).mean())
                metric_rows.append((rule, "argmin_at_first_dead_step", hit, len(wrong)))
        positions += _min_position_rows(rule, sr, edges, position_bins)
    metrics = pd.DataFrame(metric_rows, columns=["rule", "metric", "value", "n"])
    calib_cols = [
        "rule",
        "bin",
        "bin_low",
        "bin_high",
        "mean_pred",
        "mean_target",
        "count",
        "ci_low",
        "ci_high",
    ]
    calibration = (
        pd.concat(calib, ignore_index=True)[calib_cols] if calib else pd.DataFrame(columns=calib_cols)
    )
    return {"metrics": metrics, "calibration": calibration, "min_position": pd.DataFrame(positions)}


# ----------------------------------------------------------------------------------------------------
# Held-out checks against the ground truth (task arith)
# ----------------------------------------------------------------------------------------------------

TRUTH_COLUMNS = [
    "rule",
    "metric",
    "aggregation",
    "threshold",
    "threshold_source",
    "value",
    "ci_low",
    "ci_high",
    "n",
]
TRUTH_METRICS = ("within_problem_pairwise", "first_error_f1", "error_acc", "correct_acc")
PAPER_THRESHOLD = 0.5
"""ProcessBench's threshold: a step scored below it is the predicted first error."""


def record_first_errors(records: Sequence[dict[str, Any]]) -> dict[tuple[Any, Any], int]:
    """``{(problem_id, sample_index): first_error}`` of the records with a ground truth: the stored
    ``first_error`` (02_labels writes it for ``arith``), else :func:`erprm_core.tasks.arith_truth.first_error`
    for an ``arith`` record; records of other tasks are left out."""
    out = {}
    for rec in records:
        key = (rec["problem_id"], rec.get("sample_index", 0))
        if "first_error" in rec:
            out[key] = int(rec["first_error"])
        elif rec.get("task") == "arith":
            out[key] = arith_truth.first_error(rec["question"], rec["steps"])[0]
    return out


def choose_threshold(step_scores: Sequence[Sequence[float]], truth: Sequence[int]) -> float:
    """The threshold of :data:`~erprm_core.stages.processbench_eval.DEFAULT_THRESHOLDS` with the highest
    first-error F1 of ``step_scores`` against ``truth`` (ties: the one nearest 0.5). A rule's labels have
    their own mean (soft labels sit lower than hard ones), so one fixed threshold favours some rules: 03
    chooses each rule's threshold on its held-out (validation) problems and 07 applies it to the test pool."""
    sweep = pd.DataFrame(threshold_sweep(step_scores, truth)).dropna(subset=["f1"])
    if sweep.empty:
        return PAPER_THRESHOLD
    best = sweep.assign(_d=(sweep["threshold"] - PAPER_THRESHOLD).abs())
    return float(best.sort_values(["f1", "_d"], ascending=[False, True], kind="stable")["threshold"].iloc[0])


def first_error_rows(
    rule: str, problems: Sequence[Any], step_scores: Sequence[Sequence[float]], truth: Sequence[int],
    threshold: float, source: str, n_boot: int = 2000, seed: int = 0,
) -> list[tuple]:  # fmt: skip
    """The :data:`TRUTH_COLUMNS` rows ``first_error_f1``, ``error_acc`` and ``correct_acc`` of one rule at
    ``threshold``: every interval resamples whole problems (``problems[i]`` is solution i's problem).
    Solutions whose prediction hinges on an unscored step are left out."""
    preds = [processbench.first_error(s, threshold) for s in step_scores]
    keep = [i for i, p in enumerate(preds) if p is not None]
    p_, t_, g_ = ([seq[i] for i in keep] for seq in (preds, truth, problems))
    f1 = first_error_f1(p_, t_, n_boot=n_boot, seed=seed, groups=g_)
    rows = [(rule, "first_error_f1", "", threshold, source, f1["f1"], f1["f1_low"], f1["f1_high"], f1["n"])]
    for metric, is_error in (("error_acc", True), ("correct_acc", False)):
        sub = [i for i, t in enumerate(t_) if (t != -1) == is_error]
        hits = [float(p_[i] == t_[i]) if is_error else float(p_[i] == -1) for i in sub]
        ci = stats.cluster_mean_ci(hits, [g_[i] for i in sub], n_boot, seed) if sub else (math.nan,) * 3
        rows.append((rule, metric, "", threshold, source, *ci, len(sub)))
    return rows


def truth_metrics(
    scores: pd.DataFrame,
    records: Sequence[dict[str, Any]],
    n_boot: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """Held-out checks of every rule's PRM against the ground truth (:data:`TRUTH_COLUMNS`, 95% intervals,
    each resampling whole problems: solutions of one problem are not independent).

    ``scores``: :func:`heldout_step_scores` rows; ``records``: the scored label records (their
    ``first_error``, :func:`record_first_errors`). Per rule, over the solutions with a ground truth:
    ``within_problem_pairwise`` (``aggregation`` min, last for the ORM: the rule's headline aggregation):
    the mean over problems with both outcomes of :func:`erprm_core.stats.within_problem_pairwise`, ``n`` problems;
    ``first_error_f1``: ProcessBench's F1 of the first step scored below ``threshold``
    (:func:`erprm_core.processbench.first_error`) against the true first error, ``n`` solutions, with its two
    accuracies ``error_acc`` / ``correct_acc`` (:func:`first_error_rows`), at the paper's threshold 0.5
    (``threshold_source`` "paper") and at the rule's threshold chosen on these held-out problems
    (:func:`choose_threshold`, "validation"), the one 07 applies to the test pool. A solution that stops
    after right steps without an answer line has its first error at ``len(steps)``, which no step score can
    name. Empty when no record has a ground truth.
    """
    truth = record_first_errors(records)
    if not truth:
        return pd.DataFrame(columns=TRUTH_COLUMNS)
    known = scores[[key in truth for key in zip(scores["problem_id"], scores["sample_index"], strict=True)]]
    sols = _solution_frame(known)
    rows = []
    for rule in known["rule"].unique():
        sr = sols[sols["rule"] == rule]
        how = "last" if rule == "orm" else "min"
        shares = stats.within_problem_pairwise(sr["problem_id"], sr["outcome"], sr[how])
        pair = (
            stats.bootstrap_ci(shares.to_numpy(), n_boot=n_boot, seed=seed)
            if len(shares)
            else (math.nan,) * 3
        )
        rows.append((rule, "within_problem_pairwise", how, math.nan, "", *pair, len(shares)))
        groups = list(known[known["rule"] == rule].groupby(["problem_id", "sample_index"], sort=False))
        problems = [key[0] for key, _ in groups]
        step_scores = [g.sort_values("step")["score"].tolist() for _, g in groups]
        firsts = [truth[key] for key, _ in groups]
        for threshold, source in (
            (PAPER_THRESHOLD, "paper"),
            (choose_threshold(step_scores, firsts), "validation"),
        ):
            rows += first_error_rows(rule, problems, step_scores, firsts, threshold, source, n_boot, seed)
    return pd.DataFrame(rows, columns=TRUTH_COLUMNS)


def evaluate_prm_rules(
    prm_folders: dict[str, Any],
    records: Sequence[dict[str, Any]],
    *,
    scoring: str = "two_token",
    batch_size: int = 32,
    device: str = "auto",
    n_bins: int = 10,
) -> dict[str, Any]:
    """Score held-out ``records`` with the PRM of every rule (``{rule: checkpoint folder}``) and compute
    :func:`heldout_metrics`. Adds ``"scores"`` (every step score) and ``"scoring"`` (forward passes and
    tokens per rule); the metrics table gets a ``scoring`` column (the mode is part of every result). Where the
    records have a ground truth (task ``arith``), ``"truth"`` is :func:`truth_metrics` and its values are
    appended to the metrics table (rule, metric, value, n; after the other rows); else ``"truth"`` is None."""
    if not records:
        raise ValueError("no held-out records to evaluate on (raise heldout_fraction or add problems)")
    frames, usage = [], []
    for rule, folder in io.progress(list(prm_folders.items()), desc="held-out scoring", unit="PRM"):
        model = ProcessRewardModel.from_pretrained(folder, scoring=scoring, device=device)
        frames.append(heldout_step_scores(model, records, rule, batch_size))
        usage.append(
            {
                "rule": rule,
                "forward_passes": model.forward_passes,
                "tokens": model.tokens_scored,
                "unscored_steps": int(model.audit.counts.get("steps_unscored", 0)),
            }
        )
        del model
    scores = pd.concat(frames, ignore_index=True)
    out = heldout_metrics(scores, n_bins=n_bins)
    truth = truth_metrics(scores, records)
    out["truth"] = truth if len(truth) else None
    if len(truth):
        at_paper = truth[truth["threshold_source"] != "validation"]  # prm_truth holds both thresholds
        out["metrics"] = pd.concat(
            [out["metrics"], at_paper[["rule", "metric", "value", "n"]]], ignore_index=True
        )
    out["metrics"] = out["metrics"].assign(scoring=scoring)
    out["scores"] = scores
    out["scoring"] = pd.DataFrame(usage)
    return out


# ----------------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------------


def run(config: TrainPRMConfig) -> TrainPRMResult:
    """Stage 03_train_prm: train one PRM per rule, evaluate them on held-out problems; write the tables and
    the manifest entry."""
    c = config
    P = artifacts.paths(c.profile)
    if not c.base_model:
        artifacts.require(P.policy, "00_policy", c.profile, "policy checkpoint (the base of every PRM)")
    artifacts.require(P.labels_file, "02_labels", c.profile, "step labels")
    numerics_info = numerics.configure(c.cpu_numerics, c.torch_threads)  # first: before any tensor operation
    torch_threads = numerics_info["torch_threads"]
    res = train(c)
    res.numerics = numerics_info
    artifacts.write_table(res.log, c.profile, "prm_training")
    artifacts.write_table(res.audit, c.profile, "prm_audit")
    ev = evaluate_prm_rules({r: P.prm(r) for r in res.rules}, res.heldout, scoring=c.scoring,
                            batch_size=c.score_batch_size, device=c.device)  # fmt: skip
    res.metrics, res.calibration, res.min_position = ev["metrics"], ev["calibration"], ev["min_position"]
    res.scores, res.scoring, res.truth = ev["scores"], ev["scoring"], ev["truth"]
    artifacts.write_table(res.metrics, c.profile, "prm_eval")
    if res.truth is not None:  # arith only: other tasks have no step-level ground truth
        artifacts.write_table(res.truth, c.profile, "prm_truth")
    artifacts.write_table(res.calibration, c.profile, "prm_calibration")
    artifacts.write_table(res.min_position, c.profile, "prm_min_position")
    record(
        c.profile, STAGE, c, rules=res.rules, base_model=res.base_model, torch_threads=torch_threads,
        numerics=numerics_info, n_train_records=len(res.train), n_heldout_records=len(res.heldout),
        train_tokens=int(res.runs["train_tokens"].sum()), scored_tokens=int(res.scoring["tokens"].sum()),
        scoring_forward_passes=int(res.scoring["forward_passes"].sum()),
    )  # fmt: skip
    return res
