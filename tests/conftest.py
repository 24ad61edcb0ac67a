"""Shared fixtures: compose real Hydra configs into a temporary run directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def compose_train_config(output_dir: Path, overrides: list[str] = ()) -> DictConfig:
    """The config `mha-train <overrides>` would run, writing into ``output_dir``."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)  # ${hydra:runtime.output_dir} only exists inside the app
    return cfg


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


def csv_train_rows(run_dir: Path, version: int | None = None) -> dict[int, tuple[float, float]]:
    """step -> (train/loss, train/lr) from the CSV logger's file(s) in ``run_dir``."""
    import csv

    pattern = f"csv/version_{version}/metrics.csv" if version is not None else "csv/version_*/metrics.csv"
    rows = {}
    for path in sorted(run_dir.glob(pattern)):
        for row in csv.DictReader(path.open()):
            if row["train/loss"]:
                rows[int(row["step"])] = (float(row["train/loss"]), float(row["train/lr"]))
    return rows


def cli_env(tmp_path: Path) -> dict[str, str]:
    """Environment for running `mha-train` etc. as real subprocesses."""
    env = dict(os.environ)
    env.update({"WANDB_MODE": "offline", "WANDB_SILENT": "true", "MHA_LOG_DIR": str(tmp_path / "logs"),
                "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    return env
