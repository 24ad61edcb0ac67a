"""scripts/bench_train.py: its --quick mode end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_train.py"


def test_quick_mode_writes_every_field_with_positive_ratios(tmp_path):
    out = tmp_path / "bench.json"
    command = [sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--out", str(out)]
    command += ["--steps", "2", "--sweep-seq", "8", "16", "--sweep-heads", "1", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, check=True, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    report = json.loads(out.read_text())
    results = report["results"]
    assert set(results) == {
        "baseline",
        "package, untied",
        "package",
        "lightning",
        "lightning, bare loop",
        "lightning + data",
    }
    assert results["baseline"]["params"] == results["package, untied"]["params"]
    for name, row in results.items():
        for key in ("step_ms", "tokens_per_s", "vs_baseline", "gflops_per_s", "mfu"):
            assert row[key] > 0, (name, key, row[key])
    assert results["baseline"]["vs_baseline"] == 1.0
    assert 0 <= results["lightning + data"]["between_steps_fraction"] < 1
    assert results["lightning + data"]["dataloader_ms_per_batch"] > 0
    assert report["peak_gflops_per_s"] > 0 and report["train_flops_per_step"] > 0
    # MFU pairs each round's rate with the peak measured beside it in that round.
    peaks, package = report["peak_gflops_per_s_by_round"], results["package"]
    assert len(peaks) == len(package["step_ms_by_round"]) == 2 and min(peaks) > 0
    paired = sorted(
        report["train_flops_per_step"] / (ms / 1e3) / 1e9 / peak
        for ms, peak in zip(package["step_ms_by_round"], peaks, strict=True)
    )
    assert abs(package["mfu"] - (paired[0] + paired[1]) / 2) < 1e-9
    assert report["best_peak_gflops_per_s"] >= max(peaks)
    assert package["mfu_vs_best_peak"] == package["gflops_per_s"] / report["best_peak_gflops_per_s"]
    assert [row["seq_len"] for row in report["growth"]["seq_len"]] == [8, 16]
    assert [row["num_heads"] for row in report["growth"]["num_heads"]] == [1, 4]
    # Every swept shape beside the baseline, and the eager bar read over all of them.
    rows = report["growth"]["seq_len"] + report["growth"]["num_heads"]
    for row in rows:
        assert row["vs_baseline"] == row["baseline_step_ms"] / row["step_ms"] > 0
    swept = report["targets"]["eager >= 1.0x baseline on every swept shape"]
    assert swept["value"] == min(row["vs_baseline"] for row in rows) and swept["met"] == (swept["value"] >= 1)
    assert set(report["targets"]) >= {"eager >= 1.0x baseline", "MFU >= 60%", "Lightning overhead <= 5%"}
    # How far the numbers can be trusted: each contender's spread between its rounds, and the load; the
    # console says the largest spread.
    spread = report["noise"]["round_spread"]
    assert set(spread) == set(results) and report["noise"]["max_round_spread"] == max(spread.values())
    assert {"load_before", "load_after"} <= set(report["noise"])
    assert f"spread up to {report['noise']['max_round_spread']:.0%}" in done.stdout
    assert Path(report["growth_plot"]).stat().st_size > 0
