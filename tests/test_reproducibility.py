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
    assert "2 of 2 tables identical" in capsys.readouterr().out
    assert cli.main(["compare", "--profile", "smoke", str(moved.parent)]) == 1  # <folder>/tables
    assert "1 row(s) of B lie outside" in capsys.readouterr().out
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
