"""Preemption: SIGTERM (a cluster's notice) or SIGUSR1 (SLURM's ``--signal``) saves ``last.ckpt`` at the
step training reached, on every rank together, and the run exits 143 (docs/design.md, "Faults").

Lightning's own SIGTERM handler calls ``torch.distributed.broadcast`` from inside the signal
handler; a rank that is in the middle of a tensor-parallel all-reduce then waits for a collective
no other rank joins, and a tp=2 job hangs until the collective timeout. :class:`PreemptionCheckpoint`
replaces it: the handler only notes the signal; at the end of each training step the ranks agree
(one ``MAX`` all-reduce) and, if any was signalled, all raise Lightning's ``SIGTERMException`` at
that same point and save from ``on_exception`` (a collective). That is where ``ModelCheckpoint``
saves mid-epoch, so Lightning's restart continues exactly at the next step; the stopped step's
own metrics row is not logged. ``train()`` turns the exception into
:class:`~mha_lightning.errors.Preempted`.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException
from typing_extensions import override

from mha_lightning.distributed.collectives import all_max

# Signals that mean "you are about to be stopped": save and leave.
PREEMPTION_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1") if hasattr(signal, name))


class PreemptionCheckpoint(L.Callback):
    """On SIGTERM or SIGUSR1, stop at the end of the current training step on every rank and write ``last.ckpt``
    into the ModelCheckpoint folder (when there is one).

    :attr:`signal_name` says which signal stopped the run; :attr:`saved`, where its step went."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self.saved: Path | None = None
        self._received = 0
        self._original: dict[int, Any] = {}

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # The handlers from before Lightning installs its own (after setup), to restore at teardown.
        if stage == "fit" and threading.current_thread() is threading.main_thread():
            self._original = {s: signal.getsignal(s) for s in PREEMPTION_SIGNALS}

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning has installed its handlers by now: replace them.
        for signum in self._original:
            signal.signal(signum, self._note)

    def _note(self, signum: int, frame: Any) -> None:
        """The handler: only remember the signal (no collectives, no I/O inside a signal handler)."""
        self._received = self._received or int(signum)

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if not getattr(pl_module, "window_ended", True):
            return  # between the micro-batches of one optimizer step: their gradients are in no checkpoint
        received = self._received
        if trainer.world_size > 1:  # every rank ends every step here: the agreement is a collective
            received = all_max(received, trainer.strategy.root_device)
        if received:
            self.signal_name = signal.Signals(received).name
            raise SIGTERMException

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        ckpt = trainer.checkpoint_callback
        if not isinstance(exception, SIGTERMException) or ckpt is None or not ckpt.dirpath:
            return
        path = Path(ckpt.dirpath) / f"{ckpt.CHECKPOINT_NAME_LAST}{ckpt.FILE_EXTENSION}"
        if getattr(pl_module, "last_saved_step", None) != trainer.global_step:
            trainer.save_checkpoint(path)  # a collective under ModelParallelStrategy: every rank is here
        ckpt.last_model_path = str(path)
        self.saved = path

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for signum, handler in self._original.items():
            if handler is not None:
                signal.signal(signum, handler)
        self._original = {}
