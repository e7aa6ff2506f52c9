import math

import pandas as pd
import pytest

from erprm_core.running import artifacts, config, costs

PAPER = ["paper-gsm8k", "paper-math"]
NUMERIC = costs.COLUMNS[3:]


@pytest.fixture(scope="module")
def tables():
    return {p: costs.cost_table(p) for p in PAPER}


@pytest.mark.parametrize("profile", PAPER)
def test_paper_tables_are_positive_and_sum_to_the_total(tables, profile):
    df = tables[profile]
    assert list(df.columns) == costs.COLUMNS
    assert all(math.isfinite(v) and v >= 0 for c in NUMERIC for v in df[c])
    body, total = df[df["stage"] != "total"], df[df["stage"] == "total"].iloc[0]
    for c in NUMERIC:
        assert total[c] == pytest.approx(body[c].sum())
    assert set(body["stage"]) == {f"0{i}_{n}" for i, n in enumerate(
        ["policy", "rollouts", "labels", "train_prm", "best_of_n", "rlhf_raft", "figures", "processbench"])}  # fmt: skip
    gpu = body.groupby("stage")["gpu_hours"].sum()
    assert (
        gpu[["00_policy", "01_rollouts", "03_train_prm", "04_best_of_n", "05_rlhf_raft", "07_processbench"]]
        > 0
    ).all()
    assert gpu["02_labels"] == 0 and gpu["06_figures"] == 0
    assert 1 < total["gpu_hours"] < 1000  # a paper run is GPU-hours to GPU-days, not minutes or years


def test_paper_counts_follow_the_configs(tables):
    df = tables["paper-gsm8k"].set_index("work")
    assert df.loc["greedy test solutions", "sequences"] == 1319
    assert df.loc["candidate pool", "sequences"] == 1319 * 64
    assert df.loc["solutions", "sequences"] == 5473 * 4
    # 7 PRMs: eta grid 0,0.1,1,8,10,inf plus the ORM; every pool candidate is scored once by each
    assert df.loc["score the pool with 7 PRMs", "sequences"] == 7 * 1319 * 64
    assert "score the pool with 9 PRMs" in set(tables["paper-math"]["work"])  # 0,0.1,1,2,5,8,10,inf + ORM


def test_completion_cost_scales_linearly_with_k():
    base = costs.cost_table("paper-gsm8k").set_index("work")
    double = costs.cost_table("paper-gsm8k", overrides=["k=32"]).set_index("work")
    row = "completions (k per step prefix)"
    for col in ("sequences", "generated_tokens", "forward_passes", "gpu_hours"):
        assert double.loc[row, col] == pytest.approx(2 * base.loc[row, col])
    others = [w for w in base.index if w not in (row, "")]
    pd.testing.assert_frame_equal(base.loc[others], double.loc[others])


def _params(**rollouts):
    return {
        "00_policy": {
            "task": "gsm8k",
            "policy_name": "pol",
            "n_train_prm": 10,
            "n_test": 0,
            "n_samples": 0,
            "n_passk_problems": 0,
            "max_new_tokens": 1024,
        },  # fmt: skip
        "01_rollouts": {
            "n_problems": 0,
            "n_solutions": 2,
            "k": 4,
            "max_new_tokens": 1024,
            "backend": "vllm",
            "completer_name": "comp",
            **rollouts,
        },  # fmt: skip
    }


A = costs.Assumptions(
    solution_tokens={"gsm8k": 100.0},
    steps_per_solution={"gsm8k": 3.0},
    question_tokens={"gsm8k": 50.0},
    template_tokens=10.0,
    completion_fraction=0.5,
    vllm_tokens_per_s=1000.0,
)


def test_rollout_counts_by_hand():
    df = costs.cost_table_from_parameters(_params(), A).set_index("work")
    sol = df.loc["solutions"]
    assert (sol["model"], sol["sequences"], sol["generated_tokens"]) == ("pol", 20, 2000)  # 10 problems x 2
    assert sol["processed_tokens"] == 20 * 60  # question + template
    comp = df.loc["completions (k per step prefix)"]
    assert comp["model"] == "comp"
    assert comp["sequences"] == 20 * 2 * 4  # solutions x (steps - 1) prefixes x k
    assert comp["generated_tokens"] == 160 * 50  # half a solution each
    assert comp["gpu_hours"] == pytest.approx(8000 / 1000 / 3600)


def test_token_limit_caps_the_lengths():
    df = costs.cost_table_from_parameters(_params(max_new_tokens=20), A).set_index("work")
    assert df.loc["solutions", "generated_tokens"] == 20 * 20
    assert df.loc["completions (k per step prefix)", "generated_tokens"] == 160 * 20


def test_unknown_task_names_the_missing_assumption():
    with pytest.raises(ValueError, match="arith"):
        costs.cost_table_from_parameters({"00_policy": {"task": "arith"}})


def test_markdown_table():
    md = costs.cost_markdown("paper-math")
    lines = md.splitlines()
    assert lines[0].startswith("| stage | work |") and lines[-1].startswith("| **total**")
    assert all(line.count("|") == 10 for line in lines)
    assert "`deepseek-ai/deepseek-math-7b-rl`" in md


def test_reproducing_md_tables_are_in_sync(tmp_path):
    doc = artifacts.repo_root() / "REPRODUCING.md"
    copy = tmp_path / "REPRODUCING.md"
    copy.write_text(doc.read_text(encoding="utf-8"), encoding="utf-8")
    assert not costs.sync_reproducing_md(copy), (
        "run erprm_core.running.costs.sync_reproducing_md() and commit the doc"
    )
    assert "costs:paper-gsm8k:start -->\n| stage |" in copy.read_text(encoding="utf-8")


def test_reproducing_md_accelerate_command_is_valid_for_the_paper_profiles():
    import re

    text = (artifacts.repo_root() / "REPRODUCING.md").read_text(encoding="utf-8")
    command = re.search(r"-m erprm_core\.running\.cli train-prm --profile \$P(.*?)\n", text).group(1)
    overrides = re.findall(r"-p (\S+)", command)
    assert overrides, command
    for profile in PAPER:  # the command's overrides are parameters of 03_train_prm (else ConfigError)
        (stage,) = config.plan(profile, "03", "03", overrides)
        assert (
            stage.parameters["heldout_fraction"]
            == config.load_config(artifacts.configs_root() / profile / "03_train_prm.yaml")[
                "heldout_fraction"
            ]
        )
