"""Find the first tensor operation whose bits differ between two hosts (or two pin levels).

Runs a short prefix of the tiny policy's SFT (00_policy's recipe: the tiny tokenizer and Llama, the kit's
``train_policy_sft`` on the Hugging Face Trainer, AdamW, the tiny profile's sizes) under a
``TorchDispatchMode`` that hashes every ATen operation's outputs in call order, and writes the trace. Two
traces from two machines are compared op by op; the first differing operation names the kernel to blame.

    python -m research.numerics_trace run --level avx2 --steps 3 --out trace-amd.jsonl
    python -m research.numerics_trace compare trace-amd.jsonl trace-intel.jsonl

On one machine, other CPUs can be stood in for by QEMU's user-mode emulator, which reports another vendor's
CPUID to the libraries (``qemu-x86_64 -cpu Haswell-v4 .venv/bin/python -m research.numerics_trace ...``):
MKL picks its code path from CPUID. QEMU computes the approximate instructions ``rcpps``/``rsqrtps`` exactly,
where each vendor's hardware has its own tables, so a kernel that uses them shows up as a difference between
the native run and an emulated run of the same vendor (docs: REPRODUCING.md, "Same bits on Intel and AMD").
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

UNINITIALISED = frozenset({"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"})
"""Operations whose output is memory not yet written: not compared."""


def _digest(value) -> str | None:
    import torch

    if isinstance(value, torch.Tensor):
        if value.layout != torch.strided or value.device.type != "cpu":
            return None
        data = value.detach().contiguous()
        if data.dtype == torch.bfloat16:
            data = data.view(torch.int16)
        return hashlib.sha1(data.numpy().tobytes()).hexdigest()[:16]
    if isinstance(value, (list, tuple)):
        parts = [_digest(v) for v in value]
        parts = [p for p in parts if p]
        return hashlib.sha1("".join(parts).encode()).hexdigest()[:16] if parts else None
    return None


def trace_training(level: str, steps: int, threads: int, out: Path) -> int:
    """Train the tiny policy for ``steps`` optimizer steps at pin level ``level``; write one JSON line per
    ATen operation (index, name, output digest) to ``out``; return the number of operations."""
    from erprm_core.running import numerics

    numerics.configure(level, threads)  # before the first tensor operation of this process

    from torch.utils._python_dispatch import TorchDispatchMode

    from erprm_core import tasks, tiny_lm, training

    problems = tasks.load_problems("arith", "train", 16 * steps, 0, None, min_steps=2, max_steps=6)
    tokenizer = tiny_lm.build_tokenizer(max_number=99, model_max_length=384)
    model = tiny_lm.build_tiny_model(
        tokenizer,
        hidden_size=128,
        num_layers=4,
        num_heads=4,
        intermediate_size=256,
        max_position_embeddings=384,
    )
    records: list[dict] = []

    class Hasher(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            # an in-place operation that returns nothing (the fused AdamW step) is judged by what it wrote
            digest = _digest(result) if result is not None else _digest(args[:1])
            if digest is not None and func.overloadpacket.__name__ not in UNINITIALISED:
                records.append({"i": len(records), "op": str(func.overloadpacket.__name__), "h": digest})
            return result

    with Hasher():
        training.train_policy_sft(
            model, tokenizer, problems, out.parent / ".trace-model", max_steps=steps, lr=3e-3, batch_size=16,
            max_length=384, warmup_ratio=0.03, logging_steps=1, save=False, disable_tqdm=True,
        )  # fmt: skip
    weights = hashlib.sha1(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
    host = numerics.describe()
    with open(out, "w") as f:
        f.write(json.dumps({"host": host, "level": level, "steps": steps, "weights": weights}) + "\n")
        for r in records:
            f.write(json.dumps(r) + "\n")
    print(f"{len(records)} operations traced; weights sha1 {weights[:16]}; {host['cpu_model']}")
    return len(records)


def first_difference(a: Path, b: Path) -> dict | None:
    """The first operation whose output digest differs between traces ``a`` and ``b`` (None: identical)."""
    la, lb = Path(a).read_text().splitlines(), Path(b).read_text().splitlines()
    for ra, rb in zip(la[1:], lb[1:], strict=False):
        x, y = json.loads(ra), json.loads(rb)
        if x["op"] in UNINITIALISED:
            continue
        if x["op"] != y["op"]:
            return {"i": x["i"], "op": f"{x['op']} vs {y['op']} (the op sequence differs)"}
        if x["h"] != y["h"]:
            ops = [json.loads(r)["op"] for r in la[max(1, x["i"] - 4) : x["i"] + 1]]
            return {"i": x["i"], "op": x["op"], "before": ops[:-1], "of": len(la) - 1}
    if len(la) != len(lb):
        return {"i": min(len(la), len(lb)) - 1, "op": "(one trace is longer)"}
    return None


def main(argv: list[str] | None = None) -> None:
    """Command line: ``run`` writes a trace, ``compare`` prints the first differing operation."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run")
    run.add_argument("--level", default="avx2")
    run.add_argument("--steps", type=int, default=3)
    run.add_argument("--threads", type=int, default=1)
    run.add_argument("--out", type=Path, required=True)
    cmp = sub.add_parser("compare")
    cmp.add_argument("a", type=Path)
    cmp.add_argument("b", type=Path)
    args = parser.parse_args(argv)
    if args.cmd == "run":
        trace_training(args.level, args.steps, args.threads, args.out)
        return
    diff = first_difference(args.a, args.b)
    heads = [json.loads(Path(p).read_text().splitlines()[0]) for p in (args.a, args.b)]
    print("weights:", "identical" if heads[0]["weights"] == heads[1]["weights"] else "differ")
    print("first differing operation:", json.dumps(diff) if diff else "none")
    sys.exit(0 if diff is None else 1)


if __name__ == "__main__":
    main()
