"""EMA of the weights (module.ema) on one device: the recurrence, checkpoints, exact resume, validation and
mha-eval --weights. Sharded: tests/cli/test_translation_cli.py."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from helpers.config import QUIET
from mha_lightning import evaluate
from mha_lightning.checkpoints import CheckpointError
from mha_lightning.config import instantiate
from mha_lightning.ema import EMA_PREFIX, buffer_name
from mha_lightning.errors import ConfigError
from mha_lightning.train import train

DECAY = 0.7  # far from 1: a few steps move the average visibly
RUN = [*QUIET, "logger=none", "test=false", "data.num_train=300", "data.num_val=24", f"module.ema.decay={DECAY}"]


class WeightsAfterEachStep(L.Callback):
    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append({n: p.detach().clone() for n, p in pl_module.model.named_parameters()})


def ema_of(checkpoint: dict) -> dict[str, torch.Tensor]:
    return {k[len(EMA_PREFIX) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(EMA_PREFIX)}


def test_the_average_follows_its_recurrence_and_is_saved(make_cfg, tmp_path, caplog):
    cfg = make_cfg(*RUN, "trainer.max_steps=4", "trainer.val_check_interval=4")
    L.seed_everything(cfg.seed)
    module = instantiate(cfg.module, model=instantiate(cfg.model), _convert_="partial")
    initial = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    recorder = WeightsAfterEachStep()
    trainer = instantiate(cfg.trainer, callbacks=[recorder], logger=False, enable_checkpointing=False)
    with caplog.at_level("INFO"):
        trainer.fit(module, datamodule=instantiate(cfg.data))
    assert any("with the EMA weights (module.ema.decay=0.7)" in r.getMessage() for r in caplog.records)
    expected = initial
    for weights in recorder.steps:
        expected = {n: DECAY * expected[n] + (1 - DECAY) * weights[n] for n in expected}
    path = tmp_path / "ema.ckpt"
    trainer.save_checkpoint(path)
    saved = ema_of(torch.load(path, weights_only=True))
    assert saved.keys() == {buffer_name(n) for n in expected}
    for name, value in expected.items():
        torch.testing.assert_close(saved[buffer_name(name)], value, atol=1e-6, rtol=1e-5, msg=name)
        # The model itself holds the trained weights after validation, not the average.
        torch.testing.assert_close(module.model.get_parameter(name), recorder.steps[-1][name], atol=0, rtol=0)
    assert any(not torch.allclose(expected[n], recorder.steps[-1][n]) for n in expected)


def test_resume_continues_the_average_exactly(make_cfg, tmp_path):
    whole = make_cfg(*RUN, "trainer.max_steps=6", "trainer.val_check_interval=3")
    train(whole)
    first = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)

    part = make_cfg(*RUN, "trainer.max_steps=3", "trainer.val_check_interval=3")
    part.paths.output_dir = str(tmp_path / "part")
    train(part)
    resumed = make_cfg(*RUN, "trainer.max_steps=6", "trainer.val_check_interval=3", "resume=auto")
    resumed.paths.output_dir = str(tmp_path / "part")
    train(resumed)
    second = torch.load(tmp_path / "part" / "checkpoints" / "last.ckpt", weights_only=True)
    assert second["global_step"] == first["global_step"] == 6
    a, b = ema_of(first), ema_of(second)
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=0, rtol=0, msg=key)


def test_validation_scores_the_average_and_mha_eval_selects_either(make_cfg, tmp_path):
    metrics = train(make_cfg(*RUN, "trainer.max_steps=5", "trainer.val_check_interval=5"))
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    default = evaluate.run([str(ckpt), "--split", "val", "--output", str(tmp_path / "d.txt")])
    ema = evaluate.run([str(ckpt), "--split", "val", "--weights", "ema", "--output", str(tmp_path / "e.txt")])
    raw = evaluate.run([str(ckpt), "--split", "val", "--weights", "raw", "--output", str(tmp_path / "r.txt")])
    assert default["weights"] == "ema" and raw["weights"] == "raw"
    assert ema["val/loss"] == pytest.approx(metrics["val/loss"], rel=1e-5)
    assert default["val/loss"] == ema["val/loss"]
    assert raw["val/loss"] != pytest.approx(ema["val/loss"], rel=1e-4)


def test_ema_weights_of_a_run_without_them_are_refused(make_cfg, tmp_path):
    train(make_cfg(*QUIET, "logger=none", "test=false", "data.num_train=100", "trainer.max_steps=1"))
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    with pytest.raises(CheckpointError, match="holds no EMA weights"):
        evaluate.run([str(ckpt), "--weights", "ema", "--output", str(tmp_path / "x.txt")])


@pytest.mark.parametrize("decay", [0, 1, 1.5, -0.1])
def test_a_decay_outside_zero_one_is_one_line(make_cfg, decay):
    cfg = make_cfg(f"module.ema.decay={decay}")
    with pytest.raises(ConfigError, match=r"module.ema.decay must be a number in \(0, 1\)") as error:
        instantiate(cfg.module, model=instantiate(cfg.model), _convert_="partial")
    assert "\n" not in str(error.value)
