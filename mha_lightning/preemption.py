"""Preemption: a SIGTERM (a cluster's notice) saves a checkpoint at the current step before the job ends.

Lightning turns SIGTERM into ``SIGTERMException`` at the next batch boundary, on every rank at once
(rank 0 broadcasts it), and would end the run with exit code 0 and nothing saved. This callback
saves ``last.ckpt`` there (a collective under ``ModelParallelStrategy``: every rank is at the same
point), and ``train()`` turns the exception into :class:`~mha_lightning.errors.Preempted`, exit
code 143, so a scheduler sees the job did not finish (docs/design.md, "Faults").
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException
from typing_extensions import override


class PreemptionCheckpoint(L.Callback):
    """On SIGTERM, write ``last.ckpt`` into the ModelCheckpoint folder at the step training reached."""

    def __init__(self) -> None:
        self.saved: Path | None = None

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        ckpt = trainer.checkpoint_callback
        if not isinstance(exception, SIGTERMException) or ckpt is None or not ckpt.dirpath:
            return
        path = Path(ckpt.dirpath) / f"{ckpt.CHECKPOINT_NAME_LAST}{ckpt.FILE_EXTENSION}"
        if getattr(pl_module, "last_saved_step", None) != trainer.global_step:
            trainer.save_checkpoint(path)
        ckpt.last_model_path = str(path)
        self.saved = path
