"""SIGUSR1 (SLURM's --signal notice) saves the current step and exits 143; resuming continues exactly.
SIGTERM takes the same path; tests/cli/test_sharded_cli.py sends it to a tp=2 run."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import torch

from helpers.config import QUIET
from helpers.runs import csv_train_rows, start_mha_train

COMMON = [
    *QUIET,
    "logger=csv",
    "trainer.log_every_n_steps=1",
    "data.num_val=16",
    "data.num_test=16",
    "trainer.val_check_interval=1000",
    "test=false",
    "model.dropout=0.1",
]


def mha_train(run_dir: Path, *overrides: str) -> subprocess.Popen:
    return start_mha_train(run_dir, *COMMON, *overrides)


def test_sigusr1_saves_the_current_step_and_the_resume_continues_exactly(tmp_path):
    run = tmp_path / "run"
    proc = mha_train(run, "trainer.max_steps=100000")
    metrics = run / "csv" / "version_0" / "metrics.csv"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(csv_train_rows(run)) < 15:  # CSV rows land every 10 steps
        time.sleep(0.5)
    assert metrics.exists(), "the run never started logging"
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]
    last = run / "checkpoints" / "last.ckpt"
    assert "stopped by SIGUSR1 at step" in line and str(last) in line, line
    step = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    assert step == int(line.split("at step ")[1].split(";")[0]) and step >= 10

    # Resume to step + 5, and compare with a run that was never interrupted. Both validate (and so
    # checkpoint) at the end: ModelCheckpoint must overwrite last.ckpt, which it did not write itself.
    until = [f"trainer.max_steps={step + 5}", f"trainer.val_check_interval={step + 5}"]
    resumed = mha_train(run, *until, f"ckpt_path={last}")
    reference = mha_train(tmp_path / "reference", *until)
    for p in (resumed, reference):
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    full, after = csv_train_rows(tmp_path / "reference"), csv_train_rows(run, version=1)
    assert sorted(after) == list(range(step, step + 5))
    for s in range(step, step + 5):
        assert after[s] == full[s], f"step {s}: resumed {after[s]} != uninterrupted {full[s]}"
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == step + 5
    assert sorted(p.name for p in last.parent.glob("last*")) == ["last.ckpt"]
