"""The sampler interface that core code samples through; the backends live in ``erprm_core.generation``.

A sampler turns prompts into continuations: ``generate(prompts, n, keys, seed, temperature, top_p,
max_new_tokens, desc)`` returns ``n`` :class:`Generation` per prompt, and ``stats`` counts prompt and
generated tokens, forward passes and sequences. ``erprm_core.generation.make_sampler`` builds one (HF or
vLLM).

Reproducibility. Sample ``j`` of a prompt with key ``key`` draws its randomness from
``row_seed(seed, *key, j)`` (HF backend: one seed per sequence; vLLM: ``row_seed(seed, *key)`` per prompt), so
the random numbers do not depend on batch size, batch composition, shard layout, device or process history.
A row stops at the end of its first complete final-answer line (:data:`ANSWER_LINE`,
:func:`cut_at_answer_line`).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

# A complete final-answer line stops a row: "The answer is: 72" (MetaMath, the tiny task) or "#### 72" (GSM8K).
ANSWER_LINE = re.compile(r"^\s*(?:The answer is\b|####)")


def row_seed(seed: int, *key: Any) -> int:
    """A stable 63-bit seed for one sequence, from the base ``seed`` and a key (ids, indices).

    Uses SHA-256 of the key's text, so it is the same in every process and Python version (no ``hash()``).
    """
    text = "|".join(str(part) for part in (seed, *key))
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little") >> 1


@dataclass
class Generation:
    """One sampled continuation: its text, how many tokens it took and why it stopped.

    ``finish`` is ``"answer"`` (a complete final-answer line was written; the text ends with that line),
    ``"eos"`` (end-of-sequence token) or ``"length"`` (hit ``max_new_tokens``: truncated).
    """

    text: str
    n_tokens: int
    finish: str

    @property
    def truncated(self) -> bool:
        """True when the continuation was cut at the token limit."""
        return self.finish == "length"


def cut_at_answer_line(text: str, start: int = 0) -> int | None:
    """Index just past the first complete answer line at or after char ``start`` (the newline excluded)."""
    pos = start
    while True:
        nl = text.find("\n", pos)
        if nl < 0:
            return None
        line_start = text.rfind("\n", 0, nl) + 1
        if ANSWER_LINE.match(text[line_start:nl]):
            return nl
        pos = nl + 1


def check_sampling_params(
    n: int, temperature: float, top_p: float, max_new_tokens: int, batch_size: int
) -> None:
    """Raise ValueError naming the first sampling parameter out of range (every backend checks them)."""
    if n < 1:
        raise ValueError(f"n (samples per prompt) must be >= 1, got {n}")
    if not temperature >= 0 or math.isinf(temperature):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


class Sampler(Protocol):
    """What core code needs of a sampling backend (``HFSampler``, ``VLLMSampler`` of erprm_core.generation)."""

    stats: dict[str, int]

    def generate(
        self,
        prompts: Sequence[str],
        n: int,
        keys: Sequence[tuple],
        seed: int = 0,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 128,
        desc: str = "sampling",
    ) -> list[list[Generation]]:
        """``n`` continuations of each prompt; sample ``j`` of prompt ``i`` uses
        ``row_seed(seed, *keys[i], j)``."""
        ...
