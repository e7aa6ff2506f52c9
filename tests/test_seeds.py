"""``erprm seeds``: the variance table over PRM-training seeds, and the fork of a finished run (fast parts).

The whole command (retraining and best-of-N in a forked run) runs on the smoke chain in
tests/test_pipeline_smoke.py.
"""

import math

import pandas as pd
import pytest

from erprm_core.running import artifacts, seeds


def _tables(er: float, hard: float, diff: float, raft_er: float) -> dict[str, pd.DataFrame]:
    bon = pd.DataFrame(
        [
            {
                "method": "er_1:min",
                "n": 64,
                "metric": "accuracy",
                "value": er,
                "ci_low": er - 0.04,
                "ci_high": er + 0.04,
            },
            {
                "method": "hard:min",
                "n": 64,
                "metric": "accuracy",
                "value": hard,
                "ci_low": 0.0,
                "ci_high": 1.0,
            },
            {"method": "er_1:min", "n": 2, "metric": "accuracy", "value": 0.9, "ci_low": 0.8, "ci_high": 1.0},
        ]
    )
    row = {"method_a": "er_1:min", "method_b": "hard:min", "n": 64, "diff": diff, "ci_low": diff - 0.05,
           "ci_high": diff + 0.05, "selection": "prespecified"}  # fmt: skip
    # the post hoc comparison repeats the row when eta = 1 is also the best eta on the pool: counted once
    paired = pd.DataFrame([row, {**row, "selection": "post hoc (best ER eta on this pool at N_max)"}])
    raft = pd.DataFrame(
        [
            {
                "reward_model": "baseline",
                "iteration": 0,
                "metric": "greedy_accuracy",
                "value": 0.7,
                "ci_low": 0.6,
                "ci_high": 0.8,
            },
            {
                "reward_model": "er_1",
                "iteration": 3,
                "metric": "greedy_accuracy",
                "value": raft_er,
                "ci_low": 0.5,
                "ci_high": 0.9,
            },
            {
                "reward_model": "er_1",
                "iteration": 2,
                "metric": "greedy_accuracy",
                "value": 0.1,
                "ci_low": 0.0,
                "ci_high": 0.2,
            },
        ]
    )
    raft_paired = pd.DataFrame(columns=["reward_model", "versus", "iteration", "diff", "ci_low", "ci_high"])
    return {"bon": bon, "bon_paired": paired, "raft": raft, "raft_paired": raft_paired}


def test_variance_table_per_seed_rows_and_spread():
    table = seeds.variance_table({0: _tables(0.30, 0.25, 0.05, 0.70), 1: _tables(0.40, 0.20, 0.20, 0.74)})
    rows = table.set_index(["quantity", "seed"])["value"]
    assert rows[("bon@64 er_1:min", "0")] == 0.30 and rows[("bon@64 er_1:min", "1")] == 0.40
    assert rows[("bon@64 er_1:min", "mean")] == pytest.approx(0.35)
    assert rows[("bon@64 er_1:min", "sd")] == pytest.approx(math.sqrt(0.005))  # ddof 1 over two seeds
    assert (
        rows[("bon@64 er_1:min - hard:min", "min")] == 0.05
        and rows[("bon@64 er_1:min - hard:min", "max")] == 0.20
    )
    assert rows[("bon@64 er_1:min - hard:min", "mean")] == pytest.approx(0.125)
    assert (table["quantity"] == "bon@64 er_1:min - hard:min").sum() == 2 + 4  # one row per seed, 4 summaries
    assert rows[("raft final er_1", "mean")] == pytest.approx(0.72)  # the last iteration, not iteration 2
    assert ("raft final baseline", "0") not in rows.index  # iteration 0 is not a final
    per_seed = table[table["seed"] == "1"].set_index("quantity")
    assert per_seed.loc["bon@64 er_1:min", "ci_low"] == pytest.approx(0.36)  # the seed's own interval kept
    assert set(table.columns) == {"quantity", "seed", "value", "ci_low", "ci_high", "n_seeds"}


def test_variance_table_with_one_seed_has_no_sd_and_empty_input_fails():
    table = seeds.variance_table({0: _tables(0.3, 0.2, 0.1, 0.7)})
    assert math.isnan(table.set_index(["quantity", "seed"]).loc[("bon@64 er_1:min", "sd"), "value"])
    empty = {k: pd.DataFrame() for k in ("bon", "bon_paired", "raft", "raft_paired")}
    with pytest.raises(ValueError, match="no best-of-N or RAFT table"):
        seeds.variance_table({0: empty})


def test_headline_methods_come_from_the_prespecified_comparison():
    t = _tables(0.3, 0.2, 0.1, 0.7)
    t["bon"]["method"] = t["bon"]["method"].str.replace("er_1:min", "er_2:mean").str.replace(":min", ":mean")
    t["bon_paired"]["method_a"], t["bon_paired"]["method_b"] = "er_2:mean", "hard:mean"
    quantities = set(seeds.variance_table({0: t})["quantity"])
    assert {"bon@64 er_2:mean", "bon@64 hard:mean", "bon@64 er_2:mean - hard:mean"} <= quantities
    assert not any("er_1" in q for q in quantities if q.startswith("bon"))


def test_parse_seeds():
    assert seeds.parse_seeds(["1,2", "5"]) == [1, 2, 5]
    assert seeds.parse_seeds("3,4") == [3, 4]
    with pytest.raises(ValueError, match="'x' is not an integer"):
        seeds.parse_seeds(["1,x"])


def test_fork_links_inputs_copies_caches_and_refuses_the_main_seed(tmp_path):
    with artifacts.redirected_roots(tmp_path / "runs", tmp_path / "results"):
        main = artifacts.paths("smoke")
        with pytest.raises(Exception, match="00_policy"):
            seeds.fork("smoke", 1)  # nothing to fork yet: the error names the stage to run
        (main.policy).mkdir(parents=True)
        (main.policy / "config.json").write_text("{}")
        main.labels_file.write_text("{}\n")
        (main.pool / "candidates").mkdir(parents=True)
        (main.pool / "candidates" / "shard-00000.jsonl").write_text("{}\n")
        main.tables.mkdir(parents=True)
        main.manifest.write_text('{"stages": {"03_train_prm": {"seed": 3}}}')
        runs, results = seeds.fork("smoke", 1)
        forked = runs / "smoke"
        assert (forked / "policy").is_symlink() and (forked / "labels.jsonl").is_symlink()
        shard = forked / "pool" / "candidates" / "shard-00000.jsonl"
        assert shard.is_file() and not shard.is_symlink()  # a copy: the seed run may extend it
        assert (results / "smoke" / "manifest.json").is_file()
        assert not (forked / "prms").exists()  # the PRMs are retrained
        with pytest.raises(ValueError, match="3 is the main run's 03 seed"):
            seeds.run(seeds.SeedsConfig("smoke", "1,3"))
