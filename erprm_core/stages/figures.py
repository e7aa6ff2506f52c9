"""Stage 06_figures: every paper figure and the summary table, from the stage tables only.

:func:`run` reads ``results/<profile>/tables`` (written by 00-05) and the paper's reported numbers, writes the
tables ``label_curves``, ``eta_sweep`` and ``paper_vs_run`` (the paper's numbers beside this run's), saves
figs. 1-6 (PNG + PDF; the only files of these figures: 02, 04 and 05 show figs. 2-4 inline without saving them)
and writes ``summary.md`` (which README.md includes). ``erprm figures --profile <profile>`` reruns it alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from erprm_core import labels
from erprm_core.report import figures, findings, style, summary
from erprm_core.running import artifacts
from erprm_core.running.config import parse_eta_grid
from erprm_core.stages._common import StageConfig, repo_relative

FACT_TABLES = ("policy_eval", "policy_accuracy_by_steps", "rollouts_summary", "bon_ranking", "prm_truth")
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
    paired_differences: pd.DataFrame | None = None
    paper_vs_run: pd.DataFrame | None = None


def _save(res: FiguresResult, fig: plt.Figure, folder: Path, name: str) -> None:
    res.figures[name] = style.shown(fig, folder, name)  # closed: shown by the cell that asks for it
    res.files[name] = [repo_relative(folder / f"{name}.{ext}") for ext in ("png", "pdf")]


def policy_description(profile: str) -> str:
    """This run's policy and its size from the manifest's 00_policy entry, e.g. "arith policy trained here
    (0.719M parameters)" or "HuggingFaceTB/SmolLM2-135M (135M parameters)"; the scale line of
    :func:`erprm_core.report.summary.paper_comparison`."""
    entry = artifacts.load_manifest(profile).get("stages", {}).get("00_policy", {})
    name = entry.get("policy_name") or (f"{entry['task']} policy trained here" if entry.get("task") else "")
    name = name or "this run's policy"
    n = entry.get("n_parameters")
    return f"{name} ({n / 1e6:.3g}M parameters)" if n else name


def run(config: FiguresConfig) -> FiguresResult:
    """Stage 06_figures: read the stage tables, write figs. 1-6, the label-curve, eta-sweep and paper-vs-run
    tables and ``summary.md``."""
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

    raft_paired = artifacts.read_table(c.profile, "raft_paired") if P.table("raft_paired").is_file() else None
    res.paired_differences = figures.paired_difference_table(paired, raft_paired)
    _save(res, figures.figure_paired_differences(paired, raft_paired), P.figures, "fig5_paired_differences")

    res.paper_vs_run = summary.paper_comparison(bon, raft, reference, c.er_rule, c.aggregation, c.orm_aggregation,
                                                greedy, paired, policy_description(c.profile))  # fmt: skip
    artifacts.write_table(res.paper_vs_run, c.profile, "paper_vs_run")
    _save(res, figures.figure_paper_vs_run(res.paper_vs_run), P.figures, "fig6_paper_vs_run")

    res.summary = summary.summary_table(bon, paired, raft, c.er_rule, c.aggregation, c.orm_aggregation)
    facts_md = summary.summary_facts(
        facts["policy_eval"], facts["policy_accuracy_by_steps"], facts["rollouts_summary"], res.sweep,
        n_problems_pool=int(bon["n_problems"].max()) if "n_problems" in bon else None, aggregation=c.aggregation,
        ranking=facts["bon_ranking"],
    )  # fmt: skip
    prms = {m: m for m in methods[:4] if labels.parse_method(m)[1]}  # the reward models: rule:aggregation
    shows = (findings.prm_findings(facts["prm_truth"], findings.RESEARCH_LOG)
             + findings.best_of_n_findings(bon, paired, facts["bon_ranking"], prms, findings.RESEARCH_LOG)
             + findings.raft_findings(raft, raft_paired, findings.RESEARCH_LOG))  # fmt: skip
    res.summary_markdown = (
        summary.to_markdown(res.summary) + "\n" + summary.tests_note(paired) + facts_md + "\n"
        + "### What this run shows\n\n" + shows + "\n" + summary.paper_comparison_markdown(res.paper_vs_run)
    )  # fmt: skip
    summary.write_summary(P.results / "summary.md", res.summary_markdown)
    return res


def raft_accuracy_table(raft: pd.DataFrame) -> pd.DataFrame:
    """Greedy accuracy per reward model (rows) and RAFT iteration (columns), from the ``raft`` table."""
    return raft[raft["metric"] == "greedy_accuracy"].pivot_table(
        index="reward_model", columns="iteration", values="value"
    )
