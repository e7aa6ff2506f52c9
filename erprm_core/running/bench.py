"""``erprm bench``: each workload's throughput, its ratio to a naive baseline, and its model FLOP utilisation.

The run first measures this machine's float32 matmul peak with the pinned numerics and the thread count the
stages use (:mod:`erprm_core.running.numerics`): matmuls of the tiny model's and SmolLM2-135M's shapes (rows
= batch x tokens) and one large square matmul; the best of them, over a measurement before and one after
the workloads (the machine may be shared), is the peak. Then each workload script
``benchmarks/bench_*.py`` runs in a fresh process with the same pins and threads and writes its figures as
JSON (``--json``); this module adds FLOPs per token and MFU. The SmolLM2 workloads are listed under
``skipped`` when its package is not installed. With more than one thread, each workload runs a
second time as the CPU stages run their independent units (:mod:`erprm_core.running.workers`): that many
one-thread copies at once, their tokens/s summed, reported under ``in_workers`` (tokens/s, ratio, MFU).

Model FLOPs per token (Kaplan et al. 2020, the convention of PaLM's MFU): ``2 N`` for a forward token and
``6 N`` for a training token (forward + backward), plus attention ``2 x n_layers x context x hidden`` per
forward token (x3 for training), where ``context`` is the mean number of positions a token attends to (causal
attention: a token at position p attends to p + 1). ``N`` counts the parameters whose matmuls run for every
token: the transformer blocks (attention and MLP projections, norms), plus the LM head (hidden x vocab, tied to
the embedding in the tiny model) where the workload applies it at every token (sampling, training). PRM
scoring applies the head only at the step tags (``logits_to_keep``), so its N is the blocks alone. The input
embedding is a lookup, not a matmul, and is never counted. MFU = FLOPs per token x tokens/s / peak.

>>> flops_per_token(1000, 0, n_layers=2, context=10, hidden=8, training=False)
2320
>>> round(mfu(2320, 1e6, 10.0), 3)  # 2.32 GFLOP/s of a 10 GFLOP/s peak
0.232
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from erprm_core import io
from erprm_core.running import artifacts, numerics

log = logging.getLogger(__name__)

WORKLOADS = {
    "sampling": ("bench_rollouts.py",), "scoring": ("bench_scoring.py",), "training": ("bench_training.py",),
    "smollm2-scoring": ("bench_smollm2.py", "--workload", "scoring"),
    "smollm2-training": ("bench_smollm2.py", "--workload", "training"),
    "smollm2-sampling": ("bench_smollm2.py", "--workload", "sampling"),
}  # fmt: skip
"""Workload name -> its script under benchmarks/ and the script's arguments (each writes its figures with
``--json FILE``, or ``{"skipped": why}`` when its model is not installed)."""

IN_WORKERS = ("sampling", "scoring", "training")
"""The workloads also run as the CPU stages run their units (one-thread copies at once): the tiny model's."""

EXTRA_SCRIPTS = ("bench_numerics.py",)
"""Scripts run only when named (``erprm bench numerics``): they measure something else than one workload."""

PIN_LEVEL = "portable"
"""The numerics the CPU profiles' stages run with (``cpu_numerics: portable``); the bench runs with the same."""

ROWS = 2048
"""Rows of the model-shaped matmuls: batch x tokens (16 sequences of 128 tokens)."""

PEAK_SHAPES = {
    "qkvo 2048x128 @ 128x128": (ROWS, 128, 128),
    "mlp-up 2048x128 @ 128x256": (ROWS, 128, 256),
    "mlp-down 2048x256 @ 256x128": (ROWS, 256, 128),
    "smollm2-qkvo 2048x576 @ 576x576": (ROWS, 576, 576),
    "smollm2-mlp-up 2048x576 @ 576x1536": (ROWS, 576, 1536),
    "smollm2-mlp-down 2048x1536 @ 1536x576": (ROWS, 1536, 576),
    "square 2048x2048 @ 2048x2048": (2048, 2048, 2048),
}
"""Matmul shapes (m, k, n) of the peak measurement: the tiny model's and SmolLM2-135M's projections, and a
large square one."""


def flops_per_token(
    n_block_params: int, n_head_params: int, *, n_layers: int, context: float, hidden: int, training: bool
) -> float:
    """Model FLOPs of one token: ``2 N`` (forward) or ``6 N`` (training), N = blocks + head, plus attention
    ``2 x n_layers x context x hidden`` (x3 for training). Pass ``n_head_params=0`` when the LM head does not
    run at every token."""
    n = n_block_params + n_head_params
    forward = 2 * n + 2 * n_layers * context * hidden
    return 3 * forward if training else forward


def mfu(flops_per_tok: float, tokens_per_s: float, peak_gflops: float) -> float:
    """Model FLOP utilisation: ``flops_per_tok x tokens_per_s`` as a fraction of ``peak_gflops`` (GFLOP/s)."""
    return flops_per_tok * tokens_per_s / (peak_gflops * 1e9)


def model_dims(model: Any) -> dict[str, int]:
    """Parameter counts and sizes of a Hugging Face causal LM: ``block_params`` (every parameter but the input
    embedding and LM head), ``head_params`` (hidden x vocab), ``n_layers``, ``hidden``, ``vocab``."""
    params = {id(p): p for p in model.parameters()}
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    outside = {id(embed), id(head)}
    return {
        "block_params": sum(p.numel() for k, p in params.items() if k not in outside),
        "head_params": int(head.numel()),
        "n_layers": int(model.config.num_hidden_layers),
        "hidden": int(model.config.hidden_size),
        "vocab": int(head.shape[0]),
    }


def mean_context(lengths: list[int]) -> float:
    """Mean positions attended per token over causal sequences of ``lengths`` tokens: sum L(L+1)/2 / sum L.

    >>> mean_context([1, 3])
    1.75
    """
    return sum(n * (n + 1) / 2 for n in lengths) / max(1, sum(lengths))


def matmul_peak(threads: int, min_time_s: float = 0.3, repeats: int = 3) -> dict[str, float]:
    """GFLOP/s of each :data:`PEAK_SHAPES` matmul (float32, ``threads`` threads; the best of ``repeats`` timed
    rounds of at least ``min_time_s`` each). Run it in a process whose numerics are already pinned."""
    import torch

    numerics.set_cpu_threads(threads)
    gen = torch.Generator().manual_seed(0)
    out = {}
    for name, (m, k, n) in PEAK_SHAPES.items():
        a, b = torch.randn(m, k, generator=gen), torch.randn(k, n, generator=gen)
        c = torch.empty(m, n)
        torch.mm(a, b, out=c)  # warm-up
        t = time.perf_counter()
        torch.mm(a, b, out=c)
        reps = max(1, int(min_time_s / max(time.perf_counter() - t, 1e-6)))
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            for _ in range(reps):
                torch.mm(a, b, out=c)
            best = min(best, (time.perf_counter() - t) / reps)
        out[name] = 2 * m * k * n / best / 1e9
    return out


def _pinned_env(threads: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in numerics.PIN_VARIABLES}
    env.update(numerics.pin_environment(PIN_LEVEL))
    env.update(HF_HUB_OFFLINE=env.get("HF_HUB_OFFLINE", "1"), TQDM_DISABLE="1", OMP_NUM_THREADS=str(threads))
    return env


def _measure_peak(threads: int, quick: bool) -> dict[str, float]:
    """:func:`matmul_peak` in a fresh pinned process."""
    code = (
        "import json, sys; from erprm_core.running import bench; "
        f"print(json.dumps(bench.matmul_peak({threads}, {0.05 if quick else 0.3}, {1 if quick else 3})))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=_pinned_env(threads), capture_output=True, text=True, check=True
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _peak_figures(by_shape: dict[str, float]) -> dict[str, Any]:
    """The peak's JSON keys: GFLOP/s per shape, the best model-shaped and square ones, and the best of all."""
    square = [g for name, g in by_shape.items() if name.startswith("square")]
    model = [g for name, g in by_shape.items() if not name.startswith("square")]
    return {
        "peak_by_shape": by_shape,
        "peak_model_shapes_gflops": max(model, default=None),
        "peak_square_gflops": max(square, default=None),
        "peak_gflops": max(by_shape.values()),
    }


def _workload_command(script: tuple[Path | str, ...], threads: int, quick: bool, json_out: Path) -> list[str]:
    """The command line of one workload script and its arguments (plus ``--threads``, ``--json``, ``--quick``)."""
    cmd = [sys.executable, *map(str, script), "--threads", str(threads), "--json", str(json_out)]
    return cmd + (["--quick"] if quick else [])


def _run_workload(
    script: tuple[Path | str, ...], threads: int, quick: bool, json_out: Path
) -> dict[str, Any] | None:
    """Run one workload script; its figures, or None if it failed."""
    cmd = _workload_command(script, threads, quick, json_out)
    rc = subprocess.run(cmd, cwd=artifacts.repo_root(), env=_pinned_env(threads)).returncode
    if rc != 0 or not json_out.is_file():
        log.error("benchmark %s failed (exit status %s)", " ".join(map(str, script)), rc)
        return None
    return json.loads(json_out.read_text())


def _run_workload_in_workers(
    script: tuple[Path | str, ...], workers: int, quick: bool, tmp: Path
) -> dict[str, Any] | None:
    """The workload as the CPU stages run their units (:mod:`erprm_core.running.workers`): ``workers``
    one-thread copies of the script at once. Their figures with ``tokens_per_s`` summed over the copies (the
    machine's throughput) and ``ratio`` = summed kit / summed naive tokens/s; None if a copy failed."""
    outs = [tmp / f"{Path(script[0]).stem}-worker{i}.json" for i in range(workers)]
    cmds = [_workload_command(script, 1, quick, o) for o in outs]
    procs = [subprocess.Popen(c, cwd=artifacts.repo_root(), env=_pinned_env(1)) for c in cmds]
    if any(p.wait() != 0 for p in procs) or not all(o.is_file() for o in outs):
        log.error("benchmark %s in %d one-thread processes failed", script[0], workers)
        return None
    copies = [json.loads(o.read_text()) for o in outs]
    kit = sum(c["tokens_per_s"] for c in copies)
    naive = sum(c["tokens_per_s"] / c["ratio"] for c in copies if c.get("ratio"))
    return {**copies[0], "tokens_per_s": kit, "ratio": kit / naive if naive else None, "processes": workers}


def summarise(figures: dict[str, Any], peak_gflops: float) -> dict[str, Any]:
    """A workload's JSON entry from its script's figures: adds ``flops_per_token``, ``n_params_counted``,
    ``achieved_gflops`` and ``mfu`` (the script gives ``tokens_per_s``, ``ratio``, ``block_params``,
    ``head_params``, ``head_per_token``, ``n_layers``, ``hidden``, ``context`` and ``training``; and
    ``flop_tokens_per_s`` where the kit computes fewer tokens than it serves, e.g. a question shared by its
    candidates: MFU counts the computed ones)."""
    head = figures["head_params"] if figures["head_per_token"] else 0
    fpt = flops_per_token(
        figures["block_params"], head, n_layers=figures["n_layers"], context=figures["context"],
        hidden=figures["hidden"], training=figures["training"],
    )  # fmt: skip
    computed = figures.get("flop_tokens_per_s", figures["tokens_per_s"])
    return {
        **figures,
        "n_params_counted": figures["block_params"] + head,
        "flops_per_token": fpt,
        "achieved_gflops": fpt * computed / 1e9,
        "mfu": mfu(fpt, computed, peak_gflops),
    }


def _print_report(result: dict[str, Any]) -> None:
    """The bench's figures as text."""
    print(f"\nmatmul peak (float32, cpu_numerics={PIN_LEVEL}, {result['threads']} thread(s)):")
    for name, g in result["peak_by_shape"].items():
        print(f"  {name:30s} {g:8.1f} GFLOP/s")
    print(
        f"  peak = best of model shapes ({result['peak_model_shapes_gflops']:.1f}) and square "
        f"({result['peak_square_gflops']:.1f}), measured before and after the workloads: "
        f"{result['peak_gflops']:.1f} GFLOP/s"
    )
    print(
        "model FLOPs per token: 2N forward / 6N training, N = transformer blocks + LM head where it runs at"
    )
    print("every token (sampling, training; scoring runs it only at step tags: N = blocks), plus attention")
    print("2 x n_layers x context x hidden (x3 training), context = mean positions attended per token")
    for name, w in result["workloads"].items():
        ratio = "  n/a" if w.get("ratio") is None else f"{w['ratio']:5.1f}x"
        print(
            f"  {name:9s} {w['tokens_per_s']:9.0f} tokens/s  ratio {ratio} vs {w.get('baseline', 'baseline')}"
            f"  | N={w['n_params_counted']:,} context={w['context']:.1f} -> {w['flops_per_token'] / 1e6:.2f} "
            f"MFLOP/token, {w['achieved_gflops']:.1f} GFLOP/s, MFU {100 * w['mfu']:.1f}%"
        )
    for name, why in result.get("skipped", {}).items():
        print(f"  {name:9s} skipped: {why}")
    staged = {n: w for n, w in result["workloads"].items() if w.get("in_workers")}
    if staged:
        print(f"as the CPU stages run their units: {result['threads']} one-thread processes at once (summed)")
    for name, w in staged.items():
        s = w["in_workers"]
        ratio = "  n/a" if s.get("ratio") is None else f"{s['ratio']:5.1f}x"
        print(
            f"  {name:9s} {s['tokens_per_s']:9.0f} tokens/s  ratio {ratio}  | {s['achieved_gflops']:.1f} GFLOP/s, "
            f"MFU {100 * s['mfu']:.1f}%, {s['tokens_per_s'] / w['tokens_per_s']:.2f}x one {result['threads']}-thread process"
        )


def run(names: list[str] | None = None, json_path: str | Path | None = None, *, threads: int = 0,
        quick: bool = False) -> int:  # fmt: skip
    """Measure the peak, run the workloads (all of :data:`WORKLOADS`, or those named in ``names`` by their
    name, its prefix before "-" such as "smollm2", or their script; :data:`EXTRA_SCRIPTS` only when named),
    print the report and write ``json_path``.

    ``threads=0`` follows the stages' rule (the usable cores, at most ``numerics.MAX_PINNED_THREADS``);
    ``quick`` shrinks every workload to seconds (for tests; the figures then mean little). Returns the number
    of scripts that failed."""
    bench_dir = artifacts.repo_root() / "benchmarks"
    if threads <= 0:
        threads = min(numerics.set_cpu_threads(0), numerics.MAX_PINNED_THREADS)
    start = time.perf_counter()
    result: dict[str, Any] = {"threads": threads, "cpu_numerics": PIN_LEVEL, "quick": quick, "workloads": {}}
    result.update(_peak_figures(_measure_peak(threads, quick)))
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name, (script, *script_args) in WORKLOADS.items():
            if names and not any(n == name or name.startswith(f"{n}-") or n in script for n in names):
                continue
            log.info("benchmark %s (%s)", name, " ".join([script, *script_args]))
            command = (bench_dir / script, *script_args)
            figures = _run_workload(command, threads, quick, Path(tmp) / f"{name}.json")
            if figures is None:
                failed += 1
                continue
            if "skipped" in figures:
                result.setdefault("skipped", {})[name] = figures["skipped"]
                continue
            result["workloads"][name] = summarise(figures, result["peak_gflops"])
            if threads > 1 and name in IN_WORKERS:
                staged = _run_workload_in_workers(command, threads, quick, Path(tmp))
                if staged is not None:
                    result["workloads"][name]["in_workers"] = staged
    for script in EXTRA_SCRIPTS:
        if names and any(n in script for n in names):
            failed += (
                subprocess.run([sys.executable, str(bench_dir / script)], cwd=bench_dir.parent).returncode
                != 0
            )
    if result[
        "workloads"
    ]:  # again after the workloads: on a shared machine the best of both is nearer the peak
        again = _measure_peak(threads, quick)
        result.update(
            _peak_figures({k: max(v, again.get(k, 0.0)) for k, v in result["peak_by_shape"].items()})
        )
        for name, w in result["workloads"].items():
            result["workloads"][name] = summarise(w, result["peak_gflops"])
    for w in result["workloads"].values():
        if w.get("in_workers"):
            w["in_workers"] = summarise(w["in_workers"], result["peak_gflops"])
    result["wall_s"] = time.perf_counter() - start
    _print_report(result)
    print(f"bench wall time {result['wall_s']:.0f} s")
    if json_path:
        io.atomic_write_json(json_path, result)
    return failed
