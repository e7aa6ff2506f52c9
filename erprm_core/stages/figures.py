"""Stage 06_figures: every paper figure and the summary table, from the stage tables only.

:func:`run` reads ``results/<profile>/tables`` (written by 00-05) and the paper's reported numbers, writes the
tables ``label_curves`` and ``eta_sweep``, saves figs. 1-4 (PNG + PDF; the only files of these figures: 02, 04
and 05 show the same figures inline without saving them) and writes ``summary.md`` (which README.md
includes). ``erprm figures --profile <profile>`` reruns it alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from erprm_core.report import figures, style, summary
from erprm_core.running import artifacts
from erprm_core.running.config import parse_eta_grid
from erprm_core.stages._common import StageConfig, repo_relative

FACT_TABLES = ("policy_eval", "policy_accuracy_by_steps", "rollouts_summary", "bon_ranking")
"""Tables of the earlier stages that the summary's facts (and the greedy lines of figs. 2 and 3) use when they
exist."""


@dataclass(frozen=True)
class FiguresConfig(StageConfig):
    """The knobs of 06_figures (the notebook's parameters cell)."""

    profile: str = "smoke"
    """results/<profile> folder to read tables from and write figures to"""
    er_rule: str = "er_1"
    """the ER-PRM label rule of the headline comparison (fixed before looking at results)"""
    aggregation: str = "min"
    """step-score aggregation of the PRMs in the headline (the paper uses min)"""
    orm_aggregation: str = "last"
    """the ORM scores a solution at its last step"""
    label_etas: str = "0,0.1,0.5,1,2,5,10,inf"
    """etas drawn in fig. 1"""


@dataclass
class FiguresResult:
    """What :func:`run` returns: the figures (already saved and closed; a notebook cell that ends with one
    shows it), their files (relative to the repository root), the tables it wrote, the RAFT table it read and
    the summary."""

    figures: dict[str, plt.Figure] = field(default_factory=dict)
    files: dict[str, list[str]] = field(default_factory=dict)
    curves: pd.DataFrame | None = None
    sweep: pd.DataFrame | None = None
    raft: pd.DataFrame | None = None
    summary: pd.DataFrame | None = None
    summary_markdown: str = ""


def _save(res: FiguresResult, fig: plt.Figure, folder: Path, name: str) -> None:
    res.figures[name] = style.shown(fig, folder, name)  # closed: shown by the cell that asks for it
    res.files[name] = [repo_relative(folder / f"{name}.{ext}") for ext in ("png", "pdf")]


def run(config: FiguresConfig) -> FiguresResult:
    """Stage 06_figures: read the stage tables, write figs. 1-4, the label-curve and eta-sweep tables and
    ``summary.md``."""
    c = config
    P = artifacts.paths(c.profile)
    bon = artifacts.read_table(c.profile, "bon", stage="04_best_of_n")
    paired = artifacts.read_table(c.profile, "bon_paired", stage="04_best_of_n")
    raft = artifacts.read_table(c.profile, "raft", stage="05_rlhf_raft")
    reference = figures.paper_reference()
    facts = {t: artifacts.read_table(c.profile, t) if P.table(t).is_file() else None for t in FACT_TABLES}
    greedy = figures.greedy_reference(facts["policy_eval"], facts["policy_accuracy_by_steps"])
    n_max = int(bon["n"].max())
    res = FiguresResult(raft=raft)

    res.curves = figures.label_curve_table(parse_eta_grid(c.label_etas))
    artifacts.write_table(res.curves, c.profile, "label_curves")
    _save(res, figures.figure_label_curves(res.curves), P.figures, "fig1_label_curves")

    methods = figures.headline_methods(bon, c.er_rule, c.aggregation, c.orm_aggregation)
    fig2 = figures.figure_best_of_n(bon, methods, reference, f"This run ({c.profile}), 95% CI", greedy)
    _save(res, fig2, P.figures, "fig2_best_of_n")

    res.sweep = figures.eta_sweep_table(bon, n_max, c.aggregation)
    artifacts.write_table(res.sweep, c.profile, "eta_sweep")
    fig3 = figures.figure_eta_sweep(res.sweep, figures.bon_baselines(bon, n_max, greedy), reference)
    _save(res, fig3, P.figures, "fig3_eta_sweep")

    _save(res, figures.figure_raft(raft, reference), P.figures, "fig4_raft")

    res.summary = summary.summary_table(bon, paired, raft, c.er_rule, c.aggregation, c.orm_aggregation)
    facts_md = summary.summary_facts(
        facts["policy_eval"], facts["policy_accuracy_by_steps"], facts["rollouts_summary"], res.sweep,
        n_problems_pool=int(bon["n_problems"].max()) if "n_problems" in bon else None, aggregation=c.aggregation,
        ranking=facts["bon_ranking"],
    )  # fmt: skip
    res.summary_markdown = summary.to_markdown(res.summary) + "\n" + summary.tests_note(paired) + facts_md
    summary.write_summary(P.results / "summary.md", res.summary_markdown)
    return res


def raft_accuracy_table(raft: pd.DataFrame) -> pd.DataFrame:
    """Greedy accuracy per reward model (rows) and RAFT iteration (columns), from the ``raft`` table."""
    return raft[raft["metric"] == "greedy_accuracy"].pivot_table(
        index="reward_model", columns="iteration", values="value"
    )
