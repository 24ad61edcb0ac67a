"""Speed and memory in the training log: ``perf/*`` keys every ``trainer.log_every_n_steps`` steps.

What NeMo's and torchtitan's logs show, to every logger (W&B, CSV): tokens per second (source and
target tokens without padding, all data-parallel replicas together, and per device), the step time,
each rank's peak memory (allocated on CUDA, resident on CPU; the largest over the ranks), and on a
GPU with a known peak, model FLOPs utilisation against its dense bf16 peak (``model.flops``: the
model's matmuls, padded shapes). Counting needs no host sync between log steps; at a log step one
small all-reduce combines the ranks (docs/design.md, "Speed and memory in the training log").
"""

from __future__ import annotations

import resource
import time
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from typing_extensions import override

from mha_lightning.data.vocab import PAD_ID
from mha_lightning.model.flops import train_flops

# Dense bf16 tensor-core peaks (TFLOP/s, vendor data sheets), by a substring of the device's name.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0}


def bf16_peak_tflops(device: torch.device) -> float | None:
    """The dense bf16 peak of ``device`` from :data:`BF16_PEAK_TFLOPS`; None on CPU or an unknown GPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAK_TFLOPS.items() if key in name), None)


def peak_memory_bytes(device: torch.device) -> int:
    """This process's peak memory: allocated by torch on CUDA, resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class ThroughputMonitor(L.Callback):
    """Logs ``perf/tokens_per_s``, ``perf/tokens_per_s_per_device``, ``perf/step_ms``,
    ``perf/peak_memory_mib`` (the largest of the ranks) and on GPUs ``perf/mfu``.

    ``peak_tflops``: the per-device peak MFU is measured against (default: :func:`bf16_peak_tflops`)."""

    def __init__(self, peak_tflops: float | None = None) -> None:
        super().__init__()
        self.peak_tflops = peak_tflops
        self._start: float | None = None
        self._steps = 0
        self._tokens: torch.Tensor | None = None  # this rank's real tokens since the last log (a device tensor)
        self._flops = 0  # model FLOPs of this replica's batches since the last log

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int):
        if self._start is None:
            self._start = time.perf_counter()
        src, tgt = batch["src"], batch["tgt_out"]
        tokens = (src != PAD_ID).sum() + (tgt != PAD_ID).sum()  # stays on the device: no sync
        self._tokens = tokens if self._tokens is None else self._tokens + tokens
        self._flops += train_flops(pl_module.model.config, src.shape[0], src.shape[1], tgt.shape[1])

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx):
        if not getattr(pl_module, "window_ended", True):
            return  # a micro-batch of a step still accumulating: its tokens count towards that step
        self._steps += 1
        if trainer.global_step % trainer.log_every_n_steps or self._tokens is None:
            return
        device = pl_module.device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - self._start
        dp, tp = getattr(pl_module, "layout", (trainer.world_size, 1))
        # Replicas of the tp ranks saw the same batch: count each batch once (divide the world's sum by tp).
        totals = torch.stack(
            [self._tokens.double(), torch.tensor(float(self._flops), dtype=torch.float64, device=device)]
        ).to(device)
        memory = torch.tensor([float(peak_memory_bytes(device))], dtype=torch.float64, device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(totals, op=dist.ReduceOp.SUM)
            dist.all_reduce(memory, op=dist.ReduceOp.MAX)
        tokens, flops = (totals / tp).tolist()
        metrics = {
            "perf/tokens_per_s": tokens / seconds,
            "perf/tokens_per_s_per_device": tokens / seconds / trainer.world_size,
            "perf/step_ms": 1e3 * seconds / self._steps,
            "perf/peak_memory_mib": memory.item() / 2**20,
        }
        peak = self.peak_tflops if self.peak_tflops is not None else bf16_peak_tflops(device)
        if peak:
            metrics["perf/mfu"] = flops / seconds / (peak * 1e12 * trainer.world_size)
        for key, value in metrics.items():
            pl_module.log(key, value, on_step=True, on_epoch=False, batch_size=1, rank_zero_only=True)
        self._start, self._steps, self._tokens, self._flops = time.perf_counter(), 0, None, 0
