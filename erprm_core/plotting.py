"""One plotting style for every figure: fixed method colours and order, PNG + PDF without timestamps.

Methods are named as in the tables: label rules (``soft``, ``er_<eta>``, ``hard``, ``orm``), optionally with
an aggregation suffix (``er_1:min``), and best-of-N baselines (``random``, ``majority``, ``oracle``,
``weighted_<method>``). Used by the notebooks and by 06_figures, which draws only from tables.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless; notebooks still display figures returned to them
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from erprm_core import labels  # noqa: E402

BASE_COLOURS = {
    "soft": "#1f77b4",
    "hard": "#d62728",
    "orm": "#7f7f7f",
    "er": "#2ca02c",
    "random": "#000000",
    "majority": "#9467bd",
    "oracle": "#bcbd22",
}
_ER_CMAP = "viridis"


def set_style() -> None:
    """Apply the kit's matplotlib style (called on import of this module)."""
    plt.rcParams.update(
        {
            "figure.dpi": 110,
            "savefig.dpi": 150,
            "axes.grid": True,
            "grid.alpha": 0.3,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "legend.frameon": False,
            "font.size": 10,
            "svg.hashsalt": "erprm",
        }
    )


set_style()


def split_method(method: str) -> tuple[str, str | None]:
    """``"er_1:min"`` -> ``("er_1", "min")``; ``"hard"`` -> ``("hard", None)``."""
    base, _, agg = method.partition(":")
    return base, agg or None


def _eta_of(rule: str) -> float | None:
    try:
        return labels.rule_eta(rule)
    except ValueError:
        return None


def method_label(method: str) -> str:
    """Human-readable legend label: ``er_1`` -> ``ER-PRM (η=1)``, ``hard`` -> ``Hard-label PRM``."""
    base, agg = split_method(method)
    weighted = base.startswith("weighted_")
    rule = base.removeprefix("weighted_")
    names = {
        "soft": "Soft-label PRM",
        "hard": "Hard-label PRM",
        "orm": "ORM",
        "random": "Random pick",
        "majority": "Majority vote",
        "oracle": "Oracle pass@N",
        "baseline": "No RLHF",
    }
    if rule in names:
        text = names[rule]
    elif rule.startswith("er_"):
        text = f"ER-PRM (η={rule[3:]})"
    else:
        text = rule
    if weighted:
        text = f"{text}, weighted vote"
    return f"{text} [{agg}]" if agg else text


def method_colour(method: str, etas: Sequence[float] = (0.1, 0.5, 1, 2, 5, 10)) -> str:
    """Fixed colour per method; ER rules take a viridis shade by log(eta) so sweeps read left to right."""
    base, _ = split_method(method)
    rule = base.removeprefix("weighted_")
    if rule in BASE_COLOURS:
        return BASE_COLOURS[rule]
    eta = _eta_of(rule)
    if eta is not None and math.isfinite(eta) and eta > 0:
        lo, hi = math.log(min(etas)), math.log(max(etas))
        frac = 0.5 if hi == lo else (math.log(eta) - lo) / (hi - lo)
        return matplotlib.colors.to_hex(plt.get_cmap(_ER_CMAP)(0.15 + 0.7 * min(max(frac, 0.0), 1.0)))
    return "#17becf"


def method_order(methods: Iterable[str]) -> list[str]:
    """Sort methods: soft, ER by increasing eta, hard, ORM, then baselines, then weighted votes."""

    def key(method: str) -> tuple[int, float, str]:
        base, agg = split_method(method)
        if base.startswith("weighted_"):
            return (5, 0.0, method)
        eta = _eta_of(base)
        if eta is not None:
            return (1, eta, agg or "")
        rank = {"orm": 2, "majority": 3, "random": 4, "oracle": 6}.get(base, 7)
        return (rank, 0.0, method)

    return sorted(set(methods), key=key)


def method_linestyle(method: str) -> str:
    """Dashed for baselines and votes, dotted for the oracle, solid for reward models."""
    base, _ = split_method(method)
    if base == "oracle":
        return ":"
    if base in ("random", "majority") or base.startswith("weighted_"):
        return "--"
    return "-"


def save_figure(fig: plt.Figure, folder: Path | str, name: str) -> list[Path]:
    """Save ``fig`` as ``folder/name.png`` and ``.pdf`` with no timestamps or software versions inside."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    png, pdf = folder / f"{name}.png", folder / f"{name}.pdf"
    fig.savefig(png, bbox_inches="tight", metadata={"Software": None})
    fig.savefig(pdf, bbox_inches="tight", metadata={"CreationDate": None, "Producer": None, "Creator": None})
    return [png, pdf]


def plot_label_curves(
    etas: Sequence[float] = (0.1, 0.5, 1, 2, 5, 10), ax: plt.Axes | None = None
) -> plt.Figure:
    """label(p, eta) = (1/eta) ln(1 - p + p e^eta) for binary rewards, with the soft and hard limits."""
    if ax is None:
        fig, ax = plt.subplots(figsize=(4.8, 3.6))
    fig = ax.figure
    p = np.linspace(0, 1, 201)
    ax.plot(p, p, color=BASE_COLOURS["soft"], lw=2, label="soft (η→0): p")
    for eta in etas:
        ax.plot(
            p,
            labels.er_label_from_fraction(p, eta),
            color=method_colour(labels.rule_name(eta), etas),
            label=f"η={eta:g}",
        )
    ax.plot(p, (p > 0).astype(float), color=BASE_COLOURS["hard"], lw=2, ls="--", label="hard (η→∞): 1[p>0]")
    ax.set_xlabel("p = fraction of the k completions that reach the right answer")
    ax.set_ylabel("step label")
    ax.set_title("ER label vs p")
    ax.legend(fontsize=8, loc="lower right")
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
    methods = method_order(methods if methods is not None else table["method"].unique())
    for method in methods:
        rows = table[table["method"] == method].sort_values(x)
        if rows.empty:
            continue
        colour = method_colour(method)
        ax.plot(
            rows[x],
            rows["value"],
            marker="o",
            ms=3,
            color=colour,
            ls=method_linestyle(method),
            label=method_label(method),
        )
        if {"ci_low", "ci_high"} <= set(rows.columns) and rows["ci_low"].notna().any():
            ax.fill_between(rows[x], rows["ci_low"], rows["ci_high"], color=colour, alpha=0.12, lw=0)
    if log2_x:
        ax.set_xscale("log", base=2)
    ax.legend(fontsize=7)
    return fig
