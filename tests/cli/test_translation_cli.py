"""Issue 24's options in one tensor-parallel (tp=2) run through the real CLI: token batches, gradient accumulation,
EMA weights sharded like the weights, the newest step checkpoints kept, and mha-average over sharded folders
read by mha-eval and mha-analyze. Two gloo processes, so a subprocess (Lightning re-runs sys.argv)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers.config import QUIET
from helpers.runs import cli_env
from mha_lightning import averaging, evaluate
from mha_lightning.checkpoints import load_sharded_checkpoint
from mha_lightning.ema import EMA_PREFIX, buffer_name

pytestmark = pytest.mark.slow

RUN = [
    *QUIET,
    "logger=csv",
    "test=false",
    "trainer.devices=2",
    "parallel.tensor_parallel_size=2",
    "data.num_train=400",
    "data.num_val=40",
    "data.batch_size=null",
    "data.max_tokens=120",
    "data.eval_batch_size=20",
    "trainer.accumulate_grad_batches=2",
    "trainer.max_steps=6",
    "trainer.val_check_interval=3",
    "trainer.log_every_n_steps=1",
    "module.ema.decay=0.8",
    "callbacks.model_checkpoint.monitor=step",
    "callbacks.model_checkpoint.mode=max",
    "callbacks.model_checkpoint.save_top_k=2",
    "+callbacks.model_checkpoint.every_n_train_steps=2",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("tp2") / "run"
    cmd = [sys.executable, "-m", "mha_lightning.train", *RUN, f"hydra.run.dir={run}"]
    done = subprocess.run(
        cmd, cwd=run.parent, env=cli_env(run.parent), capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (run / "stdout.txt").write_text(done.stdout + done.stderr)
    return run


def test_the_run_counts_optimizer_steps_and_logs_its_token_batches(run_dir):
    log = (run_dir / "stdout.txt").read_text() + (run_dir / "train.log").read_text()
    assert "token batches (data.max_tokens=120 per replica)" in log
    assert "validating and testing with the EMA weights (module.ema.decay=0.8)" in log
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["last.ckpt", "step000004.ckpt", "step000006.ckpt"]  # the newest two step checkpoints


def test_ema_weights_are_saved_sharded_like_the_weights(run_dir):
    checkpoint = load_sharded_checkpoint(run_dir / "checkpoints" / "step000006.ckpt")
    state = checkpoint["state_dict"]
    weights = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
    averages = {k[len(EMA_PREFIX) :]: v for k, v in state.items() if k.startswith(EMA_PREFIX)}
    assert averages
    for name, average in averages.items():
        (owner,) = [n for n in weights if buffer_name(n) == name]
        assert average.shape == weights[owner].shape, name  # whole tensors, gathered from both tp ranks
    assert any(
        not torch.allclose(averages[buffer_name(n)], w) for n, w in weights.items() if buffer_name(n) in averages
    )


def test_averaging_sharded_folders_gives_a_file_mha_eval_and_mha_analyze_read(run_dir, tmp_path):
    out = tmp_path / "avg.ckpt"
    assert averaging.main([str(run_dir), "--last", "2", "--output", str(out)]) == 0
    averaged = torch.load(out, weights_only=True)["state_dict"]
    a, b = (load_sharded_checkpoint(run_dir / "checkpoints" / f"step00000{s}.ckpt")["state_dict"] for s in (4, 6))
    for key, value in averaged.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, ((a[key].double() + b[key].double()) / 2).float(), atol=0, rtol=0)
    for weights in ("ema", "raw"):
        scores = evaluate.run([str(out), "--split", "val", "--weights", weights, "--output", str(tmp_path / "h.txt")])
        assert scores["n"] == 40 and scores["weights"] == weights
    cmd = [sys.executable, "-m", "mha_lightning.analysis.cli", f"ckpt={out}", "examples=20", "prune.points=3"]
    cmd += ["prune.random_orders=1", "maps.examples=1", f"hydra.run.dir={tmp_path / 'analysis'}"]
    done = subprocess.run(cmd, cwd=tmp_path, env=cli_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "analysis" / "results.json").read_text())["statistics"]["examples"] == 20
