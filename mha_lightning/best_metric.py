"""The best value of the sweep objective over a run's validations (docs/design.md, "Sweeps of multi-process jobs")."""

from __future__ import annotations

import math

import lightning as L
from lightning.pytorch.loggers import WandbLogger
from typing_extensions import override

from mha_lightning.sweeps import Objective


class BestMetric(L.Callback):
    """The best finite value of ``objective.metric`` over the run's validations (:attr:`best`), so that a
    trial is judged by its best checkpoint, not its last. Each new best goes into the W&B run's summary as
    ``<metric>_best`` (e.g. ``val/loss_best``), a column of the dashboard's runs table."""

    def __init__(self, objective: Objective) -> None:
        self.objective = objective
        self.best: float | None = None

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        value = trainer.callback_metrics.get(self.objective.metric)
        if trainer.sanity_checking or value is None:
            return
        value = float(value)
        if not (math.isfinite(value) and self.objective.better(value, self.best)):
            return
        self.best = value
        if not trainer.is_global_zero:
            return
        for lg in trainer.loggers:  # updated at each new best: the validation after fitting counts too
            if isinstance(lg, WandbLogger):
                lg.experiment.summary[self.objective.best_key] = self.best
