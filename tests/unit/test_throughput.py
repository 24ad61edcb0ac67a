"""perf/* in the training log: tokens per second, step time, peak memory and MFU, read back from the CSV
log and checked against the run's own batches."""

from __future__ import annotations

import pytest

from helpers.config import QUIET
from helpers.perf import batches_of, perf_rows
from mha_lightning.monitor.throughput import bf16_peak_tflops
from mha_lightning.train import train

STEPS = 4


def test_every_log_step_reports_the_tokens_time_memory_and_mfu_of_its_batches(make_cfg, tmp_path):
    peak = 0.5  # TFLOP/s: a made-up CPU peak, so that perf/mfu is logged and can be checked
    cfg = make_cfg(
        *QUIET,
        "logger=csv",
        "test=false",
        f"trainer.max_steps={STEPS}",
        "trainer.log_every_n_steps=2",
        "trainer.val_check_interval=100",
        "+trainer.limit_val_batches=0",
        f"callbacks.throughput.peak_tflops={peak}",
    )
    train(cfg)
    run_dir = tmp_path / "run"
    rows = perf_rows(run_dir)
    assert sorted(rows) == [1, 3], rows  # global steps 2 and 4 (the CSV counts from 0)
    batches = batches_of(cfg, STEPS)
    for logged, interval in zip((rows[1], rows[3]), (batches[:2], batches[2:]), strict=True):
        seconds = 2 * logged["perf/step_ms"] / 1e3
        assert logged["perf/tokens_per_s"] * seconds == pytest.approx(sum(t for t, _ in interval), rel=1e-6)
        assert logged["perf/tokens_per_s_per_device"] == logged["perf/tokens_per_s"]  # one device
        assert logged["perf/mfu"] * peak * 1e12 * seconds == pytest.approx(sum(f for _, f in interval), rel=1e-6)
        assert 100 < logged["perf/peak_memory_mib"] < 20_000  # this process's resident peak: torch alone is more


def test_no_mfu_without_a_known_peak():
    import torch

    assert bf16_peak_tflops(torch.device("cpu")) is None
