"""Fixtures of the end-to-end tests: the one trained model several tests read."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers.config import compose_train_config


@dataclass
class TrainedRun:
    """A finished `mha-train` run: its folder, final metrics, steps and wall time."""

    run_dir: Path
    metrics: dict[str, float]
    steps: int
    seconds: float

    @property
    def checkpoint(self) -> Path:
        """The run's last checkpoint (a single file)."""
        return self.run_dir / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="session")
def trained_reverse(tmp_path_factory) -> TrainedRun:
    """The tiny model trained on `reverse` (experiment=reverse_tiny, ~2 min), once per session: the
    learning check asserts it learned, the head analysis reads its checkpoint."""
    import torch

    from mha_lightning.train import train

    run = tmp_path_factory.mktemp("reverse_tiny") / "run"
    cfg = compose_train_config(
        run,
        [
            "experiment=reverse_tiny",
            "monitor.enabled=false",
            "logger=csv",
            "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false",
        ],
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as every test runs (tests/conftest.py), fixed before any test-scoped fixture
    try:
        start = time.monotonic()
        metrics = train(cfg)
        return TrainedRun(run, metrics, int(cfg.trainer.max_steps), time.monotonic() - start)
    finally:
        torch.set_num_threads(threads)
