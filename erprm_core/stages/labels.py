"""Stage 02_labels: step labels for every rule (ER for an eta grid, soft, hard, ORM) from ONE rollouts file.

:func:`run_labels` reads the rollouts (:func:`read_rollouts`, checked record by record), labels every step
with :func:`stepwise_labels` and writes ``labels.jsonl`` (with each solution's ground-truth ``first_error``
and ``error_type`` for the synthetic task ``arith``, :func:`ground_truth`). :func:`run` is the notebook's
entry: it also writes the tables ``labels_audit``, ``label_stats``, ``label_distribution`` and, for ``arith``,
``label_quality`` (:func:`label_quality_table`: how well each rule's labels find the steps before the first
error), picks a worked example by a stated rule (:func:`pick_worked_example`, shown with its ground truth by
:func:`worked_example_table`) and records the stage in the manifest. :func:`eta_explorer` redraws the example
and the label distribution for other etas (a slider in `make lab`, a static figure elsewhere).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from erprm_core import io, labels, rollouts, stats
from erprm_core.report import figures, style
from erprm_core.running import artifacts
from erprm_core.running.config import parse_eta_grid
from erprm_core.stages._common import StageConfig, record
from erprm_core.tasks import arith_truth

STAGE = "02_labels"
LABEL_COLUMNS = ("problem_id", "question", "steps", "outcome", "labels")


@dataclass(frozen=True)
class LabelsConfig(StageConfig):
    """The knobs of 02_labels (the notebook's parameters cell)."""

    profile: str = "smoke"
    """results/<profile> and runs/<profile> folders to use"""
    etas: str = "0,0.1,0.5,1,2,5,10,inf"
    """eta grid, comma-separated (0 is the soft label, inf the hard label)"""
    rollouts_file: str = ""
    """rollouts file to label (empty: this profile's runs/<profile>/rollouts.jsonl)"""


@dataclass
class LabelResult:
    """What :func:`run_labels` returns: the stepwise label records, their audit and the rule names; :func:`run`
    adds the tables it writes (``stats``, ``distribution``), the eta grid and the worked example."""

    records: list[dict[str, Any]]
    audit: io.Audit
    rules: list[str]
    rollouts: list[dict[str, Any]] = field(default_factory=list)
    eta_grid: list[float] = field(default_factory=list)
    stats: pd.DataFrame | None = None
    distribution: pd.DataFrame | None = None
    example: dict[str, Any] | None = None
    example_table: pd.DataFrame | None = None
    quality: pd.DataFrame | None = None

    def stats_by_rule(self, decimals: int = 4) -> pd.DataFrame:
        """The ``stats`` table wide, as 02_labels shows it: one row per rule (in rule order), one column per
        metric, rounded to ``decimals``; ``n_labels`` is a count, shown as an integer."""
        wide = (
            self.stats.pivot(index="rule", columns="metric", values="value").loc[self.rules].round(decimals)
        )
        return wide.astype({"n_labels": "Int64"}) if "n_labels" in wide else wide


def stepwise_labels(
    completion_rewards: list[list[float]], outcome: float, etas: list[float]
) -> dict[str, list[float | None]]:
    """Labels of every step of one solution, for each eta in ``etas`` plus the ORM rule.

    ``completion_rewards[i]`` holds the k graded completions of the prefix ending at step i, for every step
    but the last; the last step gets the solution's true ``outcome`` under every rule. The ORM rule labels
    only the last step (earlier entries are None, i.e. no training target).
    """
    n_steps = len(completion_rewards) + 1
    out: dict[str, list[float | None]] = {}
    for eta in etas:
        vals: list[float | None] = [labels.er_label(r, eta) for r in completion_rewards]
        out[labels.rule_name(eta)] = [*vals, float(outcome)]
    out["orm"] = [None] * (n_steps - 1) + [float(outcome)]
    return out


def read_rollouts(path: Path | str) -> list[dict[str, Any]]:
    """Read a rollouts file, checking every record's columns and shapes (errors name file and line)."""
    path = Path(path)
    records = artifacts.read_jsonl(path, rollouts.ROLLOUT_COLUMNS)
    with path.open(encoding="utf-8") as fh:
        line_numbers = [n for n, line in enumerate(fh, start=1) if line.strip()]
    for lineno, rec in zip(line_numbers, records, strict=True):
        steps, rewards = rec["steps"], rec["completion_rewards"]
        if not isinstance(steps, list) or not isinstance(rewards, list):
            raise io.ArtifactError(f"{path}:{lineno}: 'steps' and 'completion_rewards' must be lists")
        if steps and len(rewards) != len(steps) - 1:
            raise io.ArtifactError(
                f"{path}:{lineno}: {len(steps)} steps need {len(steps) - 1} completion lists, got {len(rewards)}"
            )
        if rec["outcome"] not in (0, 1):
            raise io.ArtifactError(f"{path}:{lineno}: outcome must be 0 or 1, got {rec['outcome']!r}")
    return records


def ground_truth(rec: dict[str, Any]) -> tuple[int, str] | None:
    """``(first_error, error_type)`` of a rollout or label record: the stored values (01_rollouts adds them
    for ``arith``), else :func:`erprm_core.tasks.arith_truth.first_error` for a record of task ``arith``
    (rollouts written before the fields existed); None for other tasks (no step-level ground truth)."""
    if "first_error" in rec:
        return int(rec["first_error"]), str(rec["error_type"])
    if rec.get("task") == "arith":
        return arith_truth.first_error(rec["question"], rec["steps"])
    return None


def label_records(
    rollouts: Sequence[dict[str, Any]], etas: Sequence[float], audit: io.Audit | None = None
) -> list[dict[str, Any]]:
    """Stepwise labels of every rollout for every eta (plus ``orm``), with :func:`stepwise_labels`.

    One output record per rollout with at least one step: ``problem_id, sample_index, question, answer,
    task, steps, outcome, labels: {rule: [label per step]}`` (one label per step, the last = the outcome;
    the ORM rule labels only the last step, others are None), then ``first_error`` and ``error_type`` when
    the solution has a ground truth (:func:`ground_truth`; task ``arith`` only). Rollouts without any step cannot be labelled:
    they are counted in ``audit`` as ``skipped_no_steps``; a rollout whose completion lists do not match its
    steps raises ValueError naming it.
    """
    audit = audit if audit is not None else io.Audit(STAGE)
    out = []
    for rec in rollouts:
        where = f"{rec['problem_id']}#{rec.get('sample_index')}"
        if not rec["steps"]:
            audit.count("skipped_no_steps", example=where)
            continue
        if len(rec["completion_rewards"]) != len(rec["steps"]) - 1:
            raise ValueError(
                f"rollout {where}: {len(rec['steps'])} steps but {len(rec['completion_rewards'])} completion lists"
            )
        audit.count("labelled_solutions")
        audit.count("labelled_steps", len(rec["steps"]))
        labelled = {
            "problem_id": rec["problem_id"],
            "sample_index": rec.get("sample_index"),
            "question": rec["question"],
            "answer": rec.get("answer"),
            "task": rec.get("task"),
            "steps": rec["steps"],
            "outcome": int(rec["outcome"]),
            "labels": stepwise_labels(rec["completion_rewards"], rec["outcome"], list(etas)),
        }
        truth = ground_truth(rec)
        if truth is not None:
            labelled["first_error"], labelled["error_type"] = truth
        out.append(labelled)
    return out


def run_labels(
    out: artifacts.ProfilePaths | str, etas: Sequence[float], rollouts_file: Path | str | None = None
) -> LabelResult:
    """Read ONE rollouts file, label every step for every rule, write the labels file.

    ``rollouts_file`` defaults to the profile's ``rollouts.jsonl`` (an error names 01_rollouts when missing);
    the output goes atomically to the profile's ``labels.jsonl``. Every rule comes from the same rollouts:
    only the label rule changes.
    """
    paths = artifacts.paths(out) if isinstance(out, str) else out
    source = Path(rollouts_file) if rollouts_file else paths.rollouts_file
    artifacts.require(source, "01_rollouts", paths.profile, "rollouts")
    audit = io.Audit(STAGE)
    rollout_records = read_rollouts(source)
    records = label_records(rollout_records, etas, audit)
    artifacts.atomic_write_jsonl(paths.labels_file, records)
    rules = list(records[0]["labels"]) if records else []
    return LabelResult(records, audit, rules, rollout_records)


def label_statistics(records: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Tidy table of label statistics per rule: ``rule, eta, metric, value``.

    Metrics over the labelled steps of each rule (the ORM: last steps only): ``n_labels``, ``mean``, ``std``,
    ``share_zero`` (label 0), ``share_one`` (label 1), ``share_between`` (strictly inside (0, 1)),
    ``mean_first_step`` (label of the first step), and ``mean_gap_to_soft`` (mean label minus the soft label
    on the same steps: how far a rule moves labels up from the Monte Carlo mean).
    """
    rules = list(records[0]["labels"]) if records else []
    soft = np.array([v for r in records for v in r["labels"].get("soft", [])], dtype=float)
    rows = []
    for rule in rules:
        vals = [v for r in records for v in r["labels"][rule] if v is not None]
        arr = np.array(vals, dtype=float)
        first = np.array(
            [r["labels"][rule][0] for r in records if r["labels"][rule][0] is not None], dtype=float
        )
        metrics = {
            "n_labels": float(arr.size),
            "mean": arr.mean() if arr.size else np.nan,
            "std": arr.std() if arr.size else np.nan,
            "share_zero": (arr == 0).mean() if arr.size else np.nan,
            "share_one": (arr == 1).mean() if arr.size else np.nan,
            "share_between": ((arr > 0) & (arr < 1)).mean() if arr.size else np.nan,
            "mean_first_step": first.mean() if first.size else np.nan,
        }
        if rule != "orm" and soft.size == arr.size and soft.size:
            metrics["mean_gap_to_soft"] = float((arr - soft).mean())
        eta = labels.rule_eta(rule, default=float("nan"))
        rows += [{"rule": rule, "eta": eta, "metric": m, "value": float(v)} for m, v in metrics.items()]
    return pd.DataFrame(rows, columns=["rule", "eta", "metric", "value"])


def label_distribution(records: Sequence[dict[str, Any]], bins: int = 10) -> pd.DataFrame:
    """Tidy histogram of step labels per rule: ``rule, bin, lo, hi, count, share`` (bins of [0, 1]).

    0 and 1 get bins of their own (``bin`` "0" and "1"), the open interval (0, 1) is split in ``bins``
    equal bins, so the soft rule's spread and the hard rule's all-or-nothing labels are both visible.
    """
    edges = np.linspace(0.0, 1.0, bins + 1)
    rules = list(records[0]["labels"]) if records else []
    rows = []
    for rule in rules:
        arr = np.array([v for r in records for v in r["labels"][rule] if v is not None], dtype=float)
        total = max(arr.size, 1)
        rows.append({"rule": rule, "bin": "0", "lo": 0.0, "hi": 0.0, "count": int((arr == 0).sum())})
        inner = arr[(arr > 0) & (arr < 1)]
        counts, _ = np.histogram(inner, bins=edges)
        for lo, hi, c in zip(edges[:-1], edges[1:], counts, strict=True):
            rows.append({"rule": rule, "bin": f"({lo:.1f},{hi:.1f})", "lo": lo, "hi": hi, "count": int(c)})
        rows.append({"rule": rule, "bin": "1", "lo": 1.0, "hi": 1.0, "count": int((arr == 1).sum())})
        for row in rows[-(bins + 2) :]:
            row["share"] = row["count"] / total
    return pd.DataFrame(rows, columns=["rule", "bin", "lo", "hi", "count", "share"])


QUALITY_COLUMNS = ["rule", "metric", "value", "ci_low", "ci_high", "n", "steps_remaining"]


def truth_steps(records: Sequence[dict[str, Any]], rule: str) -> pd.DataFrame:
    """One row per labelled step of ``rule`` in records with a ground truth: ``problem_id, label, truth``
    (1 for a step before the solution's first error, 0 at or after it) and ``steps_remaining`` (steps after
    this one; 0 for the last step). Records without ``first_error`` and unlabelled steps (None) are left out.
    """
    rows = []
    for rec in records:
        if "first_error" not in rec:
            continue
        n, first = len(rec["steps"]), int(rec["first_error"])
        cut = n if first < 0 else first
        for i, value in enumerate(rec["labels"][rule]):
            if value is not None:
                rows.append((str(rec["problem_id"]), float(value), int(i < cut), n - 1 - i))
    return pd.DataFrame(rows, columns=["problem_id", "label", "truth", "steps_remaining"])


def label_quality_table(records: Sequence[dict[str, Any]], n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """How well each rule's step labels separate the steps before the first error from the others.

    For every rule of the label records (which need ``first_error``, see :func:`ground_truth`), metric
    ``auroc_vs_truth``: the AUROC of the rule's labels (:func:`truth_steps`) for "step before the first
    error" (positive) against "at or after it", over all labelled steps (``steps_remaining`` "all") and by
    the number of steps that follow the step ("0", "1", ...), with a 95% bootstrap interval over problems
    (:func:`erprm_core.stats.problem_bootstrap_auroc`) and ``n`` labelled steps (groups with one class only get NaN); and
    ``brier_vs_truth``, the mean squared difference between label and truth on the same steps
    (:func:`erprm_core.stats.problem_bootstrap_brier`): AUROC only sees how a rule ranks steps, and every ER label ranks them
    as the soft label does (it is increasing in p), while the Brier score also sees how far the labels are
    from the truth, which eta moves.
    Columns: :data:`QUALITY_COLUMNS`. Empty when no record has a ground truth.
    """
    truthful = [r for r in records if "first_error" in r]
    rows = []
    for rule in list(truthful[0]["labels"]) if truthful else []:
        steps = truth_steps(truthful, rule)
        groups = [("all", steps)]
        groups += [(str(k), g) for k, g in steps.groupby("steps_remaining", sort=True)]
        for remaining, g in groups:
            for metric, fn in (
                ("auroc_vs_truth", stats.problem_bootstrap_auroc),
                ("brier_vs_truth", stats.problem_bootstrap_brier),
            ):
                value, low, high = fn(g["label"], g["truth"], g["problem_id"], n_boot, seed)
                rows.append(
                    {"rule": rule, "metric": metric, "value": value, "ci_low": low, "ci_high": high,
                     "n": len(g), "steps_remaining": remaining}
                )  # fmt: skip
    return pd.DataFrame(rows, columns=QUALITY_COLUMNS)


def pick_worked_example(rollouts: Sequence[dict[str, Any]], min_steps: int = 3) -> dict[str, Any]:
    """The worked example of 02_labels, by a fixed rule (the notebook states it too): the first rollout, in
    file order, whose ground-truth first error (:func:`ground_truth`) is at step 2 or later and before the
    answer line, and which has a right step whose completions are mixed (0 < p < 1). So the example has right
    steps, a wrong step whose completions show what each rule does with it, and a right step where the rules
    disagree. Tasks without a ground truth, or rollouts where no solution qualifies: the first with >=
    ``min_steps`` steps and a mixed prefix; failing that, the one with the most steps."""
    if not rollouts:
        raise ValueError("no rollouts to pick a worked example from")

    def mixed(rewards: list[float]) -> bool:
        return 0 < sum(rewards) < len(rewards)

    for rec in rollouts:
        truth = ground_truth(rec)
        if truth is None or not 1 <= truth[0] < len(rec["steps"]) - 1:
            continue
        if any(mixed(r) for r in rec["completion_rewards"][: truth[0]]):
            return rec
    for rec in rollouts:
        if len(rec["steps"]) >= min_steps and any(mixed(r) for r in rec["completion_rewards"]):
            return rec
    return max(rollouts, key=lambda r: len(r["steps"]))


def step_truth(rollout: dict[str, Any]) -> list[str] | None:
    """Each step of a rollout against its ground truth (:func:`ground_truth`): ``right`` before the first
    error, ``WRONG (<error type>)`` at it, ``after the error`` from then on; None without a ground truth."""
    truth = ground_truth(rollout)
    if truth is None:
        return None
    first, kind = truth
    cut = len(rollout["steps"]) if first < 0 else first
    return ["right" if i < cut else f"WRONG ({kind})" if i == cut else "after the error"
            for i in range(len(rollout["steps"]))]  # fmt: skip


def worked_example_table(rollout: dict[str, Any], etas: Sequence[float], digits: int = 3) -> pd.DataFrame:
    """One solution step by step: the step, its ground truth, its completions' outcomes, p and the label each
    rule gives.

    Columns: ``step`` (1-based), ``text`` (the whole step), ``truth`` (:func:`step_truth`; only for a task
    with a ground truth), ``completions`` (e.g. "1 0 1 1"; the last step shows the solution's outcome), ``p``
    (fraction correct), then one column per rule (rounded to ``digits``).
    """
    table = stepwise_labels(rollout["completion_rewards"], rollout["outcome"], list(etas))
    truth = step_truth(rollout)
    rows = []
    for i, step in enumerate(rollout["steps"]):
        last = i == len(rollout["steps"]) - 1
        rewards = [rollout["outcome"]] if last else rollout["completion_rewards"][i]
        row = {"step": i + 1, "text": step}
        if truth is not None:
            row["truth"] = truth[i]
        row["completions"] = "outcome " + str(rollout["outcome"]) if last else " ".join(map(str, rewards))
        row["p"] = round(sum(rewards) / len(rewards), digits)
        for rule, vals in table.items():
            row[rule] = None if vals[i] is None else round(vals[i], digits)
        rows.append(row)
    return pd.DataFrame(rows)


EXPLORER_ETAS = (0.5, 2.0, 10.0)
"""The etas of 02_labels' static eta figure (papermill, nbval): between soft (0) and hard (inf)."""


def eta_explorer(res: LabelResult, etas: Sequence[float] = EXPLORER_ETAS) -> Any:
    """The worked example's labels and the label distribution for other etas than the grid's
    (:func:`~erprm_core.report.figures.figure_label_explorer`, soft and hard always drawn).

    In JupyterLab started by `make lab` (:func:`~erprm_core.report.style.interactive`) it returns an eta
    slider (ipywidgets) that relabels every rollout and redraws the figure for the chosen eta. Anywhere else
    (papermill, nbval, `erprm reproduce`) it returns the static figure for ``etas``, so an executed notebook
    holds an image and no widget state.
    """

    def draw(chosen: Sequence[float]) -> Figure:
        grid = [0.0, *chosen, math.inf]
        distribution = label_distribution(label_records(res.rollouts, grid))
        rules = [labels.rule_name(e) for e in grid]
        return figures.figure_label_explorer(worked_example_table(res.example, grid), distribution, rules)

    if not style.interactive():
        return style.shown(draw(etas))
    import ipywidgets  # JupyterLab only
    from IPython.display import display

    slider = ipywidgets.FloatLogSlider(value=1.0, base=10, min=-1.5, max=1.5, step=0.05, description="η",
                                       continuous_update=False)  # fmt: skip
    return ipywidgets.interactive(lambda eta: display(style.shown(draw([eta]))), eta=slider)


def run(config: LabelsConfig) -> LabelResult:
    """Stage 02_labels: label the rollouts for every rule; write the tables and the manifest entry."""
    c = config
    P = artifacts.paths(c.profile)
    eta_grid = parse_eta_grid(c.etas)
    source = artifacts.require(c.rollouts_file or P.rollouts_file, "01_rollouts", c.profile, "rollouts")
    res = run_labels(P, eta_grid, source)
    res.eta_grid = list(eta_grid)
    artifacts.write_table(res.audit.to_frame(), c.profile, "labels_audit")
    res.stats = label_statistics(res.records)
    artifacts.write_table(res.stats, c.profile, "label_stats")
    res.distribution = label_distribution(res.records, bins=10)
    artifacts.write_table(res.distribution, c.profile, "label_distribution")
    if any("first_error" in r for r in res.records):  # arith only: other tasks have no step-level truth
        res.quality = label_quality_table(res.records)
        artifacts.write_table(res.quality, c.profile, "label_quality")
    res.example = pick_worked_example(res.rollouts)
    res.example_table = worked_example_table(res.example, eta_grid)
    record(
        c.profile, STAGE, c, rules=res.rules, rollouts=source.name, labelled_solutions=len(res.records),
        labelled_steps=sum(len(r["steps"]) for r in res.records),
    )  # fmt: skip
    return res
