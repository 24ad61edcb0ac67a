"""Shared fixtures only: a composed config in a temporary run directory, one torch thread,
offline wandb. Helpers that are not fixtures live in tests/helpers/ (imported as ``helpers``)."""

from __future__ import annotations

import pytest
from omegaconf import DictConfig

from helpers.config import compose_train_config

# Files whose tests share a session fixture: one pytest-xdist worker runs them all, so the
# fixture is built once (trained_reverse, tests/cli/conftest.py, ~100 s).
SHARED_FIXTURE_GROUPS = {"test_learning.py": "trained_reverse", "test_analyze.py": "trained_reverse"}


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups off the items
def pytest_collection_modifyitems(items):
    """Under `pytest -n 2 --dist loadgroup` (the README's test command) a file's tests stay on one
    worker: module fixtures (a trained tp=2 run, a spawned world) are built once, not once a worker."""
    for item in items:
        group = SHARED_FIXTURE_GROUPS.get(item.path.name, item.nodeid.split("::")[0])
        item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture
def make_cfg(tmp_path):
    """make_cfg(*overrides) -> composed config writing into tmp_path/run."""

    def make(*overrides: str) -> DictConfig:
        return compose_train_config(tmp_path / "run", overrides)

    return make


@pytest.fixture(autouse=True)
def _one_torch_thread():
    # Tiny models on 2 shared cores: one thread per process is faster and immune to neighbours
    # (a 40-step run takes ~4 s instead of ~40 s). Subprocesses get OMP_NUM_THREADS=1.
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _offline_wandb(tmp_path, monkeypatch):
    # Real wandb, offline, its cache and settings inside the test's tmp dir.
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home"))
    monkeypatch.setenv("MHA_LOG_DIR", str(tmp_path / "logs"))
    yield
    import wandb

    if wandb.run is not None:
        wandb.finish()
