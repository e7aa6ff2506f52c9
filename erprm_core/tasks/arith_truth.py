"""Step-level ground truth for the synthetic task ``arith``: where a generated solution first goes wrong, and how.

Every ``arith`` problem is fully determined by its question: a start sentence (``"Tom has 12 apples."``),
one sentence per change on a named day (``"On Monday, he buys 5 more apples."``) and the question sentence.
:func:`parse_question` recovers from that text the start value, each event's sentence, day, operation and
operand, and so the true value after every event; :func:`expected_steps` rebuilds the reference solution
line by line (it equals the generator's ``solution`` field, a test checks it). Only the question is needed,
so labelled rollout records (which carry ``question`` but not ``solution``) can be checked directly.

:func:`first_error` compares a generated solution (list of step strings, one per line, as
:func:`erprm_core.steps.split_steps` makes them) with that truth and returns ``(index, error_type)``: the
0-based index of the first wrong step, ProcessBench-style ``-1`` when every step is right, and one of
:data:`ERROR_TYPES`:

``arithmetic_slip``
    the step restates the right event and starts from the right value with the right operation and operand,
    but its result is wrong (``"12 + 5 = 18"``).
``wrong_operand_or_event``
    the step handles the event that is due but copies a wrong number or operation (from the question or
    from nowhere), or it misquotes the event's sentence, or it names a day the question does not have, or
    it is not a well-formed step line (and is not the last line, see ``truncation``).
``skipped_or_repeated_event``
    the step handles another event than the one due: it names the day of a later event (one was skipped),
    of an earlier one (repeated), or the answer line comes while events are still due.
``bad_final_line``
    all events are handled right, but the line after them is not ``"The answer is: N"`` with the true final
    value (a wrong number, a malformed line), or something follows the answer line.
``truncation``
    the solution stops early: its last line is an unfinished step, or it ends without an answer line after
    steps that are all right. In the second case the returned index is ``len(steps)`` (the missing line):
    no present step is wrong, so a label "before the first error" keeps them all.
``none``
    every step is right and the answer line closes the solution (index ``-1``).

Decision on a step with the right value but a wrongly restated event (``"On Sunday, ..., so Leo has
5 * 4 = 20"`` where Monday's event was due and computes 5 * 4): by default (``strict_event=True``) it IS an
error (``wrong_operand_or_event``). Reasons: the step states something false about the question; the
reference format makes the restated event part of the step; and the policy, used as the Monte Carlo
completer, reads the restated day to find the next event, so such a step derails completions (the tiny
study measured p = 0 after one) and the Monte Carlo labels count it as wrong by construction. Ground truth
that ignored it would score those labels as mistakes. ``strict_event=False`` judges values only (the day and
the arithmetic decide; a misquoted sentence or a wrong day with the right numbers passes), for studies that
want "arithmetic truth" alone. The person's name and the object word after ``has`` are checked in strict
mode too (a misnamed object is a misquote); in value mode they are ignored.

Used by the tiny study's label- and PRM-quality checks (AUROC of step labels for "before the first error",
first-error F1 of the PRMs); see tests/test_arith_truth.py for one hand-made case per error type.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from erprm_core.tasks.arith import DAYS, OP_TEMPLATES, START_TEMPLATES, STEP_TEMPLATE, _apply

ERROR_TYPES = ("arithmetic_slip", "wrong_operand_or_event", "skipped_or_repeated_event", "bad_final_line",
               "truncation", "none")  # fmt: skip

__all__ = ["ERROR_TYPES", "ArithTruth", "parse_question", "expected_steps", "first_error", "step_correctness"]

_SENTENCE = re.compile(r"(?<=[.?])\s+")
_STEP = re.compile(
    r"^(?P<event>.+?), so (?P<name>\S+) has (?P<a>\d+) (?P<op>[-+*/]) (?P<n>\d+) = (?P<r>\d+) (?P<obj>.+?)\.$"
)
_ANSWER = re.compile(r"^The answer is: ?(?P<value>-?\d+)\.?$")
_DAY = re.compile(r"^On (?P<day>\w+), ")


def _template_regex(template: str) -> re.Pattern[str]:
    """A regex for one question template; named groups ``n`` (operand) and ``o`` (object)."""
    fields = {"N": r"(?P<N>\S+)", "p": r"(?:he|she)", "O": r"(?:him|her)", "F": r"\S+", "o": r"(?P<o>.+?)",
              "n": r"(?P<n>\d+)"}  # fmt: skip
    out, pos = [], 0
    for m in re.finditer(r"\{(\w)\}", template):
        out.append(re.escape(template[pos : m.start()]))
        out.append(fields[m[1]])
        pos = m.end()
    out.append(re.escape(template[pos:]))
    return re.compile("^" + "".join(out) + "$")


_START_RES = [_template_regex(t) for t in START_TEMPLATES]
_OP_RES = [(op, _template_regex(t)) for op, templates in OP_TEMPLATES.items() for t in templates]


@dataclass(frozen=True)
class ArithTruth:
    """What an ``arith`` question determines: name, object, start value and its events in order.

    ``events[i]`` is the i-th change's sentence (``"On Monday, he buys 5 more apples."``), ``days[i]`` its
    day, ``ops[i]`` its ``(operation, operand)``; ``values[i]`` is the true count before event ``i``
    (``values[0]`` the start, ``values[-1]`` the answer).
    """

    name: str
    obj: str
    events: tuple[str, ...]
    days: tuple[str, ...]
    ops: tuple[tuple[str, int], ...]
    values: tuple[int, ...]

    @property
    def n_events(self) -> int:
        """Number of arithmetic steps (events); the answer line is step ``n_events``."""
        return len(self.events)


def parse_question(question: str) -> ArithTruth:
    """Recover the truth of an ``arith`` question from its text alone; ValueError if it is not one."""
    sentences = [s for s in _SENTENCE.split(question.strip()) if s]
    if len(sentences) < 3:
        raise ValueError(f"not an arith question (too few sentences): {question!r}")
    start = next((m for r in _START_RES if (m := r.match(sentences[0]))), None)
    if start is None:
        raise ValueError(f"not an arith start sentence: {sentences[0]!r}")
    name, obj, values = start["N"], start["o"], [int(start["n"])]
    events, days, ops = [], [], []
    for sentence in sentences[1:-1]:
        day = _DAY.match(sentence)
        if day is None or day["day"] not in DAYS:
            raise ValueError(f"not an arith event sentence: {sentence!r}")
        rest = sentence[day.end() :]
        hit = next(((op, m) for op, r in _OP_RES if (m := r.match(rest))), None)
        if hit is None:
            raise ValueError(f"no operation template matches {sentence!r}")
        op, m = hit
        events.append(sentence)
        days.append(day["day"])
        ops.append((op, int(m["n"])))
        values.append(_apply(values[-1], op, int(m["n"])))
    return ArithTruth(name, obj, tuple(events), tuple(days), tuple(ops), tuple(values))


def _truth_of(problem: dict[str, Any] | str | ArithTruth) -> ArithTruth:
    if isinstance(problem, ArithTruth):
        return problem
    return parse_question(problem if isinstance(problem, str) else problem["question"])


def expected_steps(problem: dict[str, Any] | str | ArithTruth) -> list[str]:
    """The reference solution's lines rebuilt from the question (equal to the generator's ``solution``)."""
    t = _truth_of(problem)
    lines = [
        STEP_TEMPLATE.format(event=event[:-1], N=t.name, a=a, op=op, n=n, r=r, o=t.obj)
        for event, (op, n), a, r in zip(t.events, t.ops, t.values[:-1], t.values[1:], strict=True)
    ]
    return [*lines, f"The answer is: {t.values[-1]}"]


def _check_event_step(t: ArithTruth, i: int, step: str, is_last: bool, strict: bool) -> str | None:
    """Error type of step ``i`` (< n_events) given that steps before it are right; None if it is right."""
    if _ANSWER.match(step):
        return "skipped_or_repeated_event"  # answered while event i (and maybe more) was still due
    m = _STEP.match(step)
    if m is None:
        return "truncation" if is_last else "wrong_operand_or_event"
    a, op, n, r = int(m["a"]), m["op"], int(m["n"]), int(m["r"])
    day = _DAY.match(m["event"] + ", ")
    day_name = day["day"] if day else None
    other_days = [j for j, d in enumerate(t.days) if d == day_name and j != i]
    right_inputs = a == t.values[i] and (op, n) == t.ops[i]
    right_value = right_inputs and r == t.values[i + 1]
    if strict:
        quoted = m["event"] + "." == t.events[i] and m["name"] == t.name and m["obj"] == t.obj
    else:
        quoted = day_name == t.days[i]
    if quoted:
        if right_value:
            return None
        return "arithmetic_slip" if right_inputs else "wrong_operand_or_event"
    if right_value:
        return "wrong_operand_or_event"  # right numbers, wrongly restated event (see the module docstring)
    if other_days:
        return "skipped_or_repeated_event"  # it handles (or at least names) another event
    return "wrong_operand_or_event"


def first_error(
    problem: dict[str, Any] | str | ArithTruth, steps: Sequence[str], *, strict_event: bool = True
) -> tuple[int, str]:
    """``(index of the first wrong step, error type)`` of a generated ``arith`` solution; ``(-1, "none")`` if right.

    ``problem``: a problem record (only its ``question`` is read), the question text, or a parsed
    :class:`ArithTruth`. ``steps``: the solution's lines. Steps ``0 .. n_events - 1`` must each handle event
    ``i`` (restated verbatim when ``strict_event``) and compute ``values[i] op n = values[i + 1]``; step
    ``n_events`` must be ``"The answer is: <answer>"`` and the last line. A solution that ends early after
    right steps gives ``(len(steps), "truncation")``. See the module docstring for each type.

    >>> q = ("Tom has 12 apples. On Monday, he buys 5 more apples. "
    ...      "On Tuesday, he gives 3 apples to Mia. How many apples does Tom have now?")
    >>> first_error(q, ["On Monday, he buys 5 more apples, so Tom has 12 + 5 = 17 apples.",
    ...                 "On Tuesday, he gives 3 apples to Mia, so Tom has 17 - 3 = 15 apples.",
    ...                 "The answer is: 14"])
    (2, 'bad_final_line')
    """
    t = _truth_of(problem)
    steps = [s.strip() for s in steps]
    for i, step in enumerate(steps):
        is_last = i == len(steps) - 1
        if i < t.n_events:
            err = _check_event_step(t, i, step, is_last, strict_event)
        elif i == t.n_events:
            m = _ANSWER.match(step)
            if m is not None and int(m["value"]) == t.values[-1]:
                err = None
            elif m is None and _STEP.match(step) and _DAY.match(step):
                err = "skipped_or_repeated_event"  # one more event step where the answer was due
            else:
                err = "bad_final_line"
        else:
            err = "bad_final_line"  # anything after the answer line
        if err is not None:
            return i, err
    if len(steps) <= t.n_events:
        return len(steps), "truncation"
    return -1, "none"


def step_correctness(
    problem: dict[str, Any] | str | ArithTruth, steps: Sequence[str], *, strict_event: bool = True
) -> list[int]:
    """One 0/1 per step: 1 before the first error, 0 from it on (the ground-truth "hard" process label)."""
    index, _ = first_error(problem, steps, strict_event=strict_event)
    cut = len(steps) if index < 0 else index
    return [1 if i < cut else 0 for i in range(len(steps))]
