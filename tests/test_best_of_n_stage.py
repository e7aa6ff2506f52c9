"""Tests of the 04_best_of_n pipeline stage (erprm_core.stages.best_of_n): candidate pool building
with a scripted sampler and a tiny random policy, PRM scoring with its cache, and the stage end to end."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from erprm_core import evaluators, io, labels, models, prm, stats
from erprm_core.generation import HFSampler
from erprm_core.running import artifacts
from erprm_core.sampler import Generation
from erprm_core.stages import best_of_n, bon_pool, bon_tables
from erprm_core.tasks.arith import generate_problems
from erprm_core.tiny_lm import build_tiny_model, build_tokenizer

# --------------------------------------------------------------------------------------------- helpers


def tiny(tokenizer, seed: int):
    return build_tiny_model(
        tokenizer, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, seed=seed
    ).eval()


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


class ScriptedSampler(HFSampler):
    """A sampler returning fixed texts (cycled) instead of decoding; counts its calls."""

    name_or_path = "scripted"  # what the pool's fingerprint records for an in-memory policy

    def __init__(self, texts, finishes=None):
        self.texts = texts
        self.finishes = finishes or ["answer"] * len(texts)
        self.calls = 0
        self.stats = {"prompt_tokens": 0, "generated_tokens": 0, "forward_passes": 0, "sequences": 0}

    def generate(self, prompts, n, keys, seed=0, temperature=1.0, top_p=1.0, max_new_tokens=128, desc=""):
        self.calls += 1
        out = []
        for _ in prompts:
            gens = []
            for j in range(n):
                t, f = self.texts[j % len(self.texts)], self.finishes[j % len(self.finishes)]
                gens.append(Generation(t, len(t.split()), f))
                self.stats["generated_tokens"] += len(t.split())
            out.append(gens)
        return out


class Boom(HFSampler):
    name_or_path = "scripted"

    def __init__(self):
        self.stats = {}

    def generate(self, *a, **k):
        raise AssertionError("a finished shard was recomputed")


PROBLEMS = [
    {"id": "p1", "question": "Tom has 1000 apples.", "answer": "1000", "task": "arith"},
    {"id": "p2", "question": "Ann has 7 pens.", "answer": "7", "task": "arith"},
    {"id": "p3", "question": "Sam has 3 cups.", "answer": "3", "task": "arith"},
]
TEXTS = [
    "He has 1,000 apples.\nThe answer is: 1,000",  # right for p1 (comma)
    "He has 1000.0 apples.\nThe answer is: 1000.0",  # right for p1 (decimal)
    "He has 7 apples.\nThe answer is: 7",  # right for p2
    "He has no idea.",  # no answer
    "He has 3 cups.\nThe answer is: 3",  # truncated below: graded wrong even if the answer matches
]
FINISHES = ["answer", "answer", "answer", "eos", "length"]


# --------------------------------------------------------------------------------------------- small units


def test_bon_sizes_and_names():
    assert best_of_n.bon_sizes(64) == [1, 2, 4, 8, 16, 32, 64]
    assert best_of_n.bon_sizes(1) == [1]
    assert best_of_n.bon_sizes(12) == [1, 2, 4, 8, 12]
    with pytest.raises(ValueError, match="n_max"):
        best_of_n.bon_sizes(0)
    assert labels.method_name("er_1", "min") == "er_1:min"
    rules = ["orm", "hard", "er_10", "soft", "er_0.5", "er_1"]
    assert sorted(rules, key=labels.rule_sort_key) == ["soft", "er_0.5", "er_1", "er_10", "hard", "orm"]


def test_vote_answer_groups_equivalent_numbers():
    va = bon_pool.vote_answer
    assert va("1000", True, "1,000", "arith") == va("1000", True, "1000.0", "arith") == "1000"
    assert va("999", False, "1000", "gsm8k") == "999"
    assert va(None, False, "1000", "gsm8k") is None
    assert va("\\frac{1}{2}", True, "0.5", "math") == va("0.5", True, "0.5", "math")
    assert va("x + 1", False, "2", "math") == "x+1"


# --------------------------------------------------------------------------------------------- pool


def test_build_pool_grades_keeps_everything_and_resumes(tmp_path):
    fake = ScriptedSampler(TEXTS, FINISHES)
    kw = dict(seed=0, shard_size=2, out_dir=tmp_path, max_new_tokens=16)
    pool = bon_pool.build_candidate_pool((fake, None), PROBLEMS, 5, **kw)
    assert len(pool.records) == 15 and fake.calls == 2  # 3 problems in shards of 2
    recs = {(r["problem_id"], r["candidate_index"]): r for r in pool.records}
    assert [recs[("p1", j)]["correct"] for j in range(5)] == [1, 1, 0, 0, 0]
    assert recs[("p1", 0)]["answer"] == recs[("p1", 1)]["answer"] == "1000"  # vote together
    assert recs[("p2", 2)]["correct"] == 1 and recs[("p2", 0)]["answer"] == "1000"
    assert recs[("p1", 3)]["answer"] is None and recs[("p1", 3)]["pred"] is None
    trunc = recs[("p3", 4)]
    assert trunc["truncated"] and trunc["outcome"] == 1 and trunc["correct"] == 0 and trunc["answer"] is None
    audit = pool.audit.to_frame().set_index("reason")["count"]
    assert audit["candidates"] == 15 and audit["no_answer"] == 3 and audit["truncated"] == 3
    assert audit["truncated_with_answer"] == 3 and audit["correct"] == 3
    assert pool.stats["generated_tokens"] == sum(r["n_tokens"] for r in pool.records)
    assert artifacts.read_jsonl(tmp_path / "candidates.jsonl") == pool.records

    # Resume: finished shards are reused (the sampler is never called); a lost shard is recomputed.
    again = bon_pool.build_candidate_pool((Boom(), None), PROBLEMS, 5, **kw)
    assert again.records == pool.records
    (tmp_path / "candidates" / "shard-00001.jsonl").unlink()
    fake2 = ScriptedSampler(TEXTS, FINISHES)
    resumed = bon_pool.build_candidate_pool((fake2, None), PROBLEMS, 5, **kw)
    assert fake2.calls == 1 and resumed.records == pool.records
    # A changed parameter discards the old shards.
    fake3 = ScriptedSampler(TEXTS, FINISHES)
    changed = bon_pool.build_candidate_pool((fake3, None), PROBLEMS, 3, **kw)
    assert fake3.calls == 2 and len(changed.records) == 9


def test_build_pool_tiny_policy_resume_equals_uninterrupted(tmp_path, tok):
    torch.set_num_threads(1)
    folder = tmp_path / "policy"
    tiny(tok, 0).save_pretrained(folder)
    tok.save_pretrained(folder)
    problems = generate_problems(3, seed=0, split="test")
    kw = dict(seed=5, shard_size=1, max_new_tokens=10, batch_size=8)
    full = bon_pool.build_candidate_pool(folder, problems, 4, out_dir=tmp_path / "a", **kw)
    assert [(r["problem_id"], r["candidate_index"]) for r in full.records] == [
        (p["id"], j) for p in problems for j in range(4)
    ]
    assert all(r["truncated"] and r["correct"] == 0 for r in full.records if r["finish"] == "length")
    # An interrupted run (first shard only) then resumed gives the same records.
    bon_pool.build_candidate_pool(folder, problems[:1], 4, out_dir=tmp_path / "b", **{**kw, "shard_size": 1})
    part = bon_pool.build_candidate_pool(folder, problems, 4, out_dir=tmp_path / "b", **kw)
    assert part.records == full.records


# --------------------------------------------------------------------------------------------- scoring


@pytest.fixture(scope="module")
def prm_dirs(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("prms")
    out = {}
    for i, rule in enumerate(["soft", "er_1", "hard", "orm"]):
        tiny(tok, 10 + i).save_pretrained(root / rule)
        tok.save_pretrained(root / rule)
        out[rule] = root / rule
    return out


def test_score_pool_columns_cache_and_dedup(tmp_path, prm_dirs, monkeypatch):
    torch.set_num_threads(1)
    pool = bon_pool.build_candidate_pool(
        (ScriptedSampler(TEXTS + ["", TEXTS[0]], FINISHES + ["eos", "answer"]), None),
        PROBLEMS, 7, shard_size=3, out_dir=tmp_path,
    )  # fmt: skip
    rules = {r: prm_dirs[r] for r in ("hard", "er_1")}
    scored = bon_pool.score_pool(pool.records, rules, batch_size=4, out_dir=tmp_path)
    table = scored.table
    cols = [f"{r}:{a}" for r in ("er_1", "hard") for a in ("min", "prod", "last", "mean")]
    assert list(table.columns) == ["problem_id", "candidate_index", "correct", "answer", *cols]
    assert len(table) == 21 and np.isfinite(table[cols].to_numpy()).all()
    # 6 distinct texts per problem (TEXTS[0] twice); duplicates share scores; the empty one scores 0.
    assert scored.stats["distinct_solutions"] == 18
    t1 = table[table["problem_id"] == "p1"].set_index("candidate_index")
    assert t1.loc[0, cols].tolist() == t1.loc[6, cols].tolist()
    assert (t1.loc[5, cols] == bon_pool.UNSCORABLE_SCORE).all()
    audit = scored.audit.to_frame().set_index("reason")["count"]
    assert audit["unscorable[hard]"] == 3 and audit["unscorable[er_1]"] == 3
    # Aggregations agree with prm.aggregate on the cached step scores.
    s = scored.step_scores["hard"][0]
    assert t1.loc[0, "hard:min"] == pytest.approx(min(s))
    assert t1.loc[0, "hard:prod"] == pytest.approx(math.prod(s))
    assert t1.loc[0, "hard:last"] == pytest.approx(s[-1])
    # Scores equal a direct ProcessRewardModel.score of the same solution.
    direct = prm.ProcessRewardModel.from_pretrained(prm_dirs["hard"]).score(
        PROBLEMS[0]["question"], pool.records[0]["steps"]
    )
    assert s == pytest.approx(direct, abs=1e-6)

    # Resume: a finished rule never loads its model again; adding a rule scores only that rule.
    loaded = []
    real = prm.ProcessRewardModel.from_pretrained.__func__

    def spy(cls, path, *a, **k):
        loaded.append(path)
        return real(cls, path, *a, **k)

    monkeypatch.setattr(prm.ProcessRewardModel, "from_pretrained", classmethod(spy))
    again = bon_pool.score_pool(
        pool.records, {**rules, "soft": prm_dirs["soft"]}, batch_size=4, out_dir=tmp_path
    )
    assert loaded == [prm_dirs["soft"]]
    pd.testing.assert_frame_equal(again.table[table.columns], table)
    assert again.stats["rules_computed"] == 1


# --------------------------------------------------------------------------------------------- the stage


@pytest.mark.slow
def test_stage_end_to_end_and_resume(tmp_roots, tok, prm_dirs, monkeypatch):
    torch.set_num_threads(1)
    profile = "t04"
    P = artifacts.paths(profile)
    tiny(tok, 0).save_pretrained(P.policy)
    tok.save_pretrained(P.policy)
    artifacts.atomic_write_jsonl(P.problem_file("test"), generate_problems(5, seed=0, split="test"))
    for rule, folder in prm_dirs.items():
        import shutil

        shutil.copytree(folder, P.prm(rule))
    kw = dict(n_max=4, n_test=3, max_new_tokens=8, batch_size=16, shard_size=2, n_boot=200, n_subsets=20,
              score_batch_size=32, cpu_numerics="default", torch_threads=1)  # fmt: skip
    res = best_of_n.run(best_of_n.BestOfNConfig(profile=profile, **kw))
    assert len(res.pool) == 12 and res.pool["problem_id"].nunique() == 3
    score_cols = [c for c in res.pool.columns if ":" in c]
    assert len(score_cols) == 16 and np.isfinite(res.pool[score_cols].to_numpy()).all()
    bon = res.bon
    assert list(bon.columns) == bon_tables.TABLE_COLUMNS
    expected = set(score_cols) | {"random", "majority", "oracle", "likelihood", "fewer_steps"}
    expected |= {f"weighted_{r}:min" for r in ("er_1", "hard", "soft")}
    # the training-free verifiers: the policy's mean log-probability (< 0) and minus the number of steps
    assert (res.pool["likelihood"] < 0).all() and (res.pool["fewer_steps"] <= 0).all()
    assert set(bon["method"]) == expected
    assert sorted(bon["n"].unique()) == [1, 2, 4] and len(bon) == len(expected) * 3
    assert bon["value"].between(0, 1).all() and bon["n_problems"].eq(3).all()
    paired = res.paired
    pre = paired[(paired["selection"] == "prespecified") & (paired["method_a"] == "er_1:min")]
    assert set(zip(pre["method_b"], pre["n"], strict=True)) == {
        (b, n) for b in ("hard:min", "soft:min", "orm:last") for n in (1, 2, 4)
    } | {("random", 4), ("likelihood", 4)}
    headline = paired[paired["family"].str.startswith("headline")]
    assert len(headline) == 3 and (headline["n"] == 4).all()
    free = paired[paired["family"].str.startswith("reward models vs")]
    assert len(free) == 8 and set(free["method_b"]) == {"random", "likelihood"}
    post = paired[paired["selection"] != "prespecified"]
    assert len(post) == 3 and (post["n"] == 4).all() and post["selection"].str.contains("post hoc").all()
    # Holm within each family: never below the raw p, the smallest p of a family of m multiplied by m
    assert (paired["p_holm"] >= paired["p_value"] - 1e-12).all()
    smallest = free.loc[free["p_value"].idxmin()]
    assert smallest["p_holm"] == pytest.approx(min(1.0, 8 * smallest["p_value"]))
    # 8 random-weight tokens never reach an answer line: no wrong candidate with an answer to show
    assert res.example.empty and res.example_note == "no wrong candidate with an answer in the pool"
    ranking = res.ranking.set_index("method")
    assert list(ranking.index) == [
        "er_1:min",
        "hard:min",
        "soft:min",
        "orm:last",
        "likelihood",
        "fewer_steps",
    ]
    assert ranking["value"].dropna().between(0, 1).all()
    assert res.best_eta["rule"] == "er_1"
    agg = bon_tables.aggregation_table(bon, 4)
    assert list(agg["rule"]) == [r for r in ("soft", "er_1", "hard", "orm") for _ in range(4)]
    assert list(agg["aggregation"][:4]) == ["min", "prod", "last", "mean"]
    audit = res.audit.set_index("reason")["count"]
    assert audit["candidates"] == 12
    assert res.stats["candidates"] == 12 and res.stats["scoring"] == "two_token"
    assert list(res.picks["method"]) == ["pool", *score_cols, "likelihood", "fewer_steps"] * 2
    assert list(res.picks["ranking"].unique()) == ["raw scores", "answered first"]

    # Rerun: nothing is sampled or scored again, and the tables are identical.
    def no_load(*a, **k):
        raise AssertionError("model loaded on a resumed run")

    monkeypatch.setattr(models, "load_causal_lm", no_load)
    again = best_of_n.run(best_of_n.BestOfNConfig(profile=profile, **kw))
    pd.testing.assert_frame_equal(again.bon, bon)
    pd.testing.assert_frame_equal(again.paired, paired)
    assert again.stats["computed_generated_tokens"] == 0 and again.stats["rules_computed"] == 0
    assert again.stats["prms"] == res.stats["prms"]
    assert res.stats["prms"]["soft"]["prm"] == "runs/t04/prms/soft"  # relative to the repository root


def test_stage_names_missing_artifacts(tmp_roots):
    with pytest.raises(io.ArtifactError, match="00_policy"):
        best_of_n.run(best_of_n.BestOfNConfig(profile="nothing_here", cpu_numerics="default"))


def test_votes_when_no_candidate_has_an_answer():
    # A pool whose answers are all None (e.g. an untrained policy): votes are wrong, not a crash.
    answers = np.full((2, 4), None, dtype=object)
    correct = np.zeros((2, 4), dtype=int)
    assert evaluators.majority_vote_accuracy(answers, correct, 2, n_subsets=3).tolist() == [0.0, 0.0]
    scores = np.full((2, 4), 0.5)
    assert evaluators.weighted_vote_accuracy(answers, scores, correct, 4, n_subsets=3).tolist() == [0.0, 0.0]


def test_best_er_rule_is_post_hoc_max_with_ties_to_smaller_eta():
    rows = [
        ("soft:min", 0.9),
        ("er_0.5:min", 0.6),
        ("er_2:min", 0.7),
        ("er_1:min", 0.7),
        ("hard:min", 0.95),
        ("er_2:last", 0.99),
        ("weighted_er_2:min", 0.99),
        ("majority", 1.0),
    ]
    bon = pd.DataFrame(
        [{"method": m, "n": 4, "value": v, "ci_low": v - 0.1, "ci_high": v + 0.1} for m, v in rows]
    )
    best = bon_tables.best_er_rule(bon, 4, "min")
    assert (best["rule"], best["eta"], best["value"]) == ("er_1", 1.0, 0.7)
    assert "post hoc" in best["selection"]
    with pytest.raises(ValueError, match="no ER rule"):
        bon_tables.best_er_rule(bon, 4, "prod")


def test_pick_audit_hand_computed():
    table = pd.DataFrame(
        {
            "problem_id": ["a", "a", "a", "b", "b"],
            "candidate_index": [0, 1, 2, 0, 1],
            "correct": [1, 0, 0, 0, 1],
            "answer": ["1", None, "2", "3", "4"],
            "m": [0.9, 0.9, 0.1, 0.2, 0.8],
        }
    )
    recs = [
        {"pred": "1", "truncated": False, "steps": ["x", "y"]},
        {"pred": None, "truncated": False, "steps": ["x"]},
        {"pred": "2", "truncated": False, "steps": ["x", "y", "z"]},
        {"pred": "3", "truncated": True, "steps": ["x"]},
        {"pred": "4", "truncated": False, "steps": ["x", "y"]},
    ]
    out = bon_tables.pick_audit(table, recs, ["m"]).set_index("method")
    # Problem a: tie between candidates 0 and 1 (half each); problem b: candidate 1.
    assert out.loc["m", "picked_correct"] == pytest.approx((0.5 + 1) / 2)
    assert out.loc["m", "picked_no_vote"] == pytest.approx((0.5 + 0) / 2)
    assert out.loc["m", "picked_truncated"] == 0
    assert out.loc["m", "picked_steps"] == pytest.approx((1.5 + 2) / 2)
    assert out.loc["pool", "picked_correct"] == pytest.approx(2 / 5)
    assert out.loc["pool", "picked_no_vote"] == pytest.approx(2 / 5)
    assert (out["n_problems"] == 2).all()


def test_rank_unanswered_last_keeps_order_within_groups():
    table = pd.DataFrame(
        {
            "problem_id": ["a"] * 4,
            "candidate_index": [0, 1, 2, 3],
            "correct": [0, 1, 0, 0],
            "answer": [None, "5", "6", None],
            "m": [0.99, 0.2, 0.1, 0.5],
        }
    )
    ranked = bon_tables.rank_unanswered_last(table, ["m"])
    assert list(ranked["m"].rank(ascending=False)) == [3, 1, 2, 4]
    assert list(table["m"]) == [0.99, 0.2, 0.1, 0.5]  # the input is not modified
    acc = evaluators.best_of_n_accuracy(ranked["m"].to_numpy()[None], table["correct"].to_numpy()[None], 4)
    assert acc.tolist() == [1.0]


def _random_pool(n_problems: int = 64, n_candidates: int = 16, seed: int = 0) -> pd.DataFrame:
    """A pool with a problem-specific success rate and two unrelated continuous score columns."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_problems):
        correct = (rng.random(n_candidates) < rng.random()).astype(int)
        for j in range(n_candidates):
            rows.append({"problem_id": f"p{p:03d}", "candidate_index": j, "correct": int(correct[j]),
                         "a:min": rng.random(), "b:min": rng.random()})  # fmt: skip
    return pd.DataFrame(rows)


def test_paired_at_n1_is_an_exact_tie():
    """At N = 1 every reward model picks a uniformly random candidate: the paired difference is exactly 0,
    p = 1 and no problem is a win, although the exact best-of-n values differ by float rounding."""
    pool = _random_pool()
    pair = [("a:min", "b:min")]
    row = bon_tables.paired_comparisons(pool, pair, 1, n_boot=200, n_permutations=999).iloc[0]
    assert (row["diff"], row["ci_low"], row["ci_high"], row["p_value"]) == (0.0, 0.0, 0.0, 1.0)
    assert (row["n_a_better"], row["n_b_better"]) == (0, 0)
    assert row["acc_a"] == pytest.approx(row["acc_b"], abs=1e-12)
    # at N = 2 the two rankings do differ: real wins remain
    row2 = bon_tables.paired_comparisons(pool, pair, 2, n_boot=200, n_permutations=999).iloc[0]
    assert row2["n_a_better"] + row2["n_b_better"] > 0 and row2["diff"] != 0


def test_paired_diff_treats_rounding_as_a_tie():
    rng = np.random.default_rng(1)
    a = rng.random(50)
    b = a + rng.choice([-1, 1], 50) * 1e-15  # equal expectations, different rounding
    res = stats.paired_bootstrap_diff(a, b, n_boot=200, n_permutations=999)
    assert (res.diff, res.ci_low, res.ci_high, res.p_value, res.n_a_better, res.n_b_better) == (
        0.0, 0.0, 0.0, 1.0, 0, 0,
    )  # fmt: skip
    real = stats.paired_bootstrap_diff(a, np.where(np.arange(50) < 10, a - 0.5, b), n_boot=200)
    assert (real.n_a_better, real.n_b_better) == (10, 0) and real.diff == pytest.approx(0.1)


def test_step_score_example_shows_the_top_ranked_wrong_candidate():
    from erprm_core.tasks import arith_truth

    prob = generate_problems(1, seed=0, split="test", min_steps=3, max_steps=3)[0]
    right = arith_truth.expected_steps(prob)
    wrong = list(right)
    wrong[1] = wrong[1].replace("=", "= 1 +", 1)  # a wrong step 2
    base = {
        "problem_id": prob["id"],
        "question": prob["question"],
        "task": "arith",
        "reference": prob["answer"],
    }
    records = [
        {**base, "candidate_index": 0, "steps": right, "correct": 1, "answer": "a", "pred": "a"},
        {**base, "candidate_index": 1, "steps": wrong, "correct": 0, "answer": "b", "pred": "b"},
        {**base, "candidate_index": 2, "steps": wrong[:2], "correct": 0, "answer": None, "pred": None},
    ]
    assert len(right) == 4  # three arithmetic steps and the answer line
    scores = {"soft": [[0.9] * 4, [0.8, 0.3, 0.5, 0.6], [0.9, 0.9]],
              "hard": [[0.9] * 4, [0.9, 0.9, 0.2, 0.4], [0.9, 0.9]]}  # fmt: skip
    table, why = bon_tables.step_score_example(records, scores, np.array([0.9, 0.5, 0.99]))
    assert "candidate 1" in why  # candidate 2 ranks higher but has no answer
    assert table["truth"].tolist()[:4] == ["right", "first error", "after the error", "after the error"]
    last = table.iloc[-1]
    assert (last["step"], last["soft"], last["hard"], last["truth"]) == (
        "min at step",
        2,
        3,
        "first error: 2",
    )
