"""SmolLM2-135M as the paper's PRM on the tiny task, on validation problems: fine-tuned variants against zero-shot likelihoods.

Every measurement is one JSON line in ``research/results/smollm2_prm.jsonl`` (its ``name`` is the key: a
rerun replaces its line), with the config, the command that reproduces it and its compute time.

    python -m research.tiny_validation pool --problems 100 --candidates 16    # the validation pool, first
    python -m research.smollm2_prm baselines                                  # random, likelihoods, zero-shot tags
    python -m research.smollm2_prm train --labels er_1 --layers upper10 --epochs 2 --lr 5e-5
    python -m research.smollm2_prm train --labels truth --layers all --epochs 2 --lr 2e-5
    python -m research.smollm2_prm speed --layers all --n-train 32            # seconds per step, no result line

Training data: the pipeline's labelled rollouts (``runs/<profile>/labels.jsonl``, 02_labels: 128 train_prm
problems x 8 solutions of the tiny policy), the first ``--n-train`` of them, with the step labels of
``--labels``: ``truth`` (:func:`erprm_core.tasks.arith_truth.step_correctness`: 1 before the first wrong step,
0 from it) or a 02 rule (``er_1``, ``hard``, ``soft``, ...). The recipe is the kit's
:func:`erprm_core.training.train_prm` (soft-label cross-entropy on " +" / " -" at the step tags, AdamW,
cosine schedule, float32) on SmolLM2 (``erprm_core.models.load_causal_lm("smollm2-135m")``) with all
parameters trained (``--layers all``) or the embeddings and the lower layers frozen (``--layers upper10``:
the upper 10 of 30 layers and the final norm train). The PRM is then scored on the pool by
:class:`erprm_core.prm.ProcessRewardModel` (two-token softmax at the tags, min over steps for the headline).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from research import tiny_validation as tv

BASE = "smollm2-135m"


def torch_inference(fn: Any) -> Any:
    """``torch.inference_mode`` applied at call time (torch is imported lazily)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import torch

        with torch.inference_mode():
            return fn(*args, **kwargs)

    return wrapper


RESULTS = Path(__file__).resolve().parent / "results" / "smollm2_prm.jsonl"
AGGREGATIONS = ("min", "last", "prod", "mean")


# --- bookkeeping -------------------------------------------------------------------------------------


def _command() -> str:
    return "python -m research.smollm2_prm " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def write_line(line: dict[str, Any], path: Path = RESULTS) -> None:
    """Replace the line with the same ``name`` in the results file (or append it); print it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []
    lines = [x for x in lines if x.get("name") != line["name"]]
    lines.append(line)
    path.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines))
    print(json.dumps(line, ensure_ascii=False), flush=True)


class Clock:
    """Wall and process CPU seconds of a block."""

    def __enter__(self) -> Clock:
        self.w, self.c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.wall = round(time.perf_counter() - self.w, 1)
        self.cpu = round(time.process_time() - self.c, 1)


def scores_path(profile: str, pool_tag: str, name: str) -> Path:
    """Where the per-candidate scores of one verifier on one pool are kept (git-ignored runs/)."""
    return tv.research_dir(profile) / "scores" / pool_tag / f"{name}.json"


def save_scores(profile: str, pool_tag: str, name: str, values: list[Any]) -> None:
    """Write one score per pool record (pool order)."""
    from erprm_core.io import atomic_write_json

    path = scores_path(profile, pool_tag, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, values)


def load_scores(profile: str, pool_tag: str, name: str) -> np.ndarray | None:
    """The saved scores of a verifier, or None."""
    path = scores_path(profile, pool_tag, name)
    return np.asarray(json.loads(path.read_text()), dtype=float) if path.exists() else None


REFERENCES = ("tiny_policy_likelihood", "smollm2_likelihood_prm_format", "smollm2_likelihood_policy_format")


def paired_with_references(
    records: list[dict], scores: np.ndarray, profile: str, pool_tag: str
) -> dict[str, Any]:
    """Paired (per-problem) differences of pairwise ranking and best-of-16 against the reference scorers whose
    scores are saved (bootstrap over problems)."""
    from erprm_core import evaluators, stats

    ids, correct = tv.outcome_matrix(records)
    pids, outs = [r["problem_id"] for r in records], [r["outcome"] for r in records]
    pw = stats.within_problem_pairwise(pids, outs, scores)
    n = correct.shape[1]
    bon = evaluators.best_of_n_accuracy(scores.reshape(correct.shape), correct, n)
    out: dict[str, Any] = {}
    for ref in REFERENCES:
        other = load_scores(profile, pool_tag, ref)
        if other is None:
            continue
        pw_ref = stats.within_problem_pairwise(pids, outs, other)
        d = stats.paired_bootstrap_diff(pw.to_numpy(), pw_ref.loc[pw.index].to_numpy(), seed=0)
        b = stats.paired_bootstrap_diff(
            bon, evaluators.best_of_n_accuracy(other.reshape(correct.shape), correct, n), seed=0
        )
        out[f"vs_{ref}"] = {
            "pairwise_diff": round(d.diff, 4), "pairwise_diff_ci": [round(d.ci_low, 4), round(d.ci_high, 4)],
            f"bon{n}_diff": round(100 * b.diff, 2), f"bon{n}_diff_ci": [round(100 * b.ci_low, 2), round(100 * b.ci_high, 2)],
        }  # fmt: skip
    return out


def setup(threads: int) -> None:
    """Offline hub, the torch thread count, seed 0."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)


def pool_spec(a: argparse.Namespace) -> dict[str, Any]:
    """The pool a measurement used, as recorded in its line."""
    return {"profile": a.profile, "problems": a.problems, "candidates": a.candidates, "seed": a.pool_seed,
            "temperature": 1.0, "split": "validation (research.tiny_validation.validation_problems)"}  # fmt: skip


def pool_tag(a: argparse.Namespace) -> str:
    """Short name of the pool (folder of its saved scores)."""
    return f"{a.problems}x{a.candidates}_s{a.pool_seed}"


# --- scorers -----------------------------------------------------------------------------------------


def base_folder() -> Path:
    """The converted SmolLM2 folder: the kit's ``runs/models/<name>`` when a finished conversion is there,
    else ``runs/research/models/<name>`` (converted there once), so that the research drivers write nothing
    outside ``runs/research/`` of a runs root they share with a pipeline run."""
    from erprm_core import models
    from erprm_core.running import artifacts

    kit = artifacts.runs_root() / "models"
    if (kit / BASE / models.SOURCE_FILE).is_file():
        return Path(models.resolve_model(BASE, kit))
    return Path(models.resolve_model(BASE, artifacts.runs_root() / "research" / "models"))


def load_base(padding_side: str = "right") -> tuple[Any, Any]:
    """SmolLM2-135M (float32, CPU) and its tokenizer, through the kit's packaged-model loader (the converted
    folder of :func:`base_folder`)."""
    from erprm_core import models

    return models.load_causal_lm(base_folder(), device="cpu", dtype="float32", padding_side=padding_side)


def prm_step_scores(model: Any, tok: Any, records: list[dict], batch_size: int = 16) -> list[list[float]]:
    """P(" +") at each step tag (the kit's scorer, two-token softmax), one list per record. The candidates of
    one question are scored as a prefix tree (``share_prefix="tree"``: the pool's 336k tokens are 47k
    distinct prefixes; scores equal to the unshared ones up to float rounding, tests/test_prm.py)."""
    from erprm_core.prm import ProcessRewardModel

    scorer = ProcessRewardModel(model, tok, name=BASE, share_prefix="tree")
    out = scorer.score_batch([r["question"] for r in records], [r["steps"] for r in records], batch_size)
    bad = {k: v for k, v in scorer.audit.counts.items() if k != "ok"}
    if bad:
        print(f"PRM scoring audit: {bad}", file=sys.stderr)
    return out


@torch_inference
def likelihood_pass(
    model: Any, tok: Any, records: list[dict], fmt: str, rows_per_pass: int = 8
) -> tuple[list[float], list[list[float]] | None]:
    """Per record, the model's mean token log-probability of the solution given the question, as the kit defines
    it (:func:`erprm_core.models.mean_token_logprobs`: prompt encoded with special tokens, continuation without),
    and for ``fmt="prm"`` also P(" +") at each step tag (:class:`erprm_core.prm.ProcessRewardModel`'s two-token
    softmax at the positions of :func:`erprm_core.prm.encode_for_prm`), from ONE forward pass per row.

    ``fmt="prm"``: prompt = question, continuation = ``format_prm_input(question, steps)`` after the question
    (" step_1 ки...step_n ки"); ``fmt="policy"``: prompt = question + newline, continuation = the policy's text.
    The question's tokens run once per problem (KV cache shared by its candidates, as the kit's PRM scorer
    does); the values equal the kit's functions up to float rounding (checked by ``baselines``).
    """
    import torch

    from erprm_core import prm
    from erprm_core.steps import format_prm_input, policy_prompt

    ids = prm.resolve_prm_token_ids(tok)
    keyword = prm._cache_keyword(model)
    means: list[float] = []
    tags: list[list[float]] | None = [] if fmt == "prm" else None
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault(r["problem_id"], []).append(i)
    out_mean: dict[int, float] = {}
    out_tags: dict[int, list[float]] = {}
    for members in groups.values():
        rows = []
        for i in members:
            r = records[i]
            if fmt == "prm":
                prompt, cont = (
                    r["question"],
                    format_prm_input(r["question"], r["steps"])[len(r["question"]) :],
                )
            else:
                prompt, cont = policy_prompt(r["question"]), r["text"]
            p = tok(prompt).input_ids
            full = p + tok(cont, add_special_tokens=False).input_ids
            positions = None
            if fmt == "prm":
                enc = prm.encode_for_prm(tok, r["question"], r["steps"], ids=ids)
                if enc.input_ids != full:
                    raise ValueError(
                        f"{r['problem_id']}: the PRM encoding differs from prompt + continuation tokens"
                    )
                positions = enc.positions
            rows.append((i, full, len(p), positions))
        shared = min(n_p for _, _, n_p, _ in rows) - 1
        first = rows[0][1]
        shared = next((k for k in range(shared) if any(row[1][k] != first[k] for row in rows)), shared)
        cache_out = model(input_ids=torch.tensor([first[:shared]]), use_cache=True) if shared else None
        for start in range(0, len(rows), rows_per_pass):
            chunk = rows[start : start + rows_per_pass]
            width = max(len(f) for _, f, _, _ in chunk) - shared
            x = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), shared + width), dtype=torch.long)
            for k, (_, f, _, _) in enumerate(chunk):
                x[k, : len(f) - shared] = torch.tensor(f[shared:])
                mask[k, : len(f)] = 1
            kwargs = {}
            if shared:
                import copy

                cache = copy.deepcopy(
                    cache_out.cache if hasattr(cache_out, "cache") else cache_out.past_key_values
                )
                cache.batch_repeat_interleave(len(chunk))
                kwargs = {keyword: cache, "use_cache": True}
            logits = model(input_ids=x, attention_mask=mask, **kwargs).logits.float()
            logp = torch.log_softmax(logits, dim=-1)
            for k, (i, f, n_p, positions) in enumerate(chunk):
                idx = torch.arange(n_p - 1, len(f) - 1) - shared  # positions that predict the continuation
                target = torch.tensor(f[n_p:])
                out_mean[i] = float(logp[k, idx, target].mean()) if len(target) else float("nan")
                if positions is not None:
                    pair = logits[k, :, [ids.good_id, ids.bad_id]]
                    probs = torch.softmax(pair, dim=-1)[:, 0]
                    out_tags[i] = [
                        float(probs[q - shared]) if q is not None else float("nan") for q in positions
                    ]
    means = [out_mean[i] for i in range(len(records))]
    if tags is not None:
        tags = [out_tags[i] for i in range(len(records))]
    return means, tags


def aggregate_all(step_scores: list[list[float]]) -> dict[str, np.ndarray]:
    """Solution scores under every aggregation of :func:`erprm_core.prm.aggregate`."""
    from erprm_core import prm

    return {how: np.array([prm.aggregate(s, how) for s in step_scores]) for how in AGGREGATIONS}


def step_auroc(records: list[dict], step_scores: list[list[float]]) -> float:
    """AUROC of the step scores against the ground-truth step labels (1 before the first error, 0 from it)."""
    from erprm_core import stats
    from erprm_core.tasks import arith_truth

    ys, ss = [], []
    for r, s in zip(records, step_scores, strict=True):
        for y, v in zip(arith_truth.step_correctness(r, r["steps"]), s, strict=True):
            if np.isfinite(v):
                ys.append(y)
                ss.append(v)
    return round(stats.auroc(ss, ys), 4)


def prm_lines(
    records: list[dict], step_scores: list[list[float]], a: argparse.Namespace
) -> tuple[dict[str, Any], np.ndarray]:
    """Metrics of a PRM (min aggregation as the headline, the other aggregations' pairwise and best-of-16)."""
    agg = aggregate_all(step_scores)
    metrics = tv.verifier_metrics(records, agg["min"])
    metrics["other_aggregations"] = {
        how: {k: v for k, v in tv.verifier_metrics(records, agg[how]).items() if k in ("pairwise", f"bon{a.candidates}")}
        for how in AGGREGATIONS if how != "min"
    }  # fmt: skip
    metrics["step_auroc_truth"] = step_auroc(records, step_scores)
    return metrics, agg["min"]


# --- commands ----------------------------------------------------------------------------------------


def kit_check(model: Any, tok: Any, records: list[dict]) -> dict[str, float]:
    """Largest differences between :func:`likelihood_pass` and the kit's own functions on ``records``."""
    from erprm_core import models
    from erprm_core.steps import format_prm_input, policy_prompt

    qs = [r["question"] for r in records]
    prm_mean, prm_tags = likelihood_pass(model, tok, records, "prm")
    pol_mean, _ = likelihood_pass(model, tok, records, "policy")
    kit_prm = models.mean_token_logprobs(
        model, tok, qs, [format_prm_input(r["question"], r["steps"])[len(r["question"]) :] for r in records]
    )
    kit_pol = models.mean_token_logprobs(
        model, tok, [policy_prompt(q) for q in qs], [r["text"] for r in records]
    )
    kit_tags = prm_step_scores(model, tok, records)
    diff = lambda a, b: float(np.nanmax(np.abs(np.asarray(a, dtype=float) - np.asarray(b, dtype=float))))  # noqa: E731
    return {
        "records": len(records), "likelihood_prm_format": diff(prm_mean, kit_prm),
        "likelihood_policy_format": diff(pol_mean, kit_pol),
        "tag_scores": diff(np.concatenate(prm_tags), np.concatenate(kit_tags)),
    }  # fmt: skip


def cmd_baselines(a: argparse.Namespace) -> None:
    """Random pick, the tiny policy's likelihood, SmolLM2's likelihood in two formats, SmolLM2's zero-shot tags."""
    from erprm_core import models
    from erprm_core.running import artifacts
    from erprm_core.steps import policy_prompt

    records = tv.load_pool(a.profile, a.problems, a.candidates, a.pool_seed)
    tag, spec = pool_tag(a), pool_spec(a)
    common = {"pool": spec, "pool_summary": tv.pool_summary(records)}

    def emit(name: str, what: str, scores: Any, clock: Clock | None, extra: dict | None = None) -> None:
        scores = np.asarray(scores, dtype=float)
        save_scores(a.profile, tag, name, [float(x) for x in scores])
        line = {"name": name, "driver": "research.smollm2_prm baselines", "command": _command(), "verifier": what,
                **common, **tv.verifier_metrics(records, scores), **(extra or {})}  # fmt: skip
        if clock is not None:
            line["compute"] = {"wall_s": clock.wall, "cpu_s": clock.cpu, "threads": a.threads}
        write_line(line)

    emit("random", "random pick (all scores equal)", np.zeros(len(records)), None)
    if "policy" in a.which:
        policy, ptok = models.load_causal_lm(artifacts.paths(a.profile).policy, device="cpu", dtype="float32",
                                             padding_side="right")  # fmt: skip
        with Clock() as c:
            s = models.mean_token_logprobs(
                policy, ptok, [policy_prompt(r["question"]) for r in records], [r["text"] for r in records]
            )
        emit("tiny_policy_likelihood", "tiny policy: mean token log-prob of its own text given question + newline",
             s, c)  # fmt: skip
        del policy
    if not {"smol_prm_format", "smol_policy_format"} & set(a.which):
        return
    model, tok = load_base()
    with Clock() as c:
        check = kit_check(model, tok, records[: a.candidates])
    print(json.dumps({"kit_check_max_abs_diff": check, "wall_s": c.wall}), flush=True)
    if "smol_prm_format" in a.which:
        with Clock() as c:
            means, tags = likelihood_pass(model, tok, records, "prm")
        cost = {"note": "one forward pass gives both lines", "kit_check_max_abs_diff": check}
        emit("smollm2_likelihood_prm_format",
             'SmolLM2-135M, no training: mean token log-prob of " step_1 ки...step_n ки" given the question',
             means, c, cost)  # fmt: skip
        metrics, headline = prm_lines(records, tags, a)
        save_scores(a.profile, tag, "smollm2_zero_shot_prm", [float(x) for x in headline])
        write_line({"name": "smollm2_zero_shot_prm", "driver": "research.smollm2_prm baselines",
                    "command": _command(), "verifier": 'SmolLM2-135M, no training, as a PRM: P(" +") at the tags, min',
                    **common, **metrics, **cost,
                    "compute": {"wall_s": c.wall, "cpu_s": c.cpu, "threads": a.threads}})  # fmt: skip
    if "smol_policy_format" in a.which:
        with Clock() as c:
            means, _ = likelihood_pass(model, tok, records, "policy")
        emit("smollm2_likelihood_policy_format",
             "SmolLM2-135M, no training: mean token log-prob of the policy's text given question + newline",
             means, c, {"kit_check_max_abs_diff": check})  # fmt: skip


def training_records(profile: str, labels: str, n: int) -> list[dict[str, Any]]:
    """The first ``n`` labelled rollouts of 02 with the labels of ``labels`` under ``labels["train"]``."""
    from erprm_core.running import artifacts
    from erprm_core.tasks import arith_truth

    recs = artifacts.read_jsonl(artifacts.paths(profile).labels_file)[:n]
    if len(recs) < n:
        raise ValueError(f"only {len(recs)} labelled rollouts, {n} asked for")
    out = []
    for r in recs:
        y = arith_truth.step_correctness(r, r["steps"]) if labels == "truth" else r["labels"][labels]
        out.append({**r, "labels": {"train": y}})
    return out


def freeze(model: Any, layers: str) -> dict[str, int]:
    """``all``: every parameter trains; ``upperK``: embeddings (tied with the LM head) and all but the upper
    K decoder layers frozen (the upper K layers and the final norm train). Returns parameter counts."""
    if layers != "all":
        if not layers.startswith("upper"):
            raise ValueError(f"--layers {layers!r}: 'all' or 'upper<K>'")
        k = int(layers.removeprefix("upper"))
        decoder = model.model.layers
        for p in model.parameters():
            p.requires_grad_(False)
        for layer in decoder[len(decoder) - k :]:
            for p in layer.parameters():
                p.requires_grad_(True)
        for p in model.model.norm.parameters():
            p.requires_grad_(True)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"parameters": total, "trainable": trainable}


def _train(
    a: argparse.Namespace, records: list[dict], max_steps: int = -1
) -> tuple[Any, Any, Any, dict, Clock]:
    import tempfile

    from erprm_core import training

    model, tok = load_base()
    counts = freeze(model, a.layers)
    with tempfile.TemporaryDirectory() as tmp, Clock() as c:
        log = training.train_prm(
            model, tok, records, "train", Path(tmp) / "prm", epochs=a.epochs, max_steps=max_steps, lr=a.lr,
            batch_size=a.batch_size, max_length=a.max_length, seed=a.seed, warmup_ratio=a.warmup,
            save=False, disable_tqdm=True,
        )  # fmt: skip
    return model, tok, log, counts, c


def _loss_by_tenth(log: Any) -> list[float]:
    loss = log["loss"].to_numpy(dtype=float)
    return [round(float(x.mean()), 3) for x in np.array_split(loss, min(10, len(loss)))]


def cmd_train(a: argparse.Namespace) -> None:
    """Fine-tune SmolLM2 as a PRM on one label source, score the validation pool, write one line."""
    records = tv.load_pool(a.profile, a.problems, a.candidates, a.pool_seed)
    train = training_records(a.profile, a.labels, a.n_train)
    model, tok, log, counts, c = _train(a, train)
    with Clock() as s:
        steps = prm_step_scores(model, tok, records, a.score_batch)
    metrics, headline = prm_lines(records, steps, a)
    tag = pool_tag(a)
    name = a.name or f"prm_{a.labels}_{a.layers}_n{a.n_train}_ep{a.epochs:g}_lr{a.lr:g}"
    save_scores(a.profile, tag, name, [float(x) for x in headline])
    at = log.attrs
    recipe = {"base": BASE, "labels": a.labels, "layers": a.layers, **counts, "n_train": a.n_train,
              "epochs": a.epochs, "lr": a.lr, "batch_size": a.batch_size, "scheduler": "cosine",
              "warmup_ratio": a.warmup, "max_length": a.max_length, "seed": a.seed,
              "labelled_tags": at["labelled_tags"], "optimizer_steps": at["global_steps"],
              "train_source": f"runs/{a.profile}/labels.jsonl (02_labels), first {a.n_train}"}  # fmt: skip
    write_line({
        "name": name, "driver": "research.smollm2_prm train", "command": _command(),
        "verifier": f"SmolLM2-135M PRM ({a.layers}, {a.labels} labels), min over steps", "recipe": recipe,
        "pool": pool_spec(a), **metrics, **paired_with_references(records, headline, a.profile, tag),
        "loss_by_tenth": _loss_by_tenth(log),
        "compute": {"train_wall_s": c.wall, "train_cpu_s": c.cpu, "train_tokens": at["train_tokens"],
                    "train_tokens_per_cpu_s": round(at["train_tokens"] / max(c.cpu, 1e-9), 1),
                    "score_wall_s": s.wall, "score_cpu_s": s.cpu, "threads": a.threads},
    })  # fmt: skip


def cmd_speed(a: argparse.Namespace) -> None:
    """Seconds per optimizer step and tokens per CPU second of one variant on a small slice (no result line)."""
    train = training_records(a.profile, a.labels, a.n_train)
    _, _, log, counts, c = _train(a, train, max_steps=max(1, a.n_train // a.batch_size))
    at = log.attrs
    print(json.dumps({"layers": a.layers, **counts, "steps": at["global_steps"], "train_tokens": at["train_tokens"],
                      "wall_s": c.wall, "cpu_s": c.cpu, "cpu_s_per_step": round(c.cpu / at["global_steps"], 2),
                      "tokens_per_cpu_s": round(at["train_tokens"] / c.cpu, 1)}))  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    """Command line: baselines, train, speed."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    parsers = {name: sub.add_parser(name) for name in ("baselines", "train", "speed")}
    for p in parsers.values():
        p.add_argument("--profile", default="tiny")
        p.add_argument("--problems", type=int, default=100, help="validation pool: problems")
        p.add_argument("--candidates", type=int, default=16, help="validation pool: candidates per problem")
        p.add_argument("--pool-seed", type=int, default=0)
        p.add_argument("--threads", type=int, default=1)
        p.add_argument("--score-batch", type=int, default=16)
    parsers["baselines"].add_argument(
        "--which", nargs="+",
        default=["policy", "smol_prm_format", "smol_policy_format"],
    )  # fmt: skip
    for name in ("train", "speed"):
        p = parsers[name]
        p.add_argument("--labels", default="er_1", help="'truth' or a 02 rule (er_1, hard, soft, ...)")
        p.add_argument("--layers", default="upper10", help="'all' or 'upper<K>'")
        p.add_argument("--n-train", type=int, default=1024)
        p.add_argument("--epochs", type=float, default=2.0)
        p.add_argument("--lr", type=float, default=5e-5)
        p.add_argument("--batch-size", type=int, default=16)
        p.add_argument("--warmup", type=float, default=0.0)
        p.add_argument("--max-length", type=int, default=512)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--name", default="")
    a = ap.parse_args(argv)
    setup(a.threads)
    {"baselines": cmd_baselines, "train": cmd_train, "speed": cmd_speed}[a.command](a)


if __name__ == "__main__":
    main()
