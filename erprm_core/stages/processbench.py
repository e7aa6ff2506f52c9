"""Stage 07_processbench: does a PRM find the first wrong step? ProcessBench, and its synthetic twin.

ProcessBench (Zheng et al. 2024, arXiv 2412.06559) asks a PRM for the first wrong step of a solution (its first
step scored below a threshold, -1 when none is) and reports the F1 of the accuracy on solutions with an error
(the index must be exact) and on all-right ones (:mod:`erprm_core.processbench`). :func:`run` has two modes
(``benchmark``):

- ``synthetic`` (tiny, smoke): the same metric on the 04 best-of-N pool of task ``arith``, whose every step
  has a ground truth (:func:`erprm_core.tasks.arith_truth.first_error`); the step scores are the ones 04
  computed (no model runs), for every rule 04 scored, in two views (:data:`VIEWS`: the distinct solutions,
  and the pool with its duplicates), at the paper's threshold 0.5 and at each rule's threshold chosen by 03
  on validation problems (``prm_truth``), with the threshold-free step AUROC against the truth beside them.
  Every interval is a bootstrap over problems (a problem's candidates are not independent). Also the share of
  solutions of each error type whose first error is named exactly.
- ``processbench`` (paper profiles): the real benchmark (hub ``Qwen/ProcessBench`` or a local folder of
  ``<split>.json``) for the PRMs that 03 trained (``rules``) and released checkpoints (``released_prms``,
  ``name@revision``), each scored in resumable shards under ``runs/<profile>/processbench/``
  (:func:`erprm_core.stages.processbench_eval.evaluate`, the code of ``erprm processbench``).

Tables: ``step_eval`` (one row per PRM and split: counts, error_acc, correct_acc, f1 with its 95% interval),
``step_eval_sweep`` (F1 against the threshold), ``step_eval_by_type`` (synthetic only).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

import pandas as pd

from erprm_core import labels, processbench, stats
from erprm_core.io import ArtifactError
from erprm_core.running import artifacts, numerics
from erprm_core.running.config import parse_names
from erprm_core.stages import bon_tables
from erprm_core.stages import processbench_eval as pbe
from erprm_core.stages._common import StageConfig, record, trained_rules
from erprm_core.tasks import arith_truth

log = logging.getLogger(__name__)

STAGE = "07_processbench"
BENCHMARKS = ("synthetic", "processbench")
EVAL_COLUMNS = [
    "benchmark", "prm", "split", "view", "threshold", "threshold_source", "n", "n_error", "n_correct",
    "n_excluded", "error_acc", "correct_acc", "f1", "f1_low", "f1_high", "step_auroc", "step_auroc_low",
    "step_auroc_high",
]  # fmt: skip
VIEWS = {
    "distinct": "each distinct solution once",
    "pool": "each candidate as often as it occurs in the pool",
}
"""The two weightings of the synthetic benchmark: the deduplicated set is mostly wrong solutions (a wrong
solution is rarely sampled twice), the pool the PRM ranks in 04 is not."""
SYNTHETIC_SPLIT = "arith-pool"  # the split name of the synthetic twin: the 04 pool's distinct solutions


@dataclass(frozen=True)
class ProcessBenchConfig(StageConfig):
    """The knobs of 07_processbench (the notebook's parameters cell)."""

    profile: str = "smoke"
    """results/<profile> and runs/<profile> folders to use"""
    benchmark: str = "synthetic"
    """synthetic (the arith twin on the 04 pool, no model runs) or processbench (the real benchmark)"""
    rules: str = "all"
    """PRMs of 03 to evaluate: "all" or a comma list of rules"""
    released_prms: str = ""
    """processbench only: comma list of released PRMs as hub name@revision (or local folders)"""
    data: str = "hub"
    """processbench only: "hub" (Qwen/ProcessBench) or a folder of <split>.json files"""
    data_revision: str = ""
    """processbench only: hub revision of the data set (empty: the default branch)"""
    splits: str = "gsm8k,math,olympiadbench,omnimath"
    """processbench only: comma list of splits"""
    limit: int = 0
    """processbench only: score the first N records of each split (0: all)"""
    threshold: float = 0.5
    """a step scored below it is the predicted first error (ProcessBench's protocol)"""
    batch_size: int = 8
    """processbench only: solutions per scoring forward pass"""
    max_length: int = 0
    """processbench only: token limit of a formatted solution (0: the model's)"""
    scoring: str = "two_token"
    """processbench only: two_token (softmax over " +"/" -") or full_vocab"""
    device: str = "auto"
    """processbench only: auto, cpu or cuda"""
    dtype: str = "auto"
    """processbench only: weights dtype for scoring (auto: bf16 on a GPU that has it)"""
    n_boot: int = 2000
    """bootstrap resamples of each F1 interval"""
    seed: int = 0
    """seed of the bootstrap"""
    torch_threads: int = 0
    """CPU threads for torch (0: auto)"""
    cpu_numerics: str = "portable"
    """CPU kernel paths: portable (pinned: the same bits on any x86-64 CPU with AVX2) or default"""

    def check(self) -> None:
        """Raise ValueError naming the parameter when a value is out of range."""
        if self.benchmark not in BENCHMARKS:
            raise ValueError(f"benchmark must be one of {BENCHMARKS}, got benchmark={self.benchmark!r}")
        if not 0.0 <= float(self.threshold) <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got threshold={self.threshold}")
        for name in ("limit", "max_length", "n_boot"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {name}={getattr(self, name)}")
        for prm in parse_names(self.released_prms):
            if pbe.local_folder(prm) is None and pbe.split_prm_name(prm)[1] is None:
                raise ValueError(
                    f"released_prms: {prm!r} names no revision; pin one as name@<commit sha> so that the "
                    "result says which weights scored"
                )


@dataclass
class ProcessBenchResult:
    """What :func:`run` returns: the three tables (``by_type`` empty for the real benchmark)."""

    table: pd.DataFrame
    sweep: pd.DataFrame
    by_type: pd.DataFrame


def run(config: ProcessBenchConfig) -> ProcessBenchResult:
    """Stage 07_processbench (see the module docstring): evaluate, write the tables and the manifest entry."""
    c = config
    c.check()
    numerics_info = numerics.configure(c.cpu_numerics, c.torch_threads)  # first: before any tensor operation
    if c.benchmark == "synthetic":
        res = synthetic_benchmark(c)
    else:
        res = real_benchmark(c)
    artifacts.write_table(res.table, c.profile, "step_eval")
    artifacts.write_table(res.sweep, c.profile, "step_eval_sweep")
    if len(res.by_type):
        artifacts.write_table(res.by_type, c.profile, "step_eval_by_type")
    record(
        c.profile,
        STAGE,
        c,
        torch_threads=numerics_info["torch_threads"],
        prms=list(res.table["prm"].unique()),
    )
    return res


# ----------------------------------------------------------------------------------------------------
# The synthetic twin: the 04 pool of task arith, with its step-level ground truth
# ----------------------------------------------------------------------------------------------------


def pool_step_scores(
    profile: str, rules: str = "all"
) -> tuple[list[dict[str, Any]], dict[str, list[Any]], list[int]]:
    """The distinct solutions of the 04 pool (:func:`~erprm_core.stages.bon_tables.distinct_solutions`), per
    rule that 04 scored (all, or the comma list ``rules``) their step scores in the same order, and how many
    candidates of the pool each distinct solution stands for."""
    p = artifacts.paths(profile)
    cand_file = artifacts.require(p.pool / "candidates.jsonl", "04_best_of_n", profile, "the candidate pool")
    keys, items, _ = bon_tables.distinct_solutions(artifacts.read_jsonl(cand_file))
    multiplicity = pd.Series(keys).value_counts()
    root = p.pool / "scores"
    scored = (
        sorted((d.name for d in root.iterdir() if d.is_dir()), key=labels.rule_sort_key)
        if root.is_dir()
        else []
    )
    wanted = scored if rules == "all" else parse_names(rules)
    missing = [r for r in wanted if r not in scored]
    if missing or not wanted:
        raise ArtifactError(
            f"{root}: no 04 step scores for {missing or 'any rule'} (scored: {scored}); run 04_best_of_n first"
        )
    out = {}
    for rule in wanted:
        by_key = {}
        for shard in sorted((root / rule).glob("shard-*.jsonl")):
            by_key.update(
                {r["key"]: r["step_scores"] for r in artifacts.read_jsonl(shard, ("key", "step_scores"))}
            )
        lost = [it["key"] for it in items if it["key"] not in by_key]
        if lost:
            raise ArtifactError(
                f"{root / rule}: step scores missing for {len(lost)} pool solution(s); rerun 04"
            )
        out[rule] = [by_key[it["key"]] for it in items]
    return items, out, [int(multiplicity[it["key"]]) for it in items]


def validation_thresholds(profile: str) -> dict[str, float]:
    """Each rule's first-error threshold chosen by 03 on its held-out (validation) problems (``prm_truth``);
    empty when 03 wrote none (a task without step-level truth)."""
    if not artifacts.paths(profile).table("prm_truth").is_file():
        return {}
    t = artifacts.read_table(profile, "prm_truth")
    if "threshold_source" not in t.columns:
        return {}
    rows = t[(t["metric"] == "first_error_f1") & (t["threshold_source"] == "validation")]
    return {str(r.rule): float(r.threshold) for r in rows.itertuples()}


def step_truth(steps: list[Any], first: int) -> list[int]:
    """1 for every step before the first error (every step when there is none), 0 from it on."""
    cut = len(steps) if first < 0 else first
    return [int(i < cut) for i in range(len(steps))]


def _view_rows(
    rule: str, view: str, scores: list[Any], first: list[int], groups: list[str],
    thresholds: list[tuple[float, str]],
    c: ProcessBenchConfig,
) -> list[dict[str, Any]]:  # fmt: skip
    """The ``step_eval`` rows of one rule and view: one per threshold, with the step AUROC beside them."""
    flat = [(g, v, t) for g, s, f in zip(groups, scores, first, strict=True)
            for v, t in zip(s, step_truth(s, f), strict=True) if v is not None]  # fmt: skip
    auroc = stats.problem_bootstrap_auroc([v for _, v, _ in flat], [t for *_, t in flat],
                                          [g for g, *_ in flat], c.n_boot, c.seed)  # fmt: skip
    rows = []
    for threshold, source in thresholds:
        preds = [processbench.first_error(s, threshold) for s in scores]
        keep = [i for i, p in enumerate(preds) if p is not None]
        m = pbe.metrics(scores, first, threshold)
        ci = pbe.first_error_f1([preds[i] for i in keep], [first[i] for i in keep], n_boot=c.n_boot,
                                seed=c.seed, groups=[groups[i] for i in keep])  # fmt: skip
        rows.append({"benchmark": "synthetic", "prm": rule, "split": SYNTHETIC_SPLIT, "view": view, **m,
                     "threshold_source": source, "f1_low": ci["f1_low"], "f1_high": ci["f1_high"],
                     "step_auroc": auroc[0], "step_auroc_low": auroc[1], "step_auroc_high": auroc[2]})  # fmt: skip
    return rows


def synthetic_benchmark(c: ProcessBenchConfig) -> ProcessBenchResult:
    """First-error F1 and step AUROC of every rule on the 04 pool against the arith ground truth, in both
    :data:`VIEWS`, at ``threshold`` and at the rule's validation threshold (:func:`validation_thresholds`)."""
    items, scores, multiplicity = pool_step_scores(c.profile, c.rules)
    truth = [arith_truth.first_error(it["question"], it["steps"]) for it in items]
    first, types = [t[0] for t in truth], [t[1] for t in truth]
    groups = [str(it["problem_id"]) for it in items]
    tuned = validation_thresholds(c.profile)
    pooled = [i for i, k in enumerate(multiplicity) for _ in range(k)]  # every candidate of the pool
    rows, sweeps, by_type = [], [], []
    for rule, step_scores in scores.items():
        thresholds = [(float(c.threshold), "paper")] + (
            [(tuned[rule], "validation")] if rule in tuned else []
        )
        for view, idx in (("distinct", range(len(items))), ("pool", pooled)):
            rows += _view_rows(rule, view, [step_scores[i] for i in idx], [first[i] for i in idx],
                               [groups[i] for i in idx], thresholds, c)  # fmt: skip
        sweeps.extend(
            {"prm": rule, "split": SYNTHETIC_SPLIT, **r} for r in pbe.threshold_sweep(step_scores, first)
        )
        preds = [processbench.first_error(s, c.threshold) for s in step_scores]
        by_type.extend(_type_rows(rule, preds, first, types, groups, c))
    table = pd.DataFrame(rows, columns=EVAL_COLUMNS)
    sweep = pd.DataFrame(sweeps)[["prm", *pbe.SWEEP_COLUMNS]]
    counts = pd.Series(types).value_counts()
    log.info("synthetic benchmark: %d distinct solutions (%d candidates) of %d problems; error types %s",
             len(items), len(pooled), len(set(groups)), counts.to_dict())  # fmt: skip
    return ProcessBenchResult(table, sweep, pd.DataFrame(by_type))


def _type_rows(
    rule: str, preds: list[Any], first: list[int], types: list[str], groups: list[str], c: ProcessBenchConfig
) -> list[dict[str, Any]]:
    """Per error type: the share of distinct solutions whose first error the PRM names exactly (interval over
    problems); for type "none" (all steps right) the share it passes (predicts -1). Undetermined predictions
    are left out."""
    rows = []
    for kind in sorted(set(types)):
        sel = [i for i, (p, t) in enumerate(zip(preds, types, strict=True)) if t == kind and p is not None]
        hits = [float(preds[i] == -1) if kind == "none" else float(preds[i] == first[i]) for i in sel]
        if hits:
            acc, low, high = stats.cluster_mean_ci(hits, [groups[i] for i in sel], c.n_boot, c.seed)
            rows.append({"prm": rule, "error_type": kind, "accuracy": acc, "ci_low": low, "ci_high": high,
                         "n": len(hits)})  # fmt: skip
    return rows


# ----------------------------------------------------------------------------------------------------
# The real benchmark: the PRMs of 03 and released checkpoints
# ----------------------------------------------------------------------------------------------------


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")


def prms_to_evaluate(c: ProcessBenchConfig) -> dict[str, tuple[str, str | None]]:
    """Display name -> (hub name or folder, revision) of every PRM to score: the rules of 03 (``rules``) and
    the ``released_prms``."""
    found = trained_rules(c.profile)
    wanted = list(found) if c.rules == "all" else parse_names(c.rules)
    missing = [r for r in wanted if r not in found]
    if missing:
        raise ArtifactError(f"no 03 checkpoint for rule(s) {missing} of {c.profile}; run 03_train_prm first")
    prms = {rule: (str(found[rule]), None) for rule in wanted}
    for name in parse_names(c.released_prms):
        prms[name] = pbe.split_prm_name(name)
    return prms


def real_benchmark(c: ProcessBenchConfig) -> ProcessBenchResult:
    """ProcessBench for every PRM of :func:`prms_to_evaluate`, scored in resumable shards per PRM."""
    data = pbe.load_splits(c.data, parse_names(c.splits), c.limit or None, c.data_revision or None)
    options = pbe.ScoringOptions(scoring=c.scoring, max_length=c.max_length or None, device=c.device,
                                 dtype=c.dtype, batch_size=c.batch_size)  # fmt: skip
    root = artifacts.paths(c.profile).run / "processbench"
    tables, sweeps = [], []
    for name, (prm, revision) in prms_to_evaluate(c).items():
        res = pbe.evaluate(prm, data, root / _slug(name) / "processbench.csv", revision=revision,
                           threshold=c.threshold, options=options, n_boot=c.n_boot)  # fmt: skip
        not_ok = res.audit[res.audit["reason"] != "ok"]
        if len(not_ok):
            log.warning(
                "%s: records not fully scored (counted, never dropped):\n%s", name, not_ok.to_string()
            )
        tables.append(res.summary.assign(benchmark="processbench", prm=name, view="records",
                                         threshold_source="paper"))  # fmt: skip
        sweeps.append(res.sweep.assign(prm=name))
    table = pd.concat(tables, ignore_index=True).reindex(columns=EVAL_COLUMNS)
    sweep = pd.concat(sweeps, ignore_index=True)[["prm", *pbe.SWEEP_COLUMNS]]
    return ProcessBenchResult(table, sweep, pd.DataFrame())
