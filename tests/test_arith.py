"""The synthetic task: answers recompute from the reference arithmetic, sides never overlap, steps parse back."""

import re

import pytest

from erprm_core import grading, tasks
from erprm_core.running import artifacts
from erprm_core.stages.policy import write_problem_splits
from erprm_core.steps import split_steps
from erprm_core.tasks import arith

# the four operations, exact on integers (a division must leave no remainder)
OPS = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
    "/": lambda a, b: a // b if b and a % b == 0 else None,
}


def recompute_answer(solution: str) -> int:
    """Re-check a reference solution: every ``a op b = c`` line must be right and chain into the next line.

    Returns the final value; raises ValueError naming the first wrong line.
    """
    pattern = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")
    lines = [line for line in solution.splitlines() if line.strip()]
    value: int | None = None
    for i, line in enumerate(lines[:-1], start=1):
        m = pattern.search(line)
        if m is None:
            raise ValueError(f"line {i}: no arithmetic in {line!r}")
        a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
        if value is not None and a != value:
            raise ValueError(f"line {i}: starts from {a}, previous result was {value}")
        if OPS[op](a, b) != c:
            raise ValueError(f"line {i}: {a} {op} {b} != {c}")
        value = c
    m = re.fullmatch(r"The answer is: (\d+)", lines[-1].strip()) if lines else None
    if m is None or value is None or int(m[1]) != value:
        raise ValueError(f"last line {lines[-1] if lines else ''!r} does not state the final value {value}")
    return value


@pytest.fixture(scope="module")
def train():
    return arith.generate_problems(400, seed=3, split="train")


@pytest.fixture(scope="module")
def test_side():
    return arith.generate_problems(400, seed=3, split="test")


def test_schema_and_answers_recompute(train):
    for p in train:
        assert set(p) == {"id", "question", "solution", "answer", "task", "n_steps"}
        assert p["task"] == "arith"
        assert recompute_answer(p["solution"]) == int(p["answer"])
        steps = split_steps(p["solution"])
        assert len(steps) == p["n_steps"] + 1
        assert steps[-1] == f"The answer is: {p['answer']}"
        assert grading.is_correct(p["solution"], p["answer"], "arith")
        assert grading.extract_answer(p["solution"], "arith") == p["answer"]


def test_numbers_stay_in_range():
    problems = arith.generate_problems(300, seed=1, max_value=60, max_operand=9, max_factor=3)
    for p in problems:
        numbers = [int(x) for x in re.findall(r"\d+", p["question"] + " " + p["solution"])]
        assert all(0 <= x <= 60 for x in numbers), p
        assert all(re.search(r" [*/] ([4-9])", line) is None for line in p["solution"].splitlines())


def test_steps_knob_and_distribution():
    problems = arith.generate_problems(500, seed=0, min_steps=2, max_steps=6)
    counts = {s: sum(p["n_steps"] == s for p in problems) for s in range(2, 7)}
    assert all(c > 50 for c in counts.values()), counts
    assert {p["n_steps"] for p in arith.generate_problems(50, seed=0, min_steps=3, max_steps=3)} == {3}


def test_all_four_operations_and_varied_text(train):
    text = "\n".join(p["solution"] for p in train)
    for op in "+-*/":
        assert f" {op} " in text
    assert len({p["question"].split()[0] for p in train}) >= 10  # names
    assert len({p["solution"].split("\n")[0].split()[-1] for p in train}) >= 10  # objects


def test_deterministic_and_seed_dependent():
    a = arith.generate_problems(20, seed=5)
    assert a == arith.generate_problems(20, seed=5)
    assert a != arith.generate_problems(20, seed=6)
    assert arith.generate_problems(10, seed=5) == a[:10]  # a prefix: sizes do not change earlier problems


def test_train_and_test_never_overlap(train, test_side):
    key = re.compile(r"(\d+) ([-+*/]) (\d+) =")

    def skeleton(p):
        lines = p["solution"].splitlines()[:-1]
        ms = [key.search(line) for line in lines]
        return arith.skeleton_key(int(ms[0][1]), [(m[2], int(m[3])) for m in ms])

    tr = {skeleton(p) for p in train}
    te = {skeleton(p) for p in test_side}
    assert len(tr) == len(train) and len(te) == len(test_side)  # distinct within a side
    assert not tr & te
    assert all(arith.problem_side(k) == "train" for k in tr)
    assert all(arith.problem_side(k) == "test" for k in te)
    assert not {p["id"] for p in train} & {p["id"] for p in test_side}
    assert not {p["question"] for p in train} & {p["question"] for p in test_side}


def test_wrong_intermediate_propagates():
    p = arith.generate_problems(1, seed=0, min_steps=3, max_steps=3)[0]
    lines = p["solution"].splitlines()
    m = re.search(r"= (\d+)", lines[0])
    broken = lines[0][: m.start(1)] + str(int(m[1]) + 1) + lines[0][m.end(1) :]
    with pytest.raises(ValueError, match="line 1"):
        recompute_answer("\n".join([broken, *lines[1:]]))


def test_bad_knobs_raise():
    with pytest.raises(ValueError, match="max_value"):
        arith.generate_problems(1, max_value=5000)
    with pytest.raises(ValueError, match="min_steps"):
        arith.generate_problems(1, min_steps=4, max_steps=2)
    with pytest.raises(ValueError, match="split"):
        arith.generate_problems(1, split="validation")


def test_registry_and_split_files(tmp_path, monkeypatch):
    monkeypatch.setenv("ERPRM_RUNS_ROOT", str(tmp_path / "runs"))
    monkeypatch.setenv("ERPRM_RESULTS_ROOT", str(tmp_path / "results"))
    assert tasks.load_problems("arith", "train_prm", 5, seed=2) == arith.generate_problems(5, 2, "train")
    sizes = {"train_sft": 30, "train_prm": 10, "raft": 5, "test": 12}
    splits, summary = write_problem_splits("t", "arith", sizes, seed=1, generator={"max_value": 99})
    assert list(summary["n_problems"]) == [30, 10, 5, 12]
    ids = [{p["id"] for p in splits[s]} for s in sizes]
    assert sum(len(x) for x in ids) == len(set().union(*ids)) == 57  # disjoint
    assert artifacts.read_jsonl(artifacts.paths("t").problem_file("raft")) == splits["raft"]
    with pytest.raises(ValueError, match="unknown split"):
        write_problem_splits("t", "arith", {"dev": 3})
    with pytest.raises(ValueError, match="task"):
        tasks.load_problems("svamp", "test", 3)
