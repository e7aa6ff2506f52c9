"""Every figure of the study, drawn from tidy tables (the stage tables or tables made here).

Fig. 1 label(p, eta) curves; fig. 2 best-of-N accuracy minus greedy decoding with interval bands and a random
pick as a horizontal line, beside the paper's reference curves less its greedy accuracy
(erprm_core/reference/paper_results.csv), on one y-axis and N = 4 to 64; fig. 3
the eta sweep at N_max against the same baselines; fig. 4 RAFT accuracy per iteration beside the paper's
RAFT numbers; the PRM training, calibration and minimum-position figures of 03_train_prm; and the figures
the stage notebooks show (policy training and accuracy, prefix success by steps remaining, label
distribution and the eta explorer of 02, aggregations, and for the synthetic task arith the labels' and the
PRMs' checks against the step-level ground truth). Figs. 5 (paired differences) and 6 (the paper beside this
run) and the ground-truth checks are drawn in :mod:`erprm_core.report.intervals` and named here too. Figs. 1-6
are saved by 06_figures; 02, 04 and 05 show the
same figures inline. Colours, line styles, markers, legend labels and method order come from
:mod:`erprm_core.report.style` only (tests/test_report.py fails a figure that falls back on matplotlib's
colour cycle).
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
from erprm_core.report import intervals, style

# figs. 5 and 6 and the figures of one point per rule are drawn in report/intervals.py; figures.<name> names
# every figure of the study
figure_label_quality = intervals.figure_label_quality
figure_first_error = intervals.figure_first_error
figure_paired_differences = intervals.figure_paired_differences
figure_paper_vs_run = intervals.figure_paper_vs_run
paired_difference_table = intervals.paired_difference_table

RAFT_BASELINE = "baseline"
"""``reward_model`` of the no-RLHF row of the RAFT tables (the value of ``erprm_core.raft.BASELINE``)."""


PAPER_ER = {"er_prm": "er_1"}
"""The paper's ER-PRM drawn as rule ``er_1`` (its colour; legends say "η not stated")."""


def paper_reference() -> pd.DataFrame:
    """The paper's reported numbers (best-of-N read off its figure, RAFT from its table), in percent."""
    with resources.files("erprm_core.reference").joinpath("paper_results.csv").open() as fh:
        return pd.read_csv(fh, comment="#")


def greedy_reference(policy_eval: pd.DataFrame | None, by_steps: pd.DataFrame | None = None) -> dict | None:
    """The policy's greedy accuracy with its 95% interval from 00_policy's ``policy_eval`` table (None when
    the table or the row is missing), as a baseline row for figs. 2 and 3: ``method`` "greedy", ``value``,
    ``ci_low``, ``ci_high``, a legend ``label`` naming its problems and their count ``n_problems`` (from
    ``by_steps``, the ``policy_accuracy_by_steps`` table, when given; else None)."""
    if policy_eval is None or "metric" not in policy_eval:
        return None
    rows = policy_eval[policy_eval["metric"] == "greedy_accuracy"]
    if rows.empty:
        return None
    r = rows.iloc[0]
    count = int(by_steps["n_problems"].sum()) if by_steps is not None and "n_problems" in by_steps else None
    n = f"{count} " if count else ""
    return {"method": "greedy", "value": float(r["value"]), "ci_low": float(r["ci_low"]),
            "ci_high": float(r["ci_high"]), "label": f"Greedy decoding (00_policy, {n}test problems)",
            "n_problems": count}  # fmt: skip


def bon_baselines(bon: pd.DataFrame, n: int, greedy: dict | None = None) -> pd.DataFrame:
    """The horizontal lines of fig. 3: majority vote, random pick and the oracle at N = ``n`` from ``bon``, and
    greedy decoding (a :func:`greedy_reference` row) when given; columns method, value, ci_low, ci_high, label."""
    rows = bon[
        (bon["n"] == n) & (bon["metric"] == "accuracy") & bon["method"].isin(["majority", "random", "oracle"])
    ]
    out = rows[["method", "value", "ci_low", "ci_high"]].assign(label=rows["method"].map(style.method_label))
    if greedy is not None:
        out = pd.concat([out, pd.DataFrame([greedy])], ignore_index=True)
    return out.reset_index(drop=True)


def _hline(ax: plt.Axes, row: Any, scale: float = 1.0) -> None:
    """A horizontal line at ``row["value"]`` with its ``ci_low``..``ci_high`` band (when given), in the method's
    colour and line style, labelled ``row["label"]`` (else the method's label)."""
    method = row["method"]
    colour = style.method_colour(method)
    label = row.get("label") if isinstance(row.get("label"), str) else style.method_label(method)
    # greedy decoding wide and underneath: a baseline at the same height (majority vote) stays visible on it
    wide = method == "greedy"
    ax.axhline(row["value"] * scale, color=colour, ls=style.method_linestyle(method), lw=2.6 if wide else 1.2,
               alpha=0.6 if wide else 1.0, zorder=1.5 if wide else 2, label=label)  # fmt: skip
    low, high = row.get("ci_low"), row.get("ci_high")
    if low is not None and high is not None and not (pd.isna(low) or pd.isna(high)) and high > low:
        ax.axhspan(low * scale, high * scale, color=colour, alpha=0.08, lw=0)


def _direct_labels(ax: plt.Axes, items: Sequence[tuple[float, str, str]], min_gap: float = 0.045) -> None:
    """Name horizontal lines at the right edge of ``ax``: ``items`` are (y in data units, text, colour). Labels
    closer than ``min_gap`` (a fraction of the y range) are pushed apart, so two lines at the same height
    (majority vote and greedy decoding can differ by 0.1 points) both stay readable."""
    low, high = ax.get_ylim()
    gap = min_gap * (high - low)
    placed: list[float] = []
    for y, text, colour in sorted(items, key=lambda item: item[0]):
        at = max(y, placed[-1] + gap) if placed else y
        placed.append(at)
        ax.annotate(text, xy=(1.0, y), xycoords=ax.get_yaxis_transform(), xytext=(1.02, at),
                    textcoords=ax.get_yaxis_transform(), va="center", fontsize=7, color=colour,
                    arrowprops={"arrowstyle": "-", "color": colour, "lw": 0.6} if at != y else None)  # fmt: skip


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
    for rule in labels.method_order(curves["rule"].unique()):
        rows = curves[curves["rule"] == rule]
        thick = rule in ("soft", "hard")
        ax.plot(
            rows["p"],
            rows["label"],
            color=style.method_colour(rule),
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
    """The methods of the headline comparison that exist in ``bon``: ER, hard, soft, ORM, the two verifiers that
    need no training (the policy's likelihood, fewer steps) and the baselines."""
    wanted = [
        f"{er_rule}:{aggregation}",
        f"hard:{aggregation}",
        f"soft:{aggregation}",
        f"orm:{orm_aggregation}",
        "likelihood",
        "fewer_steps",
        "majority",
        "random",
        "oracle",
    ]
    present = set(bon["method"])
    return [m for m in wanted if m in present]


FIG2_N = (4, 64)
"""The N range of every panel of fig. 2: the paper's curves start at N = 4 and end at N = 64."""


def _gain_panel(ax: plt.Axes, curves: pd.DataFrame, methods: Sequence[str], greedy: dict | None) -> None:
    """One panel of fig. 2: ``curves`` (value, optional ci_low / ci_high, in %) of ``methods`` on the log2 N
    axis of :data:`FIG2_N`, less ``greedy["value"]`` (in %) when given, which is then the zero line
    labelled "greedy decoding" (with its own interval as a band, when given)."""
    base = greedy["value"] if greedy is not None else 0.0
    shifted = curves.assign(**{c: curves[c] - base for c in ("value", "ci_low", "ci_high") if c in curves})
    plot_curves_with_bands(shifted, "n", methods, ax=ax)
    if greedy is not None:
        _hline(ax, {**greedy, "value": 0.0, "ci_low": greedy.get("ci_low", base) - base,
                    "ci_high": greedy.get("ci_high", base) - base})  # fmt: skip
        ax.annotate("greedy decoding", xy=(0.01, 0), xycoords=ax.get_yaxis_transform(), xytext=(0, 3),
                    textcoords="offset points", fontsize=7, color=style.method_colour("greedy"))  # fmt: skip
    ns = [n for n in (2**k for k in range(12)) if FIG2_N[0] <= n <= FIG2_N[1]]
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.minorticks_off()
    ax.set_xlim(FIG2_N[0] / 1.25, FIG2_N[1] * 1.25)


def figure_best_of_n(
    bon: pd.DataFrame,
    methods: list[str],
    reference: pd.DataFrame,
    title: str = "This run, 95% CI",
    greedy: dict | None = None,
) -> plt.Figure:
    """Fig. 2: best-of-N accuracy minus greedy-decoding accuracy, in points, for this run (left, with 95%
    bands) beside the paper's GSM8K and MATH500 curves (no intervals published), on one shared y-axis and
    N = 4 to 64 in every panel (the paper's range: this run's N = 1 and 2 are left out).

    This run's greedy is ``greedy`` (a :func:`greedy_reference` row); the paper's is the start policy of its
    RAFT table (``raft,<gsm8k|math>,baseline`` in ``reference``). The zero line is greedy decoding; the bands
    are the intervals of best-of-N accuracy shifted by the greedy value, so the greedy's own uncertainty is
    not in them (it is the band around this run's zero line). A random pick (method ``random``, whose
    accuracy does not depend on N) is a horizontal line. The training-free verifiers (``likelihood``,
    ``fewer_steps``) are drawn when ``methods`` names them. Without ``greedy``, every panel shows raw
    accuracy (%), as the y label says. The legends are below the panels, off the data."""
    fig, axes = plt.subplots(1, 3, figsize=(14, 5.6), sharey=True, gridspec_kw={"width_ratios": [1.3, 1, 1]})
    acc = bon[(bon["metric"] == "accuracy") & bon["n"].between(*FIG2_N)]
    acc = acc.assign(**{c: acc[c] * 100 for c in ("value", "ci_low", "ci_high")})
    run_greedy = None if greedy is None else {**greedy, **{c: greedy[c] * 100 for c in ("value", "ci_low", "ci_high")},
                                               "label": f"{greedy['label']}: {greedy['value'] * 100:.1f}%"}  # fmt: skip
    _gain_panel(axes[0], acc, [m for m in methods if m != "random"], run_greedy)
    random = acc[acc["method"] == "random"]
    if "random" in methods and not random.empty:
        r = random.sort_values("n").iloc[-1]
        shift = run_greedy["value"] if run_greedy is not None else 0.0
        _hline(axes[0], {"method": "random", "value": r["value"] - shift, "ci_low": r["ci_low"] - shift,
                         "ci_high": r["ci_high"] - shift})  # fmt: skip
    axes[0].set_title(title, fontsize=10)
    axes[0].set_xlabel(
        f"N (candidates per problem; N = {FIG2_N[0]} to {FIG2_N[1]}, this run's N < 4 not shown)"
    )
    axes[0].set_ylabel("best-of-N accuracy − greedy decoding (points)" if greedy is not None
                       else "best-of-N accuracy (%), raw: no greedy accuracy in the tables")  # fmt: skip
    for ax, dataset, raft_set, name, where in [
        (axes[1], "gsm8k", "gsm8k", "GSM8K", ""),
        (axes[2], "math500", "math", "MATH500", ", MATH test"),
    ]:
        ref = reference[(reference["experiment"] == "best_of_n") & (reference["dataset"] == dataset)]
        ref = ref[ref["n"].between(*FIG2_N)].rename(columns={"accuracy": "value"})
        ref = ref.assign(method=ref["method"].replace(PAPER_ER))
        start = reference[(reference["experiment"] == "raft") & (reference["dataset"] == raft_set)
                          & (reference["method"] == RAFT_BASELINE)]["accuracy"]  # fmt: skip
        paper_greedy = None if start.empty else {"method": "greedy", "value": float(start.iloc[0]),
                       "label": f"Greedy decoding (its RAFT start policy{where}): {float(start.iloc[0]):g}%"}  # fmt: skip
        _gain_panel(
            ax, ref, labels.method_order(ref["method"].unique()), paper_greedy if greedy is not None else None
        )
        if greedy is None and paper_greedy is not None:
            _hline(ax, paper_greedy)
        ax.set_title(f"Paper, {name} (Mistral-MetaMath-7b, min)", fontsize=10)
        ax.set_xlabel("N")
        for line in ax.get_lines():  # the paper does not say which eta its headline ER-PRM used
            if line.get_label().startswith("ER-PRM"):
                line.set_label("ER-PRM (η not stated)")
    for ax in axes:
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)  # below the panel
    what = "minus greedy decoding" if greedy is not None else "(raw accuracy)"
    fig.suptitle(f"Fig. 2 · best-of-N {what}, N = {FIG2_N[0]} to {FIG2_N[1]} in every panel", fontsize=11)
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


PAPER_BON_PANELS = (("gsm8k", "GSM8K"), ("math500", "MATH500"))
"""Datasets of the paper's best-of-N figure (``paper_results.csv``), one panel each beside fig. 3."""


def paper_sweep_values(reference: pd.DataFrame, n: int, dataset: str) -> dict[str, float]:
    """The paper's best-of-``n`` accuracy (%) of its soft, ER (``er_1`` stands for its ER-PRM, whose eta the
    paper does not state) and hard PRMs on ``dataset``; empty when it reports none at that N."""
    ref = reference[(reference["experiment"] == "best_of_n") & (reference["dataset"] == dataset)
                    & (reference["n"] == n) & reference["method"].isin(["soft", "er_prm", "hard"])]  # fmt: skip
    return dict(zip(ref["method"].replace(PAPER_ER), ref["accuracy"], strict=True))


def figure_eta_sweep(
    sweep: pd.DataFrame, baselines: pd.DataFrame | None = None, reference: pd.DataFrame | None = None
) -> plt.Figure:
    """Fig. 3: accuracy at N_max against eta; soft (eta = 0) and hard (eta = inf) at the two ends; the
    ``baselines`` (:func:`bon_baselines`: majority, random, oracle, greedy) as horizontal lines with bands,
    each in its own dash pattern and named with its value at the right edge (majority vote and greedy
    decoding can lie within 0.1 points). With the paper's numbers (``reference``, :func:`paper_reference`)
    one panel per dataset of its best-of-N figure follows, where it reports this N: its soft, ER and hard
    PRMs (Mistral-MetaMath-7b, min; no intervals published)."""
    n = int(sweep["n"].iloc[0])
    panels = [(name, values) for dataset, name in PAPER_BON_PANELS if reference is not None
              and (values := paper_sweep_values(reference, n, dataset))]  # fmt: skip
    fig, axes = plt.subplots(1, 1 + len(panels), figsize=(6.6 + 2.6 * len(panels), 4.2), squeeze=False,
                             gridspec_kw={"width_ratios": [2.2] + [1] * len(panels)})  # fmt: skip
    ax = axes[0, 0]
    finite = sweep[(sweep["eta"] > 0) & np.isfinite(sweep["eta"])]
    lo = finite["eta"].min() / 4 if len(finite) else 0.025
    hi = finite["eta"].max() * 4 if len(finite) else 40
    x = sweep["eta"].map(lambda e: lo if e == 0 else hi if math.isinf(e) else e)
    y, err = (
        sweep["value"] * 100,
        [(sweep["value"] - sweep["ci_low"]) * 100, (sweep["ci_high"] - sweep["value"]) * 100],
    )
    ax.plot(x, y, color=style.BASE_COLOURS["er"], lw=1.5, zorder=2)
    for xi, yi, low, high, rule in zip(x, y, err[0], err[1], sweep["rule"], strict=True):
        ax.errorbar(xi, yi, yerr=[[low], [high]], color=style.method_colour(rule), marker="o", capsize=3,
                    zorder=3)  # fmt: skip
        if rule in ("soft", "hard"):
            ax.annotate(rule, (xi, yi), textcoords="offset points", xytext=(0, 8), ha="center",
                        color=style.method_colour(rule))  # fmt: skip
    if baselines is not None and len(baselines):
        for _, r in baselines.iterrows():
            _hline(ax, r, scale=100)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.27), ncol=2)
        _direct_labels(ax, [(r["value"] * 100, f"{style.method_label(r['method'])} {r['value'] * 100:.1f}",
                             style.method_colour(r["method"])) for _, r in baselines.iterrows()])  # fmt: skip
    ax.set_xscale("log")
    ticks = [lo, *finite["eta"].tolist(), hi]
    ax.set_xticks(ticks, ["0\n(soft)", *[f"{e:g}" for e in finite["eta"]], "∞\n(hard)"])
    ax.minorticks_off()
    ax.set_xlabel("η")
    ax.set_ylabel(f"best-of-{n} accuracy (%)")
    ax.set_title("Fig. 3 · label rule sweep (95% intervals)", fontsize=10)
    for ax_ref, (name, values) in zip(axes[0, 1:], panels, strict=True):
        _paper_panel(ax_ref, values, None, f"best-of-{n} accuracy (%)", f"Paper, {name}, N={n}")
    fig.tight_layout()
    return fig


PAPER_RAFT_PANELS = (("gsm8k", "GSM8K"), ("math", "MATH"))
"""Datasets of the paper's RAFT table (``paper_results.csv``), one panel each in fig. 4."""


def figure_raft(
    table: pd.DataFrame,
    reference: pd.DataFrame | None = None,
    metric: str = "greedy_accuracy",
    title: str = "Fig. 4 · RAFT with each reward model",
) -> plt.Figure:
    """Fig. 4: greedy accuracy (or another ``metric``) in % per RAFT iteration with interval bars, one line
    per reward model (legend: :func:`~erprm_core.report.style.raft_label`); every line starts at the start
    policy (iteration 0), also drawn as a grey band. With the paper's numbers (``reference``, from
    :func:`paper_reference`) one panel per dataset of its RAFT table follows: its start policy and the
    accuracy after 3 iterations with each reward model (Mistral-MetaMath-7b; no intervals published)."""
    panels = [(d, name) for d, name in PAPER_RAFT_PANELS if reference is not None
              and ((reference["experiment"] == "raft") & (reference["dataset"] == d)).any()]  # fmt: skip
    fig, axes = plt.subplots(1, 1 + len(panels), figsize=(5.6 + 3.2 * len(panels), 3.8), squeeze=False,
                             gridspec_kw={"width_ratios": [1.6] + [1] * len(panels)})  # fmt: skip
    ax = axes[0, 0]
    rows = table[table["metric"] == metric]
    rows = rows.assign(**{c: rows[c] * 100 for c in ("value", "ci_low", "ci_high")})
    base = rows[rows["reward_model"] == RAFT_BASELINE]
    methods = labels.method_order(r for r in rows["reward_model"].unique() if r != RAFT_BASELINE)
    if not base.empty:
        b = base.iloc[0]
        ax.axhspan(b["ci_low"], b["ci_high"], color="0.5", alpha=0.12, lw=0)
        ax.axhline(b["value"], color="0.4", ls="--", lw=1, label=style.raft_label(RAFT_BASELINE))
    width = 0.08
    for k, method in enumerate(methods):
        part = rows[rows["reward_model"] == method].sort_values("iteration")
        if not base.empty:
            part = pd.concat([base.assign(reward_model=method), part])
        dx = (k - (len(methods) - 1) / 2) * width
        err = np.vstack([part["value"] - part["ci_low"], part["ci_high"] - part["value"]])
        ax.errorbar(
            part["iteration"] + dx, part["value"], yerr=np.clip(err, 0, None), marker="o", ms=3, capsize=2,
            lw=1.2, color=style.method_colour(method), label=style.raft_label(method),
        )  # fmt: skip
    ax.set_xlabel("RAFT iteration (0 = starting policy)")
    ax.set_ylabel(metric.replace("_", " ") + " (%)")
    iters = sorted(rows["iteration"].unique())
    if iters:
        ax.set_xticks([int(i) for i in iters])
    ax.set_title(f"{title}: this run (95% intervals)" if panels else title, fontsize=10)
    ax.legend(fontsize=7)
    for ax_ref, (dataset, name) in zip(axes[0, 1:], panels, strict=True):
        _paper_raft_panel(ax_ref, reference, dataset, name)
    fig.tight_layout()
    return fig


def _paper_raft_panel(ax: plt.Axes, reference: pd.DataFrame, dataset: str, name: str) -> None:
    """The paper's RAFT result on one dataset: its start policy as a dashed line, the accuracy after RAFT with
    each reward model as a labelled point."""
    ref = reference[(reference["experiment"] == "raft") & (reference["dataset"] == dataset)]
    values = dict(zip(ref["method"].replace(PAPER_ER), ref["accuracy"], strict=True))
    start = values.pop(RAFT_BASELINE, None)
    _paper_panel(ax, values, start, "greedy accuracy after RAFT (%)",
                 f"Paper, {name} (Mistral-MetaMath-7b, 3 iterations)")  # fmt: skip


def _paper_panel(
    ax: plt.Axes, values: dict[str, float], start: float | None, ylabel: str, title: str
) -> None:
    """The paper's numbers (no intervals published) as one labelled point per method of ``values`` (``er_1``
    stands for its ER-PRM, whose eta it does not state), in rule order; ``start`` (its start policy), when
    given, as a dashed line."""
    if start is not None:
        ax.axhline(start, color="0.4", ls="--", lw=1, label=f"{style.raft_label(RAFT_BASELINE)} {start:g}")
    order = labels.method_order(values)
    for x, method in enumerate(order):
        ax.plot(x, values[method], "o", color=style.method_colour(method))
        ax.annotate(f"{values[method]:g}", (x, values[method]), textcoords="offset points", xytext=(0, 6),
                    ha="center", fontsize=8)  # fmt: skip
    names = ["ER-PRM (η not stated)" if m == "er_1" else style.method_label(m) for m in order]
    ax.set_xticks(range(len(order)), names, rotation=30, ha="right", fontsize=8)
    ax.set_xlim(-0.5, len(order) - 0.5)
    top = max([*values.values(), start or 0])
    bottom = min([*values.values(), start if start is not None else top])
    ax.set_ylim(bottom - 1.5, top + 1.5)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    if start is not None:
        ax.legend(fontsize=7, loc="lower right")


def figure_training_curves(
    log: pd.DataFrame, smooth: int = 1, heldout: pd.DataFrame | None = None
) -> plt.Figure:
    """Training loss against optimizer step, one line per rule (rolling mean over ``smooth`` steps).

    Cross-entropy against soft targets cannot fall below the mean binary entropy of the targets, which is 0
    for hard and ORM labels but not for soft or ER ones; so with a ``loss_floor`` column in ``log`` (that
    entropy for the rule's training labels) each rule is drawn as its loss minus its floor, which goes to 0
    for every rule. Without it the raw loss is drawn and the axis says the floors are missing. With
    ``heldout`` (03's ``prm_eval`` rows), each rule's held-out ``excess_cross_entropy`` (or raw
    ``cross_entropy`` without floors) is a marker at its last step: the gap to the line is overfitting."""
    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    floored = "loss_floor" in log and log["loss_floor"].notna().all()
    held = None
    if heldout is not None and len(heldout):
        name = "excess_cross_entropy" if floored else "cross_entropy"
        held = heldout[heldout["metric"] == name].set_index("rule")["value"]
    for rule in labels.method_order(log["rule"].unique()):
        g = log[log["rule"] == rule].sort_values("step")
        loss = g["loss"] - g["loss_floor"] if floored else g["loss"]
        colour = style.method_colour(rule)
        ax.plot(
            g["step"],
            loss.rolling(max(1, smooth), min_periods=1).mean(),
            color=colour,
            ls=style.method_linestyle(rule),
            label=style.method_label(rule),
        )
        if held is not None and rule in held.index:
            ax.plot([g["step"].max()], [held[rule]], marker="o", mfc="white", color=colour, ls="none")
    if held is not None and len(held):
        ax.plot([], [], marker="o", mfc="white", color="0.3", ls="none", label="held-out problems (end)")
    ax.set_xlabel("optimizer step")
    if floored:
        ax.axhline(0, color="0.6", lw=1, ls=":")
        ax.set_ylabel("cross-entropy − its floor\n(mean binary entropy of the rule's labels)")
    else:
        ax.set_ylabel("soft-label cross-entropy\n(floors not in the table: soft/ER cannot reach 0)")
    ax.set_title("PRM training")
    ax.legend(fontsize=7, ncol=2)
    return fig


def figure_calibration(calibration: pd.DataFrame, rules: Sequence[str] | None = None) -> plt.Figure:
    """Reliability diagrams: mean step score vs mean label per score bin, one panel per rule; each point's
    area grows with its bin's ``count`` (the number is written beside it) and, when the table has ``ci_low``
    / ``ci_high`` (an interval of the mean label), it carries that interval as an error bar."""
    rules = labels.method_order(rules if rules is not None else calibration["rule"].unique())
    cols = min(3, len(rules)) or 1
    rows = -(-len(rules) // cols) or 1
    fig, axes = plt.subplots(
        rows, cols, figsize=(3.0 * cols, 2.8 * rows), squeeze=False, sharex=True, sharey=True
    )
    for ax in axes.ravel()[len(rules) :]:
        ax.set_visible(False)
    largest = max(float(calibration["count"].max()), 1.0)
    intervals = {"ci_low", "ci_high"} <= set(calibration.columns)
    for ax, rule in zip(axes.ravel(), rules, strict=False):
        g = calibration[(calibration["rule"] == rule) & (calibration["count"] > 0)]
        colour = style.method_colour(rule)
        ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--")
        ax.plot(g["mean_pred"], g["mean_target"], color=colour, lw=1)
        if intervals:
            err = np.vstack([g["mean_target"] - g["ci_low"], g["ci_high"] - g["mean_target"]])
            ax.errorbar(g["mean_pred"], g["mean_target"], yerr=np.clip(err, 0, None), fmt="none",
                        ecolor=colour, elinewidth=0.8, capsize=1.5)  # fmt: skip
        ax.scatter(g["mean_pred"], g["mean_target"], s=6 + 60 * g["count"] / largest, color=colour, zorder=3)
        for xi, yi, c in zip(g["mean_pred"], g["mean_target"], g["count"], strict=True):
            ax.annotate(f"{int(c)}", (xi, yi), textcoords="offset points", xytext=(3, -8), fontsize=5,
                        color="0.35")  # fmt: skip
        ax.set_title(f"{style.method_label(rule)} ({int(g['count'].sum())} steps)", fontsize=9)
    for ax in axes[-1]:
        ax.set_xlabel("mean step score")
    for ax in axes[:, 0]:
        ax.set_ylabel("mean label")
    note = "95% intervals; " if intervals else ""
    fig.suptitle(f"Held-out calibration against each rule's own labels ({note}point area, number: steps in the "
                 "bin)", fontsize=10)  # fmt: skip
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


def figure_policy_accuracy(
    table: pd.DataFrame, by_steps: pd.DataFrame, n_sample_problems: int | None = None
) -> plt.Figure:
    """Greedy accuracy by number of steps (left) and pass@k against greedy (right), from the policy
    evaluation ``table`` (``policy_eval``) and ``by_steps`` (``policy_accuracy_by_steps``) of 00_policy.

    Greedy decoding runs on every test problem, pass@k on the first ``n_sample_problems`` of them (00's
    ``n_passk_problems``; a ``n_problems`` column of the pass@k rows wins when the table has one): the labels
    say on how many each was measured. The k axis is logarithmic with the k values as ticks."""
    passk = table[table["metric"] == "pass_at_k"].sort_values("k")
    greedy = table[table["metric"] == "greedy_accuracy"].iloc[0]
    n_all = int(by_steps["n_problems"].sum()) if "n_problems" in by_steps else None
    if "n_problems" in passk and passk["n_problems"].notna().any():
        n_sample_problems = int(passk["n_problems"].max())
    n_passk = min(n_sample_problems or n_all, n_all) if n_all else n_sample_problems  # 0: all problems
    colour = style.method_colour("greedy")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9.4, 3.4))
    ax1.errorbar(
        by_steps["n_steps"],
        by_steps["accuracy"],
        yerr=[by_steps["accuracy"] - by_steps["ci_low"], by_steps["ci_high"] - by_steps["accuracy"]],
        marker="o",
        color=colour,
        capsize=3,
    )
    ax1.set(
        xlabel="arithmetic steps", ylabel="greedy accuracy", ylim=(0, 1),
        title=f"Greedy accuracy by steps ({n_all} problems)" if n_all else "Greedy accuracy by steps",
    )  # fmt: skip
    ax1.set_xticks(sorted(int(v) for v in by_steps["n_steps"]))
    oracle = style.method_colour("oracle")
    ax2.fill_between(passk["k"], passk["ci_low"], passk["ci_high"], alpha=0.2, color=oracle, lw=0)
    on = f"first {n_passk} test problems" if n_passk else "the first test problems"
    on = f"all {n_passk} test problems" if n_passk and n_passk == n_all else on
    ax2.plot(passk["k"], passk["value"], marker="o", color=oracle, label=f"pass@k (T=1), {on}")
    on_all = f"all {n_all} test problems" if n_all else "all test problems"
    ax2.axhline(greedy["value"], ls=style.method_linestyle("greedy"), color=colour, label=f"greedy, {on_all}")
    ax2.set(xscale="log", xlabel="k (samples per problem)", ylabel="accuracy", ylim=(0, 1), title="pass@k")
    ks = [int(k) for k in passk["k"]]
    if ks:
        ax2.set_xticks(ks, [str(k) for k in ks])
        ax2.set_xlim(ks[0] / 1.5, ks[-1] * 1.5)
    ax2.minorticks_off()
    ax2.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def figure_prefix_success(prefixes: pd.DataFrame) -> plt.Figure:
    """Mean p (share of a prefix's completions that reach the answer) against the steps remaining after the
    prefix (``n_steps - step``; 1 = only the last step is left), for solutions that end right and wrong, with
    95% intervals (normal approximation over prefixes); below, how many prefixes each point averages
    (01_rollouts' ``rollouts_prefixes`` table). Counting from the end lines up problems of different lengths,
    which the absolute step index mixes."""
    g = (
        prefixes.assign(remaining=prefixes["n_steps"] - prefixes["step"])
        .groupby(["outcome", "remaining"])["p"]
        .agg(["mean", "std", "count"])
        .reset_index()
    )
    fig, (ax, ax_n) = plt.subplots(
        2, 1, figsize=(5.6, 4.8), sharex=True, gridspec_kw={"height_ratios": [3, 1.4]}
    )
    outcomes = ((1, "correct solutions", style.OUTCOME_COLOURS["correct"]),
                (0, "wrong solutions", style.OUTCOME_COLOURS["wrong"]))  # fmt: skip
    for k, (outcome, name, colour) in enumerate(outcomes):
        r = g[g["outcome"] == outcome]
        if r.empty:
            continue
        half = 1.96 * r["std"].fillna(0.0) / np.sqrt(r["count"])
        ax.errorbar(r["remaining"], r["mean"], yerr=half, marker="o", ms=3, capsize=2, color=colour,
                    label=f"{name} ({int(r['count'].sum())} prefixes)")  # fmt: skip
        x = r["remaining"] + (k - 0.5) * 0.38
        ax_n.bar(x, r["count"], width=0.38, color=colour, alpha=0.7)
        for xi, n in zip(x, r["count"], strict=True):
            ax_n.annotate(
                f"{int(n)}", (xi, n), textcoords="offset points", xytext=(0, 1), ha="center", fontsize=6
            )
    ax.set(ylabel="mean p over prefixes", ylim=(-0.02, 1.02))
    ax.set_title("Monte Carlo success of a prefix (95% intervals)", fontsize=10)
    ax.legend(fontsize=7)
    ax_n.set(xlabel="steps remaining after the prefix (n_steps − l)", ylabel="prefixes")
    ax_n.set_xticks(sorted(int(v) for v in g["remaining"].unique()))
    ax_n.margins(y=0.25)
    fig.tight_layout()
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


def figure_label_explorer(
    example: pd.DataFrame, distribution: pd.DataFrame, rules: Sequence[str]
) -> plt.Figure:
    """Labels under each rule of ``rules`` (soft, some etas, hard): one solution step by step (left; a
    ``worked_example_table`` of 02_labels, whose ``truth`` column, when present, shades the steps at and after
    the first error) and the share of all labelled steps per label bin (right; a ``label_distribution``
    table). 02_labels draws it for a fixed eta grid, and its slider for any eta."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [1, 1.4]})
    steps = example["step"].to_numpy()
    if "truth" in example:
        for step, truth in zip(steps, example["truth"], strict=True):
            if truth != "right":
                ax1.axvspan(step - 0.5, step + 0.5, color=style.OUTCOME_COLOURS["wrong"], alpha=0.1, lw=0)
        marks = example["truth"].map(
            lambda t: "right" if t == "right" else "wrong" if t.startswith("WRONG") else "after"
        )
        ax1.set_xticks(steps, [f"{s}\n{m}" for s, m in zip(steps, marks, strict=True)])
    else:
        ax1.set_xticks(steps)
    bins = list(dict.fromkeys(distribution["bin"]))
    for rule in labels.method_order(rules):
        colour, ls, name = style.method_colour(rule), style.method_linestyle(rule), style.method_label(rule)
        if rule in example:
            ax1.plot(steps, example[rule], marker="o", ms=4, color=colour, ls=ls, label=name)
        share = distribution[distribution["rule"] == rule].set_index("bin").reindex(bins)["share"]
        ax2.plot(range(len(bins)), share, marker="o", ms=4, color=colour, ls=ls, label=name)
    ax1.set(xlabel="step (ground truth)" if "truth" in example else "step", ylabel="label", ylim=(-0.03, 1.03),
            xlim=(steps.min() - 0.5, steps.max() + 0.5))  # fmt: skip
    ax1.set_title("The worked example" + (" (shaded: at or after the first error)" if "truth" in example else ""),
                  fontsize=9)  # fmt: skip
    ax2.set_xticks(range(len(bins)), bins, rotation=30, ha="right", fontsize=7)
    ax2.set(xlabel="label bin (0 and 1 on their own)", ylabel="share of labelled steps")
    ax2.set_title("All labelled steps", fontsize=9)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    return fig


def figure_aggregations(agg: pd.DataFrame, n_max: int, aggregations: Sequence[str]) -> plt.Figure:
    """Best-of-``n_max`` accuracy per rule under each step-score aggregation in ``aggregations`` (in that
    order; the stages pass ``erprm_core.prm.AGGREGATIONS``), from ``aggregation_table`` (04_best_of_n): the
    rule's colour, one marker per aggregation (:data:`~erprm_core.report.style.AGGREGATION_MARKERS`)."""
    fig, ax = plt.subplots(figsize=(7, 3.6))
    rules = labels.method_order(agg["rule"].unique())
    width = 0.15
    for k, how in enumerate(aggregations):
        r = agg[agg["aggregation"] == how].set_index("rule").reindex(rules)
        x = np.arange(len(rules)) + width * (k - (len(aggregations) - 1) / 2)
        marker = style.AGGREGATION_MARKERS.get(how, "o")
        for xi, rule in zip(x, rules, strict=True):
            row = r.loc[rule]
            if pd.isna(row["value"]):
                continue
            err = [[(row["value"] - row["ci_low"]) * 100], [(row["ci_high"] - row["value"]) * 100]]
            ax.errorbar(xi, row["value"] * 100, yerr=err, fmt=marker, ms=5, capsize=2,
                        color=style.method_colour(rule))  # fmt: skip
        ax.plot([], [], marker, color="0.2", ls="none", label=how)  # legend entry: the marker, neutral colour
    ax.set_xticks(np.arange(len(rules)), [style.method_label(x) for x in rules], rotation=25, ha="right")
    ax.set(ylabel=f"best-of-{n_max} accuracy (%)", title="Aggregation of step scores (95% intervals)")
    ax.legend(fontsize=8, title="aggregation")
    return fig


def figure_processbench_sweep(
    sweep: pd.DataFrame, threshold: float | None = None, title: str = "", by: str = "split"
) -> plt.Figure:
    """ProcessBench F1 against the threshold from a ``<stem>_sweep.csv`` / ``step_eval_sweep`` table, one line
    per value of column ``by``: a split (with the mean of the splits when there are several), or a PRM (in
    rule order, in the rule's colour and line style; with several splits, each PRM's mean over the splits).
    The table's ``f1_low`` / ``f1_high`` (an interval of F1), when present, are drawn as bands (for one
    split). A dotted line marks ``threshold``."""
    fig, ax = plt.subplots(figsize=(5.6, 3.6))
    splits = list(dict.fromkeys(sweep["split"])) if "split" in sweep else []
    bands = {"f1_low", "f1_high"} <= set(sweep.columns)
    if by == "prm" and len(splits) > 1:  # one line per PRM: its mean over the splits, without intervals
        sweep = sweep.groupby(["prm", "threshold"], as_index=False)["f1"].agg(lambda f: f.mean(skipna=False))
        bands = False
        title = f"{title} (mean of {len(splits)} splits)" if title else title
    names = labels.method_order(sweep[by].unique()) if by == "prm" else list(dict.fromkeys(sweep[by]))
    colours = style.series_colours(names)
    for name in names:
        g = sweep[sweep[by] == name].sort_values("threshold")
        ls = style.method_linestyle(name) if by == "prm" else "-"
        label = style.method_label(name) if by == "prm" else name
        ax.plot(g["threshold"], g["f1"], marker="o", ms=3, ls=ls, color=colours[name], label=label)
        if bands and g["f1_low"].notna().any():
            ax.fill_between(g["threshold"], g["f1_low"], g["f1_high"], color=colours[name], alpha=0.1, lw=0)
    if len(names) > 1 and by == "split":
        mean = sweep.groupby("threshold")["f1"].agg(lambda f: f.mean(skipna=False)).sort_index()
        ax.plot(mean.index, mean.to_numpy(), color="black", ls="--", lw=1.5, label="mean of splits")
    if threshold is not None:
        ax.axvline(threshold, color="0.5", ls=":", lw=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("threshold (a step scored below it is the first error)")
    ax.set_ylabel("ProcessBench F1" + (" (95% bands)" if bands else ""))
    ax.set_title(title or "ProcessBench F1 against the threshold", fontsize=9)
    ax.legend(fontsize=7, ncol=2 if len(names) > 5 else 1)
    fig.tight_layout()
    return fig
