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


PAPER_SCALE = {
    "best_of_n": "Mistral-MetaMath-7B generator; PRMs fine-tuned from 7B math models (Math-Shepherd-style "
    "labels); N up to 64; GSM8K test (1,319 problems), MATH500 (500)",
    "greedy": "Mistral-MetaMath-7B (its RAFT start policy); GSM8K test (1,319 problems), the MATH test set",
    "raft": "Mistral-MetaMath-7B policy, 3 RAFT iterations; greedy accuracy on GSM8K test (1,319 problems) and "
    "the MATH test set",
}
"""The scale behind the paper's numbers (``paper_results.csv``), per experiment."""
PAPER_VS_RUN_COLUMNS = ["quantity", "kind", "paper_gsm8k", "paper_math500", "this_run", "this_run_ci_low",
                        "this_run_ci_high", "paper_scale", "this_run_scale"]  # fmt: skip
"""Columns of :func:`paper_comparison`; numbers in percent (accuracies) or points (gains)."""
_PAPER_NAMES = (("er_prm", "ER-PRM"), ("soft", "soft-label PRM"), ("hard", "hard-label PRM"), ("orm", "ORM"))


def _paper_value(reference: pd.DataFrame, experiment: str, dataset: str, method: str, n: int | None = None):
    """One number of the paper (%), NaN when it reports none."""
    sel = reference[(reference["experiment"] == experiment) & (reference["dataset"] == dataset)
                    & (reference["method"] == method)]  # fmt: skip
    if n is not None:
        sel = sel[sel["n"] == n]
    return float(sel["accuracy"].iloc[0]) if not sel.empty else float("nan")


def _run_value(row: Any) -> tuple[float, float, float]:
    """(value, ci_low, ci_high) of a table row, in percent; NaNs where the row or an interval is missing."""
    if row is None:
        return (float("nan"),) * 3
    return tuple(float(row.get(c, float("nan"))) * 100 for c in ("value", "ci_low", "ci_high"))  # type: ignore[return-value]


def _row(quantity: str, kind: str, gsm8k: float, math: float, run: tuple, scales: tuple[str, str]) -> dict:
    return dict(zip(PAPER_VS_RUN_COLUMNS, [quantity, kind, gsm8k, math, *run, *scales], strict=True))


def _bon_rows(bon, paired, reference, methods: dict[str, str], scales: tuple[str, str]) -> list[dict]:
    """Best-of-N accuracy of ER-PRM, soft, hard and ORM at N = 64 (and this run's largest N when it differs),
    and ER-PRM's gain over hard and soft at that N (paired interval when ``paired`` has the row)."""
    n_max = int(bon["n"].max())
    rows = []
    for n in sorted({64, n_max}):
        scale = (scales[0], scales[1].format(n=n))
        acc = {}
        for paper_name, name in _PAPER_NAMES:
            r = _metric(bon, "accuracy", method=methods[paper_name], n=n)
            acc[paper_name] = (_paper_value(reference, "best_of_n", "gsm8k", paper_name, n),
                               _paper_value(reference, "best_of_n", "math500", paper_name, n), _run_value(r))  # fmt: skip
            rows.append(_row(f"best-of-{n} accuracy, {name}", "accuracy", *acc[paper_name], scale))
        for other in ("hard", "soft"):
            gain = [acc["er_prm"][k] - acc[other][k] for k in (0, 1)]
            run = (acc["er_prm"][2][0] - acc[other][2][0], float("nan"), float("nan"))
            sel = None if paired is None else paired[(paired["method_a"] == methods["er_prm"])
                                                     & (paired["method_b"] == methods[other]) & (paired["n"] == n)]  # fmt: skip
            if sel is not None and not sel.empty:
                run = tuple(float(sel[c].iloc[0]) * 100 for c in ("diff", "ci_low", "ci_high"))
            label = dict(_PAPER_NAMES)[other]
            rows.append(_row(f"best-of-{n}: ER-PRM minus {label} (points)", "gain", *gain, run, scale))
    return rows


def _raft_rows(raft, reference, er_rule: str, scales: tuple[str, str]) -> list[dict]:
    """Greedy accuracy after the last RAFT iteration with the ER-PRM, soft and hard reward models (the three
    the paper ran; ER-PRM is ``er_rule``) and its gain over the start policy."""
    if raft is None or raft.empty:
        return []
    acc = raft[raft["metric"] == "greedy_accuracy"]
    start = _metric(raft, "greedy_accuracy", reward_model="baseline")
    rows = []
    for paper_name, name in _PAPER_NAMES[:3]:
        model = er_rule if paper_name == "er_prm" else paper_name
        mine = acc[acc["reward_model"] == model].sort_values("iteration")
        last = None if mine.empty else mine.iloc[-1]
        it = "" if last is None else f" {int(last['iteration'])}"
        papers = [_paper_value(reference, "raft", d, paper_name) for d in ("gsm8k", "math")]
        starts = [_paper_value(reference, "raft", d, "baseline") for d in ("gsm8k", "math")]
        scale = (scales[0], scales[1].format(iterations=it.strip() or "?"))
        rows.append(_row(f"RAFT with {name}: greedy accuracy after the last iteration", "accuracy", *papers,
                         _run_value(last), scale))  # fmt: skip
        gain = None if last is None else _metric(raft, "greedy_gain", reward_model=last["reward_model"],
                                                 iteration=last["iteration"])  # fmt: skip
        run = _run_value(gain)
        if gain is None and last is not None and start is not None:
            run = ((float(last["value"]) - float(start["value"])) * 100, float("nan"), float("nan"))
        rows.append(_row(f"RAFT with {name}: gain over the start policy (points)", "gain",
                         papers[0] - starts[0], papers[1] - starts[1], run, scale))  # fmt: skip
    return rows


def paper_comparison(
    bon: pd.DataFrame,
    raft: pd.DataFrame | None,
    reference: pd.DataFrame,
    er_rule: str,
    aggregation: str,
    orm_aggregation: str,
    greedy: dict | None,
    paired: pd.DataFrame | None = None,
    policy: str = "this run's policy",
) -> pd.DataFrame:
    """The quantities that the paper (``reference``, :func:`erprm_core.report.figures.paper_reference`) and
    this run both report, one row each (:data:`PAPER_VS_RUN_COLUMNS`), in percent (accuracies) or points
    (gains), rounded to one decimal: best-of-N accuracy at N = 64 (and at this run's largest N when it is
    not 64) of ER-PRM (``er_rule``), soft, hard (``aggregation``) and the ORM (``orm_aggregation``); ER-PRM
    minus hard and minus soft at that N (with the paired interval of ``paired``, the ``bon_paired`` table,
    when given); greedy accuracy (``greedy``, a :func:`~erprm_core.report.figures.greedy_reference` row;
    the paper's: its RAFT start policy); and the greedy accuracy after the last RAFT iteration with the
    ER-PRM, soft and hard reward models and its gain over the start policy. ``paper_math500`` holds the
    paper's MATH500 number (RAFT rows: its MATH test set). ``this_run_ci_low`` / ``this_run_ci_high`` are
    95% intervals, NaN where the tables give none (e.g. a gain without the paired table). The scale of
    each side is in ``paper_scale`` / ``this_run_scale``: ``policy`` names this run's policy and its size
    (the summary layer does not read the manifest), the problem counts come from the tables."""
    methods = {"er_prm": f"{er_rule}:{aggregation}", "hard": f"hard:{aggregation}",
               "soft": f"soft:{aggregation}", "orm": f"orm:{orm_aggregation}"}  # fmt: skip
    n_bon = f"{int(bon['n_problems'].max())} test problems" if "n_problems" in bon else "its test problems"
    rows = _bon_rows(
        bon, paired, reference, methods, (PAPER_SCALE["best_of_n"], f"{policy}; N = {{n}}; {n_bon}")
    )
    n_greedy = greedy.get("n_problems") if greedy is not None else None
    greedy_scale = f"{policy}; {int(n_greedy)} test problems" if n_greedy else policy
    rows.append(_row("greedy decoding accuracy (paper: its RAFT start policy)", "accuracy",
                     _paper_value(reference, "raft", "gsm8k", "baseline"),
                     _paper_value(reference, "raft", "math", "baseline"),
                     _run_value(greedy), (PAPER_SCALE["greedy"], greedy_scale)))  # fmt: skip
    n_raft = ""
    if raft is not None and "n" in raft:
        n_raft = f"; {int(raft[raft['metric'] == 'greedy_accuracy']['n'].max())} test problems"
    raft_scale = f"{policy}, {{iterations}} RAFT iterations{n_raft}"
    rows += _raft_rows(raft, reference, er_rule, (PAPER_SCALE["raft"], raft_scale))
    table = pd.DataFrame(rows, columns=PAPER_VS_RUN_COLUMNS)
    numbers = PAPER_VS_RUN_COLUMNS[2:7]
    table[numbers] = table[numbers].astype(float).round(1)
    return table


def paper_comparison_markdown(table: pd.DataFrame) -> str:
    """The :func:`paper_comparison` table in Markdown under the heading "The paper beside this run": the
    scale of each side first, then one row per quantity (this run with its 95% interval)."""
    scales = list(dict.fromkeys(zip(table["paper_scale"], table["this_run_scale"], strict=True)))
    lines = ["### The paper beside this run", "",
             "Different models and scales: compare gaps and gains, not levels. Scale of each side:", ""]  # fmt: skip
    for paper, run in scales:
        lines.append(f"- Paper: {paper}. This run: {run}.")
    shown = pd.DataFrame({
        "quantity": table["quantity"],
        "paper GSM8K": table["paper_gsm8k"].map(lambda v: "" if pd.isna(v) else f"{v:.1f}"),
        "paper MATH500 (RAFT: MATH test)": table["paper_math500"].map(lambda v: "" if pd.isna(v) else f"{v:.1f}"),
        "this run [95% CI]": [
            "" if pd.isna(v) else _fmt_ci(v, lo, hi, scale=1)
            for v, lo, hi in zip(table["this_run"], table["this_run_ci_low"], table["this_run_ci_high"], strict=True)
        ],
    })  # fmt: skip
    return "\n".join(lines) + "\n\n" + to_markdown(shown)
