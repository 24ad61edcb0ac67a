"""Mistakes a user can make with configs and checkpoints: one clear error, before training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers.config import QUIET, compose_train_config
from helpers.gradients import assert_value_clipped
from mha_lightning import evaluate
from mha_lightning.errors import CheckpointError, ConfigError
from mha_lightning.train import train

SHORT = [*QUIET, "logger=none", "data.num_train=500", "data.num_val=50", "data.num_test=50"]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """3 steps with validation every 2: the final step is not a validation step."""
    run = tmp_path_factory.mktemp("ckpt") / "run"
    train(compose_train_config(run, [*SHORT, "trainer.max_steps=3", "trainer.val_check_interval=2", "test=false"]))
    return run / "checkpoints" / "last.ckpt"


def test_last_checkpoint_holds_the_final_step(tiny_checkpoint):
    assert torch.load(tiny_checkpoint, weights_only=False)["global_step"] == 3


@pytest.mark.parametrize("key", ["init_from", "ckpt_path"])
def test_checkpoint_of_another_model_is_refused_in_one_line(make_cfg, tiny_checkpoint, key):
    with pytest.raises(CheckpointError) as err:
        train(make_cfg(*SHORT, "model.d_model=32", "model.ffn_dim=64", f"{key}={tiny_checkpoint}"))
    message = str(err.value)
    assert "\n" not in message and "model.d_model: checkpoint 64 vs config 32" in message and key in message


def test_a_file_that_is_no_checkpoint_is_refused(make_cfg, tmp_path):
    not_a_checkpoint = tmp_path / "config.yaml"
    not_a_checkpoint.write_text("seed: 0\n")
    with pytest.raises(CheckpointError, match="config.yaml"):
        train(make_cfg(*SHORT, f"ckpt_path={not_a_checkpoint}"))


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["module.decoding.strategy=bem"], "module.decoding.strategy"),
        (["module.decoding.beam_size=0"], "module.decoding.beam_size"),
        (["module=cosine", "trainer.max_steps=-1", "trainer.max_epochs=2"], "total_steps"),
        (["module.optimizer.lr=-1"], "module.optimizer"),
        (["data.max_len=200"], "data.max_len"),
        (["data.max_tokens=12"], "data.max_tokens"),  # below data.max_len (12) + 1
        (["data.batch_size=null"], "data.batch_size"),  # and data.max_tokens null: no limit at all
        (["module.ema.decay=1.0"], "module.ema.decay"),
        (["trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches"),
    ],
)
def test_bad_training_settings_fail_before_training(make_cfg, overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        train(make_cfg(*SHORT, *overrides))
    assert not (Path(make_cfg().paths.output_dir) / "checkpoints").exists()


def test_value_clipping_trains(make_cfg, tmp_path):
    """trainer.gradient_clip_algorithm=value through the real Trainer: at every step the optimizer
    got gradients clamped elementwise to [-v, v], the elements already inside untouched.
    (tests/unit/test_module.py checks the module's clipping hook on its own.)"""
    clip, steps, recorded = 0.01, 4, tmp_path / "grads.pt"
    metrics = train(
        make_cfg(
            *SHORT,
            f"trainer.max_steps={steps}",
            "trainer.gradient_clip_algorithm=value",
            f"trainer.gradient_clip_val={clip}",
            "test=false",
            "+callbacks.grads._target_=helpers.gradients.GradientRecorder",
            f"+callbacks.grads.path={recorded}",
        )
    )
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    grads = torch.load(recorded, weights_only=False)
    assert len(grads["before"]) == len(grads["after"]) == steps
    for step, (before, after) in enumerate(zip(grads["before"], grads["after"], strict=True)):
        clamped, total = assert_value_clipped(before, after, clip)
        assert 0 < clamped < total, f"step {step}: {clamped} of {total} gradient elements above {clip}"


def test_eval_input_longer_than_the_model_is_truncated_with_a_warning(tiny_checkpoint, tmp_path, capsys):
    lines = tmp_path / "in.txt"
    lines.write_text(" ".join(["5"] * 300) + "\n6 7 8\n")
    assert evaluate.main([str(tiny_checkpoint), "--input", str(lines), "--output", str(tmp_path / "out.txt")]) == 0
    captured = capsys.readouterr()
    assert "1 line(s)" in captured.err and "longer than the model's 127 tokens" in captured.err
    assert json.loads(captured.out)["hypotheses"] == str(tmp_path / "out.txt")
    assert len((tmp_path / "out.txt").read_text().splitlines()) == 2
