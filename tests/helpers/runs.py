"""Running `mha-train` as a subprocess, and reading what a run logged."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
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


def start_mha_train(run_dir: Path, *overrides: str) -> subprocess.Popen:
    """Start `python -m mha_lightning.train <overrides>` writing into ``run_dir``; the caller waits or signals it."""
    cmd = [sys.executable, "-m", "mha_lightning.train", *overrides, f"hydra.run.dir={run_dir}"]
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        cmd, cwd=run_dir.parent, env=cli_env(run_dir.parent), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
