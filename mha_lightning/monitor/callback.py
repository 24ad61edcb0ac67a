"""EntropyMonitor: every head's attention entropy, logged while training.

Keys: ``attn_entropy/{enc_self,dec_self,cross}/L{layer}/H{head}`` (nats) and the same under
``attn_entropy_norm/`` (divided by log of the number of valid keys). Training values come
from the monitored training batch every ``every_n_steps`` steps; validation values from a
fixed probe set (keys prefixed ``val_``), so curves compare across steps. Only global rank 0 writes.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.loggers import WandbLogger
from typing_extensions import override

from mha_lightning.config import MonitorConfig
from mha_lightning.distributed import ranks_of
from mha_lightning.kinds import collapse_key, entropy_key, heatmap_key, importance_key
from mha_lightning.loggers import send_alert
from mha_lightning.model import ATTENTION_KINDS, ProbingCore
from mha_lightning.monitor.entropy import HeadEntropyAccumulator, finalize, global_head_state
from mha_lightning.monitor.importance import append_importance, probe_importance
from mha_lightning.monitor.plots import heatmap_array, render_all
from mha_lightning.monitor.record import append_rows, drop_replayed_rows, importance_path, record_path

log = logging.getLogger(__name__)


class EntropyMonitor(L.Callback):
    """Measures every head's attention entropy while training (see the module docstring).

    ``config`` is the ``monitor`` group (:class:`MonitorConfig`, validated when built); files go
    to ``output_dir`` (default: the trainer's ``default_root_dir``)."""

    # MonitorConfig is a frozen dataclass: one shared default instance is safe.
    def __init__(self, config: MonitorConfig = MonitorConfig(), output_dir: str | None = None) -> None:  # noqa: B008
        self.output_dir = Path(output_dir) if output_dir else None
        self.every_n_steps = config.every_n_steps
        self.collapse_threshold = config.collapse_threshold
        self.log_images = config.log_images
        self.render_plots = config.render_plots
        self.probe = config.probe
        self.importance = config.importance
        self.latest: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}  # split -> kind -> (H, H_norm)
        self.latest_importance: dict[str, np.ndarray] = {}  # kind -> (layers, heads), the newest validation's
        self._collapsed: set[tuple[str, int, int]] = set()
        self._active = False
        self._measured_step = -1

    # ------------------------------------------------------------------ wiring
    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A resumed run: drop the record's rows it is about to log again (no duplicate steps)."""
        if trainer.global_step > 0 and trainer.is_global_zero:
            drop_replayed_rows(importance_path(self.output_dir), trainer.global_step)
            dropped = drop_replayed_rows(record_path(self.output_dir), trainer.global_step)
            if dropped:
                log.info(
                    "resumed at step %d: dropped %d entropy rows logged after that checkpoint",
                    trainer.global_step,
                    dropped,
                )

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.output_dir is None:
            self.output_dir = Path(trainer.default_root_dir)

    def _layout(self, pl_module) -> tuple[int, int]:
        """(local heads per attention module, tensor-parallel rank) of this process."""
        ranks = ranks_of(pl_module.device_mesh)
        return pl_module.model.config.num_heads // ranks.tp_size, ranks.tp_rank

    def _attach(self, pl_module) -> None:
        """Swap every attention's core for a probing one that feeds a fresh accumulator."""
        model = pl_module.model
        local_heads, _ = self._layout(pl_module)
        self._accumulators = {
            kind: [HeadEntropyAccumulator(local_heads) for _ in mods] for kind, mods in model.attention_layers().items()
        }
        model.set_attention_core(lambda kind, layer: ProbingCore(self._accumulators[kind][layer]))
        self._active = True

    def _detach(self, pl_module) -> None:
        pl_module.model.set_attention_core(None)
        self._active = False

    def _reduce(self, pl_module) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """One all-reduce over the world of every layer's zero-padded per-head sums."""
        _, tp_rank = self._layout(pl_module)
        num_heads = pl_module.model.config.num_heads
        states = [global_head_state(self._accumulators[kind], num_heads, tp_rank) for kind in ATTENTION_KINDS]
        flat = torch.cat([s.flatten() for s in states]).to(pl_module.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat = flat.cpu()
        result, offset = {}, 0
        for kind, s in zip(ATTENTION_KINDS, states, strict=True):
            summed = flat[offset : offset + s.numel()].view_as(s)
            offset += s.numel()
            entropy, normalised = finalize(summed)
            result[kind] = (entropy.numpy(), normalised.numpy())
        return result

    # ------------------------------------------------------------------ training steps
    @override
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        """Probe this batch's forward every ``every_n_steps`` optimizer steps."""
        step = trainer.global_step
        if step % self.every_n_steps == 0 and step != self._measured_step:
            self._measured_step = step
            self._attach(pl_module)

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        """Restore the default cores; reduce the probed batch over all ranks and publish it."""
        if self._active:
            self._detach(pl_module)
            self._publish(trainer, "train", self._measured_step, self._reduce(pl_module))

    # ------------------------------------------------------------------ validation probe
    @override
    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        """Measure the fixed probe set (eval mode, no grad) and publish it under ``val_``."""
        dm = trainer.datamodule
        if not self.probe or dm is None or not hasattr(dm, "probe_batch"):
            return
        batch = {k: v.to(pl_module.device) for k, v in dm.probe_batch().items()}
        was_training = pl_module.model.training
        pl_module.model.eval()
        self._attach(pl_module)
        try:
            with torch.no_grad():
                pl_module.model(batch["src"], batch["tgt_in"])
        finally:
            self._detach(pl_module)
            pl_module.model.train(was_training)
        self._publish(trainer, "val", trainer.global_step, self._reduce(pl_module))
        if self.importance:
            self._publish_importance(trainer, pl_module, batch)

    def _publish_importance(self, trainer, pl_module, batch: dict[str, torch.Tensor]) -> None:
        """Every head's importance on the probe set (eval mode, gradients into the head gates only)."""
        local_heads, tp_rank = self._layout(pl_module)
        num_heads = pl_module.model.config.num_heads
        was_training = pl_module.model.training
        pl_module.model.eval()
        try:
            values = probe_importance(pl_module.model, batch, num_heads, tp_rank, num_heads // local_heads)
        finally:
            pl_module.model.train(was_training)
        self.latest_importance = values
        if not trainer.is_global_zero:
            return
        step = trainer.global_step
        metrics = {
            importance_key(kind, layer, head): float(v)
            for kind, table in values.items()
            for (layer, head), v in np.ndenumerate(table)
        }
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        append_importance(importance_path(self.output_dir), "val", step, values)

    # ------------------------------------------------------------------ output
    def _publish(self, trainer, split: str, step: int, values: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
        self.latest[split] = values
        if not trainer.is_global_zero:
            return
        metrics = {}
        for kind, (ent, norm) in values.items():
            for (layer, head), h in np.ndenumerate(ent):
                metrics[entropy_key(kind, layer, head, split)] = float(h)
                metrics[entropy_key(kind, layer, head, split, normalised=True)] = float(norm[layer, head])
        metrics.update(self._collapse_check(split, step, values, trainer.loggers))
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        if self.log_images:
            self._log_heatmaps(trainer, split, step, values)
        append_rows(record_path(self.output_dir), split, step, values)

    def _collapse_check(self, split: str, step: int, values, loggers: list = ()) -> dict[str, float]:
        """Zhai et al. 2023: heads whose normalised entropy falls near 0 attend to one key. The first time a head
        does, a warning and a W&B alert (level WARN) naming the head, the step and the value."""
        counts = {}
        for kind, (_, norm) in values.items():
            low = np.argwhere(np.nan_to_num(norm, nan=1.0) < self.collapse_threshold)
            counts[collapse_key(split, kind)] = float(len(low))
            for layer, head in low:
                key = (kind, int(layer), int(head))
                if key not in self._collapsed:
                    self._collapsed.add(key)
                    log.warning(
                        "attention entropy collapse: %s layer %d head %d normalised entropy %.4f < "
                        "monitor.collapse_threshold %.4f at step %d (%s)",
                        kind,
                        layer,
                        head,
                        norm[layer, head],
                        self.collapse_threshold,
                        step,
                        split,
                    )
                    value = float(norm[layer, head])
                    send_alert(
                        list(loggers),
                        f"attention entropy collapse: {kind}/L{int(layer)}/H{int(head)}",
                        f"{kind} layer {int(layer)} head {int(head)}: normalised entropy {value:.4f} < "
                        f"monitor.collapse_threshold {self.collapse_threshold:g} at step {step} ({split})",
                        "WARN",
                    )
        return counts

    @override
    def state_dict(self) -> dict:
        """The heads already reported: a resumed run (the same W&B run) does not report them again."""
        return {"collapsed": sorted(self._collapsed)}

    @override
    def load_state_dict(self, state_dict: dict) -> None:
        self._collapsed = {tuple(key) for key in state_dict.get("collapsed", [])}

    def _log_heatmaps(self, trainer, split: str, step: int, values) -> None:
        wandb_loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not wandb_loggers:
            return
        images = [heatmap_array(norm) for _, norm in values.values()]
        captions = [
            f"{kind} {split} step {step}: normalised entropy, rows = layers, columns = heads" for kind in values
        ]
        for lg in wandb_loggers:
            lg.log_image(key=heatmap_key(split), images=images, step=step, caption=captions)

    # ------------------------------------------------------------------ end of training
    @override
    def on_fit_end(self, trainer, pl_module) -> None:
        """Rank 0: the last measurements as a W&B table, and PNG plots of the record."""
        if not trainer.is_global_zero or not self.latest:
            return
        rows = [
            [split, kind, layer, head, float(ent[layer, head]), float(norm[layer, head])]
            for split, values in self.latest.items()
            for kind, (ent, norm) in values.items()
            for (layer, head), _ in np.ndenumerate(ent)
        ]
        for lg in trainer.loggers:
            if isinstance(lg, WandbLogger):
                lg.log_table(
                    key="attn_entropy/final",
                    columns=["split", "kind", "layer", "head", "entropy", "entropy_norm"],
                    data=rows,
                )
        csv_path = record_path(self.output_dir)
        if self.render_plots and csv_path.exists():
            for split in self.latest:
                render_all(csv_path, self.output_dir / "plots", split=split, value="entropy_norm")
