"""Answer extraction and equivalence for the three tasks: ``arith``, ``gsm8k`` (numbers) and ``math``.

A solution states its final answer as ``The answer is: N`` (GSM8K / MetaMath style, the format of every
reference solution in this kit), ``#### N`` (raw GSM8K) or ``\\boxed{...}`` / ``\\fbox{...}`` (MATH style); the
marker that occurs LAST in the text wins. Numbers (arith, gsm8k) are compared exactly as fractions, then with
a relative tolerance of 1e-6; MATH expressions are compared with the math-verify library (sympy based).

Robustness contract: garbage in gives ``None`` / ``False``, never an exception (only an unknown ``task`` raises
``ValueError``). math-verify's own timeouts (``signal.alarm``) bound every parse and comparison; they work only
in the main thread, so calls from other threads are sent to a helper subprocess that is killed when it
overruns (a pathological answer such as ``9^{9^{9^9}}`` can never hang the caller).
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import re
import select
import subprocess
import sys
import threading
from fractions import Fraction
from functools import lru_cache
from pathlib import Path

log = logging.getLogger(__name__)

TASKS = ("arith", "gsm8k", "math")
PARSE_TIMEOUT_S = 3  # math-verify parse timeout per expression (whole seconds: signal.alarm)
VERIFY_TIMEOUT_S = 3  # math-verify timeout per comparison
WORKER_TIMEOUT_S = 60.0  # backstop for one call in the helper subprocess (non-main threads), incl. start-up
MAX_MATH_CHARS = 1000  # longer extracted MATH answers are compared as strings only (no sympy)
REL_TOL = 1e-6  # numeric answers: relative tolerance after the exact comparison

_MARKER = re.compile(
    r"(?P<phrase>\bthe\s+(?:final\s+)?answer\s+is\b\s*:?)|(?P<hash>####)|(?P<box>\\(?:boxed|fbox)(?![A-Za-z]))",
    re.IGNORECASE,
)


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got task={task!r}")


_BRACE_TOKEN = re.compile(r"\\.|[{}]", re.DOTALL)  # an escape (\{, \}, \\ ...) or a brace
_BARE_ARG = re.compile(r"[^\s$]+")


def _braced(text: str, start: int, limit: int) -> str | None:
    """Content of the balanced ``{...}`` group opening at ``text[start]`` and closing before ``limit``."""
    if start >= limit or text[start] != "{":
        return None
    depth = 0
    for tok in _BRACE_TOKEN.finditer(text, start, limit):
        if tok.group() == "{":
            depth += 1
        elif tok.group() == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : tok.start()]
    return None  # unbalanced (e.g. a truncated generation)


def _box_content(text: str, after: int, limit: int) -> str | None:
    """Argument of a ``\\boxed``/``\\fbox`` whose name ends at ``after``: ``{...}`` or ``\\boxed 5`` form."""
    i = after
    while i < limit and text[i] in " \t":
        i += 1
    if i < limit and text[i] == "{":
        return _braced(text, i, limit)
    if i > after:  # "\boxed 5": the argument runs to the next whitespace or "$"
        m = _BARE_ARG.match(text, i, limit)
        return m.group(0) if m else None
    return None


def _final_span(text: str, boxes_only: bool = False) -> str | None:
    """Text of the last answer marker: boxed content, or the rest of the line after the phrase / ``####``.

    An unbalanced (truncated) box is skipped for the previous marker. Linear time: a box before an unbalanced
    one can only close before it, so its scan stops there.
    """
    limit = len(text)
    for m in reversed(list(_MARKER.finditer(text))):
        if m.group("box"):
            content = _box_content(text, m.end(), limit)
            if content is not None:
                return content
            limit = m.start()
        elif not boxes_only:
            return text[m.end() :].lstrip().split("\n", 1)[0].strip()
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last balanced ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, else None."""
    return _final_span(text, boxes_only=True) if isinstance(text, str) else None


_NUMBER = re.compile(
    r"(?<![\w.])(?P<neg>[-\u2212\u2013]\s?)?\\?\$?\s?"
    r"(?P<num>(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)"
    r"(?:\s?/\s?(?P<den>(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?))?"
)
_LATEX_FRAC = re.compile(r"\\[dt]?frac\s*\{\s*([^{}]*?)\s*\}\s*\{\s*([^{}]*?)\s*\}")
_TEXT_CMD = re.compile(r"\\(?:text|textbf|mathrm|mbox)\s*\{([^{}]*)\}")


def _parse_number(span: str) -> Fraction | None:
    """The first number in ``span`` (commas, "$", units, trailing period, "a/b", ``\\frac{a}{b}`` allowed)."""
    s = _TEXT_CMD.sub(r" \1 ", span)
    s = _LATEX_FRAC.sub(r"\1/\2", s)
    s = s.replace("{,}", ",").replace("\\!", "").replace("\\,", "").replace("{", " ").replace("}", " ")
    m = _NUMBER.search(s)
    if m is None:
        return None
    try:
        value = Fraction(m.group("num").replace(",", ""))
        if m.group("den"):
            den = Fraction(m.group("den").replace(",", ""))
            if den == 0:
                return None
            value /= den
    except (ValueError, ZeroDivisionError):
        return None
    return -value if m.group("neg") else value


def _format_number(value: Fraction) -> str:
    """Canonical text of a number: ``"72"``, ``"-3.5"``, ``"0.75"``, ``"1/3"`` (non-terminating decimals)."""
    if value.denominator == 1:
        return str(value.numerator)
    den, places = value.denominator, 0
    while den % 2 == 0 or den % 5 == 0:  # places = the smallest p with 10**p divisible by the denominator
        den = den // 10 if den % 10 == 0 else den // 2 if den % 2 == 0 else den // 5
        places += 1
    if den != 1:
        return f"{value.numerator}/{value.denominator}"
    scaled = abs(value.numerator) * 10**places // value.denominator  # exact: a terminating decimal
    digits = str(scaled).rjust(places + 1, "0")
    text = f"{digits[:-places]}.{digits[-places:]}".rstrip("0").rstrip(".")
    return f"-{text}" if value < 0 else text


def numbers_equal(a: str, b: str, rel_tol: float = REL_TOL) -> bool:
    """Whether two number texts are equal: exactly as fractions, else within ``rel_tol`` (relative).

    The tolerance is for rounded non-integers (``0.333333`` vs ``1/3``); two integers must match exactly.
    """
    x, y = _parse_number(str(a)), _parse_number(str(b))
    if x is None or y is None:
        return False
    if x == y:
        return True
    if x.denominator == 1 and y.denominator == 1:  # two integers: exact only (2880001 != 2880000)
        return False
    try:
        return math.isclose(float(x), float(y), rel_tol=rel_tol, abs_tol=1e-12)
    except OverflowError:
        return False


_SPACING = re.compile(r"\\[,;:! ]|\\q?quad|\\left|\\right|\\displaystyle|\s+")


def _clean_math(expr: str) -> str:
    """Strip a MATH answer of surrounding ``$``/``\\[ \\]``, trailing punctuation and whitespace."""
    s = expr.strip()
    changed = True
    while changed and s:
        changed = False
        for left, right in (("$$", "$$"), ("$", "$"), ("\\[", "\\]"), ("\\(", "\\)")):
            if len(s) >= len(left) + len(right) and s.startswith(left) and s.endswith(right):
                s = s[len(left) : len(s) - len(right)].strip()
                changed = True
        if s.endswith((".", ",", ";")) and not s.endswith("\\."):
            s = s[:-1].rstrip()
            changed = True
        if s.startswith("$") and s.count("$") == 1:
            s = s[1:].strip()
            changed = True
        if s.endswith("$") and s.count("$") == 1:
            s = s[:-1].strip()
            changed = True
    return s


def _leading_math(span: str) -> str:
    """``"$x$, so ..."`` -> ``"$x$"``: a span opening with a math delimiter is cut at its closing one."""
    s = span.strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\[", "\\]"), ("\\(", "\\)")):
        if s.startswith(left):
            end = s.find(right, len(left))
            while end > 0 and right[0] == "$" and s[end - 1] == "\\":  # "\$" is a dollar sign, not math
                end = s.find(right, end + 1)
            if end > len(left):
                return s[: end + len(right)]
            break
    return s


def _light_norm(expr: str) -> str:
    """Cheap canonical text for the string shortcut: no spacing commands, ``\\dfrac`` -> ``\\frac``."""
    s = _SPACING.sub("", expr)
    return s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")


@lru_cache(maxsize=4096)
def _mv_parse(expr: str, timeout: int | None):
    from math_verify import parse

    return parse(f"\\boxed{{{expr}}}", parsing_timeout=timeout)


class _NoSignals(RuntimeError):
    """math-verify's SIGALRM timeouts cannot be used in this thread."""


def math_equal_in_process(pred: str, ref: str, parse_t: int | None, verify_t: int | None) -> bool:
    """math-verify comparison in this thread, with its (SIGALRM, main thread only) timeouts in seconds."""
    from math_verify import verify
    from math_verify.errors import TimeoutException

    try:
        gold = _mv_parse(ref, parse_t)
        target = _mv_parse(pred, parse_t)
        if not gold or not target:
            return False
        return bool(verify(gold, target, timeout_seconds=verify_t))
    except ValueError as exc:
        if "thread" in str(exc):  # math-verify: signal timeouts unavailable here; the caller falls back
            raise _NoSignals(str(exc)) from exc
        log.debug("math-verify failed on pred=%r ref=%r", pred, ref, exc_info=True)
        return False
    except (Exception, TimeoutException):  # sympy errors on odd input, or a late alarm: not equal
        log.debug("math-verify failed on pred=%r ref=%r", pred, ref, exc_info=True)
        return False


class _Worker:
    """A helper Python subprocess that runs math-verify in ITS main thread (so signal timeouts work there).

    Used for calls from non-main threads; a call that overruns ``WORKER_TIMEOUT_S`` kills the subprocess
    (it is restarted on the next call) and counts as "not equal".
    """

    def __init__(self) -> None:
        self._proc: subprocess.Popen[str] | None = None
        self._lock = threading.Lock()

    def _start(self) -> subprocess.Popen[str]:
        env = dict(os.environ)
        pkg_parent = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_parent, env.get("PYTHONPATH", "")) if p)
        return subprocess.Popen(
            [sys.executable, "-c", "from erprm_core.grading import _worker_loop; _worker_loop()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            bufsize=1,
            env=env,
        )

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None

    def close(self) -> None:
        """Stop the subprocess (closing its stdin ends its loop); registered with atexit."""
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                try:
                    assert self._proc.stdin is not None
                    self._proc.stdin.close()
                    self._proc.wait(timeout=5)
                except Exception:
                    self._proc.kill()
                    self._proc.wait()
            self._proc = None

    def equal(self, pred: str, ref: str) -> bool:
        """Ask the subprocess; False on timeout or any failure."""
        with self._lock:
            try:
                if self._proc is None or self._proc.poll() is not None:
                    self._proc = self._start()
                assert self._proc.stdin is not None and self._proc.stdout is not None
                self._proc.stdin.write(json.dumps([pred, ref, PARSE_TIMEOUT_S, VERIFY_TIMEOUT_S]) + "\n")
                self._proc.stdin.flush()
                ready, _, _ = select.select([self._proc.stdout], [], [], WORKER_TIMEOUT_S)
                if not ready:
                    log.warning(
                        "math-verify helper timed out after %.0f s on pred=%.80r", WORKER_TIMEOUT_S, pred
                    )
                    self._kill()
                    return False
                line = self._proc.stdout.readline()
                return bool(json.loads(line)) if line else False
            except Exception:
                log.warning("math-verify helper failed; counting as not equal", exc_info=True)
                self._kill()
                return False


MATH_WORKER = _Worker()  # the helper subprocess of non-main threads (tests close and restart it)
atexit.register(MATH_WORKER.close)


def _worker_loop() -> None:
    """Entry point of the helper subprocess: one JSON ``[pred, ref, parse_t, verify_t]`` per line -> true/false."""
    for line in sys.stdin:
        try:
            pred, ref, parse_t, verify_t = json.loads(line)
            ok = math_equal_in_process(str(pred), str(ref), parse_t, verify_t)
        except Exception:
            ok = False
        sys.stdout.write("true\n" if ok else "false\n")
        sys.stdout.flush()


@lru_cache(maxsize=65536)
def math_equal(pred: str, ref: str) -> bool:
    """Whether MATH answer ``pred`` equals reference ``ref`` (both bare LaTeX, e.g. ``\\frac{1}{2}``).

    A cheap text comparison first, then math-verify (``verify(parse(ref), parse(pred))``, gold first) with
    timeouts; from a non-main thread the comparison runs in a helper subprocess. Never raises.
    """
    pred, ref = _clean_math(str(pred)), _clean_math(str(ref))
    if not pred or not ref:
        return False
    if _light_norm(pred) == _light_norm(ref):
        return True
    if len(pred) > MAX_MATH_CHARS or len(ref) > MAX_MATH_CHARS:
        return False
    if threading.current_thread() is threading.main_thread() or os.name != "posix":
        try:
            if os.name == "posix":
                return math_equal_in_process(pred, ref, PARSE_TIMEOUT_S, VERIFY_TIMEOUT_S)
            # without signals math-verify's own timeouts spawn processes: none here
            return math_equal_in_process(pred, ref, None, None)
        except _NoSignals:  # signals unavailable after all (e.g. a sub-interpreter)
            pass
    return MATH_WORKER.equal(pred, ref)


def extract_answer(text: str | None, task: str) -> str | None:
    """The final answer stated in ``text``, or None when there is none.

    The last marker in the text wins: ``The answer is[:] X`` (also "The final answer is"), ``#### X``, or
    ``\\boxed{X}`` / ``\\fbox{X}`` (balanced braces). For ``arith``/``gsm8k`` the result is the canonical number
    text (``"$1,234."`` -> ``"1234"``, ``"-3.50"`` -> ``"-3.5"``, ``"3/4"`` -> ``"0.75"``); for ``math`` it is the
    LaTeX expression (surrounding ``$`` and trailing period removed). Unknown ``task`` -> ValueError.
    """
    _check_task(task)
    if not isinstance(text, str):
        return None
    try:
        span = _final_span(text)
        if span is None:
            return None
        if task == "math":
            expr = _clean_math(_leading_math(span))
            return expr or None
        value = _parse_number(span)
        return None if value is None else _format_number(value)
    except Exception:  # never let odd text crash a grading loop
        log.debug("extract_answer failed on %.200r", text, exc_info=True)
        return None


def normalize_reference(answer: str | int | float, task: str) -> str:
    """The canonical reference answer used in problem records and compared by :func:`is_correct`.

    arith/gsm8k: a bare number (``"72"``, ``"1,234"``, ``"$5"``) or a solution / raw GSM8K answer field
    (``"... #### 72"``) -> canonical number text. math: a bare LaTeX answer, or a solution whose last
    ``\\boxed{}`` holds it -> the expression. Raises ValueError (naming the value) when there is no answer.
    """
    _check_task(task)
    text = str(answer).strip() if isinstance(answer, (str, int, float)) else ""
    if task == "math":
        span = _final_span(text) if _MARKER.search(text) else text
        expr = _clean_math(span) if span else ""
        if not expr:
            raise ValueError(f"no MATH answer in reference answer={str(answer)[:200]!r}")
        return expr
    span = _final_span(text) if _MARKER.search(text) else text
    value = _parse_number(span) if span else None
    if value is None:
        raise ValueError(f"no number in {task} reference answer={str(answer)[:200]!r}")
    return _format_number(value)


def is_correct(text: str | None, reference: str | int | float, task: str) -> bool:
    """Whether the final answer in ``text`` (see :func:`extract_answer`) equals ``reference``.

    ``reference`` may be a normalised answer or anything :func:`normalize_reference` accepts (e.g. the raw
    GSM8K answer field). Numbers: exact, then relative tolerance 1e-6. math: math-verify equivalence
    (``\\frac{1}{2}`` = ``0.5`` = ``\\dfrac12``, tuples, radicals ...). Garbage -> False; unknown ``task`` ->
    ValueError.
    """
    _check_task(task)
    pred = extract_answer(text, task)
    if pred is None:
        return False
    try:
        ref = normalize_reference(reference, task)
    except ValueError:
        log.debug("unusable reference %.200r", reference)
        return False
    if task == "math":
        return math_equal(pred, ref)
    return numbers_equal(pred, ref)
