"""Writing sharded checkpoint folders in one process, the way each rank of a tp/dp run does."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from mha_lightning.atomic import sibling_path
from mha_lightning.checkpoint_folder import publish
from mha_lightning.checkpoints import META_FILE


def write_sharded(target: Path, step: int, numel: int = 1 << 16) -> Path:
    """Save a DCP folder of step ``step`` (tensors filled with ``step``) the way
    ``AtomicModelParallelStrategy`` does: into a staging folder, then :func:`publish`."""
    import torch.distributed.checkpoint as dcp

    staging = sibling_path(target, "tmp")
    state = {"state_dict": {"model.w": torch.full((numel,), float(step)), "model.b": torch.arange(8.0) + step}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save(state, checkpoint_id=staging, no_dist=True)
    torch.save({"global_step": step, "hyper_parameters": {"model_config": {"d_model": 8}}}, staging / META_FILE)
    publish(staging, target, step)
    return target
