"""The sweep report and the W&B workspace on a real 2-job multirun: `mha-train -m` run in this process
(Hydra's real sweeper, launcher and callbacks; real offline wandb), then its report read back from the CSV,
the Markdown, the PNG and the report's W&B run, and a running or failed sweep reported from the same files."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from helpers.wandb_offline import find_run_files, read_history, read_run_info
from mha_lightning import dashboard, sweep_report
from mha_lightning.dashboard import collapse_key, entropy_keys, heatmap_key
from mha_lightning.kinds import ATTENTION_KINDS
from mha_lightning.sweep_report import JOB_STATE_FILE, REPORT_CSV, REPORT_MD, REPORT_PNG, SweepReportCallback

SWEEP = [
    "model.num_heads=2,4",
    "+optimized_metric=val/loss",
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
    "data.num_train=256",
    "data.num_val=32",
    "test=false",
    "callbacks=none",
    "logger=wandb",
    "monitor.render_plots=false",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """`mha-train -m SWEEP` in this process: 2 jobs of the tiny model, 2 steps each, offline W&B."""
    import torch
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from mha_lightning import train

    tmp = tmp_path_factory.mktemp("sweep")
    folder = tmp / "multirun"
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        # No requirements.txt per W&B run: scanning every installed package costs ~1 s of CPU per run.
        env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off"}
        for var, value in {**env, "WANDB_X_SAVE_REQUIREMENTS": "false"}.items():
            mp.setenv(var, value)
        for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
            mp.setenv(var, str(tmp / "wandb_home"))
        mp.setenv("MHA_LOG_DIR", str(tmp / "logs"))
        mp.setattr(sys, "argv", ["mha-train", "-m", *SWEEP, f"hydra.sweep.dir={folder}"])
        torch.set_num_threads(1)
        try:
            train.main()
        finally:
            # Hydra's app leaves its singletons and the job's logging set up: later tests compose their own.
            torch.set_num_threads(threads)
            GlobalHydra.instance().clear()
            HydraConfig.instance().cfg = None
            root.handlers[:], root.level = handlers, level
    return folder


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_report_of_a_finished_sweep_table_best_job_figure_and_wandb(sweep):
    metrics = {job: json.loads((sweep / job / "metrics.json").read_text()) for job in ("0", "1")}
    # What the sweeper saw: the best val/loss of each run (optimized_metric; lower is better).
    objective = {job: m["val/loss_best"] for job, m in metrics.items()}
    best = min(objective, key=objective.get)

    # Written by the Hydra callback when the multirun ended.
    rows = read_csv(sweep / REPORT_CSV)
    assert [(r["job"], r["status"], r["model.num_heads"]) for r in rows] == [
        ("0", "finished", "2"),
        ("1", "finished", "4"),
    ]
    for row in rows:
        assert float(row["val/loss"]) == objective[row["job"]]
        assert float(row["val/acc"]) == metrics[row["job"]]["val/acc"]
        assert row["best"] == str(row["job"] == best)
        assert "model.num_heads=" in row["overrides"] and row["error"] == ""
    for job in ("0", "1"):
        assert json.loads((sweep / job / JOB_STATE_FILE).read_text()) == {"status": "finished"}

    md = (sweep / REPORT_MD).read_text()
    assert "Partial results" not in md
    assert "2 jobs: 2 finished (of 2 planned; the sweep has finished)" in md
    assert "`val/loss`, lower is better (metric from optimized_metric, direction inferred from the name)" in md
    num_heads = {"0": 2, "1": 4}[best]
    assert f"**Best job: {best}** (model.num_heads={num_heads}): val/loss = {objective[best]:.4g}" in md
    assert f"| **{best}** | finished | {num_heads} | {objective[best]:.4g} |" in md
    assert f"![val/loss against each swept value]({REPORT_PNG})" in md
    png = (sweep / REPORT_PNG).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width = int.from_bytes(png[16:20], "big")
    assert width == 630  # one subplot (one swept key) of 4.2 in at 150 dpi

    # The report's own W&B run, in the sweep's group (the sweep folder's name: logger.wandb.group is null).
    (run_file,) = find_run_files(sweep / "wandb")
    info = read_run_info(run_file)
    assert (info["group"], info["job_type"], info["project"]) == (sweep.name, "sweep-report", "mha_lightning")
    (row,) = [r for r in read_history(run_file) if "sweep/report" in r]
    assert row["sweep/objective"]["_type"] == "image-file"
    logged = json.loads((run_file.parent / "files" / row["sweep/report"]["path"]).read_text())
    columns = logged["columns"]
    assert columns[:5] == ["job", "status", "best", "model.num_heads", "val/loss"]
    assert [r[:5] for r in logged["data"]] == [
        [job, "finished", job == best, {"0": "2", "1": "4"}[job], objective[job]] for job in ("0", "1")
    ]


def test_workspace_of_the_sweep_covers_every_logged_head_and_the_swept_values(sweep, tmp_path):
    out = tmp_path / "workspace.json"
    assert dashboard.main([str(sweep), "--dry-run", "--output", str(out)]) == 0
    spec = json.loads(out.read_text())
    assert spec["type"] == "Workspace" and spec["project"] == "mha_lightning"

    # What the jobs logged to W&B, read back from their offline run files.
    logged, configs = set(), []
    for job in ("0", "1"):
        (run_file,) = find_run_files(sweep / job / "wandb")
        logged |= {k for row in read_history(run_file) for k in row}
        configs.append(read_run_info(run_file)["config"])

    (sweep_section,) = [s for s in spec["sections"] if s["name"].startswith("Sweep")]
    (coords,) = [p for p in sweep_section["panels"] if p["type"] == "ParallelCoordinatesPlot"]
    config_column, objective_column = coords["columns"]
    assert config_column["metric"] == {"type": "Config", "name": "run_config.model.num_heads"}
    assert objective_column["metric"] == {"type": "SummaryMetric", "name": "val/loss"}
    # The column's config key is where the jobs' W&B config holds the swept value.
    assert [c["run_config"]["model"]["num_heads"] for c in configs] == [2, 4]

    # One line plot per kind x layer x split x (raw, normalised), all 4 heads (the larger job's) as lines.
    plots = [p for p in dashboard.panels(spec) if p["type"] == "LinePlot" and "attn_entropy" in p["y"][0]]
    want = [
        entropy_keys(kind, layer, 4, split, normalised)
        for kind in ATTENTION_KINDS
        for layer in range(2)
        for split in ("train", "val")
        for normalised in (False, True)
    ]
    assert sorted(p["y"] for p in plots) == sorted(want)
    assert all(key in logged for keys in want for key in keys)
    panels = dashboard.panels(spec)
    media = {k for p in panels if p["type"] == "MediaBrowser" for k in p["media_keys"]}
    assert {heatmap_key("train"), heatmap_key("val")} <= media and {heatmap_key("train"), heatmap_key("val")} <= logged
    collapse = {k for p in panels if p["type"] == "LinePlot" for k in p["y"] if k.startswith("attn_collapse/")}
    assert collapse == {collapse_key(s, k) for s in ("train", "val") for k in ATTENTION_KINDS} and collapse <= logged


def test_report_of_a_running_then_dead_sweep_and_of_a_failed_job(sweep, tmp_path, capsys):
    copy = tmp_path / "multirun"
    shutil.copytree(sweep, copy, ignore=shutil.ignore_patterns("wandb", "sweep_report.*"))
    # Job 1 as it is before its end: no metrics.json (mha-train writes it last), no end note.
    (copy / "1" / "metrics.json").unlink()
    (copy / "1" / JOB_STATE_FILE).unlink()

    sweep_report.note_sweep_process(copy, pid=os.getpid())  # the sweep process, alive
    assert sweep_report.main([str(copy), "--no-wandb"]) == 0
    assert "2 jobs: 1 finished, 1 running (of 2 planned; the sweep is running)" in capsys.readouterr().out
    rows = read_csv(copy / REPORT_CSV)
    assert [(r["job"], r["status"], r["best"]) for r in rows] == [("0", "finished", "True"), ("1", "running", "False")]
    assert rows[1]["val/loss"] == ""
    md = (copy / REPORT_MD).read_text()
    assert "**Partial results**" in md and "**Best job: 0**" in md and "| 1 | running | 4 |" in md

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    sweep_report.note_sweep_process(copy, pid=int(dead.stdout))  # a sweep process that has gone
    assert sweep_report.main([str(copy), "--no-wandb"]) == 0
    (_, job1) = read_csv(copy / REPORT_CSV)
    assert (job1["status"], job1["error"]) == ("failed", "the sweep process ended before this job finished")

    # The callback at a failed job's end: its note names the error, and the report is written at once.
    sweep_report.note_sweep_process(copy, pid=os.getpid())
    (copy / REPORT_CSV).unlink()
    from hydra.core.utils import JobReturn, JobStatus
    from hydra.types import RunMode

    config = OmegaConf.create(
        {"hydra": {"mode": RunMode.MULTIRUN, "runtime": {"output_dir": str(copy / "1")}, "sweep": {"dir": str(copy)}}}
    )
    failed = JobReturn(status=JobStatus.FAILED, _return_value=RuntimeError("collective timed out\nmore"))
    SweepReportCallback().on_job_end(config=config, job_return=failed)
    (_, job1) = read_csv(copy / REPORT_CSV)
    assert (job1["status"], job1["error"]) == ("failed", "RuntimeError: collective timed out")
    assert math.isfinite(float(read_csv(copy / REPORT_CSV)[0]["val/loss"]))


def test_report_of_a_folder_that_is_no_sweep_is_one_line(tmp_path, capsys):
    assert sweep_report.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {tmp_path} is not a Hydra multirun folder (no multirun.yaml)")
    assert dashboard.main([str(tmp_path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {tmp_path} holds neither .hydra/config.yaml nor multirun.yaml")
