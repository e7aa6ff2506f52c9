"""The 01_rollouts stage (stages.rollouts.run_rollouts): shards, kill-and-resume, corrupt files, the audit.

Uses the scripted test policy of test_sampling (deterministic, fast). The kill test runs the stage in a real
subprocess, kills it with SIGKILL once some shards are on disk, reruns it, and checks that the finished
shards were not touched and that the merged file is byte for byte the one of an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from erprm_core import generation, rollouts
from erprm_core.io import ArtifactError
from erprm_core.running import artifacts
from erprm_core.stages import labels as label_stage
from erprm_core.stages import rollouts as rollout_stage
from erprm_core.tasks import arith
from erprm_core.tiny_lm import build_tokenizer

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
from test_sampling import ScriptedLM  # noqa: E402

N_PROBLEMS = 8
RUN = dict(n_solutions=3, k=4, shard_size=1, seed=5, max_new_tokens=120, batch_size=16)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup():
    problems = arith.generate_problems(N_PROBLEMS, seed=3, max_steps=4)
    tok = build_tokenizer()
    return problems, tok, ScriptedLM(tok, problems)


def _run(setup, computed=None, profile="resume", **overrides):
    problems, tok, lm = setup
    hook = computed.append if computed is not None else None
    run = RUN | overrides
    policy = generation.make_sampler(lm, tok, "hf", run["batch_size"])
    return rollout_stage.run_rollouts(profile, policy, problems, **run, on_shard=hook)


def _snapshot(folder: Path) -> dict[str, tuple[int, int, bytes]]:
    out = {}
    for name in artifacts.shard_status(folder):
        st = (folder / name).stat()
        out[name] = (st.st_ino, st.st_mtime_ns, (folder / name).read_bytes())
    return out


def test_records_schema_and_audit(setup, tmp_roots):
    res = _run(setup)
    P = artifacts.paths("resume")
    assert artifacts.shard_status(P.rollouts) == [f"shard-{i:05d}.jsonl" for i in range(N_PROBLEMS)]
    on_disk = label_stage.read_rollouts(P.rollouts_file)
    assert on_disk == res.records and len(on_disk) == N_PROBLEMS * 3
    problems = {p["id"]: p for p in setup[0]}
    for rec in on_disk:
        assert set(rollouts.ROLLOUT_COLUMNS) <= set(rec)
        p = problems[rec["problem_id"]]
        assert (rec["question"], rec["answer"], rec["task"]) == (p["question"], p["answer"], "arith")
        assert len(rec["completion_rewards"]) == len(rec["steps"]) - 1
        assert all(len(r) == 4 for r in rec["completion_rewards"])
    counts = dict(zip(res.audit.to_frame()["reason"], res.audit.to_frame()["count"], strict=True))
    assert counts["solutions"] == N_PROBLEMS * 3
    assert counts["prefixes"] == sum(len(r["steps"]) - 1 for r in on_disk)
    assert counts["completions"] == 4 * counts["prefixes"]
    assert res.stats["completion_tokens"] == sum(r["completion_tokens"] for r in on_disk) > 0
    assert res.stats["computed_generated_tokens"] > 0


def test_audit_counts_problems(tmp_roots):
    recs = [
        {"problem_id": "a", "sample_index": 0, "steps": [], "pred": None, "truncated": True,
         "completion_rewards": [], "completions_truncated": 0},
        {"problem_id": "b", "sample_index": 0, "steps": ["The answer is: 3"], "pred": "3", "truncated": False,
         "completion_rewards": [], "completions_truncated": 0},
        {"problem_id": "c", "sample_index": 1, "steps": ["x", "y", "z"], "pred": None, "truncated": True,
         "completion_rewards": [[0, 1], [1, 1]], "completions_truncated": 3},
    ]  # fmt: skip
    frame = rollout_stage.rollout_audit(recs).to_frame()
    counts = dict(zip(frame["reason"], frame["count"], strict=True))
    assert counts == {
        "solutions": 3, "solution_no_answer": 2, "solution_truncated": 2, "solution_empty": 1,
        "solution_one_step": 1, "prefixes": 2, "completions": 4, "completion_truncated": 3,
    }  # fmt: skip


def test_rerun_reuses_every_shard_and_param_change_discards(setup, tmp_roots):
    _run(setup)
    P = artifacts.paths("resume")
    before = _snapshot(P.rollouts)
    merged = P.rollouts_file.read_bytes()
    computed: list[int] = []
    _run(setup, computed)
    assert computed == [] and _snapshot(P.rollouts) == before
    assert P.rollouts_file.read_bytes() == merged
    _run(setup, computed, k=2)  # another k: old shards are stale and must not be mixed in
    assert computed == list(range(N_PROBLEMS))
    assert all(
        len(r) == 2 for rec in label_stage.read_rollouts(P.rollouts_file) for r in rec["completion_rewards"]
    )


@pytest.mark.parametrize("damage", ["truncated_line", "wrong_columns"])
def test_corrupt_shard_is_named_and_only_it_recomputed(setup, tmp_roots, caplog, damage):
    _run(setup)
    P = artifacts.paths("resume")
    good = P.rollouts_file.read_bytes()
    victim = P.rollouts / "shard-00002.jsonl"
    lines = victim.read_text().splitlines(keepends=True)
    if damage == "truncated_line":
        victim.write_text(lines[0] + lines[1][: len(lines[1]) // 2])
        where = f"{victim}:2"
    else:
        victim.write_text(lines[0].replace('"completion_rewards"', '"rewards"') + "".join(lines[1:]))
        where = f"{victim}:1"
    before = {k: v for k, v in _snapshot(P.rollouts).items() if k != victim.name}
    computed: list[int] = []
    with caplog.at_level(logging.WARNING, logger="erprm_core.running.artifacts"):
        _run(setup, computed)
    assert computed == [2]
    assert any(where in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]
    after = _snapshot(P.rollouts)
    assert {k: v for k, v in after.items() if k != victim.name} == before
    assert P.rollouts_file.read_bytes() == good


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("truncated_line", r":3: not valid JSON"),
        ("wrong_columns", r":3: missing column\(s\) \['completion_rewards'\]"),
        ("wrong_lengths", r":3: \d+ steps need \d+ completion lists"),
    ],
)
def test_corrupt_rollouts_file_error_names_file_and_line(setup, tmp_roots, damage, message):
    _run(setup)
    P = artifacts.paths("resume")
    lines = P.rollouts_file.read_text().splitlines(keepends=True)
    if damage == "truncated_line":
        lines[2] = lines[2][:40] + "\n"
    elif damage == "wrong_columns":
        lines[2] = lines[2].replace('"completion_rewards"', '"rewards"')
    else:
        lines[2] = lines[2].replace('"steps": [', '"steps": ["extra step", ', 1)
    P.rollouts_file.write_text("".join(lines))
    with pytest.raises(ArtifactError, match=str(P.rollouts_file).replace(".", r"\.") + message):
        label_stage.read_rollouts(P.rollouts_file)
    with pytest.raises(ArtifactError, match=message):
        label_stage.run_labels("resume", [0.0, 1.0])


SCRIPT = """
import sys, time
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
from erprm_core import generation
from erprm_core.tiny_lm import build_tokenizer
from erprm_core.stages.rollouts import run_rollouts
from erprm_core.tasks import arith
from erprm_core.tiny_lm import build_tokenizer
from test_sampling import ScriptedLM
problems = arith.generate_problems({n}, seed=3, max_steps=4)
tok = build_tokenizer()
policy = generation.make_sampler(ScriptedLM(tok, problems), tok, "hf", {run!r}["batch_size"])
run_rollouts("resume", policy, problems, on_shard=lambda i: time.sleep({delay}), **{run!r})
"""


@pytest.mark.slow
def test_sigkill_midway_then_resume_equals_uninterrupted(setup, tmp_path, monkeypatch):
    killed_root, clean_root = tmp_path / "killed", tmp_path / "clean"
    script = tmp_path / "stage.py"
    script.write_text(textwrap.dedent(SCRIPT.format(tests=str(TESTS), n=N_PROBLEMS, delay=0.5, run=RUN)))
    env = os.environ | {"ERPRM_RUNS_ROOT": str(killed_root / "runs"), "ERPRM_RESULTS_ROOT": str(killed_root / "res"),
                        "HF_HUB_OFFLINE": "1"}  # fmt: skip
    shards = killed_root / "runs" / "resume" / "rollouts"
    proc = subprocess.Popen(
        [sys.executable, str(script)], env=env, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 120
        while len(artifacts.shard_status(shards)) < 3:
            assert proc.poll() is None, "the stage ended before it could be killed"
            assert time.monotonic() < deadline, "no shard appeared within 120 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    done = _snapshot(shards)
    assert 3 <= len(done) < N_PROBLEMS, "the kill must land part-way"
    assert not (killed_root / "runs" / "resume" / "rollouts.jsonl").exists()

    monkeypatch.setenv("ERPRM_RUNS_ROOT", str(killed_root / "runs"))
    monkeypatch.setenv("ERPRM_RESULTS_ROOT", str(killed_root / "res"))
    computed: list[int] = []
    _run(setup, computed)
    finished = {int(name[6:11]) for name in done}
    assert computed == sorted(set(range(N_PROBLEMS)) - finished)  # finished shards were not recomputed
    after = _snapshot(shards)
    assert {name: after[name] for name in done} == done  # same inode, mtime and bytes
    resumed = (killed_root / "runs" / "resume" / "rollouts.jsonl").read_bytes()

    monkeypatch.setenv("ERPRM_RUNS_ROOT", str(clean_root / "runs"))
    monkeypatch.setenv("ERPRM_RESULTS_ROOT", str(clean_root / "res"))
    _run(setup)
    assert (clean_root / "runs" / "resume" / "rollouts.jsonl").read_bytes() == resumed


def test_prepare_shard_folder_keeps_work_only_for_the_same_fingerprint(tmp_path, caplog):
    folder = tmp_path / "work"
    artifacts.prepare_shard_folder(folder, {"seed": 1, "names": ("a", "b")})
    (folder / "shard-00000.jsonl").write_text('{"x": 1}\n')
    artifacts.prepare_shard_folder(folder, {"seed": 1, "names": ["a", "b"]})  # same after a JSON round trip
    assert artifacts.shard_status(folder) == ["shard-00000.jsonl"]
    with caplog.at_level("WARNING"):
        artifacts.prepare_shard_folder(folder, {"seed": 2, "names": ["a", "b"]})
    assert artifacts.shard_status(folder) == [] and "discarding it (1 shard(s))" in caplog.text
    assert json.loads((folder / "params.json").read_text())["seed"] == 2
    (folder / "params.json").write_text("{not json")
    (folder / "shard-00000.jsonl").write_text('{"x": 1}\n')
    artifacts.prepare_shard_folder(
        folder, {"seed": 2, "names": ["a", "b"]}
    )  # unreadable params: start afresh
    assert artifacts.shard_status(folder) == []
