"""Seq2SeqModule as the config builds it, exercised in-process without a Trainer."""

from __future__ import annotations

import lightning as L
from hydra.utils import instantiate

from helpers.gradients import assert_value_clipped, grads
from mha_lightning.module import Seq2SeqModule, token_loss


def test_value_clipping_clamps_every_gradient_element(make_cfg):
    cfg = make_cfg(
        "logger=none",
        "data.num_train=256",
        "data.num_val=16",
        "data.num_test=16",
        "trainer.gradient_clip_algorithm=value",
        "trainer.gradient_clip_val=0.001",
    )
    L.seed_everything(cfg.seed)
    datamodule = instantiate(cfg.data)
    module = instantiate(cfg.module, model=instantiate(cfg.model), _convert_="partial")
    assert isinstance(module, Seq2SeqModule)
    optimizer = module.configure_optimizers()["optimizer"]

    # A real backward on a training batch, with the training loss.
    batch = next(iter(datamodule.train_dataloader()))
    loss, _ = token_loss(module(batch["src"], batch["tgt_in"]), batch["tgt_out"], module.label_smoothing)
    loss.backward()
    before = grads(module)
    assert before.keys() == {name for name, _ in module.named_parameters()}  # every parameter has a gradient

    clip = cfg.trainer.gradient_clip_val
    module.configure_gradient_clipping(
        optimizer, gradient_clip_val=clip, gradient_clip_algorithm=cfg.trainer.gradient_clip_algorithm
    )
    clamped, total = assert_value_clipped(before, grads(module), clip)
    # Both cases occur, so the test can fail either way: elements above v (clamped) and inside (kept).
    assert 0 < clamped < total, (clamped, total)
