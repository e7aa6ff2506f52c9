"""The study's figures and summary table, drawn only from the tables the stages wrote (06_figures).

Fig. 1 label(p, eta) curves; fig. 2 best-of-N curves with interval bands beside the paper's reference
curves (erprm_core/reference/paper_results.csv); fig. 3 the eta sweep at N_max; fig. 4 RAFT accuracy per
iteration; and a Markdown summary table that README.md includes between two markers (``sync_readme``).
"""

from __future__ import annotations

import math
from importlib import resources
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from erprm_core import artifacts, labels, plotting

README_START = "<!-- summary:start (written by `erprm figures`; do not edit by hand) -->"
README_END = "<!-- summary:end -->"
PAPER_METHODS = {"er_prm": "er", "hard": "hard", "soft": "soft", "orm": "orm"}


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
    for rule in plotting.method_order(curves["rule"].unique()):
        rows = curves[curves["rule"] == rule]
        thick = rule in ("soft", "hard")
        ax.plot(
            rows["p"],
            rows["label"],
            color=plotting.method_colour(rule, finite or (1,)),
            lw=2.2 if thick else 1.4,
            ls="--" if rule == "hard" else "-",
            label=plotting.method_label(rule),
        )
    ax.set_xlabel("p (fraction of completions reaching the answer)")
    ax.set_ylabel("label = (1/η) ln(1 − p + p·e^η)")
    ax.set_title("Fig. 1 · ER labels interpolate soft and hard")
    ax.legend(fontsize=7, loc="lower right")
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
    plotting.plot_curves_with_bands(acc, "n", methods, ax=axes[0])
    axes[0].set_title(title)
    axes[0].set_xlabel("N (candidates per problem)")
    axes[0].set_ylabel("accuracy (%)")
    for ax, dataset, name in [(axes[1], "gsm8k", "GSM8K"), (axes[2], "math500", "MATH500")]:
        ref = reference[(reference["experiment"] == "best_of_n") & (reference["dataset"] == dataset)].copy()
        ref["method"] = ref["method"].map(lambda m: "er_1" if m == "er_prm" else m)
        ref = ref.rename(columns={"accuracy": "value"})
        plotting.plot_curves_with_bands(ref, "n", ax=ax)
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
        rule, agg = plotting.split_method(method)
        if agg != aggregation:
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
    ax.errorbar(x, y, yerr=err, color=plotting.BASE_COLOURS["er"], marker="o", capsize=3, lw=1.5)
    for xi, rule in zip(x, sweep["rule"], strict=True):
        if rule in ("soft", "hard"):
            ax.annotate(
                rule,
                (xi, y[sweep["rule"] == rule].iloc[0]),
                textcoords="offset points",
                xytext=(0, 8),
                ha="center",
                color=plotting.method_colour(rule),
            )
    if baselines is not None:
        for _, r in baselines.iterrows():
            ax.axhline(
                r["value"] * 100,
                color=plotting.method_colour(r["method"]),
                ls=plotting.method_linestyle(r["method"]),
                lw=1,
                label=plotting.method_label(r["method"]),
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


def figure_raft(raft: pd.DataFrame) -> plt.Figure:
    """Fig. 4: greedy accuracy per RAFT iteration for each reward model, with 95% interval bars."""
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    acc = raft[raft["metric"] == "greedy_accuracy"]
    models = plotting.method_order(acc["reward_model"].unique())
    width = 0.8 / max(len(models), 1)
    for i, model in enumerate(models):
        rows = acc[acc["reward_model"] == model].sort_values("iteration")
        x = rows["iteration"] + (i - (len(models) - 1) / 2) * width * 0.5
        err = [(rows["value"] - rows["ci_low"]) * 100, (rows["ci_high"] - rows["value"]) * 100]
        ax.errorbar(
            x,
            rows["value"] * 100,
            yerr=err,
            marker="o",
            ms=4,
            capsize=2,
            color=plotting.method_colour(model),
            label=plotting.method_label(model),
        )
    ax.set_xlabel("RAFT iteration (0 = policy before RLHF)")
    ax.set_ylabel("greedy accuracy (%)")
    ax.set_xticks(sorted(acc["iteration"].unique()))
    ax.set_title("Fig. 4 · RAFT with each reward model")
    ax.legend(fontsize=7)
    return fig


def _fmt_ci(value: float, low: float, high: float, scale: float = 100) -> str:
    if any(pd.isna(v) for v in (low, high)):
        return f"{value * scale:.1f}"
    return f"{value * scale:.1f} [{low * scale:.1f}, {high * scale:.1f}]"


def summary_table(
    bon: pd.DataFrame,
    paired: pd.DataFrame | None,
    raft: pd.DataFrame | None,
    er_rule: str,
    aggregation: str,
    orm_aggregation: str,
) -> pd.DataFrame:
    """One row per method: best-of-N accuracy at N_max [95% CI], paired difference vs ER, RAFT final accuracy."""
    n_max = int(bon["n"].max())
    rows = []
    methods = headline_methods(bon, er_rule, aggregation, orm_aggregation)
    final_raft = {}
    if raft is not None and not raft.empty:
        acc = raft[raft["metric"] == "greedy_accuracy"]
        for model, grp in acc.groupby("reward_model"):
            last = grp.sort_values("iteration").iloc[-1]
            final_raft[model] = _fmt_ci(last["value"], last["ci_low"], last["ci_high"])
    er_method = f"{er_rule}:{aggregation}"
    for method in methods:
        r = bon[(bon["method"] == method) & (bon["n"] == n_max) & (bon["metric"] == "accuracy")].iloc[0]
        diff = ""
        if paired is not None and method != er_method:
            sel = paired[
                (paired["method_a"] == er_method) & (paired["method_b"] == method) & (paired["n"] == n_max)
            ]
            if not sel.empty:
                d = sel.iloc[0]
                diff = f"{d['diff'] * 100:+.1f} [{d['ci_low'] * 100:+.1f}, {d['ci_high'] * 100:+.1f}], p={d['p_value']:.3g}"
        rule = plotting.split_method(method)[0]
        rows.append(
            {
                "method": "Oracle (pass@N; RAFT on correct picks only)"
                if method == "oracle" and "oracle" in final_raft
                else plotting.method_label(method),
                f"best-of-{n_max} accuracy % [95% CI]": _fmt_ci(r["value"], r["ci_low"], r["ci_high"]),
                "ER-PRM minus this (paired, pts)": diff,
                "RAFT final greedy % [95% CI]": final_raft.get(rule, final_raft.get(method, "")),
            }
        )
    if "baseline" in final_raft:
        rows.append(
            {
                "method": "Policy before RLHF",
                f"best-of-{n_max} accuracy % [95% CI]": "",
                "ER-PRM minus this (paired, pts)": "",
                "RAFT final greedy % [95% CI]": final_raft["baseline"],
            }
        )
    return pd.DataFrame(rows)


def _metric(table: pd.DataFrame | None, metric: str, **where: Any) -> pd.Series | None:
    if table is None or table.empty or "metric" not in table:
        return None
    sel = table[table["metric"] == metric]
    for col, value in where.items():
        sel = sel[sel[col] == value]
    return None if sel.empty else sel.iloc[0]


def summary_facts(
    policy_eval: pd.DataFrame | None,
    accuracy_by_steps: pd.DataFrame | None,
    rollouts: pd.DataFrame | None,
    sweep: pd.DataFrame | None,
    n_problems_pool: int | None = None,
    aggregation: str | None = None,
) -> str:
    """The setting behind the summary table, as Markdown bullets, from the stage tables only: the policy's
    greedy accuracy and pass@k, the rollouts the PRMs learned from, and the eta sweep at N_max. Facts whose
    table is missing are left out."""
    lines = []
    greedy = _metric(policy_eval, "greedy_accuracy")
    if greedy is not None:
        held_out = ""
        if accuracy_by_steps is not None and "n_problems" in accuracy_by_steps:
            held_out = f" on {int(accuracy_by_steps['n_problems'].sum())} held-out problems"
        text = f"- Policy: greedy accuracy {_fmt_ci(greedy['value'], greedy['ci_low'], greedy['ci_high'])} %{held_out}"
        passes = policy_eval[policy_eval["metric"] == "pass_at_k"]
        if not passes.empty:
            top = passes.sort_values("k").iloc[-1]
            text += f"; pass@{int(top['k'])} at temperature 1.0 = {top['value'] * 100:.1f}%"
        lines.append(text + " (`policy_eval.csv`).")
    if rollouts is not None and not rollouts.empty:
        r = dict(zip(rollouts["metric"], rollouts["value"], strict=True))
        if {"problems", "solutions", "prefixes", "completions"} <= set(r):
            k = r["completions"] / r["prefixes"] if r["prefixes"] else float("nan")
            lines.append(
                f"- PRM training data: {int(r['solutions'])} sampled solutions of {int(r['problems'])} problems "
                f"({r.get('solution_accuracy', float('nan')) * 100:.1f}% correct), {k:g} completions per step "
                "prefix; every PRM learns from these same rollouts (`rollouts_summary.csv`)."
            )
    if sweep is not None and not sweep.empty:
        n = int(sweep["n"].max())
        pool = f" on {n_problems_pool} problems" if n_problems_pool else ""
        short = {"soft": "soft", "hard": "hard"}
        parts = [
            f"{short.get(str(row['rule']), 'η=' + str(row['rule']).removeprefix('er_'))} {row['value'] * 100:.1f}"
            for _, row in sweep.iterrows()
        ]
        how = f", {aggregation} aggregation" if aggregation else ""
        lines.append(
            f"- Best-of-{n} accuracy % along the eta sweep{pool}{how}: "
            + ", ".join(parts)
            + " (`eta_sweep.csv`)."
        )
    return "\n".join(lines) + ("\n" if lines else "")


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub Markdown table (no extra dependency)."""
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, row in df.iterrows():
        lines.append("| " + " | ".join("" if pd.isna(v) else str(v) for v in row.tolist()) + " |")
    return "\n".join(lines) + "\n"


def write_summary(profile: str, markdown: str) -> Path:
    """Write ``results/<profile>/summary.md`` atomically."""
    return artifacts.atomic_write_text(artifacts.paths(profile).results / "summary.md", markdown)


def sync_readme(profile: str = "tiny", readme: Path | None = None) -> bool:
    """Copy ``results/<profile>/summary.md`` into README.md between the summary markers; True if changed."""
    readme = readme or artifacts.repo_root() / "README.md"
    summary = artifacts.paths(profile).results / "summary.md"
    if not summary.is_file() or not readme.is_file():
        return False
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        return False
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    new = f"{head}{README_START}\n{summary.read_text().strip()}\n{README_END}{tail}"
    if new != text:
        artifacts.atomic_write_text(readme, new)
    return new != text
