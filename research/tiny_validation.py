"""Validation problems of the tiny profile, a best-of-N pool sampled on them, and verifier metrics on it.

The validation split (the one definition every research driver uses): train-side ``arith`` problems of
generator seed 7 whose arithmetic skeleton (start value and (operation, operand) chain) is NOT among the
seed-0 train-side problems the pipeline uses (``train_sft`` + ``train_prm`` + ``raft``, in that order, from
``configs/<profile>/00_policy.yaml``). The test split is the other hash bucket of the skeleton
(``arith.problem_side``), so validation is disjoint from SFT, PRM training, RAFT and the test split by
construction. Nothing here reads ``runs/<profile>/problems/test.jsonl``.

    python -m research.tiny_validation pool --problems 100 --candidates 16   # runs/research/<profile>/pool...
    python -m research.tiny_validation show                                   # the pool's summary line

The pool is ``n`` candidates per problem from the profile's policy (``runs/<profile>/policy``) at T = 1.0 with
the kit's sampler (:func:`erprm_core.rollouts.sample_solutions`, seeded per (problem, sample)), graded by the
kit and judged step by step by :func:`erprm_core.tasks.arith_truth.first_error`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

VALIDATION_SEED = 7
TRAIN_SPLITS = ("n_train_sft", "n_train_prm", "n_raft")
KNOBS = ("min_steps", "max_steps", "max_value", "max_operand", "max_factor")


def policy_config(profile: str = "tiny") -> dict[str, Any]:
    """The profile's 00_policy parameters (generator knobs and split sizes)."""
    from erprm_core.running import artifacts, config

    return config.load_config(artifacts.configs_root() / profile / "00_policy.yaml")


def skeleton_of(question: str) -> str:
    """The arithmetic skeleton of an ``arith`` question, recomputed from its text."""
    from erprm_core.tasks import arith, arith_truth

    t = arith_truth.parse_question(question)
    return arith.skeleton_key(t.values[0], list(t.ops))


def validation_problems(n: int, profile: str = "tiny") -> list[dict[str, Any]]:
    """The first ``n`` validation problems of ``profile`` (see the module docstring): train side of generator
    seed 7, skeletons disjoint from the seed-0 train-side problems the pipeline uses."""
    from erprm_core.tasks import arith

    cfg = policy_config(profile)
    if cfg.get("task", "arith") != "arith":
        raise ValueError(f"profile {profile!r} is not an arith profile")
    knobs = {k: int(cfg[k]) for k in KNOBS}
    n_used = sum(int(cfg[k]) for k in TRAIN_SPLITS)
    used = {
        skeleton_of(p["question"]) for p in arith.generate_problems(n_used, seed=int(cfg["seed"]), **knobs)
    }
    out = []
    for p in arith.iter_problems(VALIDATION_SEED, "train", **knobs):
        if skeleton_of(p["question"]) not in used:
            out.append(p)
            if len(out) == n:
                return out
    return out


def research_dir(profile: str = "tiny") -> Path:
    """``runs/research/<profile>``: heavy, git-ignored intermediates of the research drivers."""
    from erprm_core.running import artifacts

    return artifacts.runs_root() / "research" / profile


def pool_path(profile: str, n_problems: int, n_candidates: int, seed: int) -> Path:
    """File of one validation pool."""
    return research_dir(profile) / f"pool_{n_problems}x{n_candidates}_s{seed}.jsonl"


def build_pool(
    profile: str = "tiny", n_problems: int = 100, n_candidates: int = 16, seed: int = 0, temperature: float = 1.0,
    max_new_tokens: int = 192, batch_size: int = 64,
) -> Path:  # fmt: skip
    """Sample the validation pool from the profile's policy, grade it and judge its steps; write it (JSON
    lines, problem order then sample order) and return its path. Reuses an existing file."""
    from erprm_core import generation, models, rollouts
    from erprm_core.running import artifacts
    from erprm_core.tasks import arith_truth

    path = pool_path(profile, n_problems, n_candidates, seed)
    if path.exists():
        return path
    problems = validation_problems(n_problems, profile)
    model, tok = models.load_causal_lm(artifacts.paths(profile).policy, device="cpu", dtype="float32")
    sampler = generation.make_sampler(model, tok, "hf", batch_size)
    start = time.perf_counter()
    sols = rollouts.sample_solutions(
        sampler, problems, n_candidates, temperature, 1.0, max_new_tokens, seed, "plain", "arith"
    )
    wall = time.perf_counter() - start
    by_id = {p["id"]: p for p in problems}
    records = []
    for s in sols:
        p = by_id[s["problem_id"]]
        index, kind = arith_truth.first_error(p, s["steps"])
        records.append({
            "problem_id": p["id"], "question": p["question"], "answer": p["answer"],
            "sample_index": s["sample_index"], "text": s["text"], "steps": s["steps"], "outcome": s["outcome"],
            "truncated": s["truncated"], "first_error": index, "error_type": kind,
        })  # fmt: skip
    artifacts.atomic_write_jsonl(path, records)
    print(json.dumps({"pool": path.name, "sampling_wall_s": round(wall, 1), **pool_summary(records)}))
    return path


def load_pool(
    profile: str = "tiny", n_problems: int = 100, n_candidates: int = 16, seed: int = 0
) -> list[dict]:
    """The records of a pool built by :func:`build_pool`."""
    from erprm_core.running import artifacts

    path = pool_path(profile, n_problems, n_candidates, seed)
    if not path.exists():
        raise FileNotFoundError(f"{path}: build it first (python -m research.tiny_validation pool ...)")
    return artifacts.read_jsonl(path)


def outcome_matrix(records: list[dict]) -> tuple[list[str], np.ndarray]:
    """(problem ids in pool order, correct P x M) of a pool with the same number of candidates per problem."""
    ids = list(dict.fromkeys(r["problem_id"] for r in records))
    m = len(records) // len(ids)
    correct = np.array([r["outcome"] for r in records], dtype=int).reshape(len(ids), m)
    return ids, correct


def pool_summary(records: list[dict]) -> dict[str, Any]:
    """Size, accuracy, problems with both outcomes, agreement of outcome and step truth, error types."""
    ids, correct = outcome_matrix(records)
    truth_ok = np.array([r["first_error"] == -1 for r in records])
    outcome = np.array([r["outcome"] == 1 for r in records])
    kinds: dict[str, int] = {}
    for r in records:
        kinds[r["error_type"]] = kinds.get(r["error_type"], 0) + 1
    mixed = int(((correct.sum(1) > 0) & (correct.sum(1) < correct.shape[1])).sum())
    return {
        "problems": len(ids), "candidates": int(correct.shape[1]), "accuracy": round(float(correct.mean()), 4),
        "problems_both_outcomes": mixed, "outcome_right_but_a_step_wrong": int((outcome & ~truth_ok).sum()),
        "outcome_wrong_but_steps_right": int((~outcome & truth_ok).sum()), "error_types": kinds,
    }  # fmt: skip


def verifier_metrics(
    records: list[dict], scores: Any, ns: tuple[int, ...] = (1, 4, 16), n_boot: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """Within-problem pairwise ranking (problems with both outcomes; BCa bootstrap over problems) and exact
    expected best-of-N accuracy (ties split) with its bootstrap interval and its paired difference from the
    random pick, for one score per pool record (higher = better). Numbers in percent for best-of-N."""
    from erprm_core import evaluators, stats

    ids, correct = outcome_matrix(records)
    s = np.asarray(scores, dtype=float)
    if not np.isfinite(s).all():
        raise ValueError(f"{int((~np.isfinite(s)).sum())} non-finite scores")
    pw = stats.within_problem_pairwise([r["problem_id"] for r in records], [r["outcome"] for r in records], s)
    mean, lo, hi = stats.bootstrap_ci(pw.to_numpy(), n_boot=n_boot, seed=seed)
    out: dict[str, Any] = {
        "pairwise": _r(mean),
        "pairwise_ci": [_r(lo), _r(hi)],
        "pairwise_problems": len(pw),
    }
    grid = s.reshape(correct.shape)
    random = evaluators.random_pick_accuracy(correct)
    for n in [n for n in ns if n <= correct.shape[1]]:  # a smaller pool has no best-of-16
        bon = evaluators.best_of_n_accuracy(grid, correct, n)
        m, lo, hi = stats.bootstrap_ci(bon, n_boot=n_boot, seed=seed)
        d = stats.paired_bootstrap_diff(bon, random, n_boot=n_boot, seed=seed)
        out[f"bon{n}"] = _r(100 * m, 2)
        out[f"bon{n}_ci"] = [_r(100 * lo, 2), _r(100 * hi, 2)]
        if n > 1:
            out[f"bon{n}_minus_random"] = _r(100 * d.diff, 2)
            out[f"bon{n}_minus_random_ci"] = [_r(100 * d.ci_low, 2), _r(100 * d.ci_high, 2)]
            out[f"bon{n}_minus_random_p"] = _r(d.p_value, 4)
    return out


def _r(x: float, nd: int = 4) -> float:
    return round(float(x), nd)


def main(argv: list[str] | None = None) -> None:
    """Command line: pool, show, problems."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=["pool", "show", "problems"])
    ap.add_argument("--profile", default="tiny")
    ap.add_argument("--problems", type=int, default=100)
    ap.add_argument("--candidates", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    if a.command == "problems":
        for p in validation_problems(a.problems, a.profile):
            print(json.dumps({"id": p["id"], "question": p["question"], "answer": p["answer"]}))
        return
    if a.command == "pool":
        build_pool(a.profile, a.problems, a.candidates, a.seed)
    records = load_pool(a.profile, a.problems, a.candidates, a.seed)
    print(json.dumps(pool_summary(records)))


if __name__ == "__main__":
    main()
