"""Step-level ground truth of ``arith`` (erprm_core.tasks.arith_truth): one hand-made case per error type."""

from __future__ import annotations

import pytest

from erprm_core.steps import split_steps
from erprm_core.tasks import arith
from erprm_core.tasks.arith_truth import (
    ERROR_TYPES,
    expected_steps,
    first_error,
    parse_question,
    step_correctness,
)

Q = (
    "Tom has 12 apples. On Monday, he buys 5 more apples. On Tuesday, he gives 3 apples to Mia. "
    "On Wednesday, the number of apples grows 2 times. How many apples does Tom have now?"
)
MON = "On Monday, he buys 5 more apples, so Tom has 12 + 5 = 17 apples."
TUE = "On Tuesday, he gives 3 apples to Mia, so Tom has 17 - 3 = 14 apples."
WED = "On Wednesday, the number of apples grows 2 times, so Tom has 14 * 2 = 28 apples."
END = "The answer is: 28"


def test_parse_question_values_and_events():
    t = parse_question(Q)
    assert (t.name, t.obj) == ("Tom", "apples")
    assert t.values == (12, 17, 14, 28)
    assert t.ops == (("+", 5), ("-", 3), ("*", 2))
    assert t.days == ("Monday", "Tuesday", "Wednesday")
    assert expected_steps(Q) == [MON, TUE, WED, END]


@pytest.mark.parametrize("split", ["train", "test"])
def test_expected_steps_equal_the_generators_reference(split):
    for p in arith.generate_problems(200, seed=3, split=split, max_value=99, max_operand=10):
        assert expected_steps(p) == split_steps(p["solution"])
        assert first_error(p, split_steps(p["solution"])) == (-1, "none")


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        ([MON, TUE, WED, END], (-1, "none")),
        # arithmetic slip: right event, right inputs, wrong result
        (
            [MON, "On Tuesday, he gives 3 apples to Mia, so Tom has 17 - 3 = 13 apples.", WED, END],
            (1, "arithmetic_slip"),
        ),
        # wrong operand copied (4 instead of 3), arithmetic consistent with it
        (
            [MON, "On Tuesday, he gives 3 apples to Mia, so Tom has 17 - 4 = 13 apples.", WED, END],
            (1, "wrong_operand_or_event"),
        ),
        # wrong starting value (not the previous result)
        (
            [MON, "On Tuesday, he gives 3 apples to Mia, so Tom has 12 - 3 = 9 apples."],
            (1, "wrong_operand_or_event"),
        ),
        # misquoted event (verb changed) with the right numbers: an error in strict mode
        (
            [MON, "On Tuesday, he sells 3 apples, so Tom has 17 - 3 = 14 apples.", WED, END],
            (1, "wrong_operand_or_event"),
        ),
        # skipped event: Tuesday's step handles Wednesday
        (
            [
                MON,
                "On Wednesday, the number of apples grows 2 times, so Tom has 17 * 2 = 34 apples.",
                "The answer is: 34",
            ],
            (1, "skipped_or_repeated_event"),
        ),
        # repeated event: Monday again where Tuesday was due
        (
            [MON, "On Monday, he buys 5 more apples, so Tom has 17 + 5 = 22 apples."],
            (1, "skipped_or_repeated_event"),
        ),
        # answer line while an event is still due
        ([MON, TUE, "The answer is: 14"], (2, "skipped_or_repeated_event")),
        # one more event step where the answer line was due
        (
            [
                MON,
                TUE,
                WED,
                "On Wednesday, the number of apples grows 2 times, so Tom has 28 * 2 = 56 apples.",
            ],
            (3, "skipped_or_repeated_event"),
        ),
        # final line with the wrong number, malformed, or followed by more text
        ([MON, TUE, WED, "The answer is: 27"], (3, "bad_final_line")),
        ([MON, TUE, WED, "So the answer is 28"], (3, "bad_final_line")),
        ([MON, TUE, WED, END, "The answer is: 28"], (4, "bad_final_line")),
        # truncation: an unfinished last line, or no answer line after right steps
        ([MON, "On Tuesday, he gives 3 apples to Mia, so Tom has 17 -"], (1, "truncation")),
        ([MON, TUE], (2, "truncation")),
        ([], (0, "truncation")),
        # a garbled line in the middle is not truncation
        ([MON, "On Tuesday, so so so", WED, END], (1, "wrong_operand_or_event")),
    ],
)
def test_first_error_cases(steps, expected):
    assert first_error(Q, steps) == expected


def test_every_error_type_is_covered_and_named():
    assert set(ERROR_TYPES) == {
        "arithmetic_slip",
        "wrong_operand_or_event",
        "skipped_or_repeated_event",
        "bad_final_line",
        "truncation",
        "none",
    }


def test_right_value_wrong_day_is_an_error_only_in_strict_mode():
    # Tuesday's arithmetic restated as "On Wednesday" (a day the question has) or "On Sunday" (one it lacks)
    wrong_day = "On Wednesday, he gives 3 apples to Mia, so Tom has 17 - 3 = 14 apples."
    assert first_error(Q, [MON, wrong_day, WED, END]) == (1, "wrong_operand_or_event")
    misquoted = "On Tuesday, he sells 3 apples, so Tom has 17 - 3 = 14 apples."
    assert first_error(Q, [MON, misquoted, WED, END], strict_event=False) == (-1, "none")
    # value mode: a step naming another event's day with that event's numbers is a skip
    skip = "On Wednesday, the number of apples grows 2 times, so Tom has 17 * 2 = 34 apples."
    assert first_error(Q, [MON, skip], strict_event=False) == (1, "skipped_or_repeated_event")


def test_step_correctness_marks_steps_before_the_first_error():
    slip = "On Tuesday, he gives 3 apples to Mia, so Tom has 17 - 3 = 13 apples."
    assert step_correctness(Q, [MON, slip, WED, END]) == [1, 0, 0, 0]
    assert step_correctness(Q, [MON, TUE]) == [1, 1]  # truncated after right steps: no step is wrong
    assert step_correctness(Q, [MON, TUE, WED, END]) == [1, 1, 1, 1]


def test_problem_record_and_question_text_agree():
    p = arith.generate_problems(1, seed=0, split="test", max_value=99, max_operand=10)[0]
    steps = split_steps(p["solution"])
    bad = steps[:-1] + ["The answer is: 1000"]
    assert first_error(p, bad) == first_error(p["question"], bad) == (len(steps) - 1, "bad_final_line")


def test_not_an_arith_question():
    with pytest.raises(ValueError):
        parse_question("What is 2 + 2?")
