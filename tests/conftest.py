"""Shared test setup: offline hub, artifact roots in a temporary folder, the shared data location."""

import os
from pathlib import Path

import pytest
from hypothesis import settings

from erprm_core.running.numerics import pin_environment

# Property tests check values, not speed: no per-example deadline (a shared 2-core machine or CI host can take
# longer than hypothesis's default 200 ms for an example that is fast on an idle one).
settings.register_profile("kit", deadline=None)
settings.load_profile("kit")

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The tests run with the CPU profiles' pinned kernel paths (set before any tensor operation of the session),
# so the values they check are the same bits on every x86-64 host and stage code may configure("portable").
os.environ.update(pin_environment("portable"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the repository; tests that need it skip when it is absent."""
    from erprm_core.running.artifacts import repo_root

    path = repo_root().parent / "shared" / "data"
    if not path.is_dir():
        pytest.skip(f"shared data not found at {path}")
    return path


@pytest.fixture()
def tmp_roots(tmp_path, monkeypatch):
    """Redirect runs/ and results/ to a temporary folder for the test."""
    monkeypatch.setenv("ERPRM_RUNS_ROOT", str(tmp_path / "runs"))
    monkeypatch.setenv("ERPRM_RESULTS_ROOT", str(tmp_path / "results"))
    return tmp_path


@pytest.fixture(scope="session")
def paper_k16_eta1_labels() -> list[float]:
    """paper.md's check values: k = 16, eta = 1, p = j/16 for j = 1..15 -> these labels (3 decimals; the
    authors' released sample data)."""
    return [
        0.102,
        0.195,
        0.279,
        0.357,
        0.43,
        0.497,
        0.561,
        0.62,
        0.676,
        0.729,
        0.78,
        0.828,
        0.874,
        0.918,
        0.96,
    ]


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a test module: its models are tiny and the machine may be shared (two threads
    on a busy 2-core machine run slower than one). Use with ``pytestmark = pytest.mark.usefixtures(...)``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
