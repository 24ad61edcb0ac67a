"""Optuna sweeps through the real CLI: tp=2 trials launched by submitit (one task per device), and a
diverging trial that reports the worst value instead of ending the sweep."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers.config import QUIET
from helpers.runs import cli_env
from helpers.wandb_offline import find_run_files, read_history, read_run_info, read_summary
from mha_lightning.train import METRICS_FILE

TP2 = ["trainer.devices=2", "parallel.tensor_parallel_size=2"]
# Two validations per trial (steps 3 and 6): the objective is the better of the two. No checkpoints (time).
SHORT = ["trainer.max_steps=6", "trainer.val_check_interval=3", "test=false", "data.num_val=50", "callbacks=none"]


def mha_train_sweep(tmp_path: Path, *overrides: str, timeout: int = 480) -> subprocess.CompletedProcess:
    flags = [o for o in overrides if o.startswith("-")]  # -m goes before the overrides
    rest = [o for o in overrides if not o.startswith("-")]
    cmd = [sys.executable, "-m", "mha_lightning.train", *flags, *QUIET, *rest, f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=cli_env(tmp_path), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def processes_naming(marker: str) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline and pid != str(os.getpid()):
            found.append(f"{pid}: {cmdline}")
    return found


@pytest.mark.slow
def test_optuna_sweep_of_tp2_trials_through_submitit_local(tmp_path):
    sweep = tmp_path / "sweep"
    proc = mha_train_sweep(
        tmp_path,
        "hparams_search=lr_warmup_dropout",
        "hydra/launcher=submitit_local",
        "hydra.sweeper.n_trials=2",
        *TP2,
        *SHORT,
    )
    # One study, in the launching process: no task started a sweep of its own.
    assert (proc.stdout + proc.stderr).count("A new study created") == 1
    assert {"0", "1", "optimization_results.yaml"} <= {p.name for p in sweep.iterdir()}
    assert not (sweep / "2").exists()
    # The sweep report (Hydra callback) is written for a submitit-launched Optuna sweep too.
    report = (sweep / "sweep_report.md").read_text()
    assert "val/loss" in report and "Best job" in report, proc.stderr[-2000:]

    best = {}
    for job in ("0", "1"):
        d = sweep / job
        overrides = yaml.safe_load((d / ".hydra" / "overrides.yaml").read_text())
        # Both submitit tasks were ranks of one tp=2 run, started by submitit, not relaunched.
        assert sorted(p.name for p in (d / ".ranks").iterdir()) == ["rank-0.json", "rank-1.json"]
        assert not (d / "job_config.yaml").exists()
        metrics = json.loads((d / METRICS_FILE).read_text())

        # One W&B run per trial (rank 0 only), grouped under the search, its overrides as tags and config.
        (run_file,) = find_run_files(d / "wandb")
        info = read_run_info(run_file)
        assert info["group"] == "lr_warmup_dropout"
        assert info["config"]["sweep"] == {"group": "lr_warmup_dropout", "job": int(job), "overrides": overrides}
        lr = next(o for o in overrides if o.startswith("module.optimizer.lr="))
        assert lr in info["tags"] and "trainer.devices=2" in info["tags"]
        assert info["config"]["run_config"]["module"]["optimizer"]["lr"] == float(lr.split("=", 1)[1])
        assert info["config"]["run_config"]["parallel"]["tensor_parallel_size"] == 2

        # The objective is the best of the trial's validations (here: the lower val/loss).
        val = [row["val/loss"] for row in read_history(run_file) if "val/loss" in row]
        assert len(val) == 2 and all(math.isfinite(v) for v in val)
        assert metrics["val/loss_best"] == min(val)
        assert read_summary(run_file)["val/loss_best"] == min(val)
        best[job] = (min(val), lr)

    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    value, lr = min(best.values())
    assert results["best_value"] == value
    assert f"module.optimizer.lr={results['best_params']['module.optimizer.lr']}" == lr
    assert not processes_naming(str(sweep))


@pytest.mark.slow
def test_a_diverging_trial_reports_the_worst_value_and_the_sweep_goes_on(tmp_path):
    sweep = tmp_path / "sweep"
    # TPE with seed 0 draws lr 1e-3 and then 1e30 (fixed warmup and dropout: lr is the only parameter drawn).
    proc = mha_train_sweep(
        tmp_path,
        "-m",
        "hparams_search=lr_warmup_dropout",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.sampler.seed=0",
        "module.optimizer.lr=choice(1e30,1e-3)",
        "module.scheduler.warmup_steps=1",
        "model.dropout=0.0",
        "logger=csv",
        "callbacks=none",
        "trainer.max_steps=2",
        "trainer.val_check_interval=1",
        "test=false",
        "data.num_val=20",
    )
    out = proc.stdout + proc.stderr
    lrs = {
        job: next(o for o in yaml.safe_load((sweep / job / ".hydra" / "overrides.yaml").read_text()) if "lr=" in o)
        for job in ("0", "1")
    }
    assert sorted(lrs.values()) == ["module.optimizer.lr=0.001", "module.optimizer.lr=1e+30"]
    diverged = next(job for job, lr in lrs.items() if lr.endswith("1e+30"))
    assert "error: the training loss is nan at step" in out
    assert "sweep job failed: the training loss is nan at step" in out and "it reports inf" in out
    assert not (sweep / diverged / METRICS_FILE).exists()

    good = next(job for job in lrs if job != diverged)
    best = json.loads((sweep / good / METRICS_FILE).read_text())["val/loss_best"]
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["best_value"] == best and math.isfinite(best)
    assert results["best_params"]["module.optimizer.lr"] == 1e-3
    # The sweep report marks the diverged trial failed and picks the good one.
    report = {row["job"]: row for row in csv.DictReader((sweep / "sweep_report.csv").open())}
    assert (report[diverged]["status"], report[good]["status"]) == ("failed", "finished")
    assert "diverged" in report[diverged]["error"] and report[good]["best"] == "True"
