"""Benchmark: the tiny policy's SFT (00_policy's recipe on the Hugging Face Trainer) against a naive loop.

The kit trains with :func:`erprm_core.training.train_policy_sft` (batches of ``--batch-size`` examples grouped
by length, right-padded). Its steady-state throughput is timed inside one run (one epoch of ``--warmup +
--steps + 1`` batches): from the start of the step after ``--warmup`` untimed ones to the start of the step
after ``--steps`` timed ones, so the Trainer's start-up is left out; tokens are counted without padding. The
naive baseline is a plain PyTorch loop that trains on one example at a time (batch 1, AdamW step per
example), as simple SFT scripts do. Prints tokens/s of both and the ratio.

Usage: ``python benchmarks/bench_training.py [--steps 30] [--warmup 5] [--batch-size 16] [--threads 1]``
(also run by ``erprm bench`` / ``make bench``): seconds on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

from erprm_core import training  # noqa: E402
from erprm_core.running import bench, numerics  # noqa: E402
from erprm_core.steps import policy_prompt  # noqa: E402
from erprm_core.tasks.arith import generate_problems  # noqa: E402
from erprm_core.tiny_lm import build_tiny_model, build_tokenizer  # noqa: E402

TINY = {"hidden_size": 128, "num_layers": 4, "num_heads": 4, "intermediate_size": 256,
        "max_position_embeddings": 384}  # fmt: skip
"""The tiny profile's policy size (configs/tiny/00_policy.yaml)."""


def problems(n: int, seed: int = 0) -> list[dict]:
    """``n`` arith training problems of the tiny profile's difficulty."""
    return generate_problems(n, seed=seed, min_steps=2, max_steps=6, max_value=99, max_operand=10)


def fresh_model(tokenizer):
    """The tiny profile's policy, freshly initialised (seed 0)."""
    return build_tiny_model(tokenizer, seed=0, **TINY)


def kit_run(tokenizer, records: list[dict], batch_size: int, warmup: int, steps: int) -> tuple[int, float]:
    """(tokens, seconds) of optimizer steps ``warmup + 1 .. warmup + steps`` of ``train_policy_sft``.

    A forward pre-hook on the model stamps the start of each step and counts its tokens (attention mask, so
    no padding); the steps are timed from the start of step ``warmup + 1`` to the start of the step after the
    last timed one, so each timed step's backward and optimizer update are inside the window."""
    model = fresh_model(tokenizer)
    stamps: list[tuple[float, int]] = []

    def stamp(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        stamps.append(
            (time.perf_counter(), int(mask.sum()) if mask is not None else kwargs["input_ids"].numel())
        )

    model.register_forward_pre_hook(stamp, with_kwargs=True)
    with tempfile.TemporaryDirectory() as tmp:
        training.train_policy_sft(
            model, tokenizer, records, tmp, max_steps=warmup + steps + 1, lr=3e-3, batch_size=batch_size,
            max_length=TINY["max_position_embeddings"], warmup_ratio=0.03, logging_steps=1000, save=False,
            disable_tqdm=True,
        )  # fmt: skip
    if len(stamps) != warmup + steps + 1:
        raise RuntimeError(f"expected {warmup + steps + 1} forward passes, saw {len(stamps)}")
    timed = stamps[warmup : warmup + steps + 1]
    return sum(n for _, n in timed[:-1]), timed[-1][0] - timed[0][0]


def naive(tokenizer, records: list[dict], warmup: int) -> tuple[int, float]:
    """(tokens, seconds) of a plain loop training on one example at a time; the first ``warmup`` untimed."""
    model = fresh_model(tokenizer).train()
    model.config.use_cache = False
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = [
        training.tokenize_sft_example(tokenizer, policy_prompt(r["question"]), r["solution"]) for r in records
    ]
    tokens, start = 0, time.perf_counter()
    for i, d in enumerate(data):
        if i == warmup:
            tokens, start = 0, time.perf_counter()
        ids, labels = torch.tensor([d["input_ids"]]), torch.tensor([d["labels"]])
        model(input_ids=ids, labels=labels).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        tokens += len(d["input_ids"])
    return tokens, time.perf_counter() - start


def main() -> int:
    """Time both, print tokens/s and the ratio; with ``--json`` write the figures for ``erprm bench``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed optimizer steps first")
    parser.add_argument("--batch-size", type=int, default=16, help="00_policy's batch size (tiny profile)")
    parser.add_argument("--naive-examples", type=int, default=96, help="examples the naive loop trains on")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch default)")
    parser.add_argument("--json", help="also write the figures (erprm bench reads them) to this file")
    parser.add_argument("--quick", action="store_true", help="a few steps only (tests): seconds")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup, args.batch_size, args.naive_examples = 2, 1, 4, 6
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        numerics.set_cpu_threads(args.threads)  # as the stages do (MKL on one thread under the pins)
    tok = build_tokenizer(max_number=99, model_max_length=TINY["max_position_embeddings"])
    records = problems((args.warmup + args.steps + 1) * args.batch_size)
    kit_tokens, kit_s = kit_run(tok, records, args.batch_size, args.warmup, args.steps)
    naive_tokens, naive_s = naive(
        tok, records[: args.naive_examples], warmup=min(4, args.naive_examples // 2)
    )
    kit_rate, naive_rate = kit_tokens / kit_s, naive_tokens / naive_s
    print(f"policy SFT (tiny, batch {args.batch_size}, {args.steps} steps after {args.warmup}, "
          f"torch threads {torch.get_num_threads()})")  # fmt: skip
    print(f"kit recipe (Trainer): {kit_tokens:7d} tokens in {kit_s:6.2f} s = {kit_rate:8.0f} tokens/s")
    print(f"naive loop (batch 1): {naive_tokens:7d} tokens in {naive_s:6.2f} s = {naive_rate:8.0f} tokens/s")
    print(f"ratio (kit / naive tokens/s): {kit_rate / naive_rate:.1f}x")
    if args.json:
        lengths = [len(training.tokenize_sft_example(tok, policy_prompt(r["question"]), r["solution"])["input_ids"])
                   for r in records]  # fmt: skip
        figures = {
            "tokens_per_s": kit_rate, "naive_tokens_per_s": naive_rate, "ratio": kit_rate / naive_rate,
            "baseline": "plain loop, batch 1", "tokens": kit_tokens, "seconds": kit_s, "steps": args.steps,
            "batch_size": args.batch_size, "training": True, "head_per_token": True,
            "context": bench.mean_context(lengths), **bench.model_dims(fresh_model(tok)),
        }  # fmt: skip
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
