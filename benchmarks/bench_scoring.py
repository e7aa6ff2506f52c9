"""Benchmark: the kit's PRM scorer against per-step prefix re-encoding, and PRM training throughput.

The kit scores all steps of a solution from ONE forward pass (logits at every step tag) and batches
solutions sorted by length; in a best-of-N pool the solutions of one question also share the question's KV
cache (printed as a second ratio, against the same scorer without sharing). Some public PRMs instead re-encode every step prefix and run one forward pass
per step, unbatched. Both are run here on the same model and the same solutions (``--steps`` steps each);
their scores must agree (a causal LM sees the same prefix either way). Prints solutions/s of both and the
ratio (target >= 3x at 5 steps), then PRM training tokens/s on the same model.

Usage: ``python benchmarks/bench_scoring.py [--n-solutions 32] [--steps 5] [--batch-size 16]``
(also run by ``erprm bench`` / ``make bench``). Small defaults: well under 2 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from erprm_core import models, prm, training  # noqa: E402
from erprm_core.running import bench, numerics  # noqa: E402
from erprm_core.steps import format_prm_input, split_steps  # noqa: E402
from erprm_core.tasks.arith import generate_problems  # noqa: E402
from erprm_core.tiny_lm import build_tiny_model, build_tokenizer  # noqa: E402


def solutions(n: int, n_steps: int, seed: int = 0) -> tuple[list[str], list[list[str]]]:
    """``n`` arith problems whose reference solutions have exactly ``n_steps`` steps (answer line included)."""
    probs = generate_problems(n, seed=seed, min_steps=n_steps - 1, max_steps=n_steps - 1)
    steps = [split_steps(p["solution"]) for p in probs]
    assert all(len(s) == n_steps for s in steps), "unexpected number of steps"
    return [p["question"] for p in probs], steps


@torch.inference_mode()
def score_per_step_prefix(
    model, tokenizer, ids: prm.PRMTokenIds, question: str, steps: list[str]
) -> list[float]:
    """The naive scorer: re-encode the prefix up to each step's tag, one forward pass per step."""
    out = []
    for i in range(len(steps)):
        text = format_prm_input(question, steps[: i + 1], ids.step_tag)
        input_ids = torch.tensor([tokenizer.encode(text)])
        logits = model(input_ids=input_ids).logits[0, -1]
        out.append(float(torch.softmax(logits[[ids.good_id, ids.bad_id]].float(), -1)[0]))
    return out


def bench_scoring(model, tokenizer, questions, steps, batch_size: int, repeats: int) -> dict[str, float]:
    """Best-of-``repeats`` wall time of both scorers; checks that their scores agree."""
    scorer = prm.ProcessRewardModel(model, tokenizer)
    scorer.score_batch(questions[:batch_size], steps[:batch_size], batch_size)  # warm-up
    kit_t, naive_t = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        kit = scorer.score_batch(questions, steps, batch_size)
        kit_t.append(time.perf_counter() - t)
        t = time.perf_counter()
        naive = [
            score_per_step_prefix(model, tokenizer, scorer.ids, q, s)
            for q, s in zip(questions, steps, strict=True)
        ]
        naive_t.append(time.perf_counter() - t)
    diff = float(np.max(np.abs(np.array(kit) - np.array(naive))))
    assert diff < 1e-4, f"scorers disagree by {diff}"
    n = len(questions)
    return {"kit_sol_s": n / min(kit_t), "naive_sol_s": n / min(naive_t), "max_abs_diff": diff}


def bench_shared_prefix(
    model, tokenizer, questions, steps, batch_size: int, repeats: int, per_question: int = 16
):
    """A best-of-N pool (``per_question`` solutions per question): the kit scorer with the question's KV
    cache shared across its solutions vs the same scorer re-running the question in every row."""
    pool_q = [q for q in questions[: max(1, len(questions) // per_question)] for _ in range(per_question)]
    pool_s = [steps[i % len(steps)] for i in range(len(pool_q))]
    times, scores = {}, {}
    for share in (True, False):
        scorer = prm.ProcessRewardModel(model, tokenizer, share_prefix=share)
        scorer.score_batch(pool_q[:batch_size], pool_s[:batch_size], batch_size)  # warm-up
        runs = []
        for _ in range(repeats):
            t = time.perf_counter()
            scores[share] = scorer.score_batch(pool_q, pool_s, batch_size)
            runs.append(time.perf_counter() - t)
        times[share] = min(runs)
    diff = max(
        abs(a - b)
        for x, y in zip(scores[True], scores[False], strict=True)
        for a, b in zip(x, y, strict=True)
    )
    assert diff < 1e-4, f"shared-prefix scores differ by {diff}"
    n = len(pool_q)
    return {"shared_sol_s": n / times[True], "unshared_sol_s": n / times[False], "max_abs_diff": diff, "n": n}


def bench_training(model_dir: str, questions, steps, batch_size: int, max_steps: int) -> dict[str, float]:
    """PRM training tokens/s (soft labels, ``max_steps`` optimizer steps, nothing saved)."""
    rng = np.random.default_rng(0)
    records = [
        {"problem_id": str(i), "question": q, "steps": s, "labels": {"soft": rng.random(len(s)).tolist()}}
        for i, (q, s) in enumerate(zip(questions, steps, strict=True))
    ]
    df = training.train_prm(
        model_dir, None, records, "soft", os.path.join(model_dir, "prm"), max_steps=max_steps, lr=1e-4,
        batch_size=batch_size, save=False, disable_tqdm=True,
    )  # fmt: skip
    return {"train_tokens_s": df.attrs["tokens_per_s"]}


def write_figures(path: str, model, tokenizer, questions, steps, res: dict, batch_size: int) -> None:
    """The kit scorer's figures as JSON for ``erprm bench``: tokens/s (the PRM inputs' tokens, no padding),
    the ratio to the per-step baseline and the model's sizes. The LM head runs only at the step tags."""
    tag = prm.ProcessRewardModel(model, tokenizer).ids.step_tag
    lengths = [
        len(tokenizer.encode(format_prm_input(q, s, tag))) for q, s in zip(questions, steps, strict=True)
    ]
    tokens_per_solution = sum(lengths) / len(lengths)
    figures = {
        "tokens_per_s": res["kit_sol_s"] * tokens_per_solution, "ratio": res["kit_sol_s"] / res["naive_sol_s"],
        "naive_tokens_per_s": res["naive_sol_s"] * tokens_per_solution, "solutions_per_s": res["kit_sol_s"],
        "baseline": "one forward per step prefix", "tokens_per_solution": tokens_per_solution,
        "batch_size": batch_size, "training": False, "head_per_token": False,
        "context": bench.mean_context(lengths), **bench.model_dims(model),
    }  # fmt: skip
    with open(path, "w") as f:
        json.dump(figures, f, indent=2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-solutions", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--train-steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    parser.add_argument("--json", help="also write the figures (erprm bench reads them) to this file")
    parser.add_argument("--quick", action="store_true", help="a few solutions only (tests): seconds")
    args = parser.parse_args()
    if args.quick:
        args.n_solutions, args.batch_size, args.repeats, args.train_steps = 4, 2, 1, 0
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        numerics.set_cpu_threads(args.threads)  # as the stages do (MKL on one thread under the pins)

    tokenizer = build_tokenizer()
    model = build_tiny_model(tokenizer, seed=0).eval()
    questions, steps = solutions(args.n_solutions, args.steps)
    n_params = models.count_parameters(model)
    print(
        f"model: tiny Llama, {n_params / 1e6:.2f}M parameters; {args.n_solutions} solutions x {args.steps} steps"
    )

    res = bench_scoring(model, tokenizer, questions, steps, args.batch_size, args.repeats)
    ratio = res["kit_sol_s"] / res["naive_sol_s"]
    print(f"kit scorer (1 forward/solution, batch {args.batch_size}): {res['kit_sol_s']:8.1f} solutions/s")
    print(f"per-step prefix re-encoding (1 forward/step, unbatched): {res['naive_sol_s']:8.1f} solutions/s")
    print(f"ratio: {ratio:.1f}x (target >= 3x); max |score difference| {res['max_abs_diff']:.1e}")
    if args.json:
        write_figures(args.json, model, tokenizer, questions, steps, res, args.batch_size)
    if args.quick:
        return 0

    pool = bench_shared_prefix(model, tokenizer, questions, steps, args.batch_size, args.repeats)
    print(
        f"best-of-N pool ({pool['n']} solutions, 16 per question): question KV shared "
        f"{pool['shared_sol_s']:8.1f} vs re-run per row {pool['unshared_sol_s']:8.1f} solutions/s = "
        f"{pool['shared_sol_s'] / pool['unshared_sol_s']:.2f}x; max |score difference| {pool['max_abs_diff']:.1e}"
    )

    if args.train_steps <= 0:
        return 0 if ratio >= 3.0 else 1
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tr = bench_training(tmp, questions, steps, args.batch_size, args.train_steps)
    print(
        f"PRM training: {tr['train_tokens_s']:8.0f} tokens/s (batch {args.batch_size}, {args.train_steps} steps)"
    )
    return 0 if ratio >= 3.0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
