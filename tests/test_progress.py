"""Progress (issue 15): the one rule of erprm_core.io.progress (a tqdm bar, or under `erprm reproduce` no
output at all and the open bars in a JSON file), the Trainer's step count on it without log printing, and the
pipeline's terminal line read from that file (redrawn on a terminal, a log line a minute otherwise)."""

from __future__ import annotations

import io as std_io
import json
import logging

import pytest
from tqdm.auto import tqdm as auto_tqdm

from erprm_core import io, training
from erprm_core.running import pipeline
from erprm_core.tasks import arith
from erprm_core.tiny_lm import build_tiny_model, build_tokenizer


@pytest.fixture()
def progress_file(tmp_path, monkeypatch):
    path = tmp_path / "progress.json"
    monkeypatch.setenv(io.PROGRESS_ENV, str(path))
    return path


def test_outside_the_pipeline_tqdm_auto_draws_the_bar(monkeypatch, capsys):
    monkeypatch.delenv(io.PROGRESS_ENV, raising=False)
    bar = io.progress(range(3), desc="work", unit="item")
    assert type(bar) is auto_tqdm  # a widget in Jupyter, text in a terminal
    assert list(bar) == [0, 1, 2]
    assert "work: 100%" in capsys.readouterr().err


def test_under_the_pipeline_nothing_is_drawn_and_the_open_bars_go_to_the_file(progress_file, capsys):
    seen = []
    outer = io.progress(range(2), desc="shards", unit="shard")
    for _ in outer:
        inner = io.progress(total=4, desc="completions", unit="batch", leave=False)
        inner.update(3)
        inner.refresh()  # a refresh writes the file (the bars refresh at most once a second by themselves)
        seen.append(json.loads(progress_file.read_text()))
        inner.close()
        assert [b["prefix"] for b in json.loads(progress_file.read_text())] == ["shards"]
    assert json.loads(progress_file.read_text()) == []  # all closed
    out = capsys.readouterr()
    assert out.err == "" and out.out == ""
    first = seen[0]
    assert [(b["prefix"], b["n"], b["total"], b["unit"]) for b in first] == [
        ("shards", 0, 2, "shard"),
        ("completions", 3, 4, "batch"),
    ]
    assert all(set(b) == {"prefix", "n", "total", "unit", "elapsed", "rate"} for b in first)


def test_file_bars_ignore_tqdm_disable(progress_file, monkeypatch):
    """The pipeline sets TQDM_DISABLE=1 in its kernels for other tqdm users; the kit's own bars still report."""
    monkeypatch.setenv("TQDM_DISABLE", "1")
    with io.progress(total=5, desc="x") as bar:
        bar.update(2)
        bar.refresh()
        assert json.loads(progress_file.read_text())[0]["n"] == 2


def test_trainer_counts_steps_on_the_kit_bar_and_prints_no_logs(progress_file, tmp_path, capsys, monkeypatch):
    tok = build_tokenizer(max_number=99)
    model = build_tiny_model(tok, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, seed=0)
    problems = arith.generate_problems(8, seed=0, max_value=99, max_operand=9, max_steps=2)
    written = []
    monkeypatch.setattr(io, "atomic_write_json", lambda path, obj: written.append(obj))
    log = training.train_policy_sft(
        model, tok, problems, tmp_path / "out", max_steps=3, batch_size=4, logging_steps=1, save=False
    )
    assert list(log["step"]) == [1, 2, 3]  # the loss log is returned ...
    out = capsys.readouterr()
    assert "'loss'" not in out.out and "{'loss'" not in out.err  # ... not printed
    assert "training" not in out.err  # no Trainer bar drawn
    bars = [b for state in written for b in state if b["prefix"] == "training"]
    assert bars and bars[0]["total"] == 3 and bars[0]["unit"] == "step"
    assert written[-1] == []  # the bar closed at the end of training


def test_disable_tqdm_means_no_trainer_bar_at_all(progress_file, tmp_path, capsys):
    tok = build_tokenizer(max_number=99)
    model = build_tiny_model(tok, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, seed=0)
    problems = arith.generate_problems(8, seed=0, max_value=99, max_operand=9, max_steps=2)
    training.train_policy_sft(
        model, tok, problems, tmp_path / "out", max_steps=2, batch_size=4, logging_steps=1, save=False,
        disable_tqdm=True,
    )  # fmt: skip
    out = capsys.readouterr()
    assert "'loss'" not in out.out  # no PrinterCallback either
    assert not progress_file.exists()


# ------------------------------------------------------------------------------ the pipeline's terminal line


def test_progress_line_shows_each_bar_with_done_total_and_an_eta():
    bars = [
        {"prefix": "rollouts", "n": 3, "total": 16, "unit": "shard", "rate": 0.05, "elapsed": 60.0},
        {"prefix": "completions", "n": 5, "total": 18, "unit": "batch", "rate": None, "elapsed": 1.0},
        {"prefix": "", "n": 7, "total": None, "unit": "it", "rate": 2.0, "elapsed": 3.0},
    ]
    line = pipeline.progress_line("[2/7] 01_rollouts", bars, 65.2, 200.0)
    assert line == (
        "[2/7] 01_rollouts running 01:05 (last run 03:20) | rollouts 3/16 shard, ETA 04:20 "
        "| completions 5/18 batch | working 7 it"
    )
    assert pipeline.progress_line("[3/7] 02_labels", [], 5.0, None) == "[3/7] 02_labels running 00:05"
    line = pipeline.progress_line("[3/7] 02_labels", [], 5.0, None, cell="4/9")
    assert line == "[3/7] 02_labels running 00:05, 4/9 cells done"


class _Stream(std_io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_on_a_terminal_one_line_is_redrawn_then_cleared(tmp_path):
    path = tmp_path / "progress.json"
    stream = _Stream(tty=True)
    with pipeline.StageProgress(path, "[1/7] 00_policy", stream=stream, poll_s=3600) as shown:
        io.atomic_write_json(path, [{"prefix": "training", "n": 2, "total": 4, "unit": "step", "rate": 1.0}])
        shown.tick()
        shown.tick()
    text = stream.getvalue()
    assert text.count("\r[1/7] 00_policy running") == 2 and "training 2/4 step, ETA 00:02" in text
    assert text.endswith("\r\x1b[K") and "\n" not in text
    assert not path.exists()  # removed at the end of the stage


def test_without_a_terminal_a_plain_log_line_each_minute(tmp_path, caplog):
    path = tmp_path / "progress.json"
    stream = _Stream(tty=False)
    caplog.set_level(logging.INFO, logger="erprm")
    with pipeline.StageProgress(path, "[1/7] 00_policy", stream=stream, poll_s=3600, log_every_s=60) as shown:
        io.atomic_write_json(path, [{"prefix": "training", "n": 1, "total": 4, "unit": "step", "rate": 1.0}])
        start = shown._start
        for t in (1, 30, 59):
            shown.tick(now=start + t)
        assert caplog.messages == []  # a stage shorter than a minute logs nothing more
        shown.tick(now=start + 61)
        shown.tick(now=start + 90)
        shown.tick(now=start + 122)
    assert caplog.messages == [
        "[1/7] 00_policy running 01:01 | training 1/4 step, ETA 00:03",
        "[1/7] 00_policy running 02:02 | training 1/4 step, ETA 00:03",
    ]
    assert stream.getvalue() == ""


def test_papermills_cell_count_reaches_the_line(tmp_path):
    """papermill's own bar (tqdm, in the pipeline's process) writes its cell count into StageProgress."""
    from tqdm.std import tqdm

    stream = _Stream(tty=True)
    with pipeline.StageProgress(tmp_path / "p.json", "[1/7] 00_policy", stream=stream, poll_s=3600) as shown:
        cells = tqdm(total=12, unit="cell", desc="Executing", **shown.papermill_bar())
        cells.update(5)
        assert shown.tick().endswith("running 00:00, 5/12 cells done")
        cells.close()


def test_kernels_get_the_progress_file_and_no_third_party_bars(tmp_path):
    env = pipeline.kernel_progress_env(tmp_path / "p.json")
    assert env[io.PROGRESS_ENV] == str(tmp_path / "p.json")
    assert env["HF_HUB_DISABLE_PROGRESS_BARS"] == env["TQDM_DISABLE"] == "1"
    assert env[io.INTERACTIVE_ENV] == "0"  # no widget state in an executed notebook, even from `make lab`
