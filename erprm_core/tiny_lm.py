"""The embedded default's tiny language model: a word-level tokenizer of the ``arith`` task and a small Llama.

:func:`build_tokenizer` makes a small tokenizer with the ``tokenizers`` library, fitted on the ``arith`` task's
words: every word and every number 0..max_number is ONE token (with and without a leading space), so a whole
problem is ~90-250 tokens and learnable on a CPU in minutes. Punctuation is one character per token, so in the
PRM format the step tag " ки" is one token at every step end (also in "12 киTom") and " +" / " -" after the
tag are single tokens. decode(encode(text)) == text for task text, newlines and the PRM format included.
:func:`build_tiny_model` is a freshly initialised ``LlamaForCausalLM`` for it (00_policy trains it; tests and
benchmarks build small ones).
"""

from __future__ import annotations

import torch

from erprm_core.steps import BAD_TOKEN, GOOD_TOKEN, STEP_TAG
from erprm_core.tasks import arith

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"

# One pre-token is: an optional single leading space, then a run of ASCII letters, or a run of digits
# (at most 3, so every number of the task is one token), or a run of other non-space non-ASCII letters
# (the Cyrillic step tag), or ONE punctuation/symbol character; or a lone whitespace character.
PRETOKEN_PATTERN = r" ?[A-Za-z]+| ?[0-9]{1,3}| ?[^\sA-Za-z0-9\x00-\x7f]+| ?[^\sA-Za-z0-9]|\s"


def vocabulary_words() -> list[str]:
    """Every template string and word list entry the ``arith`` generator can emit (the tokenizer is fitted
    on these)."""
    texts: list[str] = []
    for name, subj, obj_pron in arith.PEOPLE:
        texts += [name, subj, subj.capitalize(), obj_pron]
    texts += (
        arith.OBJECTS
        + arith.DAYS
        + arith.START_TEMPLATES
        + arith.QUESTION_TEMPLATES
        + [arith.OP_PREFIX, arith.STEP_TEMPLATE, arith.ANSWER_TEMPLATE, ", so"]
    )
    for templates in arith.OP_TEMPLATES.values():
        texts += templates
    return texts


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
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
        padding_side="right",
    )


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
