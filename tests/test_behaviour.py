"""Central behaviour that had no test (issue 19): stage reruns in the pipeline (papermill stubbed, no kernels),
manifest merging, the PRM score cache of 04 when a PRM is retrained, the summary and eta-sweep tables behind
the README's numbers, pass@k inside the policy evaluation, and bit-identical training with 1 and 2 threads."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import papermill
import pytest

from erprm_core import evaluators, generation, rollouts
from erprm_core.report import figures, summary
from erprm_core.running import artifacts, pipeline
from erprm_core.stages import bon_pool, policy

# ------------------------------------------------------------------------------------- pipeline reruns

STAGES = ("00_a", "01_b", "02_c")


def _notebook(path: Path, code: str) -> None:
    params = nbformat.v4.new_code_cell(
        'profile = "smoke"  # the profile\nx = 1  # a knob', metadata={"tags": ["parameters"]}
    )
    nb = nbformat.v4.new_notebook(cells=[params, nbformat.v4.new_code_cell(code)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


@pytest.fixture()
def fake_repo(tmp_roots, monkeypatch):
    """A repository with three one-knob stage notebooks, profile ``t``, and papermill stubbed: each "run"
    writes the output notebook and a manifest entry as a stage would, and is recorded in ``calls``."""
    root = tmp_roots / "repo"
    (root / "erprm_core").mkdir(parents=True)
    (root / "pyproject.toml").write_text("")
    (root / "erprm_core" / "core.py").write_text("A = 1\n")
    (root / "notebooks").mkdir()
    (root / "configs" / "t").mkdir(parents=True)
    for name in STAGES:
        _notebook(root / "notebooks" / f"{name}.ipynb", f"print({name!r}, x)")
        (root / "configs" / "t" / f"{name}.yaml").write_text("x: 1\n")
    calls: list[tuple[str, dict]] = []

    def execute_notebook(input_path, output_path, parameters, **kwargs):
        stage = Path(input_path).stem
        calls.append((stage, dict(parameters)))
        artifacts.update_manifest("t", stage, written_by_stage=len(calls))  # as stages/_common.record does
        Path(output_path).write_text("{}")

    monkeypatch.setattr(artifacts, "repo_root", lambda start=None: root)
    monkeypatch.setattr(pipeline, "environment_info", lambda: {"git_commit": "c0ffee", "git_dirty": False})
    monkeypatch.setattr(papermill, "execute_notebook", execute_notebook)
    return root, calls


def _ran(calls, start):
    return [stage for stage, _ in calls[start:]]


def test_stage_reruns_when_its_inputs_change_and_downstream_follows(fake_repo):
    root, calls = fake_repo
    summary_1 = pipeline.run("t")
    assert [s["status"] for s in summary_1] == ["ran"] * 3 and _ran(calls, 0) == list(STAGES)
    assert calls[0][1] == {"x": 1, "profile": "t"}

    n = len(calls)
    assert [s["status"] for s in pipeline.run("t")] == ["skipped"] * 3 and len(calls) == n

    # the notebook of 01 changes: 01 and 02 rerun, 00 does not
    _notebook(root / "notebooks" / "01_b.ipynb", "print('changed', x)")
    n = len(calls)
    assert [s["status"] for s in pipeline.run("t")] == ["skipped", "ran", "ran"]
    assert _ran(calls, n) == ["01_b", "02_c"]

    # a parameter of the last stage changes: only it reruns, with the new value
    (root / "configs" / "t" / "02_c.yaml").write_text("x: 2\n")
    n = len(calls)
    assert [s["status"] for s in pipeline.run("t")] == ["skipped", "skipped", "ran"]
    assert calls[n:] == [("02_c", {"x": 2, "profile": "t"})]

    # a parameter of the first stage changes: everything downstream follows
    n = len(calls)
    assert [s["status"] for s in pipeline.run("t", overrides=["x=3"], stop="00_a")] == ["ran"]
    assert [s["status"] for s in pipeline.run("t")] == ["ran", "ran", "ran"]  # 00 back to x=1

    # the package sources change: every stage reruns
    (root / "erprm_core" / "core.py").write_text("A = 2\n")
    n = len(calls)
    assert [s["status"] for s in pipeline.run("t")] == ["ran"] * 3 and _ran(calls, n) == list(STAGES)

    # a lost executed notebook reruns its stage and those after it; force reruns everything
    (artifacts.paths("t").executed_notebooks / "01_b.ipynb").unlink()
    assert [s["status"] for s in pipeline.run("t")] == ["skipped", "ran", "ran"]
    assert [s["status"] for s in pipeline.run("t", force=True)] == ["ran"] * 3


def test_pipeline_manifest_merges_stage_and_pipeline_entries(fake_repo):
    root, calls = fake_repo
    artifacts.update_manifest("t", "99_other", kept=True)  # an entry the pipeline does not own
    pipeline.run("t")
    manifest = artifacts.load_manifest("t")
    assert manifest["profile"] == "t" and manifest["environment"]["git_commit"] == "c0ffee"
    assert manifest["stages"]["99_other"] == {"kept": True}
    entry = manifest["stages"]["01_b"]
    # what the stage wrote (written_by_stage) and what the pipeline adds after it, in one entry
    assert entry["written_by_stage"] == 2 and entry["parameters"] == {"x": 1, "profile": "t"}
    assert entry["config"] == "configs/t/01_b.yaml" and entry["git_commit"] == "c0ffee"
    assert set(entry) >= {"wall_s", "digest"}
    (root / "configs" / "t" / "02_c.yaml").write_text("x: 5\n")
    pipeline.run("t")
    again = artifacts.load_manifest("t")["stages"]
    assert again["02_c"]["parameters"] == {"x": 5, "profile": "t"} and again["02_c"]["written_by_stage"] == 4
    assert again["01_b"] == entry and again["99_other"] == {"kept": True}


def test_update_manifest_merges_into_one_entry(tmp_roots):
    artifacts.update_manifest("m", "01_x", a=1, b={"k": 1})
    artifacts.update_manifest("m", "02_y", c=3)
    merged = artifacts.update_manifest("m", "01_x", b={"j": 2}, d=4)
    # keys merge per stage; a value given again replaces the old one as a whole (no deep merge)
    assert merged["stages"] == {"01_x": {"a": 1, "b": {"j": 2}, "d": 4}, "02_y": {"c": 3}}
    assert json.loads(artifacts.paths("m").manifest.read_text()) == merged


# ------------------------------------------------------------------------- 04's PRM score cache


class CountingPRM:
    """Stands in for a PRM checkpoint folder's loaded model: step score = weight * (step index + 1) / 10."""

    loads = 0

    def __init__(self, folder):
        CountingPRM.loads += 1
        self.weight = float(json.loads((Path(folder) / "w.json").read_text()))
        self.forward_passes = self.tokens_scored = 0

    def score_batch(self, questions, list_of_steps, batch_size=32):
        self.forward_passes += len(questions)
        return [[self.weight * (i + 1) / 10 for i in range(len(steps))] for steps in list_of_steps]

    def info(self):
        return {"weight": self.weight}


def _save_prm(folder: Path, weight: float) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "w.json").write_text(json.dumps(weight))
    (folder / "model.safetensors").write_bytes(str(weight).encode() * 100)  # what the fingerprint reads


POOL = [
    {"problem_id": "p", "candidate_index": j, "correct": j % 2, "answer": str(j), "question": "Q",
     "steps": ["s"] * (j + 1)}
    for j in range(3)
]  # fmt: skip


def test_git_dirty_means_the_code_changed_not_the_results(tmp_path, monkeypatch):
    # a run's own outputs under results/ do not make the next stage's record "dirty"; a code edit does
    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "t.csv").write_text("a\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("init", "-q")
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    monkeypatch.setattr(artifacts, "repo_root", lambda: tmp_path)
    (tmp_path / "results" / "t.csv").write_text("b\n")
    (tmp_path / "results" / "new.csv").write_text("c\n")
    assert pipeline.environment_info()["git_dirty"] is False
    (tmp_path / "code.py").write_text("x = 2\n")
    assert pipeline.environment_info()["git_dirty"] is True


def test_atomic_writes_get_the_usual_file_mode(tmp_path):
    # tables and manifests are written through a temp file; they must not stay owner-only (mkstemp's 0600)
    import os

    from erprm_core import io

    umask = os.umask(0o022)
    try:
        path = io.atomic_write_text(tmp_path / "t.csv", "a,b\n")
        assert path.read_text() == "a,b\n"
        assert path.stat().st_mode & 0o777 == 0o666 & ~io._UMASK
        assert path.stat().st_mode & 0o044  # group and others can read it
        assert not list(tmp_path.glob(".t.csv.*"))  # no temp file left
    finally:
        os.umask(umask)


def test_cached_prm_scores_are_discarded_when_the_prm_is_retrained(tmp_path, monkeypatch):
    monkeypatch.setattr(
        bon_pool.ProcessRewardModel,
        "from_pretrained",
        staticmethod(lambda folder, **kw: CountingPRM(folder)),
    )
    folder, out = tmp_path / "prm_er_1", tmp_path / "bon"
    _save_prm(folder, 1.0)
    first = bon_pool.score_pool(POOL, {"er_1": folder}, ["min", "last"], out_dir=out)
    assert first.table["er_1:last"].tolist() == pytest.approx([0.1, 0.2, 0.3], abs=1e-12)
    assert CountingPRM.loads == 1 and first.stats["rules_computed"] == 1
    again = bon_pool.score_pool(POOL, {"er_1": folder}, ["min", "last"], out_dir=out)
    assert CountingPRM.loads == 1 and again.stats["rules_computed"] == 0  # served from the cache
    pd.testing.assert_frame_equal(again.table, first.table)
    _save_prm(folder, 2.0)  # retrained: same folder, new weights
    retrained = bon_pool.score_pool(POOL, {"er_1": folder}, ["min", "last"], out_dir=out)
    assert CountingPRM.loads == 2 and retrained.stats["rules_computed"] == 1
    assert retrained.table["er_1:last"].tolist() == pytest.approx([0.2, 0.4, 0.6], abs=1e-12)
    assert retrained.table["er_1:min"].tolist() == pytest.approx([0.2, 0.2, 0.2], abs=1e-12)


class CutPRM(CountingPRM):
    """Like CountingPRM, but the final tag of every 3-step solution is lost (its score NaN)."""

    def score_batch(self, questions, list_of_steps, batch_size=32):
        out = super().score_batch(questions, list_of_steps, batch_size)
        return [s[:-1] + [math.nan] if len(s) == 3 else s for s in out]


def test_score_pool_counts_a_lost_final_tag_under_last(tmp_path, monkeypatch):
    monkeypatch.setattr(
        bon_pool.ProcessRewardModel, "from_pretrained", staticmethod(lambda folder, **kw: CutPRM(folder))
    )
    _save_prm(tmp_path / "prm", 1.0)
    scored = bon_pool.score_pool(POOL, {"orm": tmp_path / "prm"}, ["min", "last"], out_dir=tmp_path / "bon")
    # candidate 2 (3 steps) lost its final tag: "last" has no score -> the unscorable score, counted;
    # "min" ignores the lost step
    assert scored.table["orm:last"].tolist() == pytest.approx(
        [0.1, 0.2, bon_pool.UNSCORABLE_SCORE], abs=1e-12
    )
    assert scored.table["orm:min"].tolist() == pytest.approx([0.1, 0.1, 0.1], abs=1e-12)
    assert (
        scored.audit.counts["unscorable[orm:last]"] == 1 and scored.audit.counts["steps_unscored[orm]"] == 1
    )


# ------------------------------------------------------------------- summary and eta sweep tables


def _bon_rows(method, values):
    return [
        {"method": method, "n": n, "metric": "accuracy", "value": v, "ci_low": v - 0.05, "ci_high": v + 0.05}
        for n, v in values.items()
    ]


BON = pd.DataFrame(
    _bon_rows("er_1:min", {1: 0.5, 4: 0.7})
    + _bon_rows("er_1:last", {1: 0.5, 4: 0.9})  # another aggregation: never in the min rows
    + _bon_rows("er_4:min", {1: 0.5, 4: 0.6})
    + _bon_rows("er_0.5:min", {1: 0.5, 4: 0.65})
    + _bon_rows("hard:min", {1: 0.5, 4: 0.55})
    + _bon_rows("soft:min", {1: 0.5, 4: 0.6})
    + _bon_rows("weighted_er_1:min", {1: 0.5, 4: 0.99})  # a weighted vote names no label rule
    + _bon_rows("orm:last", {1: 0.5, 4: 0.52})
    + _bon_rows("orm:min", {1: 0.5, 4: 0.8})
    + _bon_rows("majority", {1: 0.5, 4: 0.6})
    + _bon_rows("random", {1: 0.5, 4: 0.5})
    + _bon_rows("oracle", {1: 0.5, 4: 0.95})
)


def test_eta_sweep_table_values_and_order():
    sweep = figures.eta_sweep_table(BON, 4, "min")
    assert sweep["rule"].tolist() == ["soft", "er_0.5", "er_1", "er_4", "hard"]  # eta 0, 0.5, 1, 4, inf
    assert sweep["eta"].tolist() == [0.0, 0.5, 1.0, 4.0, math.inf]
    assert sweep["value"].tolist() == [0.6, 0.65, 0.7, 0.6, 0.55]
    assert sweep["ci_low"].tolist() == pytest.approx([0.55, 0.6, 0.65, 0.55, 0.5], abs=1e-12)
    assert (sweep["n"] == 4).all()
    assert figures.eta_sweep_table(BON, 4, "last")["rule"].tolist() == ["er_1"]  # the ORM has no eta
    assert figures.eta_sweep_table(BON, 1, "min")["value"].tolist() == [0.5] * 5


def test_summary_table_values():
    paired = pd.DataFrame(
        [
            {"method_a": "er_1:min", "method_b": "hard:min", "n": 4, "diff": 0.15, "ci_low": 0.05,
             "ci_high": 0.25, "p_value": 0.0123},
            {"method_a": "er_1:min", "method_b": "hard:min", "n": 1, "diff": 0.9, "ci_low": 0.8,
             "ci_high": 1.0, "p_value": 0.5},  # another n: not the summary's
        ]
    )  # fmt: skip
    raft = pd.DataFrame(
        [
            {"reward_model": "er_1", "iteration": 1, "metric": "greedy_accuracy", "value": 0.3, "ci_low": 0.2, "ci_high": 0.4},
            {"reward_model": "er_1", "iteration": 2, "metric": "greedy_accuracy", "value": 0.42, "ci_low": 0.31, "ci_high": 0.53},
            {"reward_model": "er_1", "iteration": 2, "metric": "greedy_gain", "value": 0.1, "ci_low": 0.0, "ci_high": 0.2},
            {"reward_model": "baseline", "iteration": 0, "metric": "greedy_accuracy", "value": 0.25, "ci_low": 0.15, "ci_high": 0.35},
        ]
    )  # fmt: skip
    t = summary.summary_table(BON, paired, raft, "er_1", "min", "last")
    acc, diff, final = t.columns[1:]
    assert acc == "best-of-4 accuracy % [95% CI]"
    rows = t.set_index("method")
    assert rows.index.tolist() == [
        "ER-PRM (η=1) [min]", "Hard-label PRM [min]", "Soft-label PRM [min]", "ORM [last]", "Majority vote",
        "Random pick", "Oracle pass@N", "Policy before RLHF",
    ]  # fmt: skip
    assert rows.loc["ER-PRM (η=1) [min]", acc] == "70.0 [65.0, 75.0]"
    assert rows.loc["ORM [last]", acc] == "52.0 [47.0, 57.0]"  # the ORM at its own aggregation
    assert rows.loc["Hard-label PRM [min]", diff] == "+15.0 [+5.0, +25.0], p=0.0123"
    assert rows.loc["Soft-label PRM [min]", diff] == ""  # no paired row for soft
    assert rows.loc["ER-PRM (η=1) [min]", final] == "42.0 [31.0, 53.0]"  # the last iteration
    assert rows.loc["Policy before RLHF", final] == "25.0 [15.0, 35.0]"
    assert rows.loc["Hard-label PRM [min]", final] == ""


def test_summary_facts_quote_the_tables():
    policy_eval = pd.DataFrame(
        [
            {"metric": "greedy_accuracy", "k": 1, "value": 0.5, "ci_low": 0.4, "ci_high": 0.6},
            {"metric": "pass_at_k", "k": 4, "value": 0.7, "ci_low": 0.6, "ci_high": 0.8},
            {"metric": "pass_at_k", "k": 16, "value": 0.912, "ci_low": 0.9, "ci_high": 0.95},
        ]
    )
    text = summary.summary_facts(policy_eval, None, None, figures.eta_sweep_table(BON, 4, "min"), 30, "min")
    assert "greedy accuracy 50.0 [40.0, 60.0] %" in text and "pass@16 at temperature 1.0 = 91.2%" in text
    assert "Best-of-4 accuracy % along the eta sweep on 30 problems, min aggregation: " in text
    assert "soft 60.0, η=0.5 65.0, η=1 70.0, η=4 60.0, hard 55.0" in text


# ---------------------------------------------------------------------------- pass@k in the policy eval


def test_evaluate_policy_pass_at_k_values(monkeypatch):
    problems = [{"id": f"p{i}", "question": "Q", "solution": "a\nb", "n_steps": 2} for i in range(3)]
    n_correct = [0, 1, 3]  # of 4 samples each

    def sample_solutions(sampler, probs, n, temperature=1.0, seed=0, **kwargs):
        out = []
        for i, p in enumerate(probs):
            for j in range(n):
                ok = int(j < n_correct[i]) if temperature > 0 else int(i == 2)
                out.append({"problem_id": p["id"], "sample_index": j, "text": "t", "outcome": ok,
                            "truncated": j == 3, "n_tokens": 5})  # fmt: skip
        return out

    monkeypatch.setattr(rollouts, "sample_solutions", sample_solutions)
    monkeypatch.setattr(generation, "make_sampler", lambda *a, **k: None)
    ev = policy.evaluate_policy(None, None, problems, n_samples=4, ks=(1, 2, 4, 8))
    t = ev.table.set_index(["metric", "k"])
    # unbiased pass@k = mean over problems of 1 - C(4 - c, k) / C(4, k), by hand for c = 0, 1, 3
    assert t.loc[("pass_at_k", 1), "value"] == pytest.approx((0 + 1 / 4 + 3 / 4) / 3, abs=1e-12)
    assert t.loc[("pass_at_k", 2), "value"] == pytest.approx((0 + (1 - 3 / 6) + 1) / 3, abs=1e-12)
    assert t.loc[("pass_at_k", 4), "value"] == pytest.approx(2 / 3, abs=1e-12)
    assert ("pass_at_k", 8) not in t.index  # k above n_samples is left out
    assert t.loc[("sample_accuracy", 1), "value"] == pytest.approx(4 / 12, abs=1e-12)
    assert t.loc[("sample_truncated", 1), "value"] == 0.25
    assert t.loc[("greedy_accuracy", 1), "value"] == pytest.approx(1 / 3, abs=1e-12)
    low, high = t.loc[("pass_at_k", 2), ["ci_low", "ci_high"]]
    assert 0 <= low < 0.5 < high <= 1
    assert evaluators.pass_at_k(np.array(n_correct), 4, 2).tolist() == pytest.approx([0, 0.5, 1])
    assert ev.generated_tokens == 5 * (3 + 12)


# ------------------------------------------------------------------ bit-identical with 1 and 2 threads

TRAIN_SCRIPT = """
import hashlib, sys
from erprm_core.running import numerics
numerics.configure("portable", int(sys.argv[1]))  # the pins, before any tensor operation
import torch
from erprm_core import training
from erprm_core.tiny_lm import build_tiny_model, build_tokenizer
from erprm_core.tasks import arith
assert torch.get_num_threads() == int(sys.argv[1])
tok = build_tokenizer()
# the tiny profile's 00_policy: its model, learning rate and batch, the first 6 optimizer steps
model = build_tiny_model(tok, hidden_size=128, num_layers=4, num_heads=4, intermediate_size=256,
                         max_position_embeddings=384, seed=0)
problems = arith.generate_problems(96, seed=0, split="train", max_steps=6, max_value=99, max_operand=10)
training.train_policy_sft(model, tok, problems, sys.argv[2], max_steps=6, lr=3e-3, batch_size=16,
                          max_length=384, logging_steps=2, save=False, disable_tqdm=True)
h = hashlib.sha256()
for name, p in sorted(model.state_dict().items()):
    h.update(name.encode()); h.update(p.detach().contiguous().numpy().tobytes())
print("DIGEST", h.hexdigest())
"""


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_training_is_bit_identical_with_one_and_two_threads(tmp_path):
    digests = []
    for threads in (1, 2):
        proc = subprocess.run(
            [sys.executable, "-c", TRAIN_SCRIPT, str(threads), str(tmp_path / f"out{threads}")],
            capture_output=True, text=True, timeout=540, cwd=artifacts.repo_root(),
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        digests.append([line for line in proc.stdout.splitlines() if line.startswith("DIGEST")][-1])
    assert digests[0] == digests[1]
