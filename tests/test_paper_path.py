"""The paper path on the CPU (issue 20): a hub-named policy through RAFT, float32 master weights when training
runs in bf16, the GPU memory plan of 04 and 05 (which model is loaded when), no cell time limit, the `hf` CLI.

The GPU-only faults are reproduced with stand-ins: a local Hugging Face cache in a temporary folder
(offline) holds a tiny model under an "org/name" id; a recorder wraps the loaders, and a fake vLLM engine (the
HF sampler of a freshly loaded tiny model) stands in for vLLM. The recorder notes, at every load, which models are still
alive (after a garbage collection), so a model kept on the "GPU" too long shows up.
"""

import gc
import json
import os
import shutil
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch

from erprm_core import generation, models, raft, training
from erprm_core.generation import HFSampler
from erprm_core.running import artifacts, cli, dryrun, pipeline
from erprm_core.stages import bon_pool
from erprm_core.stages import raft as raft_stage
from erprm_core.tasks import arith
from erprm_core.tiny_lm import build_tiny_model, build_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HUB_ID = "erprm-test/tiny-policy"
SETTINGS = dict(m=2, max_new_tokens=8, lr=1e-3, epochs=1.0, batch_size=16, train_batch_size=2,
                shard_size=2, exclude_truncated=False, device="cpu")  # fmt: skip


def _save_tiny(path: Path, seed: int = 0) -> Path:
    tok = build_tokenizer()
    model = build_tiny_model(tok, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                             max_position_embeddings=128, seed=seed)  # fmt: skip
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {"policy": _save_tiny(root / "policy"), "prm": _save_tiny(root / "prms" / "er_1", seed=1)}


@pytest.fixture(scope="module")
def problems():
    return arith.generate_problems(2, seed=1, split="train"), arith.generate_problems(2, seed=1, split="test")


@pytest.fixture()
def hub_cache(tmp_path, tiny, monkeypatch):
    """A Hugging Face cache holding the tiny policy as HUB_ID; the hub stays offline (conftest)."""
    import huggingface_hub

    cache = tmp_path / "hf-cache"
    dryrun.save_to_hub_cache(tiny["policy"], cache, HUB_ID)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(
        huggingface_hub.constants, "HF_HUB_CACHE", str(cache)
    )  # read when a file is looked up
    return cache


# ----------------------------------------------------------------------------------------------------
# 1. RAFT with a policy given by a hub name (00 keeps no local copy)
# ----------------------------------------------------------------------------------------------------


def test_the_hub_cache_layout_resolves_offline(hub_cache):
    model, _ = models.load_causal_lm(HUB_ID, device="cpu", dtype="float32")
    assert model.config.hidden_size == 32
    assert (hub_cache / "models--erprm-test--tiny-policy" / "refs" / "main").read_text() == "0" * 40
    assert artifacts.fingerprint(HUB_ID) == f"hub:{HUB_ID}"
    with pytest.raises(FileNotFoundError):  # what a hub name turned into a Path met before the fix
        artifacts.fingerprint(Path(HUB_ID))


@pytest.mark.slow
def test_raft_stage_runs_from_a_hub_named_policy(tmp_roots, hub_cache, problems):
    prompts, test = problems
    P = artifacts.paths("hubraft")
    artifacts.atomic_write_jsonl(P.problem_file("raft"), prompts)
    artifacts.atomic_write_jsonl(P.problem_file("test"), test)
    artifacts.update_manifest("hubraft", "00_policy", policy_name=HUB_ID)  # what 00 records for a hub policy
    assert not P.policy.exists()
    config = raft_stage.RaftConfig(profile="hubraft", reward_models="random", iterations=1, n_prompts=2,
                                   n_test=2, m=2, max_new_tokens=8, lr=1e-3, train_batch_size=2,
                                   exclude_truncated=False, device="cpu", torch_threads=1,
                                   cpu_numerics="default")  # fmt: skip
    res = raft_stage.run(config, progress=False)
    assert set(res.table["reward_model"]) == {"baseline", "random"}
    assert (P.raft / "random" / "iter_01" / "policy" / "config.json").is_file()
    assert not Path(HUB_ID).exists()  # never taken for a local folder
    base = artifacts.read_jsonl(P.raft / "baseline" / "eval.jsonl")
    assert len(base) == 2


# ----------------------------------------------------------------------------------------------------
# 2. Training in bf16 updates float32 master weights
# ----------------------------------------------------------------------------------------------------


def _share_changed(before: dict[str, torch.Tensor], model) -> float:
    after = {k: v.detach().float() for k, v in model.state_dict().items()}
    changed = sum(int((after[k] != v).sum()) for k, v in before.items())
    return changed / sum(v.numel() for v in before.values())


@pytest.mark.slow
def test_bf16_finetuning_steps_move_the_weights():
    tok = build_tokenizer(max_number=99)
    model = build_tiny_model(tok, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                             max_position_embeddings=128, seed=0).to(torch.bfloat16)  # fmt: skip
    before = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
    examples = [
        {"question": p["question"], "solution": p["solution"]} for p in arith.generate_problems(6, seed=2)
    ]
    df = training.train_policy_sft(model, tok, examples, "unused", lr=5e-7, max_steps=3, batch_size=2,
                                   lr_scheduler="constant", warmup_ratio=0.0, logging_steps=1, save=False,
                                   disable_tqdm=True)  # fmt: skip
    assert df.attrs["global_steps"] == 3
    # AdamW steps of ~lr on bf16 weights round away (~1% change); on float32 masters nearly every weight moves
    assert _share_changed(before, model) > 0.9
    assert next(model.parameters()).dtype == torch.float32  # the float32 master weights


def test_float32_master_is_skipped_for_float32_models_and_deepspeed():
    tok = build_tokenizer(max_number=9)
    model = build_tiny_model(tok, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
                             max_position_embeddings=64, seed=0)  # fmt: skip

    class Args:
        deepspeed_plugin = None

    assert training.float32_master(model, Args()) is False
    model.to(torch.bfloat16)
    Args.deepspeed_plugin = object()  # DeepSpeed keeps its own float32 copies
    assert (
        training.float32_master(model, Args()) is False and next(model.parameters()).dtype == torch.bfloat16
    )
    Args.deepspeed_plugin = None
    assert training.float32_master(model, Args()) is True and next(model.parameters()).dtype == torch.float32


@pytest.mark.slow
def test_prm_training_in_bf16_moves_float32_master_weights(tmp_path, tiny):
    records = [
        {"problem_id": f"p{i}", "question": f"Tom has {i} apples.", "steps": [f"{i} + 1 = {i + 1}", "ok"],
         "outcome": i % 2, "labels": {"soft": [0.5, float(i % 2)]}}
        for i in range(4)
    ]  # fmt: skip
    base = tiny["policy"]  # any causal LM whose vocabulary has the step tag and +/-
    df = training.train_prm(base, None, records, "soft", tmp_path / "soft", lr=5e-7, max_steps=2,
                            batch_size=2, dtype="bfloat16", lr_scheduler="constant", disable_tqdm=True)  # fmt: skip
    assert df.attrs["global_steps"] == 2
    assert df.attrs["n_examples"] == 4
    trained, _ = models.load_causal_lm(tmp_path / "soft", device="cpu", dtype="auto")
    start, _ = models.load_causal_lm(base, device="cpu", dtype="bfloat16")
    # the decoder layers get gradients everywhere (embedding rows of unseen tokens and head rows other than
    # +/- get none under the two-token loss)
    before = {k: v.detach().float() for k, v in start.state_dict().items() if ".layers." in k}
    assert _share_changed(before, trained) > 0.9  # in bf16 AdamW steps of 5e-7 would round away
    saved = json.loads((tmp_path / "soft" / "config.json").read_text())
    assert saved.get("dtype", saved.get("torch_dtype")) == "float32"  # the master weights are what is saved


def test_bf16_sampling_runs_on_the_cpu(tiny):
    """The dry run keeps the paper's bfloat16 for the policy and completer (00, 01) on the CPU."""
    model, tok = models.load_causal_lm(tiny["policy"], device="cpu", dtype="bfloat16")
    gens = HFSampler(model, tok, batch_size=4).generate(["Tom has 3 apples."], 2, [("q", 0)], seed=0,
                                                        max_new_tokens=6)  # fmt: skip
    assert len(gens) == 1 and len(gens[0]) == 2 and all(g.n_tokens >= 1 for g in gens[0])


def test_dry_run_caches_its_policy_under_a_hub_name(tmp_path, monkeypatch):
    import huggingface_hub

    prepared = dryrun.prepare("paper-gsm8k", base=tmp_path)
    assert f"policy_name={json.dumps(dryrun.HUB_POLICY)}" in prepared.overrides
    assert not any(o.startswith("dtype=") for o in prepared.overrides)  # the paper's bf16 stays
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(prepared.hub_cache))
    with dryrun.redirected_roots(prepared):
        assert os.environ["HF_HUB_CACHE"] == str(prepared.hub_cache)  # inherited by the stage kernels
        model, _ = models.load_causal_lm(dryrun.HUB_POLICY, device="cpu", dtype="float32")
    assert type(model).__name__ == "MistralForCausalLM"


# ----------------------------------------------------------------------------------------------------
# 3 and 4. The memory plan of 04 and 05: which model is alive when another one is loaded
# ----------------------------------------------------------------------------------------------------


class Recorder:
    """Wraps the loaders: every load is recorded with the models still alive at that moment."""

    def __init__(self, monkeypatch, tiny):
        self.events: list[tuple[str, str, list[str]]] = []
        self.live: list[tuple[str, weakref.ref]] = []
        self.real_load = models.load_causal_lm
        self.prm_dir = str(tiny["prm"])
        monkeypatch.setattr(models, "load_causal_lm", self.load_causal_lm)
        monkeypatch.setattr(generation, "load_sampler", self.load_sampler)

    def alive(self) -> list[str]:
        gc.collect()
        return sorted(label for label, ref in self.live if ref() is not None)

    def _note(self, label: str, detail: str, obj) -> None:
        self.events.append((label, detail, self.alive()))
        self.live.append((label, weakref.ref(obj)))

    def load_causal_lm(self, name_or_path, device="auto", dtype="auto", **kwargs):
        model, tok = self.real_load(name_or_path, device="cpu", dtype=dtype, **kwargs)
        label = "prm" if str(name_or_path).startswith(self.prm_dir) else "policy"
        self._note(label, str(dtype), model)
        return model, tok

    def load_sampler(self, source, backend="hf", device="auto", dtype="auto", batch_size=64, **kwargs):
        assert backend == "vllm", "only vLLM engines are faked"
        assert isinstance(source, str | Path), f"vLLM must get a name or path, got {type(source).__name__}"
        model, tok = self.real_load(source, device="cpu", dtype="float32")
        engine = FakeEngine(model, tok, batch_size)
        self._note("engine", str(source), model)
        return engine


class FakeEngine:
    """A vLLM engine stand-in: the HF sampler of its own copy of the model; close() lets it go."""

    def __init__(self, model, tok, batch_size):
        self.inner = HFSampler(model, tok, batch_size=batch_size)
        self.stats = self.inner.stats

    def generate(self, *args, **kwargs):
        return self.inner.generate(*args, **kwargs)

    def close(self):
        self.inner = None


@pytest.mark.slow
def test_raft_iteration_memory_plan_with_vllm(tmp_path, tiny, problems, monkeypatch):
    rec = Recorder(monkeypatch, tiny)
    prompts, test = problems
    st = raft.RaftSettings(**{**SETTINGS, "backend": "vllm"})
    raft_stage.baseline_record(tiny["policy"], test, st, tmp_path / "baseline")
    records = raft_stage.run_raft("er_1", tiny["prm"], start_policy=tiny["policy"], prompts=prompts,
                                  test_problems=test, out_root=tmp_path, iterations=1, settings=st,
                                  progress=False)  # fmt: skip
    assert len(records) == 1
    # baseline engine; sampling engine; the PRM for scoring; the float32 training copy; the evaluation engine
    assert [(label, detail) for label, detail, _ in rec.events] == [
        ("engine", str(tiny["policy"])),
        ("engine", str(tiny["policy"])),
        ("prm", "auto"),
        ("policy", "float32"),
        ("engine", str(tmp_path / "er_1" / "iter_01" / "policy")),
    ]
    for label, detail, alive in rec.events:
        assert alive == [], f"{label} ({detail}) loaded while {alive} still held memory"
    assert rec.alive() == []


@pytest.mark.slow
def test_best_of_n_memory_plan_with_vllm(tmp_path, tiny, problems, monkeypatch):
    rec = Recorder(monkeypatch, tiny)
    _, test = problems
    pool = bon_pool.build_candidate_pool(tiny["policy"], test, 2, max_new_tokens=8, batch_size=16,
                                          shard_size=2, out_dir=tmp_path, backend="vllm", device="cpu")  # fmt: skip
    assert len(pool.records) == 4 and pool.stats["computed_generated_tokens"] > 0
    scored = bon_pool.score_pool(pool.records, {"er_1": tiny["prm"]}, out_dir=tmp_path, device="cpu")
    assert "er_1:min" in scored.table
    # no Hugging Face copy of the policy: vLLM got the folder; the engine was gone before the PRM came
    assert [(label, alive) for label, _, alive in rec.events] == [("engine", []), ("prm", [])]
    assert rec.alive() == []


def test_vllm_sampler_refuses_a_transformers_model(tiny):
    model, tok = models.load_causal_lm(tiny["policy"], device="cpu", dtype="float32")
    with pytest.raises(TypeError, match="name/path"):
        generation.make_sampler(model, tok, "vllm")


# ----------------------------------------------------------------------------------------------------
# 5 and 6. The commands of REPRODUCING.md: no cell time limit, the `hf` CLI
# ----------------------------------------------------------------------------------------------------


def test_reproduce_sets_no_cell_time_limit_by_default(tmp_roots, monkeypatch):
    import papermill

    calls = []

    def execute_notebook(source, output, **kwargs):
        calls.append(kwargs["execution_timeout"])
        shutil.copy(source, output)

    monkeypatch.setattr(papermill, "execute_notebook", execute_notebook)
    assert cli.main(["reproduce", "--profile", "smoke", "--from", "06", "--to", "06", "--force"]) == 0
    assert cli.main(["reproduce", "--profile", "smoke", "--from", "06", "--to", "06", "--force",
                     "--cell-timeout", "120"]) == 0  # fmt: skip
    pipeline.run("smoke", "06", "06", force=True)
    assert calls == [None, 120, None]


def test_reproducing_md_names_the_current_hf_cli():
    text = (artifacts.repo_root() / "REPRODUCING.md").read_text(encoding="utf-8")
    accelerate_readme = (artifacts.repo_root() / "configs" / "accelerate" / "README.md").read_text()
    assert (
        "huggingface-cli" not in text + accelerate_readme
    )  # removed from huggingface_hub; its command is `hf`
    assert "hf auth login" in text and "hf download meta-llama/Llama-3.1-8B" in text
    hf = Path(sys.executable).with_name("hf")
    if not hf.is_file():
        pytest.skip("the hf command of huggingface_hub is not installed here")
    for command in (["auth", "login"], ["download"]):
        done = subprocess.run([str(hf), *command, "--help"], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
