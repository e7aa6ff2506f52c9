"""The 02_labels stage on real stage output: rollouts from the scripted policy -> stepwise labels per rule.

Checks paper.md section 1 on every labelled step: soft <= ER <= hard, monotone in eta, the last step gets
the outcome under every rule, one label per step and no step or solution dropped; plus the statistics,
the distribution table and the worked example the notebook shows.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from erprm_core import generation, io, labels
from erprm_core.running import artifacts
from erprm_core.running.config import parse_eta_grid
from erprm_core.stages import labels as label_stage
from erprm_core.stages import rollouts as rollout_stage
from erprm_core.tasks import arith
from erprm_core.tiny_lm import build_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_sampling import ScriptedLM  # noqa: E402

GRID = "0,0.1,0.5,1,2,5,10,inf"


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    """Rollouts (6 problems x 4 solutions, k = 8) and their labels, written by the two stage functions."""
    root = tmp_path_factory.mktemp("labels")
    mp = pytest.MonkeyPatch()
    mp.setenv("ERPRM_RUNS_ROOT", str(root / "runs"))
    mp.setenv("ERPRM_RESULTS_ROOT", str(root / "results"))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    problems = arith.generate_problems(6, seed=11, max_steps=5)
    tok = build_tokenizer()
    lm = ScriptedLM(tok, problems, p_err=0.1)
    policy = generation.make_sampler(lm, tok, "hf", 64)
    ro = rollout_stage.run_rollouts("lab", policy, problems, n_solutions=4, k=8, shard_size=3, seed=2)
    lab = label_stage.run_labels("lab", parse_eta_grid(GRID))
    yield ro.records, lab, artifacts.paths("lab")
    torch.set_num_threads(before)
    mp.undo()


def test_one_label_per_step_nothing_dropped(staged):
    rollouts, lab, P = staged
    on_disk = artifacts.read_jsonl(P.labels_file, label_stage.LABEL_COLUMNS)
    assert on_disk == lab.records
    assert len(on_disk) == len(rollouts)  # every solution has steps here: none skipped
    assert lab.rules == ["soft", "er_0.1", "er_0.5", "er_1", "er_2", "er_5", "er_10", "hard", "orm"]
    for ro, rec in zip(rollouts, on_disk, strict=True):
        assert (rec["problem_id"], rec["sample_index"], rec["steps"], rec["outcome"]) == (
            ro["problem_id"], ro["sample_index"], ro["steps"], ro["outcome"])  # fmt: skip
        for rule, vals in rec["labels"].items():
            assert len(vals) == len(rec["steps"]), rule
            assert vals[-1] == float(rec["outcome"]), rule  # the last step gets the true outcome
        assert rec["labels"]["orm"][:-1] == [None] * (len(rec["steps"]) - 1)
    frame = lab.audit.to_frame()
    counts = dict(zip(frame["reason"], frame["count"], strict=True))
    assert counts == {
        "labelled_solutions": len(rollouts),
        "labelled_steps": sum(len(r["steps"]) for r in rollouts),
    }


def test_paper_section_1_on_every_step(staged):
    rollouts, lab, _ = staged
    etas = parse_eta_grid(GRID)
    rules = [labels.rule_name(e) for e in etas]  # ascending eta: soft ... hard
    n_mixed = 0
    for ro, rec in zip(rollouts, lab.records, strict=True):
        for i, rewards in enumerate(ro["completion_rewards"]):
            p = sum(rewards) / len(rewards)
            vals = [rec["labels"][r][i] for r in rules]
            assert vals[0] == pytest.approx(p)  # soft = mean
            assert vals[-1] == float(p > 0)  # hard = any completion right
            assert all(a <= b + 1e-12 for a, b in zip(vals, vals[1:], strict=False))  # monotone in eta
            assert all(p - 1e-12 <= v <= float(p > 0) + 1e-12 for v in vals)  # p <= label <= 1[p > 0]
            for eta, v in zip(etas[1:-1], vals[1:-1], strict=True):
                assert v == pytest.approx(labels.er_label_from_fraction(p, eta), abs=1e-12)
            if p in (0.0, 1.0):
                assert set(vals) == {p}
            else:
                n_mixed += 1
    assert n_mixed > 0, "the scripted rollouts should contain prefixes with mixed completions"


def test_skips_solutions_without_steps_and_counts_them():
    audit = io.Audit("02_labels")
    recs = [
        {"problem_id": "a", "sample_index": 0, "question": "q", "steps": [], "outcome": 0, "completion_rewards": []},
        {"problem_id": "b", "sample_index": 0, "question": "q", "steps": ["s1", "The answer is: 1"], "outcome": 1,
         "completion_rewards": [[1, 0, 1, 1]]},
    ]  # fmt: skip
    out = label_stage.label_records(recs, [0.0, 1.0, math.inf], audit)
    assert [r["problem_id"] for r in out] == ["b"]
    assert out[0]["labels"]["er_1"][0] == pytest.approx(math.log(0.25 + 0.75 * math.e))
    counts = dict(zip(audit.to_frame()["reason"], audit.to_frame()["count"], strict=True))
    assert counts["skipped_no_steps"] == 1
    bad = dict(recs[1], completion_rewards=[])
    with pytest.raises(ValueError, match="b#0"):
        label_stage.label_records([bad], [1.0])


def test_check_values_k16_eta1(paper_k16_eta1_labels):
    # the same check values through the labelling of stage records
    rewards = [[1] * j + [0] * (16 - j) for j in range(1, 16)]
    out = label_stage.label_records(
        [
            {
                "problem_id": "x",
                "question": "q",
                "steps": ["s"] * 16,
                "outcome": 1,
                "completion_rewards": rewards,
            }
        ],
        [1.0],
    )
    assert np.round(out[0]["labels"]["er_1"][:-1], 3).tolist() == paper_k16_eta1_labels


def test_statistics_distribution_and_worked_example(staged):
    rollouts, lab, _ = staged
    stats = label_stage.label_statistics(lab.records)
    assert list(stats.columns) == ["rule", "eta", "metric", "value"]
    wide = stats.pivot(index="rule", columns="metric", values="value")
    assert wide.loc["soft", "mean"] <= wide.loc["er_1", "mean"] <= wide.loc["hard", "mean"]
    assert wide.loc["orm", "n_labels"] == len(lab.records)
    assert wide.loc["soft", "n_labels"] == sum(len(r["steps"]) for r in lab.records)
    for rule in ("soft", "er_1", "hard"):
        row = wide.loc[rule]
        assert row["share_zero"] + row["share_one"] + row["share_between"] == pytest.approx(1.0)
    assert wide.loc["hard", "share_between"] == 0
    dist = label_stage.label_distribution(lab.records, bins=5)
    assert dist.groupby("rule")["count"].sum().to_dict() == wide["n_labels"].astype(int).to_dict()
    assert dist.groupby("rule")["share"].sum().round(9).eq(1).all()

    example = label_stage.pick_worked_example(rollouts)
    assert len(example["steps"]) >= 3 and any(0 < sum(r) < len(r) for r in example["completion_rewards"])
    table = label_stage.worked_example_table(example, parse_eta_grid(GRID))
    assert list(table["step"]) == list(range(1, len(example["steps"]) + 1))
    assert list(table.columns[:5]) == ["step", "text", "truth", "completions", "p"]  # arith: a ground truth
    assert table["orm"].iloc[-1] == example["outcome"] and table["orm"].iloc[:-1].isna().all()
    assert (table["soft"] <= table["er_1"] + 1e-9).all() and (table["er_1"] <= table["hard"] + 1e-9).all()


def _rollout(
    pid: str, n_steps: int, first_error: int | None, rewards: list[list[int]], outcome: int = 0
) -> dict:
    rec = {"problem_id": pid, "sample_index": 0, "question": "q", "task": "arith" if first_error is not None
           else "gsm8k", "steps": [f"step {i + 1} " + "x" * 80 for i in range(n_steps)], "outcome": outcome,
           "completion_rewards": rewards}  # fmt: skip
    if first_error is not None:
        rec["first_error"], rec["error_type"] = first_error, "arithmetic_slip" if first_error >= 0 else "none"
    return rec


MIXED, ALL, NONE = [1, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0]


def test_worked_example_rule_right_steps_then_a_wrong_one():
    """The stated rule: the first solution whose first error is at step 2 or later and before the answer
    line, with a right step of mixed completions; tasks without a truth fall back to the old rule."""
    no_truth = _rollout("a", 4, None, [MIXED, NONE, NONE])
    error_at_step_1 = _rollout("b", 4, 0, [MIXED, MIXED, NONE])
    no_mixed_right_step = _rollout("c", 4, 2, [ALL, ALL, NONE])
    mixed_only_after_error = _rollout("d", 5, 1, [ALL, MIXED, NONE, NONE])
    wrong_answer_line = _rollout("e", 4, 3, [MIXED, ALL, ALL])
    truncated = _rollout("f", 3, 3, [MIXED, ALL], outcome=0)
    all_right = _rollout("g", 4, -1, [MIXED, ALL, ALL], outcome=1)
    chosen = _rollout("h", 5, 2, [ALL, MIXED, NONE, NONE])
    later = _rollout("i", 5, 1, [MIXED, NONE, NONE, NONE])
    pool = [no_truth, error_at_step_1, no_mixed_right_step, mixed_only_after_error, wrong_answer_line, truncated,
            all_right, chosen, later]  # fmt: skip
    assert label_stage.pick_worked_example(pool) is chosen
    assert label_stage.pick_worked_example(pool[:7]) is no_truth  # none qualifies: the first mixed one
    table = label_stage.worked_example_table(chosen, [0.0, 1.0, math.inf])
    assert list(table["truth"]) == ["right", "right", "WRONG (arithmetic_slip)", "after the error",
                                    "after the error"]  # fmt: skip
    assert list(table["text"]) == chosen["steps"]  # every step whole
    assert list(table["p"]) == [1.0, 0.75, 0.0, 0.0, 0.0]
    assert "truth" not in label_stage.worked_example_table(no_truth, [0.0]).columns
    assert label_stage.step_truth(all_right) == ["right"] * 4
    assert label_stage.step_truth(truncated) == ["right"] * 3  # the missing line is the error


def test_eta_explorer_is_a_static_figure_unless_interactive(monkeypatch):
    """papermill and nbval get a figure (no widget state in the executed notebook); a `make lab` session a
    slider that redraws for the chosen eta."""
    import ipywidgets
    from matplotlib.figure import Figure

    from erprm_core.report import style

    example = _rollout("h", 5, 2, [ALL, MIXED, NONE, NONE])
    res = label_stage.LabelResult(
        records=[], audit=io.Audit("t"), rules=[], rollouts=[example], example=example
    )
    monkeypatch.setenv(io.INTERACTIVE_ENV, "1")
    assert not style.interactive()  # not in a notebook kernel
    fig = label_stage.eta_explorer(res)
    assert isinstance(fig, Figure)
    lines = {ln.get_label() for ln in fig.axes[0].get_lines()}
    assert lines == {"Soft-label PRM", "ER-PRM (η=0.5)", "ER-PRM (η=2)", "ER-PRM (η=10)", "Hard-label PRM"}
    monkeypatch.setattr(style, "interactive", lambda: True)
    widget = label_stage.eta_explorer(res)
    assert isinstance(widget, ipywidgets.Widget)
    slider = widget.children[0]
    assert slider.description == "η" and slider.value == 1.0
