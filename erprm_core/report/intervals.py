"""Figures of point estimates with their intervals, one per row: each rule's agreement with the step-level
ground truth (task arith: :func:`figure_label_quality`, :func:`figure_first_error`), the paired differences
of best-of-N and RAFT (fig. 5, :func:`figure_paired_differences`) and the paper's numbers beside this run's
(fig. 6, :func:`figure_paper_vs_run`, from :func:`erprm_core.report.summary.paper_comparison`).

:mod:`erprm_core.report.figures` imports every figure of this module, so ``figures.figure_<name>`` names
every figure of the study. Colours come from :mod:`erprm_core.report.style` only.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from erprm_core import labels
from erprm_core.report import style

PAIRED_COLUMNS = ["panel", "family", "method", "label", "diff", "ci_low", "ci_high", "p", "p_name"]
"""Columns of :func:`paired_difference_table`: the rows fig. 5 draws, in points."""


def _rule_points(ax: plt.Axes, table: pd.DataFrame) -> None:
    """One point with its interval per row of ``table`` (indexed by rule; value, ci_low, ci_high)."""
    for x, (rule, row) in enumerate(table.iterrows()):
        err = [[row["value"] - row["ci_low"]], [row["ci_high"] - row["value"]]]
        ax.errorbar(x, row["value"], yerr=err, fmt="o", capsize=3, color=style.method_colour(rule))
    ax.set_xticks(range(len(table)), [style.method_label(r) for r in table.index], rotation=30, ha="right")
    ax.set_xlim(-0.5, len(table) - 0.5)


def figure_label_quality(quality: pd.DataFrame) -> plt.Figure:
    """How well each rule's step labels find the steps before the first error (02_labels' ``label_quality``
    table, task arith): AUROC against the ground truth over all labelled steps (left), the Brier score of
    the labels against it (middle; lower is closer) and the AUROC by steps remaining (right), with 95%
    intervals over problems."""
    rules = labels.method_order(quality["rule"].unique())
    overall = quality[quality["steps_remaining"].astype(str) == "all"]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(14, 3.8), gridspec_kw={"width_ratios": [1, 1, 1.4]})
    for ax, metric, ylabel in ((ax1, "auroc_vs_truth", "AUROC"), (ax2, "brier_vs_truth", "Brier score")):
        _rule_points(ax, overall[overall["metric"] == metric].set_index("rule").loc[rules])
        ax.set(ylabel=f"{ylabel} vs ground truth", title=f"{ylabel}, all labelled steps")
    by = quality[(quality["steps_remaining"].astype(str) != "all") & (quality["metric"] == "auroc_vs_truth")]
    for k, rule in enumerate(rules):
        g = by[by["rule"] == rule].assign(x=lambda d: d["steps_remaining"].astype(int)).sort_values("x")
        err = [g["value"] - g["ci_low"], g["ci_high"] - g["value"]]
        ax3.errorbar(
            g["x"] + 0.04 * (k - len(rules) / 2), g["value"], yerr=err, marker="o", ms=3, capsize=2, lw=1,
            color=style.method_colour(rule), label=style.method_label(rule),
        )  # fmt: skip
    ax3.set(
        xlabel="steps after the labelled step",
        ylabel="AUROC vs ground truth",
        title="AUROC by steps remaining",
    )
    ax3.legend(fontsize=7, ncol=2)
    for ax in (ax1, ax3):
        ax.axhline(0.5, color="0.6", ls=":", lw=1)
    fig.suptitle("Step labels against the first error (positive: a step before it)", fontsize=10)
    fig.tight_layout()
    return fig


def figure_first_error(truth: pd.DataFrame) -> plt.Figure:
    """The held-out PRM checks against the ground truth (03_train_prm's ``prm_truth`` table, task arith):
    ProcessBench's first-error F1 per rule (left; the "synthetic twin" of ProcessBench) and within-problem
    pairwise ranking of correct over wrong solutions (right; 0.5 = chance), with 95% intervals."""
    rules = labels.method_order(truth["rule"].unique())
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    panels = (
        ("first_error_f1", "first-error F1 (threshold 0.5)"),
        ("within_problem_pairwise", "pairwise share"),
    )
    for ax, (metric, ylabel) in zip(axes, panels, strict=True):
        g = truth[truth["metric"] == metric].set_index("rule").loc[rules]
        _rule_points(ax, g)
        ax.set(ylabel=ylabel, ylim=(-0.02, 1.02))
    axes[0].set_title("First wrong step (ProcessBench F1)", fontsize=9)
    axes[1].set_title("Correct over wrong, same problem (min; ORM: last)", fontsize=9)
    axes[1].axhline(0.5, color="0.6", ls=":", lw=1)
    fig.suptitle("Held-out PRMs against the step-level ground truth", fontsize=10)
    fig.tight_layout()
    return fig


def _p_column(table: pd.DataFrame) -> tuple[pd.Series, str]:
    """The Holm-adjusted p of each row (``p_holm``) where the table has it, else the raw ``p_value``."""
    if "p_holm" in table and table["p_holm"].notna().all():
        return table["p_holm"], "Holm p"
    return table["p_value"], "p"


def _family(table: pd.DataFrame, fallback: str) -> pd.Series:
    """The family of each row: ``family`` when the table has it, else ``selection`` (prespecified or post
    hoc), else ``fallback``."""
    for column in ("family", "selection"):
        if column in table:
            return table[column].fillna(fallback).astype(str)
    return pd.Series(fallback, index=table.index)


def paired_difference_table(
    bon_paired: pd.DataFrame, raft_paired: pd.DataFrame | None = None
) -> pd.DataFrame:
    """The rows of fig. 5 (:data:`PAIRED_COLUMNS`), differences in points: best-of-N ``method_a`` minus
    ``method_b`` at the largest N of ``bon_paired``, and (with ``raft_paired``) the greedy accuracy after the
    last RAFT iteration with ``reward_model`` minus with ``versus``; ``p`` is Holm-adjusted within its family
    when the table has ``p_holm`` (``p_name`` says which)."""
    parts = []
    n = int(bon_paired["n"].max())
    b = bon_paired[bon_paired["n"] == n]
    p, p_name = _p_column(b)
    parts.append(pd.DataFrame({
        "panel": f"Best-of-{n}: accuracy of A minus B on the same candidates", "family": _family(b, ""),
        "method": b["method_a"],
        "label": [f"{style.method_label(x)} − {style.method_label(y)}" for x, y in zip(b["method_a"], b["method_b"], strict=True)],
        "diff": b["diff"] * 100, "ci_low": b["ci_low"] * 100, "ci_high": b["ci_high"] * 100, "p": p, "p_name": p_name,
    }))  # fmt: skip
    if raft_paired is not None and not raft_paired.empty:
        last = int(raft_paired["iteration"].max())
        r = raft_paired[raft_paired["iteration"] == last]
        p, p_name = _p_column(r)
        parts.append(pd.DataFrame({
            "panel": f"RAFT, greedy accuracy after iteration {last}: A minus B on the same problems",
            "family": _family(r, ""), "method": r["reward_model"],
            "label": [f"{style.raft_label(x)} − {style.raft_label(y)}" for x, y in zip(r["reward_model"], r["versus"], strict=True)],
            "diff": r["diff"] * 100, "ci_low": r["ci_low"] * 100, "ci_high": r["ci_high"] * 100, "p": p, "p_name": p_name,
        }))  # fmt: skip
    return pd.concat(parts, ignore_index=True)[PAIRED_COLUMNS]


def _rows_by_family(ax: plt.Axes, rows: pd.DataFrame) -> list[tuple[float, str]]:
    """Place ``rows`` top down, a header line (in italics, at the left) before each named family; the y of
    every family header, and the (y, label) of every row."""
    y, ticks = 0.0, []
    for family, group in rows.groupby("family", sort=False):
        if family:
            ax.text(0.005, y, family, transform=ax.get_yaxis_transform(), ha="left", va="center", fontsize=7,
                    fontstyle="italic", color="0.3")  # fmt: skip
            y -= 1
        for _, r in group.iterrows():
            ticks.append((y, r))
            y -= 1
    return ticks


def figure_paired_differences(
    bon_paired: pd.DataFrame, raft_paired: pd.DataFrame | None = None
) -> plt.Figure:
    """Fig. 5: paired differences with their 95% intervals, one row per comparison (a forest plot; the rows of
    :func:`paired_difference_table`): best-of-N at the largest N (top) and, with ``raft_paired``, RAFT after
    its last iteration (bottom), grouped by family (the family in which p was Holm-adjusted, or prespecified
    vs post hoc), coloured by method A, with a zero line (no difference) and each row's p at the right."""
    table = paired_difference_table(bon_paired, raft_paired)
    panels = list(dict.fromkeys(table["panel"]))
    sizes = [
        len(g) + g["family"].astype(bool).groupby(g["family"]).any().sum()
        for _, g in table.groupby("panel", sort=False)
    ]
    fig, axes = plt.subplots(len(panels), 1, figsize=(8.4, 1.2 + 0.34 * sum(sizes) + 0.6 * len(panels)),
                             squeeze=False, gridspec_kw={"height_ratios": sizes})  # fmt: skip
    for ax, panel in zip(axes[:, 0], panels, strict=True):
        placed = _rows_by_family(ax, table[table["panel"] == panel])
        for y, r in placed:
            err = [[max(r["diff"] - r["ci_low"], 0)], [max(r["ci_high"] - r["diff"], 0)]]
            ax.errorbar(
                r["diff"], y, xerr=err, fmt="o", ms=5, capsize=3, color=style.method_colour(r["method"])
            )
            ax.annotate(f"{r['p_name']} = {r['p']:.2g}", xy=(1.01, y), xycoords=ax.get_yaxis_transform(),
                        va="center", fontsize=7, color="0.25")  # fmt: skip
        ax.axvline(0, color="0.4", lw=1, ls="--", zorder=1)
        ax.set_yticks([y for y, _ in placed], [r["label"] for _, r in placed], fontsize=8)
        ax.set_ylim(min(y for y, _ in placed) - 0.6, 0.6)
        ax.grid(axis="y", visible=False)
        ax.set_title(panel, fontsize=9)
        ax.set_xlabel("difference in accuracy (points), 95% interval")
    fig.suptitle("Fig. 5 · paired differences (dashed: no difference)", fontsize=10)
    fig.tight_layout()
    return fig


PAPER_VS_RUN_SERIES = (
    ("paper_gsm8k", "Paper, GSM8K", "s"),
    ("paper_math500", "Paper, MATH500 (RAFT: MATH test)", "D"),
    ("this_run", "This run (95% interval)", "o"),
)
"""The markers of fig. 6: column of :func:`~erprm_core.report.summary.paper_comparison`, legend, marker (the
colour is :data:`~erprm_core.report.style.SOURCE_COLOURS`)."""


def figure_paper_vs_run(table: pd.DataFrame) -> plt.Figure:
    """Fig. 6: the paper's numbers beside this run's, one row per quantity of ``table``
    (:func:`~erprm_core.report.summary.paper_comparison`, in percent): accuracies (top) and gains in points
    (bottom, with a zero line), the paper's GSM8K and MATH500 values and this run's with its 95% interval
    where it has one. The scales differ (the table's ``paper_scale`` and ``this_run_scale``): read the gaps,
    not the levels. The legend is below the panels."""
    kinds = [k for k in ("accuracy", "gain") if (table["kind"] == k).any()]
    sizes = [int((table["kind"] == k).sum()) for k in kinds]
    fig, axes = plt.subplots(len(kinds), 1, figsize=(8.4, 1.6 + 0.32 * sum(sizes)), squeeze=False,
                             gridspec_kw={"height_ratios": sizes})  # fmt: skip
    for ax, kind in zip(axes[:, 0], kinds, strict=True):
        rows = table[table["kind"] == kind].reset_index(drop=True)
        y = -np.arange(len(rows), dtype=float)
        for k, (column, label, marker) in enumerate(PAPER_VS_RUN_SERIES):
            colour, dy = style.SOURCE_COLOURS[column], (k - 1) * 0.18
            if column == "this_run":
                low = (rows["this_run"] - rows["this_run_ci_low"]).clip(lower=0).fillna(0)
                high = (rows["this_run_ci_high"] - rows["this_run"]).clip(lower=0).fillna(0)
                ax.errorbar(rows[column], y + dy, xerr=[low, high], fmt=marker, ms=5, capsize=2, color=colour,
                            label=label)  # fmt: skip
            else:
                ax.plot(rows[column], y + dy, marker, ms=5, color=colour, mfc="white", ls="none", label=label)
        if kind == "gain":
            ax.axvline(0, color="0.4", lw=1, ls="--", zorder=1)
        ax.set_yticks(y, rows["quantity"], fontsize=8)
        ax.set_ylim(y.min() - 0.6, 0.6)
        ax.grid(axis="y", visible=False)
        ax.set_xlabel("accuracy (%)" if kind == "accuracy" else "gain (points)")
    handles, names = axes[0, 0].get_legend_handles_labels()
    axes[-1, 0].legend(handles, names, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.35), ncol=3)
    fig.suptitle("Fig. 6 · the paper beside this run (different models and scales)", fontsize=10)
    fig.tight_layout()
    return fig
