"""The smoke chain end to end through papermill (as `make smoke` runs it), then nbval on the executed copies.

Runs every stage notebook of the `smoke` profile into a temporary runs/results root, asserts on the tables
and the manifest, checks that a second invocation skips up-to-date stages, and re-executes the executed
notebooks under nbval in lax mode (cells tagged nbval-check-output must reproduce their outputs).
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from erprm_core.running import artifacts, config, pipeline, reproducibility

pytestmark = [pytest.mark.slow, pytest.mark.kernel]  # papermill kernels, then nbval


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("smoke")
    with artifacts.redirected_roots(root / "runs", root / "results"):
        summary = pipeline.run("smoke", force=True, cell_timeout=600)
        again = pipeline.run("smoke", cell_timeout=600)
        yield root, summary, again


def test_every_stage_ran_then_was_up_to_date(smoke_run):
    _, summary, again = smoke_run
    stages = list(config.stage_notebooks())
    assert [s["stage"] for s in summary] == stages
    assert all(s["status"] == "ran" for s in summary)
    assert all(s["status"] == "skipped" for s in again)


def test_tables_are_tidy_and_finite(smoke_run):
    root, _, _ = smoke_run
    tables = root / "results" / "smoke" / "tables"
    bon = pd.read_csv(tables / "bon.csv")
    assert {"method", "n", "metric", "value", "ci_low", "ci_high"} <= set(bon.columns)
    acc = bon[bon["metric"] == "accuracy"]
    assert acc["value"].between(0, 1).all()
    assert (acc["ci_low"] <= acc["value"] + 1e-9).all() and (acc["value"] <= acc["ci_high"] + 1e-9).all()
    oracle = acc[acc["method"] == "oracle"].sort_values("n")["value"].tolist()
    assert oracle == sorted(oracle), "oracle pass@N must not decrease with N"
    raft = pd.read_csv(tables / "raft.csv")
    assert raft["value"].map(math.isfinite).all()
    assert (root / "results" / "smoke" / "summary.md").read_text().count("|") > 10
    for fig in ["fig1_label_curves", "fig2_best_of_n", "fig3_eta_sweep", "fig4_raft"]:
        assert (root / "results" / "smoke" / "figures" / f"{fig}.png").is_file()
        assert (root / "results" / "smoke" / "figures" / f"{fig}.pdf").is_file()


def test_tables_match_golden_digests(smoke_run):
    """The golden check: with pinned numerics the smoke tables are the same bits on every x86-64 host."""
    root, _, _ = smoke_run
    golden = artifacts.repo_root() / reproducibility.GOLDEN_FILE
    expected = reproducibility.read_digests(golden)
    actual = reproducibility.table_digests(root / "results" / "smoke" / "tables")
    mismatches = {k: v for k, v in reproducibility.digest_mismatches(expected, actual).items() if v}
    assert not mismatches, (
        f"smoke tables differ from {reproducibility.GOLDEN_FILE}: {mismatches}. If the change is meant to "
        "change results, run `make golden` and commit the file; otherwise the change broke reproducibility."
    )


def test_manifest_records_every_stage(smoke_run):
    root, _, _ = smoke_run
    manifest = json.loads((root / "results" / "smoke" / "manifest.json").read_text())
    assert manifest["profile"] == "smoke"
    assert manifest["environment"]["packages"]["torch"]
    for stage in config.stage_notebooks():
        entry = manifest["stages"][stage]
        assert entry["wall_s"] >= 0 and entry["parameters"]["profile"] == "smoke"
        assert entry["git_commit"] == manifest["environment"]["git_commit"]  # the commit each stage ran at
    assert manifest["environment"]["cpu"]["cpu_model"]
    for stage in ("00_policy", "01_rollouts", "03_train_prm", "04_best_of_n", "05_rlhf_raft"):
        ran_with = manifest["stages"][stage][
            "numerics"
        ]  # the thread count it ran with, not the knob (0 = auto)
        assert ran_with["torch_threads"] >= 1
        assert ran_with["cpu_numerics"] == "portable" and ran_with["aten_capability"] == "AVX2"
        assert ran_with["pins"]["MKL_CBWR"] == "COMPATIBLE,STRICT"


# Figures each executed smoke notebook shows inline (02 and 03 add one each for arith's ground truth, 02 the
# static eta figure where a `make lab` session has a slider; 07 the threshold sweep).
INLINE_FIGURES = {"00_policy": 2, "01_rollouts": 1, "02_labels": 4, "03_train_prm": 4, "04_best_of_n": 3,
                  "05_rlhf_raft": 1, "06_figures": 6, "07_processbench": 1}  # fmt: skip


def test_executed_notebooks_read_cleanly(smoke_run):
    """What a reader sees: every figure inline, no progress or log noise, no machine paths (issue 15)."""
    root, _, _ = smoke_run
    machine_paths = {str(root), str(artifacts.repo_root())}
    for path in sorted((root / "results" / "smoke" / "notebooks").glob("*.ipynb")):
        text = path.read_text()
        outputs = [o for c in json.loads(text)["cells"] for o in c.get("outputs", [])]
        images = sum("image/png" in o.get("data", {}) for o in outputs)
        stderr = sum(len("".join(o.get("text", ""))) for o in outputs if o.get("name") == "stderr")
        widgets = sum("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in outputs)
        assert images == INLINE_FIGURES[path.stem], (path.name, images)
        assert stderr < 5000 and "TqdmWarning" not in text and widgets == 0, (path.name, stderr, widgets)
        assert "widgets" not in json.loads(text)["metadata"], f"{path.name} holds widget state"
        assert not [m for m in machine_paths if m in text], path.name
    manifest = (root / "results" / "smoke" / "manifest.json").read_text()
    assert not [m for m in machine_paths if m in manifest]


def test_nbval_on_executed_notebooks(smoke_run):
    root, _, _ = smoke_run
    executed = sorted((root / "results" / "smoke" / "notebooks").glob("*.ipynb"))
    assert len(executed) == len(config.stage_notebooks())
    sanitize = Path(__file__).with_name("nbval_sanitize.cfg")
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "--nbval-lax",
        "--sanitize-with",
        str(sanitize),
        "-p",
        "no:cacheprovider",
        "-o",
        "addopts=",
        "-q",
        *map(str, executed),
    ]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=900, env=os.environ.copy())
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-2000:]


def test_seeds_retrain_the_prms_on_the_same_pool(smoke_run):
    # `erprm seeds`: 03 again with another seed in a forked run, 04 on the same candidate pool (run last: it
    # adds a table to the main run)
    from erprm_core.running import seeds

    root, _, _ = smoke_run
    with artifacts.redirected_roots(root / "runs", root / "results"):
        table = seeds.run(seeds.SeedsConfig("smoke", "1", rules="er_1,soft,hard", reward_models=""))
        forked_runs, forked_results = seeds.seed_roots("smoke", 1)
        main = artifacts.paths("smoke")
        manifest = artifacts.load_manifest("smoke")
    values = table.set_index(["quantity", "seed"])["value"]
    n_max = int(pd.read_csv(main.table("bon"))["n"].max())
    for method in ("er_1:min", "hard:min", "random", "majority"):
        assert {(f"bon@{n_max} {method}", s) for s in ("0", "1", "mean", "sd")} <= set(values.index)
    for control in ("random", "majority"):  # the same pool for every seed: the controls cannot move
        assert values[(f"bon@{n_max} {control}", "0")] == values[(f"bon@{n_max} {control}", "1")]
    forked = forked_runs / "smoke"
    assert (forked / "pool" / "candidates.jsonl").read_bytes() == (
        main.pool / "candidates.jsonl"
    ).read_bytes()
    seed_manifest = json.loads((forked_results / "smoke" / "manifest.json").read_text())
    assert seed_manifest["stages"]["03_train_prm"]["seed"] == 1
    assert sorted(p.name for p in (forked / "prms").iterdir()) == ["er_1", "hard", "soft"]
    weights = "model.safetensors"
    assert (forked / "prms" / "er_1" / weights).read_bytes() != (main.prm("er_1") / weights).read_bytes()
    entry = manifest["stages"]["seeds"]
    assert entry["main_seed"] == 0 and entry["seeds"] == "1" and len(entry["git_commit"]["1"]) >= 40
