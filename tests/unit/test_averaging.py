"""`mha-average` on single-file checkpoints (sharded folders: tests/cli/test_translation_cli.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers.config import QUIET
from helpers.runs import cli_env
from mha_lightning import averaging, evaluate
from mha_lightning.train import train

RUN = [*QUIET, "logger=none", "test=false", "data.num_train=300", "data.num_val=24", "trainer.val_check_interval=4"]
# What experiment=translation keeps: every 2 steps a checkpoint, the newest 3 of them.
KEEP_NEWEST = [
    "callbacks.model_checkpoint.monitor=step",
    "callbacks.model_checkpoint.mode=max",
    "callbacks.model_checkpoint.save_top_k=3",
    "+callbacks.model_checkpoint.every_n_train_steps=2",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    from helpers.config import compose_train_config

    run = tmp_path_factory.mktemp("avg") / "run"
    train(compose_train_config(run, [*RUN, *KEEP_NEWEST, "trainer.max_steps=8", "module.ema.decay=0.9"]))
    return run


def test_training_keeps_the_newest_step_checkpoints(run_dir):
    names = sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt"))
    assert names == ["last.ckpt", "step000004.ckpt", "step000006.ckpt", "step000008.ckpt"]


def test_the_average_is_the_mean_of_the_newest_and_mha_eval_reads_it(run_dir, tmp_path):
    out = tmp_path / "avg.ckpt"
    assert averaging.main([str(run_dir), "--last", "2", "--output", str(out)]) == 0
    averaged = torch.load(out, weights_only=True)
    a, b = (torch.load(run_dir / "checkpoints" / f"step00000{s}.ckpt", weights_only=True) for s in (6, 8))
    assert averaged["global_step"] == 8 and len(averaged["averaged_from"]) == 2
    assert averaged["state_dict"].keys() == a["state_dict"].keys()
    floats = [k for k, v in a["state_dict"].items() if v.is_floating_point()]
    assert any(k.startswith("ema.") for k in floats) and any(k.startswith("model.") for k in floats)
    for key in floats:
        mean = ((a["state_dict"][key].double() + b["state_dict"][key].double()) / 2).float()
        torch.testing.assert_close(averaged["state_dict"][key], mean, atol=0, rtol=0, msg=key)
    assert not torch.equal(averaged["state_dict"][floats[0]], b["state_dict"][floats[0]])
    scores = evaluate.run([str(out), "--split", "val", "--weights", "raw", "--output", str(tmp_path / "h.txt")])
    assert scores["n"] == 24 and scores["val/loss"] > 0


def test_explicit_paths_are_averaged_as_given(run_dir, tmp_path):
    paths = [str(run_dir / "checkpoints" / f"step00000{s}.ckpt") for s in (4, 8)]
    assert averaging.main([*paths, "--output", str(tmp_path / "two.ckpt")]) == 0
    assert torch.load(tmp_path / "two.ckpt", weights_only=True)["averaged_from"] == paths


def mha_average(tmp_path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", "import sys; from mha_lightning.averaging import main; sys.exit(main())", *args]
    return subprocess.run(cmd, cwd=tmp_path, env=cli_env(tmp_path), capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--last", "0"], "error: --last must be at least 1"),
        (["--last", "4"], "error: --last 4: "),
    ],
)
def test_bad_counts_are_one_line(run_dir, tmp_path, args, message):
    done = mha_average(tmp_path, str(run_dir), *args, "--output", str(tmp_path / "x.ckpt"))
    assert done.returncode == 2 and done.stderr.startswith(message) and done.stderr.count("\n") == 1, done.stderr
    assert not (tmp_path / "x.ckpt").exists()


def test_checkpoints_of_different_shapes_are_refused_in_one_line(run_dir, make_cfg, tmp_path):
    train(make_cfg(*RUN, "trainer.max_steps=1", "model.d_model=32", "model.ffn_dim=64"))
    other = tmp_path / "run" / "checkpoints" / "last.ckpt"
    done = mha_average(tmp_path, str(run_dir / "checkpoints" / "step000008.ckpt"), str(other), "--output", "x.ckpt")
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "cannot average checkpoints of different models" in done.stderr and "model.d_model=64" in done.stderr
