"""The models of a RAFT iteration, loaded when first needed, and the memory plan that decides when they go.

:class:`Policy` is one checkpoint folder or hub name: its Hugging Face model (fine-tuning and the ``hf``
sampling backend) or a vLLM engine of it. :class:`LazyReward` is a reward model, loaded at its first scoring
call (never for the controls). :func:`takes_turns` says whether the big models must take turns on the
accelerator (a GPU or vLLM) or may all stay loaded (the CPU profiles). Used by :mod:`erprm_core.stages.raft`.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from erprm_core import generation, models
from erprm_core.prm import ProcessRewardModel
from erprm_core.raft import CONTROLS, RaftSettings
from erprm_core.running import artifacts


def load_policy(path: Path | str, settings: RaftSettings, dtype: str = "auto") -> tuple[Any, Any]:
    """(model, tokenizer) of a policy checkpoint on the run's device, in ``dtype``."""
    return models.load_causal_lm(path, device=settings.device, dtype=dtype)


def takes_turns(settings: RaftSettings) -> bool:
    """True when the big models of an iteration take turns on the accelerator (the module's memory plan): with
    the vLLM backend or on a GPU. False on a CPU with the hf backend, where everything stays loaded."""
    return settings.backend == "vllm" or models.resolve_device(settings.device).type == "cuda"


class Policy:
    """What an iteration needs from one checkpoint folder or hub name (a name stays a ``str``), loaded lazily:
    the Hugging Face model (fine-tuning and the ``hf`` sampling backend) and, with ``backend="vllm"``, a vLLM
    sampler of the same folder or name."""

    def __init__(self, path: Path | str, settings: RaftSettings):
        self.path, self.settings = path, settings
        self.model: Any = None
        self.tokenizer: Any = None
        self.sampler: Any = None

    def hf(self) -> tuple[Any, Any]:
        """(model, tokenizer) from the checkpoint (a vLLM sampler is released first to free its memory)."""
        if self.model is None:
            self.release_sampler()
            self.model, self.tokenizer = load_policy(self.path, self.settings)
        return self.model, self.tokenizer

    def for_sampling(self) -> Any:
        """A sampler of the configured backend (hf: a new one over the loaded model, in the run's dtype; vllm:
        one engine started from the folder or name, with nothing else of this policy on the accelerator)."""
        st = self.settings
        if st.backend != "vllm":
            model, tokenizer = self.hf()
            run_dtype = models.resolve_dtype("auto", st.device)
            if next(model.parameters()).dtype != run_dtype:
                model.to(run_dtype)  # a policy just trained with float32 master weights
            return generation.make_sampler(model, tokenizer, st.backend, st.batch_size)
        if self.sampler is None:
            self.model = self.tokenizer = None
            generation.free_accelerator_memory()
            self.sampler = generation.load_sampler(self.path, "vllm", st.device, batch_size=st.batch_size)
        return self.sampler

    def for_training(self) -> tuple[Any, Any]:
        """(model, tokenizer) to fine-tune, with float32 weights: the loaded model when it is float32 (the CPU
        path), else everything of this policy is freed and the checkpoint loaded afresh in float32."""
        if self.model is None or next(self.model.parameters()).dtype != torch.float32:
            self.close()
            self.model, self.tokenizer = load_policy(self.path, self.settings, dtype="float32")
        return self.model, self.tokenizer

    def release_sampler(self) -> None:
        """Shut the vLLM engine (if any) down before the HF model needs the accelerator."""
        if self.sampler is not None:
            sampler, self.sampler = self.sampler, None
            generation.release_sampler(sampler)

    def close(self) -> None:
        """Drop everything."""
        self.model = self.tokenizer = None
        self.release_sampler()
        generation.free_accelerator_memory()


def reward_identity(reward: Any, reward_name: str) -> str:
    """What identifies a reward model in the fingerprints: the control's name, a checkpoint's fingerprint, or
    a scorer object's ``fingerprint`` / ``name`` / type."""
    if reward_name in CONTROLS:
        return reward_name
    if isinstance(reward, str | Path):
        return artifacts.fingerprint(reward)
    return str(getattr(reward, "fingerprint", None) or getattr(reward, "name", None) or type(reward).__name__)


def load_reward(reward: Any, reward_name: str, settings: RaftSettings) -> Any:
    """The scorer of ``reward``: a PRM loaded from a checkpoint path, the given scorer object, or None for a
    control; anything else is a TypeError naming the reward model."""
    if reward_name in CONTROLS:
        return None
    if isinstance(reward, str | Path):
        return ProcessRewardModel.from_pretrained(reward, device=settings.device)
    if not hasattr(reward, "score_batch"):
        raise TypeError(
            f"reward model {reward_name!r}: expected a checkpoint path or an object with score_batch"
        )
    return reward


class LazyReward:
    """The reward model of a run, loaded at its first scoring call (never for the controls, nor when every
    score shard is finished); :meth:`release` drops a PRM loaded here (the memory plan frees it after each
    iteration's scoring)."""

    def __init__(self, reward: Any, reward_name: str, settings: RaftSettings):
        self.reward, self.reward_name, self.settings = reward, reward_name, settings
        self.scorer: Any = None

    def get(self) -> Any:
        """The scorer (None for the controls)."""
        if self.scorer is None and self.reward_name not in CONTROLS:
            self.scorer = load_reward(self.reward, self.reward_name, self.settings)
        return self.scorer

    def score_batch(
        self, questions: Sequence[str], list_of_steps: Sequence[Sequence[str]], batch_size: int | None = None
    ) -> list[list[float]]:
        """The scorer's ``score_batch`` (``batch_size`` passed on only where the scorer takes one)."""
        scorer = self.get()
        takes = batch_size is not None and "batch_size" in inspect.signature(scorer.score_batch).parameters
        return scorer.score_batch(questions, list_of_steps, **({"batch_size": batch_size} if takes else {}))

    def release(self) -> None:
        """Drop a PRM loaded from a checkpoint path (a scorer object given by the caller is kept)."""
        if isinstance(self.reward, str | Path) and self.scorer is not None:
            self.scorer = None
            generation.free_accelerator_memory()
