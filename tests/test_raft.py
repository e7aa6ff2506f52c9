"""RAFT (erprm_core.raft, erprm_core.stages.raft): selection with ties, lr schedule, scoring statuses, resume,
failures, the stage."""

import itertools
import json
import math
import shutil

import numpy as np
import pytest

from erprm_core import io, raft, rollouts, training
from erprm_core.report import figures
from erprm_core.running import artifacts
from erprm_core.stages import raft as raft_stage
from erprm_core.stages import raft_tables
from erprm_core.tasks import arith
from erprm_core.tiny_lm import build_tiny_model, build_tokenizer

SETTINGS = raft.RaftSettings(
    m=2,
    max_new_tokens=8,
    lr=1e-3,
    lr_decay=0.5,
    epochs=1.0,
    batch_size=16,
    train_batch_size=4,
    shard_size=2,
    exclude_truncated=False,  # a random policy never finishes a solution
    device="cpu",
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class StubReward:
    """A deterministic scorer: step score = (characters mod 7) / 7; ``fail`` makes every call raise."""

    name = "stub-length"

    def __init__(self, fail: bool = False):
        self.fail = fail
        self.calls = 0

    def score_batch(self, questions, list_of_steps):
        self.calls += 1
        if self.fail:
            raise RuntimeError("stub reward exploded")
        return [[(len(s) % 7) / 7 for s in steps] for steps in list_of_steps]


def _save_tiny(path, seed=0):
    tok = build_tokenizer()
    model = build_tiny_model(
        tok,
        hidden_size=32,
        num_layers=1,
        num_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        seed=seed,
    )
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory):
    return _save_tiny(tmp_path_factory.mktemp("policy") / "policy")


@pytest.fixture(scope="module")
def problems():
    return arith.generate_problems(3, seed=1, split="train"), arith.generate_problems(3, seed=1, split="test")


def _run(root, policy, problems, reward=None, iterations=2):
    prompts, test = problems
    return raft_stage.run_raft(
        "er_1",
        reward if reward is not None else StubReward(),
        start_policy=policy,
        prompts=prompts,
        test_problems=test,
        out_root=root,
        iterations=iterations,
        settings=SETTINGS,
        progress=False,
    )


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_policy, problems):
    root = tmp_path_factory.mktemp("raft_a")
    return root, _run(root, tiny_policy, problems)


# ----------------------------------------------------------------------------------------------------- pure


def test_iteration_lr_decays_geometrically():
    assert [raft.iteration_lr(1e-3, 0.5, i) for i in (1, 2, 3)] == pytest.approx([1e-3, 5e-4, 2.5e-4])
    assert raft.iteration_lr(2e-5, 1.0, 3) == 2e-5
    # the authors' RAFT/sft.py: lr * (T - i + 1) / T
    assert [raft.iteration_lr(3e-7, 0.5, i, "linear", 3) for i in (1, 2, 3)] == pytest.approx(
        [3e-7, 2e-7, 1e-7]
    )
    with pytest.raises(ValueError, match="total"):
        raft.iteration_lr(1e-3, 0.5, 4, "linear", 3)
    with pytest.raises(ValueError, match="unknown"):
        raft.iteration_lr(1e-3, 0.5, 1, "cosine")
    for bad in [(1e-3, 0.5, 0), (0.0, 0.5, 1), (1e-3, 0.0, 1), (1e-3, 1.5, 1)]:
        with pytest.raises(ValueError):
            raft.iteration_lr(*bad)


def test_iteration_seed_depends_on_seed_and_iteration_only():
    assert raft.iteration_seed(0, 1) == raft.iteration_seed(0, 1)
    assert len({raft.iteration_seed(s, i) for s in (0, 1) for i in (1, 2, 3)}) == 6
    assert 0 <= raft.iteration_seed(7, 3) < 2**31


def _cands(pid, scores, outcomes=None):
    outcomes = outcomes or [0] * len(scores)
    return [
        {"problem_id": pid, "sample_index": j, "score": s, "outcome": o}
        for j, (s, o) in enumerate(zip(scores, outcomes, strict=True))
    ]


def test_fingerprint_follows_content_not_location(tmp_path, tiny_policy):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_policy, copy)
    assert artifacts.fingerprint(copy) == artifacts.fingerprint(tiny_policy)
    (copy / "config.json").write_text((copy / "config.json").read_text() + " ")
    assert artifacts.fingerprint(copy) != artifacts.fingerprint(tiny_policy)
    with pytest.raises(FileNotFoundError):
        artifacts.fingerprint(tmp_path / "missing")


def test_select_best_picks_the_max_and_breaks_ties_by_seeded_rng():
    cands = _cands("p1", [0.2, 0.9, 0.9, 0.5]) + _cands("p2", [None, None]) + _cands("p3", [0.1, 0.7, None])
    audit = io.Audit("t")
    picked = raft.select_best(cands, seed=3, audit=audit)
    assert [c["problem_id"] for c in picked] == [
        "p1",
        "p3",
    ]  # p2 has no eligible candidate: counted, not picked
    assert picked[0]["sample_index"] in (1, 2) and picked[0]["n_tied"] == 2
    assert picked[1]["sample_index"] == 1 and picked[1]["n_tied"] == 1
    assert audit.counts == {"prompt_selected": 2, "prompt_no_candidate": 1, "selected_by_tiebreak": 1}
    # reproducible, independent of the other prompts, and both tied candidates get picked across seeds
    assert raft.select_best(cands, seed=3) == picked
    assert raft.select_best(_cands("p1", [0.2, 0.9, 0.9, 0.5]), seed=3)[0] == picked[0]
    chosen = {raft.select_best(cands, seed=s)[0]["sample_index"] for s in range(40)}
    assert chosen == {1, 2}


def test_select_best_treats_nan_as_ineligible():
    picked = raft.select_best(_cands("p", [math.nan, 0.3]), seed=0)
    assert picked[0]["sample_index"] == 1
    assert raft.select_best(_cands("p", [math.nan]), seed=0) == []


def test_score_candidates_statuses_and_aggregation():
    problems = {"p": {"question": "Q?"}}
    samples = [
        {"problem_id": "p", "sample_index": 0, "steps": ["a", "bb"], "truncated": False, "outcome": 1},
        {"problem_id": "p", "sample_index": 1, "steps": [], "truncated": False, "outcome": 0},
        {"problem_id": "p", "sample_index": 2, "steps": ["a"], "truncated": True, "outcome": 0},
    ]

    class Fixed:
        def score_batch(self, questions, list_of_steps, batch_size=8):
            return [[0.8, 0.3] for _ in list_of_steps]

    st = raft.RaftSettings(exclude_truncated=True)
    out = raft.score_candidates(Fixed(), "er_1", problems, samples, "min", st)
    assert [o["status"] for o in out] == ["candidate_eligible", "candidate_empty", "candidate_truncated"]
    assert out[0]["score"] == 0.3 and out[1]["score"] is None and out[2]["score"] is None
    assert raft.score_candidates(Fixed(), "orm", problems, samples, "last", st)[0]["score"] == 0.3
    # truncated allowed: one step but two scores -> a count mismatch, never silently aggregated
    st2 = raft.RaftSettings(exclude_truncated=False)
    out2 = raft.score_candidates(Fixed(), "er_1", problems, samples, "mean", st2)
    assert out2[0]["score"] == pytest.approx(0.55)
    assert out2[2]["status"] == "candidate_score_count_mismatch" and out2[2]["score"] is None

    class AllNan:
        def score_batch(self, questions, list_of_steps):
            return [[math.nan] * len(s) for s in list_of_steps]

    assert (
        raft.score_candidates(AllNan(), "er_1", problems, samples, "min", st)[0]["status"]
        == "candidate_unscored"
    )
    oracle = raft.score_candidates(None, "oracle", problems, samples, "min", st)
    assert [o["score"] for o in oracle] == [1.0, None, None]
    wrong = [{**samples[0], "outcome": 0}]
    assert (
        raft.score_candidates(None, "oracle", problems, wrong, "min", st)[0]["status"]
        == "candidate_wrong_answer"
    )
    assert raft.score_candidates(None, "random", problems, wrong, "min", st)[0]["score"] == 0.0


def test_settings_are_checked():
    with pytest.raises(ValueError, match="aggregation"):
        raft.RaftSettings(aggregation="max").check()
    with pytest.raises(ValueError, match="m"):
        raft.RaftSettings(m=0).check()


# ----------------------------------------------------------------------------------------------------- loop


@pytest.mark.slow
def test_run_raft_records_and_checkpoints(finished_run):
    root, records = finished_run
    assert [r["iteration"] for r in records] == [1, 2]
    assert [r["lr"] for r in records] == pytest.approx([1e-3, 5e-4])
    for r in records:
        it_dir = root / "er_1" / f"iter_{r['iteration']:02d}"
        assert (it_dir / "policy" / "config.json").is_file()
        assert json.loads((it_dir / "record.json").read_text()) == r
        assert 0 <= r["greedy_accuracy"] <= 1 and r["ci_low"] <= r["greedy_accuracy"] <= r["ci_high"]
        assert r["n_prompts"] == 3 and r["n_samples"] == 6 and r["n_test"] == 3
        sel, sample, oracle = r["selected_outcome"][0], r["sample_outcome"][0], r["oracle_outcome"][0]
        assert sel <= oracle and sample <= oracle
        assert r["audit"]["prompt_selected"] + r["audit"].get("prompt_no_candidate", 0) == 3
        assert r["train"]["n_examples"] == r["n_selected"]
    assert records[0]["fingerprint"] != records[1]["fingerprint"]


@pytest.mark.slow
def test_resume_after_interruption_equals_uninterrupted_run(
    tmp_path, tiny_policy, problems, finished_run, monkeypatch
):
    real_sft, real_sample = training.train_policy_sft, rollouts.sample_solutions
    calls = {"sft": 0, "sample_t1": 0}

    def interrupted_sft(*args, **kwargs):
        calls["sft"] += 1
        if calls["sft"] == 2:
            raise KeyboardInterrupt  # the user stops the run during iteration 2's fine-tuning
        return real_sft(*args, **kwargs)

    monkeypatch.setattr(training, "train_policy_sft", interrupted_sft)
    with pytest.raises(KeyboardInterrupt):  # an interruption is not a failure: it is not wrapped
        _run(tmp_path, tiny_policy, problems)
    it1 = tmp_path / "er_1" / "iter_01" / "record.json"
    assert it1.is_file() and not (tmp_path / "er_1" / "iter_02" / "record.json").exists()
    assert not (tmp_path / "er_1" / "iter_02" / "policy").exists()  # no half-written checkpoint
    stamp = it1.stat().st_mtime_ns

    def counting_sft(*args, **kwargs):
        calls["sft"] += 1
        return real_sft(*args, **kwargs)

    def counting_sample(*args, **kwargs):
        if kwargs.get("temperature", 1.0) > 0:
            calls["sample_t1"] += 1
        return real_sample(*args, **kwargs)

    calls.update(sft=0, sample_t1=0)
    monkeypatch.setattr(training, "train_policy_sft", counting_sft)
    monkeypatch.setattr(rollouts, "sample_solutions", counting_sample)
    records = _run(tmp_path, tiny_policy, problems)
    assert calls == {"sft": 1, "sample_t1": 0}  # iteration 1 reused; iteration 2 reuses its sample shards
    assert it1.stat().st_mtime_ns == stamp
    _, expected = finished_run
    assert records == expected


@pytest.mark.slow
def test_failing_iteration_names_reward_model_and_iteration(finished_run, tiny_policy, problems):
    root, expected = finished_run
    with pytest.raises(
        raft_stage.RaftError, match=r"'er_1' failed at iteration 3 of 3.*stub reward exploded"
    ):
        _run(root, tiny_policy, problems, reward=StubReward(fail=True), iterations=3)
    assert not (root / "er_1" / "iter_03" / "record.json").exists()
    assert [
        json.loads((root / "er_1" / f"iter_{i:02d}" / "record.json").read_text()) for i in (1, 2)
    ] == expected


# ----------------------------------------------------------------------------------------------------- stage


def _write_profile(profile, tiny_policy, problems):
    P = artifacts.paths(profile)
    shutil.copytree(tiny_policy, P.policy)
    prompts, test = problems
    artifacts.atomic_write_jsonl(P.problem_file("raft"), prompts)
    artifacts.atomic_write_jsonl(P.problem_file("test"), test)
    return P


def _config(**kw):
    return raft_stage.RaftConfig(profile="t", cpu_numerics="default", torch_threads=1, **kw)


def test_stage_names_the_missing_stage(tmp_roots, tiny_policy, problems):
    with pytest.raises(io.ArtifactError, match="00_policy"):
        raft_stage.run(_config(reward_models="er_1"))
    _write_profile("t", tiny_policy, problems)
    with pytest.raises(io.ArtifactError, match="03_train_prm"):
        raft_stage.run(_config(reward_models="er_1,hard"))
    with pytest.raises(ValueError, match="n_prompts"):
        raft_stage.run(_config(reward_models="random", n_prompts=10))
    with pytest.raises(TypeError, match="unexpected keyword argument 'mm'"):
        _config(reward_models="random", n_prompts=3, n_test=3, mm=3)


@pytest.mark.slow
def test_stage_table_audit_manifest_and_plot(tmp_roots, tiny_policy, problems):
    P = _write_profile("t", tiny_policy, problems)
    _save_tiny(P.prm("er_1"), seed=1)  # any causal LM with the tag tokens in its vocabulary scores as a PRM
    kw = {k: v for k, v in SETTINGS.__dict__.items() if k not in ("device", "shard_size")}  # not stage knobs
    config = _config(reward_models="er_1,random", iterations=1, n_prompts=3, n_test=3, **kw)
    res = raft_stage.run(config, progress=False)
    table = res.table
    assert list(table.columns) == raft_tables.TABLE_COLUMNS
    assert set(table["reward_model"]) == {"baseline", "er_1", "random"}
    assert len(table) == 1 + 2 * 5
    gain = table.query("metric == 'greedy_gain'").set_index("reward_model")["value"]
    acc = table.query("metric == 'greedy_accuracy'").set_index("reward_model")["value"]
    assert gain["er_1"] == pytest.approx(acc["er_1"] - acc["baseline"])
    paired = raft_tables.raft_paired_table(raft_tables.load_records("t", "er_1,random", 1))
    assert list(paired.columns) == raft_tables.PAIRED_COLUMNS
    assert paired.equals(res.paired)
    assert paired[["reward_model", "versus", "iteration"]].values.tolist() == [["er_1", "random", 1]]
    row = paired.iloc[0]
    random_acc = table.query("metric == 'greedy_accuracy' and reward_model == 'random'")["value"].iloc[0]
    assert row["diff"] == pytest.approx(acc["er_1"] - random_acc) and 0 <= row["p_value"] <= 1
    assert table[["value", "ci_low", "ci_high"]].notna().all().all()
    assert (table["ci_low"] <= table["value"] + 1e-12).all() and (
        table["value"] <= table["ci_high"] + 1e-12
    ).all()
    # iteration 1 of every reward model shares one candidate pool (same policy, same seed)
    assert len(list((P.raft / "samples").iterdir())) == 1
    info = raft_tables.manifest_info("t", "er_1,random", 1)
    assert info == res.info
    rec = json.loads((P.raft / "er_1" / "iter_01" / "record.json").read_text())
    base = json.loads((P.raft / "baseline" / "record.json").read_text())
    random_rec = json.loads((P.raft / "random" / "iter_01" / "record.json").read_text())
    assert info["sampled_tokens"] == rec["sample_tokens"] == random_rec["sample_tokens"]
    assert (
        info["generated_tokens"]
        == rec["sample_tokens"] + base["eval_tokens"] + rec["eval_tokens"] + random_rec["eval_tokens"]
    )
    audit = raft_tables.raft_audit("t", "er_1,random", 1)
    assert set(audit["reward_model"]) == {"er_1", "random"} and (audit["count"] > 0).all()
    # a rerun is all reused and gives the same table
    again = raft_stage.run(config, progress=False)
    assert again.table.equals(table)
    # a retrained PRM redoes its own run only
    er_rec, rnd_rec = (
        P.raft / "er_1" / "iter_01" / "record.json",
        P.raft / "random" / "iter_01" / "record.json",
    )
    stamps = er_rec.stat().st_mtime_ns, rnd_rec.stat().st_mtime_ns
    shutil.rmtree(P.prm("er_1"))
    _save_tiny(P.prm("er_1"), seed=2)
    raft_stage.run(config, progress=False)
    assert er_rec.stat().st_mtime_ns != stamps[0] and rnd_rec.stat().st_mtime_ns == stamps[1]
    fig = figures.figure_raft(table)
    assert len(fig.axes[0].lines) >= 1
    assert np.isfinite(table["value"]).all()


# ------------------------------------------------------------------------------ values on mixed outcomes


def wilson(k, n, z=1.959963984540054):
    """The Wilson score interval by its formula (independent of scipy)."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def sign_flip_p(d):
    """Exact two-sided sign-flip p-value of mean(d) = 0 by enumerating all 2^n sign patterns."""
    d = np.asarray(d, dtype=float)
    obs = abs(d.mean())
    flips = [
        abs((d * np.array(signs)).mean()) >= obs - 1e-12
        for signs in itertools.product((1, -1), repeat=len(d))
    ]
    return float(np.mean(flips))


def _sample(pid, j, outcome, steps=("s",)):
    return {"problem_id": pid, "sample_index": j, "steps": list(steps), "truncated": False, "outcome": outcome,
            "pred": "1" if outcome else "2"}  # fmt: skip


# (score, outcome) per candidate; None = ineligible. p3 has no eligible candidate; p2's and p4's picks are wrong.
MIXED = {
    "p1": [(0.9, 1), (0.3, 0)],
    "p2": [(0.8, 0), (0.4, 1)],
    "p3": [(None, 1), (None, 0), (None, 0)],
    "p4": [(0.1, 1), (0.2, 0)],
}


def test_select_and_selection_stats_on_mixed_outcomes():
    samples, scores = [], []
    for pid, cands in MIXED.items():
        for j, (score, outcome) in enumerate(cands):
            samples.append(_sample(pid, j, outcome))
            status = "candidate_eligible" if score is not None else "candidate_truncated"
            scores.append(
                {"problem_id": pid, "sample_index": j, "score": score, "step_scores": None, "status": status}
            )
    prompts = [{"id": pid} for pid in MIXED]
    selected, audit, st = raft.select(samples, scores, seed=0, prompts=prompts)
    assert [(c["problem_id"], c["sample_index"], c["outcome"]) for c in selected] == [
        ("p1", 0, 1),
        ("p2", 0, 0),
        ("p4", 1, 0),
    ]
    assert audit.counts["prompt_no_candidate"] == 1 and audit.counts["candidate_truncated"] == 3
    assert (st["n_prompts"], st["n_selected"], st["n_samples"]) == (4, 3, 9)
    # selected: p1 right, p2 and p4 wrong, p3 no pick (wrong) -> 1/4; oracle: p1, p2, p4 have a correct
    # ELIGIBLE candidate (p3's correct one is not eligible) -> 3/4; samples: mean of (1/2, 1/2, 1/3, 1/2)
    assert st["selected_outcome"][0] == 0.25
    assert st["selected_outcome"][1:] == pytest.approx(wilson(1, 4), abs=1e-12)
    assert st["oracle_outcome"][0] == 0.75
    assert st["oracle_outcome"][1:] == pytest.approx(wilson(3, 4), abs=1e-12)
    assert st["sample_outcome"][0] == pytest.approx(11 / 24, abs=1e-15)
    assert st["sample_outcome"][1] < 11 / 24 < st["sample_outcome"][2]
    assert st["eligible_outcome_of_selected_prompts"] == pytest.approx(0.5, abs=1e-15)
    assert st["selected_outcome_of_selected_prompts"] == pytest.approx(1 / 3, abs=1e-15)


def test_orm_last_with_a_cut_final_tag_is_unscored_not_an_earlier_step():
    problems = {"p": {"question": "Q?"}}
    samples = [_sample("p", 0, 0, steps=("a", "b")), _sample("p", 1, 1, steps=("a", "b"))]

    class CutFirst:
        def score_batch(self, questions, list_of_steps):
            return [[0.95, math.nan], [0.2, 0.6]]  # candidate 0's final tag was lost

    out = raft.score_candidates(CutFirst(), "orm", problems, samples, "last", raft.RaftSettings())
    assert [o["status"] for o in out] == ["candidate_unscored", "candidate_eligible"]
    assert out[0]["score"] is None and out[1]["score"] == 0.6
    selected, audit, _ = raft.select(samples, out, seed=0, prompts=[{"id": "p"}])
    assert [(c["sample_index"], c["outcome"]) for c in selected] == [(1, 1)]  # not 0.95 -> the wrong one
    assert audit.counts["candidate_unscored"] == 1
    # "min" over the same scores ignores the lost tag
    assert (
        raft.score_candidates(CutFirst(), "er_1", problems, samples, "min", raft.RaftSettings())[0]["score"]
        == 0.95
    )


def _record(name, iteration, outcomes, eval_outcomes):
    k, n = sum(eval_outcomes), len(eval_outcomes)
    lo, hi = wilson(k, n)
    return {
        "reward_model": name,
        "aggregation": "" if name == "baseline" else "min",
        "iteration": iteration,
        "lr": 1e-3,
        "greedy_accuracy": k / n,
        "ci_low": lo,
        "ci_high": hi,
        "n_test": n,
        "eval_outcomes": eval_outcomes,
        "selected_outcome": outcomes,
        "sample_outcome": outcomes,
        "oracle_outcome": outcomes,
        "n_prompts": 4,
    }


BASE = _record("baseline", 0, [0.0, 0.0, 0.0], [1, 0, 0, 1, 0, 0])
ER = _record("er_1", 1, [0.5, 0.2, 0.8], [1, 1, 0, 1, 1, 0])
RANDOM = _record("random", 1, [0.25, 0.1, 0.6], [0, 1, 0, 1, 0, 0])


def test_raft_table_gain_on_mixed_outcomes():
    table = raft_tables.raft_table(BASE, [ER, RANDOM])
    v = table.set_index(["reward_model", "metric"])
    assert v.loc[("baseline", "greedy_accuracy"), "value"] == pytest.approx(2 / 6, abs=1e-15)
    assert v.loc[("er_1", "greedy_accuracy"), "value"] == pytest.approx(4 / 6, abs=1e-15)
    gain = v.loc[("er_1", "greedy_gain")]
    assert gain["value"] == pytest.approx(2 / 6, abs=1e-15) and gain["n"] == 6
    assert 0.0 <= gain["ci_low"] < 2 / 6 < gain["ci_high"] <= 1.0  # per-problem gains are 0 or 1
    assert v.loc[("random", "greedy_gain"), "value"] == pytest.approx(0.0, abs=1e-15)
    assert v.loc[("er_1", "selected_outcome"), ["value", "ci_low", "ci_high"]].tolist() == [0.5, 0.2, 0.8]
    assert (v.loc[("er_1", "sample_outcome"), "n"], len(table)) == (4, 1 + 2 * 5)


def test_raft_paired_table_on_mixed_outcomes():
    paired = raft_tables.raft_paired_table([BASE, ER, RANDOM])
    assert paired[["reward_model", "versus", "iteration"]].values.tolist() == [["er_1", "random", 1]]
    row = paired.iloc[0]
    d = np.array(ER["eval_outcomes"]) - np.array(RANDOM["eval_outcomes"])  # [1, 0, 0, 0, 1, 0]
    assert row["diff"] == pytest.approx(2 / 6, abs=1e-15)
    assert (row["n"], row["n_better"], row["n_worse"]) == (6, 2, 0)
    assert row["p_value"] == pytest.approx(sign_flip_p(d), abs=1e-12) == 0.5
    assert 0.0 <= row["ci_low"] < 2 / 6 < row["ci_high"]
