"""What a reader of the executed notebooks sees (issue 15): figures shown inline (once), the baselines and the
paper's numbers in figs. 2-4, the prefix-success figure by steps remaining with counts, manifest entries that
hold this run's values with paths relative to the repository root, and counts shown as integers. The kernel
test runs 06_figures under papermill on small tables and counts its inline images."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from cycler import cycler

from erprm_core.labels import method_order
from erprm_core.report import figures, style
from erprm_core.running import artifacts
from erprm_core.stages import _common, labels, rollouts

# ----------------------------------------------------------------------------------------------- tables


def _rows(method: str, values: dict[int, float], n_problems: int = 20) -> list[dict]:
    return [
        {"method": method, "n": n, "metric": "accuracy", "value": v, "ci_low": v - 0.05, "ci_high": v + 0.05,
         "n_problems": n_problems}
        for n, v in values.items()
    ]  # fmt: skip


BON = pd.DataFrame(
    _rows("er_1:min", {1: 0.3, 2: 0.35, 4: 0.4})
    + _rows("hard:min", {1: 0.3, 2: 0.32, 4: 0.33})
    + _rows("soft:min", {1: 0.3, 2: 0.34, 4: 0.36})
    + _rows("orm:last", {1: 0.3, 2: 0.31, 4: 0.3})
    + _rows("majority", {1: 0.3, 2: 0.3, 4: 0.45})
    + _rows("random", {1: 0.3, 2: 0.3, 4: 0.3})
    + _rows("oracle", {1: 0.3, 2: 0.5, 4: 0.7})
)
POLICY_EVAL = pd.DataFrame(
    [{"metric": "greedy_accuracy", "k": 1, "value": 0.42, "ci_low": 0.37, "ci_high": 0.47},
     {"metric": "pass_at_k", "k": 4, "value": 0.7, "ci_low": 0.6, "ci_high": 0.8}]
)  # fmt: skip
BY_STEPS = pd.DataFrame({"n_steps": [2, 3], "n_problems": [60, 40]})


def _raft_rows(model: str, values: dict[int, float]) -> list[dict]:
    return [
        {"reward_model": model, "iteration": it, "metric": "greedy_accuracy", "value": v, "ci_low": v - 0.05,
         "ci_high": v + 0.05}
        for it, v in values.items()
    ]  # fmt: skip


RAFT = pd.DataFrame(
    _raft_rows("baseline", {0: 0.4})
    + _raft_rows("er_1", {1: 0.41, 2: 0.42})
    + _raft_rows("hard", {1: 0.38, 2: 0.36})
    + _raft_rows("oracle", {1: 0.43, 2: 0.44})
    + _raft_rows("random", {1: 0.39, 2: 0.38})
)


def _labels(ax) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]


def _line(ax, label: str):
    found = [ln for ln in ax.get_lines() if ln.get_label() == label]
    assert found, f"no line {label!r} among {[ln.get_label() for ln in ax.get_lines()]}"
    return found[0]


# ---------------------------------------------------------------------------------------------- figures


def test_shown_saves_closes_and_returns_the_figure(tmp_path):
    fig, ax = plt.subplots()
    ax.plot([0, 1])
    assert style.shown(fig, tmp_path, "x") is fig
    assert (tmp_path / "x.png").is_file() and (tmp_path / "x.pdf").is_file()
    assert not plt.fignum_exists(fig.number)  # closed: not drawn a second time at the end of a cell
    fig2, _ = plt.subplots()
    assert style.shown(fig2) is fig2 and not plt.fignum_exists(fig2.number)
    assert len(list(tmp_path.iterdir())) == 2  # nothing saved without a folder and a name


def test_fig2_draws_accuracy_minus_greedy_on_one_axis_and_n_4_to_64():
    greedy = figures.greedy_reference(POLICY_EVAL, BY_STEPS)
    assert greedy["value"] == 0.42 and greedy["label"] == "Greedy decoding (00_policy, 100 test problems)"
    assert greedy["n_problems"] == 100
    methods = figures.headline_methods(BON, "er_1", "min", "last")
    fig = figures.figure_best_of_n(BON, methods, figures.paper_reference(), "run", greedy)
    run, gsm8k, math = fig.axes
    assert run.get_ylim() == gsm8k.get_ylim() == math.get_ylim()  # one shared y-axis
    random = _line(run, "Random pick")
    assert np.allclose(random.get_ydata(), 30 - 42) and tuple(random.get_xdata()) == (0, 1)  # axhline
    assert set(_line(run, f"{greedy['label']}: 42.0%").get_ydata()) == {0.0}  # greedy decoding is zero
    er = _line(run, "ER-PRM (η=1) [min]")
    assert list(er.get_xdata()) == [4] and np.allclose(er.get_ydata(), 40 - 42)  # N = 1, 2 left out
    assert "Oracle pass@N" in _labels(run)
    assert set(_line(gsm8k, "Greedy decoding (its RAFT start policy): 77.9%").get_ydata()) == {0.0}
    assert set(_line(math, "Greedy decoding (its RAFT start policy, MATH test): 28.6%").get_ydata()) == {0.0}
    paper_er = _line(gsm8k, "ER-PRM (η not stated)")
    assert list(paper_er.get_xdata()) == [4, 8, 16, 32, 64]
    assert np.isclose(paper_er.get_ydata()[-1], 89.54 - 77.9)
    for ax in fig.axes:
        assert [t.get_text() for t in ax.get_xticklabels()] == ["4", "8", "16", "32", "64"]
        assert "greedy decoding" in [t.get_text() for t in ax.texts]
    assert "greedy decoding" in run.get_ylabel()
    plt.close(fig)
    raw = figures.figure_best_of_n(BON, methods, figures.paper_reference(), "run", None)
    assert "raw" in raw.axes[0].get_ylabel()
    assert set(_line(raw.axes[1], "Greedy decoding (its RAFT start policy): 77.9%").get_ydata()) == {77.9}
    plt.close(raw)
    assert figures.greedy_reference(None) is None
    assert figures.greedy_reference(POLICY_EVAL[POLICY_EVAL["metric"] != "greedy_accuracy"]) is None


def test_fig2_legends_are_off_the_data():
    fig = _best_of_n()
    fig.canvas.draw()
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    assert len(legends) == 3
    for legend in legends:
        box = legend.get_window_extent()
        for ax in fig.axes:
            assert not box.overlaps(ax.get_window_extent()), "a legend covers a panel"
    assert len({ax.get_ylim() for ax in fig.axes}) == 1
    plt.close(fig)


def test_fig3_keeps_the_random_line_and_adds_greedy():
    sweep = figures.eta_sweep_table(BON, 4, "min")
    base = figures.bon_baselines(BON, 4, figures.greedy_reference(POLICY_EVAL))
    assert base["method"].tolist() == ["majority", "random", "oracle", "greedy"]
    fig = figures.figure_eta_sweep(sweep, base)
    lines = {"Random pick", "Majority vote", "Oracle pass@N", "Greedy decoding (00_policy, test problems)"}
    assert lines <= set(_labels(fig.axes[0]))
    assert set(_line(fig.axes[0], "Random pick").get_ydata()) == {30.0}
    plt.close(fig)


def test_fig4_names_raft_controls_and_shows_the_papers_raft_numbers():
    fig = figures.figure_raft(RAFT, figures.paper_reference())
    run, gsm8k, math = fig.axes
    legend = _labels(run)
    assert {"RAFT with oracle reward (correct picks)", "RAFT with random pick (no reward)"} <= set(legend)
    assert not any("pass@N" in text for text in legend)
    assert "Start policy (no RLHF)" in legend and "ER-PRM (η=1)" in legend
    points = {round(ln.get_ydata()[0], 1) for ln in gsm8k.get_lines() if ln.get_marker() == "o"}
    assert points == {78.7, 79.0, 79.5}  # soft, hard, ER-PRM after RAFT
    assert "Start policy (no RLHF) 77.9" in _labels(gsm8k) and "Start policy (no RLHF) 28.6" in _labels(math)
    plt.close(fig)
    alone = figures.figure_raft(RAFT)  # without the paper: one panel
    assert len(alone.axes) == 1
    plt.close(alone)


def test_prefix_success_is_by_steps_remaining_with_counts():
    # two problems of different lengths: a 3-step and a 5-step solution, prefixes of all but the last step
    prefixes = pd.DataFrame(
        [{"problem_id": "a", "sample_index": 0, "step": s, "n_steps": 3, "outcome": 1, "k": 4, "n_correct": 4,
          "p": 1.0} for s in (1, 2)]
        + [{"problem_id": "b", "sample_index": 0, "step": s, "n_steps": 5, "outcome": 1, "k": 4, "n_correct": 2,
            "p": 0.5} for s in (1, 2, 3, 4)]
    )  # fmt: skip
    fig = figures.figure_prefix_success(prefixes)
    ax, ax_n = fig.axes
    line = ax.get_lines()[0]
    # steps remaining 1..4: the last two steps of both solutions line up (means of 1.0 and 0.5), the rest is b's
    assert list(line.get_xdata()) == [1, 2, 3, 4]
    assert list(line.get_ydata()) == [0.75, 0.75, 0.5, 0.5]
    assert [t.get_text() for t in ax_n.texts] == ["2", "2", "1", "1"]  # prefixes behind each point
    assert "steps remaining" in ax_n.get_xlabel()
    plt.close(fig)


# ----------------------------------------------------------------------------------- manifest and tables


@dataclass(frozen=True)
class _Config:
    profile: str = "t"
    base_model: str = ""
    policy_name: str = ""
    torch_threads: int = 0


def test_record_replaces_the_entry_with_repo_relative_paths(tmp_roots):
    # a previous run, and what the pipeline added after it: none of it may linger beside this run's values
    artifacts.update_manifest("t", "03_x", parameters={"n_problems": 128}, wall_s=9.0, torch_threads=1)
    policy = artifacts.paths("t").policy
    entry = _common.record("t", "03_x", _Config(base_model=str(policy)), torch_threads=2,
                           files=(policy / "a.png",), hub="org/model", outside="/elsewhere/x")  # fmt: skip
    assert entry == {
        "base_model": "runs/t/policy", "policy_name": "", "torch_threads": 2, "files": ["runs/t/policy/a.png"],
        "hub": "org/model", "outside": "/elsewhere/x",
    }  # fmt: skip
    assert artifacts.load_manifest("t")["stages"]["03_x"] == entry
    assert _common.repo_relative(artifacts.repo_root() / "configs" / "tiny") == "configs/tiny"


def test_resolve_policy_finds_a_policy_recorded_relative(tmp_roots):
    folder = tmp_roots / "models" / "local-policy"
    folder.mkdir(parents=True)
    _common.record("t", "00_policy", _Config(policy_name=str(folder)))
    assert artifacts.load_manifest("t")["stages"]["00_policy"]["policy_name"] == "models/local-policy"
    assert Path(_common.resolve_policy("t")) == folder
    _common.record("t", "00_policy", _Config(policy_name="org/model"))
    assert _common.resolve_policy("t") == "org/model"


def test_counts_show_as_integers():
    stats = {"problems": 256, "solutions": 1024, "solution_accuracy": 0.166015625, "completion_tokens": 1772893,
             "wall_s": 12.5, "computed_generated_tokens": 5}  # fmt: skip
    table = rollouts.rollout_summary_table(stats)
    assert table["metric"].tolist() == ["problems", "solutions", "solution_accuracy", "completion_tokens"]
    assert table["value"].tolist() == [256, 1024, 0.166016, 1772893]
    assert "e+" not in table.to_string()
    assert table.to_csv(index=False, float_format="%.6g").splitlines()[1:] == [
        "problems,256", "solutions,1024", "solution_accuracy,0.166016", "completion_tokens,1772893",
    ]  # fmt: skip
    # rates are written as a float column writes them (0.0 as 0), so the golden table digests stay
    zero = rollouts.rollout_summary_table({"solution_accuracy": 0.0, "mean_steps": 4.4375})
    csv_lines = zero.to_csv(index=False, float_format="%.6g").splitlines()[1:]
    assert csv_lines == ["solution_accuracy,0", "mean_steps,4.4375"]
    stats_table = pd.DataFrame(
        [{"rule": r, "eta": 1.0, "metric": m, "value": v} for r in ("soft", "hard")
         for m, v in (("n_labels", 12.0), ("mean", 0.25))]
    )  # fmt: skip
    res = labels.LabelResult(records=[], audit=None, rules=["soft", "hard"], stats=stats_table)
    wide = res.stats_by_rule()
    assert wide["n_labels"].tolist() == [12, 12] and str(wide["n_labels"].dtype) == "Int64"


# ---------------------------------------------------------------------------------- 06 in a real kernel


@pytest.mark.kernel
def test_06_figures_shows_every_figure_inline(tmp_roots):
    import papermill

    profile = "t06"
    tables = artifacts.paths(profile).tables
    tables.mkdir(parents=True)
    BON.to_csv(tables / "bon.csv", index=False)
    pd.DataFrame(
        [{"method_a": "er_1:min", "method_b": b, "n": 4, "diff": 0.05, "ci_low": -0.01, "ci_high": 0.1,
          "p_value": 0.2} for b in ("hard:min", "soft:min", "orm:last")]
    ).to_csv(tables / "bon_paired.csv", index=False)  # fmt: skip
    RAFT.to_csv(tables / "raft.csv", index=False)
    POLICY_EVAL.to_csv(tables / "policy_eval.csv", index=False)
    out = tmp_roots / "06_figures.ipynb"
    papermill.execute_notebook(
        str(artifacts.notebooks_root() / "06_figures.ipynb"), str(out), parameters={"profile": profile},
        kernel_name="python3", cwd=str(artifacts.repo_root()), progress_bar=False,
    )  # fmt: skip
    nb = json.loads(out.read_text())
    outputs = [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 6, f"expected figs. 1-6 inline, got {len(images)} images"
    text = json.dumps(outputs)
    assert str(tmp_roots) not in text and str(artifacts.repo_root()) not in text, "absolute path in an output"
    as_repr = [o for o in outputs if "<Figure size" in "".join(o.get("data", {}).get("text/plain", ""))]
    assert all("image/png" in o["data"] for o in as_repr), "a figure shown only as its repr"
    assert np.all([(artifacts.paths(profile).figures / f"fig{i}_{n}.png").is_file() for i, n in
                   enumerate(("label_curves", "best_of_n", "eta_sweep", "raft", "paired_differences", "paper_vs_run"),
                             start=1)])  # fmt: skip
    assert (artifacts.paths(profile).tables / "paper_vs_run.csv").is_file()
    assert "The paper beside this run" in (artifacts.paths(profile).results / "summary.md").read_text()


# ------------------------------------------------------------------------------ one style for every figure

TINY_TABLES = artifacts.repo_root() / "results" / "tiny" / "tables"
SENTINEL = "#ff00ff"  # matplotlib's colour cycle while these figures are drawn: a colour left to it shows up


def _tiny(name: str) -> pd.DataFrame:
    if not (TINY_TABLES / f"{name}.csv").is_file():
        pytest.skip(f"results/tiny has no table {name}")
    return pd.read_csv(TINY_TABLES / f"{name}.csv")


def _calibration_with_intervals() -> pd.DataFrame:
    c = _tiny("prm_calibration")
    half = 1.96 * np.sqrt(c["mean_target"] * (1 - c["mean_target"]) / c["count"].clip(lower=1))
    return c.assign(ci_low=(c["mean_target"] - half).clip(0), ci_high=(c["mean_target"] + half).clip(upper=1))


def _sweep_with_bands() -> pd.DataFrame:
    s = _tiny("step_eval_sweep")
    return s.assign(f1_low=(s["f1"] - 0.05).clip(0), f1_high=(s["f1"] + 0.05).clip(upper=1))


def _processbench_splits() -> pd.DataFrame:
    s = _tiny("step_eval_sweep")
    s = s[s["prm"] == "er_1"]
    return pd.concat([s.assign(split=split, f1=s["f1"] * k) for k, split in enumerate(["gsm8k", "math"], 1)])


def _explorer() -> plt.Figure:
    rollout = {"problem_id": "p", "sample_index": 0, "question": "q", "steps": ["a", "b", "c", "The answer is: 3"],
               "outcome": 0, "task": "x",
               "completion_rewards": [[1, 0, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]], "first_error": 1,
               "error_type": "arithmetic_slip"}  # fmt: skip
    grid = [0.0, 2.0, float("inf")]
    example = labels.worked_example_table(rollout, grid)
    distribution = labels.label_distribution(labels.label_records([rollout], grid))
    return figures.figure_label_explorer(example, distribution, ["soft", "er_2", "hard"])


def _policy_accuracy() -> plt.Figure:
    return figures.figure_policy_accuracy(_tiny("policy_eval"), _tiny("policy_accuracy_by_steps"), 200)


def _best_of_n() -> plt.Figure:
    bon = _tiny("bon")
    greedy = figures.greedy_reference(_tiny("policy_eval"), _tiny("policy_accuracy_by_steps"))
    methods = figures.headline_methods(bon, "er_1", "min", "last")
    return figures.figure_best_of_n(bon, methods, figures.paper_reference(), "run", greedy)


def _eta_sweep() -> plt.Figure:
    bon = _tiny("bon")
    greedy = figures.greedy_reference(_tiny("policy_eval"), _tiny("policy_accuracy_by_steps"))
    n = int(bon["n"].max())
    sweep = figures.eta_sweep_table(bon, n, "min")
    return figures.figure_eta_sweep(sweep, figures.bon_baselines(bon, n, greedy), figures.paper_reference())


def _aggregations() -> plt.Figure:
    from erprm_core.prm import AGGREGATIONS
    from erprm_core.stages import bon_tables

    bon = _tiny("bon")
    n = int(bon["n"].max())
    return figures.figure_aggregations(bon_tables.aggregation_table(bon, n), n, AGGREGATIONS)


def _paired_with_families() -> tuple[pd.DataFrame, pd.DataFrame]:
    """bon_paired and raft_paired with the columns a newer run writes: family and Holm-adjusted p."""
    bon = _tiny("bon_paired")
    bon = bon.assign(family=np.where(bon["selection"] == "prespecified", "headline", "post hoc"),
                     p_holm=(bon["p_value"] * 3).clip(upper=1))  # fmt: skip
    raft = _tiny("raft_paired")
    raft = raft.assign(family="reward models vs ER-PRM", p_holm=(raft["p_value"] * 4).clip(upper=1))
    return bon, raft


def _paper_vs_run() -> pd.DataFrame:
    from erprm_core.report import summary

    greedy = figures.greedy_reference(_tiny("policy_eval"), _tiny("policy_accuracy_by_steps"))
    return summary.paper_comparison(_tiny("bon"), _tiny("raft"), figures.paper_reference(), "er_1", "min", "last",
                                    greedy, _tiny("bon_paired"), "tiny policy (0.72M parameters)")  # fmt: skip


FIGURE_CASES = {
    "figure_label_curves": lambda: [figures.figure_label_curves(figures.label_curve_table([0, 0.5, 10, np.inf]))],
    "figure_best_of_n": lambda: [_best_of_n()],
    "figure_eta_sweep": lambda: [_eta_sweep()],
    "figure_raft": lambda: [figures.figure_raft(_tiny("raft"), figures.paper_reference())],
    "figure_training_curves": lambda: [
        figures.figure_training_curves(_tiny("prm_training"), smooth=5),
        figures.figure_training_curves(_tiny("prm_training").assign(loss_floor=0.1), smooth=5),
    ],
    "figure_calibration": lambda: [figures.figure_calibration(_tiny("prm_calibration")),
                                   figures.figure_calibration(_calibration_with_intervals())],
    "figure_min_position": lambda: [figures.figure_min_position(_tiny("prm_min_position"))],
    "figure_policy_training": lambda: [figures.figure_policy_training(_tiny("policy_training"))],
    "figure_policy_accuracy": lambda: [_policy_accuracy()],
    "figure_prefix_success": lambda: [figures.figure_prefix_success(_tiny("rollouts_prefixes"))],
    "figure_label_distribution": lambda: [figures.figure_label_distribution(
        _tiny("label_distribution"), method_order(_tiny("label_distribution")["rule"]))],
    "figure_label_explorer": lambda: [_explorer()],
    "figure_aggregations": lambda: [_aggregations()],
    "figure_processbench_sweep": lambda: [
        figures.figure_processbench_sweep(_tiny("step_eval_sweep"), 0.5, by="prm"),
        figures.figure_processbench_sweep(_sweep_with_bands(), 0.5, by="prm"),
        figures.figure_processbench_sweep(_processbench_splits(), 0.5),
        figures.figure_processbench_sweep(_processbench_splits(), 0.5, by="prm"),
    ],
    "figure_label_quality": lambda: [figures.figure_label_quality(_tiny("label_quality"))],
    "figure_paired_differences": lambda: [
        figures.figure_paired_differences(_tiny("bon_paired")),
        figures.figure_paired_differences(_tiny("bon_paired"), _tiny("raft_paired")),
        figures.figure_paired_differences(*_paired_with_families()),
    ],
    "figure_paper_vs_run": lambda: [figures.figure_paper_vs_run(_paper_vs_run())],
    "figure_first_error": lambda: [figures.figure_first_error(_tiny("prm_truth"))],
}  # fmt: skip
"""Every figure function of erprm_core.report.figures, drawn on the committed tiny tables (plus the optional
columns a stage may add: intervals, loss floors, several splits)."""


def _palette() -> set[str]:
    """The colours a figure may use: the methods', the ER shades, outcomes, other series; greys separately."""
    ers = [style.method_colour(f"er_{eta:g}") for eta in style.ER_ETAS]
    named = [*style.BASE_COLOURS.values(), *style.OUTCOME_COLOURS.values(), *style.OTHER_COLOURS, *ers]
    return {matplotlib.colors.to_hex(c) for c in named}


def _artist_colours(fig: plt.Figure) -> set[str]:
    """The colours of every line, marker, patch, collection and text drawn on the axes of ``fig`` (fully
    transparent ones aside); a heat map's colour-mapped mesh is left out (a colour scale, not a series)."""
    found = []
    for ax in fig.axes:
        for line in ax.lines:
            found += [line.get_color(), line.get_markerfacecolor(), line.get_markeredgecolor()]
        for patch in ax.patches:
            found += [patch.get_facecolor(), patch.get_edgecolor()] if patch.get_visible() else []
        for coll in ax.collections:
            if not isinstance(coll, matplotlib.collections.QuadMesh):
                found += [*coll.get_facecolor(), *coll.get_edgecolor()]
        for text in ax.texts:
            found.append(text.get_color())
            if getattr(text, "arrow_patch", None) is not None:
                found.append(text.arrow_patch.get_edgecolor())
    out = set()
    for c in found:
        if isinstance(c, str) and c == "none":
            continue
        rgba = matplotlib.colors.to_rgba(c)
        if rgba[3] > 0:
            out.add(matplotlib.colors.to_hex(rgba))
    return out


def _off_palette(fig: plt.Figure) -> set[str]:
    """Colours of ``fig`` that are neither in the style's palette nor a grey (black, white and greys are the
    neutral colours of reference lines, text and backgrounds)."""
    palette = _palette()

    def grey(c: str) -> bool:
        r, g, b = (int(c[i : i + 2], 16) for i in (1, 3, 5))
        return max(r, g, b) - min(r, g, b) <= 2

    return {c for c in _artist_colours(fig) if c not in palette and not grey(c)}


def test_every_figure_function_has_a_style_case():
    drawn = {name for name in dir(figures) if name.startswith("figure_") and callable(getattr(figures, name))}
    assert drawn == set(FIGURE_CASES), f"add a case to FIGURE_CASES for {sorted(drawn - set(FIGURE_CASES))}"


@pytest.mark.parametrize("name", sorted(FIGURE_CASES))
def test_figure_uses_only_the_style_palette(name):
    with plt.rc_context({"axes.prop_cycle": cycler(color=[SENTINEL])}):
        drawn = FIGURE_CASES[name]()
    try:
        for fig in drawn:
            assert _artist_colours(fig), f"{name}: nothing drawn"
            assert not _off_palette(fig), (
                f"{name} draws colours outside the style palette: {_off_palette(fig)}"
            )
    finally:
        for fig in drawn:
            plt.close(fig)


def test_the_palette_check_catches_the_default_colour_cycle():
    with plt.rc_context({"axes.prop_cycle": cycler(color=[SENTINEL])}):
        fig, ax = plt.subplots()
        ax.plot([0, 1], [0, 1])
    assert _off_palette(fig) == {SENTINEL}
    plt.close(fig)
    fig, ax = plt.subplots()  # matplotlib's own cycle: its second colour (orange) is no method's
    for k in range(3):
        ax.plot([0, 1], [k, k])
    assert "#ff7f0e" in _off_palette(fig)
    plt.close(fig)


def test_method_colours_and_order_follow_the_style_in_the_threshold_sweep():
    """The figure that had matplotlib's colours (eta=10 in red, hard's colour) and alphabetical order."""
    fig = figures.figure_processbench_sweep(_sweep_with_bands(), 0.5, by="prm")
    ax = fig.axes[0]
    rules = method_order(_tiny("step_eval_sweep")["prm"].unique())
    assert _labels(ax) == [style.method_label(r) for r in rules]  # er_2 before er_10, hard after them
    for rule in rules:
        assert _line(ax, style.method_label(rule)).get_color() == style.method_colour(rule)
    assert len(ax.collections) == len(rules)  # one interval band per PRM
    plt.close(fig)


# -------------------------------------------------------------------------- fig. 5: paired differences


def test_forest_draws_one_interval_per_comparison_grouped_by_family():
    bon, raft = _paired_with_families()
    table = figures.paired_difference_table(bon, raft)
    n_max = int(bon["n"].max())
    last = int(raft["iteration"].max())
    assert len(table) == (bon["n"] == n_max).sum() + (raft["iteration"] == last).sum()
    fig = figures.figure_paired_differences(bon, raft)
    top, bottom = fig.axes
    assert len(top.containers) == (bon["n"] == n_max).sum()  # one errorbar per best-of-N row at N_max
    assert len(bottom.containers) == (raft["iteration"] == last).sum()  # one per RAFT row, last iteration
    texts = [t.get_text() for t in top.texts]
    assert {"headline", "post hoc"} <= set(texts)  # a header per family
    ps = [t for t in texts if t.startswith("Holm p = ")]
    assert len(ps) == len(top.containers)
    er_hard = table[(table["method"] == "er_1:min") & table["label"].str.contains("Hard")].iloc[0]
    row = bon[(bon["n"] == n_max) & (bon["method_a"] == "er_1:min") & (bon["method_b"] == "hard:min")].iloc[0]
    assert np.isclose(er_hard["diff"], row["diff"] * 100) and np.isclose(er_hard["p"], row["p_holm"])
    heads = set(bon.loc[bon["n"] == n_max, "method_a"])  # er_1 and the post hoc best eta of this run
    for container in top.containers:  # the row's colour: method A's
        assert container.lines[0].get_color() in {style.method_colour(m) for m in heads}
    assert any(line.get_xdata()[0] == 0 for line in top.get_lines() if len(set(line.get_xdata())) == 1)
    plt.close(fig)
    older = _tiny("bon_paired").drop(columns=["family", "p_holm"], errors="ignore")  # a table before Holm
    alone = figures.figure_paired_differences(older)  # raw p, no RAFT panel
    assert len(alone.axes) == 1 and any(t.get_text().startswith("p = ") for t in alone.axes[0].texts)
    plt.close(alone)


# ------------------------------------------------------------------------ fig. 6: the paper beside this run


def test_paper_comparison_reads_the_paper_and_this_run():
    from erprm_core.report import summary

    reference = figures.paper_reference()
    table = _paper_vs_run().set_index("quantity")
    er = table.loc["best-of-64 accuracy, ER-PRM"]
    paper = reference[(reference["experiment"] == "best_of_n") & (reference["dataset"] == "gsm8k")
                      & (reference["method"] == "er_prm") & (reference["n"] == 64)]["accuracy"].iloc[0]  # fmt: skip
    assert er["paper_gsm8k"] == round(paper, 1) == 89.5 and er["paper_math500"] == 41.8
    bon = _tiny("bon")
    mine = bon[(bon["method"] == "er_1:min") & (bon["n"] == 64) & (bon["metric"] == "accuracy")].iloc[0]
    assert er["this_run"] == round(mine["value"] * 100, 1)
    assert er["this_run_ci_low"] == round(mine["ci_low"] * 100, 1)
    gain = table.loc["best-of-64: ER-PRM minus hard-label PRM (points)"]
    assert gain["kind"] == "gain" and gain["paper_gsm8k"] == round(89.54 - 89.16, 1)
    paired = _tiny("bon_paired")
    d = paired[(paired["n"] == 64) & (paired["method_a"] == "er_1:min") & (paired["method_b"] == "hard:min")]
    assert gain["this_run_ci_high"] == round(d["ci_high"].iloc[0] * 100, 1)
    greedy = table.loc["greedy decoding accuracy (paper: its RAFT start policy)"]
    policy_greedy = _tiny("policy_eval").query("metric == 'greedy_accuracy'")["value"].iloc[0]
    assert (greedy["paper_gsm8k"], greedy["paper_math500"]) == (77.9, 28.6)
    assert greedy["this_run"] == round(policy_greedy * 100, 1)
    raft = table.loc["RAFT with ER-PRM: gain over the start policy (points)"]
    assert raft["paper_gsm8k"] == 1.6 and raft["paper_math500"] == 4.2
    assert "500 test problems" in er["this_run_scale"] and "1,319" in er["paper_scale"]
    assert "0.72M parameters" in er["this_run_scale"]
    # without the paired table a gain has no interval; a table with fewer candidates has no N = 64 numbers
    small = summary.paper_comparison(BON, RAFT, reference, "er_1", "min", "last", None).set_index("quantity")
    assert small.loc["best-of-4: ER-PRM minus hard-label PRM (points)", "this_run"] == 7.0
    assert np.isnan(small.loc["best-of-4: ER-PRM minus hard-label PRM (points)", "this_run_ci_low"])
    assert np.isnan(small.loc["best-of-64 accuracy, ER-PRM", "this_run"])
    assert small.loc["best-of-4 accuracy, ER-PRM", "paper_gsm8k"] == 86.0  # 86.05 read off the figure
    md = summary.paper_comparison_markdown(_paper_vs_run())
    assert md.startswith("### The paper beside this run") and "- Paper: Mistral-MetaMath-7B" in md
    cell = f"{er['this_run']:.1f} [{er['this_run_ci_low']:.1f}, {er['this_run_ci_high']:.1f}]"
    assert f"| best-of-64 accuracy, ER-PRM | 89.5 | 41.8 | {cell} |" in md


def test_paper_vs_run_figure_draws_every_quantity():
    table = _paper_vs_run()
    fig = figures.figure_paper_vs_run(table)
    accuracy, gain = fig.axes
    assert len(accuracy.get_yticks()) == (table["kind"] == "accuracy").sum()
    assert len(gain.get_yticks()) == (table["kind"] == "gain").sum()
    assert len(accuracy.containers) == 1 and len(gain.containers) == 1  # this run, with intervals
    fig.canvas.draw()
    legend = gain.get_legend()
    assert not any(legend.get_window_extent().overlaps(ax.get_window_extent()) for ax in fig.axes)
    plt.close(fig)
