"""Multi-process PRM training on the CPU (issue 18): ``accelerate launch`` with configs/accelerate/ddp_cpu.yaml
runs ``erprm train-prm`` as two processes (torch DDP over gloo). Against the one-process run with the same
global batch it must give the same loss curve and write one checkpoint, which ProcessRewardModel loads and
which 03_train_prm then evaluates without training it again.

Slow (two fresh Python processes import torch and transformers: the launch test takes 15 s on 2 idle cores,
45-60 s on a busy machine), so ``make test`` runs it and ``make test-fast`` leaves it out."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from erprm_core import training
from erprm_core.prm import ProcessRewardModel
from erprm_core.running import artifacts, cli
from erprm_core.stages import train_prm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_prm import WORDS, make_model, make_tokenizer  # noqa: E402

pytestmark = pytest.mark.slow

HELDOUT = 0.25  # the smoke profile's held-out fraction
STEPS = ["He buys 2 more .", "3 + 2 = 5", "4 - 1 = 3", "Ann gives 1 away .", "The answer is : 5", "x * 2 / 3"]
# The recipe of both runs except the per-device batch: 2 processes x 2 = 1 process x 4 sequences per step.
RECIPE = ["rules=soft", "epochs=2", "lr=0.003", "max_length=64", f"heldout_fraction={HELDOUT}", "seed=0"]

# Tolerance of the loss curves. Measured: 1.2e-7 at most over the steps (float32 rounding: DDP averages the
# two processes' gradients over gloo where one process sums them in one backward pass). A wrong shard, sample
# order or gradient average moves the loss by ~1e-2 from the first step on (2.1e-2 when each process's mean
# counted as much as the other's, whatever its number of labelled tags: the loss before issue 18), so 1e-5
# keeps a margin of ~100x above the rounding and ~1000x below a real error. The records have 1-5 steps, so
# the processes hold different numbers of tags. The number of training records is a multiple of the global
# batch: otherwise DDP fills the last batch of an epoch with repeated samples where one process takes a
# short batch (measured with 31 records: the curves part by up to 7e-3 from that step on).
LOSS_ATOL = 1e-5


def _records(n: int = 24) -> list[dict]:
    """Label records of 1-5 steps with soft labels; the training share is cut to a multiple of 4."""
    rng = random.Random(0)
    question = "Tom has 3 apples . How many does Tom have now ?"
    recs = []
    for i in range(n):
        labels = [round(rng.random(), 3) for _ in range(rng.randint(1, 5))]
        recs.append({"problem_id": f"p{i}", "question": question, "steps": rng.sample(STEPS, len(labels)),
                     "outcome": int(labels[-1] > 0.5), "labels": {"soft": labels}})  # fmt: skip
    train, held = train_prm.split_heldout(recs, HELDOUT)
    return train[: len(train) // 4 * 4] + held


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny random-weight PRM base (test_prm's tokenizer and 2-layer Llama)."""
    folder = tmp_path_factory.mktemp("base")
    tok = make_tokenizer(words=WORDS)
    make_model(tok).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture()
def profile_roots(base, tmp_path):
    """Two runs/results roots holding the same smoke labels file, and the base."""
    recs = _records()
    roots = {}
    for name in ("one", "two"):
        runs, results = tmp_path / name / "runs", tmp_path / name / "results"
        with artifacts.redirected_roots(runs, results):
            artifacts.atomic_write_jsonl(artifacts.paths("smoke").labels_file, recs)
        roots[name] = (runs, results)
    return base, roots, recs


def _launch_two_processes(base: Path, runs: Path, results: Path) -> subprocess.CompletedProcess:
    """``accelerate launch --config_file configs/accelerate/ddp_cpu.yaml -m erprm_core.running.cli train-prm``."""
    root = artifacts.repo_root()
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(root / "configs" / "accelerate" / "ddp_cpu.yaml"), "--num_processes", "2",
        "-m", "erprm_core.running.cli", "train-prm", "--profile", "smoke",
        "-p", f"base_model={base}", "-p", "batch_size=2", *[a for p in RECIPE for a in ("-p", p)],
    ]  # fmt: skip
    with artifacts.redirected_roots(runs, results):
        env = {**os.environ, "PYTHONPATH": str(root)}
        return subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=300)


def test_two_processes_train_the_one_process_curve_and_one_checkpoint(profile_roots):
    base, roots, recs = profile_roots
    with artifacts.redirected_roots(*roots["one"]):
        argv = ["train-prm", "--profile", "smoke", "-p", f"base_model={base}", "-p", "batch_size=4"]
        assert cli.main([*argv, *[a for p in RECIPE for a in ("-p", p)]]) == 0
        one = pd.read_csv(artifacts.paths("smoke").prm("soft") / training.PRM_LOG_FILE)
    proc = _launch_two_processes(base, *roots["two"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    with artifacts.redirected_roots(*roots["two"]):
        prms = artifacts.paths("smoke").prm("soft").parent
        folder = prms / "soft"
        assert sorted(p.name for p in prms.iterdir()) == ["soft"]  # one checkpoint: no .partial, no copy
        assert train_prm.prm_checkpoint_complete(folder)
        assert not [p for p in folder.iterdir() if p.name.startswith("checkpoint-")]
        two = pd.read_csv(folder / training.PRM_LOG_FILE)
        n_train = len(train_prm.split_heldout(recs, HELDOUT)[0])
        assert n_train % 4 == 0 and len(two) == len(one) == 2 * n_train // 4  # global batch 4 in both
        np.testing.assert_array_equal(two["step"], one["step"])
        np.testing.assert_allclose(two["loss"], one["loss"], rtol=0, atol=LOSS_ATOL)
        assert abs(two["loss"].iloc[-1] - two["loss"].iloc[0]) > 100 * LOSS_ATOL  # the curve moved

        # the checkpoint loads; 03_train_prm finds it complete, skips its training and evaluates it
        model = ProcessRewardModel.from_pretrained(folder, device="cpu")
        heldout = train_prm.split_heldout(recs, HELDOUT)[1]
        expected = model.score_batch([r["question"] for r in heldout], [r["steps"] for r in heldout])
        config = train_prm.TrainPRMConfig(profile="smoke", base_model=str(base), rules="soft",
                                          heldout_fraction=HELDOUT, torch_threads=1)  # fmt: skip
        res = train_prm.run(config)
    assert res.runs["trained"].tolist() == [False]
    pd.testing.assert_frame_equal(res.log.drop(columns=["rule", "loss_floor"]), two, check_dtype=False)
    assert res.log["loss_floor"].nunique() == 1 and res.log["loss_floor"].iloc[0] > 0  # soft labels: above 0
    np.testing.assert_allclose(res.scores["score"], np.concatenate(expected), atol=1e-6)
    assert set(res.metrics["metric"]) >= {"brier", "mean_score", "auroc_min"}


def test_accumulation_trains_the_one_batch_curve(base, tmp_path):
    """The loss of a step is the mean over all its labelled tags: 2 micro-batches of 2 = 1 batch of 4."""
    train = train_prm.split_heldout(_records(), HELDOUT)[0]
    recipe = dict(epochs=2, lr=0.003, max_length=64, seed=0, save=False, disable_tqdm=True)
    one = training.train_prm(str(base), None, train, "soft", tmp_path / "a", batch_size=4, **recipe)
    acc = training.train_prm(
        str(base), None, train, "soft", tmp_path / "b", batch_size=2, grad_accum=2, **recipe
    )
    assert len(acc) == len(one) == 2 * len(train) // 4
    np.testing.assert_allclose(acc["loss"], one["loss"], rtol=0, atol=LOSS_ATOL)
    np.testing.assert_allclose(acc["grad_norm"], one["grad_norm"], rtol=0, atol=10 * LOSS_ATOL)


def test_a_launch_without_a_distributed_backend_is_refused(base, tmp_path, monkeypatch):
    """WORLD_SIZE=2 but a Trainer of one process (no backend for the device): each process would train its own
    model into the same folder, so training stops before it starts."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(training, "_cpu_processes", lambda: False)  # as before issue 18: no CPU backend
    train = train_prm.split_heldout(_records(), HELDOUT)[0]
    with pytest.raises(RuntimeError, match="launched as several processes"):
        training.train_prm(str(base), None, train, "soft", tmp_path / "x", max_steps=1, save=False)
