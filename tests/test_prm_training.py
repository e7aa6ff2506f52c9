"""Tests of PRM training: the soft-label loss of erprm_core.prm (hand-computed values, hard labels =
ordinary cross-entropy, masking, float targets), the collator, and a tiny end-to-end train/save/load/score
run through the Hugging Face Trainer (resume, determinism, the +/- direction)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from erprm_core import prm, training
from erprm_core.stages.train_prm import prm_checkpoint_complete, train_prm_rules


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_loss_equals_hand_computed_value():
    good, bad = 1, 3
    logits = torch.zeros(2, 4, 5)
    logits[0, 1, good], logits[0, 1, bad] = 2.0, 0.5  # tag at position 1, label 0.7
    logits[0, 3, good], logits[0, 3, bad] = -1.0, 1.0  # tag at position 3, unlabelled (NaN)
    logits[1, 2, good], logits[1, 2, bad] = 0.0, 3.0  # tag at position 2, label 0.2
    logits[1, 0, :] = 7.0  # padding entry (position 0, masked)
    positions = torch.tensor([[1, 3], [2, 0]])
    targets = torch.tensor([[0.7, float("nan")], [0.2, float("nan")]])
    loss = prm.soft_label_prm_loss(logits, positions, targets, good_id=good, bad_id=bad)
    ce1 = -(0.7 * _log_sigmoid(2.0 - 0.5) + 0.3 * _log_sigmoid(0.5 - 2.0))
    ce2 = -(0.2 * _log_sigmoid(0.0 - 3.0) + 0.8 * _log_sigmoid(3.0 - 0.0))
    assert loss.item() == pytest.approx((ce1 + ce2) / 2, abs=1e-6)
    assert loss.dtype == torch.float32
    # the same from logits already taken at the tags, and from bf16 logits (computed in float32)
    at_tags = logits.gather(1, positions.unsqueeze(-1).expand(2, 2, 5))
    again = prm.soft_label_prm_loss(at_tags, None, targets, good_id=good, bad_id=bad)
    assert again.item() == pytest.approx(loss.item(), abs=1e-7)
    half = prm.soft_label_prm_loss(logits.bfloat16(), positions, targets, good_id=good, bad_id=bad)
    assert half.dtype == torch.float32 and half.item() == pytest.approx(loss.item(), abs=2e-2)


def test_hard_labels_give_ordinary_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 10, requires_grad=True)
    positions = torch.tensor([[1, 4, 5], [0, 2, 2], [5, 3, 1]])
    hard = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    loss = prm.soft_label_prm_loss(logits, positions, hard, good_id=7, bad_id=2)
    pairs = logits[..., [7, 2]].gather(1, positions.unsqueeze(-1).expand(3, 3, 2)).reshape(-1, 2)
    classes = (1 - hard).long().reshape(-1)  # class 0 = good (label 1), class 1 = bad (label 0)
    expected = F.cross_entropy(pairs, classes)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_masked_targets_are_ignored_and_checked():
    logits = torch.randn(1, 3, 4, requires_grad=True)
    positions = torch.tensor([[0, 1, 2]])
    with_nan = torch.tensor([[0.3, float("nan"), 1.0]])
    only = prm.soft_label_prm_loss(
        logits[:, [0, 2]], torch.tensor([[0, 1]]), torch.tensor([[0.3, 1.0]]), good_id=0, bad_id=1
    )
    loss = prm.soft_label_prm_loss(logits, positions, with_nan, good_id=0, bad_id=1)
    assert loss.item() == pytest.approx(only.item(), abs=1e-7)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[0, 1].abs().sum() == 0
    none = prm.soft_label_prm_loss(logits, positions, torch.full((1, 3), float("nan")), good_id=0, bad_id=1)
    assert none.item() == 0.0
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        prm.soft_label_prm_loss(logits, positions, torch.tensor([[0.3, 1.2, 1.0]]), good_id=0, bad_id=1)


def test_collator_keeps_float_targets():
    batch = [
        {"input_ids": [1, 5, 6, 9], "positions": [2, 3], "targets": [0.7, 0.15]},
        {"input_ids": [1, 5], "positions": [1], "targets": [0.333]},
    ]
    out = training.PRMCollator(pad_token_id=0)(batch)
    assert out["input_ids"].tolist() == [[1, 5, 6, 9], [1, 5, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert out["prm_positions"].tolist() == [[2, 3], [1, 0]]
    assert out["prm_targets"].dtype == torch.float32
    assert out["prm_targets"][0].tolist() == pytest.approx([0.7, 0.15]) and out["prm_targets"][
        1, 0
    ].item() == pytest.approx(0.333)
    assert out["prm_mask"].tolist() == [[True, True], [True, False]]
    assert training.PRMCollator(0, pad_to_multiple_of=8)(batch)["input_ids"].shape == (2, 8)


# ---------------------------------------------------------------------------------------------------
# end to end on a tiny model (kit tokenizer + tiny Llama)
# ---------------------------------------------------------------------------------------------------

QUESTIONS = [
    f"Tom has {a} apples and buys {b} more. How many apples does Tom have now?"
    for a in range(2, 6)
    for b in range(1, 4)
]


def _records():
    recs = []
    for i, q in enumerate(QUESTIONS):
        a, b = int(q.split()[2]), int(q.split()[6])
        steps = [f"Tom has {a} apples.", f"{a} + {b} = {a + b}", f"The answer is: {a + b}"]
        p = (i % 4) / 3
        recs.append(
            {
                "problem_id": f"p{i}",
                "question": q,
                "steps": steps,
                "outcome": int(i % 2 == 0),
                "labels": {
                    "soft": [p, p / 2, float(i % 2 == 0)],
                    "ones": [1.0, 1.0, 1.0],
                    "zeros": [0.0, 0.0, 0.0],
                    "orm": [None, None, float(i % 2 == 0)],
                },
            }
        )
    return recs


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    from erprm_core.tiny_lm import build_tiny_model, build_tokenizer

    folder = tmp_path_factory.mktemp("base")
    tok = build_tokenizer(texts=QUESTIONS + ["The answer is: 9"], max_number=12, model_max_length=128)
    model = build_tiny_model(
        tok,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        seed=0,
    )
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


RECIPE = dict(epochs=3, lr=3e-3, batch_size=4, max_length=64, seed=0, warmup_ratio=0.0, disable_tqdm=True)


def _mean_score(folder, recs):
    model = prm.ProcessRewardModel.from_pretrained(folder, device="cpu", dtype="float32")
    scores = model.score_batch([r["question"] for r in recs], [r["steps"] for r in recs])
    return float(np.mean([s for ss in scores for s in ss]))


@pytest.mark.slow
def test_train_save_load_direction_and_resume(base_folder, tmp_path):
    recs = _records()
    base_mean = _mean_score(base_folder, recs)
    folders = {rule: tmp_path / rule for rule in ("ones", "zeros", "orm")}
    log, audit, runs = train_prm_rules(base_folder, recs, list(folders), folders.__getitem__, **RECIPE)
    assert set(log["rule"]) == set(folders) and list(log.columns[:4]) == ["rule", "step", "epoch", "loss"]
    assert log.groupby("rule")["step"].max().tolist() == [9, 9, 9]  # 12 samples / 4 x 3 epochs
    assert runs["trained"].all() and (runs["n_examples"] == len(recs)).all()
    assert (audit[audit["reason"] == "kept"]["count"] == len(recs)).all()
    for rule in folders:
        assert prm_checkpoint_complete(folders[rule])
    ones, zeros = (
        log[log["rule"] == "ones"]["loss"].to_numpy(),
        log[log["rule"] == "zeros"]["loss"].to_numpy(),
    )
    assert ones[-1] < ones[0] and zeros[-1] < zeros[0]
    # the +/- direction through training and scoring: labels 1 push P(good) up, labels 0 push it down
    assert _mean_score(folders["ones"], recs) > base_mean + 0.2
    assert _mean_score(folders["zeros"], recs) < base_mean - 0.2

    # resume: complete checkpoints are skipped and give the same tables; retrain gives the same numbers
    log2, audit2, runs2 = train_prm_rules(base_folder, recs, list(folders), folders.__getitem__, **RECIPE)
    assert not runs2["trained"].any()
    pd.testing.assert_frame_equal(log2, log, check_dtype=False, atol=1e-6)
    pd.testing.assert_frame_equal(audit2, audit, check_dtype=False)
    log3, _, runs3 = train_prm_rules(base_folder, recs, ["orm"], folders.__getitem__, retrain=True, **RECIPE)
    assert runs3["trained"].all()
    np.testing.assert_allclose(log3["loss"], log[log["rule"] == "orm"]["loss"], rtol=1e-5)


def test_train_prm_on_model_instance_reports_audit(base_folder, tmp_path):
    from erprm_core.models import load_causal_lm

    model, tok = load_causal_lm(base_folder, device="cpu", dtype="float32")
    recs = _records()
    recs[0] = {**recs[0], "labels": {**recs[0]["labels"], "soft": [0.5, 0.5]}}  # label/step count mismatch
    df = training.train_prm(
        model,
        tok,
        recs,
        "soft",
        tmp_path / "soft",
        max_steps=2,
        lr=1e-3,
        batch_size=4,
        max_length=24,
        save=False,
        disable_tqdm=True,
    )
    assert len(df) == 2 and np.isfinite(df["loss"]).all()
    counts = {row["reason"]: row["count"] for row in df.attrs["audit"]}
    assert counts["label_count_mismatch"] == 1 and counts["truncated"] == len(recs) - 1
    assert counts["labels_lost"] > 0 and df.attrs["n_examples"] == len(recs) - 1
    assert not (tmp_path / "soft" / training.PRM_INFO_FILE).exists()
    with pytest.raises(ValueError, match="tokenizer is required"):
        training.train_prm(model, None, recs, "soft", tmp_path / "x")
    with pytest.raises(ValueError, match="no trainable sample"):
        training.train_prm(model, tok, recs[:1], "soft", tmp_path / "x")


def test_extra_training_args_override_the_kit_defaults(tmp_path):
    # the kit saves once at the end (save_strategy="no"); a caller asking for checkpoints must get them, not a
    # "multiple values for keyword argument" error
    common = training._common_training_kwargs(1.0, -1, 2, 1, 1e-3, "cosine", 0.0, 0.0, 1.0, 1, 0, False)
    recipe = {"epochs": 1.0, "max_steps": -1, "batch_size": 2, "grad_accum": 1, "lr": 1e-3,
              "lr_scheduler": "cosine", "warmup_ratio": 0.0, "weight_decay": 0.0, "seed": 0}  # fmt: skip
    extra = {"save_strategy": "steps", "save_steps": 7, "logging_steps": 3}
    prm_args = training._prm_training_args(tmp_path / "p", recipe, False, 1.0, 1, False, True, extra)
    sft_args = training._sft_training_args(tmp_path / "s", common, False, True, True, extra)
    for args in (prm_args, sft_args):
        assert args.save_strategy == "steps" and args.save_steps == 7 and args.logging_steps == 3
    default = training._prm_training_args(tmp_path / "d", recipe, False, 1.0, 1, False, True, None)
    assert default.save_strategy == "no"
