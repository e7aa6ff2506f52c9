"""What the pinned CPU numerics cost: the tiny model's training, sampling and scoring, pinned vs default.

Each measurement runs in a fresh process (the kernel path is fixed at a process's first tensor operation),
alternating the two levels (default, portable, default, portable, ...) so that load from other processes on a
shared machine falls on both alike. Prints tokens/s per workload and level and the ratio pinned / default
(1.0 = free; below 1 = the pin slows it down). Level ``portable`` runs MKL's SSE2 branch on one thread, the
price of the same bits on Intel and AMD (REPRODUCING.md, "Same bits on Intel and AMD").

    python benchmarks/bench_numerics.py [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap

from erprm_core.running.numerics import PIN_VARIABLES, pin_environment

CHILD = textwrap.dedent(
    """
    import json, sys, time
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from erprm_core.running import numerics

    numerics.set_cpu_threads(int(sys.argv[1]))  # as the stages do: under the pins, MKL on one thread
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=640, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=384,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg)
    out = {"capability": str(torch.backends.cpu.get_cpu_capability())}

    ids = torch.randint(3, 640, (16, 200))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for i in range(23):  # 3 warm-up steps, then 20 timed
        if i == 3:
            t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    out["training"] = 20 * ids.numel() / (time.perf_counter() - t0)

    model.eval()
    prompts = torch.randint(3, 640, (64, 40))
    with torch.no_grad():
        model.generate(prompts[:8], do_sample=True, max_new_tokens=4, min_new_tokens=4)
        t0 = time.perf_counter()
        model.generate(prompts, do_sample=True, max_new_tokens=64, min_new_tokens=64, top_k=0)
        out["sampling"] = 64 * 64 / (time.perf_counter() - t0)

        batch = torch.randint(3, 640, (32, 256))
        model(input_ids=batch)
        t0 = time.perf_counter()
        for _ in range(5):
            model(input_ids=batch)
        out["scoring"] = 5 * batch.numel() / (time.perf_counter() - t0)
    print(json.dumps(out))
    """
)


def measure(level: str, threads: int) -> dict:
    """One fresh process at pin level ``level``: tokens/s of training, sampling and scoring."""
    env = {k: v for k, v in os.environ.items() if k not in PIN_VARIABLES}
    env.update(pin_environment(level))
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(threads)], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    """Alternate default and pinned processes, then print medians and ratios."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {"default": [], "portable": []}
    for _ in range(args.repeats):
        for level in runs:
            runs[level].append(measure(level, args.threads))
    print(
        f"pinned numerics (portable) vs library defaults, {args.threads} thread(s), {args.repeats} runs each"
    )
    print(
        f"kernel level: default={runs['default'][0]['capability']}, portable={runs['portable'][0]['capability']}"
    )
    for workload in ("training", "sampling", "scoring"):
        med = {lvl: statistics.median(r[workload] for r in rs) for lvl, rs in runs.items()}
        print(
            f"  {workload:9s} default {med['default']:9.0f} tok/s   portable {med['portable']:9.0f} tok/s   "
            f"ratio portable/default {med['portable'] / med['default']:.2f}"
        )


if __name__ == "__main__":
    main()
