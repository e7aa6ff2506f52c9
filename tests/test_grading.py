"""Tests of erprm_core.grading: extraction formats, numeric and math-verify equivalence, robustness, timeouts,
and the real GSM8K test / MATH500 references (skipped when ../shared/data is absent)."""

from __future__ import annotations

import json
import threading
import time

import pytest

from erprm_core import grading
from erprm_core.grading import extract_answer, is_correct, last_boxed, normalize_reference, numbers_equal
from erprm_core.running.artifacts import repo_root

DATA = repo_root().parent / "shared" / "data"
GSM8K_TEST = DATA / "gsm8k" / "test.jsonl"
MATH500_TEST = DATA / "math500" / "test.jsonl"


# ---------------------------------------------------------------------------------------------------
# numbers (arith, gsm8k)
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Step 1\nThe answer is: 72", "72"),
        ("The answer is: $1,234.", "1234"),
        ("The answer is 1,450,000 dollars.", "1450000"),
        ("She pays 5 * 2 = 10\n#### 72", "72"),
        ("#### 1,450,000", "1450000"),
        ("The answer is -5", "-5"),
        ("The answer is: \u22125", "-5"),
        ("The answer is: $-12.5", "-12.5"),
        ("The answer is: -$12", "-12"),
        ("The answer is 3.50 dollars.", "3.5"),
        ("The answer is: 0.0", "0"),
        ("The answer is 007", "7"),
        ("The answer is: 3/4", "0.75"),
        ("The answer is 1/3 of the cake", "1/3"),
        ("the answer is 50%", "50"),
        ("The final answer is 12 apples", "12"),
        ("THE ANSWER IS:18", "18"),
        ("The answer is:\n  8", "8"),
        (r"So the total is \boxed{42}.", "42"),
        (r"The answer is: \boxed{\frac{3}{4}}", "0.75"),
        (r"The answer is $\boxed{1{,}000}$", "1000"),
        (r"\boxed{\$18.50}", "18.5"),
        (r"\boxed{5 \text{ apples}}", "5"),
        (r"\fbox{9}", "9"),
        ("The answer is 5\nWait.\nThe answer is: 7", "7"),  # the last marker wins
        ("#### 5\n" + r"\boxed{6}", "6"),
        (r"\boxed{6} so #### 5", "5"),
        (r"The answer is 5. Then \boxed{6", "5"),  # truncated box: the previous complete marker
        ("The answer is 10/2 = 5", "5"),
    ],
)
@pytest.mark.parametrize("task", ["arith", "gsm8k"])
def test_extract_numbers(text, expected, task):
    assert extract_answer(text, task) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        None,
        42,
        "She has 72 apples.",  # no marker: no answer (no guessing from the last number)
        "The answer is: unknown",
        "The answer is",
        "####",
        r"\boxed{",
        r"\boxed{}",
        r"\boxed{x+y}",
        "The answer is: 1/0",
        "\x00\x01 The answer is: \ufffd",
        "{" * 500 + r"\boxed{" + "}" * 3,
    ],
)
@pytest.mark.parametrize("task", ["arith", "gsm8k"])
def test_extract_numbers_garbage_is_none(text, task):
    assert extract_answer(text, task) is None
    assert is_correct(text, "72", task) is False


@pytest.mark.parametrize(
    "text, reference, expected",
    [
        ("The answer is: 72", "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 eggs.\n#### 72", True),
        ("The answer is: 72", "72", True),
        ("The answer is: 72", 72, True),
        ("The answer is: $72.00.", "72", True),
        ("#### 1,450,000", "1450000", True),
        ("The answer is: 1450000", "#### 1,450,000", True),
        ("The answer is: 2880001", "2880000", False),  # integers compare exactly
        ("The answer is: 73", "72", False),
        ("The answer is: -72", "72", False),
        ("The answer is: 0.3333333", "1/3", True),  # rounding of a non-integer: relative 1e-6
        ("The answer is: 0.33", "1/3", False),
        (r"\boxed{0.5}", "1/2", True),
        ("The answer is: 72", "not a number", False),
        ("The answer is: 72", "", False),
        ("no marker 72", "72", False),
    ],
)
def test_is_correct_numbers(text, reference, expected):
    assert is_correct(text, reference, "gsm8k") is expected
    assert is_correct(text, reference, "arith") is expected


def test_numbers_equal_and_normalize_reference():
    assert numbers_equal("1,234", "1234.0")
    assert not numbers_equal("abc", "abc")
    assert normalize_reference("... so she makes $18 a day.\n#### 18", "gsm8k") == "18"
    assert normalize_reference("1,234", "gsm8k") == "1234"
    assert normalize_reference("$5", "arith") == "5"
    assert normalize_reference(" -3.50 ", "arith") == "-3.5"
    assert normalize_reference(72, "gsm8k") == "72"
    assert normalize_reference("The answer is: 9", "arith") == "9"
    with pytest.raises(ValueError, match="no number"):
        normalize_reference("seventy", "gsm8k")


# ---------------------------------------------------------------------------------------------------
# math
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so $\boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),
        (r"$\boxed{\{1,2\}}$", r"\{1,2\}"),
        (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)"),
        (r"first \boxed{1} then \boxed{2}", "2"),
        (r"\fbox{x^2}", "x^2"),
        (r"\boxed 5", "5"),
        (r"The answer is: $\frac{\sqrt{3}}{2}$.", r"\frac{\sqrt{3}}{2}"),
        (r"The answer is $\frac{1}{2}$, which is half.", r"\frac{1}{2}"),
        (r"The answer is: \frac{14}{3}", r"\frac{14}{3}"),
        (r"The answer is: \$18.90.", r"\$18.90"),
        (r"The answer is: \(x=3\)", "x=3"),
        ("The answer is: $$5$$", "5"),
        (r"The answer is: $\boxed{7}$", "7"),
    ],
)
def test_extract_math(text, expected):
    assert extract_answer(text, "math") == expected


def test_last_boxed():
    assert last_boxed(r"a \boxed{1} b \boxed{\frac{2}{3}} c") == r"\frac{2}{3}"
    assert last_boxed(r"\boxed{1} \boxed{2") == "1"
    assert last_boxed("none") is None
    assert last_boxed(None) is None


@pytest.mark.parametrize(
    "pred, ref",
    [
        (r"\frac{1}{2}", "0.5"),
        ("0.5", r"\frac12"),
        (r"\dfrac{1}{2}", r"\frac{1}{2}"),
        ("1/2", r"\frac{1}{2}"),
        ("(1, 2)", "(1,2)"),
        (r"\left( 3, \frac{\pi}{2} \right)", r"(3,\pi/2)"),
        (r"\sqrt{8}", r"2\sqrt{2}"),
        (r"\frac{\sqrt{2}}{2}", r"\frac{1}{\sqrt{2}}"),
        (r"\dfrac{\sqrt{3}}{2}", r"\frac{\sqrt3}{2}"),
        (r"\{2,1\}", r"\{1,2\}"),
        ("x^2+2x+1", "(x+1)^2"),
        ("[1, 2)", "[1,2)"),
        (r"\pi/2", r"\frac{\pi}{2}"),
        (r"90^\circ", "90"),
        ("x = 5", "5"),
        ("3.0", "3"),
        ("1000", r"1,\!000"),
        ("18.90", r"\$18.90"),
        ("C", r"\text{(C)}"),
        ("Evelyn", r"\text{Evelyn}"),
        ("1, -2", "-2, 1"),
        (r"\begin{pmatrix}1\\2\end{pmatrix}", r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}"),
    ],
)
def test_math_equivalent(pred, ref):
    assert is_correct(rf"so \boxed{{{pred}}}", ref, "math")
    assert is_correct(f"The answer is: {pred}", ref, "math")


@pytest.mark.parametrize(
    "pred, ref",
    [
        ("5", "6"),
        (r"\frac{1}{2}", r"\frac{1}{3}"),
        ("(1,2)", "(2,1)"),
        ("[1,2]", "(1,2)"),
        (r"\sqrt{2}", r"\sqrt{3}"),
        ("x+1", "x-1"),
        ("Bob", r"\text{Evelyn}"),
        ("0.5001", r"\frac12"),
    ],
)
def test_math_not_equivalent(pred, ref):
    assert not is_correct(rf"\boxed{{{pred}}}", ref, "math")


@pytest.mark.parametrize(
    "text",
    [
        None,
        "",
        "no answer here",
        r"\boxed{",
        r"\boxed{\frac{",
        r"\boxed{)(}",
        r"\boxed{\\\\}",
        "The answer is:",
    ],
)
def test_math_garbage_is_false(text):
    assert is_correct(text, r"\frac{1}{2}", "math") is False
    assert is_correct(r"\boxed{1}", "", "math") is False  # empty reference


def test_math_normalize_reference():
    assert normalize_reference(r"\frac{14}{3}", "math") == r"\frac{14}{3}"
    assert normalize_reference(r"$\frac12$", "math") == r"\frac12"
    assert normalize_reference(r"so the sum is $\boxed{\frac{1}{2}}$.", "math") == r"\frac{1}{2}"
    with pytest.raises(ValueError, match="no MATH answer"):
        normalize_reference("  ", "math")


@pytest.mark.parametrize("fn", [extract_answer, normalize_reference])
def test_unknown_task_raises(fn):
    with pytest.raises(ValueError, match="task"):
        fn("The answer is: 1", "gsm8")


def test_unknown_task_raises_in_is_correct():
    with pytest.raises(ValueError, match="task"):
        is_correct("The answer is: 1", "1", "MATH")


@pytest.mark.slow
def test_pathological_math_is_bounded_in_main_thread(monkeypatch):
    monkeypatch.setattr(grading, "VERIFY_TIMEOUT_S", 1)
    monkeypatch.setattr(grading, "PARSE_TIMEOUT_S", 1)
    start = time.perf_counter()
    assert is_correct(r"\boxed{9^{9^{9^{9}}}}", "5", "math") is False
    assert is_correct(r"The answer is: (10^{100})!", "7", "math") is False
    assert time.perf_counter() - start < 60  # unbounded, these run for hours; ~2 s with the 1 s timeouts


@pytest.mark.slow
def test_math_in_threads_uses_guarded_helper(monkeypatch):
    """From a non-main thread (no SIGALRM) the comparison runs in a helper process; a hang cannot block."""
    monkeypatch.setattr(grading, "VERIFY_TIMEOUT_S", 1)
    monkeypatch.setattr(grading, "PARSE_TIMEOUT_S", 1)
    cases = [
        (r"\boxed{(10^{10})!}", "4", False),
        (r"\boxed{0.5}", r"\frac{1}{2}", True),
        (r"\boxed{0.6}", "1/2", False),
    ]
    results: dict[int, bool] = {}

    def work(i: int, text: str, ref: str) -> None:
        results[i] = is_correct(text, ref, "math")

    threads = [threading.Thread(target=work, args=(i, t, r)) for i, (t, r, _) in enumerate(cases)]
    for th in threads:
        th.start()
    # a comparison that hung would keep its thread alive (no wall-time bound: CI is shared)
    for th in threads:
        th.join(timeout=120)
    assert not any(th.is_alive() for th in threads)
    assert results == {i: expected for i, (_, _, expected) in enumerate(cases)}

    # backstop: a helper that overruns is killed (-> False) and restarted for the next call
    monkeypatch.setattr(grading, "WORKER_TIMEOUT_S", 0.01)
    grading.MATH_WORKER.close()
    out: list[bool] = []
    th = threading.Thread(target=lambda: out.append(grading.MATH_WORKER.equal(r"\sqrt{4}", "2")))
    th.start()
    th.join(timeout=30)
    assert out == [False]
    monkeypatch.setattr(grading, "WORKER_TIMEOUT_S", 60.0)
    th = threading.Thread(target=lambda: out.append(grading.MATH_WORKER.equal(r"\sqrt{4}", "2")))
    th.start()
    th.join(timeout=60)
    assert out == [False, True]


# ---------------------------------------------------------------------------------------------------
# real references (skipped without ../shared/data)
# ---------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not GSM8K_TEST.is_file(), reason=f"{GSM8K_TEST} absent")
def test_gsm8k_test_references_grade_themselves():
    rows = [json.loads(line) for line in GSM8K_TEST.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(rows) == 1319
    bad = []
    for row in rows:
        final = row["answer"].rsplit("####", 1)[1].strip()
        value = int(final.replace(",", ""))
        ok = (
            is_correct(f"#### {final}", row["answer"], "gsm8k")
            and is_correct(f"The answer is: ${value:,}.", row["answer"], "gsm8k")
            and not is_correct(f"#### {value + 1}", row["answer"], "gsm8k")
        )
        if not ok:
            bad.append(final)
    assert bad == []


@pytest.mark.skipif(not MATH500_TEST.is_file(), reason=f"{MATH500_TEST} absent")
def test_math500_answers_match_their_boxed_solutions():
    rows = [
        json.loads(line) for line in MATH500_TEST.read_text(encoding="utf-8").splitlines() if line.strip()
    ]
    assert len(rows) == 500
    grading.math_equal.cache_clear()
    start = time.perf_counter()
    fails, mv_fails = [], []
    for row in rows:
        boxed = last_boxed(row["solution"])
        if not is_correct(row["solution"], row["answer"], "math"):
            fails.append((row["unique_id"], row["answer"], boxed))
        # math-verify alone (no text shortcut), gold = the answer field
        if boxed is None or not grading.math_equal_in_process(boxed, row["answer"], 3, 3):
            mv_fails.append((row["unique_id"], row["answer"], boxed))
    seconds = time.perf_counter() - start
    rate, mv_rate = 1 - len(fails) / len(rows), 1 - len(mv_fails) / len(rows)
    print(
        f"MATH500 answer == boxed(solution): is_correct {rate:.2%}, math-verify alone {mv_rate:.2%}, {seconds:.1f} s"
    )
    for fail in fails + mv_fails:
        print("  not equivalent:", fail)
    assert rate >= 0.99
    assert mv_rate >= 0.99
    assert seconds < 60


@pytest.mark.skipif(not MATH500_TEST.is_file(), reason=f"{MATH500_TEST} absent")
def test_math500_answers_do_not_match_other_problems():
    """Specificity: a problem's boxed answer is rarely 'equivalent' to the next problem's answer."""
    rows = [
        json.loads(line) for line in MATH500_TEST.read_text(encoding="utf-8").splitlines() if line.strip()
    ]
    rows = rows[:200]
    hits = [
        (a["answer"], b["answer"])
        for a, b in zip(rows, rows[1:] + rows[:1], strict=True)
        if is_correct(a["solution"], b["answer"], "math")
    ]
    print(f"cross-problem matches: {len(hits)} / {len(rows)}: {hits}")
    assert len(hits) <= 0.03 * len(rows)


@pytest.mark.parametrize(
    "text",
    [
        "\\boxed{" * 20000,
        "{" * 100000 + "\\boxed{1}",
        "\\boxed{1}" + "\\boxed{ {" * 20000,
        "The answer is: " + "9" * 5000 + "." * 50000,
        "$" * 50001,
    ],
)
@pytest.mark.parametrize("task", ["gsm8k", "math"])
def test_degenerate_long_text_does_not_hang(text, task):
    # A guard against catastrophic (super-linear) regex backtracking, which takes minutes or more on these
    # inputs; not a speed goal: the bound is loose so that a loaded CI machine (about 1.5 s seen) passes.
    start = time.perf_counter()
    extract_answer(text, task)
    assert time.perf_counter() - start < 20.0
