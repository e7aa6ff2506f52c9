"""Stage 05_rlhf_raft: RAFT iterations guided by each reward model, with shards, resume and a record per iteration.

One iteration (:func:`raft_iteration`) from the current policy pi_i: sample ``m`` solutions per prompt
(resumable shards, shared between reward models when identical), score them with the reward model (shards),
select the best per prompt (:func:`erprm_core.raft.select`), fine-tune on the picks, save the checkpoint
atomically and evaluate it greedily (:func:`erprm_core.raft.evaluate_greedy`). :func:`run_raft` chains the
iterations of one reward model; :func:`run` is the notebook's entry (the no-RLHF baseline, every reward
model, the tables ``raft`` and ``raft_paired``, the manifest entry). On a CPU with pinned numerics it samples
iteration 1 (the same for every reward model) in shards over one-thread worker processes, then runs the
reward models' chains side by side in them (:mod:`erprm_core.running.workers`; the same records).

Files under ``runs/<profile>/raft`` (the loop's state; everything is written atomically)::

    baseline/record.json               iteration 0 (greedy accuracy of the starting policy)
    samples/<digest>/shard-*.jsonl     candidates of one (policy, seed, settings); shared when identical,
                                       e.g. by every reward model's iteration 1
    <reward>/iter_01/scores/           scored candidates (shards)
    <reward>/iter_01/policy/           the fine-tuned checkpoint (save_pretrained)
    <reward>/iter_01/eval.jsonl        greedy test outputs
    <reward>/iter_01/record.json       written LAST: the iteration is finished

Memory plan (a GPU, or the vLLM backend): the big models take turns on the accelerator, one at a time. The
sampler of the current policy (a vLLM engine started from the checkpoint folder or hub name, or the HF model)
is shut down before the reward model is loaded for scoring; the reward model is released after scoring; the
policy is then loaded afresh for fine-tuning with float32 master weights (trained under bf16 autocast, saved
in float32, so the next iteration starts from exactly these weights); evaluation casts it back to the run's
dtype (bfloat16 on a GPU that has it) or starts a vLLM engine from the saved checkpoint in that dtype. On a CPU with
the hf backend (the CPU profiles) every model stays loaded as before. A policy given by a hub name stays a
name (``artifacts.fingerprint`` gives ``"hub:<name>"``); it is never taken for a local folder.

Resume: :func:`run_raft` skips an iteration whose record exists with the same fingerprint (settings, reward
model identity, and the previous iteration's fingerprint, so a change anywhere upstream - a retrained PRM
or policy, other prompts - redoes the chain). An interrupted iteration is redone, reusing its finished
sample/score shards and, when complete, its saved checkpoint. An exception inside an iteration is re-raised
as :class:`RaftError` naming the reward model and the iteration.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from erprm_core import generation, io, models, raft, rollouts, training
from erprm_core.raft import BASELINE, CONTROLS, RaftSettings
from erprm_core.running import artifacts, numerics
from erprm_core.running.workers import fork_map, worker_count
from erprm_core.stages._common import PROBLEM_COLUMNS, StageConfig, record, resolve_policy, take_problems
from erprm_core.stages.raft_models import LazyReward, Policy, reward_identity, takes_turns
from erprm_core.stages.raft_tables import (
    load_records,
    manifest_info,
    raft_audit,
    raft_paired_table,
    raft_table,
    read_record,
    reward_names,
)
from erprm_core.steps import join_steps

log = logging.getLogger(__name__)

STAGE = "05_rlhf_raft"
RECORD_VERSION = 2


class RaftError(RuntimeError):
    """A RAFT iteration failed; the message names the reward model and the iteration."""


@dataclass(frozen=True)
class RaftConfig(StageConfig):
    """The knobs of 05_rlhf_raft (the notebook's parameters cell)."""

    profile: str = "smoke"
    """results/<profile> and runs/<profile> folders to use"""
    seed: int = 0
    """base seed of this stage (per-iteration seeds derive from it)"""
    reward_models: str = "er_1,hard,soft,orm"
    """PRM rules from 03 (er_<eta>, hard, soft, orm), or random, oracle"""
    iterations: int = 1
    """RAFT iterations per reward model (the paper: 3)"""
    m: int = 4
    """samples per prompt, best one kept (the paper: 16)"""
    n_prompts: int = 16
    """RAFT training prompts (first n of the raft split; 0 for all)"""
    n_test: int = 32
    """test problems for greedy accuracy (first n of the test split; 0 for all)"""
    lr: float = 1e-4
    """SFT learning rate of iteration 1"""
    lr_decay: float = 0.5
    """learning rate factor per further iteration (geometric schedule)"""
    lr_schedule: str = "geometric"
    """geometric (lr_decay each iteration) or linear, lr (T-i+1)/T as the authors"""
    epochs: float = 1.0
    """SFT epochs per iteration (the paper: 2)"""
    temperature: float = 1.0
    """sampling temperature of the candidates (evaluation is greedy)"""
    top_p: float = 1.0
    """nucleus sampling of the candidates"""
    aggregation: str = "min"
    """step-score aggregation of PRMs: min, prod, last, mean (ORM: always last)"""
    max_new_tokens: int = 128
    """token limit of a solution"""
    batch_size: int = 64
    """sequences per sampling / scoring batch"""
    train_batch_size: int = 8
    """SFT batch size"""
    exclude_truncated: bool = True
    """candidates cut at the token limit cannot be picked (counted in the audit)"""
    prompt_template: str = "plain"
    """policy prompt format: plain (tiny policy) or metamath"""
    backend: str = "hf"
    """sampling backend: hf or vllm"""
    device: str = "auto"
    """auto, cpu or cuda"""
    torch_threads: int = 0
    """CPU threads for torch (0: auto, the cores idle at the start)"""
    cpu_numerics: str = "portable"
    """CPU kernel paths: portable (pinned: the same bits on any x86-64 CPU with AVX2) or default"""

    def settings(self) -> RaftSettings:
        """The :class:`~erprm_core.raft.RaftSettings` of these knobs (``shard_size`` keeps its default)."""
        shared = [f for f in RaftSettings.__dataclass_fields__ if hasattr(self, f)]
        return RaftSettings(**{f: getattr(self, f) for f in shared})


@dataclass
class RaftStageResult:
    """What :func:`run` returns: the ``raft`` and ``raft_paired`` tables, the audit and the manifest info."""

    table: pd.DataFrame
    paired: pd.DataFrame
    audit: pd.DataFrame
    info: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------
# Sampling and the policy of an iteration
# ----------------------------------------------------------------------------------------------------


def _digest(obj: Any) -> str:
    return artifacts.digest(obj, default=str)


def _sampling_key(st: RaftSettings) -> dict[str, Any]:
    """The settings that decide the candidates (not the learning rate, the aggregation, ...)."""
    keys = ("m", "temperature", "top_p", "max_new_tokens", "seed", "batch_size", "shard_size",
            "prompt_template", "backend")  # fmt: skip
    return {k: getattr(st, k) for k in keys}


def _problems_digest(problems: Sequence[dict[str, Any]]) -> str:
    return _digest([{k: p.get(k) for k in PROBLEM_COLUMNS} for p in problems])


def _sample(
    sampler: Any,
    problems: Sequence[dict[str, Any]],
    n: int,
    temperature: float,
    seed: int,
    settings: RaftSettings,
) -> list[dict[str, Any]]:
    return rollouts.sample_solutions(
        sampler,
        problems,
        n=n,
        temperature=temperature,
        top_p=settings.top_p if temperature > 0 else 1.0,
        max_new_tokens=settings.max_new_tokens,
        seed=seed,
        prompt_template=settings.prompt_template,
    )


def _save_checkpoint_atomically(folder: Path, write: Callable[[Path], Any], fingerprint: str) -> Any:
    """``write(tmp)`` fills a temp folder, then renamed to ``folder`` (never a half-written checkpoint);
    returns what ``write`` returned."""
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    out = write(tmp)
    io.atomic_write_text(tmp / "raft_fingerprint.txt", fingerprint + "\n")
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return out


def _finished_checkpoint(folder: Path, fingerprint: str) -> bool:
    marker = folder / "raft_fingerprint.txt"
    return marker.is_file() and marker.read_text().strip() == fingerprint


# ----------------------------------------------------------------------------------------------------
# One iteration
# ----------------------------------------------------------------------------------------------------


def _iteration_settings(settings: RaftSettings | None, **overrides: Any) -> RaftSettings:
    """``settings`` with this iteration's m, temperature, lr, epochs, aggregation and seed; checked."""
    base = settings or RaftSettings()
    st = RaftSettings(**{**asdict(base), **overrides})
    st.check()
    return st


def _iteration_fingerprint(
    policy_path: Path | str, reward_name: str, st: RaftSettings, prompts_digest: str, test_problems: Sequence
) -> str:
    """The default fingerprint of an iteration: a digest of its inputs."""
    return _digest(
        {
            "policy": artifacts.fingerprint(policy_path),
            "reward": reward_name,
            "settings": asdict(st),
            "prompts": prompts_digest,
            "test": _problems_digest(test_problems),
        }
    )


def _sample_candidates(
    current: Policy, policy_path: Path | str, prompts: Sequence[dict[str, Any]], st: RaftSettings,
    samples_dir: Path, prompts_digest: str, desc: str, workers: int = 1,
) -> tuple[list[dict[str, Any]], dict[str, Any], int]:  # fmt: skip
    """Candidates in shards, content-addressed so identical sampling is shared between reward models:
    (samples, the samples' fingerprint, shards computed here); ``workers`` one-thread processes."""
    sample_fp = {"policy": artifacts.fingerprint(policy_path), **_sampling_key(st), "prompts": prompts_digest}
    artifacts.prepare_shard_folder(samples_dir, sample_fp)

    def sample_shard(chunk: Sequence[dict[str, Any]], index: int) -> list[dict[str, Any]]:
        return _sample(current.for_sampling(), chunk, st.m, st.temperature, st.seed, st)

    computed_before = len(artifacts.shard_status(samples_dir))
    samples = artifacts.run_sharded(list(prompts), st.shard_size, samples_dir, sample_shard, raft.SAMPLE_COLUMNS,
                                    desc=desc, workers=workers)  # fmt: skip
    sampled_here = len(artifacts.shard_status(samples_dir)) - computed_before
    return samples, sample_fp, sampled_here


def _score_candidates_sharded(
    reward_model: Any, reward_name: str, by_id: dict[str, dict[str, Any]], prompts: Sequence[dict[str, Any]],
    samples: list[dict[str, Any]], st: RaftSettings, scores_dir: Path, fingerprint: str,
    sample_fp: dict[str, Any], desc: str,
) -> list[dict[str, Any]]:  # fmt: skip
    """Score records of every candidate (:func:`erprm_core.raft.score_candidates`) in shards."""
    artifacts.prepare_shard_folder(scores_dir, {"fingerprint": fingerprint, "samples": sample_fp})
    samples_by_prompt: dict[str, list[dict[str, Any]]] = {}
    for s in samples:
        samples_by_prompt.setdefault(str(s["problem_id"]), []).append(s)

    def score_shard(chunk: Sequence[dict[str, Any]], index: int) -> list[dict[str, Any]]:
        part = [s for p in chunk for s in samples_by_prompt.get(str(p["id"]), [])]
        return raft.score_candidates(reward_model, reward_name, by_id, part, st.aggregation, st)

    scores = artifacts.run_sharded(list(prompts), st.shard_size, scores_dir, score_shard, raft.SCORE_COLUMNS,
                                   desc=desc)  # fmt: skip
    if len(scores) != len(samples):
        raise ValueError(
            f"{len(samples)} candidates but {len(scores)} scores (corrupt shards in {scores_dir}?)"
        )
    return scores


def _finetune(
    current: Policy, selected: Sequence[dict[str, Any]], by_id: dict[str, dict[str, Any]], st: RaftSettings,
    fingerprint: str, out_dir: Path,
) -> tuple[dict[str, Any], Policy]:  # fmt: skip
    """Fine-tune on (prompt, best solution) and save the checkpoint ``out_dir/policy`` atomically; returns the
    training info and the fine-tuned policy (in memory: exactly the saved checkpoint)."""
    ckpt = out_dir / "policy"
    model, tok = current.for_training()
    examples = [
        {"question": by_id[str(c["problem_id"])]["question"], "solution": join_steps(c["steps"])}
        for c in selected
    ]

    gpu = models.resolve_device(st.device).type == "cuda"  # bf16 autocast over the float32 master weights
    bf16 = gpu and models.resolve_dtype("auto", st.device) == torch.bfloat16

    def write(tmp: Path) -> pd.DataFrame:
        return training.train_policy_sft(
            model,
            tok,
            examples,
            tmp,
            lr=st.lr,
            epochs=st.epochs,
            batch_size=st.train_batch_size,
            seed=st.seed,
            prompt_template=st.prompt_template,
            save=True,
            disable_tqdm=True,
            bf16=bf16,
            gradient_checkpointing=gpu,
        )

    attrs = _save_checkpoint_atomically(ckpt, write, fingerprint).attrs
    generation.free_accelerator_memory()  # on a GPU the optimizer's states go before the evaluation
    train_info = {
        "n_examples": int(attrs.get("n_examples", len(examples))),
        "n_truncated": int(attrs.get("n_truncated", 0)),
        "global_steps": int(attrs.get("global_steps", 0)),
        "train_tokens": int(attrs.get("train_tokens", 0)),
        "final_train_loss": attrs.get("final_train_loss"),
    }
    io.atomic_write_json(out_dir / "train.json", train_info)
    trained = Policy(ckpt, st)  # the fine-tuned model in memory is exactly the saved checkpoint
    trained.model, trained.tokenizer = model, tok
    current.model = current.tokenizer = model = tok = None
    return train_info, trained


def _evaluate_and_record(
    trained: Policy, test_problems: Sequence[dict[str, Any]], st: RaftSettings, out_dir: Path,
    head: dict[str, Any], *, stats: dict[str, Any], audit: io.Audit, samples: list[dict[str, Any]],
    samples_dir: Path, train_info: dict[str, Any], t0: float, sampled_here: int,
) -> dict[str, Any]:  # fmt: skip
    """Greedy evaluation of the fine-tuned policy, then the iteration's record (``record.json`` written last:
    the iteration is finished). ``head`` holds the record's version, reward model, iteration, fingerprint."""
    evaluation, eval_records = raft.evaluate_greedy(trained.for_sampling(), test_problems, st)
    trained.close()
    artifacts.atomic_write_jsonl(out_dir / "eval.jsonl", eval_records)

    record_ = {
        **head,
        "aggregation": st.aggregation,
        "lr": st.lr,
        "seed": st.seed,
        "settings": asdict(st),
        **stats,
        **evaluation,
        "audit": dict(sorted(audit.counts.items())),
        "audit_examples": dict(sorted(audit.examples.items())),
        "sample_tokens": int(sum(s["n_tokens"] for s in samples)),
        "samples_dir": samples_dir.name,
        "train": train_info,
        "checkpoint": "policy",
    }
    io.atomic_write_json(
        out_dir / "timing.json",
        {"wall_s": round(time.perf_counter() - t0, 2), "sample_shards_computed": sampled_here},
    )
    io.atomic_write_json(out_dir / "record.json", record_)
    return record_


def raft_iteration(
    policy_path: Path | str,
    reward_model: Any,
    prompts: Sequence[dict[str, Any]],
    *,
    m: int = 4,
    temperature: float = 1.0,
    lr: float = 1e-4,
    epochs: float = 1.0,
    aggregation: str = "min",
    seed: int = 0,
    out_dir: Path | str,
    test_problems: Sequence[dict[str, Any]],
    reward_name: str = "reward",
    iteration: int = 1,
    samples_dir: Path | str | None = None,
    fingerprint: str | None = None,
    settings: RaftSettings | None = None,
) -> dict[str, Any]:
    """One RAFT iteration from the checkpoint ``policy_path``; returns its record (also written last to
    ``out_dir/record.json``).

    ``reward_model`` is any object with ``score_batch(questions, list_of_steps) -> list[list[float]]``
    (ignored for the controls ``reward_name`` = ``random`` / ``oracle``). ``prompts`` and
    ``test_problems`` are problem records (``id, question, answer, task``). ``m``, ``temperature``, ``lr``
    (this iteration's, already decayed), ``epochs``, ``aggregation`` and ``seed`` (this iteration's) override
    ``settings``. The fine-tuned checkpoint goes to ``out_dir/policy``; candidates are cached in
    ``samples_dir`` (default ``out_dir/samples``) and scores in ``out_dir/scores`` as resumable shards.
    ``fingerprint`` identifies the iteration's inputs (default: a digest of the arguments); finished shards
    and a complete checkpoint with the same fingerprint are reused, anything else is redone.
    """
    st = _iteration_settings(settings, m=m, temperature=temperature, lr=lr, epochs=epochs,
                             aggregation=aggregation, seed=seed)  # fmt: skip
    if not prompts:
        raise ValueError("no RAFT prompts")
    ids = [str(p["id"]) for p in prompts]
    if len(set(ids)) != len(ids):
        raise ValueError("RAFT prompt ids must be unique (seeds and selection are per id)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prompts_digest = _problems_digest(prompts)
    if fingerprint is None:
        fingerprint = _iteration_fingerprint(policy_path, reward_name, st, prompts_digest, test_problems)
    by_id = {str(p["id"]): p for p in prompts}
    t0 = time.perf_counter()

    # 1. candidates; 2. scores; 3. selection
    samples_dir = Path(samples_dir) if samples_dir is not None else out_dir / "samples"
    current = Policy(policy_path, st)
    samples, sample_fp, sampled_here = _sample_candidates(
        current,
        policy_path,
        prompts,
        st,
        samples_dir,
        prompts_digest,
        f"RAFT {reward_name} it{iteration}: sampling",
    )
    if takes_turns(st):  # the memory plan: the sampler leaves before the reward model comes
        current.close()
    scores = _score_candidates_sharded(
        reward_model, reward_name, by_id, prompts, samples, st, out_dir / "scores", fingerprint, sample_fp,
        f"RAFT {reward_name} it{iteration}: scoring",
    )  # fmt: skip
    if takes_turns(st) and hasattr(reward_model, "release"):  # ... and leaves before fine-tuning
        reward_model.release()
    selected, audit, stats = raft.select(
        samples, scores, st.seed, prompts, sources=(samples_dir, out_dir / "scores")
    )

    # 4. fine-tune on (prompt, best solution); 5. save
    trained: Policy | None = None
    if _finished_checkpoint(out_dir / "policy", fingerprint) and (out_dir / "train.json").is_file():
        train_info = json.loads((out_dir / "train.json").read_text())
    else:
        train_info, trained = _finetune(current, selected, by_id, st, fingerprint, out_dir)
    current.close()

    # 6. greedy evaluation of the new policy (from disk when it was saved before an interruption)
    head = {
        "version": RECORD_VERSION,
        "reward_model": reward_name,
        "iteration": iteration,
        "fingerprint": fingerprint,
    }
    return _evaluate_and_record(
        trained or Policy(out_dir / "policy", st), test_problems, st, out_dir, head, stats=stats, audit=audit,
        samples=samples, samples_dir=samples_dir, train_info=train_info, t0=t0, sampled_here=sampled_here,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# The loop over iterations of one reward model
# ----------------------------------------------------------------------------------------------------


def _aggregation_for(reward_name: str, aggregation: str) -> str:
    """The ORM scores whole solutions: its 'last' score is the outcome estimate, whatever ``aggregation``."""
    return "last" if reward_name == "orm" else aggregation


def baseline_record(
    policy_path: Path | str,
    test_problems: Sequence[dict[str, Any]],
    settings: RaftSettings,
    out_dir: Path | str,
) -> dict[str, Any]:
    """Iteration 0: greedy accuracy of the starting policy, computed once (``out_dir/record.json``)."""
    out_dir = Path(out_dir)
    fp = _digest(
        {
            "policy": artifacts.fingerprint(policy_path),
            "test": _problems_digest(test_problems),
            "max_new_tokens": settings.max_new_tokens,
            "prompt_template": settings.prompt_template,
            "backend": settings.backend,
            "batch_size": settings.batch_size,
            "version": RECORD_VERSION,
        }
    )
    old = read_record(out_dir / "record.json")
    if old is not None and old.get("fingerprint") == fp:
        return old
    start = Policy(policy_path, settings)
    evaluation, eval_records = raft.evaluate_greedy(start.for_sampling(), test_problems, settings)
    start.close()
    artifacts.atomic_write_jsonl(out_dir / "eval.jsonl", eval_records)
    rec = {
        "version": RECORD_VERSION,
        "reward_model": BASELINE,
        "iteration": 0,
        "fingerprint": fp,
        **evaluation,
    }
    io.atomic_write_json(out_dir / "record.json", rec)
    return rec


def _start_key(start_policy: Path | str) -> str:
    """What stands for "the previous iteration" before iteration 1: the starting policy's fingerprint."""
    return f"start:{artifacts.fingerprint(start_policy)}"


def _samples_dir(out_root: Path, previous: str, st: RaftSettings, it: int, prompts_digest: str) -> Path:
    """The content-addressed folder of iteration ``it``'s candidates, sampled from the policy ``previous``
    (its fingerprint): shared by every reward model whose chain reaches the same policy."""
    key = {**_sampling_key(st), "seed": raft.iteration_seed(st.seed, it)}
    return out_root / "samples" / _digest({"policy": previous, **key, "prompts": prompts_digest})


def sample_first_iteration(
    start_policy: Path | str, prompts: Sequence[dict[str, Any]], out_root: Path | str, st: RaftSettings,
    workers: int,
) -> None:  # fmt: skip
    """Sample iteration 1's candidates (the same for every reward model: they all start from
    ``start_policy``) in ``workers`` one-thread processes, into the folder the chains read them from."""
    it_st = _iteration_settings(st, seed=raft.iteration_seed(st.seed, 1))
    previous = _start_key(start_policy)
    digest = _problems_digest(prompts)
    samples_dir = _samples_dir(Path(out_root), previous, st, 1, digest)
    policy = Policy(start_policy, it_st)
    _sample_candidates(
        policy, start_policy, prompts, it_st, samples_dir, digest, "RAFT it1: sampling", workers
    )
    policy.close()


def _run_iteration(
    reward: LazyReward, reward_name: str, it: int, iterations: int, *, old: dict[str, Any] | None,
    it_dir: Path, fp: str, lr_i: float, aggregation: str, policy_path: Path | str, previous: str,
    prompts: Sequence[dict[str, Any]], test_problems: Sequence[dict[str, Any]], out_root: Path,
    common: dict[str, Any], st: RaftSettings,
) -> dict[str, Any]:  # fmt: skip
    """Redo iteration ``it`` (its old record, made with other inputs, is removed first); a failure becomes a
    RaftError naming the reward model and the iteration."""
    if old is not None:  # made with other settings or inputs: never report it again
        log.info("RAFT %s iteration %d: inputs or settings changed, redone", reward_name, it)
        (it_dir / "record.json").unlink()
    try:
        scorer = None if reward_name in CONTROLS else reward  # loaded at its first scoring call
        samples_dir = _samples_dir(out_root, previous, st, it, common["prompts"])
        rec = raft_iteration(
            policy_path,
            scorer,
            prompts,
            m=st.m,
            temperature=st.temperature,
            lr=lr_i,
            epochs=st.epochs,
            aggregation=aggregation,
            seed=raft.iteration_seed(st.seed, it),
            out_dir=it_dir,
            test_problems=test_problems,
            reward_name=reward_name,
            iteration=it,
            samples_dir=samples_dir,
            fingerprint=fp,
            settings=st,
        )
    except Exception as exc:
        raise RaftError(
            f"RAFT with reward model {reward_name!r} failed at iteration {it} of {iterations} "
            f"({type(exc).__name__}: {exc}); finished iterations are kept in {out_root / reward_name}, "
            "rerun to resume"
        ) from exc
    log.info(
        "RAFT %s iteration %d: greedy accuracy %.3f [%.3f, %.3f], selected %.3f vs sample %.3f",
        reward_name,
        it,
        rec["greedy_accuracy"],
        rec["ci_low"],
        rec["ci_high"],
        rec["selected_outcome"][0],
        rec["sample_outcome"][0],
    )
    return rec


def run_raft(
    reward_name: str,
    reward: Any,
    *,
    start_policy: Path | str,
    prompts: Sequence[dict[str, Any]],
    test_problems: Sequence[dict[str, Any]],
    out_root: Path | str,
    iterations: int = 3,
    settings: RaftSettings | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """RAFT with one reward model for ``iterations`` iterations; returns one record per iteration.

    ``reward`` is a PRM checkpoint folder (loaded with ProcessRewardModel.from_pretrained, only if an
    iteration must run), an object with ``score_batch``, or None for the controls ``random``/``oracle``.
    Iteration ``i`` starts from iteration ``i - 1``'s checkpoint (``start_policy`` for i = 1) and uses
    ``iteration_lr(lr, lr_decay, i, lr_schedule, iterations)`` and ``iteration_seed(seed, i)``.
    Folders: ``out_root/<reward_name>/iter_NN`` and the shared ``out_root/samples``. Finished iterations
    (same fingerprint) are reused; an exception is re-raised as :class:`RaftError` naming
    ``reward_name`` and the iteration.
    """
    st = settings or RaftSettings()
    st.check()
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    if reward is None and reward_name not in CONTROLS:
        raise ValueError(
            f"reward model {reward_name!r} needs a checkpoint path or a scorer (None is only for {CONTROLS})"
        )
    out_root = Path(out_root)
    folder = out_root / reward_name
    aggregation = _aggregation_for(reward_name, st.aggregation)
    common = {
        "reward": reward_identity(reward, reward_name),
        "reward_model": reward_name,
        "aggregation": aggregation,
        "settings": asdict(st),
        "prompts": _problems_digest(prompts),
        "test": _problems_digest(test_problems),
        "version": RECORD_VERSION,
    }
    previous = _start_key(start_policy)
    policy_path: Path | str = start_policy  # a hub name stays a name
    scorer = LazyReward(reward, reward_name, st)
    records = []
    bar = io.progress(range(1, iterations + 1), desc=f"RAFT {reward_name}", unit="iter", disable=not progress)
    for it in bar:
        lr_i = raft.iteration_lr(st.lr, st.lr_decay, it, st.lr_schedule, iterations)
        fp = _digest({**common, "iteration": it, "lr": lr_i, "previous": previous})
        it_dir = folder / f"iter_{it:02d}"
        rec = read_record(it_dir / "record.json")
        if rec is not None and rec.get("fingerprint") == fp:
            log.info("RAFT %s iteration %d: finished earlier, reused", reward_name, it)
        else:
            rec = _run_iteration(
                scorer, reward_name, it, iterations, old=rec, it_dir=it_dir, fp=fp, lr_i=lr_i,
                aggregation=aggregation, policy_path=policy_path, previous=previous, prompts=prompts,
                test_problems=test_problems, out_root=out_root, common=common, st=st,
            )  # fmt: skip
        records.append(rec)
        previous = fp
        policy_path = it_dir / "policy"
    return records


# ----------------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------------


def reward_paths(profile: str, reward_models: str | Sequence[str]) -> dict[str, Path | None]:
    """Checkpoint folder of every named reward model (None for the controls); a missing one raises an
    ArtifactError naming stage 03_train_prm."""
    P = artifacts.paths(profile)
    out: dict[str, Path | None] = {}
    for name in reward_names(reward_models):
        if name in CONTROLS:
            out[name] = None
        else:
            out[name] = artifacts.require(
                P.prm(name), "03_train_prm", profile, f"PRM checkpoint for rule {name!r}"
            )
    return out


def run(config: RaftConfig, *, keep_going: bool = True, progress: bool = True) -> RaftStageResult:
    """Stage 05_rlhf_raft: RAFT for every reward model of ``config.reward_models``; the tidy tables.

    Inputs: the policy of 00_policy, the first ``n_prompts`` RAFT prompts and the first ``n_test`` test
    problems (0 = all), one PRM checkpoint per rule from 03_train_prm (``random``/``oracle`` need none).
    With ``keep_going`` a failing reward model does not stop the others; the failures are raised together
    at the end (a :class:`RaftError` naming each reward model and iteration) after all
    finished work is saved. Writes the tables ``raft`` (:func:`~erprm_core.stages.raft_tables.raft_table`)
    and ``raft_paired`` and the manifest entry.
    """
    c = config
    P = artifacts.paths(c.profile)
    start_policy = resolve_policy(c.profile)  # the 00 checkpoint, or the hub policy 00 recorded
    artifacts.require(P.problem_file("raft"), "00_policy", c.profile, "RAFT prompts")
    rewards = reward_paths(c.profile, c.reward_models)  # names 03_train_prm when a PRM checkpoint is missing
    prompts = take_problems(P.problem_file("raft"), c.n_prompts, "RAFT prompts (n_prompts)", c.profile, "00_policy",
                            strict=True)  # fmt: skip
    test = take_problems(P.problem_file("test"), c.n_test, "test problems (n_test)", c.profile, "00_policy",
                         strict=True)  # fmt: skip
    st = c.settings()
    st.check()
    numerics_info = numerics.configure(c.cpu_numerics, c.torch_threads)  # first: before any tensor operation
    torch_threads = numerics_info["torch_threads"]
    workers = worker_count(torch_threads, pinned=c.cpu_numerics != "default", backend=st.backend)
    base = baseline_record(start_policy, test, st, P.raft / BASELINE)
    if workers > 1 and c.iterations >= 1:
        sample_first_iteration(start_policy, prompts, P.raft, st, workers)

    def chain(name: str) -> tuple[list[dict[str, Any]], str | None]:
        """One reward model's iterations: (records, None), or ([], the failure) with ``keep_going``."""
        try:
            return run_raft(name, rewards[name], start_policy=start_policy, prompts=prompts, test_problems=test,
                            out_root=P.raft, iterations=c.iterations, settings=st, progress=progress), None  # fmt: skip
        except RaftError as exc:
            if not keep_going:
                raise
            log.error("%s", exc)
            return [], str(exc)

    chains = fork_map(chain, list(rewards), workers, "RAFT", "reward model")
    records = [r for recs, _ in chains for r in recs]
    failures = [failure for _, failure in chains if failure]
    if failures:
        raise RaftError("; ".join(failures))
    table = raft_table(base, records)
    artifacts.write_table(table, c.profile, "raft")
    paired = raft_paired_table(load_records(c.profile, c.reward_models, c.iterations))
    artifacts.write_table(paired, c.profile, "raft_paired")
    audit = raft_audit(c.profile, c.reward_models, c.iterations)
    info = manifest_info(c.profile, c.reward_models, c.iterations)
    record(c.profile, STAGE, c, torch_threads=torch_threads, workers=workers, numerics=numerics_info, **info)
    return RaftStageResult(table, paired, audit, info)
