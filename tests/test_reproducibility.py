"""Table digests (the golden check) and the table-by-table comparison behind `erprm compare`, and the two
commands `erprm compare` and `erprm golden`."""

import pandas as pd
import pytest

from erprm_core.running import artifacts, cli, pipeline, reproducibility


def _tables(folder, bon_values, extra=None):
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(
        {"method": ["a", "b"], "value": bon_values, "ci_low": [0.4, 0.2], "ci_high": [0.6, 0.4]}
    ).to_csv(folder / "bon.csv", index=False)
    pd.DataFrame({"metric": ["x"], "value": [1.0]}).to_csv(folder / "summary.csv", index=False)
    if extra:
        pd.DataFrame({"k": [1]}).to_csv(folder / extra, index=False)
    return folder


def test_digests_round_trip_and_name_moved_tables(tmp_path):
    a = reproducibility.table_digests(_tables(tmp_path / "a", [0.5, 0.3]))
    path = tmp_path / "golden.sha256"
    reproducibility.write_digests(a, path)
    assert reproducibility.read_digests(path) == a
    b = reproducibility.table_digests(_tables(tmp_path / "b", [0.5, 0.31], extra="new.csv"))
    assert reproducibility.digest_mismatches(a, b) == {
        "moved": ["bon.csv"],
        "missing": [],
        "new": ["new.csv"],
    }
    assert reproducibility.digest_mismatches(a, a) == {"moved": [], "missing": [], "new": []}


def test_malformed_digest_line_names_file_and_line(tmp_path):
    path = tmp_path / "golden.sha256"
    path.write_text("0" * 64 + "  bon.csv\nnot a digest\n")
    with pytest.raises(ValueError, match=r"golden.sha256:2"):
        reproducibility.read_digests(path)


def test_compare_reports_size_of_differences_against_intervals(tmp_path):
    a = _tables(tmp_path / "a", [0.5, 0.3])
    b = _tables(tmp_path / "b", [0.55, 0.45])  # row a inside [0.4, 0.6]; row b outside [0.2, 0.4]
    diffs = {d.table: d for d in reproducibility.compare_tables(a, b)}
    assert diffs["summary.csv"].status == "identical"
    bon = diffs["bon.csv"]
    assert bon.status == "differs" and bon.cells_differing == 2 and bon.rows_outside_interval == 1
    assert bon.max_abs_diff == pytest.approx(0.15)
    same = {d.table: d.status for d in reproducibility.compare_tables(a, a)}
    assert set(same.values()) == {"identical"}


def test_compare_names_missing_and_new_tables(tmp_path):
    a = _tables(tmp_path / "a", [0.5, 0.3], extra="only_a.csv")
    b = _tables(tmp_path / "b", [0.5, 0.3], extra="only_b.csv")
    status = {d.table: d.status for d in reproducibility.compare_tables(a, b)}
    assert status["only_a.csv"] == "missing" and status["only_b.csv"] == "new"


def test_compare_command_exit_status(tmp_roots, capsys):
    mine = _tables(artifacts.paths("smoke").tables, [0.5, 0.3])
    assert mine.parent.name == "smoke"
    same = _tables(tmp_roots / "other" / "smoke" / "tables", [0.5, 0.3])
    moved = _tables(tmp_roots / "moved" / "tables", [0.55, 0.45])
    assert cli.main(["compare", "--profile", "smoke", str(same.parent.parent)]) == 0  # <run>/<profile>/tables
    assert "REPRODUCED: all 2 tables of B are identical to A" in capsys.readouterr().out
    assert cli.main(["compare", "--profile", "smoke", str(moved.parent)]) == 1  # <folder>/tables
    out = capsys.readouterr().out
    assert "NOT REPRODUCED: 1 of 2 tables differ" in out and "1 row(s) of B lie outside" in out
    assert cli.main(["compare", "--profile", "smoke", str(moved)]) == 1  # the tables/ folder itself
    assert cli.main(["compare", "--profile", "smoke", str(tmp_roots / "absent")]) == 2


def test_golden_command_writes_the_digests_of_the_smoke_tables(tmp_path, monkeypatch):
    def fake_run(profile, **kwargs):  # the smoke chain, reduced to writing its tables
        assert profile == "smoke" and kwargs == {"force": True}
        _tables(artifacts.paths("smoke").tables, [0.5, 0.3])

    monkeypatch.setattr(pipeline, "run", fake_run)
    monkeypatch.setattr(artifacts, "repo_root", lambda start=None: tmp_path)
    assert cli.main(["golden"]) == 0
    digests = reproducibility.read_digests(tmp_path / reproducibility.GOLDEN_FILE)
    assert sorted(digests) == ["bon.csv", "summary.csv"]


def _git(cwd, *args):
    import subprocess

    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


def test_compare_without_a_path_judges_this_run_against_the_committed_results(tmp_path, capsys, monkeypatch):
    """`erprm compare --profile P`: git HEAD's results/P against the checkout's; the verdict names the first
    stage whose tables differ (from the manifest's per-stage table record) and the machine facts that differ."""
    import json

    results = tmp_path / "results" / "smoke"
    _tables(results / "tables", [0.5, 0.3])

    def manifest(cpu, threads):
        stages = {"00_policy": {"tables": {"summary.csv": "x"}, "torch_threads": threads},
                  "04_best_of_n": {"tables": {"bon.csv": "y"}, "torch_threads": threads}}  # fmt: skip
        env = {"cpu": {"cpu_model": cpu}, "packages": {"torch": "2.13.0"}}
        (results / "manifest.json").write_text(json.dumps({"environment": env, "stages": stages}))

    manifest("AMD EPYC", 2)
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "results")
    monkeypatch.setenv("ERPRM_RESULTS_ROOT", str(tmp_path / "results"))
    assert cli.main(["compare", "--profile", "smoke"]) == 0
    assert "REPRODUCED" in capsys.readouterr().out

    _tables(results / "tables", [0.5, 0.31])  # a rerun on another CPU moves best-of-N
    manifest("Intel Xeon", 1)
    assert cli.main(["compare", "--profile", "smoke"]) == 1
    out = capsys.readouterr().out
    assert "NOT REPRODUCED: 1 of 2 tables differ" in out
    assert "first stage whose tables differ: 04_best_of_n (bon.csv)" in out
    assert "CPU: AMD EPYC -> Intel Xeon" in out and "00_policy torch_threads: 2 -> 1" in out


def test_lock_file_is_read_exactly_and_differences_named(tmp_path):
    lock = tmp_path / "requirements-lock.txt"
    lock.write_text("# header\nPyYAML==6.0.2\nnumpy==0.0.1\n\n")
    assert reproducibility.read_lock(lock) == {"pyyaml": "6.0.2", "numpy": "0.0.1"}
    status = reproducibility.lock_status(lock)
    assert len(status["sha256"]) == 64
    numpy_line = [d for d in status["differs"] if d.startswith("numpy ")]
    assert numpy_line and numpy_line[0].endswith("(lock 0.0.1)")
    assert reproducibility.lock_status(tmp_path / "absent.txt") == {"file": None}
    lock.write_text("numpy>=1\n")
    with pytest.raises(ValueError, match=r"requirements-lock.txt:1: expected 'package==version'"):
        reproducibility.read_lock(lock)


def test_the_committed_lock_matches_this_environment():
    """`make setup` installs the lock: a test run in that environment must find nothing that differs."""
    import sys
    from pathlib import Path

    stamp = Path(sys.prefix) / ".erprm-installed"
    if not stamp.is_file() or "lock=requirements-lock.txt" not in stamp.read_text():
        pytest.skip("not the environment `make setup` installed from the lock (LOCK= was given, or no make)")
    status = reproducibility.lock_status(artifacts.repo_root() / reproducibility.LOCK_FILE)
    assert status["file"] == "requirements-lock.txt"
    assert status["differs"] == [], status["differs"]
