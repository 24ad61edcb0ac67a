"""module.compile: a compiled tiny model trains like the eager one, and monitored steps never recompile it."""

from __future__ import annotations

import dataclasses

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from mha_lightning.config import CompileConfig, MonitorConfig, preflight
from mha_lightning.errors import UserError
from mha_lightning.monitor.callback import EntropyMonitor

# Small: tracing time grows with the number of layers.
TINY = [
    "model.d_model=16",
    "model.num_heads=2",
    "model.ffn_dim=32",
    "model.num_encoder_layers=1",
    "model.num_decoder_layers=1",
    "data.vocab_size=16",
    "data.num_train=64",
    "data.batch_size=8",
    # One batch shape: a new length would recompile once (automatic dynamic shapes), which is
    # not what this test is about (docs/design.md, "Compiling").
    "data.min_len=6",
    "data.max_len=6",
]
STEPS = 4
EVERY = 2  # the monitor probes steps 0 and 2 (eager); steps 1 and 3 run compiled


class StepLosses(L.Callback):
    """Each step's training loss; from ``strict_from`` on, a recompilation raises instead of compiling."""

    def __init__(self, strict_from: int) -> None:
        self.losses: list[float] = []
        self.strict_from = strict_from

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.strict_from:
            torch.compiler.set_stance("fail_on_recompile")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def fit(make_cfg, *overrides: str):
    cfg = make_cfg(*TINY, *overrides)
    L.seed_everything(cfg.seed)
    module = instantiate(cfg.module, model=instantiate(cfg.model), _convert_="partial")
    monitor = MonitorConfig(every_n_steps=EVERY, probe=False, log_images=False, render_plots=False)
    # Strict from the second monitored step: the first compiled step and one core swap have happened.
    losses = StepLosses(strict_from=EVERY)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=STEPS,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=cfg.paths.output_dir,
        callbacks=[EntropyMonitor(monitor, output_dir=cfg.paths.output_dir), losses],
    )
    try:
        trainer.fit(module, datamodule=instantiate(cfg.data))
    finally:
        torch.compiler.set_stance("default")
    return module, losses.losses


def test_compiled_training_equals_eager_and_monitored_steps_do_not_recompile(make_cfg):
    eager, eager_losses = fit(make_cfg)
    # aot_eager: dynamo and AOTAutograd trace forward and backward as inductor's input, without generating
    # C++ kernels (minutes on 2 shared cores); inductor itself runs in scripts/gpu_check.sh and bench_train.py.
    compiled, compiled_losses = fit(make_cfg, "module.compile.enabled=true", "module.compile.backend=aot_eager")
    assert eager.compiled_calls == 0
    # Steps 1 and 3 ran the compiled model; step 3 came after a probing core had been swapped in and
    # out again under fail_on_recompile, so the swap did not invalidate the compiled graph.
    assert compiled.compiled_calls == STEPS - STEPS // EVERY
    assert len(compiled_losses) == len(eager_losses) == STEPS
    torch.testing.assert_close(torch.tensor(compiled_losses), torch.tensor(eager_losses), rtol=1e-5, atol=0)
    # The learning is real: the loss moved, and the compiled run's state dict keeps the model's keys.
    assert compiled_losses[-1] != compiled_losses[0]
    assert compiled.state_dict().keys() == eager.state_dict().keys()


def test_compile_schema_default_is_its_yaml(make_cfg):
    node = OmegaConf.to_container(make_cfg().module.compile, resolve=True)
    assert node == {f.name: f.default for f in dataclasses.fields(CompileConfig)}
    assert node["enabled"] is False


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["module.compile.backend=turbo"], "module.compile.backend='turbo' is not a torch.compile backend"),
        (["module.compile.mode=fastest"], "module.compile.mode='fastest' must be one of"),
        (["module.compile.enabled=maybe"], "module.compile.enabled must be true or false"),
        (["+module.compile.fullgraph=true"], "module.compile has no option 'fullgraph'"),
        (
            ["module.compile.enabled=true", "trainer.devices=2", "parallel.tensor_parallel_size=2"],
            "module.compile.enabled=true needs parallel.tensor_parallel_size=1 (it is 2)",
        ),
    ],
)
def test_preflight_names_a_bad_compile_value_in_one_line(make_cfg, overrides, needle):
    with pytest.raises(UserError) as info:
        preflight(make_cfg(*overrides))
    assert needle in str(info.value) and "\n" not in str(info.value), str(info.value)
