"""Running `mha-train` as a subprocess, and reading what a run logged."""

from __future__ import annotations

import csv
import os
from pathlib import Path


def cli_env(tmp_path: Path) -> dict[str, str]:
    """Environment for running `mha-train` etc. as real subprocesses."""
    env = dict(os.environ)
    env.update(
        {
            "WANDB_MODE": "offline",
            "WANDB_SILENT": "true",
            "MHA_LOG_DIR": str(tmp_path / "logs"),
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1",
        }
    )
    return env


def csv_train_rows(run_dir: Path, version: int | None = None) -> dict[int, tuple[float, float]]:
    """step -> (train/loss, train/lr) from the CSV logger's file(s) in ``run_dir``."""
    pattern = f"csv/version_{version}/metrics.csv" if version is not None else "csv/version_*/metrics.csv"
    rows = {}
    for path in sorted(run_dir.glob(pattern)):
        for row in csv.DictReader(path.open()):
            if row["train/loss"]:
                rows[int(row["step"])] = (float(row["train/loss"]), float(row["train/lr"]))
    return rows
