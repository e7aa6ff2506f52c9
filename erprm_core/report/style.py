"""One plotting style for every figure: fixed method colours, legend labels and line styles, PNG + PDF
without timestamps, and figures shown inline in notebooks (:func:`shown`).

Methods are named as in the tables: label rules (``soft``, ``er_<eta>``, ``hard``, ``orm``), optionally with
an aggregation suffix (``er_1:min``), and best-of-N baselines (``random``, ``majority``, ``oracle``,
``weighted_<method>``); :func:`erprm_core.labels.parse_method` reads them and
:func:`erprm_core.labels.method_order` orders them. Used by :mod:`erprm_core.report.figures` and the
notebooks."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from io import BytesIO
from pathlib import Path

import matplotlib


def _ipython_shell() -> object | None:
    """The running IPython shell (a notebook kernel's, or a terminal's), None outside IPython."""
    ipython = sys.modules.get("IPython")
    return ipython.get_ipython() if ipython is not None else None


if "ipykernel" not in type(_ipython_shell()).__module__:
    matplotlib.use("Agg")  # headless; in a notebook kernel its backend (inline, from MPLBACKEND) stays
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from erprm_core import io, labels  # noqa: E402

BASE_COLOURS = {
    "soft": "#1f77b4",
    "hard": "#d62728",
    "orm": "#7f7f7f",
    "er": "#2ca02c",
    "random": "#000000",
    "majority": "#9467bd",
    "oracle": "#bcbd22",
    "greedy": "#8c564b",
    "likelihood": "#17becf",
    "fewer_steps": "#e377c2",
}
_ER_CMAP = "viridis"
ER_ETAS = (0.1, 0.5, 1, 2, 5, 10)
"""The etas that span the ER colour scale (log eta from the first to the last); others take the end shades,
so a rule has the same colour in every figure whatever grid a run used."""
OUTCOME_COLOURS = {"correct": "#1b7837", "wrong": "#b2182b"}
"""Right and wrong (solutions by outcome, steps against the ground truth): darker than soft blue / hard red."""
OTHER_COLOURS = ("#d95f02", "#7570b3", "#e7298a", "#e6ab02", "#1b9e77", "#a6761d")
"""Series that are no label rule or baseline (ProcessBench splits, released PRMs), in order of appearance
(ColorBrewer's Dark2: none is a colour of matplotlib's default cycle, whose leftovers a test catches)."""
SOURCE_COLOURS = {"paper_gsm8k": OTHER_COLOURS[0], "paper_math500": OTHER_COLOURS[1], "this_run": "#000000"}
"""The paper's numbers (per dataset) and this run's, where they stand side by side (fig. 6)."""
AGGREGATION_MARKERS = {"min": "o", "prod": "s", "last": "^", "mean": "D"}
"""Marker per step-score aggregation (colour stays the rule's)."""


def interactive() -> bool:
    """Whether a notebook may show widgets (02_labels' eta slider): only in a notebook kernel whose environment
    has ``ERPRM_INTERACTIVE=1`` (:data:`erprm_core.io.INTERACTIVE_ENV`), which `make lab` sets. Everywhere
    else (papermill, nbval, `erprm reproduce`, a plain `jupyter lab`) notebooks draw static figures, so an
    executed notebook never holds widget state."""
    return os.environ.get(io.INTERACTIVE_ENV) == "1" and "ipykernel" in type(_ipython_shell()).__module__


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


def method_label(method: str) -> str:
    """Human-readable legend label: ``er_1`` -> ``ER-PRM (η=1)``, ``hard`` -> ``Hard-label PRM``."""
    rule, agg, weighted = labels.parse_method(method)
    names = {
        "soft": "Soft-label PRM",
        "hard": "Hard-label PRM",
        "orm": "ORM",
        "random": "Random pick",
        "majority": "Majority vote",
        "oracle": "Oracle pass@N",
        "greedy": "Greedy decoding",
        "likelihood": "Policy likelihood (no training)",
        "fewer_steps": "Fewer steps (no training)",
        "baseline": "No RLHF",
    }
    if rule in names:
        text = names[rule]
    elif rule.startswith("er_"):
        text = f"ER-PRM (η={labels.eta_text(rule)})"
    else:
        text = rule
    if weighted:
        text = f"{text}, weighted vote"
    return f"{text} [{agg}]" if agg else text


RAFT_LABELS = {
    "oracle": "RAFT with oracle reward (correct picks)",
    "random": "RAFT with random pick (no reward)",
    "baseline": "Start policy (no RLHF)",
}
"""Legend labels of the RAFT controls, whose best-of-N names would mislead (the oracle is no pass@N there)."""


def raft_label(reward_model: str) -> str:
    """Legend label of a RAFT run guided by ``reward_model``: :data:`RAFT_LABELS` for the controls, else
    :func:`method_label` (``er_1`` -> ``ER-PRM (η=1)``)."""
    return RAFT_LABELS.get(reward_model) or method_label(reward_model)


def method_colour(method: str, etas: Sequence[float] = ER_ETAS) -> str:
    """Fixed colour per method; ER rules take a viridis shade by log(eta) so sweeps read left to right;
    anything else (a released PRM) the first of :data:`OTHER_COLOURS` (:func:`series_colours` tells them
    apart)."""
    rule, _, _ = labels.parse_method(method)
    if rule in BASE_COLOURS:
        return BASE_COLOURS[rule]
    eta = labels.rule_eta(rule, default=None)
    if eta is not None and math.isfinite(eta) and eta > 0:
        lo, hi = math.log(min(etas)), math.log(max(etas))
        frac = 0.5 if hi == lo else (math.log(eta) - lo) / (hi - lo)
        return matplotlib.colors.to_hex(plt.get_cmap(_ER_CMAP)(0.15 + 0.7 * min(max(frac, 0.0), 1.0)))
    return OTHER_COLOURS[0]


def series_colours(names: Sequence[str]) -> dict[str, str]:
    """A colour per name: a label rule or baseline keeps :func:`method_colour`; the other names (ProcessBench
    splits, released PRMs) take :data:`OTHER_COLOURS` in the order given."""
    out, k = {}, 0
    for name in names:
        rule = labels.parse_method(name)[0]
        if rule in BASE_COLOURS or labels.rule_eta(rule, default=None) is not None:
            out[name] = method_colour(name)
        else:
            out[name] = OTHER_COLOURS[k % len(OTHER_COLOURS)]
            k += 1
    return out


def method_linestyle(method: str) -> str | tuple:
    """Solid for reward models; dotted for the oracle; for the other baselines and votes a dash pattern
    each (greedy dash-dot), so two baselines at the same height stay visible."""
    rule, _, weighted = labels.parse_method(method)
    if rule == "oracle" and not weighted:
        return ":"
    if rule == "greedy":
        return "-."
    if rule in ("random", "majority") or weighted:
        return "--"
    if rule in ("likelihood", "fewer_steps"):
        return (0, (5, 1, 1, 1))  # dash-dot-dot: training-free verifiers, neither baseline nor PRM
    return "-"


def save_figure(fig: plt.Figure, folder: Path | str, name: str) -> list[Path]:
    """Save ``fig`` as ``folder/name.png`` and ``.pdf`` with no timestamps or software versions inside."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    png, pdf = folder / f"{name}.png", folder / f"{name}.pdf"
    fig.savefig(png, bbox_inches="tight", metadata={"Software": None})
    fig.savefig(pdf, bbox_inches="tight", metadata={"CreationDate": None, "Producer": None, "Creator": None})
    return [png, pdf]


def shown(fig: Figure, folder: Path | str | None = None, name: str | None = None) -> Figure:
    """Save ``fig`` with :func:`save_figure` when ``folder`` and ``name`` are given, close it, and return it.

    A notebook cell that ends with the returned figure shows it inline, once: closed, it is not drawn again
    at the end of the cell, and IPython shows a figure as PNG (:func:`_register_png_display`).
    """
    if folder is not None and name is not None:
        save_figure(fig, folder, name)
    plt.close(fig)
    return fig


def _png(fig: Figure) -> bytes:
    buffer = BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight", metadata={"Software": None})
    return buffer.getvalue()


def _register_png_display() -> None:
    """Make IPython show a Figure as PNG when the backend has not (e.g. Agg chosen by ``MPLBACKEND``): a cell
    that ends with a figure, or ``display(fig)``, then shows the image, not ``<Figure size ...>``."""
    shell = _ipython_shell()
    if shell is None:
        return
    formatter = shell.display_formatter.formatters["image/png"]  # type: ignore[attr-defined]
    try:
        formatter.lookup_by_type(Figure)
    except KeyError:
        formatter.for_type(Figure, _png)


_register_png_display()
