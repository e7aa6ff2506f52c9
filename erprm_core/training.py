"""Training on the Hugging Face Trainer: policy supervised fine-tuning (this section) and PRM training.

Policy SFT (:func:`train_policy_sft`) fine-tunes any causal LM on (prompt, solution) pairs with the loss on
the solution tokens only (prompt tokens get label -100), EOS appended, right padding. The same function
trains the tiny from-scratch policy on a CPU and a 7B model under ``accelerate launch`` (bf16 follows the
model's dtype; gradient checkpointing optional). :func:`prepare_policy` is 00_policy's stage function:
train the tiny policy (embedded default) or load a hub/local policy; :func:`evaluate_policy` measures
greedy accuracy and pass@k. Used by 00_policy and raft (SFT), 03_train_prm (PRM section).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from erprm_core.steps import policy_prompt

log = logging.getLogger(__name__)

# ====================================================================================================
# Policy supervised fine-tuning
# ====================================================================================================


def _as_pairs(examples: Sequence[Any], prompt_template: str) -> list[tuple[str, str]]:
    """(prompt, solution) pairs from pairs or problem/rollout records (``question`` + ``solution``/``steps``)."""
    pairs = []
    for i, ex in enumerate(examples):
        if isinstance(ex, dict):
            if "question" not in ex:
                raise ValueError(f"examples[{i}]: record has no 'question' (keys {sorted(ex)})")
            if "solution" in ex and ex["solution"]:
                solution = ex["solution"]
            elif "steps" in ex:
                solution = "\n".join(ex["steps"])
            else:
                raise ValueError(f"examples[{i}]: record has neither a non-empty 'solution' nor 'steps'")
            pairs.append((policy_prompt(ex["question"], prompt_template), solution))
        else:
            try:
                prompt, solution = ex
            except (TypeError, ValueError) as exc:
                raise ValueError(
                    f"examples[{i}]: expected (prompt, solution) or a record, got {ex!r}"
                ) from exc
            pairs.append((str(prompt), str(solution)))
    return pairs


def tokenize_sft_example(
    tokenizer, prompt: str, solution: str, max_length: int | None = None
) -> dict[str, Any]:
    """Token ids and labels of ``prompt + solution + EOS`` with the prompt tokens masked (-100).

    The text is tokenised once (so tokens at the prompt/solution boundary are those the model sees at
    inference); a token is a solution token when it ends after the prompt. Returns ``input_ids``,
    ``labels`` and ``truncated`` (True when ``max_length`` cut the sequence).
    """
    text = prompt + solution
    special = set(tokenizer.all_special_ids)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        labels = [
            tid if (end > len(prompt) and tid not in special) else -100
            for tid, (_, end) in zip(ids, enc["offset_mapping"], strict=True)
        ]
    else:  # no offsets: the prompt's own tokens are taken as the prefix (true for common tokenizers)
        n_prompt = len(tokenizer(prompt, add_special_tokens=True)["input_ids"])
        ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
        labels = [-100] * min(n_prompt, len(ids)) + ids[n_prompt:]
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; set tokenizer.eos_token before training")
    ids.append(tokenizer.eos_token_id)
    labels.append(tokenizer.eos_token_id)
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "labels": labels, "truncated": truncated}


class SFTCollator:
    """Right-pad ``input_ids`` (pad id) and ``labels`` (-100) of a batch; build the attention mask."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Pad one batch of tokenised examples."""
        width = max(len(b["input_ids"]) for b in batch)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[i, :n] = torch.tensor(b["input_ids"])
            labels[i, :n] = torch.tensor(b["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, items: list[dict[str, Any]]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]


def _common_training_kwargs(
    epochs,
    max_steps,
    batch_size,
    grad_accum,
    lr,
    lr_scheduler,
    warmup_ratio,
    weight_decay,
    max_grad_norm,
    logging_steps,
    seed,
    bf16,
) -> dict[str, Any]:
    """TrainingArguments shared by policy SFT and PRM training: one recipe, no eval, one save at the end."""
    return dict(
        num_train_epochs=epochs,
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum,
        learning_rate=lr,
        lr_scheduler_type=lr_scheduler,
        warmup_steps=warmup_ratio,  # a float < 1 is a ratio of the total steps in transformers 5
        weight_decay=weight_decay,
        max_grad_norm=max_grad_norm,
        logging_strategy="steps",
        logging_steps=logging_steps,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        seed=seed,
        data_seed=seed,
        bf16=bool(bf16),
    )


LOSS_LOG_COLUMNS = ["step", "epoch", "loss", "learning_rate", "grad_norm"]


def _train_and_log(trainer: Any, model: Any) -> tuple[Any, float, pd.DataFrame]:
    """Run ``trainer.train()`` (KV cache off meanwhile); return its output, the wall time and the loss log
    (one row per logged step, ``LOSS_LOG_COLUMNS``). The model is left in eval mode."""
    was_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = False
    start = time.perf_counter()
    out = trainer.train()
    runtime = time.perf_counter() - start
    model.config.use_cache = was_cache
    model.eval()
    rows = [{c: h.get(c) for c in LOSS_LOG_COLUMNS} for h in trainer.state.log_history if "loss" in h]
    return out, runtime, pd.DataFrame(rows, columns=LOSS_LOG_COLUMNS)


def _model_dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


def train_policy_sft(
    model,
    tokenizer,
    examples: Sequence[Any],
    output_dir: str | Path,
    *,
    epochs: float = 1.0,
    max_steps: int = -1,
    lr: float = 1e-5,
    batch_size: int = 8,
    grad_accum: int = 1,
    seed: int = 0,
    max_length: int | None = 1024,
    lr_scheduler: str = "cosine",
    warmup_ratio: float = 0.03,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    logging_steps: int = 10,
    bf16: bool | None = None,
    gradient_checkpointing: bool = False,
    group_by_length: bool = True,
    prompt_template: str = "plain",
    save: bool = True,
    disable_tqdm: bool | None = None,
    extra_args: dict[str, Any] | None = None,
) -> pd.DataFrame:
    """Fine-tune ``model`` on (prompt, solution) pairs, loss on solution tokens only; return the loss log.

    ``examples``: ``(prompt, solution)`` pairs, or records with ``question`` and ``solution`` (or
    ``steps``), prompted with :func:`erprm_core.steps.policy_prompt` (``prompt_template``). EOS is appended,
    batches are right-padded. ``max_steps > 0`` overrides ``epochs``. ``bf16=None`` follows the model's
    dtype (bf16 weights -> bf16 mixed precision). Runs unchanged under ``accelerate launch`` (the Trainer
    handles devices and DDP/DeepSpeed; ``extra_args`` go to ``TrainingArguments``, e.g. ``deepspeed``).
    No evaluation or checkpoints during training; with ``save`` the model and tokenizer are written once
    to ``output_dir`` at the end (``save_pretrained``).

    Returns one row per logged step (``step``, ``epoch``, ``loss``, ``learning_rate``, ``grad_norm``);
    ``df.attrs`` holds ``train_tokens`` (tokens seen, padding excluded, x epochs), ``max_example_tokens``
    (longest prompt + solution + EOS), ``n_examples``,
    ``n_truncated``, ``train_runtime_s`` and ``global_steps``.
    """
    from transformers import Trainer, TrainingArguments

    pairs = _as_pairs(examples, prompt_template)
    if not pairs:
        raise ValueError("examples is empty: nothing to train on")
    data = [tokenize_sft_example(tokenizer, p, s, max_length) for p, s in pairs]
    n_truncated = sum(d.pop("truncated") for d in data)
    if n_truncated:
        log.warning("%d of %d SFT examples truncated to max_length=%s", n_truncated, len(data), max_length)
    n_tokens = sum(len(d["input_ids"]) for d in data)
    if bf16 is None:
        bf16 = _model_dtype(model) == torch.bfloat16 and torch.cuda.is_available()
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token (e.g. to the EOS token)")

    args = TrainingArguments(
        output_dir=str(output_dir),
        **_common_training_kwargs(
            epochs,
            max_steps,
            batch_size,
            grad_accum,
            lr,
            lr_scheduler,
            warmup_ratio,
            weight_decay,
            max_grad_norm,
            logging_steps,
            seed,
            bf16,
        ),
        activation_checkpointing=gradient_checkpointing,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        remove_unused_columns=False,
        train_sampling_strategy="group_by_length" if group_by_length else "random",
        disable_tqdm=disable_tqdm,
        **(extra_args or {}),
    )
    if group_by_length:
        for d in data:
            d["length"] = len(d["input_ids"])  # read by the length-grouped sampler
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=_ListDataset(data),
        data_collator=SFTCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
    )
    out, runtime, df = _train_and_log(trainer, model)
    if save:
        trainer.save_model(str(output_dir))
        tokenizer.save_pretrained(str(output_dir))
    epochs_done = out.metrics.get("epoch", epochs) or 0.0
    df.attrs.update(
        max_example_tokens=max(len(d["input_ids"]) for d in data),
        train_tokens=int(round(n_tokens * epochs_done)),
        n_examples=len(data),
        n_truncated=int(n_truncated),
        train_runtime_s=runtime,
        global_steps=int(out.global_step),
        final_train_loss=float(out.training_loss) if not math.isnan(out.training_loss) else None,
    )
    return df


# ====================================================================================================
# PRM training: soft-label cross-entropy at the step tags (owned by the PRM issue; see also prm.py)
#
# At every labelled step-tag position the PRM's logits of the good and bad tokens (" +", " -") form a
# two-way softmax, trained by cross-entropy against the soft target (label, 1 - label), float32 end to end.
# Hard labels (0/1) make this the ordinary cross-entropy. Tag positions, token ids and the truncation
# policy come from erprm_core.prm (encode_for_prm), the same code the scorer uses.
# ====================================================================================================

PRM_INFO_FILE = "erprm_prm.json"  # written last into a PRM folder: its presence marks a complete checkpoint
PRM_LOG_FILE = "training_log.csv"
PRM_AUDIT_FILE = "audit.csv"


def soft_label_prm_loss(
    logits: torch.Tensor,
    positions: torch.Tensor | None,
    targets: torch.Tensor,
    *,
    good_id: int,
    bad_id: int,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean soft-label cross-entropy over the labelled step tags.

    ``logits``: (B, T, V) model logits with ``positions`` (B, K) the tag token indices, or (B, K, V)
    logits already taken at the tags with ``positions=None``. ``targets`` (B, K): the label of each tag
    (probability that the step is good). ``mask`` (B, K, bool) selects the labelled entries; by default the
    finite targets (NaN = unlabelled, e.g. ORM's earlier steps or padding). Per entry the loss is
    ``-(t * log p_good + (1 - t) * log p_bad)`` with ``(p_good, p_bad) = softmax(logit_good, logit_bad)``,
    computed in float32. Targets outside [0, 1] raise ValueError. No labelled entry gives 0 (with a graph).
    """
    from erprm_core.prm import pair_logits

    targets = targets.to(device=logits.device, dtype=torch.float32)
    if mask is None:
        mask = torch.isfinite(targets)
    mask = mask.to(device=logits.device, dtype=torch.bool)
    if positions is not None:
        pairs = pair_logits(logits, good_id, bad_id)  # (B, T, 2)
        index = positions.to(logits.device).long().unsqueeze(-1).expand(*positions.shape, 2)
        pairs = pairs.gather(1, index)  # (B, K, 2)
    else:
        pairs = pair_logits(logits, good_id, bad_id)
    t = torch.where(mask, targets, torch.zeros_like(targets))
    if bool(((t < 0) | (t > 1)).any()):
        raise ValueError("soft_label_prm_loss: targets must lie in [0, 1]")
    logp = torch.log_softmax(pairs.float(), dim=-1)
    per_tag = -(t * logp[..., 0] + (1.0 - t) * logp[..., 1])
    n = mask.sum()
    if int(n) == 0:
        return pairs.float().sum() * 0.0
    return torch.where(mask, per_tag, torch.zeros_like(per_tag)).sum() / n


class PRMCollator:
    """Right-pad a batch of PRM features into ``input_ids``, ``attention_mask`` and per-tag tensors.

    ``prm_positions`` (B, K) long, ``prm_targets`` (B, K) float32 (NaN padding) and ``prm_mask`` (B, K)
    bool, with K the largest number of labelled tags in the batch. Targets are never cast to int.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Pad one batch of features from :func:`erprm_core.prm.prm_training_features`."""
        width = max(len(b["input_ids"]) for b in batch)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        k = max(len(b["positions"]) for b in batch)
        ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        positions = torch.zeros((len(batch), k), dtype=torch.long)
        targets = torch.full((len(batch), k), float("nan"), dtype=torch.float32)
        for i, b in enumerate(batch):
            n, m = len(b["input_ids"]), len(b["positions"])
            ids[i, :n] = torch.tensor(b["input_ids"], dtype=torch.long)
            attention[i, :n] = 1
            positions[i, :m] = torch.tensor(b["positions"], dtype=torch.long)
            targets[i, :m] = torch.tensor(b["targets"], dtype=torch.float32)
        return {
            "input_ids": ids,
            "attention_mask": attention,
            "prm_positions": positions,
            "prm_targets": targets,
            "prm_mask": torch.isfinite(targets),
        }


class _PRMDataset(torch.utils.data.Dataset):
    def __init__(self, items: list[dict[str, Any]]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]


def _prm_trainer_class():
    """The Trainer subclass whose ``compute_loss`` is :func:`soft_label_prm_loss` (built lazily)."""
    from transformers import Trainer

    from erprm_core.prm import tag_logits

    class PRMTrainer(Trainer):
        """Trainer computing the soft-label PRM loss from logits taken only at the step tags."""

        loss_is_scaled_for_ga = False  # a per-micro-batch mean: the Trainer divides by the accumulation steps

        def __init__(self, *args: Any, good_id: int, bad_id: int, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.good_id, self.bad_id = good_id, bad_id

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            """Soft-label cross-entropy at the tags (``num_items_in_batch`` is unused: no "labels" key)."""
            positions = inputs.pop("prm_positions")
            targets = inputs.pop("prm_targets")
            mask = inputs.pop("prm_mask")
            logits = tag_logits(model, inputs["input_ids"], inputs["attention_mask"], positions)
            loss = soft_label_prm_loss(
                logits, None, targets, good_id=self.good_id, bad_id=self.bad_id, mask=mask
            )
            return (loss, {"logits": logits}) if return_outputs else loss

    return PRMTrainer


def _bf16_available() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def train_prm(
    base_model: Any,
    tokenizer: Any,
    records: Sequence[dict[str, Any]],
    rule: str,
    output_dir: str | Path,
    *,
    epochs: float = 1.0,
    max_steps: int = -1,
    lr: float = 1e-6,
    batch_size: int = 8,
    grad_accum: int = 1,
    max_length: int | None = 512,
    seed: int = 0,
    lr_scheduler: str = "cosine",
    warmup_ratio: float = 0.0,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    logging_steps: int = 1,
    bf16: bool | None = None,
    gradient_checkpointing: bool = False,
    step_tag: str | None = None,
    good_token: str | None = None,
    bad_token: str | None = None,
    dtype: str = "float32",
    save: bool = True,
    disable_tqdm: bool | None = None,
    extra_args: dict[str, Any] | None = None,
) -> pd.DataFrame:
    """Train one PRM on the labels of ``rule`` and save it to ``output_dir``; return the loss log.

    The checkpoint is written to ``<output_dir>.partial`` and renamed to ``output_dir`` once complete, so
    an existing ``output_dir`` is always a finished PRM.

    ``base_model``: a hub name / local folder (loaded on the CPU in ``dtype``, float32 by default so the
    optimizer keeps full-precision weights; the Trainer places it) or a model instance (then ``tokenizer`` is required; it is trained in place). ``records``: labelled
    rollouts (``question``, ``steps``, ``labels[rule]``). Samples are encoded by
    :func:`erprm_core.prm.prm_training_features` (audit in ``df.attrs["audit"]``). The Hugging Face
    Trainer runs the loop (cosine schedule by default, no evaluation, no intermediate checkpoints,
    ``report_to`` none); ``bf16=None`` means bf16 mixed precision on a bf16-capable GPU. Works under
    ``accelerate launch`` (DDP or DeepSpeed ZeRO-2, see configs/accelerate/). With ``save``, the model,
    the tokenizer, the log, the audit and ``erprm_prm.json`` (written last: marks the checkpoint
    complete) go to ``output_dir``, so :meth:`ProcessRewardModel.from_pretrained` loads it.

    Returns one row per logged step (``step``, ``epoch``, ``loss``, ``learning_rate``, ``grad_norm``);
    ``df.attrs``: ``audit`` (rows of the audit table), ``tokens`` (tag/good/bad ids), ``n_examples``,
    ``labelled_tags``, ``train_tokens``, ``train_runtime_s``, ``tokens_per_s``, ``global_steps``.
    """
    import shutil

    from transformers import TrainingArguments

    from erprm_core import artifacts, prm
    from erprm_core.steps import BAD_TOKEN, GOOD_TOKEN, STEP_TAG

    if isinstance(base_model, (str, Path)):
        from erprm_core.models import load_causal_lm

        model, loaded_tok = load_causal_lm(base_model, device="cpu", dtype=dtype, padding_side="right")
        tokenizer = tokenizer or loaded_tok
    else:
        model = base_model
        if tokenizer is None:
            raise ValueError("train_prm: a tokenizer is required when base_model is a model instance")
    ids = prm.resolve_prm_token_ids(
        tokenizer, step_tag or STEP_TAG, good_token or GOOD_TOKEN, bad_token or BAD_TOKEN
    )
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and (max_length is None or max_length > limit):
        log.info("max_length %s -> %d (the model's position limit)", max_length, limit)
        max_length = int(limit)
    features, audit = prm.prm_training_features(tokenizer, records, rule, max_length, ids)
    audit_df = audit.to_frame().assign(rule=rule)
    if not features:
        raise ValueError(
            f"rule {rule!r}: no trainable sample among {len(records)} records; audit {dict(audit.counts)}"
        )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token")
    n_tokens = sum(len(f["input_ids"]) for f in features)
    n_tags = sum(len(f["positions"]) for f in features)
    if bf16 is None:
        bf16 = _bf16_available()
    output_dir = Path(output_dir)
    work_dir = output_dir.with_name(output_dir.name + ".partial")  # renamed to output_dir once complete
    args = TrainingArguments(
        output_dir=str(work_dir),
        **_common_training_kwargs(
            epochs,
            max_steps,
            batch_size,
            grad_accum,
            lr,
            lr_scheduler,
            warmup_ratio,
            weight_decay,
            max_grad_norm,
            logging_steps,
            seed,
            bf16,
        ),
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        remove_unused_columns=False,
        disable_tqdm=disable_tqdm,
        **({"gradient_checkpointing": True} if gradient_checkpointing else {}),
        **(extra_args or {}),
    )
    trainer = _prm_trainer_class()(
        model=model,
        args=args,
        train_dataset=_PRMDataset(features),
        data_collator=PRMCollator(pad_id, pad_to_multiple_of=8 if torch.cuda.is_available() else None),
        processing_class=tokenizer,
        good_id=ids.good_id,
        bad_id=ids.bad_id,
    )
    out, runtime, df = _train_and_log(trainer, model)
    epochs_done = out.metrics.get("epoch", epochs) or 0.0
    train_tokens = int(round(n_tokens * epochs_done))
    info = {
        "rule": rule,
        "base_model": str(base_model) if isinstance(base_model, (str, Path)) else type(base_model).__name__,
        "tokens": ids.as_dict(),
        "recipe": {
            "epochs": epochs,
            "max_steps": max_steps,
            "lr": lr,
            "batch_size": batch_size,
            "grad_accum": grad_accum,
            "max_length": max_length,
            "seed": seed,
            "lr_scheduler": lr_scheduler,
            "warmup_ratio": warmup_ratio,
            "weight_decay": weight_decay,
            "bf16": bool(bf16),
        },
        "n_examples": len(features),
        "labelled_tags": n_tags,
        "train_tokens": train_tokens,
        "global_steps": int(out.global_step),
        "audit": {k: int(v) for k, v in sorted(audit.counts.items())},
    }
    if save:
        if trainer.is_world_process_zero() and work_dir.exists():
            shutil.rmtree(work_dir)  # leftovers of an interrupted save
        trainer.accelerator.wait_for_everyone()
        trainer.save_model(str(work_dir))
        if trainer.is_world_process_zero():
            tokenizer.save_pretrained(str(work_dir))
            artifacts.atomic_write_text(work_dir / PRM_LOG_FILE, df.to_csv(index=False, lineterminator="\n"))
            artifacts.atomic_write_text(
                work_dir / PRM_AUDIT_FILE, audit_df.to_csv(index=False, lineterminator="\n")
            )
            artifacts.atomic_write_json(work_dir / PRM_INFO_FILE, info)
            _replace_folder(work_dir, output_dir)
        trainer.accelerator.wait_for_everyone()
    df.attrs.update(
        audit=audit_df.to_dict("records"),
        tokens=ids.as_dict(),
        n_examples=len(features),
        labelled_tags=n_tags,
        train_tokens=train_tokens,
        train_runtime_s=runtime,
        tokens_per_s=train_tokens / runtime if runtime > 0 else float("nan"),
        global_steps=int(out.global_step),
    )
    return df


def _replace_folder(src: Path, dst: Path) -> None:
    """Move the finished folder ``src`` to ``dst``, replacing an older ``dst`` (never left half-written)."""
    import shutil

    old = dst.with_name(dst.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if dst.exists():
        dst.rename(old)
    src.rename(dst)
    if old.exists():
        shutil.rmtree(old)


def prm_checkpoint_complete(folder: str | Path) -> bool:
    """True when ``folder`` holds a PRM that :func:`train_prm` finished saving (its info file is written last)."""
    folder = Path(folder)
    return (folder / PRM_INFO_FILE).is_file() and (folder / "config.json").is_file()


def train_prm_rules(
    base_model: str | Path,
    records: Sequence[dict[str, Any]],
    rules: Sequence[str],
    output_dir_for: Any,
    *,
    retrain: bool = False,
    **recipe: Any,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """03_train_prm's stage function: one PRM per rule, all from ``base_model`` with the same recipe and seed.

    ``output_dir_for(rule)`` gives each PRM's folder (e.g. ``artifacts.paths(profile).prm``). A rule whose
    checkpoint is complete (:func:`prm_checkpoint_complete`) is skipped unless ``retrain``; its stored log
    and audit are read back, so the returned tables are the same as after an uninterrupted run.
    ``recipe`` goes to :func:`train_prm`. Returns ``(log, audit, runs)``: the loss log (rule, step, epoch,
    loss, learning_rate, grad_norm), the audit (rule, reason, count, example) and one row per rule
    (rule, trained, n_examples, labelled_tags, train_tokens, tag_id, good_id, bad_id, train_runtime_s,
    tokens_per_s).
    """
    import json

    from tqdm.auto import tqdm

    logs, audits, runs = [], [], []
    for rule in tqdm(list(rules), desc="PRMs", unit="rule"):
        folder = Path(output_dir_for(rule))
        if prm_checkpoint_complete(folder) and not retrain:
            log.info("PRM %s: complete checkpoint in %s, skipped (retrain=True to redo)", rule, folder)
            info = json.loads((folder / PRM_INFO_FILE).read_text())
            log_df = pd.read_csv(folder / PRM_LOG_FILE)
            audit_df = pd.read_csv(folder / PRM_AUDIT_FILE, keep_default_na=False)
            run = {
                "rule": rule,
                "trained": False,
                "train_runtime_s": float("nan"),
                "tokens_per_s": float("nan"),
            }
        else:
            log_df = train_prm(base_model, None, records, rule, folder, **recipe)
            info = log_df.attrs
            audit_df = pd.DataFrame(log_df.attrs["audit"])
            run = {
                "rule": rule,
                "trained": True,
                "train_runtime_s": info["train_runtime_s"],
                "tokens_per_s": info["tokens_per_s"],
            }
        run.update({k: info[k] for k in ("n_examples", "labelled_tags", "train_tokens")})
        run.update({k: info["tokens"][k] for k in ("tag_id", "good_id", "bad_id")})
        log_df = log_df.assign(rule=rule)
        log_df.attrs = {}
        logs.append(log_df)
        audits.append(audit_df.assign(rule=rule))
        runs.append(run)
    log_cols = ["rule", "step", "epoch", "loss", "learning_rate", "grad_norm"]
    audit_cols = ["rule", "stage", "reason", "count", "example"]
    return (
        pd.concat(logs, ignore_index=True)[log_cols] if logs else pd.DataFrame(columns=log_cols),
        pd.concat(audits, ignore_index=True)[audit_cols] if audits else pd.DataFrame(columns=audit_cols),
        pd.DataFrame(runs),
    )


def train_prm_stage(
    profile: str,
    *,
    rules: str | Sequence[str] = "all",
    base_model: str = "",
    heldout_fraction: float = 0.2,
    retrain: bool = False,
    **recipe: Any,
) -> dict[str, Any]:
    """03_train_prm's training half for a profile (also what ``python -m erprm_core.prm train`` runs).

    Reads the labels file (02_labels), picks ``rules`` (:func:`erprm_core.prm.select_rules`), splits
    problems into train / held-out (:func:`erprm_core.prm.split_heldout`), and trains one PRM per rule
    from ``base_model`` ("" = the profile's policy checkpoint) into ``paths(profile).prm(rule)`` with
    :func:`train_prm_rules` (complete checkpoints skipped unless ``retrain``). Returns ``rules``,
    ``train`` / ``heldout`` (records), ``log``, ``audit``, ``runs`` and ``base_model``.
    """
    from erprm_core import artifacts, prm

    P = artifacts.paths(profile)
    base = base_model or artifacts.require(P.policy, "00_policy", profile, "policy checkpoint")
    labels_file = artifacts.require(P.labels_file, "02_labels", profile, "step labels")
    records = artifacts.read_jsonl(labels_file, ["problem_id", "question", "steps", "outcome", "labels"])
    rule_list = prm.select_rules(records, rules)
    train, heldout = prm.split_heldout(records, heldout_fraction)
    if not train:
        raise ValueError(
            f"heldout_fraction={heldout_fraction} leaves no training problem ({len(records)} records)"
        )
    log_df, audit, runs = train_prm_rules(base, train, rule_list, P.prm, retrain=retrain, **recipe)
    return {
        "rules": rule_list,
        "train": train,
        "heldout": heldout,
        "log": log_df,
        "audit": audit,
        "runs": runs,
        "base_model": str(base),
    }


# ====================================================================================================
# The policy stage (00_policy): train the tiny policy or load a hub policy; evaluate it
# ====================================================================================================


@dataclass
class PolicyResult:
    """What :func:`prepare_policy` returns: the policy, where it lives, and what training did.

    ``source`` is the folder (tiny: ``runs/<profile>/policy``) or hub name that later stages load;
    ``log`` the loss per logged step (empty when nothing was trained); ``info`` the manifest entries.
    """

    model: Any
    tokenizer: Any
    source: str
    trained: bool
    log: pd.DataFrame
    info: dict[str, Any] = field(default_factory=dict)


def prepare_policy(
    profile: str,
    train_problems: Sequence[dict[str, Any]] | None = None,
    *,
    policy_name: str = "",
    seed: int = 0,
    max_number: int = 999,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    intermediate_size: int = 256,
    max_position_embeddings: int = 256,
    epochs: float = 1.0,
    max_steps: int = -1,
    lr: float = 3e-3,
    batch_size: int = 32,
    warmup_ratio: float = 0.03,
    weight_decay: float = 0.0,
    logging_steps: int = 25,
    device: str = "auto",
    dtype: str = "auto",
    prompt_template: str = "plain",
) -> PolicyResult:
    """00_policy's stage function: the embedded tiny policy, trained from scratch, or a hub/local policy.

    ``policy_name == ""``: build the word-level tokenizer (numbers ``0..max_number``) and a Llama model of
    the given size, train it on ``train_problems`` with :func:`train_policy_sft`, save it atomically to
    ``runs/<profile>/policy`` and load it back through :func:`erprm_core.models.load_causal_lm` (the same
    loader as any hub model; this is the model returned). Otherwise load ``policy_name`` (hub id or
    folder) and write nothing: later stages load it by that name. ``info`` holds the manifest entries
    (policy source, parameter count, seed, train tokens/examples/steps, train wall time, final loss).
    """
    import shutil

    from erprm_core import artifacts, models

    P = artifacts.paths(profile)
    if policy_name:
        model, tokenizer = models.load_causal_lm(policy_name, device=device, dtype=dtype)
        if P.policy.exists():  # a stale tiny policy would shadow the named one in later stages
            log.warning("removing %s: this profile now uses the policy %r", P.policy, policy_name)
            shutil.rmtree(P.policy)
        info = {
            "policy": policy_name,
            "policy_name": policy_name,  # read by evaluation.resolve_policy when runs/<profile>/policy is absent
            "trained": False,
            "n_parameters": models.count_parameters(model),
        }
        return PolicyResult(
            model,
            tokenizer,
            policy_name,
            False,
            pd.DataFrame(columns=["step", "epoch", "loss", "learning_rate"]),
            info,
        )

    if not train_problems:
        raise ValueError("train_problems is empty: the tiny policy needs SFT problems (split train_sft)")
    tokenizer = models.build_tokenizer(max_number=max_number, model_max_length=max_position_embeddings)
    model = models.build_tiny_model(
        tokenizer,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        seed=seed,
    )
    tmp = P.run / ".policy.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    start = time.perf_counter()
    train_log = train_policy_sft(
        model,
        tokenizer,
        train_problems,
        tmp,
        epochs=epochs,
        max_steps=max_steps,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        max_length=max_position_embeddings,
        warmup_ratio=warmup_ratio,
        weight_decay=weight_decay,
        logging_steps=logging_steps,
        prompt_template=prompt_template,
    )
    wall = time.perf_counter() - start
    (tmp / "training_args.bin").unlink(missing_ok=True)  # not needed to load; holds run-specific paths
    shutil.rmtree(P.policy, ignore_errors=True)
    tmp.replace(P.policy)
    loaded, tok = models.load_causal_lm(P.policy, device=device, dtype=dtype)
    info = {
        "policy": str(P.policy.relative_to(artifacts.runs_root().parent))
        if P.policy.is_relative_to(artifacts.runs_root().parent)
        else str(P.policy),
        "policy_name": "",
        "trained": True,
        "n_parameters": models.count_parameters(loaded),
        "vocab_size": len(tok),
        "train_examples": train_log.attrs["n_examples"],
        "train_tokens": train_log.attrs["train_tokens"],
        "train_steps": train_log.attrs["global_steps"],
        "train_truncated": train_log.attrs["n_truncated"],
        "max_example_tokens": train_log.attrs["max_example_tokens"],
        "train_wall_s": round(wall, 1),
        "final_loss": float(train_log["loss"].iloc[-1]) if len(train_log) else None,
    }
    return PolicyResult(loaded, tok, str(P.policy), True, train_log, info)


@dataclass
class PolicyEval:
    """What :func:`evaluate_policy` returns (tables for the notebook, records for inspection)."""

    table: pd.DataFrame  # tidy: metric, k, value, ci_low, ci_high
    by_steps: pd.DataFrame  # n_steps, n_problems, accuracy, ci_low, ci_high (greedy)
    greedy: list[dict[str, Any]]
    samples: list[dict[str, Any]]
    generated_tokens: int


def evaluate_policy(
    model,
    tokenizer,
    problems: Sequence[dict[str, Any]],
    *,
    n_samples: int = 64,
    ks: Sequence[int] = (1, 4, 16, 64),
    n_sample_problems: int | None = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 256,
    seed: int = 0,
    batch_size: int = 64,
    prompt_template: str = "plain",
    backend: str = "hf",
) -> PolicyEval:
    """Greedy accuracy (Wilson 95% interval) and pass@k at ``temperature`` on held-out ``problems``.

    Greedy decoding runs on every problem; ``n_samples`` samples per problem run on the first
    ``n_sample_problems`` (all when None) and give the unbiased pass@k estimator for each k in ``ks``
    (k > n_samples are left out) with a bootstrap 95% interval over problems. The table also has
    ``sample_accuracy`` (mean sample correctness) and ``truncated`` rates. ``by_steps`` breaks greedy
    accuracy down by the problems' ``n_steps`` (or number of reference lines when absent).
    """
    import numpy as np

    from erprm_core import evaluation, sampling

    if not problems:
        raise ValueError("no problems to evaluate")
    common = dict(
        max_new_tokens=max_new_tokens, batch_size=batch_size, prompt_template=prompt_template, backend=backend
    )
    greedy = sampling.sample_solutions(model, tokenizer, problems, 1, temperature=0.0, seed=seed, **common)
    outcome = np.array([r["outcome"] for r in greedy])
    acc, lo, hi = evaluation.accuracy_ci(outcome)
    rows = [
        {"metric": "greedy_accuracy", "k": 1, "value": acc, "ci_low": lo, "ci_high": hi},
        {"metric": "greedy_truncated", "k": 1, "value": float(np.mean([r["truncated"] for r in greedy]))},
    ]
    subset = list(problems[: n_sample_problems or len(problems)])
    samples: list[dict[str, Any]] = []
    if n_samples > 0 and subset:
        samples = sampling.sample_solutions(
            model, tokenizer, subset, n_samples, temperature=temperature, top_p=top_p, seed=seed, **common
        )
        correct = np.array([r["outcome"] for r in samples]).reshape(len(subset), n_samples)
        n_correct = correct.sum(axis=1)
        for k in [k for k in ks if k <= n_samples]:
            per_problem = np.asarray(evaluation.pass_at_k(n_correct, n_samples, k), dtype=float)
            mean, lo, hi = evaluation.bootstrap_ci(per_problem, seed=seed)
            rows.append({"metric": "pass_at_k", "k": k, "value": mean, "ci_low": lo, "ci_high": hi})
        rows.append({"metric": "sample_accuracy", "k": 1, "value": float(correct.mean())})
        rows.append(
            {"metric": "sample_truncated", "k": 1, "value": float(np.mean([r["truncated"] for r in samples]))}
        )
    table = pd.DataFrame(rows, columns=["metric", "k", "value", "ci_low", "ci_high"])

    steps = np.array([p.get("n_steps", len(p.get("solution", "").splitlines())) for p in problems])
    by = []
    for s in sorted(set(steps.tolist())):
        a, lo, hi = evaluation.accuracy_ci(outcome[steps == s])
        by.append(
            {"n_steps": s, "n_problems": int((steps == s).sum()), "accuracy": a, "ci_low": lo, "ci_high": hi}
        )
    by_steps = pd.DataFrame(by, columns=["n_steps", "n_problems", "accuracy", "ci_low", "ci_high"])
    tokens = sum(r["n_tokens"] for r in greedy) + sum(r["n_tokens"] for r in samples)
    return PolicyEval(table, by_steps, greedy, samples, tokens)


def sample_examples(
    problems: Sequence[dict[str, Any]],
    samples: Sequence[dict[str, Any]],
    n_problems: int = 3,
    per_problem: int = 2,
) -> pd.DataFrame:
    """A few sampled solutions next to the reference (for display): problem, answer, sample text, outcome."""
    by_id = {p["id"]: p for p in problems}
    rows = []
    for pid in list(dict.fromkeys(r["problem_id"] for r in samples))[:n_problems]:
        for r in [r for r in samples if r["problem_id"] == pid][:per_problem]:
            rows.append(
                {
                    "problem_id": pid,
                    "question": by_id[pid]["question"],
                    "answer": by_id[pid]["answer"],
                    "sample_index": r["sample_index"],
                    "sample": r["text"],
                    "pred": r["pred"],
                    "outcome": r["outcome"],
                }
            )
    return pd.DataFrame(
        rows, columns=["problem_id", "question", "answer", "sample_index", "sample", "pred", "outcome"]
    )
