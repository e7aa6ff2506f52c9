"""The embedded task ``arith``: seeded, unlimited GSM8K-style word problems with 2-6 dependent steps.

A problem is a short story about one person's collection of objects that changes on consecutive days
(buys more, gives some away, multiplies, splits into equal groups). Each change is one arithmetic step whose
result feeds the next, so a wrong intermediate propagates to the final answer. The reference solution has
one step per line in GSM8K style, restating the change and then computing it
(``"On Monday, he buys 5 more apples, so Tom has 12 + 5 = 17 apples."``), and ends with
``"The answer is: N"``.

Why this shape: a model of ~1M parameters trained for a few CPU minutes must find, for step k, the k-th
change in the question. Measured on this task (1200-1800 SFT steps of 16): solution lines computing only
``"On Monday, Tom has 12 + 5 = 17 apples."`` gave ~8% greedy accuracy (it picked the wrong sentence);
restating the change first (a copy, which small transformers learn early) gave ~30-40%; starting the week
on a random day (every day name seen at every step position) gave ~50%.

Every number (operands, intermediates, answers) stays in ``0..max_value`` (at most 999), so a word-level
tokenizer (:func:`erprm_core.tiny_lm.build_tokenizer`) holds every number as one token.

Train and test never overlap: a problem's side is decided by a hash of its arithmetic skeleton (start value,
operations and operands), so the same computation can never appear on both sides, whatever the seed.

Used through :func:`erprm_core.tasks.load_problems`; the tiny policy's tokenizer is fitted on its word lists
(``erprm_core.tiny_lm.vocabulary_words``).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from typing import Any

from erprm_core.steps import join_steps

MAX_NUMBER = 999  # hard upper bound of every number the generator may emit (the tokenizer's range)
TEST_PERCENT = 20  # share of skeleton-hash space that belongs to the test side

# (name, subject pronoun, object pronoun)
PEOPLE = [
    ("Tom", "he", "him"), ("Sam", "he", "him"), ("Ben", "he", "him"), ("Leo", "he", "him"),
    ("Max", "he", "him"), ("Jack", "he", "him"), ("Noah", "he", "him"), ("Omar", "he", "him"),
    ("Ravi", "he", "him"), ("Carlos", "he", "him"), ("Mia", "she", "her"), ("Ana", "she", "her"),
    ("Emma", "she", "her"), ("Lily", "she", "her"), ("Sara", "she", "her"), ("Zoe", "she", "her"),
    ("Nina", "she", "her"), ("Aisha", "she", "her"), ("Mei", "she", "her"), ("Julia", "she", "her"),
]  # fmt: skip

OBJECTS = [
    "apples", "pears", "oranges", "cookies", "cupcakes", "marbles", "stickers", "pencils", "books", "cards",
    "coins", "shells", "stamps", "toy cars", "balloons", "beads", "eggs", "candies", "flowers", "blocks",
]  # fmt: skip

# Question sentences. Fields: {N} name, {p} subject pronoun, {O} object pronoun, {F} another person,
# {o} object, {n} the operand. Each change happens on a named day ("On Monday, he buys 5 more apples."), and
# the solution line of that change restates it: it tells the reader (and the model) which sentence each step
# comes from.
START_TEMPLATES = ["{N} has {n} {o}.", "{N} starts with {n} {o}.", "{N} owns {n} {o}."]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
OP_TEMPLATES = {
    "+": ["{p} buys {n} more {o}.", "{p} finds {n} more {o}.", "{F} gives {O} {n} more {o}.",
          "{p} gets {n} more {o} from {F}."],
    "-": ["{p} gives {n} {o} to {F}.", "{p} sells {n} {o}.", "{p} loses {n} {o}.", "{p} uses {n} {o}."],
    "*": ["{p} ends up with {n} times as many {o}.", "the number of {o} grows {n} times."],
    "/": ["{p} splits the {o} into {n} equal groups and keeps one.",
          "{p} keeps only one of {n} equal shares."],
}  # fmt: skip
OP_PREFIX = "On {day}, "
QUESTION_TEMPLATES = [
    "How many {o} does {N} have now?", "How many {o} does {N} have at the end?",
    "How many {o} does {N} have left?",
]  # fmt: skip
# Reference solution line of one step: "On Monday, he buys 5 more apples, so Tom has 12 + 5 = 17 apples."
STEP_TEMPLATE = "{event}, so {N} has {a} {op} {n} = {r} {o}."
ANSWER_TEMPLATE = "The answer is: {r}"


def _check_knobs(min_steps: int, max_steps: int, max_value: int, max_operand: int, max_factor: int) -> None:
    if not 1 <= min_steps <= max_steps <= len(DAYS):
        raise ValueError(
            f"need 1 <= min_steps <= max_steps, got min_steps={min_steps}, max_steps={max_steps}"
        )
    if not 20 <= max_value <= MAX_NUMBER:
        raise ValueError(f"max_value={max_value} must lie in 20..{MAX_NUMBER} (the tokenizer's number range)")
    if not 2 <= max_operand <= max_value // 2:
        raise ValueError(f"max_operand={max_operand} must lie in 2..max_value//2={max_value // 2}")
    if not 2 <= max_factor <= 9:
        raise ValueError(f"max_factor={max_factor} must lie in 2..9")


def skeleton_key(start: int, ops: list[tuple[str, int]]) -> str:
    """Canonical content of a problem: start value and the (operation, operand) chain, e.g. ``"12|+5|*3"``."""
    return "|".join([str(start), *(f"{op}{n}" for op, n in ops)])


def problem_side(key: str) -> str:
    """``"test"`` or ``"train"``: fixed by a hash of the skeleton key, so the sides can never overlap."""
    bucket = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 100
    return "test" if bucket < TEST_PERCENT else "train"


def _apply(a: int, op: str, n: int) -> int:
    if op == "+":
        return a + n
    if op == "-":
        return a - n
    if op == "*":
        return a * n
    if op == "/":
        if n == 0 or a % n:
            raise ValueError(f"{a} / {n} is not an exact integer division")
        return a // n
    raise ValueError(f"unknown operation {op!r}")


def _choose_op(
    rng: random.Random, q: int, max_value: int, max_operand: int, max_factor: int
) -> tuple[str, int]:
    """One valid (operation, operand) for current value ``q`` keeping the result in ``2..max_value``."""
    options: list[tuple[str, int]] = []
    add_hi = min(max_operand, max_value - q)
    if add_hi >= 1:
        options.append(("+", rng.randint(1, add_hi)))
    if q >= 3:
        options.append(("-", rng.randint(1, min(max_operand, q - 2))))
    mul_hi = min(max_factor, max_value // q) if q >= 1 else 0
    if mul_hi >= 2:
        options.append(("*", rng.randint(2, mul_hi)))
    divisors = [d for d in range(2, max_factor + 1) if q % d == 0 and q // d >= 2]
    if divisors:
        options.append(("/", rng.choice(divisors)))
    return rng.choice(options)


def _render(
    rng: random.Random, start: int, ops: list[tuple[str, int]], values: list[int]
) -> tuple[str, list[str]]:
    name, subj, obj_pron = rng.choice(PEOPLE)
    friend = rng.choice([p[0] for p in PEOPLE if p[0] != name])
    thing = rng.choice(OBJECTS)
    fields = {"N": name, "p": subj, "O": obj_pron, "F": friend, "o": thing}
    sentences = [rng.choice(START_TEMPLATES).format(n=start, **fields)]
    steps = []
    first_day = rng.randrange(len(DAYS))  # the week may start on any day: every day is seen in every position
    days = [DAYS[(first_day + i) % len(DAYS)] for i in range(len(ops))]
    for day, (op, n), a, r in zip(days, ops, values[:-1], values[1:], strict=True):
        event = OP_PREFIX.format(day=day) + rng.choice(OP_TEMPLATES[op]).format(n=n, **fields)
        sentences.append(event)
        steps.append(STEP_TEMPLATE.format(event=event[:-1], N=name, a=a, op=op, n=n, r=r, o=thing))
    sentences.append(rng.choice(QUESTION_TEMPLATES).format(**fields))
    steps.append(ANSWER_TEMPLATE.format(r=values[-1]))
    return " ".join(sentences), steps


def iter_problems(
    seed: int = 0,
    split: str = "train",
    *,
    min_steps: int = 2,
    max_steps: int = 6,
    max_value: int = 999,
    max_operand: int = 20,
    max_factor: int = 5,
    start_max: int | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield distinct problems of one side (``"train"`` or ``"test"``) forever, deterministically from ``seed``.

    Knobs: ``min_steps``/``max_steps`` (arithmetic steps per problem, uniform), ``max_value`` (bound of every
    number), ``max_operand`` (bound of the numbers added or subtracted), ``max_factor`` (bound of the
    multipliers and divisors), ``start_max`` (bound of the starting value, default ``max_operand``).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    _check_knobs(min_steps, max_steps, max_value, max_operand, max_factor)
    start_hi = start_max if start_max is not None else max_operand
    if not 2 <= start_hi <= max_value:
        raise ValueError(f"start_max={start_max} must lie in 2..max_value={max_value}")
    rng = random.Random(f"arith:{split}:{seed}")
    seen: set[str] = set()
    while True:
        n_steps = rng.randint(min_steps, max_steps)
        start = rng.randint(2, start_hi)
        ops: list[tuple[str, int]] = []
        values = [start]
        for _ in range(n_steps):
            op, n = _choose_op(rng, values[-1], max_value, max_operand, max_factor)
            ops.append((op, n))
            values.append(_apply(values[-1], op, n))
        key = skeleton_key(start, ops)
        if key in seen or problem_side(key) != split:
            continue
        seen.add(key)
        question, steps = _render(rng, start, ops, values)
        digest = hashlib.sha1(f"{key}\n{question}".encode()).hexdigest()[:12]
        yield {"id": f"arith-{split}-{digest}", "question": question, "solution": join_steps(steps),
               "answer": str(values[-1]), "task": "arith", "n_steps": n_steps}  # fmt: skip


def generate_problems(
    n: int,
    seed: int = 0,
    split: str = "train",
    *,
    min_steps: int = 2,
    max_steps: int = 6,
    max_value: int = 999,
    max_operand: int = 20,
    max_factor: int = 5,
    start_max: int | None = None,
) -> list[dict[str, Any]]:
    """The first ``n`` problems of :func:`iter_problems` (distinct skeletons; same seed -> same list).

    Records: ``{"id", "question", "solution", "answer", "task": "arith", "n_steps"}``.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    it = iter_problems(seed, split, min_steps=min_steps, max_steps=max_steps, max_value=max_value,
                       max_operand=max_operand, max_factor=max_factor, start_max=start_max)  # fmt: skip
    return [next(it) for _ in range(n)]
