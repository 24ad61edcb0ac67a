"""Gradient accumulation through Lightning (tp=1, in-process): the step's gradients are those of the union
of its micro-batches over the union's target tokens; steps, validation, logs and checkpoints count optimizer
steps. The sharded layouts: tests/distributed/test_accumulation.py."""

from __future__ import annotations

import csv

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

from helpers.config import QUIET
from helpers.gradients import grads
from mha_lightning.data.batching import collate
from mha_lightning.errors import ConfigError
from mha_lightning.module import token_loss
from mha_lightning.train import train

K = 3


class StepGradients(L.Callback):
    """The gradients the optimizer used, once per optimizer step (clipping is off in these tests)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []
        self.batches: list[dict[str, torch.Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append({key: value.clone() for key, value in batch.items()})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.window_ended:
            self.steps.append(grads(pl_module))


def test_lightning_step_equals_the_union_of_its_micro_batches(make_cfg):
    cfg = make_cfg("logger=none", "data.num_train=96", "data.batch_size=8", *QUIET)
    L.seed_everything(cfg.seed)
    module = instantiate(cfg.module, model=instantiate(cfg.model), _convert_="partial")
    initial = {name: value.clone() for name, value in module.model.state_dict().items()}
    recorder = StepGradients()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        accumulate_grad_batches=K,
        gradient_clip_val=0,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        inference_mode=False,
        callbacks=[recorder],
    )
    trainer.fit(module, datamodule=instantiate(cfg.data))
    assert trainer.global_step == 2 and len(recorder.batches) == 2 * K and len(recorder.steps) == 2

    reference = instantiate(cfg.model)
    reference.load_state_dict(initial)
    pairs = [
        (row[row != 0][:-1].tolist(), out[out != 0][:-1].tolist())
        for batch in recorder.batches[:K]
        for row, out in zip(batch["src"], batch["tgt_out"], strict=True)
    ]
    union = collate(pairs)
    loss, _ = token_loss(reference(union["src"], union["tgt_in"]), union["tgt_out"], module.label_smoothing)
    loss.backward()
    expected = {f"model.{name}": p.grad for name, p in reference.named_parameters() if p.grad is not None}
    assert recorder.steps[0].keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(recorder.steps[0][name], grad, atol=1e-6, rtol=1e-5, msg=name)
    # Micro-batches of different token counts: the mean of their means would be another gradient.
    tokens = {int((b["tgt_out"] != 0).sum()) for b in recorder.batches[:K]}
    assert len(tokens) > 1, tokens


def test_steps_validation_logs_and_checkpoints_count_optimizer_steps(make_cfg, tmp_path):
    cfg = make_cfg(
        "logger=csv",
        "test=false",
        "data.num_train=200",
        "data.batch_size=8",
        "data.num_val=16",
        "trainer.accumulate_grad_batches=2",
        "trainer.max_steps=6",
        "trainer.val_check_interval=3",
        "trainer.log_every_n_steps=1",
        "callbacks.model_checkpoint.save_top_k=-1",
        *QUIET,
    )
    train(cfg)
    rows = list(csv.DictReader(open(next((tmp_path / "run" / "csv").rglob("metrics.csv")))))
    train_steps = [int(r["step"]) for r in rows if r.get("train/loss")]
    assert train_steps == list(range(6))  # one row per optimizer step, none per micro-batch
    # The warmup schedule advanced once per optimizer step, not per micro-batch: lr_i = lr x (i + 1) / warmup.
    warmup, lr = cfg.module.scheduler.warmup_steps, cfg.module.optimizer.lr
    lrs = [float(r["train/lr"]) for r in rows if r.get("train/lr")]
    assert lrs == pytest.approx([lr * (i + 1) / warmup for i in range(6)], rel=1e-6)
    val_steps = [int(r["step"]) for r in rows if r.get("val/loss")]
    assert val_steps == [2, 5]  # after optimizer steps 3 and 6 (Lightning logs at the step index)
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step*.ckpt"))
    assert names == ["step000003.ckpt", "step000006.ckpt"]
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 6
    loop = ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]
    assert loop["completed"] == 12  # 6 steps x 2 micro-batches


@pytest.mark.parametrize("value", [0, -1, 1.5])
def test_accumulate_grad_batches_must_be_a_positive_integer(make_cfg, value):
    from mha_lightning.config import preflight

    with pytest.raises(ConfigError, match="trainer.accumulate_grad_batches must be a positive integer"):
        preflight(make_cfg(f"trainer.accumulate_grad_batches={value}"))
