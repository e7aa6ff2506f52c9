"""Notebook hygiene and config checks: jupytext twins in sync, no outputs, config keys match parameters."""

import json
import shutil
from pathlib import Path

import jupytext
import pandas as pd
import pytest

from erprm_core.report import summary
from erprm_core.running import artifacts, cli, config

NOTEBOOKS = sorted(artifacts.notebooks_root().glob("[0-9][0-9]_*.ipynb"))


def _code_and_markdown(nb) -> list[tuple[str, str, list[str]]]:
    return [(c.cell_type, c.source.strip(), sorted(c.metadata.get("tags", []))) for c in nb.cells]


def test_there_are_notebooks():
    assert NOTEBOOKS, "no stage notebooks found"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_twin_in_sync_and_no_outputs(path: Path):
    twin = path.with_suffix(".py")
    assert twin.is_file(), f"{path.name} has no jupytext py:percent twin {twin.name}"
    ipynb = jupytext.read(path)
    py = jupytext.read(twin)
    assert _code_and_markdown(ipynb) == _code_and_markdown(py), (
        f"{path.name} and {twin.name} differ: run `jupytext --sync {twin}`"
    )
    raw = json.loads(path.read_text())
    for cell in raw["cells"]:
        if cell["cell_type"] == "code":
            assert not cell.get("outputs"), f"{path.name} has outputs: strip them"
            assert cell.get("execution_count") is None, f"{path.name} has execution counts"
            assert "injected-parameters" not in cell.get("metadata", {}).get("tags", []), (
                f"{path.name} is an output notebook (it has an injected-parameters cell)"
            )
    assert raw["metadata"]["kernelspec"]["name"] == "python3"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_one_parameters_cell_with_typed_literals(path: Path):
    nb = jupytext.read(path)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: expected exactly one cell tagged 'parameters'"
    params = config.notebook_parameters(path)
    assert "profile" in params
    for name, info in params.items():
        assert info["inferred_type_name"] != "None", f"{path.name}: parameter {name} has no type annotation"
        assert info["help"], f"{path.name}: parameter {name} has no trailing comment"


@pytest.mark.parametrize("profile", config.profiles())
def test_every_config_key_is_a_notebook_parameter(profile):
    stages = config.plan(profile)  # raises ConfigError on any unknown key or wrong type
    assert all(s.parameters["profile"] == profile for s in stages)


def test_misspelt_parameter_fails_naming_key_and_file(tmp_path, monkeypatch):
    configs = tmp_path / "configs"
    shutil.copytree(artifacts.configs_root(), configs)
    target = sorted((configs / "smoke").glob("*.yaml"))[0]
    target.write_text(target.read_text() + "sede: 3\n")
    monkeypatch.setattr(artifacts, "configs_root", lambda: configs)
    with pytest.raises(config.ConfigError, match=rf"{target.name}.*unknown parameter 'sede'"):
        config.plan("smoke")


def test_override_checks():
    with pytest.raises(config.ConfigError, match="match no parameter"):
        config.plan("smoke", overrides=["no_such_knob=1"])
    with pytest.raises(config.ConfigError, match="key=value"):
        config.plan("smoke", overrides=["seed"])
    with pytest.raises(config.ConfigError, match="unknown profile"):
        config.plan("no-such-profile")
    stages = config.plan("smoke", "00", "00", overrides=["seed=7"])
    assert [s.name for s in stages] == ["00_policy"] and stages[0].parameters["seed"] == 7
    # a stage-qualified override changes that stage only (erprm seeds retrains the PRMs with other seeds)
    stages = {s.name: s.parameters for s in config.plan("smoke", "03", "05", overrides=["03.seed=5"])}
    assert stages["03_train_prm"]["seed"] == 5 and stages["04_best_of_n"]["seed"] == 0
    assert config.plan("smoke", "03", "03", overrides=["03_train_prm.seed=6"])[0].parameters["seed"] == 6
    with pytest.raises(config.ConfigError, match="match no parameter"):
        config.plan("smoke", "04", "05", overrides=["03.seed=5"])  # stage 03 is not in the plan
    for loose in ("0.seed=5", "03_train.seed=5"):  # a qualifier names one stage, not a prefix of several
        with pytest.raises(config.ConfigError, match="match no parameter"):
            config.plan("smoke", "03", "05", overrides=[loose])
    with pytest.raises(config.ConfigError, match="stage.name"):
        config.parse_override("03 x.seed=1")


def test_parse_override_types():
    assert config.parse_override("a=3") == ("a", 3)
    assert config.parse_override("a=0.5") == ("a", 0.5)
    assert config.parse_override("a=true") == ("a", True)
    assert config.parse_override("a=0,1,inf") == ("a", "0,1,inf")


def test_readme_summary_matches_committed_results():
    readme = (artifacts.repo_root() / "README.md").read_text()
    summary_md = artifacts.repo_root() / "results" / "tiny" / "summary.md"
    if not summary_md.is_file():
        pytest.skip("results/tiny has not been produced yet")
    block = readme.split(summary.README_START, 1)[1].split(summary.README_END, 1)[0]
    assert block.strip() == summary_md.read_text().strip(), (
        "README summary differs from results/tiny/summary.md"
    )
    assert "results/tiny/figures/fig2_best_of_n.png" in readme
    assert (artifacts.repo_root() / "results" / "tiny" / "figures" / "fig2_best_of_n.png").is_file()


def test_readme_prose_quotes_no_result_numbers():
    """Result numbers live only in the synced summary block: prose outside it quotes no percentages."""
    import re

    readme = (artifacts.repo_root() / "README.md").read_text()
    head, rest = readme.split(summary.README_START, 1)
    tail = rest.split(summary.README_END, 1)[1]
    found = re.findall(r"\d+(?:\.\d+)?\s?%(?! (?:interval|confidence|CI))", head + tail)  # not "95% interval"
    assert not found, f"README prose quotes result numbers {found}; put them in the summary block"


def test_summary_facts_from_tables():
    policy_eval = pd.DataFrame(
        {
            "metric": ["greedy_accuracy", "pass_at_k", "pass_at_k"],
            "k": [1, 4, 64],
            "value": [0.42, 0.6, 0.92],
            "ci_low": [0.378, None, 0.875],
            "ci_high": [0.464, None, 0.955],
        }
    )
    by_steps = pd.DataFrame({"n_steps": [2, 3], "n_problems": [200, 300]})
    rollouts = pd.DataFrame(
        {
            "metric": ["problems", "solutions", "solution_accuracy", "prefixes", "completions"],
            "value": [128, 512, 0.18359, 2144, 17152],
        }
    )
    sweep = pd.DataFrame(
        {
            "rule": ["soft", "er_1", "hard"],
            "eta": [0, 1, float("inf")],
            "n": [64] * 3,
            "value": [0.156, 0.145, 0.101],
        }
    )
    text = summary.summary_facts(
        policy_eval, by_steps, rollouts, sweep, n_problems_pool=200, aggregation="min"
    )
    lines = text.splitlines()
    assert lines[0].startswith("- Policy: greedy accuracy 42.0 [37.8, 46.4] % on 500 held-out problems;")
    assert "pass@64 at temperature 1.0 = 92.0%" in lines[0]
    assert "512 sampled solutions of 128 problems (18.4% correct), 8 completions per step prefix" in lines[1]
    assert lines[2].startswith(
        "- Best-of-64 accuracy % along the eta sweep on 200 problems, min aggregation:"
    )
    assert "soft 15.6, η=1 14.5, hard 10.1" in lines[2]
    assert summary.summary_facts(None, None, None, None) == ""


def test_ctrl_c_during_a_stage_says_how_to_resume(tmp_roots, monkeypatch, caplog):
    """Ctrl-C (in the parent or in the kernel) ends `erprm reproduce` with exit code 130 and a resume hint,
    and the interrupted stage is not marked done."""
    import papermill

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(papermill, "execute_notebook", interrupted)
    with caplog.at_level("ERROR"):
        assert cli.main(["reproduce", "--profile", "smoke", "--from", "02", "--to", "02"]) == 130
    assert "interrupted during stage 02_labels" in caplog.text and "resume" in caplog.text
    state = tmp_roots / "runs" / "smoke" / "pipeline_state.json"
    assert "02_labels" not in (json.loads(state.read_text()) if state.is_file() else {})

    def kernel_interrupted(*args, **kwargs):
        raise papermill.PapermillExecutionError(3, 1, "KeyboardInterrupt", "KeyboardInterrupt", "", [])

    monkeypatch.setattr(papermill, "execute_notebook", kernel_interrupted)
    assert cli.main(["reproduce", "--profile", "smoke", "--from", "02", "--to", "02"]) == 130


def test_sync_readme_copies_the_summary_between_the_markers(tmp_path):
    md = summary.write_summary(tmp_path / "results" / "summary.md", "| a |\n|---|\n| 1 |\n")
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{summary.README_START}\nold\n{summary.README_END}\nrest\n")
    assert summary.sync_readme(md, readme)
    assert (
        readme.read_text()
        == f"intro\n{summary.README_START}\n| a |\n|---|\n| 1 |\n{summary.README_END}\nrest\n"
    )
    assert not summary.sync_readme(md, readme)  # unchanged the second time
    assert not summary.sync_readme(tmp_path / "absent.md", readme)
