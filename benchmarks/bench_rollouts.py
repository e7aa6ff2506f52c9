"""Benchmark: the kit's rollout sampler against a naive per-prefix ``generate`` loop, same policy and prefixes.

The kit (:class:`erprm_core.generation.HFSampler`) batches the step prefixes of many solutions together (left
padding), runs each prefix ONCE and copies its KV cache to its ``k`` completions, and drops finished rows.
The naive loop, what most released rollout scripts do, calls ``model.generate(prefix, num_return_sequences=k)``
once per prefix: the prefix is run k times and nothing is batched across prefixes. Both stop a completion at
EOS or at its complete answer line, sample at temperature 1.0 / top_p 1.0, and count only the tokens up to
each completion's stop. Prints completion tokens/s of both and the ratio (target >= 3x), then the tiny
profile's recorded rollout token count and wall time if its manifest exists.

The policy is the tiny profile's trained policy if present (else smoke's), else a random tiny Llama of the
tiny size (its completions run to the token limit, which is still a fair comparison of the two loops).

Usage: ``python benchmarks/bench_rollouts.py [--prefixes 32] [--k 8] [--max-new-tokens 64] [--threads 1]
[--repeats 2]``
(also run by ``erprm bench`` / ``make bench``). Small defaults: well under 2 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

from erprm_core import models, rollouts  # noqa: E402
from erprm_core.generation import HFSampler  # noqa: E402
from erprm_core.running import artifacts, bench, numerics  # noqa: E402
from erprm_core.sampler import cut_at_answer_line  # noqa: E402
from erprm_core.steps import split_steps  # noqa: E402
from erprm_core.tasks.arith import generate_problems  # noqa: E402
from erprm_core.tiny_lm import build_tiny_model, build_tokenizer


def load_policy():
    """(model, tokenizer, description): a trained profile policy if one exists, else a random tiny Llama."""
    for profile in ("tiny", "smoke"):
        folder = artifacts.paths(profile).policy
        if (folder / "config.json").is_file():
            model, tok = models.load_causal_lm(folder, device="cpu", dtype="float32")
            return model, tok, f"{profile} policy ({models.count_parameters(model):,} parameters)"
    tok = build_tokenizer(max_number=99)
    model = build_tiny_model(tok, hidden_size=128, num_layers=4, num_heads=4, intermediate_size=256).eval()
    return (
        model,
        tok,
        f"random tiny Llama ({models.count_parameters(model):,} parameters; no trained policy found)",
    )


def prefixes(n: int, seed: int = 0) -> list[str]:
    """``n`` step prefixes (question + first steps + newline) of arith reference solutions, as in 01_rollouts."""
    out: list[str] = []
    for p in generate_problems(n, seed=seed, max_value=99, max_operand=10):
        steps = split_steps(p["solution"])
        out += [rollouts.completion_prefix(p["question"], steps, i) for i in range(len(steps) - 1)]
    return out[:n]


class AnswerLineStop:
    """Per-row stopping criterion for ``generate``: a row is done once it wrote a complete answer line.

    Only rows whose last token holds a newline are decoded, so the naive loop is not slowed by the check.
    """

    def __init__(self, tokenizer, prompt_len: int):
        self.tokenizer = tokenizer
        self.prompt_len = prompt_len
        self.newline = {
            i for i, t in enumerate(tokenizer.batch_decode([[i] for i in range(len(tokenizer))])) if "\n" in t
        }
        self.done: list[bool] | None = None

    def __call__(self, input_ids, scores, **kwargs):
        """One bool per row: True once the row's generated text holds a complete answer line."""
        if self.done is None or len(self.done) != input_ids.shape[0]:
            self.done = [False] * input_ids.shape[0]
        for b, last in enumerate(input_ids[:, -1].tolist()):
            if not self.done[b] and last in self.newline:
                text = self.tokenizer.decode(input_ids[b, self.prompt_len :], skip_special_tokens=True)
                self.done[b] = cut_at_answer_line(text) is not None
        return torch.tensor(self.done, device=input_ids.device)


def count_until_stop(tokenizer, row: list[int], eos: int, pad: int) -> int:
    """Tokens of one generated row up to its stop (EOS included, or the token closing the answer line)."""
    n = 0
    for n, tok in enumerate(row, start=1):
        if tok == eos:
            return n
        if tok == pad:
            return n - 1
        text = tokenizer.decode(row[:n], skip_special_tokens=True)
        if "\n" in tokenizer.decode([tok]) and cut_at_answer_line(text) is not None:
            return n
    return n


@torch.inference_mode()
def naive(model, tokenizer, texts: list[str], k: int, max_new_tokens: int, seed: int) -> int:
    """One ``generate`` call per prefix with ``num_return_sequences=k``; returns completion tokens."""
    from transformers import StoppingCriteriaList

    torch.manual_seed(seed)
    total = 0
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    for text in texts:
        ids = tokenizer(text, return_tensors="pt").input_ids
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=True,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            max_new_tokens=max_new_tokens,
            num_return_sequences=k,
            pad_token_id=pad,
            eos_token_id=eos,
            stopping_criteria=StoppingCriteriaList([AnswerLineStop(tokenizer, ids.shape[1])]),
        )
        total += sum(count_until_stop(tokenizer, row, eos, pad) for row in out[:, ids.shape[1] :].tolist())
    return total


def kit(model, tokenizer, texts: list[str], k: int, max_new_tokens: int, seed: int, batch_size: int) -> int:
    """The kit's sampler over all prefixes at once; returns completion tokens."""
    sampler = HFSampler(model, tokenizer, batch_size=batch_size)
    gens = sampler.generate(
        texts, k, [("bench", i) for i in range(len(texts))], seed, 1.0, 1.0, max_new_tokens
    )
    return sum(g.n_tokens for per in gens for g in per)


def main() -> None:
    """Run both loops and print tokens/s and the ratio."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prefixes", type=int, default=32, help="step prefixes to complete")
    parser.add_argument("--k", type=int, default=8, help="completions per prefix")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="token limit of a completion")
    parser.add_argument(
        "--batch-size", type=int, default=128, help="kit: sequences decoded together (tiny config)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch default)")
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds; the best of each is reported")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the figures (erprm bench reads them) to this file")
    parser.add_argument(
        "--quick", action="store_true", help="a few tokens only (tests): seconds, not minutes"
    )
    args = parser.parse_args()
    if args.quick:
        args.prefixes, args.k, args.max_new_tokens, args.repeats = 4, 2, 8, 1
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        numerics.set_cpu_threads(args.threads)  # as the stages do (MKL on one thread under the pins)
    model, tok, what = load_policy()
    texts = prefixes(args.prefixes, args.seed)
    print(f"policy: {what}; {len(texts)} prefixes x k={args.k}, max_new_tokens={args.max_new_tokens}, "
          f"torch threads {torch.get_num_threads()}")  # fmt: skip
    kit(model, tok, texts[:2], 2, 4, args.seed, args.batch_size)  # warm-up

    kit_times, naive_times = [], []
    for _ in range(args.repeats):  # interleaved, best of each: the machine may be shared
        t = time.perf_counter()
        kit_tokens = kit(model, tok, texts, args.k, args.max_new_tokens, args.seed, args.batch_size)
        kit_times.append(time.perf_counter() - t)
        t = time.perf_counter()
        naive_tokens = naive(model, tok, texts, args.k, args.max_new_tokens, args.seed)
        naive_times.append(time.perf_counter() - t)
    kit_s, naive_s = min(kit_times), min(naive_times)

    kit_rate, naive_rate = kit_tokens / kit_s, naive_tokens / naive_s
    print(f"kit sampler : {kit_tokens:7d} completion tokens in {kit_s:6.2f} s = {kit_rate:8.0f} tokens/s")
    print(
        f"naive loop  : {naive_tokens:7d} completion tokens in {naive_s:6.2f} s = {naive_rate:8.0f} tokens/s"
    )
    print(f"ratio (kit / naive tokens/s): {kit_rate / naive_rate:.1f}x (target >= 3x)")
    if args.json:
        prompt = sum(len(tok(t).input_ids) for t in texts) / len(texts)
        completion = kit_tokens / (len(texts) * args.k)
        figures = {
            "tokens_per_s": kit_rate, "naive_tokens_per_s": naive_rate, "ratio": kit_rate / naive_rate,
            "baseline": "one generate() per prefix", "tokens": kit_tokens, "seconds": kit_s,
            "training": False, "head_per_token": True, "context": prompt + (completion + 1) / 2,
            "mean_prompt_tokens": prompt, "mean_completion_tokens": completion, "policy": what,
            **bench.model_dims(model),
        }  # fmt: skip
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)

    stage = artifacts.load_manifest("tiny").get("stages", {}).get("01_rollouts")
    if stage:
        tokens = stage.get("solution_tokens", 0) + stage.get("completion_tokens", 0)
        print(
            f"tiny profile 01_rollouts: {tokens:,} generated tokens ({stage.get('completions', '?')} completions) "
            f"in {stage.get('wall_s', float('nan')):.1f} s of sampling"
        )
    else:
        print(
            "tiny profile 01_rollouts: no manifest entry yet (run `erprm reproduce --profile tiny --to 01`)"
        )


if __name__ == "__main__":
    main()
