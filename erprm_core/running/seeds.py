"""Run-to-run variance of the headline comparison: the PRMs retrained with other seeds (``erprm seeds``).

Intervals over test problems do not cover training noise: the same recipe can rank the rules differently
when only the PRMs' training seed changes. ``erprm seeds --profile tiny --seeds 1,2`` forks the finished run
of the profile into ``runs/seeds/<profile>/seed-<s>``: the policy, problems, labels, the best-of-N candidate
pool and RAFT's first-iteration samples are shared (none depends on the PRMs), the headline PRMs are
retrained with ``03.seed=<s>``, and best-of-N and RAFT rerun on them there. The main run is the first seed.

:func:`variance_table` then collects, per seed, best-of-``n_max`` accuracy of ER (eta = 1), soft, hard and
the ORM, their paired differences, and each reward model's RAFT final with the paired RAFT differences, each
with its own 95% interval over test problems, and adds mean, standard deviation, min and max over seeds:
``results/<profile>/tables/seed_variance.csv`` (columns ``quantity, seed, value, ci_low, ci_high, n_seeds``;
the summary rows have seed ``mean``, ``sd``, ``min``, ``max``) and the manifest entry ``seeds``.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from erprm_core import io
from erprm_core.running import artifacts, config, pipeline

log = logging.getLogger(__name__)

HEADLINE = ("er_1", "soft", "hard", "orm")
# Upstream artifacts a seed run reads but never writes: linked. Shared caches it may extend: copied.
LINKED = ("problems", "policy", "rollouts", "rollouts.jsonl", "labels.jsonl")
COPIED = ("pool/candidates", "raft/samples")


@dataclass
class SeedsConfig:
    """The knobs of ``erprm seeds``."""

    profile: str = "tiny"
    """the profile whose finished run is forked (its 03 seed is the first seed of the table)"""
    seeds: str = "1,2"
    """comma list of further PRM-training seeds (03's ``seed``); each gets its own run folder"""
    rules: str = ",".join(HEADLINE)
    """label rules retrained per seed (03 ``rules``); best-of-N scores these"""
    reward_models: str = ",".join(HEADLINE)
    """RAFT reward models rerun per seed (05 ``reward_models``); empty: best-of-N only (stop after 04)"""


def seed_roots(profile: str, seed: int) -> tuple[Path, Path]:
    """(runs root, results root) of one seed's run: ``runs/seeds/<profile>/seed-<seed>[/results]``."""
    root = artifacts.runs_root() / "seeds" / profile / f"seed-{seed}"
    return root, root / "results"


def fork(profile: str, seed: int) -> tuple[Path, Path]:
    """Prepare a seed's roots from the main run: link what it only reads, copy the shared caches and the
    results (tables and manifest of the upstream stages). Existing seed folders are kept (resume)."""
    main = artifacts.paths(profile)
    for name in ("policy", "labels.jsonl"):
        artifacts.require(main.run / name, "00_policy" if name == "policy" else "02_labels", profile)
    runs, results = seed_roots(profile, seed)
    (runs / profile).mkdir(parents=True, exist_ok=True)
    for name in LINKED:
        source, target = main.run / name, runs / profile / name
        if source.exists() and not target.exists():
            target.symlink_to(source.resolve(), target_is_directory=source.is_dir())
    for name in COPIED:
        source, target = main.run / name, runs / profile / name
        if source.is_dir() and not target.exists():
            shutil.copytree(source, target)
    if not (results / profile / "manifest.json").exists():
        shutil.copytree(main.results, results / profile, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("notebooks", "figures"))  # fmt: skip
    return runs, results


def _main_seed(profile: str) -> int:
    stage = artifacts.load_manifest(profile).get("stages", {}).get("03_train_prm", {})
    return int(stage.get("seed", 0))


def run(c: SeedsConfig) -> pd.DataFrame:
    """Retrain and re-evaluate for every seed of ``c.seeds`` (finished stages are skipped on a rerun), then
    write and return :func:`variance_table` over the main run and the seeds."""
    seeds = parse_seeds(c.seeds)
    if not seeds:
        raise ValueError(f"seeds: expected a comma list of integers, got {c.seeds!r}")
    main_seed = _main_seed(c.profile)
    if main_seed in seeds:
        raise ValueError(f"seeds: {main_seed} is the main run's 03 seed; give other seeds")
    overrides = [f"03.rules={c.rules}"]
    if c.reward_models:
        overrides.append(f"05.reward_models={c.reward_models}")
    stop = "05" if c.reward_models else "04"
    config.plan(c.profile, "03", stop, [*overrides, "03.seed=0"])  # every error before any folder is made
    tables = {main_seed: artifacts.paths(c.profile).tables}
    walls, commits = {}, {}
    for seed in seeds:
        runs, results = fork(c.profile, seed)
        t0 = time.perf_counter()
        log.info("seed %d: stages 03-%s in %s", seed, stop, artifacts.repo_relative(runs))
        with artifacts.redirected_roots(runs, results):
            pipeline.run(c.profile, "03", stop, overrides + [f"03.seed={seed}"])
            tables[seed] = artifacts.paths(c.profile).tables
            stage = artifacts.load_manifest(c.profile)["stages"]["03_train_prm"]
            commits[seed] = f"{stage.get('git_commit')}{' (dirty)' if stage.get('git_dirty') else ''}"
        walls[seed] = round(time.perf_counter() - t0, 1)
    table = variance_table({s: _read(t) for s, t in tables.items()})
    artifacts.write_table(table, c.profile, "seed_variance")
    p = artifacts.paths(c.profile)
    manifest = artifacts.load_manifest(c.profile)
    manifest.setdefault("stages", {})["seeds"] = {
        **asdict(c), "main_seed": main_seed, "wall_s": walls, "git_commit": commits,
        "folders": {s: artifacts.repo_relative(seed_roots(c.profile, s)[0]) for s in seeds},
        "command": f"erprm seeds --profile {c.profile} --seeds {c.seeds}",
    }  # fmt: skip
    io.atomic_write_json(p.manifest, manifest)
    return table


def _read(tables: Path) -> dict[str, pd.DataFrame]:
    out = {}
    for name in ("bon", "bon_paired", "raft", "raft_paired"):
        path = tables / f"{name}.csv"
        out[name] = pd.read_csv(path) if path.is_file() else pd.DataFrame()
    return out


def _rows(seed: int, t: dict[str, pd.DataFrame]) -> list[dict]:
    """The headline quantities of one run: best-of-N_max, paired differences, RAFT finals.

    The headline methods are those of 04's prespecified comparison (``bon_paired.csv``, ``selection`` =
    prespecified: the ER rule and aggregation 04 was configured with, against soft, hard and the ORM), plus
    random pick and majority vote; a post hoc row would repeat a seed when the best eta is the headline's.
    """
    rows = []
    bon, paired = t["bon"], t["bon_paired"]
    if not bon.empty:
        n_max = int(bon["n"].max())
        last = bon[(bon["n"] == n_max) & (bon["metric"] == "accuracy")].set_index("method")
        head = paired[paired["n"] == n_max] if not paired.empty else paired
        if "selection" in head:
            head = head[head["selection"] == "prespecified"]
        methods = list(
            dict.fromkeys([*head.get("method_a", []), *head.get("method_b", []), "random", "majority"])
        )
        for method in methods:
            if method in last.index:
                r = last.loc[method]
                rows.append({"quantity": f"bon@{n_max} {method}", "seed": seed, "value": r["value"],
                             "ci_low": r["ci_low"], "ci_high": r["ci_high"]})  # fmt: skip
        for _, r in head.iterrows():
            rows.append({"quantity": f"bon@{n_max} {r['method_a']} - {r['method_b']}", "seed": seed,
                         "value": r["diff"], "ci_low": r["ci_low"], "ci_high": r["ci_high"]})  # fmt: skip
    raft, raft_paired = t["raft"], t["raft_paired"]
    if not raft.empty:
        final = raft[(raft["metric"] == "greedy_accuracy") & (raft["iteration"] == raft["iteration"].max())]
        for _, r in final.iterrows():
            rows.append({"quantity": f"raft final {r['reward_model']}", "seed": seed, "value": r["value"],
                         "ci_low": r["ci_low"], "ci_high": r["ci_high"]})  # fmt: skip
        last = raft_paired[raft_paired["iteration"] == raft_paired["iteration"].max()]
        for _, r in last.iterrows():
            rows.append({"quantity": f"raft final {r['reward_model']} - {r['versus']}", "seed": seed,
                         "value": r["diff"], "ci_low": r["ci_low"], "ci_high": r["ci_high"]})  # fmt: skip
    return rows


def variance_table(runs: dict[int, dict[str, pd.DataFrame]]) -> pd.DataFrame:
    """Per-seed rows of every headline quantity, then its mean, sd (ddof 1), min and max over seeds.

    A quantity missing from some seed is summarised over the seeds that have it (``n_seeds`` says how many).
    """
    per_seed = pd.DataFrame([row for seed, t in sorted(runs.items()) for row in _rows(seed, t)])
    if per_seed.empty:
        raise ValueError("seed variance: no best-of-N or RAFT table in any run")
    summary = []
    for quantity, group in per_seed.groupby("quantity", sort=False):
        values = group["value"].astype(float)
        for stat, value in (("mean", values.mean()), ("sd", values.std(ddof=1) if len(values) > 1 else float("nan")),
                            ("min", values.min()), ("max", values.max())):  # fmt: skip
            summary.append({"quantity": quantity, "seed": stat, "value": value, "n_seeds": len(values)})
    per_seed["seed"] = per_seed["seed"].astype(str)
    per_seed["n_seeds"] = 1
    return pd.concat([per_seed, pd.DataFrame(summary)], ignore_index=True)[
        ["quantity", "seed", "value", "ci_low", "ci_high", "n_seeds"]
    ]


def parse_seeds(values: str | Sequence[str]) -> list[int]:
    """Seeds from the command line: one string (``"1,2"``) or its words (``["1", "2"]``, ``["1,2"]``); a
    non-integer is an error naming it."""
    if isinstance(values, str):
        values = [values]
    out = []
    for v in (x for item in values for x in str(item).split(",") if x.strip()):
        try:
            out.append(int(v))
        except ValueError:
            raise ValueError(f"--seeds: {v!r} is not an integer") from None
    return out
