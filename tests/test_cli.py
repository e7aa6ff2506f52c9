"""The `erprm` command: its entry point, `score` on a tiny PRM, and `train-prm` reading the profile config."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from erprm_core import prm
from erprm_core.running import artifacts, cli, config
from erprm_core.stages import train_prm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_prm import make_model, make_tokenizer  # noqa: E402

WORDS = "Tom has 3 apples . He buys 2 more 3 + 2 = 5 The answer is : 5 Ann 4 pens gives 1 away 4 - 1".split()

SOLUTIONS = [
    ("Tom has 3 apples .", ["He buys 2 more .", "3 + 2 = 5", "The answer is : 5"]),
    ("Ann has 4 pens .", ["Ann gives 1 away .", "4 - 1 = 3", "The answer is : 3"]),
]


@pytest.fixture(scope="module")
def prm_folder(tmp_path_factory):
    """A tiny random-weight Llama PRM in the Math-Shepherd format (" ки" tag, "+" / "-" tokens)."""
    folder = tmp_path_factory.mktemp("tiny_prm")
    tok = make_tokenizer(words=WORDS)
    make_model(tok).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_entry_point_is_the_cli_module():
    pyproject = (artifacts.repo_root() / "pyproject.toml").read_text()
    assert '\nerprm = "erprm_core.running.cli:main"\n' in pyproject


@pytest.mark.slow  # starts fresh Python processes that import torch (outside `make test-fast`)
def test_python_dash_m_runs_the_cli():
    proc = subprocess.run(
        [sys.executable, "-m", "erprm_core.running.cli", "--help"],
        capture_output=True,
        text=True,
        cwd=artifacts.repo_root(),
        env={**os.environ, "PYTHONPATH": str(artifacts.repo_root())},
    )
    assert proc.returncode == 0, proc.stderr
    for command in ("reproduce", "figures", "compare", "golden", "bench", "train-prm", "score"):
        assert command in proc.stdout


def test_score_writes_step_scores_and_the_prm_info(prm_folder, tmp_path):
    artifacts.atomic_write_jsonl(tmp_path / "in.jsonl", [{"question": q, "steps": s} for q, s in SOLUTIONS])
    argv = ["score", "--model", str(prm_folder), "--input", str(tmp_path / "in.jsonl")]
    assert cli.main([*argv, "--output", str(tmp_path / "out.jsonl"), "--device", "cpu"]) == 0
    out = artifacts.read_jsonl(tmp_path / "out.jsonl")
    model = prm.ProcessRewardModel.from_pretrained(prm_folder, device="cpu")
    for rec, (q, s) in zip(out, SOLUTIONS, strict=True):
        np.testing.assert_allclose(rec["step_scores"], model.score(q, s), atol=1e-6)
        assert rec["prm_info"]["scoring"] == "two_token" and rec["prm_info"]["good_token"] == "+"


def test_score_names_a_record_without_steps(prm_folder, tmp_path):
    artifacts.atomic_write_jsonl(tmp_path / "in.jsonl", [{"question": "Tom has 3 apples ."}])
    argv = ["score", "--model", str(prm_folder), "--input", str(tmp_path / "in.jsonl")]
    assert cli.main([*argv, "--output", str(tmp_path / "out.jsonl"), "--device", "cpu"]) == 2
    assert not (tmp_path / "out.jsonl").exists()


def test_train_prm_uses_the_profile_config_and_the_overrides(monkeypatch):
    seen = []
    monkeypatch.setattr(train_prm, "train", seen.append)
    assert cli.main(["train-prm", "--profile", "smoke", "-p", "rules=soft", "-p", "lr=0.002"]) == 0
    (stage_config,) = seen
    assert isinstance(stage_config, train_prm.TrainPRMConfig)
    smoke = config.load_config(artifacts.configs_root() / "smoke" / "03_train_prm.yaml")
    assert stage_config.profile == "smoke" and stage_config.rules == "soft" and stage_config.lr == 0.002
    assert stage_config.heldout_fraction == smoke["heldout_fraction"]  # the notebook's held-out split


def test_train_prm_refuses_an_unknown_parameter(monkeypatch):
    monkeypatch.setattr(train_prm, "train", lambda c: pytest.fail("must not train"))
    assert cli.main(["train-prm", "--profile", "smoke", "-p", "no_such_knob=1"]) == 2
    assert cli.main(["train-prm", "--profile", "no-such-profile"]) == 2


def test_seeds_command_errors_exit_2_and_name_the_problem(tmp_path, caplog):
    with artifacts.redirected_roots(tmp_path / "runs", tmp_path / "results"):
        assert cli.main(["seeds", "--profile", "smoke", "--seeds", "1,x"]) == 2
        assert "'x' is not an integer" in caplog.text
        assert cli.main(["seeds", "--profile", "smoke", "--seeds", "1"]) == 2  # nothing to fork yet
        assert "produced by stage 00_policy" in caplog.text
        assert not (tmp_path / "runs" / "seeds").exists()  # no folder made before the error
