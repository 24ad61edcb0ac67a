"""Seq2SeqModule: the Lightning glue around an injected, single-device Seq2SeqTransformer."""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.text import CHRFScore, Perplexity, SacreBLEUScore

from mha_lightning import parallel
from mha_lightning.data.vocab import BOS_ID, EOS_ID, PAD_ID
from mha_lightning.errors import ConfigError
from mha_lightning.model import Seq2SeqTransformer

log = logging.getLogger(__name__)


class Seq2SeqModule(L.LightningModule):
    def __init__(
        self,
        model: Seq2SeqTransformer,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Optional[Callable[..., Any]] = None,
        label_smoothing: float = 0.1,
        decoding: Optional[dict] = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.label_smoothing = label_smoothing
        self.decoding = {"strategy": "greedy", "beam_size": 4, "length_penalty": 0.6, "max_extra_len": 10}
        self.decoding.update(decoding or {})
        _validate_decoding(self.decoding)
        # The model's own config travels with every checkpoint, so mha-eval can rebuild it.
        self.save_hyperparameters(
            {"model_config": model.hparams(), "label_smoothing": label_smoothing, "decoding": self.decoding,
             "run_config": None}
        )
        vocab = model.config.vocab_size
        # validate_args=False: the argument checks call torch.unique, a host sync on every step.
        accuracy = lambda: MulticlassAccuracy(  # noqa: E731
            num_classes=vocab, ignore_index=PAD_ID, average="micro", validate_args=False)
        self.metrics = torch.nn.ModuleDict({"train_": torch.nn.ModuleDict({"acc": accuracy()})})
        for split in ("val_", "test_"):  # ModuleDict keys may not be "train"
            self.metrics[split] = torch.nn.ModuleDict({
                "acc": accuracy(),
                "ppl": Perplexity(ignore_index=PAD_ID),
                "exact_match": MeanMetric(),
                "bleu": SacreBLEUScore(),
                "chrf": CHRFScore(n_word_order=0),  # chrF as sacreBLEU (and mha-eval) define it, not chrF++
            })

    # ----------------------------------------------------------------- sharding
    def configure_model(self) -> None:
        mesh = self.device_mesh
        if mesh is None or getattr(self, "_parallelized", False):
            return
        parallel.parallelize(self.model, mesh)
        self._parallelized = True
        print(parallel.describe_sharding(self.model, mesh), flush=True)

    def on_fit_start(self) -> None:
        # Every rank was seeded alike so that the model initialises identically everywhere; from
        # here, data-parallel replicas draw their own dropout masks. Tensor-parallel ranks of one
        # replica keep one stream: dropout on replicated activations must agree across them.
        if self.dp_size > 1:
            torch.manual_seed(torch.initial_seed() + 7919 * self.dp_rank)

    @property
    def dp_rank(self) -> int:
        mesh = self.device_mesh
        return mesh["data_parallel"].get_local_rank() if mesh is not None else self.global_rank

    @property
    def dp_group(self):
        mesh = self.device_mesh
        return mesh["data_parallel"].get_group() if mesh is not None else None

    @property
    def dp_size(self) -> int:
        mesh = self.device_mesh
        if mesh is not None:
            return mesh["data_parallel"].size()
        return self.trainer.world_size if self._trainer is not None else 1

    # ----------------------------------------------------------------- steps
    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        return self.model(src, tgt_in)

    def _loss(self, logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        return token_loss(logits, target, self.label_smoothing, self.dp_group if self.dp_size > 1 else None)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        logits = self(batch["src"], batch["tgt_in"])
        loss, mean_loss = self._loss(logits, batch["tgt_out"])
        metrics = self.metrics["train_"]
        metrics["acc"](logits.detach().argmax(-1), batch["tgt_out"])
        bsz = batch["src"].shape[0]
        self.log("train/loss", mean_loss, prog_bar=True, batch_size=bsz)
        self.log("train/acc", metrics["acc"], prog_bar=True, batch_size=bsz)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=bsz)
        loader = self.trainer.train_dataloader
        if hasattr(loader, "mark_step"):
            loader.mark_step()
        return loss

    def _eval_step(self, batch: dict[str, Tensor], prefix: str) -> None:
        logits = self(batch["src"], batch["tgt_in"])
        _, mean_loss = self._loss(logits, batch["tgt_out"])
        m = self.metrics[f"{prefix}_"]
        m["acc"](logits.argmax(-1), batch["tgt_out"])
        m["ppl"](logits.float(), batch["tgt_out"])
        bsz = batch["src"].shape[0]
        self.log(f"{prefix}/loss", mean_loss, batch_size=bsz, sync_dist=True)
        self.log(f"{prefix}/acc", m["acc"], batch_size=bsz)
        self.log(f"{prefix}/ppl", m["ppl"], batch_size=bsz)
        hyp = self.generate(batch["src"])
        self._score(hyp, batch["tgt_out"], m, prefix, bsz)

    def _score(self, hyp: Tensor, tgt_out: Tensor, m, prefix: str, bsz: int) -> None:
        L = max(hyp.shape[1], tgt_out.shape[1])
        hyp_p = F.pad(hyp, (0, L - hyp.shape[1]), value=PAD_ID)
        ref_p = F.pad(tgt_out, (0, L - tgt_out.shape[1]), value=PAD_ID)
        m["exact_match"]((hyp_p == ref_p).all(dim=1).float())
        self.log(f"{prefix}/exact_match", m["exact_match"], batch_size=bsz, prog_bar=prefix == "val")
        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is not None and getattr(dm, "is_text", False):
            hyps = [dm.detokenize(h) for h in hyp.tolist()]
            refs = [[dm.detokenize(r)] for r in tgt_out.tolist()]
            m["bleu"](hyps, refs)
            m["chrf"](hyps, refs)
            self.log(f"{prefix}/bleu", m["bleu"], batch_size=bsz, prog_bar=prefix == "val")
            self.log(f"{prefix}/chrf", m["chrf"], batch_size=bsz)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    # ----------------------------------------------------------------- decoding
    def generate(self, src: Tensor, strategy: Optional[str] = None) -> Tensor:
        cfg = self.decoding
        strategy = strategy or cfg["strategy"]
        # Every rank must run the same number of decoder steps (FSDP/TP collectives per step).
        max_len = parallel.all_max(int((src != PAD_ID).sum(1).max()) + int(cfg["max_extra_len"]), src.device)
        return self.model.generate(
            src, max_len, BOS_ID, EOS_ID, beam_size=int(cfg["beam_size"]) if strategy == "beam" else 1,
            length_penalty=float(cfg["length_penalty"]),
            sync_done=lambda done: parallel.all_done(done, src.device),  # ranks decode in lockstep
        )

    # ----------------------------------------------------------------- optimisation
    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        if not gradient_clip_val:
            return
        if gradient_clip_algorithm == "value":
            for p in self.parameters():  # elementwise: the same on local shards as on whole tensors
                if p.grad is not None:
                    p.grad.clamp_(-float(gradient_clip_val), float(gradient_clip_val))
            return
        # Parameters live on different meshes under TP x FSDP: clip with a per-mesh norm.
        norm = parallel.clip_grad_norm(self.parameters(), float(gradient_clip_val))
        self.log("train/grad_norm", norm, batch_size=1)

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(params=self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def token_loss(
    logits: Tensor, target: Tensor, label_smoothing: float = 0.0, dp_group=None
) -> tuple[Tensor, Tensor]:
    """-> (loss to backpropagate, global mean loss per token for logging).

    The mean is over all target tokens of the global batch, not a mean of per-rank means:
    with ``dp_group`` (FSDP averages gradients over it) the gradient is exactly the dp=1 one."""
    token_loss_sum = F.cross_entropy(
        logits.flatten(0, 1).float(), target.flatten(), ignore_index=PAD_ID,
        label_smoothing=label_smoothing, reduction="sum",
    )
    totals = torch.stack([token_loss_sum.detach(), (target != PAD_ID).sum().float()])
    dp_size = 1
    if dp_group is not None:
        parallel.all_reduce_sum(totals, dp_group)
        dp_size = torch.distributed.get_world_size(dp_group)
    global_tokens = totals[1].clamp(min=1)
    return token_loss_sum * dp_size / global_tokens, totals[0] / global_tokens


def _validate_decoding(cfg: dict) -> None:
    if cfg["strategy"] not in ("greedy", "beam"):
        raise ConfigError(f"module.decoding.strategy={cfg['strategy']!r} must be 'greedy' or 'beam'")
    if not isinstance(cfg["beam_size"], int) or cfg["beam_size"] < 1:
        raise ConfigError(f"module.decoding.beam_size must be a positive integer, got {cfg['beam_size']!r}")
    if not isinstance(cfg["max_extra_len"], int) or cfg["max_extra_len"] < 1:
        raise ConfigError(f"module.decoding.max_extra_len must be a positive integer, got {cfg['max_extra_len']!r}")
