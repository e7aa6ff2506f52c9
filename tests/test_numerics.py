"""Pinned CPU numerics: the pin levels, the kernel environment, and that the pins really take effect."""

import os
import subprocess
import sys
import textwrap

import pytest

from erprm_core.running import numerics, pipeline


def test_portable_level_pins_all_three_libraries():
    env = numerics.pin_environment("portable")
    assert env == {
        "ATEN_CPU_CAPABILITY": "avx2",
        "MKL_CBWR": "COMPATIBLE,STRICT",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
    }
    assert numerics.pin_environment("default") == {}


def test_unknown_level_names_the_parameter():
    with pytest.raises(ValueError, match="cpu_numerics='avx3'"):
        numerics.pin_environment("avx3")


def test_kernel_env_unsets_pins_for_the_default_level():
    assert pipeline.kernel_numerics_env("default") == dict.fromkeys(numerics.PIN_VARIABLES)
    assert pipeline.kernel_numerics_env("portable")["MKL_CBWR"] == "COMPATIBLE,STRICT"


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in numerics.PIN_VARIABLES}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env={**clean, **env}
    )


def test_configure_pins_a_fresh_process_and_records_it():
    proc = _run(
        """
        import json
        from erprm_core.running import numerics
        info = numerics.configure("portable", 1)
        print(json.dumps(info))
        """
    )
    assert proc.returncode == 0, proc.stderr
    info = __import__("json").loads(proc.stdout.strip().splitlines()[-1])
    assert info["aten_capability"] == "AVX2" and info["torch_threads"] == 1
    assert info["pins"]["ONEDNN_MAX_CPU_ISA"] == "AVX2" and info["cpu_numerics"] == "portable"
    assert {"cpu_model", "cpu_flags", "blas", "onednn"} <= info.keys()


@pytest.mark.slow  # starts fresh Python processes that import torch (outside `make test-fast`)
def test_configure_too_late_fails_loudly():
    host_default = _run("import torch; print(torch.backends.cpu.get_cpu_capability())").stdout.strip()
    if host_default == "AVX2":
        pytest.skip("this host's default kernel level is AVX2 already: nothing to detect")
    proc = _run(
        """
        import torch
        torch.ones(3).sum()
        from erprm_core.running import numerics
        numerics.configure("portable", 1)
        """
    )
    assert proc.returncode != 0 and "Restart the kernel" in proc.stderr


def test_cpu_host_facts_are_recorded():
    facts = numerics.host()
    assert facts["cpu_model"] and isinstance(facts["cpu_flags"], list)


def test_set_cpu_threads_uses_a_requested_count_and_rejects_negative_ones():
    import torch

    before = torch.get_num_threads()
    try:
        assert numerics.set_cpu_threads(1) == 1 and torch.get_num_threads() == 1
        # auto is the usable cores whatever the load: the same count on every run of a machine
        assert numerics.set_cpu_threads(0) == len(os.sched_getaffinity(0)) == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="torch_threads must be >= 0"):
        numerics.set_cpu_threads(-1)


def test_the_stages_operations_avoid_the_vendor_specific_kernels(tmp_path):
    """Training, sampling and PRM scoring of a tiny model call no operation of VENDOR_SPECIFIC_OPS (MKL's
    square root refines rsqrtps, whose last bits differ between Intel and AMD)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from erprm_core import prm, training
    from erprm_core.generation import HFSampler
    from erprm_core.tasks import arith
    from erprm_core.tiny_lm import build_tiny_model, build_tokenizer

    tok = build_tokenizer(max_number=99)
    model = build_tiny_model(tok, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    problems = arith.generate_problems(8, seed=0, max_value=99, max_operand=10)
    called: set[str] = set()

    class Names(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            called.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    with Names():
        training.train_policy_sft(model, tok, problems, tmp_path, max_steps=2, batch_size=4, save=False,
                                  disable_tqdm=True)  # fmt: skip
        HFSampler(model, tok, batch_size=4).generate(["Tom has 3 apples."], 2, [("q", 0)], max_new_tokens=4)
        prm.ProcessRewardModel(model, tok).score(problems[0]["question"], ["A step.", "Another step."])
    assert {"_fused_adamw_", "mm", "softmax"} <= called  # the workloads ran
    assert not called & numerics.VENDOR_SPECIFIC_OPS
    with Names():
        torch.ones(3).sqrt()  # the check would see one
    assert "sqrt" in called
