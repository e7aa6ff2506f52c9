"""The process reward model: a Math-Shepherd-compatible wrapper around any causal LM.

A PRM reads ``question + " " + "".join(step + " ки" for step in steps)`` and, at each step tag, scores the
step by the next-token logits of the "good" and "bad" tokens (" +" / " -"):
``P(good) = softmax(logit_good, logit_bad)[0]`` (mode ``"two_token"``, the default) or the full-vocabulary
softmax probability of the good token (mode ``"full_vocab"``, what the ER-PRM code used on GSM8K). All step
scores of a solution come from ONE forward pass.

The two things training and scoring must agree on live here and nowhere else:

- :func:`resolve_prm_token_ids` -- the tag / good / bad token ids, resolved *in context* the Math-Shepherd
  way (the tag as it appears after a space, the good/bad token as it appears after the tag), each checked to
  be one token that spells the whole string.
- :func:`encode_for_prm` -- tokenisation of one solution and the token position of each step's tag
  (plus, for training, the labels that survive). Truncation keeps the beginning of the text: steps whose
  tag falls beyond ``max_length`` lose their label (counted), the rest of the sample is kept.

:func:`audit_prm_dataset` counts, per reason, every sample that training would keep or skip (nothing
disappears silently). Used by training (PRM section), 03_train_prm, 04_best_of_n, raft and the benchmarks.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from erprm_core.artifacts import Audit
from erprm_core.steps import BAD_TOKEN, GOOD_TOKEN, STEP_TAG, format_prm_input

log = logging.getLogger(__name__)

SCORING_MODES = ("two_token", "full_vocab")
AGGREGATIONS = ("min", "prod", "last", "mean")

# Statuses of one encoded sample (see encode_for_prm). Training keeps "ok" and "truncated".
STATUS_OK = "ok"
STATUS_TRUNCATED = "truncated"
STATUS_TAG_MISMATCH = "tag_count_mismatch"
STATUS_EMPTY = "empty"

__all__ = [
    "SCORING_MODES",
    "AGGREGATIONS",
    "PRMTokenIds",
    "PRMEncoding",
    "resolve_prm_token_ids",
    "tag_positions",
    "encode_for_prm",
    "prm_training_features",
    "audit_prm_dataset",
    "tag_logits",
    "pair_logits",
    "step_probabilities",
    "ProcessRewardModel",
    "aggregate",
    "select_rules",
    "heldout_fraction_of",
    "split_heldout",
    "heldout_step_scores",
    "heldout_metrics",
    "evaluate_prm_rules",
    "figure_training_curves",
    "figure_calibration",
    "figure_min_position",
    "main",
]


# ----------------------------------------------------------------------------------------------------
# Token ids: resolved once, the same way for training and scoring
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PRMTokenIds:
    """The step tag and the good/bad token strings and their ids in one tokenizer."""

    step_tag: str
    good_token: str
    bad_token: str
    tag_id: int
    good_id: int
    bad_id: int

    def as_dict(self) -> dict[str, Any]:
        """Plain dict (for manifests and result tables)."""
        return dict(self.__dict__)


def _tokenizer_name(tokenizer: Any) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def _last_token_in_context(tokenizer: Any, context: str, piece: str, what: str) -> int:
    """Id of the last token of ``context`` (which ends with ``piece``); it must spell ``piece`` alone."""
    ids = tokenizer.encode(context, add_special_tokens=False)
    if not ids:
        raise ValueError(f"tokenizer {_tokenizer_name(tokenizer)!r} encodes {context!r} to no tokens")
    token_id = int(ids[-1])
    spelled = tokenizer.decode([token_id]).strip()
    if spelled != piece or token_id == getattr(tokenizer, "unk_token_id", None):
        pieces = tokenizer.convert_ids_to_tokens(ids[-3:])
        raise ValueError(
            f"{what} {piece!r} is not a single token in context for tokenizer {_tokenizer_name(tokenizer)!r}: "
            f"{context!r} ends with tokens {pieces} (the last one spells {spelled!r}). A Math-Shepherd PRM "
            f"needs {piece!r} as one vocabulary entry; add it to the tokenizer (and resize the embeddings) "
            "or choose another token."
        )
    return token_id


def resolve_prm_token_ids(
    tokenizer: Any,
    step_tag: str = STEP_TAG,
    good_token: str = GOOD_TOKEN,
    bad_token: str = BAD_TOKEN,
) -> PRMTokenIds:
    """Ids of the step tag and the good/bad tokens, resolved in context (Math-Shepherd convention).

    tag id = last token of ``f"x {step_tag}"`` (the tag as it follows a step); good/bad id = last token of
    ``f"{step_tag} {good}"`` (the token as it would follow the tag, i.e. " +" / " -"). Each must be one
    token that decodes to exactly the string (a separate leading-space token, as SentencePiece tokenizers
    produce, is fine). Raises ValueError naming the tokenizer and the token otherwise, and when good and
    bad resolve to the same id.
    """
    tag_id = _last_token_in_context(tokenizer, f"x {step_tag}", step_tag, "step tag")
    good_id = _last_token_in_context(tokenizer, f"{step_tag} {good_token}", good_token, "good token")
    bad_id = _last_token_in_context(tokenizer, f"{step_tag} {bad_token}", bad_token, "bad token")
    if len({tag_id, good_id, bad_id}) < 3:
        raise ValueError(
            f"step tag / good / bad tokens must be three different tokens; tokenizer "
            f"{_tokenizer_name(tokenizer)!r} gives ids {tag_id}, {good_id}, {bad_id}"
        )
    return PRMTokenIds(step_tag, good_token, bad_token, tag_id, good_id, bad_id)


# ----------------------------------------------------------------------------------------------------
# Encoding: the ONE place that decides where the step tags are
# ----------------------------------------------------------------------------------------------------


def tag_positions(input_ids: Sequence[int] | torch.Tensor, tag_id: int) -> list[int]:
    """Token indices where ``input_ids == tag_id`` (the Math-Shepherd model-card rule)."""
    if isinstance(input_ids, torch.Tensor):
        return [int(i) for i in torch.nonzero(input_ids.reshape(-1) == tag_id).reshape(-1)]
    return [i for i, t in enumerate(input_ids) if int(t) == tag_id]


@dataclass
class PRMEncoding:
    """One solution tokenised for a PRM.

    ``positions[i]`` is the token index of step i's tag (None when the tag was cut by ``max_length`` or
    could not be located as a single tag token). ``status`` is "ok", "truncated" (some tags cut),
    "tag_count_mismatch" (the tag tokens in the text are not exactly one per step: "ки" inside a step, or a
    tag merged with its neighbours) or "empty" (no steps). With ``labels`` given, ``targets`` holds the
    label of each step (None for unlabelled steps) and ``labels_lost`` counts labels whose tag was cut.
    """

    input_ids: list[int]
    positions: list[int | None]
    status: str
    n_tags_found: int
    n_steps: int
    labels_lost: int = 0
    targets: list[float | None] | None = None
    text: str = field(default="", repr=False)

    @property
    def labelled(self) -> list[tuple[int, float]]:
        """(position, target) of every step that has both a surviving tag and a label."""
        if self.targets is None:
            return []
        return [
            (p, t)
            for p, t in zip(self.positions, self.targets, strict=True)
            if p is not None and t is not None
        ]


def _clean_label(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    if math.isnan(value):
        return None
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"step label {value} outside [0, 1]")
    return value


def encode_for_prm(
    tokenizer: Any,
    question: str,
    steps: Sequence[str],
    labels: Sequence[float | None] | None = None,
    max_length: int | None = None,
    ids: PRMTokenIds | None = None,
) -> PRMEncoding:
    """Tokenise ``format_prm_input(question, steps)`` and locate each step's tag token.

    The text is encoded whole, with the tokenizer's special tokens (as the Math-Shepherd model card does).
    Tag positions are the tokens equal to the tag id. With a fast tokenizer the tag *inserted* after each
    step is also located by character offsets, so that when the text holds stray tag tokens (e.g. "ки"
    inside a step) the positions still belong to the right steps; such samples get status
    "tag_count_mismatch" (training skips them, scoring still uses the located tags). A tag that is not a
    single tag token (merged or split) gets position None. Truncation to ``max_length`` keeps the
    beginning; tags beyond it get position None (status "truncated"); their labels are counted in
    ``labels_lost``. ``labels`` (one per step, None/NaN = unlabelled) must match the number of steps.
    """
    ids = ids or resolve_prm_token_ids(tokenizer)
    steps = list(steps)
    n = len(steps)
    targets = None
    if labels is not None:
        if len(labels) != n:
            raise ValueError(f"{len(labels)} labels for {n} steps")
        targets = [_clean_label(v) for v in labels]
    text = format_prm_input(question, steps, ids.step_tag)
    fast = bool(getattr(tokenizer, "is_fast", False))
    enc = tokenizer(text, add_special_tokens=True)
    input_ids = [int(t) for t in enc["input_ids"]]
    found = tag_positions(input_ids, ids.tag_id)
    if n == 0:
        return PRMEncoding(input_ids, [], STATUS_EMPTY, len(found), 0, 0, targets, text)

    if fast:
        # Character index of the tag's last character after each step, then the token holding it.
        positions: list[int | None] = []
        char = len(question) + 1
        for step in steps:
            char += len(step) + 1 + len(ids.step_tag)
            j = enc.char_to_token(char - 1)
            positions.append(j if j is not None and input_ids[j] == ids.tag_id else None)
        aligned = positions == found
    else:
        aligned = len(found) == n
        positions = list(found) if aligned else [None] * n
    status = STATUS_OK if aligned else STATUS_TAG_MISMATCH

    labels_lost = 0
    if max_length is not None and len(input_ids) > max_length:
        input_ids = input_ids[:max_length]
        cut = [p is not None and p >= max_length for p in positions]
        if any(cut):
            if targets is not None:
                labels_lost = sum(1 for c, t in zip(cut, targets, strict=True) if c and t is not None)
            positions = [None if c else p for p, c in zip(positions, cut, strict=True)]
            if status == STATUS_OK:
                status = STATUS_TRUNCATED
    return PRMEncoding(input_ids, positions, status, len(found), n, labels_lost, targets, text)


def prm_training_features(
    tokenizer: Any,
    records: Sequence[dict[str, Any]],
    rule: str | None,
    max_length: int | None,
    ids: PRMTokenIds | None = None,
    stage: str = "03_train_prm",
) -> tuple[list[dict[str, Any]], Audit]:
    """Encode labelled records for PRM training and count every sample by reason.

    Each record needs ``question`` and ``steps`` and, with ``rule`` given, ``labels[rule]`` (one value per
    step, None for unlabelled steps such as ORM's earlier steps). Reasons (one per sample):
    ``kept``; ``truncated`` (kept, some labels lost: their number goes to the ``labels_lost`` row);
    ``truncated_no_label_left`` (skipped: every labelled tag was cut); ``tag_count_mismatch`` (skipped);
    ``label_count_mismatch`` (skipped: labels and steps differ in number); ``empty`` (skipped: no steps
    or no labelled step). Returns features ``{"input_ids", "positions", "targets"}`` (targets float) and
    the :class:`~erprm_core.artifacts.Audit`.
    """
    ids = ids or resolve_prm_token_ids(tokenizer)
    audit = Audit(stage)
    features: list[dict[str, Any]] = []
    for k, rec in enumerate(records):
        name = str(rec.get("problem_id", k)) + (f"#{rec['sample_index']}" if "sample_index" in rec else "")
        steps = rec.get("steps") or []
        labels = None
        if rule is not None:
            all_labels = rec.get("labels") or {}
            if rule not in all_labels:
                raise KeyError(f"record {name} has no labels for rule {rule!r}; it has {sorted(all_labels)}")
            labels = all_labels[rule]
            if len(labels) != len(steps):
                audit.count(
                    "label_count_mismatch", example=f"{name}: {len(labels)} labels, {len(steps)} steps"
                )
                continue
        if not steps or (labels is not None and all(_clean_label(v) is None for v in labels)):
            audit.count(STATUS_EMPTY, example=f"{name}: no steps or no labelled step")
            continue
        enc = encode_for_prm(tokenizer, rec["question"], steps, labels, max_length, ids)
        if enc.status == STATUS_TAG_MISMATCH:
            audit.count(
                STATUS_TAG_MISMATCH, example=f"{name}: {enc.n_tags_found} tag tokens for {enc.n_steps} steps"
            )
            continue
        if enc.labels_lost:
            audit.count("labels_lost", enc.labels_lost, example=f"{name}: {enc.labels_lost} label(s) cut")
        pairs = enc.labelled if labels is not None else [(p, None) for p in enc.positions if p is not None]
        if not pairs:
            audit.count("truncated_no_label_left", example=f"{name}: {len(enc.input_ids)} tokens kept")
            continue
        if enc.status == STATUS_TRUNCATED:
            kept_tags = sum(p is not None for p in enc.positions)
            audit.count(
                STATUS_TRUNCATED, example=f"{name}: {kept_tags} of {enc.n_steps} tags within {max_length}"
            )
        else:
            audit.count("kept", example=f"{name}: {len(pairs)} labelled tags, {len(enc.input_ids)} tokens")
        features.append(
            {
                "input_ids": enc.input_ids,
                "positions": [p for p, _ in pairs],
                "targets": [float("nan") if t is None else float(t) for _, t in pairs],
            }
        )
    return features, audit


def audit_prm_dataset(
    tokenizer: Any,
    records: Sequence[dict[str, Any]],
    max_length: int | None,
    rule: str | None = None,
    ids: PRMTokenIds | None = None,
) -> Audit:
    """The audit of :func:`prm_training_features` alone: counts by reason (kept, truncated, labels_lost,
    tag_count_mismatch, label_count_mismatch, empty, ...) with one example each."""
    return prm_training_features(tokenizer, records, rule, max_length, ids)[1]


# ----------------------------------------------------------------------------------------------------
# Logits at the tags (shared by the training loss and the scorer)
# ----------------------------------------------------------------------------------------------------


def _accepts_logits_to_keep(model: Any) -> bool:
    """Whether the (possibly DDP/DeepSpeed-wrapped) model's forward takes ``logits_to_keep``."""
    while hasattr(model, "module"):
        model = model.module
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def tag_logits(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    positions: torch.Tensor,
    use_logits_to_keep: bool | None = None,
    past_key_values: Any = None,
) -> torch.Tensor:
    """Full-vocabulary logits at ``positions`` (B, K) -> (B, K, V), from one forward pass.

    When the model supports ``logits_to_keep`` the LM head is applied only at the union of the positions
    (saves memory and time for large vocabularies); the logits are the same as from a full forward. With
    ``past_key_values`` (a cache of the first tokens) ``input_ids`` and ``positions`` count from the end of
    the cache, and ``attention_mask`` covers cache + ``input_ids``.
    """
    if use_logits_to_keep is None:
        use_logits_to_keep = _accepts_logits_to_keep(model)
    kwargs = {}
    if past_key_values is not None:
        kwargs = {_cache_keyword(model): past_key_values, "use_cache": True}
    if use_logits_to_keep and positions.numel() > 0:
        keep = torch.unique(positions.reshape(-1))  # sorted
        logits = model(
            input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep, **kwargs
        ).logits
        index = torch.searchsorted(keep, positions)
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits
        index = positions
    b, k = index.shape
    return logits.gather(1, index.unsqueeze(-1).expand(b, k, logits.shape[-1]))


def _cache_keyword(model: Any) -> str:
    """The forward argument that takes a KV cache: ``cache`` (transformers >= 5.x) or ``past_key_values``."""
    while hasattr(model, "module"):
        model = model.module
    try:
        return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    except (TypeError, ValueError):
        return "past_key_values"


def pair_logits(logits: torch.Tensor, good_id: int, bad_id: int) -> torch.Tensor:
    """``logits[..., [good_id, bad_id]]``: column 0 is "good", column 1 is "bad" (the pinned order)."""
    return logits[..., [good_id, bad_id]]


def step_probabilities(
    logits: torch.Tensor, good_id: int, bad_id: int, scoring: str = "two_token"
) -> torch.Tensor:
    """P(good) per position from logits (..., V): two-token softmax (default) or full-vocabulary softmax."""
    if scoring == "two_token":
        return torch.softmax(pair_logits(logits, good_id, bad_id).float(), dim=-1)[..., 0]
    if scoring == "full_vocab":
        return torch.softmax(logits.float(), dim=-1)[..., good_id]
    raise ValueError(f"scoring={scoring!r} unknown; choose one of {SCORING_MODES}")


# ----------------------------------------------------------------------------------------------------
# The scorer
# ----------------------------------------------------------------------------------------------------


class ProcessRewardModel:
    """A causal LM used as a Math-Shepherd-format PRM (format, score, score_batch).

    ``scoring`` is "two_token" (softmax over the good/bad logits, default) or "full_vocab". Steps whose tag
    is lost (beyond ``max_length``, or not a single tag token) get NaN, counted in ``self.audit``.
    ``info()`` returns what to record with any result (model, scoring mode, tokens and ids).
    ``share_prefix`` ("auto", True, False): solutions of the same question in one batch run the shared
    leading tokens (the question) once and reuse their KV cache; "auto" enables it for Hugging Face models
    with a standard dynamic cache. The scores equal the unshared ones up to float rounding.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        step_tag: str = STEP_TAG,
        good_token: str = GOOD_TOKEN,
        bad_token: str = BAD_TOKEN,
        scoring: str = "two_token",
        max_length: int | None = None,
        name: str | None = None,
        share_prefix: bool | str = "auto",
    ):
        if scoring not in SCORING_MODES:
            raise ValueError(f"scoring={scoring!r} unknown; choose one of {SCORING_MODES}")
        self.model = model
        self.tokenizer = tokenizer
        self.ids = resolve_prm_token_ids(tokenizer, step_tag, good_token, bad_token)
        self.scoring = scoring
        self.max_length = max_length if max_length is not None else _default_max_length(model, tokenizer)
        self.name = name or str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
        self.audit = Audit("prm_scoring")
        self.forward_passes = 0
        self.tokens_scored = 0
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        self.pad_id = int(pad)
        self._use_keep = _accepts_logits_to_keep(model)
        if share_prefix == "auto":
            share_prefix = _supports_prefix_cache(model)
        self.share_prefix = bool(share_prefix)

    @classmethod
    def from_pretrained(
        cls,
        path_or_name: str | Path,
        step_tag: str = STEP_TAG,
        good_token: str = GOOD_TOKEN,
        bad_token: str = BAD_TOKEN,
        scoring: str = "two_token",
        *,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "auto",
        max_length: int | None = None,
        share_prefix: bool | str = "auto",
        **model_kwargs: Any,
    ) -> ProcessRewardModel:
        """Load a PRM from a hub name or a save_pretrained folder (any causal LM whose vocabulary has the tag
        and the good/bad tokens, e.g. a Math-Shepherd checkpoint). ``model_kwargs`` go to the model loader."""
        try:
            from erprm_core.models import load_causal_lm
        except ImportError:  # pragma: no cover - models.py is part of the package
            load_causal_lm = None
        if load_causal_lm is not None:
            model, tokenizer = load_causal_lm(path_or_name, device=device, dtype=dtype, **model_kwargs)
        else:  # pragma: no cover
            from transformers import AutoModelForCausalLM, AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(path_or_name))
            model = AutoModelForCausalLM.from_pretrained(str(path_or_name), **model_kwargs).eval()
        return cls(
            model,
            tokenizer,
            step_tag,
            good_token,
            bad_token,
            scoring,
            max_length,
            str(path_or_name),
            share_prefix,
        )

    # --- text ---
    def format(self, question: str, steps: Sequence[str]) -> str:
        """``question + " " + "".join(step + " ки" for step in steps)`` (with this PRM's tag)."""
        return format_prm_input(question, list(steps), self.ids.step_tag)

    def encode(self, question: str, steps: Sequence[str]) -> PRMEncoding:
        """:func:`encode_for_prm` with this PRM's tokenizer, token ids and length limit."""
        return encode_for_prm(self.tokenizer, question, steps, None, self.max_length, self.ids)

    def info(self) -> dict[str, Any]:
        """What to record with results: model name, scoring mode, tokens, ids, length limit."""
        return {
            "prm": self.name,
            "scoring": self.scoring,
            "max_length": self.max_length,
            **self.ids.as_dict(),
        }

    # --- scoring ---
    def score(self, question: str, steps: Sequence[str]) -> list[float]:
        """One P(good) per step, from one forward pass over the formatted solution."""
        return self.score_batch([question], [steps], batch_size=1)[0]

    @torch.inference_mode()
    def score_batch(
        self,
        questions: Sequence[str],
        list_of_steps: Sequence[Sequence[str]],
        batch_size: int = 16,
        progress: bool = False,
    ) -> list[list[float]]:
        """Scores of many solutions: sorted by length, batched (right padding), returned in input order."""
        if len(questions) != len(list_of_steps):
            raise ValueError(f"{len(questions)} questions but {len(list_of_steps)} step lists")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        encodings = [self.encode(q, s) for q, s in zip(questions, list_of_steps, strict=True)]
        bad = {}
        for enc in encodings:
            self.audit.count(enc.status)
            if enc.status != STATUS_OK:
                bad[enc.status] = bad.get(enc.status, 0) + 1
                self.audit.count("steps_unscored", sum(p is None for p in enc.positions))
        if bad:
            log.warning("PRM scoring: %s (steps without a located tag score NaN)", bad)
        out: list[list[float]] = [[] for _ in encodings]
        device = _model_device(self.model)
        batches = _scoring_batches(questions, encodings, batch_size, self.share_prefix)
        if progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc="PRM scoring", unit="batch")
        for batch in batches:
            encs = [encodings[i] for i in batch]
            shared = shared_prefix_length(encs) if self.share_prefix else 0
            scores = self._score_encodings(encs, device, shared)
            for i, s in zip(batch, scores, strict=True):
                out[i] = s
        return out

    def _score_encodings(
        self, encs: list[PRMEncoding], device: torch.device, shared: int = 0
    ) -> list[list[float]]:
        """One forward pass; with ``shared`` > 0 the first ``shared`` tokens (equal in every row) run once."""
        width = max(len(e.input_ids) for e in encs) - shared
        k = max(1, max(len(e.positions) for e in encs))
        input_ids = torch.full((len(encs), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(encs), shared + width), dtype=torch.long)
        positions = torch.zeros((len(encs), k), dtype=torch.long)
        for r, e in enumerate(encs):
            input_ids[r, : len(e.input_ids) - shared] = torch.tensor(e.input_ids[shared:])
            attention[r, : len(e.input_ids)] = 1
            positions[r, : len(e.positions)] = torch.tensor(
                [p - shared if p is not None else 0 for p in e.positions]
            )
        cache = None
        if shared:
            prefix = torch.tensor([encs[0].input_ids[:shared]], device=device)
            out = self.model(input_ids=prefix, use_cache=True)
            cache = out.cache if hasattr(out, "cache") else out.past_key_values  # named "cache" since 5.x
            cache.batch_repeat_interleave(len(encs))
        logits = tag_logits(
            self.model, input_ids.to(device), attention.to(device), positions.to(device), self._use_keep,
            past_key_values=cache,
        )  # fmt: skip
        probs = step_probabilities(logits, self.ids.good_id, self.ids.bad_id, self.scoring).cpu().numpy()
        self.forward_passes += 1
        self.tokens_scored += int(attention.sum()) - shared * (len(encs) - 1)
        return [
            [float(probs[r, j]) if p is not None else float("nan") for j, p in enumerate(e.positions)]
            for r, e in enumerate(encs)
        ]


def shared_prefix_length(encs: Sequence[PRMEncoding]) -> int:
    """How many leading tokens every encoding shares and no row needs logits for (0 for a single row).

    The common prefix stops before the first located tag of any row and leaves each row at least one
    token of its own, so every score is read from the per-row part of the forward pass.
    """
    if len(encs) < 2:
        return 0
    first = encs[0].input_ids
    limit = min(len(e.input_ids) for e in encs) - 1
    for e in encs:
        located = [p for p in e.positions if p is not None]
        if located:
            limit = min(limit, min(located))
    n = 0
    while n < limit and all(e.input_ids[n] == first[n] for e in encs):
        n += 1
    return n


def _scoring_batches(
    questions: Sequence[str], encodings: Sequence[PRMEncoding], batch_size: int, by_question: bool
) -> list[list[int]]:
    """Index batches, longest first (little padding); with ``by_question`` a batch holds one question only,
    so that its rows share the question's tokens."""
    longest_first = sorted(range(len(encodings)), key=lambda i: -len(encodings[i].input_ids))
    if not by_question:
        return [longest_first[i : i + batch_size] for i in range(0, len(longest_first), batch_size)]
    groups: dict[str, list[int]] = {}
    for i in longest_first:
        groups.setdefault(questions[i], []).append(i)
    batches = [g[i : i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]
    return sorted(batches, key=lambda b: -len(encodings[b[0]].input_ids))


def _supports_prefix_cache(model: Any) -> bool:
    """A Hugging Face causal LM whose default cache is the plain dynamic one (full attention everywhere)."""
    try:
        from transformers import DynamicCache, PreTrainedModel
        from transformers.cache_utils import DynamicLayer
    except ImportError:  # pragma: no cover
        return False
    if not isinstance(model, PreTrainedModel) or getattr(model.config, "sliding_window", None):
        return False
    try:
        layers = DynamicCache(config=model.config).layers
    except Exception:  # noqa: BLE001 - an architecture the cache does not know: no sharing
        return False
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def _model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def _default_max_length(model: Any, tokenizer: Any) -> int | None:
    """The model's position limit (or the tokenizer's, when it is a real number), else None."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    tok_limit = getattr(tokenizer, "model_max_length", None)
    if tok_limit is not None and tok_limit < 1_000_000:
        limit = min(limit, tok_limit) if limit else tok_limit
    return int(limit) if limit else None


def aggregate(step_scores: Sequence[float], how: str = "min") -> float:
    """Solution score from step scores: "min" (the paper's), "prod", "last" or "mean".

    NaN step scores (steps whose tag was lost) are ignored; an empty list, or one with no finite score,
    is a ValueError.
    """
    if how not in AGGREGATIONS:
        raise ValueError(f"aggregation {how!r} unknown; choose one of {AGGREGATIONS}")
    arr = np.asarray(list(step_scores), dtype=float)
    if arr.size == 0:
        raise ValueError("aggregate: no step scores (a solution needs at least one step)")
    arr = arr[~np.isnan(arr)]
    if arr.size == 0:
        raise ValueError("aggregate: every step score is NaN (no step tag was located)")
    if how == "min":
        return float(arr.min())
    if how == "prod":
        return float(np.prod(arr))
    if how == "last":
        return float(arr[-1])
    return float(arr.mean())


# ----------------------------------------------------------------------------------------------------
# 03_train_prm: rules, the held-out split, held-out evaluation and its figures
# ----------------------------------------------------------------------------------------------------


def select_rules(records: Sequence[dict[str, Any]], rules: str | Sequence[str] = "all") -> list[str]:
    """The label rules to train: ``"all"`` = every rule in the labels file (soft, ER by eta, hard, ORM
    order), or a comma list / sequence, each checked against the file (unknown -> ValueError naming them)."""
    from erprm_core.plotting import method_order

    if not records:
        raise ValueError("no labelled records: nothing to choose rules from")
    available = set(records[0].get("labels") or {})
    for rec in records[1:]:
        available &= set(rec.get("labels") or {})
    if isinstance(rules, str):
        names = [r.strip() for r in rules.split(",") if r.strip()]
    else:
        names = [str(r) for r in rules]
    if names == ["all"]:
        return method_order(available)
    unknown = [r for r in names if r not in available]
    if unknown or not names:
        raise ValueError(
            f"rules {unknown or names} not in the labels file; available: {method_order(available)}"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"rules lists a rule twice: {names}")
    return names


def heldout_fraction_of(problem_id: str, salt: str = "erprm-heldout") -> float:
    """A number in [0, 1) fixed by the problem id (SHA-256; the same in every process and Python version)."""
    import hashlib

    digest = hashlib.sha256(f"{salt}|{problem_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2.0**64


def split_heldout(
    records: Sequence[dict[str, Any]], heldout_fraction: float, salt: str = "erprm-heldout"
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, held-out) by problem id: a problem's rollouts all go to held-out when
    ``heldout_fraction_of(problem_id) < heldout_fraction``; deterministic, independent of record order.

    With ``heldout_fraction > 0`` and at least two problems, both sides get at least one problem (the one
    with the smallest / largest hash value moves over), so small profiles always have something to check.
    """
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    u = {str(r["problem_id"]): heldout_fraction_of(str(r["problem_id"]), salt) for r in records}
    held_ids = {pid for pid, v in u.items() if v < heldout_fraction}
    if heldout_fraction > 0 and len(u) >= 2:
        if not held_ids:
            held_ids = {min(u, key=u.get)}
        elif len(held_ids) == len(u):
            held_ids.discard(max(u, key=u.get))
    train = [r for r in records if str(r["problem_id"]) not in held_ids]
    held = [r for r in records if str(r["problem_id"]) in held_ids]
    return train, held


def heldout_step_scores(
    model: ProcessRewardModel, records: Sequence[dict[str, Any]], rule: str, batch_size: int = 32
) -> Any:
    """One row per held-out step: rule, problem_id, sample_index, step, n_steps, score, label (of ``rule``,
    NaN when unlabelled), outcome, and the hard label (NaN when the file has none)."""
    import pandas as pd

    scores = model.score_batch([r["question"] for r in records], [r["steps"] for r in records], batch_size)
    rows = []
    for rec, ss in zip(records, scores, strict=True):
        own = rec["labels"].get(rule) or [None] * len(ss)
        hard = rec["labels"].get("hard") or [None] * len(ss)
        for i, s in enumerate(ss):
            rows.append(
                {
                    "rule": rule,
                    "problem_id": rec["problem_id"],
                    "sample_index": rec.get("sample_index", 0),
                    "step": i,
                    "n_steps": len(ss),
                    "score": s,
                    "label": np.nan if own[i] is None else float(own[i]),
                    "hard_label": np.nan if hard[i] is None else float(hard[i]),
                    "outcome": int(rec["outcome"]),
                }
            )
    return pd.DataFrame(rows)


def _solution_frame(scores: Any) -> Any:
    """Per solution: last-step score, min score, relative position of the min, first dead step."""
    import pandas as pd

    rows = []
    for (rule, pid, si), g in scores.groupby(["rule", "problem_id", "sample_index"], sort=False):
        g = g.sort_values("step")
        s = g["score"].to_numpy()
        ok = ~np.isnan(s)
        if not ok.any():
            continue
        argmin = int(np.nanargmin(s))
        dead = np.flatnonzero(g["hard_label"].to_numpy() == 0.0)
        rows.append(
            {
                "rule": rule,
                "problem_id": pid,
                "sample_index": si,
                "outcome": int(g["outcome"].iloc[0]),
                "n_steps": len(s),
                "last": float(s[ok][-1]),
                "min": float(np.nanmin(s)),
                "argmin": argmin,
                "rel_argmin": argmin / (len(s) - 1) if len(s) > 1 else np.nan,
                "first_dead": int(dead[0]) if dead.size else -1,
            }
        )
    return pd.DataFrame(rows)


def heldout_metrics(scores: Any, n_bins: int = 10, position_bins: int = 5) -> dict[str, Any]:
    """Tables of the held-out evaluation from :func:`heldout_step_scores` rows (several rules allowed).

    Returns ``{"metrics", "calibration", "min_position"}``:
    metrics (rule, metric, value, n): ``brier`` and ``ece`` of step scores against the rule's own labels,
    ``auroc_last`` / ``auroc_min`` (last-step / min score against the outcome), ``mean_score``,
    ``argmin_at_first_dead_step`` (incorrect solutions: the min falls on the first step whose hard label
    is 0, i.e. the first step after which no completion reached the answer);
    calibration (rule, bin, bin_low, bin_high, mean_pred, mean_target, count);
    min_position (rule, outcome, bin, bin_low, bin_high, count, fraction): where in the solution
    (relative position 0 = first step, 1 = last) the minimum step score falls, solutions of >= 2 steps.
    """
    import pandas as pd

    from erprm_core import evaluation

    metric_rows, calib, positions = [], [], []
    sols = _solution_frame(scores)
    edges = np.linspace(0.0, 1.0, position_bins + 1)
    for rule in scores["rule"].unique():
        g = scores[(scores["rule"] == rule) & scores["score"].notna()]
        lab = g[g["label"].notna()]
        if len(lab):
            metric_rows.append((rule, "brier", evaluation.brier_score(lab["score"], lab["label"]), len(lab)))
            metric_rows.append(
                (
                    rule,
                    "ece",
                    evaluation.expected_calibration_error(lab["score"], lab["label"], n_bins),
                    len(lab),
                )
            )
            calib.append(evaluation.calibration_bins(lab["score"], lab["label"], n_bins).assign(rule=rule))
        metric_rows.append((rule, "mean_score", float(g["score"].mean()), len(g)))
        sr = sols[sols["rule"] == rule]
        if len(sr):
            metric_rows.append((rule, "auroc_last", evaluation.auroc(sr["last"], sr["outcome"]), len(sr)))
            metric_rows.append((rule, "auroc_min", evaluation.auroc(sr["min"], sr["outcome"]), len(sr)))
            wrong = sr[(sr["outcome"] == 0) & (sr["first_dead"] >= 0)]
            if len(wrong):
                hit = float((wrong["argmin"] == wrong["first_dead"]).mean())
                metric_rows.append((rule, "argmin_at_first_dead_step", hit, len(wrong)))
        multi = sr[sr["n_steps"] > 1]
        for outcome in (0, 1):
            rel = multi[multi["outcome"] == outcome]["rel_argmin"].to_numpy()
            idx = np.clip(np.searchsorted(edges, rel, side="right") - 1, 0, position_bins - 1)
            count = np.bincount(idx, minlength=position_bins)
            for b in range(position_bins):
                positions.append(
                    {
                        "rule": rule,
                        "outcome": outcome,
                        "bin": b,
                        "bin_low": edges[b],
                        "bin_high": edges[b + 1],
                        "count": int(count[b]),
                        "fraction": float(count[b] / count.sum()) if count.sum() else np.nan,
                    }
                )
    metrics = pd.DataFrame(metric_rows, columns=["rule", "metric", "value", "n"])
    calib_cols = ["rule", "bin", "bin_low", "bin_high", "mean_pred", "mean_target", "count"]
    calibration = (
        pd.concat(calib, ignore_index=True)[calib_cols] if calib else pd.DataFrame(columns=calib_cols)
    )
    return {"metrics": metrics, "calibration": calibration, "min_position": pd.DataFrame(positions)}


def evaluate_prm_rules(
    prm_folders: dict[str, Any],
    records: Sequence[dict[str, Any]],
    *,
    scoring: str = "two_token",
    batch_size: int = 32,
    device: str = "auto",
    n_bins: int = 10,
) -> dict[str, Any]:
    """Score held-out ``records`` with the PRM of every rule (``{rule: checkpoint folder}``) and compute
    :func:`heldout_metrics`. Adds ``"scores"`` (every step score) and ``"scoring"`` (forward passes and
    tokens per rule); the metrics table gets a ``scoring`` column (the mode is part of every result)."""
    import pandas as pd
    from tqdm.auto import tqdm

    if not records:
        raise ValueError("no held-out records to evaluate on (raise heldout_fraction or add problems)")
    frames, usage = [], []
    for rule, folder in tqdm(list(prm_folders.items()), desc="held-out scoring", unit="PRM"):
        model = ProcessRewardModel.from_pretrained(folder, scoring=scoring, device=device)
        frames.append(heldout_step_scores(model, records, rule, batch_size))
        usage.append(
            {
                "rule": rule,
                "forward_passes": model.forward_passes,
                "tokens": model.tokens_scored,
                "unscored_steps": int(model.audit.counts.get("steps_unscored", 0)),
            }
        )
        del model
    scores = pd.concat(frames, ignore_index=True)
    out = heldout_metrics(scores, n_bins=n_bins)
    out["metrics"] = out["metrics"].assign(scoring=scoring)
    out["scores"] = scores
    out["scoring"] = pd.DataFrame(usage)
    return out


def figure_training_curves(log: Any, smooth: int = 1) -> Any:
    """Training loss against optimizer step, one line per rule (rolling mean over ``smooth`` steps)."""
    import matplotlib.pyplot as plt

    from erprm_core import plotting

    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    for rule in plotting.method_order(log["rule"].unique()):
        g = log[log["rule"] == rule].sort_values("step")
        ax.plot(
            g["step"],
            g["loss"].rolling(max(1, smooth), min_periods=1).mean(),
            color=plotting.method_colour(rule),
            label=plotting.method_label(rule),
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("soft-label cross-entropy")
    ax.set_title("PRM training")
    ax.legend(fontsize=7, ncol=2)
    return fig


def figure_calibration(calibration: Any, rules: Sequence[str] | None = None) -> Any:
    """Reliability diagrams: mean step score vs mean label per score bin, one panel per rule."""
    import matplotlib.pyplot as plt

    from erprm_core import plotting

    rules = plotting.method_order(rules if rules is not None else calibration["rule"].unique())
    cols = min(3, len(rules)) or 1
    rows = -(-len(rules) // cols) or 1
    fig, axes = plt.subplots(
        rows, cols, figsize=(3.0 * cols, 2.8 * rows), squeeze=False, sharex=True, sharey=True
    )
    for ax in axes.ravel()[len(rules) :]:
        ax.set_visible(False)
    for ax, rule in zip(axes.ravel(), rules, strict=False):
        g = calibration[(calibration["rule"] == rule) & (calibration["count"] > 0)]
        ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--")
        ax.plot(g["mean_pred"], g["mean_target"], marker="o", ms=3, color=plotting.method_colour(rule))
        ax.set_title(plotting.method_label(rule), fontsize=9)
    for ax in axes[-1]:
        ax.set_xlabel("mean step score")
    for ax in axes[:, 0]:
        ax.set_ylabel("mean label")
    fig.suptitle("Held-out calibration against each rule's own labels", fontsize=10)
    fig.tight_layout()
    return fig


def figure_min_position(min_position: Any) -> Any:
    """Where the minimum step score falls (relative position in the solution), incorrect vs correct."""
    import matplotlib.pyplot as plt

    from erprm_core import plotting

    fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.4), sharey=True)
    for ax, outcome, title in zip(axes, (0, 1), ("incorrect solutions", "correct solutions"), strict=True):
        for rule in plotting.method_order(min_position["rule"].unique()):
            g = min_position[(min_position["rule"] == rule) & (min_position["outcome"] == outcome)]
            centre = (g["bin_low"] + g["bin_high"]) / 2
            ax.plot(centre, g["fraction"], marker="o", ms=3, color=plotting.method_colour(rule),
                    label=plotting.method_label(rule))  # fmt: skip
        ax.set_title(title, fontsize=9)
    fig.supxlabel("relative position of the lowest-scored step (0 = first step, 1 = last)", fontsize=9)
    axes[0].set_ylabel("fraction of solutions")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------------
# Command line: train PRMs (also under `accelerate launch`) or score a JSONL file with any PRM
# ----------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m erprm_core.prm train|score ...``; see ``--help`` and configs/accelerate/README.md.

    ``train`` runs :func:`erprm_core.training.train_prm_stage` for a profile with the same parameters as
    03_train_prm (so ``accelerate launch`` can train the PRMs on several GPUs, and the notebook then
    evaluates the finished checkpoints). ``score`` reads JSONL records with ``question`` and ``steps`` and
    writes them back with ``step_scores`` and the scoring mode, for any Math-Shepherd-format PRM.
    """
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m erprm_core.prm", description=main.__doc__.splitlines()[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train one PRM per label rule of a profile (03_train_prm's training)")
    tr.add_argument("--profile", required=True)
    tr.add_argument("--rules", default="all", help='"all" or a comma list of label rules')
    tr.add_argument("--base-model", default="", help="hub name or folder; default: the profile's policy")
    tr.add_argument("--heldout-fraction", type=float, default=0.2)
    tr.add_argument("--epochs", type=float, default=1.0)
    tr.add_argument("--lr", type=float, default=5e-7)
    tr.add_argument("--batch-size", type=int, default=8, help="per device")
    tr.add_argument("--grad-accum", type=int, default=1)
    tr.add_argument("--max-length", type=int, default=512)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--lr-scheduler", default="cosine")
    tr.add_argument("--warmup-ratio", type=float, default=0.0)
    tr.add_argument("--weight-decay", type=float, default=0.0)
    tr.add_argument("--gradient-checkpointing", action="store_true")
    tr.add_argument("--dtype", default="float32", help="weights dtype when loading the base model")
    tr.add_argument("--retrain", action="store_true")
    sc = sub.add_parser("score", help="score the steps of JSONL records with a PRM")
    sc.add_argument("--model", required=True, help="PRM hub name or folder (Math-Shepherd format)")
    sc.add_argument("--input", required=True, help="JSONL with question and steps per line")
    sc.add_argument("--output", required=True)
    sc.add_argument("--scoring", default="two_token", choices=SCORING_MODES)
    sc.add_argument("--batch-size", type=int, default=16)
    sc.add_argument("--device", default="auto")
    sc.add_argument("--step-tag", default=STEP_TAG)
    sc.add_argument("--good-token", default=GOOD_TOKEN)
    sc.add_argument("--bad-token", default=BAD_TOKEN)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if args.command == "train":
        from erprm_core import training

        res = training.train_prm_stage(
            args.profile,
            rules=args.rules,
            base_model=args.base_model,
            heldout_fraction=args.heldout_fraction,
            retrain=args.retrain,
            epochs=args.epochs,
            lr=args.lr,
            batch_size=args.batch_size,
            grad_accum=args.grad_accum,
            max_length=args.max_length,
            seed=args.seed,
            lr_scheduler=args.lr_scheduler,
            warmup_ratio=args.warmup_ratio,
            weight_decay=args.weight_decay,
            gradient_checkpointing=args.gradient_checkpointing,
            dtype=args.dtype,
        )
        log.info("trained/found PRMs for rules %s", res["rules"])
        return 0

    from erprm_core import artifacts

    records = artifacts.read_jsonl(args.input, ["question", "steps"])
    model = ProcessRewardModel.from_pretrained(
        args.model, args.step_tag, args.good_token, args.bad_token, args.scoring, device=args.device
    )
    scores = model.score_batch(
        [r["question"] for r in records], [r["steps"] for r in records], args.batch_size, progress=True
    )
    info = model.info()
    artifacts.atomic_write_jsonl(
        args.output,
        [
            {**r, "step_scores": [None if math.isnan(x) else x for x in s], "prm_info": info}
            for r, s in zip(records, scores, strict=True)
        ],
    )
    log.info("scored %d solutions -> %s (%s)", len(records), args.output, dict(model.audit.counts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
