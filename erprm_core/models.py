"""Models: the tiny word-level tokenizer and Llama model of the embedded default, and a loader for any LM.

- :func:`build_tokenizer` makes a small tokenizer with the ``tokenizers`` library, fitted on the ``arith``
  task's words: every word and every number ``0..max_number`` is ONE token (with and without a leading
  space), so a whole problem is ~90-250 tokens and learnable on a CPU in minutes. Punctuation is one character
  per token, so in the PRM format ``question + " " + "".join(step + " ки" for step in steps)`` the step tag
  " ки" is one token at every step end (also in ``"12 киTom"``) and " +" / " -" after the tag are single
  tokens. ``decode(encode(text)) == text`` for task text, newlines and the PRM format included.
- :func:`build_tiny_model` makes a ``LlamaForCausalLM`` from a config sized by parameters.
- :func:`load_causal_lm` loads any hub name or local folder through the Auto classes (the tiny policy,
  once saved with ``save_pretrained``, loads exactly like a hub model); :func:`resolve_device` and
  :func:`resolve_dtype` pick the device and dtype.

Used by 00_policy (training), sampling, prm, raft and the tests.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from erprm_core.steps import BAD_TOKEN, GOOD_TOKEN, STEP_TAG

log = logging.getLogger(__name__)

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"

# One pre-token is: an optional single leading space, then a run of ASCII letters, or a run of digits
# (at most 3, so every number of the task is one token), or a run of other non-space non-ASCII letters
# (the Cyrillic step tag), or ONE punctuation/symbol character; or a lone whitespace character.
PRETOKEN_PATTERN = r" ?[A-Za-z]+| ?[0-9]{1,3}| ?[^\sA-Za-z0-9\x00-\x7f]+| ?[^\sA-Za-z0-9]|\s"

__all__ = [
    "PRETOKEN_PATTERN",
    "build_tokenizer",
    "build_tiny_model",
    "count_parameters",
    "load_causal_lm",
    "resolve_device",
    "resolve_dtype",
]


def _pre_tokenizer():
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Split(Regex(PRETOKEN_PATTERN), behavior="isolated")


def build_tokenizer(
    texts: list[str] | None = None,
    max_number: int = 999,
    model_max_length: int = 512,
):
    """A word-level ``PreTrainedTokenizerFast`` fitted on ``texts`` (default: the ``arith`` task's words).

    The vocabulary holds: the special tokens ``<pad> <s> </s> <unk>``; every pre-token of ``texts`` with
    and without a leading space; every number ``0..max_number``, every printable ASCII symbol and the step
    tag, each with and without a leading space; ``" "``, ``"\\n"`` and ``"\\t"``. Token ids are assigned in
    a fixed (sorted) order, so the same inputs always give the same tokenizer. Encoding adds ``<s>`` in
    front (``add_special_tokens=True``); training appends ``</s>`` itself. Decoding concatenates tokens.
    """
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    if texts is None:
        from erprm_core.tasks.arith import vocabulary_words

        texts = vocabulary_words()
    if not 0 <= max_number <= 99_999:
        raise ValueError(f"max_number={max_number} out of range 0..99999")
    pre = _pre_tokenizer()
    words: set[str] = {STEP_TAG, GOOD_TOKEN, BAD_TOKEN}
    for text in texts:
        for piece, _ in pre.pre_tokenize_str(text):
            if piece.strip():
                words.add(piece.strip())
    words.update(str(i) for i in range(max_number + 1))
    words.update(chr(c) for c in range(33, 127) if not chr(c).isalnum())
    pieces = sorted(words) + sorted(" " + w for w in words) + [" ", "\n", "\t"]
    vocab = {tok: i for i, tok in enumerate([PAD, BOS, EOS, UNK])}
    for piece in pieces:
        vocab.setdefault(piece, len(vocab))

    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
        padding_side="right",
    )
    return fast


def build_tiny_model(
    tokenizer,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    intermediate_size: int = 256,
    max_position_embeddings: int = 256,
    seed: int = 0,
    tie_word_embeddings: bool = True,
):
    """A freshly initialised ``LlamaForCausalLM`` (float32) sized by the arguments, for ``tokenizer``.

    Initialisation is deterministic given ``seed``. Special token ids come from the tokenizer.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    if hidden_size % num_heads:
        raise ValueError(f"hidden_size={hidden_size} must be a multiple of num_heads={num_heads}")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        attention_dropout=0.0,
        rms_norm_eps=1e-5,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def count_parameters(model) -> int:
    """Number of distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> ``cuda`` when available, else ``cpu``; anything else is passed to ``torch.device``."""
    if isinstance(device, torch.device):
        return device
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} requested but CUDA is not available")
    return dev


def _busy_cpu_fraction(window_s: float) -> float | None:
    """Fraction of all CPU time that was busy during ``window_s`` seconds (Linux /proc/stat), else None."""
    import time

    def sample() -> tuple[int, int] | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields[:8]), idle

    first = sample()
    time.sleep(window_s)
    second = sample()
    if first is None or second is None or second[0] <= first[0]:
        return None
    return 1.0 - (second[1] - first[1]) / (second[0] - first[0])


def set_cpu_threads(requested: int = 0, window_s: float = 0.5) -> int:
    """Set torch's CPU thread count and return it. ``requested`` > 0 is used as is.

    ``0`` (auto) uses the cores that are idle right now: the usable cores times the idle fraction measured
    over ``window_s`` seconds, rounded, at least 1. The reason: torch's OpenMP threads spin while they wait,
    so two threads on a 2-core machine whose other core is busy run about twice as slowly as one thread,
    while on an idle machine they run about 1.8x faster than one. The count does not change results (the
    CPU kernels used here give the same bits for 1 and 2 threads); the manifest records it.
    """
    if requested < 0:
        raise ValueError(f"torch_threads must be >= 0 (0 = auto), got {requested}")
    if requested == 0:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            cores = os.cpu_count() or 1
        busy = _busy_cpu_fraction(window_s)
        requested = cores if busy is None else max(1, min(cores, round(cores * (1.0 - busy))))
    torch.set_num_threads(requested)
    return requested


_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_dtype(dtype: str | torch.dtype = "auto", device: str | torch.device = "auto") -> torch.dtype:
    """``"auto"`` -> bfloat16 on a CUDA device that supports it, else float32; names like "bf16" accepted."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "", "auto"):
        dev = resolve_device(device)
        if dev.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} unknown; choose 'auto' or one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def _looks_local(name_or_path: str) -> bool:
    """A path rather than a hub id ("org/name"): absolute, relative with ./ or ~, or deeper than org/name."""
    return name_or_path.startswith((".", "/", "~", os.sep)) or name_or_path.count("/") > 1


def load_causal_lm(
    name_or_path: str | Path,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    *,
    padding_side: str = "left",
    **kwargs: Any,
):
    """Load ``(model, tokenizer)`` from a hub name or a local ``save_pretrained`` folder (Auto classes).

    ``device``/``dtype`` as in :func:`resolve_device`/:func:`resolve_dtype`; extra ``kwargs`` go to
    ``AutoModelForCausalLM.from_pretrained`` (e.g. ``attn_implementation``). Honours ``HF_HUB_OFFLINE``.
    The tokenizer gets a pad token (the EOS token) if it has none and ``padding_side`` (left: for
    generation). A local path that does not exist raises FileNotFoundError naming it. The model is
    returned in eval mode.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = str(name_or_path)
    path = Path(name).expanduser()
    if isinstance(name_or_path, Path) or _looks_local(name) or path.exists():
        if not path.is_dir():
            raise FileNotFoundError(
                f"model folder {path} not found (expected a save_pretrained folder or a hub name like 'org/model')"
            )
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json: not a save_pretrained model folder")
        name = str(path)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    tokenizer = AutoTokenizer.from_pretrained(name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype, **kwargs)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.to(dev)
    model.eval()
    log.info("loaded %s on %s (%s), %d parameters", name, dev, torch_dtype, count_parameters(model))
    return model, tokenizer
