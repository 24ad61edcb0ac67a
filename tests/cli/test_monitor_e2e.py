"""The entropy monitor end to end: tp=2 and dp=2 runs (real gloo processes, real offline
wandb) report the same per-head values as one device, each head exactly once."""

from __future__ import annotations

import csv
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.config import compose_train_config
from helpers.runs import cli_env
from helpers.wandb_offline import find_run_files, read_history
from mha_lightning.monitor.record import load_entropy_csv, record_path
from mha_lightning.train import train

KINDS, LAYERS, HEADS = ("enc_self", "dec_self", "cross"), 2, 4
COMMON = [
    "model=tiny",
    "data=reverse",
    "data.num_train=2000",
    "trainer.max_steps=10",
    "trainer.val_check_interval=10",
    "trainer.log_every_n_steps=5",
    "monitor.every_n_steps=5",
    "test=false",
    "seed=3",
    "callbacks=none",
]


def read_entropy_csv(run_dir: Path) -> dict[tuple, tuple[float, float]]:
    with (run_dir / "attention_entropy.csv").open() as f:
        rows = list(csv.DictReader(f))
    out = {}
    for r in rows:
        key = (int(r["step"]), r["split"], r["kind"], int(r["layer"]), int(r["head"]))
        assert key not in out, f"head reported twice: {key}"
        norm = float(r["entropy_norm"]) if r["entropy_norm"] else math.nan
        out[key] = (float(r["entropy"]), norm)
    return out


def read_importance_csv(run_dir: Path) -> dict[tuple, float]:
    with (run_dir / "head_importance.csv").open() as f:
        rows = list(csv.DictReader(f))
    out = {}
    for r in rows:
        key = (int(r["step"]), r["split"], r["kind"], int(r["layer"]), int(r["head"]))
        assert key not in out, f"head reported twice: {key}"
        out[key] = float(r["importance"])
    return out


def assert_same_importance(got: dict, want: dict) -> None:
    # Every head once per validation: the sanity check's at step 0 (the initial model), and step 10's.
    assert got.keys() == want.keys() and len(want) == 2 * len(KINDS) * LAYERS * HEADS
    assert {k[:2] for k in want} == {(0, "val"), (10, "val")}
    for key, value in want.items():
        assert value > 0 and got[key] == pytest.approx(value, rel=1e-4, abs=1e-7), (key, got[key], value)


def run_cli(run_dir: Path, tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mha_lightning.train", *COMMON, *overrides, f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=cli_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One device, global batch 64."""
    tmp = tmp_path_factory.mktemp("tp1")
    cfg = compose_train_config(tmp / "run", [*COMMON, "logger=none"])
    train(cfg)
    return {"entropy": read_entropy_csv(tmp / "run"), "importance": read_importance_csv(tmp / "run")}


def assert_same_entropies(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    steps = sorted({(k[0], k[1]) for k in want})
    assert (0, "train") in steps and (5, "train") in steps and (10, "val") in steps
    for key, (h, n) in want.items():
        gh, gn = got[key]
        assert abs(gh - h) <= 1e-5, (key, gh, h)
        assert (math.isnan(gn) and math.isnan(n)) or abs(gn - n) <= 1e-5, (key, gn, n)


@pytest.mark.slow
def test_tp2_reports_every_head_once_equal_to_one_device_and_in_wandb(reference, tmp_path):
    run_dir = tmp_path / "tp2"
    run_cli(run_dir, tmp_path, "trainer.devices=2", "parallel.tensor_parallel_size=2", "logger=wandb")
    got = read_entropy_csv(run_dir)
    assert_same_entropies(got, reference["entropy"])
    assert_same_importance(read_importance_csv(run_dir), reference["importance"])
    # Each (step, split) reports 3 kinds x 2 layers x 4 heads, each exactly once.
    per_step = {}
    for step, split, *_ in got:
        per_step[(step, split)] = per_step.get((step, split), 0) + 1
    assert set(per_step.values()) == {len(KINDS) * LAYERS * HEADS}

    (run_file,) = find_run_files(run_dir)
    history = read_history(run_file)
    expected = {f"attn_entropy/{k}/L{layer}/H{h}" for k in KINDS for layer in range(LAYERS) for h in range(HEADS)}
    expected |= {key.replace("attn_entropy/", "attn_entropy_norm/") for key in expected}
    expected |= {f"val_{key}" for key in expected}
    importance = {
        f"val_head_importance/{k}/L{layer}/H{h}" for k in KINDS for layer in range(LAYERS) for h in range(HEADS)
    }
    expected |= importance
    logged = {}
    for row in history:
        for key, value in row.items():
            if key in expected:
                logged.setdefault(key, []).append(value)
    assert set(logged) == expected
    max_len = 12 + 1  # longest source (data.max_len) plus EOS
    for key in importance:  # each validation's numbers, as the record holds them
        kind, layer, head = key.split("/")[1:]
        want = [reference["importance"][(step, "val", kind, int(layer[1:]), int(head[1:]))] for step in (0, 10)]
        assert logged.pop(key) == [pytest.approx(v, rel=1e-4, abs=1e-7) for v in want], key
    for key, values in logged.items():
        hi = 1.0 if "_norm/" in key else math.log(max_len)
        assert all(math.isfinite(v) and 0.0 <= v <= hi + 1e-6 for v in values), (key, values)
    # A heatmap image per attention type at each interval, and the final table.
    heatmaps = [row["attn_heatmap/train"] for row in history if "attn_heatmap/train" in row]
    assert heatmaps and all(h["_type"] == "images/separated" and h["count"] == 3 for h in heatmaps)
    assert any("attn_entropy/final" in row for row in history)


@pytest.mark.slow
def test_dp2_gives_the_mean_over_all_data(reference, tmp_path):
    """dp=2 with 32 examples per rank sees the same global batches as one device with 64."""
    run_dir = tmp_path / "dp2"
    run_cli(
        run_dir, tmp_path, "trainer.devices=2", "parallel.data_parallel_size=2", "data.batch_size=32", "logger=none"
    )
    assert_same_entropies(read_entropy_csv(run_dir), reference["entropy"])
    assert_same_importance(read_importance_csv(run_dir), reference["importance"])


def test_monitor_disabled_logs_nothing_and_keeps_fast_path(make_cfg, tmp_path):
    cfg = make_cfg(*COMMON, "monitor.enabled=false", "logger=wandb")
    train(cfg)
    run_dir = tmp_path / "run"
    assert not (run_dir / "attention_entropy.csv").exists() and not (run_dir / "head_importance.csv").exists()
    (run_file,) = find_run_files(run_dir)
    keys = {k for row in read_history(run_file) for k in row}
    assert "train/loss" in keys
    assert not [k for k in keys if "attn_" in k or "head_importance" in k]


def test_collapse_warning_names_the_head(make_cfg, tmp_path, caplog):
    # Threshold 1 (the largest valid one) marks every head whose normalised entropy ever fell below 1,
    # i.e. nearly all: one warning per such head, not per interval, naming it.
    cfg = make_cfg(*COMMON, "monitor.collapse_threshold=1.0", "logger=none")
    with caplog.at_level("WARNING", logger="mha_lightning.monitor.callback"):
        train(cfg)
    warnings = [r.getMessage() for r in caplog.records if "entropy collapse" in r.getMessage()]
    warned = [tuple(m.groups()) for m in (re.search(r"collapse: (\w+) layer (\d+) head (\d+)", w) for w in warnings)]
    table = load_entropy_csv(record_path(Path(cfg.paths.output_dir)))
    below = {
        (k, str(la), str(h))
        for k, la, h, v in zip(table.kind, table.layer, table.head, table.entropy_norm, strict=True)
        if v < 1.0
    }
    assert sorted(warned) == sorted(below)  # each head once, exactly those under the threshold
    assert len(below) >= len(KINDS) * LAYERS * HEADS - 2
