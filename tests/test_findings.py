"""The notebooks' closing sentences: generated from the tables, so a claim appears exactly when it holds."""

import pandas as pd

from erprm_core.report import findings

HEADLINE = {"er": "er_1:min", "hard": "hard:min", "soft": "soft:min", "orm": "orm:last"}


def _bon(values: dict[str, tuple[float, float, float]], n: int = 64) -> pd.DataFrame:
    rows = [{"method": m, "n": n, "metric": "accuracy", "value": v, "ci_low": lo, "ci_high": hi}
            for m, (v, lo, hi) in values.items()]  # fmt: skip
    return pd.DataFrame(rows)


def _paired(p_values):
    rows = [{"method_a": "er_1:min", "method_b": b, "n": 64, "diff": 0.02, "ci_low": -0.01, "ci_high": 0.05,
             "p_value": p, "p_holm": min(1.0, 3 * p), "family": "headline: er_1:min vs ... at N=64"}
            for b, p in zip(["hard:min", "soft:min", "orm:last"], p_values, strict=True)]  # fmt: skip
    return pd.DataFrame(rows)


def test_every_prm_below_random_is_said_only_when_true():
    below = _bon({"random": (0.60, 0.57, 0.63), "er_1:min": (0.34, 0.30, 0.38), "hard:min": (0.31, 0.27, 0.35),
                  "soft:min": (0.37, 0.33, 0.41), "orm:last": (0.26, 0.22, 0.30)})  # fmt: skip
    text = findings.best_of_n_findings(below, _paired([0.2, 0.15, 0.001]), None, HEADLINE, "LOG")
    assert "every PRM is below it" in text and "(LOG)" in text
    mixed = below.copy()
    mixed.loc[mixed["method"] == "soft:min", ["value", "ci_low", "ci_high"]] = [0.62, 0.58, 0.66]
    text = findings.best_of_n_findings(mixed, _paired([0.2, 0.15, 0.001]), None, HEADLINE, "LOG")
    assert "every PRM is below it" not in text and "0 of 4 PRMs are above it and 3 below it" in text
    # the prespecified tests carry the raw and the Holm-adjusted p
    assert "p = 0.001 (Holm over 3: 0.003)" in text


def test_prm_ranking_coin_sentence_follows_the_intervals():
    truth = pd.DataFrame([
        {"rule": "soft", "metric": "within_problem_pairwise", "value": 0.55, "ci_low": 0.45, "ci_high": 0.66, "n": 30},
        {"rule": "hard", "metric": "within_problem_pairwise", "value": 0.60, "ci_low": 0.48, "ci_high": 0.70, "n": 30},
    ])  # fmt: skip
    assert "no PRM verifies here" in findings.prm_findings(truth, "LOG")
    truth.loc[1, ["value", "ci_low", "ci_high"]] = [0.80, 0.72, 0.88]
    text = findings.prm_findings(truth, "LOG")
    assert "no PRM verifies here" not in text and "The intervals of soft contain 0.5." in text


def test_policy_regime_sentence():
    table = pd.DataFrame([
        {"metric": "greedy_accuracy", "k": 1, "value": 0.744, "ci_low": 0.70, "ci_high": 0.78},
        {"metric": "sample_accuracy", "k": 1, "value": 0.59, "ci_low": 0.55, "ci_high": 0.63},
        {"metric": "pass_at_k", "k": 16, "value": 0.945, "ci_low": 0.91, "ci_high": 0.97},
    ])  # fmt: skip
    text = findings.policy_findings(table)
    assert "74.4% [70.0, 78.0]" in text and "35.5 points above" in text and "in the paper's regime" in text
    table.loc[1, "value"] = 0.9
    assert "outside the paper's regime" in findings.policy_findings(table)


def test_rollouts_mixed_prefixes():
    summary = pd.DataFrame({"metric": ["problems", "solutions", "solution_accuracy", "prefixes", "completions",
                                       "completion_accuracy"], "value": [2, 4, 0.5, 4, 32, 0.25]})  # fmt: skip
    prefixes = pd.DataFrame({"k": [8, 8, 8, 8], "n_correct": [0, 3, 8, 0]})
    text = findings.rollouts_findings(summary, prefixes)
    assert "4 solutions of 2 problems, 50.0% right" in text
    assert "25.0% of the prefixes have mixed completions" in text and "50.0% have no right completion" in text


def test_labels_sentence_skips_undefined_auroc():
    stats_ = pd.DataFrame({"rule": ["soft", "hard"], "metric": ["mean", "mean"], "value": [0.4, 0.7]})
    quality = pd.DataFrame({"rule": ["soft", "hard"], "metric": ["auroc_vs_truth"] * 2, "value": [float("nan")] * 2,
                            "ci_low": [float("nan")] * 2, "ci_high": [float("nan")] * 2,
                            "steps_remaining": ["all", "all"]})  # fmt: skip
    text = findings.labels_findings(stats_, quality)
    assert "0.400 (soft" in text and "AUROC" not in text


def test_run_line_names_commit_profile_stage_and_numerics(tmp_roots):
    from erprm_core.running import artifacts

    artifacts.update_manifest("t", "03_x", numerics={"cpu_numerics": "portable", "torch_threads": 2})
    line = artifacts.run_line("t", "03_x")
    commit, _ = artifacts.git_state()
    assert f"commit `{commit[:10]}`" in line and "profile `t`" in line and "03_x " in line
    assert "numerics `portable` on 2 threads" in line and "[manifest.json](../manifest.json)" in line
    artifacts.update_manifest("t", "02_y", n=1)  # a stage without torch records no numerics: none shown
    assert "numerics" not in artifacts.run_line("t", "02_y")


def test_prm_sentence_without_ranked_problems():
    truth = pd.DataFrame([{"rule": "soft", "metric": "within_problem_pairwise", "value": float("nan"),
                           "ci_low": float("nan"), "ci_high": float("nan"), "n": 0}])  # fmt: skip
    assert "no within-problem ranking" in findings.prm_findings(truth, "LOG")
