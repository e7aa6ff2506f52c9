"""Policy SFT: prompt tokens are masked, EOS is learned, a few steps reduce the loss, the stage saves a policy."""

import pytest
import torch

from erprm_core import models, training
from erprm_core.stages import policy
from erprm_core.steps import policy_prompt
from erprm_core.tasks import arith
from erprm_core.tiny_lm import build_tiny_model, build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(max_number=99)


@pytest.fixture(scope="module")
def problems():
    return arith.generate_problems(64, seed=0, max_value=99, max_operand=9, max_steps=3)


def test_prompt_tokens_masked(tok, problems):
    p = problems[0]
    prompt = policy_prompt(p["question"])
    ex = training.tokenize_sft_example(tok, prompt, p["solution"])
    n_prompt = len(tok(prompt)["input_ids"])  # with <s>
    assert ex["input_ids"][:n_prompt] == tok(prompt)["input_ids"]
    assert ex["labels"][:n_prompt] == [-100] * n_prompt
    assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:]
    assert ex["input_ids"][-1] == tok.eos_token_id and ex["labels"][-1] == tok.eos_token_id
    assert tok.decode(ex["input_ids"][n_prompt:-1]) == p["solution"]
    assert not ex["truncated"]
    cut = training.tokenize_sft_example(tok, prompt, p["solution"], max_length=10)
    assert cut["truncated"] and len(cut["input_ids"]) == 10


def test_masking_without_offsets_matches(tok, problems, monkeypatch):
    p = problems[1]
    fast = training.tokenize_sft_example(tok, policy_prompt(p["question"]), p["solution"])
    monkeypatch.setattr(type(tok), "is_fast", property(lambda self: False))
    assert training.tokenize_sft_example(tok, policy_prompt(p["question"]), p["solution"]) == fast


def test_collator_right_pads(tok, problems):
    batch = [
        training.tokenize_sft_example(tok, policy_prompt(p["question"]), p["solution"]) for p in problems[:3]
    ]
    out = training.SFTCollator(tok.pad_token_id)(batch)
    width = max(len(b["input_ids"]) for b in batch)
    assert out["input_ids"].shape == (3, width)
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        assert out["attention_mask"][i].tolist() == [1] * n + [0] * (width - n)
        assert (out["labels"][i, n:] == -100).all() and (out["input_ids"][i, n:] == tok.pad_token_id).all()


def test_records_and_pairs_accepted(tok, problems):
    pairs = training.sft_pairs(problems[:2], "plain")
    assert pairs[0] == (problems[0]["question"] + "\n", problems[0]["solution"])
    steps_record = {"question": "Q?", "steps": ["a", "b"]}
    assert training.sft_pairs([steps_record, ("P\n", "S")], "plain") == [("Q?\n", "a\nb"), ("P\n", "S")]
    with pytest.raises(ValueError, match=r"examples\[0\]"):
        training.sft_pairs([{"solution": "x"}], "plain")


def _solution_loss(model, tok, problems):
    batch = [
        training.tokenize_sft_example(tok, policy_prompt(p["question"]), p["solution"]) for p in problems
    ]
    with torch.no_grad():
        return model(**training.SFTCollator(tok.pad_token_id)(batch)).loss.item()


@pytest.mark.slow
def test_few_steps_reduce_loss(tok, problems, tmp_path):
    model = build_tiny_model(tok, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, seed=0)
    before = _solution_loss(model, tok, problems[:16])
    log = training.train_policy_sft(
        model, tok, problems, tmp_path / "out", max_steps=12, lr=1e-2, batch_size=16, logging_steps=4,
        save=True, disable_tqdm=True,
    )  # fmt: skip
    after = _solution_loss(model, tok, problems[:16])
    assert after < before - 1.0
    assert list(log.columns) == ["step", "epoch", "loss", "learning_rate", "grad_norm"]
    assert list(log["step"]) == [4, 8, 12] and log["loss"].iloc[-1] < log["loss"].iloc[0]
    assert log.attrs["global_steps"] == 12 and log.attrs["train_tokens"] > 0
    assert (tmp_path / "out" / "model.safetensors").is_file() and (
        tmp_path / "out" / "tokenizer.json"
    ).is_file()


@pytest.mark.slow
def test_prepare_policy_trains_saves_and_reloads(problems, tmp_path, monkeypatch):
    monkeypatch.setenv("ERPRM_RUNS_ROOT", str(tmp_path / "runs"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    kw = dict(max_number=99, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_steps=4,
              batch_size=8, logging_steps=2, device="cpu")  # fmt: skip
    res = policy.prepare_policy("t", problems, seed=1, **kw)
    assert res.trained and res.source.endswith("policy") and res.info["train_steps"] == 4
    assert res.info["n_parameters"] == models.count_parameters(res.model)

    def no_training(*a, **k):
        raise AssertionError("a finished policy of the same recipe must be reused")

    with monkeypatch.context() as m:
        m.setattr(policy.training, "train_policy_sft", no_training)
        reused = policy.prepare_policy("t", problems, seed=1, **kw)  # same recipe: reused, same log and info
    assert reused.log.equals(res.log[["step", "epoch", "loss", "learning_rate"]]) and reused.info == res.info
    folder = tmp_path / "runs" / "t" / "policy"
    (folder / policy.POLICY_INFO_FILE).unlink()  # no record of its recipe: trained again, to the same bits
    again = policy.prepare_policy("t", problems, seed=1, **kw)
    assert all(
        torch.equal(a, b) for a, b in zip(res.model.parameters(), again.model.parameters(), strict=True)
    )
    assert policy.prepare_policy("t", problems, seed=2, **kw).info["final_loss"] != res.info["final_loss"]
    hub = policy.prepare_policy("t", policy_name=res.source, device="cpu")
    assert not hub.trained and hub.log.empty and hub.info["policy"] == res.source
    ev = policy.evaluate_policy(
        res.model, res.tokenizer, problems[:4], n_samples=4, ks=(1, 4, 16), max_new_tokens=8
    )
    assert set(ev.table["metric"]) >= {"greedy_accuracy", "pass_at_k", "sample_accuracy"}
    assert sorted(ev.table.loc[ev.table.metric == "pass_at_k", "k"]) == [1, 4]
    assert ev.by_steps["n_problems"].sum() == 4 and len(ev.samples) == 16
    ev2 = policy.evaluate_policy(
        res.model, res.tokenizer, problems[:4], n_samples=4, ks=(1, 4), max_new_tokens=8
    )
    assert [r["text"] for r in ev.samples] == [r["text"] for r in ev2.samples]  # reproducible sampling
