"""What a run shows, in sentences generated from its tables: the closing cell of every notebook.

Each ``*_findings`` function reads the tables its stage wrote and returns Markdown bullets whose every
number and every claim is computed from them, so they are true on every run and every profile: "every
PRM is below the random pick at N = 64" appears when the table says so, and not otherwise. A claim that
goes against the paper links to the research log (:data:`RESEARCH_LOG`), where the variants behind it are.

>>> ci_contains(0.5, 0.42, 0.61)
True
"""

from __future__ import annotations

from typing import Any

import pandas as pd

RESEARCH_LOG = "docs/research-tiny-regime.md"
"""The research log, relative to the repository root (notebooks link to it with ../)."""


def ci_contains(value: float, low: float, high: float) -> bool:
    """Whether the interval [low, high] contains ``value`` (False when it is undefined)."""
    return bool(pd.notna(low) and pd.notna(high) and low <= value <= high)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _ci(row: Any, scale: float = 100.0, unit: str = "") -> str:
    if pd.isna(row["ci_low"]) or pd.isna(row["ci_high"]):
        return f"{scale * row['value']:.1f}{unit}"
    return f"{scale * row['value']:.1f}{unit} [{scale * row['ci_low']:.1f}, {scale * row['ci_high']:.1f}]"


def _bullets(lines: list[str]) -> str:
    return "\n".join(f"- {line}" for line in lines if line) + "\n"


def _contradicts(text: str, log_link: str) -> str:
    return f"{text} This goes against the paper; the variants tried are in the [research log]({log_link})."


def policy_findings(policy_eval: pd.DataFrame) -> str:
    """00_policy: greedy and sampled accuracy, the best pass@k, and whether the policy sits in the paper's regime
    (sample accuracy 45-75%, pass@k far above it)."""
    t = policy_eval.set_index(["metric", "k"])
    lines = []
    greedy = t.loc[("greedy_accuracy", 1)]
    lines.append(f"Greedy accuracy {_ci(greedy, unit='%')} on the held-out problems.")
    if ("sample_accuracy", 1) in t.index:
        sample = t.loc[("sample_accuracy", 1)]
        passes = policy_eval[policy_eval["metric"] == "pass_at_k"].sort_values("k")
        top = passes.iloc[-1] if len(passes) else None
        text = f"Sampled at temperature 1.0, {_pct(sample['value'])} of the solutions are right"
        if top is not None:
            gap = top["value"] - sample["value"]
            text += (f"; pass@{int(top['k'])} is {_pct(top['value'])}, {100 * gap:.1f} points above: the room a "
                     "verifier has to rerank")  # fmt: skip
        lines.append(text + ".")
        in_band = 0.45 <= sample["value"] <= 0.75
        lines.append(
            "The policy is in the paper's regime (sample accuracy between 45% and 75%)."
            if in_band
            else f"The policy is outside the paper's regime (sample accuracy {_pct(sample['value'])}, not 45-75%)."
        )
    return _bullets(lines)


def rollouts_findings(summary: pd.DataFrame, prefixes: pd.DataFrame | None = None) -> str:
    """01_rollouts: how many solutions are right, and how many step prefixes have mixed completions (some
    right, some wrong): only there do the soft, ER and hard labels differ; at 0 or k right they all agree."""
    m = summary.set_index("metric")["value"]
    lines = [
        f"{int(m['solutions']):,} solutions of {int(m['problems']):,} problems, {_pct(m['solution_accuracy'])} "
        f"right; {int(m['completions']):,} completions from {int(m['prefixes']):,} step prefixes, "
        f"{_pct(m['completion_accuracy'])} reaching the right answer."
    ]
    if prefixes is not None and len(prefixes):
        mixed = (prefixes["n_correct"] > 0) & (prefixes["n_correct"] < prefixes["k"])
        none = prefixes["n_correct"] == 0
        lines.append(
            f"{_pct(mixed.mean())} of the prefixes have mixed completions, where the label rules differ; "
            f"{_pct(none.mean())} have no right completion (every rule labels them 0) and the rest all right "
            "(every rule labels them 1)."
        )
    return _bullets(lines)


def labels_findings(label_stats: pd.DataFrame, label_quality: pd.DataFrame) -> str:
    """02_labels: how the mean label moves with eta, and how well each rule separates steps before the first
    error from the rest (AUROC against the ground truth, when the task has one)."""
    means = label_stats[label_stats["metric"] == "mean"].set_index("rule")["value"]
    lines = []
    if {"soft", "hard"} <= set(means.index):
        lines.append(
            f"The mean label rises from {means['soft']:.3f} (soft, eta -> 0) to {means['hard']:.3f} (hard, eta -> inf): "
            "a sharper rule calls more steps good, so any fixed score threshold treats the rules differently."
        )
    if label_quality is not None and len(label_quality):
        q = label_quality[
            (label_quality["metric"] == "auroc_vs_truth") & (label_quality["steps_remaining"] == "all")
        ]
        q = q[q["value"].notna()].set_index("rule")  # undefined when a run's steps are all right or all wrong
        if len(q):
            spread = q["value"].max() - q["value"].min()
            best = q["value"].idxmax()
            lines.append(
                f"Against the step-level truth, labels rank steps at AUROC {q['value'].min():.3f}-{q['value'].max():.3f} "
                f"(best: {best}, {_ci(q.loc[best], 1.0)})"
                + ("; the rules rank steps almost alike (spread below 0.02)." if spread < 0.02 else ".")
            )
    return _bullets(lines)


def prm_findings(prm_truth: pd.DataFrame | None, log_link: str = f"../{RESEARCH_LOG}") -> str:
    """03_train_prm: within-problem ranking of the held-out (validation) solutions and first-error F1 at the
    paper's and at each rule's validation threshold."""
    if prm_truth is None or prm_truth.empty:
        return _bullets(["This task has no step-level ground truth: see the held-out metrics above."])
    lines = []
    pair = prm_truth[prm_truth["metric"] == "within_problem_pairwise"].set_index("rule")
    pair = pair[pair["value"].notna()]
    if not len(pair):
        lines.append("No held-out problem has both a right and a wrong solution: no within-problem ranking.")
    else:
        coins = [r for r, row in pair.iterrows() if ci_contains(0.5, row["ci_low"], row["ci_high"])]
        text = (f"Ranking two held-out solutions of one problem ({int(pair['n'].max())} problems with both "
                f"outcomes), the PRMs score {pair['value'].min():.2f}-{pair['value'].max():.2f} (0.5 is a coin).")  # fmt: skip
        if len(coins) == len(pair):
            text = _contradicts(text + " Every interval contains 0.5: no PRM verifies here.", log_link)
        elif coins:
            text += f" The intervals of {', '.join(coins)} contain 0.5."
        lines.append(text)
    f1 = prm_truth[prm_truth["metric"] == "first_error_f1"]
    f1 = f1[f1["value"].notna()]
    if "threshold_source" in f1 and len(f1):
        paper = f1[f1["threshold_source"] == "paper"].set_index("rule")["value"]
        tuned = f1[f1["threshold_source"] == "validation"].set_index("rule")
        if len(paper) and len(tuned):
            lines.append(
                f"First-error F1 at the paper's threshold 0.5: {paper.min():.2f}-{paper.max():.2f}; at each rule's "
                f"own threshold (chosen here, applied to the test pool by 07): {tuned['value'].min():.2f}-"
                f"{tuned['value'].max():.2f} (thresholds {tuned['threshold'].min():g}-{tuned['threshold'].max():g})."
            )
    return _bullets(lines)


def best_of_n_findings(
    bon: pd.DataFrame, paired: pd.DataFrame, ranking: pd.DataFrame | None, headline: dict[str, str],
    log_link: str = f"../{RESEARCH_LOG}",
) -> str:  # fmt: skip
    """04_best_of_n: at N_max, where every headline reward model stands against the random pick, majority vote
    and the verifiers without training; the prespecified headline tests with their Holm-adjusted p-values."""
    n_max = int(bon["n"].max())
    at = bon[(bon["n"] == n_max) & (bon["metric"] == "accuracy")].set_index("method")
    models = [m for m in headline.values() if m and m in at.index]
    lines = []
    if "random" in at.index and models:
        rnd = at.loc["random", "value"]
        below = [m for m in models if at.loc[m, "ci_high"] < rnd]
        above = [m for m in models if at.loc[m, "ci_low"] > rnd]
        text = f"At N = {n_max} the random pick scores {_pct(rnd)}; "
        if len(below) == len(models):
            text = _contradicts(text + "every PRM is below it (its whole interval).", log_link)
        elif len(above) == len(models):
            text += "every PRM is above it (its whole interval)."
        else:
            text += (f"{len(above)} of {len(models)} PRMs are above it and {len(below)} below it (whole "
                     "intervals); the others overlap it.")  # fmt: skip
        lines.append(text)
    for name, label in (
        ("likelihood", "the policy's own likelihood (no training)"),
        ("fewer_steps", "fewer steps"),
    ):
        if name in at.index:
            best = max(models, key=lambda m: at.loc[m, "value"]) if models else None
            cmp = "" if best is None else f"; the best PRM ({best}) {_pct(at.loc[best, 'value'])}"
            lines.append(f"Picking by {label}: {_ci(at.loc[name], unit='%')}{cmp}.")
    if "majority" in at.index:
        lines.append(f"Majority vote: {_ci(at.loc['majority'], unit='%')}.")
    fam = (
        paired[paired["family"].astype(str).str.startswith("headline")]
        if "family" in paired
        else paired.iloc[0:0]
    )
    for _, r in fam.iterrows():
        lines.append(
            f"Prespecified, {r['method_a']} minus {r['method_b']} at N = {int(r['n'])}: {100 * r['diff']:+.1f} points "
            f"[{100 * r['ci_low']:+.1f}, {100 * r['ci_high']:+.1f}], p = {r['p_value']:.3g} (Holm over "
            f"{len(fam)}: {r['p_holm']:.3g})."
        )
    if ranking is not None and len(ranking):
        rk = ranking.set_index("method")
        parts = [f"{m} {rk.loc[m, 'value']:.2f}" for m in rk.index]
        lines.append(f"Ranking the candidates of one problem ({int(rk['n_problems'].max())} test problems with both "
                     f"outcomes; 0.5 is a coin): {', '.join(parts)}.")  # fmt: skip
    return _bullets(lines)


def raft_findings(
    raft: pd.DataFrame, paired: pd.DataFrame | None, log_link: str = f"../{RESEARCH_LOG}"
) -> str:
    """05_rlhf_raft: each reward model's final greedy accuracy against the policy before RLHF, and the
    Holm-adjusted paired tests at the last iteration."""
    acc = raft[raft["metric"] == "greedy_accuracy"]
    start = acc[acc["reward_model"] == "baseline"]
    lines = []
    if len(start):
        s = start.iloc[0]
        finals = (
            acc[acc["reward_model"] != "baseline"].sort_values("iteration").groupby("reward_model").tail(1)
        )
        worse = [r["reward_model"] for _, r in finals.iterrows() if r["ci_high"] < s["value"]]
        better = [r["reward_model"] for _, r in finals.iterrows() if r["ci_low"] > s["value"]]
        text = (f"Before RLHF the policy solves {_ci(s, unit='%')}; after the last iteration "
                + ", ".join(f"{r['reward_model']} {_pct(r['value'])}" for _, r in finals.iterrows()) + ".")  # fmt: skip
        if better:
            text += f" Above the start (whole interval): {', '.join(better)}."
        if len(worse) == len(finals) and len(finals):
            text = _contradicts(
                text + " Every reward model leaves the policy worse than it started.", log_link
            )
        lines.append(text)
    if paired is not None and len(paired) and "p_holm" in paired:
        last = paired[paired["iteration"] == paired["iteration"].max()]
        sig = last[last["p_holm"] < 0.05]
        lines.append(
            f"At iteration {int(last['iteration'].max())}, {len(sig)} of {len(last)} paired differences have a "
            "Holm-adjusted p below 0.05"
            + (
                ": "
                + ", ".join(
                    f"{r['reward_model']} - {r['versus']} {100 * r['diff']:+.1f}" for _, r in sig.iterrows()
                )
                if len(sig)
                else ""
            )
            + "."
        )
    return _bullets(lines)


def step_eval_findings(step_eval: pd.DataFrame) -> str:
    """07_processbench: first-error F1 at the two thresholds and in the two views, and the step AUROC."""
    lines = []
    if "view" not in step_eval or step_eval.empty:
        return _bullets(lines)
    if step_eval["f1"].isna().all():
        lines.append(
            "First-error F1 is undefined on this run (it needs solutions with and without an error)."
        )
    for view, label in (("distinct", "distinct solutions"), ("pool", "the pool, duplicates counted")):
        v = step_eval[step_eval["view"] == view]
        if v.empty:
            continue
        for source in ("paper", "validation"):
            s = v[(v["threshold_source"] == source) & v["f1"].notna()]
            if len(s):
                best = s.sort_values("f1", ascending=False).iloc[0]
                lines.append(
                    f"{label.capitalize()}, {source} threshold: first-error F1 {s['f1'].min():.2f}-{s['f1'].max():.2f} "
                    f"(best {best['prm']}, {best['f1']:.2f} [{best['f1_low']:.2f}, {best['f1_high']:.2f}])."
                )
        if v["step_auroc"].notna().any():
            a = v.drop_duplicates("prm")
            lines.append(f"Step AUROC against the truth ({label}, no threshold): {a['step_auroc'].min():.2f}-"
                         f"{a['step_auroc'].max():.2f}.")  # fmt: skip
    return _bullets(lines)
