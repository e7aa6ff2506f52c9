"""Stage 07_processbench's synthetic twin: first-error F1 of each rule on a hand-made 04 pool of task arith,
with hand-computed values (a PRM that flags exactly the wrong step, one that flags nothing, one that flags
too early), the grouping of the bootstrap by problem, the error-type table, and clear errors for missing
inputs. The real-benchmark mode runs end to end in the paper profiles' dry run (tests/test_dryrun.py)."""

from __future__ import annotations

import json
import math

import pytest

from erprm_core.io import ArtifactError
from erprm_core.running import artifacts
from erprm_core.stages import processbench
from erprm_core.tasks import arith, arith_truth

PROFILE = "pbtest"


def _slip(steps: list[str]) -> list[str]:
    """The reference steps with a wrong result in step 0 (an arithmetic slip carried on)."""
    bad = list(steps)
    head, value = bad[0].rsplit(" = ", 1)
    number = int(value.split()[0])
    bad[0] = f"{head} = {number + 1} {value.split(' ', 1)[1]}"
    return bad


def _write_pool(profile: str, scores: dict[str, list[list[float | None]]]) -> list[dict]:
    """Four problems x (the reference solution, a slip at step 0, the reference again = a duplicate) as the
    04 candidates, and each rule's step scores of the 8 distinct solutions as 04's score shards."""
    p = artifacts.paths(profile)
    problems = arith.generate_problems(4, 0, "test", min_steps=2, max_steps=3)
    cands, distinct = [], []
    for prob in problems:
        right = arith_truth.expected_steps(prob)
        wrong = _slip(right)
        assert arith_truth.first_error(prob["question"], right) == (-1, "none")
        assert arith_truth.first_error(prob["question"], wrong)[0] == 0
        for j, st in enumerate([right, wrong, right]):
            cands.append(
                {"problem_id": prob["id"], "candidate_index": j, "question": prob["question"], "steps": st}
            )
        distinct += [right, wrong]
    p.pool.mkdir(parents=True)
    artifacts.atomic_write_jsonl(p.pool / "candidates.jsonl", cands)
    for rule, per_solution in scores.items():
        assert len(per_solution) == len(distinct)
        folder = p.pool / "scores" / rule
        folder.mkdir(parents=True)
        rows = [{"key": f"{i:07d}", "step_scores": s} for i, s in enumerate(per_solution)]
        artifacts.atomic_write_jsonl(folder / "shard-00000.jsonl", rows[:5])
        artifacts.atomic_write_jsonl(folder / "shard-00001.jsonl", rows[5:])
    return distinct


def _scores(distinct, right_steps, wrong_steps):
    """Per distinct solution (alternating right, wrong): the given step-score patterns cut to its length."""
    out = []
    for i, st in enumerate(distinct):
        pattern = right_steps if i % 2 == 0 else wrong_steps
        out.append([pattern[min(k, len(pattern) - 1)] for k in range(len(st))])
    return out


def _distinct_steps() -> list[list[str]]:
    """The 8 distinct solutions that :func:`_write_pool` writes, in pool order (right, slip, per problem)."""
    distinct = []
    for prob in arith.generate_problems(4, 0, "test", min_steps=2, max_steps=3):
        right = arith_truth.expected_steps(prob)
        distinct += [right, _slip(right)]
    return distinct


def test_synthetic_benchmark_hand_computed(tmp_roots):
    distinct = _distinct_steps()
    scores = {
        "exact": _scores(distinct, [0.9], [0.2, 0.9]),  # flags step 0 of the slip, passes the right ones
        "never": _scores(distinct, [0.9], [0.9]),  # flags nothing
        "early": _scores(distinct, [0.3, 0.9], [0.2]),  # flags step 0 of everything
        "lost": _scores(distinct, [None], [None]),  # no step scored: every prediction undetermined
    }
    _write_pool(PROFILE, scores)
    res = processbench.run(
        processbench.ProcessBenchConfig(
            profile=PROFILE, benchmark="synthetic", n_boot=200, cpu_numerics="default"
        )
    )
    assert set(res.table["view"]) == {"distinct", "pool"} and set(res.table["threshold_source"]) == {"paper"}
    pool = res.table[res.table["view"] == "pool"].set_index("prm")
    # the pool view counts the duplicated right solution of each problem again: 12 candidates, 8 all-right
    assert (pool.loc[["exact", "never", "early"], ["n", "n_correct"]] == [12, 8]).all().all()
    assert pool.loc["exact", "f1"] == 1.0 and pool.loc["never", "correct_acc"] == 1.0
    # threshold-free: "never" scores every step alike (a coin); nothing scored, nothing to rank
    assert pool.loc["never", "step_auroc"] == 0.5 and math.isnan(pool.loc["lost", "step_auroc"])
    t = res.table[res.table["view"] == "distinct"].set_index("prm")
    assert set(t.index) == set(scores)
    assert (t["split"] == processbench.SYNTHETIC_SPLIT).all() and (t["n"] == 8).all()
    exact, never, early, lost = t.loc["exact"], t.loc["never"], t.loc["early"], t.loc["lost"]
    assert (exact["error_acc"], exact["correct_acc"], exact["f1"]) == (1.0, 1.0, 1.0)
    assert exact["f1_low"] == exact["f1_high"] == 1.0
    assert (never["error_acc"], never["correct_acc"], never["f1"]) == (0.0, 1.0, 0.0)
    assert (early["error_acc"], early["correct_acc"], early["f1"]) == (1.0, 0.0, 0.0)
    assert lost["n_excluded"] == 8 and math.isnan(lost["f1"])  # counted, not dropped
    assert (t.loc[["exact", "never", "early"], "n_excluded"] == 0).all()
    assert (t[["n_error", "n_correct"]].loc["exact"] == [4, 4]).all()

    sweep = res.sweep[res.sweep["prm"] == "exact"].set_index("threshold")
    assert len(sweep) == 19
    assert sweep.loc[0.15, "f1"] == 0.0  # 0.2 is not below 0.15: nothing flagged
    assert sweep.loc[0.5, "f1"] == 1.0 and sweep.loc[0.95, "f1"] == 0.0  # 0.9 < 0.95: right ones flagged

    by_type = res.by_type.set_index(["prm", "error_type"])
    assert by_type.loc[("exact", "arithmetic_slip"), "accuracy"] == 1.0
    assert by_type.loc[("never", "arithmetic_slip"), "accuracy"] == 0.0
    assert by_type.loc[("early", "none"), "accuracy"] == 0.0
    assert by_type.loc[("exact", "none"), ["accuracy", "n"]].tolist() == [1.0, 4]

    written = artifacts.read_table(PROFILE, "step_eval")
    assert (
        list(written["prm"]) == list(res.table["prm"]) and list(written.columns) == processbench.EVAL_COLUMNS
    )
    entry = json.loads(artifacts.paths(PROFILE).manifest.read_text())["stages"]["07_processbench"]
    assert entry["benchmark"] == "synthetic" and set(entry["prms"]) == set(scores)


def test_synthetic_benchmark_interval_is_over_problems(tmp_roots):
    distinct = _distinct_steps()
    # problems 0-1: this PRM is perfect; problems 2-3: it flags nothing
    mixed = _scores(distinct[:4], [0.9], [0.2, 0.9]) + _scores(distinct[4:], [0.9], [0.9])
    _write_pool(PROFILE, {"mixed": mixed})
    res = processbench.run(
        processbench.ProcessBenchConfig(profile=PROFILE, n_boot=400, cpu_numerics="default")
    )
    row = res.table.iloc[0]
    assert (row["error_acc"], row["correct_acc"]) == (0.5, 1.0)
    assert row["f1"] == pytest.approx(2 / 3)
    # resampling problems: some resamples hold only the blind problems (F1 0), some only the perfect ones
    assert row["f1_low"] == 0.0 and row["f1_high"] == 1.0


def test_missing_inputs_and_bad_parameters_are_named(tmp_roots):
    with pytest.raises(ArtifactError, match="04_best_of_n"):
        processbench.run(processbench.ProcessBenchConfig(profile=PROFILE, cpu_numerics="default"))
    _write_pool(PROFILE, {"er_1": [[0.9, 0.9, 0.9, 0.9]] * 8})
    with pytest.raises(ArtifactError, match=r"\['soft'\]"):
        processbench.run(
            processbench.ProcessBenchConfig(profile=PROFILE, rules="er_1,soft", cpu_numerics="default")
        )
    with pytest.raises(ValueError, match="benchmark"):
        processbench.ProcessBenchConfig(profile=PROFILE, benchmark="prm800k").check()
    with pytest.raises(ValueError, match="names no revision"):
        processbench.ProcessBenchConfig(
            profile=PROFILE, benchmark="processbench", released_prms="org/prm"
        ).check()
    with pytest.raises(ValueError, match="threshold"):
        processbench.ProcessBenchConfig(profile=PROFILE, threshold=1.5).check()
