"""Tests of the benchmark loaders (erprm_core.tasks.gsm8k, math500, math_train) on local JSONL files: the real
GSM8K test / MATH500 copies in ../shared/data (skipped when absent) and small hand-written files. Offline:
the hub path is only checked for its error message."""

from __future__ import annotations

import hashlib
import json
import time

import pytest

from erprm_core.grading import is_correct
from erprm_core.io import ArtifactError, Audit
from erprm_core.running.artifacts import repo_root
from erprm_core.steps import split_steps
from erprm_core.tasks import gsm8k, math500, math_train

DATA = repo_root().parent / "shared" / "data"
GSM8K_TEST = DATA / "gsm8k" / "test.jsonl"
MATH500_TEST = DATA / "math500" / "test.jsonl"
needs_gsm8k = pytest.mark.skipif(not GSM8K_TEST.is_file(), reason=f"{GSM8K_TEST} absent")
needs_math500 = pytest.mark.skipif(not MATH500_TEST.is_file(), reason=f"{MATH500_TEST} absent")
SCHEMA = {"id", "question", "answer", "solution", "task", "n_steps"}


def write_jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@needs_gsm8k
def test_gsm8k_local_test_split():
    start = time.perf_counter()
    problems = gsm8k.load_problems("test", source=GSM8K_TEST)
    print(f"gsm8k load: {time.perf_counter() - start:.2f} s")
    assert len(problems) == 1319
    assert len({p["id"] for p in problems}) == 1319
    assert problems[0]["id"] == "gsm8k-test-00000"
    raw = [json.loads(line) for line in GSM8K_TEST.read_text(encoding="utf-8").splitlines()]
    for p, r in zip(problems, raw, strict=True):
        assert SCHEMA <= set(p) and p["task"] == "gsm8k"
        assert "," not in p["answer"] and p["answer"] == p["answer"].strip()
        assert "<<" not in p["solution"] and ">>" not in p["solution"] and "####" not in p["solution"]
        steps = split_steps(p["solution"])
        assert steps[-1] == f"The answer is: {p['answer']}" and p["n_steps"] == len(steps) >= 2
        assert is_correct(p["solution"], p["answer"], "gsm8k")
        assert is_correct(p["solution"], r["answer"], "gsm8k")  # also against the raw "#### N" field
    first = problems[0]
    assert first["answer"] == "18"
    assert first["solution"].splitlines()[0] == "Janet sells 16 - 3 - 4 = 9 duck eggs a day."


@needs_gsm8k
def test_gsm8k_folder_source_and_limit():
    problems = gsm8k.load_problems("test", source=GSM8K_TEST.parent, limit=5)
    assert [p["id"] for p in problems] == [f"gsm8k-test-{i:05d}" for i in range(5)]
    assert gsm8k.load_problems("test", source=GSM8K_TEST, limit=0) == []
    audit = Audit("problems")
    gsm8k.load_problems("test", source=GSM8K_TEST, limit=3, audit=audit)
    assert audit.counts["kept"] == 3


@needs_math500
def test_math500_local():
    start = time.perf_counter()
    problems = math500.load_problems(source=MATH500_TEST)
    load_s = time.perf_counter() - start
    assert len(problems) == 500
    assert len({p["id"] for p in problems}) == 500
    assert problems[0]["id"] == "test/precalculus/807.json"
    start = time.perf_counter()
    ok = [is_correct(p["solution"], p["answer"], "math") for p in problems]
    # the original paragraphs (last \boxed{} before the appended "The answer is" line) grade correct too
    ok_boxed = [is_correct("\n".join(p["solution"].splitlines()[:-1]), p["answer"], "math") for p in problems]
    print(
        f"math500 load {load_s:.2f} s, grading {time.perf_counter() - start:.2f} s, "
        f"rate {sum(ok) / 500:.2%}, boxed-only rate {sum(ok_boxed) / 500:.2%}"
    )
    assert sum(ok) / 500 >= 0.99 and sum(ok_boxed) / 500 >= 0.99
    for p in problems:
        assert SCHEMA <= set(p) and p["task"] == "math" and {"subject", "level"} <= set(p)
        lines = p["solution"].splitlines()
        assert lines[-1] == f"The answer is: {p['answer']}" and p["n_steps"] == len(lines)
        assert all(line.strip() == line and line for line in lines)
        assert not any("[asy]" in line and "[/asy]" not in line for line in lines)  # asy blocks kept whole


def test_math_solution_format():
    solution = (
        "First $x=1$.\nSo\n\n[asy]\ndraw(a);\n\nlabel(b);\n[/asy]\n\n\\[\na\n\n= 2\n\\]\nThus $\\boxed{2}$."
    )
    assert math500.format_math_solution(solution, "2").splitlines() == [
        "First $x=1$. So",
        "[asy] draw(a); label(b); [/asy]",
        "\\[ a = 2 \\] Thus $\\boxed{2}$.",
        "The answer is: 2",
    ]


def test_gsm8k_record_conversion():
    raw = {"question": " Q? ", "answer": "A costs 2*3=<<2*3=6>>6.\n\nB is 6+1=<<6+1=7>>7\n#### 1,007"}
    p = gsm8k.to_problem(raw, "x")
    assert p == {
        "id": "x",
        "question": "Q?",
        "answer": "1007",
        "solution": "A costs 2*3=6.\nB is 6+1=7\nThe answer is: 1007",
        "task": "gsm8k",
        "n_steps": 3,
    }


def test_malformed_jsonl_names_file_and_line(tmp_path):
    good = json.dumps({"question": "q", "answer": "x\n#### 3"})
    path = write_jsonl(tmp_path / "bad.jsonl", [good, "", '{"question": "q", "answer": '])
    with pytest.raises(ArtifactError, match=rf"{path}:3: not valid JSON"):
        gsm8k.load_problems("test", source=path)
    path = write_jsonl(tmp_path / "cols.jsonl", [good, json.dumps({"question": "q"})])
    with pytest.raises(ArtifactError, match=rf"{path}:2: missing field\(s\) \['answer'\]"):
        gsm8k.load_problems("test", source=path)
    path = write_jsonl(tmp_path / "nohash.jsonl", [good, good, json.dumps({"question": "q", "answer": "5"})])
    with pytest.raises(ArtifactError, match=rf"{path}:3: bad GSM8K record"):
        gsm8k.load_problems("test", source=path)
    path = write_jsonl(tmp_path / "list.jsonl", ["[1, 2]"])
    with pytest.raises(ArtifactError, match=rf"{path}:1: expected a JSON object"):
        math500.load_problems(source=path)
    path = write_jsonl(tmp_path / "m.jsonl", [json.dumps({"problem": "p", "solution": "s", "answer": " "})])
    with pytest.raises(ArtifactError, match=rf"{path}:1: bad MATH500 record"):
        math500.load_problems(source=path)
    with pytest.raises(ArtifactError, match="no such JSONL file"):
        gsm8k.load_problems("test", source=tmp_path / "missing.jsonl")


def test_bad_parameters():
    with pytest.raises(ValueError, match="limit"):
        gsm8k.load_problems("test", source="unused", limit=-1)
    with pytest.raises(ValueError, match="split"):
        gsm8k.load_problems("validation")
    with pytest.raises(ValueError, match="split"):
        math500.load_problems("train")
    with pytest.raises(ValueError, match="subjects"):
        math_train.load_problems(subjects=["algebra", "calculus"])


@pytest.mark.parametrize(
    "loader, kwargs",
    [
        (gsm8k.load_problems, {"split": "test"}),
        (math500.load_problems, {}),
        (math_train.load_problems, {"subjects": ["algebra"]}),
    ],
)
def test_hub_failure_suggests_local_source(monkeypatch, loader, kwargs):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ArtifactError, match=r"Hugging Face hub.*OfflineModeIsEnabled.*source=<local jsonl>"):
        loader(**kwargs)


def test_hub_wrong_columns(monkeypatch):
    import datasets

    fake = datasets.Dataset.from_list([{"question": "q", "solution": "s"}])
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: fake)
    with pytest.raises(ArtifactError, match=r"openai/gsm8k\[main/test\]: missing column\(s\) \['answer'\]"):
        gsm8k.load_problems("test")


def test_hub_path_converts_records(monkeypatch):
    import datasets

    calls = []

    def fake_load(name, config=None, split=None):
        calls.append((name, config, split))
        rows = [
            {
                "problem": f"{config} p{i}",
                "level": "Level 1",
                "type": "Algebra",
                "solution": rf"\boxed{{{i}}}",
            }
            for i in range(3)
        ]
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    problems = math_train.load_problems("train", limit=4, subjects=["algebra", "geometry"])
    assert calls == [(math_train.HUB_NAME, "algebra", "train"), (math_train.HUB_NAME, "geometry", "train")]
    assert [p["id"] for p in problems] == [
        "math-train-algebra-00000",
        "math-train-algebra-00001",
        "math-train-algebra-00002",
        "math-train-geometry-00000",
    ]
    assert problems[1]["answer"] == "1" and problems[1]["subject"] == "Algebra"
    assert problems[1]["solution"] == "\\boxed{1}\nThe answer is: 1"


def test_math_train_local_skips_and_counts_missing_answers(tmp_path):
    lines = [
        json.dumps(
            {
                "problem": "P1",
                "solution": "So $x = \\boxed{\\frac{1}{2}}$.",
                "level": "Level 2",
                "type": "Algebra",
            }
        ),
        json.dumps({"problem": "P2", "solution": "No box here, the answer is 3."}),
        json.dumps({"problem": "P3", "solution": "Long work.\n\nDone.", "answer": "$7$", "unique_id": "u3"}),
    ]
    path = write_jsonl(tmp_path / "train.jsonl", lines)
    audit = Audit("problems")
    problems = math_train.load_problems("train", source=tmp_path, audit=audit)
    assert [p["id"] for p in problems] == ["math-train-00000", "u3"]
    assert [p["answer"] for p in problems] == [r"\frac{1}{2}", "7"]
    assert problems[1]["solution"] == "Long work.\nDone.\nThe answer is: 7"
    assert dict(audit.counts) == {"kept": 2, "no_boxed_answer": 1}
    assert audit.examples["no_boxed_answer"] == f"{path}:2"
    assert all(is_correct(p["solution"], p["answer"], "math") for p in problems)


@needs_math500
def test_math_train_reads_math500_format():
    problems = math_train.load_problems("test", source=MATH500_TEST, limit=20)
    assert len(problems) == 20
    assert problems == math500.load_problems(source=MATH500_TEST, limit=20)


def test_file_sha256_single_helper(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"a": 1}\n' * 1000)
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    assert gsm8k.file_sha256(path) == math500.file_sha256(path) == math_train.file_sha256(path) == expected
