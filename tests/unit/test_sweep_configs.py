"""Sweep configs compose as a user of lightning-hydra-template expects (Optuna searches, submitit launchers),
and a trial's objective is its best validation value (whole sweeps run in cli/test_sweeps.py)."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import OmegaConf

from helpers.config import CONF_DIR
from mha_lightning.best_metric import BestMetric
from mha_lightning.errors import ConfigError
from mha_lightning.sweeps import Objective, SweepJob, best_value, default_direction, label_wandb_run, objective_of

OPTUNA_SEARCHES = ("lr_warmup_dropout", "heads_head_dim")


def compose_with_hydra(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


@pytest.mark.parametrize("name", OPTUNA_SEARCHES)
def test_optuna_searches_are_seeded_tpe_over_their_objective(name):
    cfg = compose_with_hydra(f"hparams_search={name}")
    sweeper = cfg.hydra.sweeper
    assert cfg.hydra.mode == RunMode.MULTIRUN
    assert sweeper._target_ == "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler" and isinstance(sweeper.sampler.seed, int)
    assert cfg.optimized_metric.startswith("val/")
    # The sweeper's direction is the config's own: one place to change it.
    assert sweeper.direction == cfg.optimized_direction == default_direction(cfg.optimized_metric)
    assert cfg.logger.wandb.group == name
    parser = OverridesParser.create()
    spaces = {key: parser.parse_override(f"{key}={value}") for key, value in sweeper.params.items()}
    assert len(spaces) >= 2 and all(o.is_sweep_override() for o in spaces.values())
    sampler = instantiate(sweeper.sampler)
    assert type(sampler).__name__ == "TPESampler"


def test_the_lr_search_is_log_uniform_and_warmup_an_integer():
    cfg = compose_with_hydra("hparams_search=lr_warmup_dropout")
    parser = OverridesParser.create()
    lr = parser.parse_override(f"module.optimizer.lr={cfg.hydra.sweeper.params['module.optimizer.lr']}")
    assert lr.is_interval_sweep() and "log" in lr.value().tags
    warmup = parser.parse_override(
        f"module.scheduler.warmup_steps={cfg.hydra.sweeper.params['module.scheduler.warmup_steps']}"
    )
    assert isinstance(warmup.value().start, int) and isinstance(warmup.value().end, int)


def test_heads_search_keeps_d_model_fixed():
    cfg = compose_with_hydra("hparams_search=heads_head_dim")
    assert set(cfg.hydra.sweeper.params) == {"model.num_heads", "model.head_dim"}
    assert "model.d_model" not in cfg.hydra.sweeper.params


def test_slurm_launcher_sizes_each_job_from_the_trainer():
    cfg = compose_with_hydra("hydra/launcher=slurm", "trainer.devices=8", "trainer.num_nodes=2")
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert (launcher["nodes"], launcher["tasks_per_node"], launcher["gpus_per_node"]) == (2, 8, 8)
    assert launcher["timeout_min"] > 0 and "partition" in launcher
    # SIGUSR1 before the limit (the preemption checkpoint's signal), and SLURM may requeue the job.
    assert launcher["additional_parameters"] == {"signal": f"USR1@{launcher['signal_delay_s']}", "requeue": True}
    assert type(instantiate(cfg.hydra.launcher)).__name__ == "SlurmLauncher"


def test_submitit_local_launcher_runs_one_task_per_device():
    cfg = compose_with_hydra("hydra/launcher=submitit_local", "trainer.devices=2")
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"].endswith("LocalLauncher")
    assert (launcher["nodes"], launcher["tasks_per_node"]) == (1, 2)


def test_objective_direction_defaults_by_name_and_is_checked():
    assert default_direction("val/loss") == "minimize" and default_direction("val/ppl") == "minimize"
    assert default_direction("val/bleu") == "maximize" and default_direction("val/exact_match") == "maximize"
    assert default_direction("val/char_error") == "minimize"  # the sweep report agrees: one rule
    cfg = OmegaConf.create({"optimized_metric": "val/bleu", "optimized_direction": None})
    assert objective_of(cfg) == Objective("val/bleu", "maximize")
    assert objective_of(OmegaConf.create({})) is None
    with pytest.raises(ConfigError, match="optimized_direction must be minimize or maximize, got 'down'"):
        objective_of(OmegaConf.create({"optimized_metric": "val/loss", "optimized_direction": "down"}))


def test_a_missing_or_non_finite_objective_is_the_worst_value():
    loss, bleu = Objective("val/loss", "minimize"), Objective("val/bleu", "maximize")
    assert best_value(loss, {"val/loss": 2.0, "val/loss_best": 1.5}) == 1.5
    assert best_value(loss, {"val/loss": 2.0}) == 2.0
    assert best_value(loss, {"val/loss": math.nan}) == math.inf
    assert best_value(loss, {"val/loss_best": None}) == math.inf  # metrics.json writes null for NaN
    assert best_value(bleu, {}) == -math.inf


def test_a_sweep_job_labels_its_wandb_run():
    cfg = compose_with_hydra("logger.wandb.tags=[mine]")
    job = SweepJob("train-2026-01-01_00-00-00", 3, ("model.dropout=0.1", "x" * 65))
    label_wandb_run(cfg, job)
    node = cfg.logger.wandb
    assert node.group == "train-2026-01-01_00-00-00"
    assert list(node.tags) == ["mine", "model.dropout=0.1"]  # W&B refuses tags over 64 characters
    assert OmegaConf.to_container(node.config) == {
        "sweep": {"group": job.name, "job": 3, "overrides": ["model.dropout=0.1", "x" * 65]}
    }
    cfg = compose_with_hydra("hparams_search=num_heads")
    label_wandb_run(cfg, job)
    assert cfg.logger.wandb.group == "num_heads"  # an explicit group wins


class _ScriptedValidation(L.LightningModule):
    """Logs a given sequence of validation values, one per validation run."""

    def __init__(self, values: list[float]) -> None:
        super().__init__()
        self.values = values
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.runs = 0

    def training_step(self, batch, batch_idx):
        return (self.weight - batch[0]).pow(2).sum()

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.values[self.runs])

    def on_validation_epoch_end(self):
        self.runs += 1

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(8, 1), batch_size=1)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(1, 1), batch_size=1)


@pytest.mark.parametrize(("direction", "best"), [("minimize", 1.0), ("maximize", 3.0)])
def test_best_metric_is_the_best_validation_not_the_last(tmp_path, direction, best):
    tracker = BestMetric(Objective("val/loss", direction))
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        max_steps=10,  # validations at steps 2, 4, 6, 8, 10
        val_check_interval=2,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[tracker],
    )
    trainer.fit(_ScriptedValidation([2.0, 1.0, math.nan, 3.0, 2.5]))
    assert trainer.callback_metrics["val/loss"] == 2.5  # the last validation
    assert tracker.best == best  # NaN is skipped
