"""Logger factories for Hydra configs."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from omegaconf import OmegaConf

if TYPE_CHECKING:
    from lightning.pytorch.loggers import WandbLogger


def wandb_mode(offline: bool | None) -> str:
    """Offline unless the user says otherwise: ``offline=false`` or ``WANDB_MODE`` in the environment."""
    if offline is None:
        return os.environ.get("WANDB_MODE", "offline")
    return "offline" if offline else "online"


def wandb_logger(offline: bool | None = None, save_dir: str = ".", **kwargs) -> WandbLogger:
    """Lightning's WandbLogger, offline unless told otherwise (:func:`wandb_mode`); None-valued kwargs are dropped.

    Other kwargs go to ``wandb.init`` (``project``, ``name``, ``group``, ``tags``, ``config``: a sweep job sets
    the last three, see ``sweeps.label_wandb_run``)."""
    from lightning.pytorch.loggers import WandbLogger  # here: wandb_mode alone must not import Lightning

    # Passed as wandb.init(mode=...) rather than WandbLogger(offline=True), which would set
    # WANDB_MODE in os.environ for every later run in this process (e.g. the next sweep job).
    # Plain containers: wandb cannot serialise OmegaConf nodes (a sweep job's ``config``, its ``tags``).
    kwargs = {k: OmegaConf.to_container(v) if OmegaConf.is_config(v) else v for k, v in kwargs.items() if v is not None}
    kwargs.setdefault("tags", [])
    kwargs["tags"] = list(kwargs["tags"])
    return WandbLogger(save_dir=save_dir, mode=wandb_mode(offline), **kwargs)
