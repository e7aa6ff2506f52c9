"""Tests of erprm_core.prm: token resolution, tag positions, the audit, the scorer (golden, Math-Shepherd
model-card computation), batching, the +/- order, scoring modes and aggregation."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from erprm_core import prm
from erprm_core.steps import format_prm_input

os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDS = (
    "Tom has 3 apples . He buys 2 more 3 + 2 = 5 The answer is : 5 Ann 4 pens gives 1 away 4 - 1 3 "
    "How many does have now ? Step 6 7 8 9 10 * / x"
).split()


def make_tokenizer(with_tag: bool = True, words=WORDS):
    """A word-level fast tokenizer (BOS added) whose vocabulary holds ``words``, "ки", "+", "-"."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>"])}
    for w in sorted(set(words) | {"+", "-"}):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    if with_tag:
        fast.add_tokens(["ки"])  # isolated from its neighbours, like a vocabulary entry of a real PRM
    return fast


def make_model(tokenizer, seed: int = 0, max_position_embeddings: int = 128):
    """A random-weight 2-layer Llama over ``tokenizer``'s vocabulary (untied head, eval mode)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def prm_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_prm")
    tok = make_tokenizer()
    make_model(tok).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


SOLUTIONS = [
    (
        "Tom has 3 apples . How many does Tom have now ?",
        ["He buys 2 more .", "3 + 2 = 5", "The answer is : 5"],
    ),
    ("Ann has 4 pens .", ["Ann gives 1 away .", "4 - 1 = 3", "The answer is : 3"]),
    ("Tom has 3 apples .", ["The answer is : 3"]),
    (
        "Ann has 4 pens . How many does Ann have now ?",
        ["Step 6 7 8 9 10", "x * 2 / 3", "5", "4 - 1 = 3", "7"],
    ),
]


def model_card_scores(folder, question, steps):
    """The Math-Shepherd model-card computation, independently of erprm_core."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    candidate_tokens = tokenizer.convert_tokens_to_ids(["+", "-"])
    step_tag_id = tokenizer.convert_tokens_to_ids("ки")
    text = question + " " + "".join(step + " ки" for step in steps)
    input_id = torch.tensor([tokenizer.encode(text)])
    with torch.no_grad():
        logits = model(input_id).logits[:, :, candidate_tokens]
        scores = logits.softmax(dim=-1)[:, :, 0]
        return scores[input_id == step_tag_id].tolist(), model(input_id).logits[input_id == step_tag_id]


def test_format_is_math_shepherd(prm_folder):
    model = prm.ProcessRewardModel.from_pretrained(prm_folder, device="cpu", dtype="float32")
    q, steps = SOLUTIONS[0]
    assert model.format(q, steps) == q + " " + "".join(step + " ки" for step in steps)
    assert model.format(q, steps) == format_prm_input(q, steps)


@pytest.mark.parametrize("index", range(len(SOLUTIONS)))
def test_golden_scores_equal_model_card(prm_folder, index):
    q, steps = SOLUTIONS[index]
    model = prm.ProcessRewardModel.from_pretrained(prm_folder, device="cpu", dtype="float32")
    expected, _ = model_card_scores(prm_folder, q, steps)
    got = model.score(q, steps)
    assert len(got) == len(steps) == len(expected)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert model.forward_passes == 1  # one forward pass for all steps


def test_full_vocab_mode(prm_folder):
    q, steps = SOLUTIONS[0]
    model = prm.ProcessRewardModel.from_pretrained(
        prm_folder, scoring="full_vocab", device="cpu", dtype="float32"
    )
    _, tag_logits = model_card_scores(prm_folder, q, steps)
    good = model.tokenizer.convert_tokens_to_ids("+")
    expected = tag_logits.softmax(-1)[:, good].tolist()
    np.testing.assert_allclose(model.score(q, steps), expected, atol=1e-6)
    assert model.info()["scoring"] == "full_vocab"
    with pytest.raises(ValueError, match="scoring"):
        prm.ProcessRewardModel(model.model, model.tokenizer, scoring="softmax")


def test_score_batch_matches_single_and_keeps_order(prm_folder):
    model = prm.ProcessRewardModel.from_pretrained(prm_folder, device="cpu", dtype="float32")
    questions = [q for q, _ in SOLUTIONS] * 2
    steps = [s for _, s in SOLUTIONS] * 2
    singles = [model.score(q, s) for q, s in zip(questions, steps, strict=True)]
    model.forward_passes = 0
    model.share_prefix = False
    batched = model.score_batch(questions, steps, batch_size=3)
    assert model.forward_passes == 3
    for a, b in zip(singles, batched, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert model.score_batch([], []) == []
    with pytest.raises(ValueError):
        model.score_batch(questions, steps[:-1])


def test_shared_prefix_scoring_equals_full_forward(prm_folder):
    """Solutions of one question reuse the question's KV cache: same scores, fewer tokens computed."""
    model = prm.ProcessRewardModel.from_pretrained(prm_folder, device="cpu", dtype="float32")
    assert model.share_prefix  # a Llama with the plain dynamic cache
    q = SOLUTIONS[0][0]
    steps = [s for _, s in SOLUTIONS] + [["3 + 2 = 5", "The answer is : 5"], ["Tom buys 2 more ."]]
    questions = [q] * len(steps) + [SOLUTIONS[1][0]]
    steps = steps + [SOLUTIONS[1][1]]
    model.share_prefix = False
    full = model.score_batch(questions, steps, batch_size=4)
    full_tokens = model.tokens_scored
    model.share_prefix = True
    model.tokens_scored = model.forward_passes = 0
    shared = model.score_batch(questions, steps, batch_size=4)
    assert model.forward_passes == 3  # 6 solutions of q in batches of 4 and 2, then the other question
    assert model.tokens_scored < full_tokens
    for a, b in zip(full, shared, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    # the common prefix stops before the first tag and leaves every row a token of its own
    encs = [model.encode(q, s) for s in (["3 + 2 = 5"], ["3 + 2 = 5", "The answer is : 5"])]
    n = prm.shared_prefix_length(encs)
    assert n <= encs[0].positions[0] and n < len(encs[0].input_ids)
    assert encs[0].input_ids[:n] == encs[1].input_ids[:n]
    assert prm.shared_prefix_length(encs[:1]) == 0


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_prefix_tree_scoring_equals_full_forward(prm_folder, attention):
    """share_prefix="tree": one question's solutions (duplicates and shared steps included) in one packed
    forward pass under an ancestor mask score as each solution alone; fewer tokens computed; trees are cut at
    ``tree_tokens`` and a question with one solution is scored as usual."""
    model = prm.ProcessRewardModel.from_pretrained(
        prm_folder, device="cpu", dtype="float32", attn_implementation=attention
    )
    q, q1 = SOLUTIONS[0][0], SOLUTIONS[1][0]
    base = SOLUTIONS[0][1]
    steps = [base, base, base[:1] + ["3 + 2 = 6"], ["Tom buys 2 more ."], base[:1], SOLUTIONS[1][1]]
    questions = [q] * 5 + [q1]
    model.share_prefix = False
    full = model.score_batch(questions, steps, batch_size=8)
    full_tokens = model.tokens_scored
    tree = prm.ProcessRewardModel(model.model, model.tokenizer, share_prefix="tree")
    got = tree.score_batch(questions, steps, batch_size=8)
    assert tree.forward_passes == 2 and tree.tokens_scored < full_tokens
    for a, b in zip(full, got, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    small = prm.ProcessRewardModel(model.model, model.tokenizer, share_prefix="tree", tree_tokens=1)
    for a, b in zip(full, small.score_batch(questions, steps, batch_size=8), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert small.forward_passes == 6  # every solution its own tree: nothing shared


def test_questions_with_one_solution_are_batched_together(prm_folder):
    """Nothing to share in a question with one solution: such solutions share batches (ProcessBench-like
    input), while a question with several keeps its own batches; the scores do not depend on the batching."""
    model = prm.ProcessRewardModel.from_pretrained(prm_folder, device="cpu", dtype="float32")
    q0 = SOLUTIONS[0][0]
    questions = [f"{q0} ({i})" for i in range(5)] + [q0, q0]
    steps = [s for _, s in SOLUTIONS][:1] * 5 + [SOLUTIONS[0][1], ["3 + 2 = 5", "The answer is : 5"]]
    scores = model.score_batch(questions, steps, batch_size=4)
    assert model.forward_passes == 3  # the 5 single-solution questions in batches of 4 and 1, then q0's pair
    for q, s, got in zip(questions, steps, scores, strict=True):
        np.testing.assert_allclose(model.score(q, s), got, atol=1e-5)


def test_good_bad_order_is_pinned(prm_folder):
    """Column 0 is the good token: a model biased toward "+" scores near 1; swapping the tokens gives 1 - p."""
    model = prm.ProcessRewardModel.from_pretrained(prm_folder, device="cpu", dtype="float32")
    q, steps = SOLUTIONS[0]
    base = np.array(model.score(q, steps))
    swapped = prm.ProcessRewardModel(model.model, model.tokenizer, good_token="-", bad_token="+")
    np.testing.assert_allclose(swapped.score(q, steps), 1 - base, atol=1e-6)

    lm = model.model
    head = torch.nn.Linear(lm.lm_head.in_features, lm.lm_head.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(lm.lm_head.weight)
        head.bias.zero_()
        head.weight[[model.ids.good_id, model.ids.bad_id]] = 0
        head.bias[model.ids.good_id] = 10.0
        head.bias[model.ids.bad_id] = -10.0
    lm.lm_head = head
    biased = prm.ProcessRewardModel(lm, model.tokenizer)
    assert all(s > 0.999 for s in biased.score(q, steps))
    logits = torch.zeros(1, 1, len(model.tokenizer))
    logits[0, 0, model.ids.good_id] = math.log(3.0)
    assert prm.step_probabilities(logits, model.ids.good_id, model.ids.bad_id).item() == pytest.approx(0.75)
    assert prm.pair_logits(logits, model.ids.good_id, model.ids.bad_id)[0, 0].tolist() == pytest.approx(
        [math.log(3.0), 0.0]
    )


def test_token_resolution_in_context():
    tok = make_tokenizer()
    ids = prm.resolve_prm_token_ids(tok)
    assert ids.tag_id == tok.convert_tokens_to_ids("ки")
    assert ids.good_id == tok.convert_tokens_to_ids("+")
    assert ids.bad_id == tok.convert_tokens_to_ids("-")
    assert ids.tag_ids == (ids.tag_id,) and ids.as_dict()["tag_location"] == "one token"
    with pytest.raises(ValueError, match="step tag 'ки' is not located in context"):
        prm.resolve_prm_token_ids(make_tokenizer(with_tag=False))  # "ки" is <unk>
    with pytest.raises(ValueError, match="good token 'plus'"):
        prm.resolve_prm_token_ids(tok, good_token="plus")
    with pytest.raises(ValueError, match="three different"):
        prm.resolve_prm_token_ids(tok, good_token="+", bad_token="+")


def test_token_resolution_with_kit_tokenizer():
    from erprm_core.tiny_lm import build_tokenizer

    tok = build_tokenizer(texts=["Tom has 3 apples."], max_number=10)
    ids = prm.resolve_prm_token_ids(tok)
    assert tok.convert_ids_to_tokens([ids.tag_id, ids.good_id, ids.bad_id]) == [" ки", " +", " -"]
    enc = prm.encode_for_prm(tok, "Tom has 3 apples.", ["Tom has 3.", "The answer is: 3"], [0.5, 1.0])
    assert enc.status == "ok" and enc.positions == prm.tag_positions(enc.input_ids, ids.tag_id)


def test_encode_positions_truncation_and_mismatch():
    tok = make_tokenizer()
    ids = prm.resolve_prm_token_ids(tok)
    q, steps = SOLUTIONS[0]
    enc = prm.encode_for_prm(tok, q, steps, [0.25, None, 1.0])
    assert enc.status == "ok"
    assert [enc.input_ids[p] for p in enc.positions] == [ids.tag_id] * 3
    assert enc.positions == prm.tag_positions(torch.tensor(enc.input_ids), ids.tag_id)
    assert enc.labelled == [(enc.positions[0], 0.25), (enc.positions[2], 1.0)]

    cut = prm.encode_for_prm(tok, q, steps, [0.25, None, 1.0], max_length=enc.positions[2] + 1)
    assert cut.status == "ok" and cut.input_ids == enc.input_ids  # the last token is the last tag
    cut = prm.encode_for_prm(tok, q, steps, [0.25, None, 1.0], max_length=enc.positions[1])
    assert cut.status == "truncated" and cut.positions == [enc.positions[0], None, None]
    assert cut.labels_lost == 1 and len(cut.input_ids) == enc.positions[1]

    # a stray tag inside a step: counted as a mismatch, but the inserted tags are still located
    odd = prm.encode_for_prm(tok, q, ["He buys ки 2 more .", "The answer is : 5"], [0.5, 1.0])
    assert odd.status == "tag_count_mismatch" and odd.n_tags_found == 3
    assert [odd.input_ids[p] for p in odd.positions] == [ids.tag_id] * 2
    assert odd.positions == prm.tag_positions(odd.input_ids, ids.tag_id)[1:]

    assert prm.encode_for_prm(tok, q, []).status == "empty"
    with pytest.raises(ValueError, match="2 labels for 3 steps"):
        prm.encode_for_prm(tok, q, steps, [0.1, 0.2])
    with pytest.raises(ValueError, match="outside"):
        prm.encode_for_prm(tok, q, steps, [0.1, 0.2, 1.5])


def make_split_tag_tokenizer():
    """make_tokenizer without "ки" whose "к" and "и" are two tokens (as " ки" is in SmolLM2's BPE); its
    decoder joins tokens without spaces."""
    from tokenizers import decoders

    tok = make_tokenizer(with_tag=False)
    tok.add_tokens(["к", "и"])
    tok.backend_tokenizer.decoder = decoders.Fuse()
    return tok


def test_a_split_tag_is_located_by_its_tokens_and_scored_at_the_last():
    tok = make_split_tag_tokenizer()
    ids = prm.resolve_prm_token_ids(tok)
    assert tok.convert_ids_to_tokens(list(ids.tag_ids)) == ["к", "и"] and ids.tag_id == ids.tag_ids[-1]
    assert ids.as_dict()["tag_location"] == "last of 2 tokens" and ids.as_dict()["tag_ids"] == list(
        ids.tag_ids
    )
    q, steps = SOLUTIONS[0]
    enc = prm.encode_for_prm(tok, q, steps, [0.25, None, 1.0])
    assert enc.status == "ok" and enc.positions == prm.tag_positions(enc.input_ids, ids.tag_ids)
    assert [enc.input_ids[p - 1 : p + 1] for p in enc.positions] == [list(ids.tag_ids)] * 3
    assert enc.positions[-1] == len(enc.input_ids) - 1

    # an "и" alone is no tag; "ки" inside a step is a stray tag: a mismatch, the inserted tags still located
    odd = prm.encode_for_prm(tok, q, ["He buys ки 2 more и", "The answer is : 5"], [0.5, 1.0])
    assert odd.status == "tag_count_mismatch" and odd.n_tags_found == 3
    assert odd.positions == prm.tag_positions(torch.tensor(odd.input_ids), ids.tag_ids)[1:]
    cut = prm.encode_for_prm(
        tok, q, steps, [0.25, None, 1.0], max_length=enc.positions[2]
    )  # "к" kept, "и" cut
    assert cut.status == "truncated" and cut.positions == enc.positions[:2] + [None] and cut.labels_lost == 1

    # training reads the targets where scoring reads the scores: the tag's last token
    records = [{"question": q, "steps": steps, "labels": {"r": [0.25, None, 1.0]}}]
    features, audit = prm.prm_training_features(tok, records, "r", None)
    assert features[0]["positions"] == [enc.positions[0], enc.positions[2]] and audit.counts["kept"] == 1
    model = make_model(tok)
    with torch.no_grad():
        logits = model(torch.tensor([enc.input_ids])).logits[0, enc.positions][:, [ids.good_id, ids.bad_id]]
    expected = torch.softmax(logits, dim=-1)[:, 0].tolist()
    assert prm.ProcessRewardModel(model, tok).score(q, steps) == pytest.approx(expected, abs=1e-6)


def test_audit_counts_every_sample():
    tok = make_tokenizer()
    q, steps = SOLUTIONS[0]
    recs = [
        {"problem_id": "a", "question": q, "steps": steps, "labels": {"soft": [0.5, 0.5, 1.0]}},
        {"problem_id": "b", "question": q, "steps": ["He buys ки 2 more ."], "labels": {"soft": [0.5]}},
        {"problem_id": "c", "question": q, "steps": [], "labels": {"soft": []}},
        {"problem_id": "d", "question": q, "steps": steps, "labels": {"soft": [0.5, 1.0]}},
        {"problem_id": "e", "question": q, "steps": steps * 4, "labels": {"soft": [0.5] * 12}},
        {"problem_id": "f", "question": q, "steps": steps * 4, "labels": {"soft": [None] * 11 + [1.0]}},
        {"problem_id": "g", "question": q, "steps": steps, "labels": {"soft": [None, None, None]}},
    ]
    feats, audit = prm.prm_training_features(tok, recs, "soft", max_length=40)
    counts = dict(audit.counts)
    assert counts == {
        "kept": 1,
        "tag_count_mismatch": 1,
        "empty": 2,
        "label_count_mismatch": 1,
        "truncated": 1,
        "truncated_no_label_left": 1,
        "labels_lost": 12 - 4 + 1,  # e keeps 4 tags within 40 tokens (13 + 4 x 6); f loses its only label
    }
    assert sum(v for k, v in counts.items() if k != "labels_lost") == len(recs)
    assert len(feats) == 2 and feats[0]["targets"] == [0.5, 0.5, 1.0]
    frame = audit.to_frame()
    assert set(frame["reason"]) == set(counts) and (frame["example"] != "").all()
    with pytest.raises(KeyError, match="hard"):
        prm.prm_training_features(tok, recs, "hard", 40)


def test_scorer_marks_lost_tags_nan(prm_folder):
    model = prm.ProcessRewardModel.from_pretrained(prm_folder, device="cpu", dtype="float32", max_length=20)
    q, steps = SOLUTIONS[0]
    scores = model.score(q, steps * 3)
    assert len(scores) == 9 and not math.isnan(scores[0]) and math.isnan(scores[-1])
    assert model.audit.counts["truncated"] == 1 and model.audit.counts["steps_unscored"] > 0
    assert prm.aggregate(scores, "min") == pytest.approx(min(s for s in scores if not math.isnan(s)))
    assert math.isnan(prm.aggregate(scores, "last"))  # the final tag was cut: no "last" score


def test_aggregate():
    s = [0.9, 0.5, 0.8]
    assert prm.aggregate(s, "min") == 0.5
    assert prm.aggregate(s, "prod") == pytest.approx(0.36)
    assert prm.aggregate(s, "last") == 0.8
    assert prm.aggregate(s, "mean") == pytest.approx(2.2 / 3)
    with pytest.raises(ValueError, match="no step scores"):
        prm.aggregate([], "min")
    with pytest.raises(ValueError, match="unknown"):
        prm.aggregate(s, "max")
    with pytest.raises(ValueError, match="NaN"):
        prm.aggregate([float("nan")], "min")


def test_aggregate_with_lost_tags():
    nan = float("nan")
    # a lost MIDDLE tag is ignored by every aggregation
    s = [0.9, nan, 0.4]
    assert prm.aggregate(s, "min") == 0.4
    assert prm.aggregate(s, "prod") == pytest.approx(0.36, abs=1e-15)
    assert prm.aggregate(s, "last") == 0.4
    assert prm.aggregate(s, "mean") == pytest.approx(0.65, abs=1e-15)
    # a lost FINAL tag: "last" has no value (never the earlier 0.5); the others use the scored steps
    cut = [0.9, 0.5, nan]
    assert math.isnan(prm.aggregate(cut, "last"))
    assert prm.aggregate(cut, "min") == 0.5
    assert prm.aggregate(cut, "prod") == pytest.approx(0.45, abs=1e-15)
    assert prm.aggregate(cut, "mean") == pytest.approx(0.7, abs=1e-15)
    for how in prm.AGGREGATIONS:
        with pytest.raises(ValueError, match="NaN"):
            prm.aggregate([nan, nan], how)
