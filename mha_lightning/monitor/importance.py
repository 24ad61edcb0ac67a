"""Every head's importance on the validation probe set while training (Michel et al. 2019).

At each validation the monitor gates every head of the probe set's forward and backpropagates each
example's mean token cross-entropy into the gates only: importance = mean over examples of
|dL_x / d gate_h|, the number ``mha-analyze`` reports, measured on the same fixed examples as the
validation entropy. One forward and backward of the probe set; no parameter gets a gradient.

Logged as ``val_head_importance/<kind>/L<l>/H<h>``, and kept beside the entropy record in
``RUN_DIR/head_importance.csv`` (``step,split,kind,layer,head,importance``, appended like it).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from mha_lightning.analysis.heads import gate_importance
from mha_lightning.kinds import ATTENTION_KINDS
from mha_lightning.monitor.record import IMPORTANCE_COLUMNS, append_csv


def probe_importance(
    model, batch: dict[str, Tensor], num_heads: int, tp_rank: int, tp_size: int
) -> dict[str, np.ndarray]:
    """kind -> (layers, num_heads) importance of every head on ``batch``, the same on every rank.

    Each rank measures the heads it holds; one all-reduce of (sums, examples) placed at the heads'
    global indices gives every head once per data-parallel rank (each sees the whole probe set), and
    the division leaves exactly the single-device number."""
    local = num_heads // tp_size
    sums = gate_importance(model, batch, local)
    B = batch["src"].shape[0]
    state = {}
    for kind in ATTENTION_KINDS:
        layers = sums[kind].shape[0]
        placed = torch.zeros(2, layers, num_heads, dtype=torch.float64, device=sums[kind].device)
        placed[0, :, tp_rank * local : (tp_rank + 1) * local] = sums[kind].double()
        placed[1, :, tp_rank * local : (tp_rank + 1) * local] = B
        state[kind] = placed
    flat = torch.cat([state[kind].flatten() for kind in ATTENTION_KINDS])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    out, offset = {}, 0
    for kind in ATTENTION_KINDS:
        n = state[kind].numel()
        total, examples = flat[offset : offset + n].view_as(state[kind]).cpu()
        offset += n
        out[kind] = (total / examples.clamp(min=1)).numpy()
    return out


def append_importance(path: str | Path, split: str, step: int, values: Mapping[str, np.ndarray]) -> None:
    """Append one measurement (kind -> (layers, heads)) to the record at ``path``, with its header if new."""
    rows = (
        [step, split, kind, layer, head, f"{value:.6g}"]
        for kind, table in values.items()
        for (layer, head), value in np.ndenumerate(table)
    )
    append_csv(path, IMPORTANCE_COLUMNS, rows)
