"""The summary of a run: a Markdown table of the headline methods and a few facts, drawn from the tables.

README.md includes the tiny profile's summary between two markers (:func:`sync_readme`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from erprm_core import io, labels
from erprm_core.report import style
from erprm_core.report.figures import headline_methods

README_START = "<!-- summary:start (written by `erprm figures`; do not edit by hand) -->"
README_END = "<!-- summary:end -->"
PAPER_METHODS = {"er_prm": "er", "hard": "hard", "soft": "soft", "orm": "orm"}


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
    """One row per method: best-of-N accuracy at N_max [95% CI], paired difference vs ER (raw and Holm-adjusted
    p within its family, :func:`tests_note`), RAFT final accuracy."""
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
                holm = f", Holm p={d['p_holm']:.3g}" if "p_holm" in d else ""
                diff = f"{d['diff'] * 100:+.1f} [{d['ci_low'] * 100:+.1f}, {d['ci_high'] * 100:+.1f}], p={d['p_value']:.3g}{holm}"
        rule, _, weighted = labels.parse_method(method)
        rule = labels.method_name(rule, weighted=weighted)  # the method without its aggregation
        rows.append(
            {
                "method": "Oracle (pass@N; RAFT on correct picks only)"
                if method == "oracle" and "oracle" in final_raft
                else style.method_label(method),
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


def tests_note(paired: pd.DataFrame | None) -> str:
    """Which paired comparisons of the summary were fixed in advance, and the family each p is adjusted in."""
    if paired is None or "family" not in paired:
        return ""
    lines = []
    for family, group in paired.groupby("family", sort=False):
        if family.startswith(("headline", "reward models vs", "post hoc")):
            how = group["selection"].iloc[0]
            how = "fixed in advance" if how == "prespecified" else f"chosen after seeing the results ({how})"
            lines.append(
                f'- Tests "{family}": {len(group)} paired comparisons, {how}; p adjusted by Holm within them.'
            )
    return "\n".join(lines) + ("\n" if lines else "")


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
    ranking: pd.DataFrame | None = None,
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
            f"{short.get(str(row['rule']), 'η=' + labels.eta_text(str(row['rule'])))} {row['value'] * 100:.1f}"
            for _, row in sweep.iterrows()
        ]
        how = f", {aggregation} aggregation" if aggregation else ""
        lines.append(
            f"- Best-of-{n} accuracy % along the eta sweep{pool}{how}: "
            + ", ".join(parts)
            + " (`eta_sweep.csv`)."
        )
    if ranking is not None and not ranking.empty:
        parts = [
            f"{style.method_label(r['method'])} {r['value']:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}]"
            for _, r in ranking.iterrows()
        ]
        lines.append(
            f"- Ranking two candidates of one problem ({int(ranking['n_problems'].max())} test problems with both "
            f"outcomes; 0.5 is a coin, interval over problems): " + ", ".join(parts) + " (`bon_ranking.csv`)."
        )
    return "\n".join(lines) + ("\n" if lines else "")


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub Markdown table (no extra dependency)."""
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, row in df.iterrows():
        lines.append("| " + " | ".join("" if pd.isna(v) else str(v) for v in row.tolist()) + " |")
    return "\n".join(lines) + "\n"


def write_summary(path: Path | str, markdown: str) -> Path:
    """Write the summary ``markdown`` to ``path`` (``results/<profile>/summary.md``) atomically."""
    return io.atomic_write_text(path, markdown)


def sync_readme(summary_path: Path | str, readme_path: Path | str) -> bool:
    """Copy the summary at ``summary_path`` into the README at ``readme_path`` between the summary markers;
    True if the README changed."""
    summary, readme = Path(summary_path), Path(readme_path)
    if not summary.is_file() or not readme.is_file():
        return False
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        return False
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    new = f"{head}{README_START}\n{summary.read_text().strip()}\n{README_END}{tail}"
    if new != text:
        io.atomic_write_text(readme, new)
    return new != text
