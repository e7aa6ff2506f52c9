"""One run per profile (issue 15): `erprm reproduce` holds runs/<profile>/.lock. A second run of the profile
stops within 5 s, naming the first (pid, start time); the lock of a run killed with kill -9 is taken over with
a warning. The holder is a real process: a Python process in ``pipeline.profile_lock``, as a run is."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from erprm_core.running import artifacts, cli, pipeline

HOLD = """
import sys, time
from erprm_core.running import pipeline
with pipeline.profile_lock("smoke"):
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.fixture()
def holder(tmp_roots):
    """A separate process holding the smoke profile's lock (killed at the end of the test)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD], stdout=subprocess.PIPE, text=True, cwd=artifacts.repo_root()
    )
    assert proc.stdout.readline().strip() == "held"
    yield proc
    proc.kill()
    proc.wait()


def test_a_second_run_stops_at_once_naming_the_first(holder):
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "erprm_core.running.cli", "reproduce", "--profile", "smoke"],
        capture_output=True,
        text=True,
        cwd=artifacts.repo_root(),
        timeout=60,
    )
    elapsed = time.monotonic() - start
    assert proc.returncode == cli.BUSY, proc.stderr
    # ~1-3 s here; a run that waited for the lock would hit 60 s
    print(f"second run refused in {elapsed:.1f} s")
    assert elapsed < 30, f"the second run took {elapsed:.1f} s to stop"
    held = json.loads((artifacts.paths("smoke").run / pipeline.LOCK_FILE).read_text())
    assert held["pid"] == holder.pid and held["started"] and held["host"] and held["command"]
    assert f"already being run by pid {holder.pid}" in proc.stderr
    assert f"started {held['started']}" in proc.stderr
    assert not (artifacts.paths("smoke").results / "manifest.json").exists()  # nothing was written


def test_pipeline_run_refuses_before_touching_anything(holder):
    with pytest.raises(pipeline.ProfileBusy, match=f"pid {holder.pid}"):
        pipeline.run("smoke")
    assert not artifacts.paths("smoke").executed_notebooks.exists()


def test_the_lock_of_a_killed_run_is_taken_over_with_a_warning(holder, caplog):
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    lock = artifacts.paths("smoke").run / pipeline.LOCK_FILE
    assert json.loads(lock.read_text())["pid"] == holder.pid  # left behind by the killed run
    caplog.set_level(logging.WARNING)
    with pipeline.profile_lock("smoke"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert any(f"pid {holder.pid}" in m and "taking the lock over" in m for m in caplog.messages)
    assert lock.read_text() == ""  # a clean exit empties the file: the next run takes it silently
    caplog.clear()
    with pipeline.profile_lock("smoke"):
        pass
    assert caplog.messages == []


def test_the_lock_is_reentrant_and_per_profile(tmp_roots):
    with pipeline.profile_lock("smoke") as path:
        with pipeline.profile_lock("smoke"):  # erprm golden / the dry run call run() inside their own work
            assert json.loads(path.read_text())["pid"] == os.getpid()
        assert json.loads(path.read_text())["pid"] == os.getpid()  # still held by the outer block
        with pipeline.profile_lock("tiny") as other:
            assert other != path and Path(other).parent.name == "tiny"
    assert path.read_text() == ""
