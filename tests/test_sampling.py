"""Tests of sampling: the HF decoding loop (padding, cache, prefix sharing, stops), seeds, rollouts, grading.

Two test models, both fast on a CPU:
- a random tiny LlamaForCausalLM (erprm_core.tiny_lm.build_tiny_model) for the mechanics: left padding, position ids,
  the shared-prompt KV cache and batch-size independence, checked against a plain full forward pass;
- ``ScriptedLM``, a deterministic "noisy oracle" policy with the causal-LM interface. It keeps its token
  history in the KV cache (so the sampler's cache copies and row drops are exercised) and continues the
  reference solution of the question it reads; at every number token it writes a wrong number with
  probability ``p_err``, after which it states a wrong answer. After the answer line it keeps writing
  ("Then we stop here ..."), which the sampler must cut. Outcomes and completion rewards therefore vary like a
  real policy's, and prefixes after a wrong step can never recover (their completion rewards are all 0).
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from erprm_core import grading, rollouts
from erprm_core.generation import HFSampler, hf, make_sampler
from erprm_core.generation.hf import sample_next
from erprm_core.sampler import cut_at_answer_line, row_seed
from erprm_core.steps import policy_prompt, split_steps
from erprm_core.tasks import arith
from erprm_core.tiny_lm import build_tiny_model, build_tokenizer

TAIL = "\nThen we stop here and go home.\n"
WRONG = "\nThe answer is: 1000\n"


class ScriptedLM(torch.nn.Module):
    """A deterministic test policy with the causal-LM interface used by HFSampler (see module docstring)."""

    def __init__(self, tokenizer, problems, p_err: float = 0.15):
        super().__init__()
        from transformers import LlamaConfig

        self.tok = tokenizer
        self.config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=8, num_hidden_layers=1,
                                  num_attention_heads=1, num_key_value_heads=1, intermediate_size=8)  # fmt: skip
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.p_err = p_err
        self.targets = {}
        for p in problems:
            prompt = tokenizer(policy_prompt(p["question"])).input_ids
            target = tokenizer(p["solution"] + TAIL, add_special_tokens=False).input_ids
            self.targets[tuple(prompt)] = target
        self.wrong = tokenizer(WRONG, add_special_tokens=False).input_ids
        self.numbers = {tokenizer.convert_tokens_to_ids(f" {i}"): i for i in range(0, 999)}
        self.eos = tokenizer.eos_token_id

    def _next(self, history: list[int]) -> dict[int, float]:
        found = [(p, t) for p, t in self.targets.items() if tuple(history[: len(p)]) == p]
        if not found:
            return {self.eos: 1.0}
        prompt, target = found[0]
        gen = history[len(prompt) :]
        dev = next((i for i, (a, b) in enumerate(zip(gen, target, strict=False)) if a != b), None)
        if dev is None:
            if len(gen) >= len(target):
                return {self.eos: 1.0}
            want = target[len(gen)]
            if want in self.numbers and self.p_err > 0:
                bad = self.tok.convert_tokens_to_ids(f" {self.numbers[want] + 1}")
                return {want: 1 - self.p_err, bad: self.p_err}
            return {want: 1.0}
        pos = len(gen) - dev - 1
        return {self.wrong[pos]: 1.0} if pos < len(self.wrong) else {self.eos: 1.0}

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=True,
                logits_to_keep=0, **kwargs):  # fmt: skip
        ids = input_ids.to(torch.float32)[:, None, :, None]
        keys, _ = cache.update(ids, ids, 0)
        hist = keys[:, 0, :, 0].long()
        mask = attention_mask if attention_mask is not None else torch.ones_like(hist)
        assert mask.shape == hist.shape, (mask.shape, hist.shape)
        logits = torch.full((hist.shape[0], 1, self.config.vocab_size), -1e4)
        for b in range(hist.shape[0]):
            history = hist[b][mask[b].bool()].tolist()
            for tok, prob in self._next(history).items():
                logits[b, 0, tok] = math.log(prob)
        return type("Out", (), {"logits": logits})()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="session")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="session")
def problems():
    return arith.generate_problems(6, seed=3, max_steps=4)


@pytest.fixture(scope="session")
def scripted(tok, problems):
    return ScriptedLM(tok, problems)


@pytest.fixture(scope="session")
def random_llama(tok):
    return build_tiny_model(tok, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64).eval()


# ---------------------------------------------------------------------------------------------------
# Pure helpers
# ---------------------------------------------------------------------------------------------------


def test_row_seed_is_stable_and_distinct():
    assert row_seed(0, "solution", "a", 1) == row_seed(0, "solution", "a", 1)
    assert row_seed(0, "solution", "a", 1) != row_seed(1, "solution", "a", 1)
    assert row_seed(0, "solution", "a", 1) != row_seed(0, "solution", "a", 2)
    assert 0 <= row_seed(5, "x") < 2**63
    # pinned: the seed must not change between Python processes or versions
    assert row_seed(0, "solution", "p1", 0) == 3628508281957783165


@pytest.mark.parametrize(
    ("text", "cut"),
    [
        ("a\nThe answer is: 5\nmore", "a\nThe answer is: 5"),
        ("The answer is: 5", None),  # not a complete line yet
        ("x\n#### 72\n", "x\n#### 72"),
        ("The answer is 3\nThe answer is: 4\n", "The answer is 3"),
        ("no answer\nhere\n", None),
    ],
)
def test_cut_at_answer_line(text, cut):
    pos = cut_at_answer_line(text)
    assert (None if pos is None else text[:pos]) == cut


def test_sample_next_inverse_cdf_greedy_and_top_p():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]] * 5))
    u = torch.tensor([0.0, 0.099, 0.1, 0.65, 0.9999])
    assert sample_next(logits, u, 1.0, 1.0).tolist() == [0, 0, 1, 3, 3]
    assert sample_next(logits, u, 0.0, 1.0).tolist() == [3] * 5
    # top_p=0.5 keeps {3, 2} (0.4 + 0.3 >= 0.5), renormalised: 4/7 and 3/7
    assert sample_next(logits, u, 1.0, 0.5).tolist() == [3, 3, 3, 2, 2]
    # zero-probability tokens are never picked, even with u close to 1
    masked = torch.tensor([[0.0, 0.0, -math.inf, -math.inf]])
    assert sample_next(masked, torch.tensor([0.99999994]), 1.0, 1.0).tolist() == [1]


@pytest.mark.parametrize(
    "kwargs",
    [dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5), dict(max_new_tokens=0), dict(n=0)],
)
def test_bad_parameters_are_rejected(scripted, tok, problems, kwargs):
    args = dict(n=1) | kwargs
    with pytest.raises(ValueError):
        rollouts.sample_solutions(make_sampler(scripted, tok), problems[:1], **args)


def test_unknown_backend_and_missing_vllm(scripted, tok, problems):
    with pytest.raises(ValueError, match="backend"):
        rollouts.sample_solutions(make_sampler(scripted, tok, backend="tgi"), problems[:1], n=1)
    try:
        import vllm  # noqa: F401

        pytest.skip("vllm is installed")
    except ImportError:
        pass
    with pytest.raises(ImportError, match=r"pip install -e \.\[vllm\]"):
        rollouts.sample_solutions(make_sampler("some/model", None, backend="vllm"), problems[:1], n=1)


# ---------------------------------------------------------------------------------------------------
# Decoding mechanics on a random Llama
# ---------------------------------------------------------------------------------------------------


def _full_forward_greedy(model, ids: list[int], steps: int) -> list[int]:
    """Reference greedy decoding: a full forward pass over the whole sequence at every step, no cache."""
    seq = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1]
            nxt = int(logits.argmax())
            out.append(nxt)
            seq.append(nxt)
    return out


def test_left_padding_and_cache_match_unbatched_full_forward(random_llama, tok, problems):
    # prompts of very different lengths in one batch: left padding, position ids and the cache must make
    # each row identical to decoding it alone without any cache
    short = {"id": "short", "question": "Ana has 3 .", "answer": "3", "task": "arith"}
    probs = [problems[0], short, problems[1]]
    sampler = HFSampler(random_llama, tok, batch_size=64)
    gens = sampler.generate([policy_prompt(p["question"]) for p in probs], 2, [(p["id"],) for p in probs],
                            temperature=0.0, max_new_tokens=12)  # fmt: skip
    for p, per in zip(probs, gens, strict=True):
        ref = _full_forward_greedy(random_llama, tok(policy_prompt(p["question"])).input_ids, 12)
        expect = tok.decode(ref, skip_special_tokens=True)
        for g in per:  # both greedy samples share the prompt's cache and must agree with the reference
            assert g.finish == "length" and g.n_tokens == 12
            assert g.text == expect
    assert sampler.stats["sequences"] == 6


@pytest.fixture(scope="session")
def gqa_llama(tok):
    """A random Llama with grouped-query attention (4 query heads share 2 key/value heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("which", ["random_llama", "gqa_llama"])
def test_shared_prefix_attention_equals_expanded_cache(request, which, tok, problems):
    # the k samples of a prompt read one copy of its keys/values; results must equal the plain expanded cache,
    # with finished rows dropped mid-way (many short prompts, sampling at temperature 1)
    model = request.getfixturevalue(which)
    prompts = [policy_prompt(p["question"]) for p in problems] + ["Ana has 3 .\n"]
    keys = [(i,) for i in range(len(prompts))]
    shared = HFSampler(model, tok, batch_size=16)
    plain = HFSampler(model, tok, batch_size=16, shared_prefix=False)
    assert shared.shared_prefix and not plain.shared_prefix
    before = model.config._attn_implementation
    for temperature in (0.0, 1.0):
        a = shared.generate(prompts, 5, keys, seed=3, temperature=temperature, max_new_tokens=20)
        b = plain.generate(prompts, 5, keys, seed=3, temperature=temperature, max_new_tokens=20)
        assert a == b
    assert model.config._attn_implementation == before  # switched back after generate
    # rows finishing at different steps (every 10th token id counts as EOS): dropping rows and whole prompts
    for sampler in (shared, plain):
        sampler.eos_ids = torch.arange(0, len(tok), 10)
    a = shared.generate(prompts, 5, keys, seed=4, max_new_tokens=30)
    b = plain.generate(prompts, 5, keys, seed=4, max_new_tokens=30)
    lengths = {g.n_tokens for per in a for g in per}
    assert a == b and len(lengths) > 5 and any(g.finish == "eos" for per in a for g in per)
    shared.eos_ids = plain.eos_ids = torch.tensor([tok.eos_token_id])
    ref = _full_forward_greedy(model, tok(prompts[-1]).input_ids, 20)
    greedy = shared.generate(prompts[-1:], 2, keys[-1:], temperature=0.0, max_new_tokens=20)[0]
    assert all(g.text == tok.decode(ref, skip_special_tokens=True) for g in greedy)


@pytest.mark.parametrize("which", ["random_llama", "gqa_llama"])
def test_lean_decoding_step_is_bit_identical_to_the_hf_modules(request, which, tok, problems, monkeypatch):
    # the lean step runs the same operations as transformers' Llama layers + the shared-prefix attention:
    # the same records bit for bit, through full and partial layouts (rows and whole prompts dropped)
    model = request.getfixturevalue(which)
    prompts = [policy_prompt(p["question"]) for p in problems] + ["Ana has 3 .\n"]
    keys = [(i,) for i in range(len(prompts))]
    lean = HFSampler(model, tok, batch_size=16)
    modules = HFSampler(model, tok, batch_size=16, lean=False)
    assert lean.lean is not None and modules.lean is None and modules.shared_prefix
    for sampler in (lean, modules):
        sampler.eos_ids = torch.arange(0, len(tok), 10)  # rows finish at many different steps
    logits: list[list[torch.Tensor]] = [[], []]  # the logits of every decoding step, per sampler
    runs = []
    for seen, sampler in zip(logits, (lean, modules), strict=True):
        monkeypatch.setattr(
            hf, "sample_next", lambda lg, *a, seen=seen: seen.append(lg.clone()) or sample_next(lg, *a)
        )
        runs.append(sampler.generate(prompts, 5, keys, seed=4, max_new_tokens=30))
    a, b = runs
    assert a == b and len({g.n_tokens for per in a for g in per}) > 5
    assert lean.stats == modules.stats  # same forward passes, tokens and sequences
    assert len(logits[0]) == len(logits[1]) > 30
    assert all(torch.equal(x, y) for x, y in zip(*logits, strict=True))


def test_lean_decoding_refuses_architectures_it_does_not_reproduce(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    from erprm_core.generation.lean_decode import supports_lean_decode

    kw = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
              num_attention_heads=4, max_position_embeddings=64)  # fmt: skip
    assert supports_lean_decode(LlamaForCausalLM(LlamaConfig(**kw)))
    biased = LlamaForCausalLM(LlamaConfig(**kw, attention_bias=True))
    assert not supports_lean_decode(biased)
    assert HFSampler(biased, tok).lean is None  # "auto": decodes through the HF modules
    with pytest.raises(ValueError, match="lean=True"):
        HFSampler(biased, tok, lean=True)


def test_prompt_runs_once_per_batch_and_is_shared(random_llama, tok, problems):
    sampler = HFSampler(random_llama, tok, batch_size=64)
    prompts = [policy_prompt(p["question"]) for p in problems[:3]]
    sampler.generate(prompts, 8, [(i,) for i in range(3)], max_new_tokens=4)
    # 3 distinct prompts x 8 samples = 24 rows in ONE batch: the prompt tokens are counted once each
    assert sampler.stats["prompt_tokens"] == sum(len(tok(p).input_ids) for p in prompts)
    assert sampler.stats["forward_passes"] <= 4  # one prefill + at most 3 decoding steps


def test_same_seed_same_records_any_batch_size(random_llama, tok, problems):
    kw = dict(n=3, max_new_tokens=16, seed=7)
    big = rollouts.sample_solutions(make_sampler(random_llama, tok, batch_size=64), problems, **kw)
    small = rollouts.sample_solutions(make_sampler(random_llama, tok, batch_size=2), problems, **kw)
    assert big == small
    other = rollouts.sample_solutions(
        make_sampler(random_llama, tok, batch_size=64), problems, **(kw | {"seed": 8})
    )
    assert [r["text"] for r in other] != [r["text"] for r in big]
    # one problem alone gives the same samples as inside a batch of problems (seeds per problem id)
    alone = rollouts.sample_solutions(make_sampler(random_llama, tok, batch_size=5), problems[2:3], **kw)
    assert alone == big[6:9]


# ---------------------------------------------------------------------------------------------------
# Semantics with the scripted policy
# ---------------------------------------------------------------------------------------------------


def test_sample_solutions_records_stop_and_grade(scripted, tok, problems):
    recs = rollouts.sample_solutions(
        make_sampler(scripted, tok, batch_size=16), problems, n=8, max_new_tokens=120, seed=0
    )
    assert len(recs) == 48
    assert [(r["problem_id"], r["sample_index"]) for r in recs] == [
        (p["id"], j) for p in problems for j in range(8)
    ]
    by_id = {p["id"]: p for p in problems}
    for r in recs:
        p = by_id[r["problem_id"]]
        assert r["finish"] == "answer" and not r["truncated"]
        assert re.fullmatch(r"The answer is: \d+", r["steps"][-1]), r["text"]
        assert "stop here" not in r["text"]  # the text after the answer line was cut
        assert r["steps"] == split_steps(r["text"])
        assert r["pred"] == grading.extract_answer(r["text"], "arith")
        assert r["outcome"] == int(r["pred"] == p["answer"])
        assert r["n_tokens"] == len(tok(r["text"] + "\n", add_special_tokens=False).input_ids)
        if r["outcome"] == 1:
            assert r["text"] == p["solution"]
    outcomes = [r["outcome"] for r in recs]
    assert 0 < sum(outcomes) < len(outcomes)  # a noisy policy: some right, some wrong


def test_greedy_is_the_reference_solution(scripted, tok, problems):
    recs = rollouts.sample_solutions(make_sampler(scripted, tok), problems, n=2, temperature=0.0, seed=0)
    assert all(r["text"] == p["solution"] for r, p in zip(recs[::2], problems, strict=True))
    assert all(r["outcome"] == 1 for r in recs)


def test_truncation_is_flagged(scripted, tok, problems):
    recs = rollouts.sample_solutions(make_sampler(scripted, tok), problems[:2], n=2, max_new_tokens=5, seed=0)
    assert all(r["truncated"] and r["finish"] == "length" and r["n_tokens"] == 5 for r in recs)
    assert all(r["pred"] is None and r["outcome"] == 0 for r in recs)


def test_rollout_completions_grade_prefix_plus_completion(scripted, tok, problems):
    sols = rollouts.sample_solutions(make_sampler(scripted, tok), problems, n=4, seed=1)
    by_id = {p["id"]: p for p in problems}
    for s in sols:
        s.update({k: by_id[s["problem_id"]][k] for k in ("question", "answer", "task")})
    out = rollouts.rollout_completions(make_sampler(scripted, tok, batch_size=32), sols, k=6, seed=1)
    assert len(out) == len(sols)
    n_wrong_prefix = 0
    for s, o in zip(sols, out, strict=True):
        assert len(o["completion_rewards"]) == len(s["steps"]) - 1
        assert all(len(r) == 6 and set(r) <= {0, 1} for r in o["completion_rewards"])
        ref_steps = split_steps(by_id[s["problem_id"]]["solution"])
        for i, rewards in enumerate(o["completion_rewards"]):
            if s["steps"][: i + 1] != ref_steps[: i + 1]:  # a wrong step: the scripted policy never recovers
                assert rewards == [0] * 6
                n_wrong_prefix += 1
        assert o["completions_truncated"] == 0 and o["completion_tokens"] > 0
    assert n_wrong_prefix > 0
    # the completions of a prefix do not depend on the other solutions in the batch (seeds per row)
    again = rollouts.rollout_completions(make_sampler(scripted, tok, batch_size=7), sols[3:5], k=6, seed=1)
    assert again == out[3:5]


def test_completion_prefix_format():
    text = rollouts.completion_prefix("Q?", ["a", "b", "c"], 1)
    assert text == "Q?\na\nb\n"


def test_vllm_backend_runs_when_installed(tok, problems, tmp_path):
    pytest.importorskip("vllm")
    if not torch.cuda.is_available():
        pytest.skip("vLLM needs a GPU")
    model = build_tiny_model(tok, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    recs = rollouts.sample_solutions(
        make_sampler(str(tmp_path / "m"), None, backend="vllm"), problems[:2], n=3, max_new_tokens=16
    )
    assert [(r["problem_id"], r["sample_index"]) for r in recs] == [
        (p["id"], j) for p in problems[:2] for j in range(3)
    ]
    assert all(0 < r["n_tokens"] <= 16 and r["outcome"] in (0, 1) for r in recs)
