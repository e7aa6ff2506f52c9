"""The process reward model: a Math-Shepherd-compatible wrapper around any causal LM.

A PRM reads ``question + " " + "".join(step + " ки" for step in steps)`` and, at each step tag, scores the
step by the next-token logits of the "good" and "bad" tokens (" +" / " -"):
``P(good) = softmax(logit_good, logit_bad)[0]`` (mode ``"two_token"``, the default) or the full-vocabulary
softmax probability of the good token (mode ``"full_vocab"``, what the ER-PRM code used on GSM8K). All step
scores of a solution come from ONE forward pass.

The two things training and scoring must agree on live here and nowhere else: the token ids
(:func:`resolve_prm_token_ids`, resolved *in context* the Math-Shepherd way; a tag that the tokenizer splits
is a token sequence, scored at its last token) and the tokenisation with each step's tag position
(:func:`encode_for_prm`; truncation keeps the beginning of the text, and steps whose tag falls beyond
``max_length`` lose their label, counted). :func:`prm_training_features` counts, per reason,
every sample that training keeps or skips; :func:`soft_label_prm_loss` is the training loss on the two tag
logits.
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

from erprm_core import models, prefix_tree
from erprm_core.io import Audit
from erprm_core.io import progress as progress_bar
from erprm_core.steps import BAD_TOKEN, GOOD_TOKEN, STEP_TAG, format_prm_input

log = logging.getLogger(__name__)

SCORING_MODES = ("two_token", "full_vocab")
AGGREGATIONS = ("min", "prod", "last", "mean")

# Statuses of one encoded sample (see encode_for_prm). Training keeps "ok" and "truncated".
STATUS_OK = "ok"
STATUS_TRUNCATED = "truncated"
STATUS_TAG_MISMATCH = "tag_count_mismatch"
STATUS_EMPTY = "empty"

# --- Token ids: resolved once, the same way for training and scoring ---


@dataclass(frozen=True)
class PRMTokenIds:
    """The step tag and the good/bad token strings and their ids in one tokenizer.

    ``tag_ids``: the tag's tokens as it follows a step (one for a Math-Shepherd tokenizer; SmolLM2's BPE
    splits " ки" into "Ġк", "и"); ``tag_id`` is the last of them, the token whose logits score a step.
    """

    step_tag: str
    good_token: str
    bad_token: str
    tag_id: int
    good_id: int
    bad_id: int
    tag_ids: tuple[int, ...]

    def as_dict(self) -> dict[str, Any]:
        """Plain dict (for manifests and result tables); ``tag_location`` says how the tag is found:
        "one token" or "last of N tokens"."""
        n = len(self.tag_ids)
        where = "one token" if n == 1 else f"last of {n} tokens"
        return {**self.__dict__, "tag_ids": list(self.tag_ids), "tag_location": where}


def _tokenizer_name(tokenizer: Any) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def _tokens_in_context(tokenizer: Any, context: str, piece: str, what: str, most: int = 1) -> tuple[int, ...]:
    """The fewest last tokens of ``context`` (which ends with ``piece``), at most ``most`` and never all of
    them, that spell ``piece`` alone (the last token alone first: the Math-Shepherd case)."""
    ids = [int(t) for t in tokenizer.encode(context, add_special_tokens=False)]
    for n in range(1, min(most, len(ids) - 1) + 1):
        if getattr(tokenizer, "unk_token_id", None) in ids[-n:]:
            break
        if tokenizer.decode(ids[-n:]).strip() == piece:
            return tuple(ids[-n:])
    raise ValueError(
        f"{what} {piece!r} is not {'a single token' if most == 1 else 'located'} in context for tokenizer "
        f"{_tokenizer_name(tokenizer)!r}: {context!r} ends with tokens {tokenizer.convert_ids_to_tokens(ids[-3:])}"
        "; choose another token, or add it to the tokenizer (and resize the embeddings)"
    )


def resolve_prm_token_ids(
    tokenizer: Any,
    step_tag: str = STEP_TAG,
    good_token: str = GOOD_TOKEN,
    bad_token: str = BAD_TOKEN,
) -> PRMTokenIds:
    """Ids of the step tag and the good/bad tokens, resolved in context (Math-Shepherd convention).

    tag ids = the fewest last tokens of ``f"x {step_tag}"`` that spell the tag (the tag as it follows a
    step); good/bad id = last token of ``f"{step_tag} {good}"`` (the token as it would follow the tag, i.e.
    " +" / " -"). Each must decode to exactly the string (a separate leading-space token, as SentencePiece
    tokenizers produce, is fine); good and bad must be single tokens. Raises ValueError naming the tokenizer
    and the token otherwise, and when good and bad resolve to the same id.

    A tag that the tokenizer splits (SmolLM2's BPE: " ки" = "Ġк", "и") is located by its token sequence and
    scored at its last token, rather than added to the vocabulary: tokenizer and model stay as published
    (nothing to resize, save or get out of step), the model has read the whole tag at its last token, and a
    one-token tag is found exactly as before. Measured on SmolLM2-135M, the two ways score alike: step AUROC on
    66 held-out ProcessBench GSM8K steps 0.62 / 0.64 (last token / added token) zero-shot, 0.67 / 0.70 after
    24 training steps (standard error about 0.07); all 26,729 tags of ProcessBench's four splits are located.
    """
    tag_ids = _tokens_in_context(
        tokenizer, f"x {step_tag}", step_tag, "step tag", most=len(step_tag.encode()) + 1
    )
    tag_id = tag_ids[-1]
    (good_id,) = _tokens_in_context(tokenizer, f"{step_tag} {good_token}", good_token, "good token")
    (bad_id,) = _tokens_in_context(tokenizer, f"{step_tag} {bad_token}", bad_token, "bad token")
    if len({tag_id, good_id, bad_id}) < 3:
        raise ValueError(
            f"step tag / good / bad tokens must be three different tokens; tokenizer "
            f"{_tokenizer_name(tokenizer)!r} gives ids {tag_id}, {good_id}, {bad_id}"
        )
    return PRMTokenIds(step_tag, good_token, bad_token, tag_id, good_id, bad_id, tag_ids)


# --- Encoding: the ONE place that decides where the step tags are ---


def tag_positions(input_ids: Sequence[int] | torch.Tensor, tag: int | Sequence[int]) -> list[int]:
    """Token indices where the tag ends: ``input_ids == tag`` for one id (the Math-Shepherd model-card rule),
    the last index of every occurrence of the run ``tag`` for a sequence of ids."""
    run, ids = (
        list(tag) if isinstance(tag, Sequence) else [tag],
        torch.as_tensor(input_ids).reshape(-1).tolist(),
    )
    return [i for i in range(len(run) - 1, len(ids)) if ids[i - len(run) + 1 : i + 1] == run]


@dataclass
class PRMEncoding:
    """One solution tokenised for a PRM.

    ``positions[i]`` is the token index of step i's tag, its last token (None when the tag was cut by
    ``max_length`` or its tokens are not the tag's own). ``status`` is "ok", "truncated" (some tags cut),
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
    Tag positions are where the tag's tokens (``ids.tag_ids``) end. With a fast tokenizer the tag *inserted*
    after each step is also located by character offsets, so that when the text holds stray tags (e.g. "ки"
    inside a step) the positions still belong to the right steps; such samples get status
    "tag_count_mismatch" (training skips them, scoring still uses the located tags). A tag whose tokens are
    not the tag's own (merged with the text before or after it) gets position None. Truncation to ``max_length`` keeps the
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
    found = tag_positions(input_ids, ids.tag_ids)
    if n == 0:
        return PRMEncoding(input_ids, [], STATUS_EMPTY, len(found), 0, 0, targets, text)

    if fast:
        # Character index of the tag's last character after each step, then the token holding it.
        positions: list[int | None] = []
        char, tag, k = len(question) + 1, list(ids.tag_ids), len(ids.tag_ids)
        for step in steps:
            char += len(step) + 1 + len(ids.step_tag)
            j = enc.char_to_token(char - 1)
            positions.append(
                j if j is not None and j >= k - 1 and input_ids[j - k + 1 : j + 1] == tag else None
            )
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
    the :class:`~erprm_core.io.Audit`.
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


# --- Logits at the tags (shared by the training loss and the scorer) ---


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
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Full-vocabulary logits at ``positions`` (B, K) -> (B, K, V), from one forward pass.

    When the model supports ``logits_to_keep`` the LM head is applied only at the union of the positions
    (saves memory and time for large vocabularies); the logits are the same as from a full forward. With
    ``past_key_values`` (a cache of the first tokens) ``input_ids`` and ``positions`` count from the end of
    the cache, and ``attention_mask`` covers cache + ``input_ids``. ``position_ids`` (optional) go to the model
    as they are (a packed prefix tree: each token's depth, with a 4D ``attention_mask``).
    """
    if use_logits_to_keep is None:
        use_logits_to_keep = _accepts_logits_to_keep(model)
    kwargs = {} if position_ids is None else {"position_ids": position_ids}
    if past_key_values is not None:
        kwargs.update({_cache_keyword(model): past_key_values, "use_cache": True})
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


# --- The scorer ---


class ProcessRewardModel:
    """A causal LM used as a Math-Shepherd-format PRM (format, score, score_batch).

    ``scoring`` is "two_token" (softmax over the good/bad logits, default) or "full_vocab". Steps whose tag
    is lost (beyond ``max_length``, or not the tag's own tokens) get NaN, counted in ``self.audit``.
    ``share_prefix`` ("auto", True, False, "tree"): solutions of the same question in one batch run the shared
    leading tokens (the question) once and reuse their KV cache; "auto" enables it for Hugging Face models
    with a standard dynamic cache. "tree" packs the solutions of one question as a prefix tree
    (:mod:`erprm_core.prefix_tree`: every distinct prefix once, shared steps and duplicates included) into
    one sequence of at most ``tree_tokens`` tokens under an ancestor attention mask. The scores equal the
    unshared ones up to float rounding (so "tree" is opt-in: the CPU profiles' tables were scored without).
    """

    def __init__(
        self, model: Any, tokenizer: Any, step_tag: str = STEP_TAG, good_token: str = GOOD_TOKEN,
        bad_token: str = BAD_TOKEN, scoring: str = "two_token", max_length: int | None = None,
        name: str | None = None, share_prefix: bool | str = "auto", tree_tokens: int = 1024,
    ):  # fmt: skip
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
        if share_prefix == "tree" and not _supports_prefix_cache(model):
            raise ValueError(
                "share_prefix='tree' needs a Hugging Face causal LM with full attention everywhere"
            )
        self.prefix_tree = share_prefix == "tree"
        self.tree_tokens = int(tree_tokens)
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
        model, tokenizer = models.load_causal_lm(path_or_name, device=device, dtype=dtype, **model_kwargs)
        return cls(model, tokenizer, step_tag, good_token, bad_token, scoring, max_length, str(path_or_name),
                   share_prefix)  # fmt: skip

    # --- text ---
    def format(self, question: str, steps: Sequence[str]) -> str:
        """``question + " " + "".join(step + " ки" for step in steps)`` (with this PRM's tag)."""
        return format_prm_input(question, list(steps), self.ids.step_tag)

    def encode(self, question: str, steps: Sequence[str]) -> PRMEncoding:
        """:func:`encode_for_prm` with this PRM's tokenizer, token ids and length limit."""
        return encode_for_prm(self.tokenizer, question, steps, None, self.max_length, self.ids)

    def info(self) -> dict[str, Any]:
        """What to record with results: model name, scoring mode, tokens, ids, length limit."""
        return {"prm": self.name, "scoring": self.scoring, "max_length": self.max_length,
                **self.ids.as_dict()}  # fmt: skip

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
        if self.prefix_tree:
            batches = _tree_batches(questions, encodings, batch_size, self.tree_tokens)
        else:
            batches = _scoring_batches(questions, encodings, batch_size, self.share_prefix)
        for batch in progress_bar(batches, desc="PRM scoring", unit="batch", disable=not progress):
            encs = [encodings[i] for i in batch]
            one_question = len({questions[i] for i in batch}) == 1
            if self.prefix_tree and one_question and len(batch) > 1:
                scores = self._score_tree(encs, device)
            else:
                shared = shared_prefix_length(encs) if self.share_prefix and one_question else 0
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

    def _score_tree(self, encs: list[PRMEncoding], device: torch.device) -> list[list[float]]:
        """One forward pass over the prefix tree of ``encs`` (one question's solutions); a step's score is read
        at the tree node of its tag."""
        tree = prefix_tree.pack([e.input_ids for e in encs])
        nodes = [
            [tree.paths[r][p] if p is not None else None for p in e.positions] for r, e in enumerate(encs)
        ]
        keep = sorted({n for row in nodes for n in row if n is not None})
        dtype = next(self.model.parameters()).dtype
        blocked = ~prefix_tree.ancestor_mask(tree)  # additive: eager and sdpa attention both take it
        mask = torch.zeros(blocked.shape, dtype=dtype).masked_fill(blocked, torch.finfo(dtype).min)
        logits = tag_logits(
            self.model, torch.tensor([tree.input_ids], device=device), mask[None, None].to(device),
            torch.tensor([keep], device=device), self._use_keep, position_ids=torch.tensor([tree.depth], device=device),
        )  # fmt: skip
        probs = step_probabilities(logits, self.ids.good_id, self.ids.bad_id, self.scoring)[0].cpu().numpy()
        column = {n: k for k, n in enumerate(keep)}
        self.forward_passes += 1
        self.tokens_scored += len(tree.input_ids)
        return [[float(probs[column[n]]) if n is not None else float("nan") for n in row] for row in nodes]


def _tree_batches(
    questions: Sequence[str], encodings: Sequence[PRMEncoding], batch_size: int, max_nodes: int
) -> list[list[int]]:
    """All solutions of one question in chunks whose prefix tree has at most ``max_nodes`` tokens; questions
    with one solution batched together, as in :func:`_scoring_batches`."""
    out = []
    for batch in _scoring_batches(questions, encodings, max(1, len(encodings)), by_question=True):
        if len({questions[i] for i in batch}) > 1:  # the questions with one solution each
            out += [batch[i : i + batch_size] for i in range(0, len(batch), batch_size)]
        else:
            out += [
                [batch[i] for i in c]
                for c in prefix_tree.chunks([encodings[i].input_ids for i in batch], max_nodes)
            ]
    return out


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
    so that its rows share the question's tokens, except that questions with a single solution (nothing to
    share) are batched together."""
    longest_first = sorted(range(len(encodings)), key=lambda i: -len(encodings[i].input_ids))
    if not by_question:
        return [longest_first[i : i + batch_size] for i in range(0, len(longest_first), batch_size)]
    groups: dict[str, list[int]] = {}
    for i in longest_first:
        groups.setdefault(questions[i], []).append(i)
    singles = [g[0] for g in groups.values() if len(g) == 1]
    batches = [
        g[i : i + batch_size] for g in groups.values() if len(g) > 1 for i in range(0, len(g), batch_size)
    ]
    batches += [singles[i : i + batch_size] for i in range(0, len(singles), batch_size)]
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

    NaN step scores (lost tags) are ignored, except that "last" with a NaN final score is NaN (never an
    earlier step's). An empty list, or one with no finite score, is a ValueError.
    """
    if how not in AGGREGATIONS:
        raise ValueError(f"aggregation {how!r} unknown; choose one of {AGGREGATIONS}")
    arr = np.asarray(list(step_scores), dtype=float)
    if arr.size == 0:
        raise ValueError("aggregate: no step scores (a solution needs at least one step)")
    if np.isnan(arr).all():
        raise ValueError("aggregate: every step score is NaN (no step tag was located)")
    if how == "last":
        return float(arr[-1])
    arr = arr[~np.isnan(arr)]
    if how == "min":
        return float(arr.min())
    if how == "prod":
        return float(np.prod(arr))
    return float(arr.mean())


# --- Training loss ---


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
