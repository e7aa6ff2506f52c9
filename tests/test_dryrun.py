"""The offline dry run of the paper profiles: its pieces (data, tiny models, overrides), then both chains."""

import json
import time

import pandas as pd
import pytest

from erprm_core import models, prm
from erprm_core.running import artifacts, cli, config, dryrun
from erprm_core.steps import BAD_TOKEN, GOOD_TOKEN, STEP_TAG

PAPER = ["paper-gsm8k", "paper-math"]


@pytest.fixture()
def no_shared_data(tmp_path, monkeypatch):
    monkeypatch.setattr(dryrun, "shared_data_root", lambda: tmp_path / "absent")


@pytest.fixture()
def one_thread():
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest on a shared 2-core machine
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("profile", PAPER)
def test_dry_run_plan_keeps_the_paper_settings_and_overrides_sizes(tmp_path, profile):
    stages = {s.name: s.parameters for s in dryrun.plan(profile, base=tmp_path)}  # every key is declared
    assert list(stages) == list(config.stage_notebooks())
    root = tmp_path.resolve() / profile
    p0, p1, p3 = stages["00_policy"], stages["01_rollouts"], stages["03_train_prm"]
    assert p0["policy_name"] == dryrun.HUB_POLICY and p0["source"] == str(root / "data")
    assert p1["completer_name"] == str(root / "models" / "completer")
    assert p3["base_model"] == str(root / "models" / "prm_base")
    assert {stages[s].get("backend") for s in ("01_rollouts", "04_best_of_n", "05_rlhf_raft")} == {"hf"}
    assert all(p.get("device", "cpu") == "cpu" for p in stages.values())
    # what the dry run does not override stays the paper's
    assert p0["prompt_template"] == "metamath" and p0["task"] in ("gsm8k", "math")
    assert p3["lr"] == 5e-7 and p3["max_length"] == 512 and p3["lr_scheduler"] == "cosine"
    assert stages["04_best_of_n"]["aggregation"] == "min"
    assert stages["05_rlhf_raft"]["reward_models"] == "er_1,hard,soft,orm"


def test_partial_plan_keeps_only_the_overrides_of_its_stages(tmp_path):
    stages = dryrun.plan("paper-gsm8k", "05", "06", base=tmp_path)
    assert [s.name for s in stages] == ["05_rlhf_raft", "06_figures"]
    assert stages[0].parameters["backend"] == "hf"


def test_profiles_without_a_dry_run_file_are_refused(tmp_path, capsys):
    with pytest.raises(config.ConfigError, match="dry-run"):
        dryrun.plan("smoke", base=tmp_path)
    assert cli.main(["reproduce", "--profile", "smoke", "--dry-run", "--check"]) == 2


def test_cli_check_prints_the_dry_run_plan(capsys):
    assert cli.main(["reproduce", "--profile", "paper-math", "--dry-run", "--check"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == len(config.stage_notebooks())
    assert '"backend": "hf"' in out and "models/prm_base" in out


@pytest.mark.parametrize("task", ["gsm8k", "math"])
def test_fixture_data_goes_through_the_real_loaders(tmp_path, no_shared_data, task):
    from erprm_core import tasks

    sources = dryrun.write_dry_run_data(task, tmp_path, n_train=6, n_test=3)
    assert all("fixtures" in s for s in sources.values())
    train = tasks.load_problems(task, "train", 6, source=str(tmp_path))
    test = tasks.load_problems(task, "test", 3, source=str(tmp_path))
    assert len(train) == 6 and len(test) == 3
    assert all(p["answer"] and p["question"] and p["task"] == task for p in train + test)
    with pytest.raises(ValueError, match="needs 99"):
        dryrun.write_dry_run_data(task, tmp_path, n_train=99, n_test=3)


def test_tiny_models_are_the_paper_families_and_write_steps(tmp_path, no_shared_data, one_thread):
    import torch

    dryrun.write_dry_run_data("gsm8k", tmp_path / "data", 4, 2)
    tok = dryrun.build_dry_run_tokenizer(dryrun.texts_of(tmp_path / "data"))
    ids = prm.resolve_prm_token_ids(tok, STEP_TAG, GOOD_TOKEN, BAD_TOKEN)  # the PRM tokens are single tokens
    assert len({ids.tag_id, ids.good_id, ids.bad_id}) == 3
    paths = dryrun.build_tiny_models(tmp_path / "models", tok)
    expected = {
        "policy": "MistralForCausalLM",
        "completer": "LlamaForCausalLM",
        "prm_base": "LlamaForCausalLM",
    }
    for role, arch in expected.items():
        model_config = json.loads((paths[role] / "config.json").read_text())
        assert model_config["architectures"] == [arch]
        assert (
            json.loads((paths[role] / "dry_run.json").read_text())["stands_in_for"]
            == dryrun.MODEL_FAMILIES[role][0]
        )
    assert (
        json.loads((paths["prm_base"] / "config.json").read_text())["rope_parameters"]["rope_type"]
        == "llama3"
    )
    model, tokenizer = models.load_causal_lm(paths["policy"], device="cpu", dtype="float32")
    prompt = tokenizer(["Tom has 3 apples."] * 8, return_tensors="pt")
    torch.manual_seed(0)
    out = model.generate(**prompt, do_sample=True, max_new_tokens=24, pad_token_id=tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(out[:, prompt.input_ids.shape[1] :], skip_special_tokens=True)
    assert sum(t.count("\n") for t in texts) >= 8, texts  # the newline bias gives multi-step solutions


def test_only_dry_run_folders_are_deleted(tmp_path):
    precious = tmp_path / "paper-gsm8k"
    precious.mkdir()
    (precious / "keep.txt").write_text("mine")
    with pytest.raises(config.ConfigError, match="not a dry-run folder"):
        dryrun.prepare("paper-gsm8k", base=tmp_path)
    assert (precious / "keep.txt").read_text() == "mine"
    with pytest.raises(config.ConfigError, match="run the whole chain first"):
        dryrun.reuse("paper-math", base=tmp_path)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("profile", PAPER)
def test_whole_dry_run(tmp_path, monkeypatch, profile):
    monkeypatch.delenv("ERPRM_RUNS_ROOT", raising=False)
    monkeypatch.delenv("ERPRM_RESULTS_ROOT", raising=False)
    real_results = artifacts.paths(profile).results
    existed = real_results.exists()
    t0 = time.perf_counter()
    prepared, summary = dryrun.run(profile, base=tmp_path)
    wall = time.perf_counter() - t0
    print(f"dry run of {profile}: {wall:.0f} s; stages {[(s['stage'], round(s['wall_s'])) for s in summary]}")
    assert [s["stage"] for s in summary] == list(config.stage_notebooks())
    assert all(s["status"] == "ran" for s in summary)
    assert real_results.exists() == existed  # nothing written to results/<profile>
    results = prepared.results_root / profile
    manifest = json.loads((results / "manifest.json").read_text())
    assert manifest["stages"]["01_rollouts"]["parameters"]["backend"] == "hf"
    assert manifest["stages"]["03_train_prm"]["parameters"]["lr"] == 5e-7
    rollouts = pd.read_csv(results / "tables" / "rollouts_summary.csv").set_index("metric")["value"]
    assert rollouts["completions"] > 0  # the completer ran on step prefixes
    labels = artifacts.read_jsonl(prepared.runs_root / profile / "labels.jsonl")
    etas = config.load_config(artifacts.configs_root() / profile / "02_labels.yaml")["etas"]
    assert len(labels[0]["labels"]) == len(etas.split(",")) + 1  # the paper's eta grid + the ORM
    bon = pd.read_csv(results / "tables" / "bon.csv")
    assert bon["n"].max() == 4 and bon["value"].between(0, 1).all()
    raft = pd.read_csv(results / "tables" / "raft.csv")
    assert set(raft["reward_model"]) >= {"er_1", "hard", "soft", "orm"} and raft["iteration"].max() == 2
    assert (results / "figures" / "fig2_best_of_n.png").is_file()
    # 07: ProcessBench for the trained PRMs and the released-PRM stand-in (pinned revision), fixture records
    step_eval = pd.read_csv(results / "tables" / "step_eval.csv")
    assert set(step_eval["benchmark"]) == {"processbench"} and set(step_eval["split"]) == {"gsm8k", "math"}
    released = f"{dryrun.HUB_RELEASED_PRM}@{'0' * 40}"
    assert set(step_eval["prm"]) == {"er_1", "soft", "hard", "orm", released}
    assert (step_eval["n"] == 3).all() and (step_eval["n_error"] + step_eval["n_correct"] <= 3).all()
