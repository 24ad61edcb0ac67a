"""A diverging run stops at the first non-finite step (or skips it), and never saves a non-finite checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers.config import QUIET
from mha_lightning.errors import NonFiniteError, report
from mha_lightning.train import METRICS_FILE, train

# lr 1e4 without clipping: the tiny model's loss is non-finite within a few steps.
DIVERGE = [
    *QUIET,
    "logger=none",
    "module.optimizer.lr=1e4",
    "trainer.gradient_clip_val=0",
    "data.num_val=16",
    "data.num_test=16",
    "trainer.max_steps=60",
    "trainer.val_check_interval=2",
]


def checkpoint_tensors_are_finite(folder: Path) -> list[str]:
    """The checkpoint files of a run; asserts every weight in each is finite."""
    names = []
    for path in sorted(folder.glob("*.ckpt")):
        state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
        assert all(torch.isfinite(t).all() for t in state.values()), f"{path.name} holds non-finite weights"
        names.append(path.name)
    return names


def test_a_non_finite_loss_stops_the_run_naming_the_step_and_the_last_good_checkpoint(make_cfg, capsys):
    cfg = make_cfg(*DIVERGE)
    with pytest.raises(NonFiniteError) as info:
        train(cfg)
    message = str(info.value)
    assert "at step" in message and "last good checkpoint:" in message, message
    step = int(message.split("at step ")[1].split(";")[0])
    assert 0 < step < 60
    assert report(info.value) == 3  # the documented exit code
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "at step" in errors[0]  # one line
    saved = checkpoint_tensors_are_finite(Path(cfg.paths.output_dir) / "checkpoints")
    assert saved, "the run validated (and checkpointed) before it diverged"
    assert message.split("last good checkpoint: ")[1].endswith(".ckpt")


def test_skip_drops_the_non_finite_steps_counts_them_and_writes_strict_json(make_cfg):
    cfg = make_cfg(*DIVERGE, "module.on_nonfinite=skip", "test=false")
    metrics = train(cfg)
    assert metrics["train/skipped_steps"] > 0
    run = Path(cfg.paths.output_dir)
    checkpoint_tensors_are_finite(run / "checkpoints")

    def refuse(constant: str) -> None:
        raise AssertionError(f"metrics.json holds a bare {constant}")

    written = json.loads((run / METRICS_FILE).read_text(), parse_constant=refuse)
    assert written["train/skipped_steps"] == metrics["train/skipped_steps"]
