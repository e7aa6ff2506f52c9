"""Every figure of the study, drawn from tidy tables (the stage tables or tables made here).

Fig. 1 label(p, eta) curves; fig. 2 best-of-N curves with interval bands beside the paper's reference
curves (erprm_core/reference/paper_results.csv); fig. 3 the eta sweep at N_max; fig. 4 RAFT accuracy per
iteration; the PRM training, calibration and minimum-position figures of 03_train_prm; and the figures the
stage notebooks show (policy training and accuracy, prefix success, label distribution, aggregations, and
for the synthetic task arith the labels' and the PRMs' checks against the step-level ground truth).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from importlib import resources
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from erprm_core import labels
from erprm_core.report import style

RAFT_BASELINE = "baseline"
"""``reward_model`` of the no-RLHF row of the RAFT tables (the value of ``erprm_core.raft.BASELINE``)."""


def paper_reference() -> pd.DataFrame:
    """The paper's reported numbers (best-of-N read off its figure, RAFT from its table), in percent."""
    with resources.files("erprm_core.reference").joinpath("paper_results.csv").open() as fh:
        return pd.read_csv(fh, comment="#")


def label_curve_table(etas: list[float], n_points: int = 101) -> pd.DataFrame:
    """Tidy label(p, eta) for binary rewards on a grid of p, for each eta (soft and hard included)."""
    p = np.linspace(0.0, 1.0, n_points)
    rows = []
    for eta in etas:
        rows.append(
            pd.DataFrame(
                {
                    "rule": labels.rule_name(eta),
                    "eta": eta,
                    "p": p,
                    "label": labels.er_label_from_fraction(p, eta),
                }
            )
        )
    return pd.concat(rows, ignore_index=True)


def figure_label_curves(curves: pd.DataFrame) -> plt.Figure:
    """Fig. 1: one line per rule; the soft (eta -> 0) and hard (eta -> inf) limits drawn thick."""
    fig, ax = plt.subplots(figsize=(5, 3.8))
    finite = sorted(e for e in curves["eta"].unique() if 0 < e < math.inf)
    for rule in labels.method_order(curves["rule"].unique()):
        rows = curves[curves["rule"] == rule]
        thick = rule in ("soft", "hard")
        ax.plot(
            rows["p"],
            rows["label"],
            color=style.method_colour(rule, finite or (1,)),
            lw=2.2 if thick else 1.4,
            ls="--" if rule == "hard" else "-",
            label=style.method_label(rule),
        )
    ax.set_xlabel("p (fraction of completions reaching the answer)")
    ax.set_ylabel("label = (1/η) ln(1 − p + p·e^η)")
    ax.set_title("Fig. 1 · ER labels interpolate soft and hard")
    ax.legend(fontsize=7, loc="lower right")
    return fig


def plot_curves_with_bands(
    table: pd.DataFrame,
    x: str,
    methods: Sequence[str] | None = None,
    ax: plt.Axes | None = None,
    log2_x: bool = True,
) -> plt.Figure:
    """Lines of ``value`` against ``x`` per method with ``ci_low``..``ci_high`` bands (tidy table input)."""
    if ax is None:
        fig, ax = plt.subplots(figsize=(5.2, 3.8))
    fig = ax.figure
    methods = labels.method_order(methods if methods is not None else table["method"].unique())
    for method in methods:
        rows = table[table["method"] == method].sort_values(x)
        if rows.empty:
            continue
        colour = style.method_colour(method)
        ax.plot(
            rows[x],
            rows["value"],
            marker="o",
            ms=3,
            color=colour,
            ls=style.method_linestyle(method),
            label=style.method_label(method),
        )
        if {"ci_low", "ci_high"} <= set(rows.columns) and rows["ci_low"].notna().any():
            ax.fill_between(rows[x], rows["ci_low"], rows["ci_high"], color=colour, alpha=0.12, lw=0)
    if log2_x:
        ax.set_xscale("log", base=2)
    ax.legend(fontsize=7)
    return fig


def headline_methods(bon: pd.DataFrame, er_rule: str, aggregation: str, orm_aggregation: str) -> list[str]:
    """The methods of the headline comparison that exist in ``bon``: ER, hard, soft, ORM and baselines."""
    wanted = [
        f"{er_rule}:{aggregation}",
        f"hard:{aggregation}",
        f"soft:{aggregation}",
        f"orm:{orm_aggregation}",
        "majority",
        "random",
        "oracle",
    ]
    present = set(bon["method"])
    return [m for m in wanted if m in present]


def figure_best_of_n(
    bon: pd.DataFrame, methods: list[str], reference: pd.DataFrame, title: str
) -> plt.Figure:
    """Fig. 2: this run's best-of-N curves with 95% bands (left) beside the paper's GSM8K / MATH500 curves."""
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2), gridspec_kw={"width_ratios": [1.3, 1, 1]})
    acc = bon[bon["metric"] == "accuracy"].copy()
    acc[["value", "ci_low", "ci_high"]] *= 100
    plot_curves_with_bands(acc, "n", methods, ax=axes[0])
    axes[0].set_title(title)
    axes[0].set_xlabel("N (candidates per problem)")
    axes[0].set_ylabel("accuracy (%)")
    for ax, dataset, name in [(axes[1], "gsm8k", "GSM8K"), (axes[2], "math500", "MATH500")]:
        ref = reference[(reference["experiment"] == "best_of_n") & (reference["dataset"] == dataset)].copy()
        ref["method"] = ref["method"].map(lambda m: "er_1" if m == "er_prm" else m)
        ref = ref.rename(columns={"accuracy": "value"})
        plot_curves_with_bands(ref, "n", ax=ax)
        ax.set_title(f"Paper, {name} (Mistral-MetaMath-7b, min)")
        ax.set_xlabel("N")
        for line in ax.get_lines():  # the paper does not say which eta its headline ER-PRM used
            if line.get_label().startswith("ER-PRM"):
                line.set_label("ER-PRM (η not stated)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def eta_sweep_table(bon: pd.DataFrame, n: int, aggregation: str) -> pd.DataFrame:
    """Accuracy at N = ``n`` for every label rule (soft, ER etas, hard) at one aggregation, sorted by eta."""
    rows = []
    for method in bon["method"].unique():
        rule, agg, weighted = labels.parse_method(method)
        if agg != aggregation or weighted:  # a weighted vote names no label rule
            continue
        try:
            eta = labels.rule_eta(rule)
        except ValueError:
            continue
        sel = bon[(bon["method"] == method) & (bon["n"] == n) & (bon["metric"] == "accuracy")]
        if not sel.empty:
            r = sel.iloc[0]
            rows.append(
                {
                    "rule": rule,
                    "eta": eta,
                    "n": n,
                    "value": r["value"],
                    "ci_low": r["ci_low"],
                    "ci_high": r["ci_high"],
                }
            )
    return pd.DataFrame(rows).sort_values("eta").reset_index(drop=True)


def figure_eta_sweep(sweep: pd.DataFrame, baselines: pd.DataFrame | None = None) -> plt.Figure:
    """Fig. 3: accuracy at N_max against eta; soft (eta = 0) and hard (eta = inf) at the two ends."""
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    finite = sweep[(sweep["eta"] > 0) & np.isfinite(sweep["eta"])]
    lo = finite["eta"].min() / 4 if len(finite) else 0.025
    hi = finite["eta"].max() * 4 if len(finite) else 40
    x = sweep["eta"].map(lambda e: lo if e == 0 else hi if math.isinf(e) else e)
    y, err = (
        sweep["value"] * 100,
        [(sweep["value"] - sweep["ci_low"]) * 100, (sweep["ci_high"] - sweep["value"]) * 100],
    )
    ax.errorbar(x, y, yerr=err, color=style.BASE_COLOURS["er"], marker="o", capsize=3, lw=1.5)
    for xi, rule in zip(x, sweep["rule"], strict=True):
        if rule in ("soft", "hard"):
            ax.annotate(
                rule,
                (xi, y[sweep["rule"] == rule].iloc[0]),
                textcoords="offset points",
                xytext=(0, 8),
                ha="center",
                color=style.method_colour(rule),
            )
    if baselines is not None:
        for _, r in baselines.iterrows():
            ax.axhline(
                r["value"] * 100,
                color=style.method_colour(r["method"]),
                ls=style.method_linestyle(r["method"]),
                lw=1,
                label=style.method_label(r["method"]),
            )
        ax.legend(fontsize=7)
    ax.set_xscale("log")
    ticks = [lo, *finite["eta"].tolist(), hi]
    ax.set_xticks(ticks, ["0\n(soft)", *[f"{e:g}" for e in finite["eta"]], "∞\n(hard)"])
    ax.minorticks_off()
    ax.set_xlabel("η")
    ax.set_ylabel(f"best-of-{int(sweep['n'].iloc[0])} accuracy (%)")
    ax.set_title("Fig. 3 · label rule sweep (95% intervals)")
    return fig


def figure_raft(
    table: pd.DataFrame,
    metric: str = "greedy_accuracy",
    ax: Any = None,
    percent: bool = False,
    title: str | None = None,
) -> plt.Figure:
    """Fig. 4: greedy accuracy (or another ``metric``) per RAFT iteration with interval bars, one line per
    reward model; every line starts at the no-RLHF baseline (iteration 0), also drawn as a grey band.
    ``percent`` shows the values times 100; ``title`` sets the axes title."""
    if ax is None:
        _, ax = plt.subplots(figsize=(5.2, 3.8))
    fig = ax.figure
    rows = table[table["metric"] == metric]
    if percent:
        rows = rows.assign(**{c: rows[c] * 100 for c in ("value", "ci_low", "ci_high")})
    base = rows[rows["reward_model"] == RAFT_BASELINE]
    methods = labels.method_order(r for r in rows["reward_model"].unique() if r != RAFT_BASELINE)
    if not base.empty:
        b = base.iloc[0]
        ax.axhspan(b["ci_low"], b["ci_high"], color="0.5", alpha=0.12, lw=0)
        ax.axhline(b["value"], color="0.4", ls="--", lw=1, label=style.method_label(RAFT_BASELINE))
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
            color=style.method_colour(method),
            label=style.method_label(method),
        )
    ax.set_xlabel("RAFT iteration (0 = starting policy)")
    ax.set_ylabel(metric.replace("_", " ") + (" (%)" if percent else ""))
    iters = sorted(rows["iteration"].unique())
    if iters:
        ax.set_xticks([int(i) for i in iters])
    if title is not None:
        ax.set_title(title)
    ax.legend(fontsize=7)
    return fig


def figure_training_curves(log: Any, smooth: int = 1) -> Any:
    """Training loss against optimizer step, one line per rule (rolling mean over ``smooth`` steps)."""
    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    for rule in labels.method_order(log["rule"].unique()):
        g = log[log["rule"] == rule].sort_values("step")
        ax.plot(
            g["step"],
            g["loss"].rolling(max(1, smooth), min_periods=1).mean(),
            color=style.method_colour(rule),
            label=style.method_label(rule),
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("soft-label cross-entropy")
    ax.set_title("PRM training")
    ax.legend(fontsize=7, ncol=2)
    return fig


def figure_calibration(calibration: Any, rules: Sequence[str] | None = None) -> Any:
    """Reliability diagrams: mean step score vs mean label per score bin, one panel per rule."""
    rules = labels.method_order(rules if rules is not None else calibration["rule"].unique())
    cols = min(3, len(rules)) or 1
    rows = -(-len(rules) // cols) or 1
    fig, axes = plt.subplots(
        rows, cols, figsize=(3.0 * cols, 2.8 * rows), squeeze=False, sharex=True, sharey=True
    )
    for ax in axes.ravel()[len(rules) :]:
        ax.set_visible(False)
    for ax, rule in zip(axes.ravel(), rules, strict=False):
        g = calibration[(calibration["rule"] == rule) & (calibration["count"] > 0)]
        ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--")
        ax.plot(g["mean_pred"], g["mean_target"], marker="o", ms=3, color=style.method_colour(rule))
        ax.set_title(style.method_label(rule), fontsize=9)
    for ax in axes[-1]:
        ax.set_xlabel("mean step score")
    for ax in axes[:, 0]:
        ax.set_ylabel("mean label")
    fig.suptitle("Held-out calibration against each rule's own labels", fontsize=10)
    fig.tight_layout()
    return fig


def figure_min_position(min_position: Any) -> Any:
    """Where the minimum step score falls (relative position in the solution), incorrect vs correct."""
    fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.4), sharey=True)
    for ax, outcome, title in zip(axes, (0, 1), ("incorrect solutions", "correct solutions"), strict=True):
        for rule in labels.method_order(min_position["rule"].unique()):
            g = min_position[(min_position["rule"] == rule) & (min_position["outcome"] == outcome)]
            centre = (g["bin_low"] + g["bin_high"]) / 2
            ax.plot(
                centre,
                g["fraction"],
                marker="o",
                ms=3,
                color=style.method_colour(rule),
                label=style.method_label(rule),
            )
        ax.set_title(title, fontsize=9)
    fig.supxlabel("relative position of the lowest-scored step (0 = first step, 1 = last)", fontsize=9)
    axes[0].set_ylabel("fraction of solutions")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    return fig


def figure_policy_training(log: pd.DataFrame) -> plt.Figure:
    """Policy SFT loss against optimizer step (00_policy)."""
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(log["step"], log["loss"], color="black")
    ax.set(xlabel="optimizer step", ylabel="loss (solution tokens)", yscale="log", title="Policy SFT")
    return fig


def figure_policy_accuracy(table: pd.DataFrame, by_steps: pd.DataFrame) -> plt.Figure:
    """Greedy accuracy by number of steps (left) and pass@k against greedy (right), from the policy
    evaluation ``table`` (``policy_eval``) and ``by_steps`` (``policy_accuracy_by_steps``) of 00_policy."""
    passk = table[table["metric"] == "pass_at_k"]
    greedy = table[table["metric"] == "greedy_accuracy"].iloc[0]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
    ax1.errorbar(
        by_steps["n_steps"],
        by_steps["accuracy"],
        yerr=[by_steps["accuracy"] - by_steps["ci_low"], by_steps["ci_high"] - by_steps["accuracy"]],
        marker="o",
        color="black",
        capsize=3,
    )
    ax1.set(
        xlabel="arithmetic steps", ylabel="greedy accuracy", ylim=(0, 1), title="Accuracy by number of steps"
    )
    ax2.fill_between(
        passk["k"], passk["ci_low"], passk["ci_high"], alpha=0.2, color=style.BASE_COLOURS["oracle"]
    )
    ax2.plot(passk["k"], passk["value"], marker="o", color=style.BASE_COLOURS["oracle"], label="pass@k (T=1)")
    ax2.axhline(greedy["value"], ls="--", color="black", label="greedy")
    ax2.set(xscale="log", xlabel="k", ylabel="accuracy", ylim=(0, 1), title="pass@k")
    ax2.legend()
    return fig


def figure_prefix_success(prefixes: pd.DataFrame) -> plt.Figure:
    """Mean p (share of a prefix's completions that reach the answer) by step, for correct and wrong
    solutions (01_rollouts' ``rollouts_prefixes`` table)."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    prefixes.pivot_table(index="step", columns="outcome", values="p", aggfunc="mean").rename(
        columns={0: "wrong solutions", 1: "correct solutions"}
    ).plot(ax=ax, marker="o")
    ax.set(xlabel="step l (prefix = first l steps)", ylabel="mean p over prefixes", ylim=(-0.02, 1.02))
    return fig


def figure_label_distribution(distribution: pd.DataFrame, rules: Sequence[str]) -> plt.Figure:
    """Heat map of the share of labelled steps per label bin, one row per rule in ``rules`` (02_labels'
    ``label_distribution`` table)."""
    import seaborn as sns  # only this figure needs it

    share = distribution.pivot(index="rule", columns="bin", values="share").loc[
        list(rules), distribution["bin"].unique()
    ]
    fig, ax = plt.subplots(figsize=(9, 3.8))
    sns.heatmap(share, annot=True, fmt=".2f", cmap="Blues", cbar=False, ax=ax)
    ax.set(xlabel="label bin", ylabel="rule")
    return fig


def figure_aggregations(agg: pd.DataFrame, n_max: int, aggregations: Sequence[str]) -> plt.Figure:
    """Best-of-``n_max`` accuracy per rule under each step-score aggregation in ``aggregations`` (in that
    order; the stages pass ``erprm_core.prm.AGGREGATIONS``), from ``aggregation_table`` (04_best_of_n)."""
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for k, how in enumerate(aggregations):
        r = agg[agg["aggregation"] == how]
        ax.errorbar(
            np.arange(len(r)) + 0.15 * k - 0.225,
            r["value"] * 100,
            fmt="o",
            capsize=2,
            label=how,
            yerr=[(r["value"] - r["ci_low"]) * 100, (r["ci_high"] - r["value"]) * 100],
        )
    ax.set_xticks(np.arange(len(r)), [style.method_label(x) for x in r["rule"]], rotation=25, ha="right")
    ax.set(ylabel=f"best-of-{n_max} accuracy (%)", title="Aggregation of step scores (95% intervals)")
    ax.legend(fontsize=8, title="aggregation")
    return fig


def figure_processbench_sweep(sweep: Any, threshold: float | None = None, title: str = "") -> Any:
    """ProcessBench F1 against the threshold, one line per split (and their mean when there are several),
    from the ``<stem>_sweep.csv`` table; a dotted line marks ``threshold``."""
    style.set_style()
    fig, ax = plt.subplots(figsize=(5.6, 3.6))
    cmap = plt.get_cmap("tab10")
    splits = list(dict.fromkeys(sweep["split"]))
    for k, split in enumerate(splits):
        g = sweep[sweep["split"] == split].sort_values("threshold")
        ax.plot(g["threshold"], g["f1"], marker="o", ms=3, color=cmap(k % 10), label=split)
    if len(splits) > 1:
        mean = sweep.groupby("threshold")["f1"].agg(lambda f: f.mean(skipna=False)).sort_index()
        ax.plot(mean.index, mean.to_numpy(), color="black", ls="--", lw=1.5, label="mean of splits")
    if threshold is not None:
        ax.axvline(threshold, color="0.5", ls=":", lw=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("threshold (a step scored below it is the first error)")
    ax.set_ylabel("ProcessBench F1")
    ax.set_title(title or "ProcessBench F1 against the threshold", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


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
