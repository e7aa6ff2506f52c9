"""Shared test setup: offline hub, artifact roots in a temporary folder, the shared data location."""

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the repository; tests that need it skip when it is absent."""
    from erprm_core.artifacts import repo_root

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
