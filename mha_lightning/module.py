"""Seq2SeqModule: the Lightning glue around an injected, single-device Seq2SeqTransformer."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MeanMetric, Metric
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.text import CHRFScore, SacreBLEUScore
from typing_extensions import override

from mha_lightning import seeding
from mha_lightning.config import CompileConfig, DecodingConfig, check_on_nonfinite, saved_layout
from mha_lightning.data.vocab import BOS_ID, EOS_ID, PAD_ID
from mha_lightning.distributed import DP, ParallelConfig, collectives, ranks_of
from mha_lightning.distributed.accumulation import GradientAccumulation
from mha_lightning.ema import EMAConfig, EMAWeights
from mha_lightning.errors import ConfigError, NonFiniteError
from mha_lightning.losses import smoothed_cross_entropy_sum
from mha_lightning.model import Seq2SeqTransformer
from mha_lightning.model.attention import SDPACore

log = logging.getLogger(__name__)


class Seq2SeqModule(L.LightningModule):
    """Trains, validates and tests an injected single-device ``Seq2SeqTransformer``.

    ``optimizer`` and ``scheduler`` are partials (Hydra ``_partial_: true``) bound to the
    parameters after sharding; an evaluation-only module (``mha-eval``) has neither. ``compile``
    (``module.compile``) runs the training forward through ``torch.compile`` (docs/design.md, "Compiling").
    ``parallel`` (the ``parallel`` group) says how ``configure_model`` shards the model over the mesh;
    a model built on the meta device is initialised there, each rank its own shards."""

    def __init__(
        self,
        model: Seq2SeqTransformer,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        label_smoothing: float = 0.1,
        decoding: DecodingConfig | dict | None = None,
        on_nonfinite: str = "stop",
        compile: CompileConfig | dict | None = None,
        parallel: ParallelConfig | dict | None = None,
        test_decoding: DecodingConfig | dict | None = None,
        ema: EMAConfig | dict | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.label_smoothing = label_smoothing
        self.decoding = DecodingConfig.from_dict(decoding)
        # The final test may decode otherwise than validation (a translation recipe: greedy while training, beam 5
        # at the end); None: as validation.
        self.test_decoding = DecodingConfig.from_dict(test_decoding) if test_decoding else None
        # The weights' moving average (module.ema.decay), tracked once the model is sharded (configure_model).
        self.ema_config = EMAConfig.from_dict(ema)
        self.ema = EMAWeights(self.ema_config.decay) if self.ema_config.enabled else None
        self._ema_swapped = False
        self._ema_said = False
        self.on_nonfinite = check_on_nonfinite(on_nonfinite)
        self.compile_config = CompileConfig.from_dict(compile)
        # The sharding techniques (``parallel``); on one device only activation checkpointing applies.
        self.parallel = ParallelConfig.from_dict(parallel)
        # A compiled function, not a submodule: the state dict (checkpoints) keeps the model's own keys.
        self._compiled_model: Callable[..., Tensor] | None = None
        self.compiled_calls = 0  # training forwards that ran compiled (monitored steps run eager)
        self.skipped_steps = 0  # steps dropped for a non-finite loss or gradient (on_nonfinite=skip)
        self._resumed_rng: list | None = None
        self._resumed_layout: tuple[int, int] | None = None  # the (dp, tp) whose streams _resumed_rng holds
        self._grad_norm: Tensor | None = None  # this step's total gradient norm, for clipping
        self.last_saved_step = -1  # the global step of the newest checkpoint this run wrote
        self.validated_step = -1  # the global step of the newest validation (sanity checks apart)
        # trainer.accumulate_grad_batches micro-batches per optimizer step (set when fitting starts).
        self.accumulation = GradientAccumulation(1)
        self.window_ended = True  # the current micro-batch is its optimizer step's last (callbacks read it)
        # The model's own config travels with every checkpoint, so mha-eval can rebuild it.
        self.save_hyperparameters(
            {
                "ema_decay": self.ema_config.decay,
                "model_config": model.hparams(),
                "label_smoothing": label_smoothing,
                "decoding": self.decoding.to_dict(),
                "run_config": None,
            }
        )
        vocab = model.config.vocab_size
        # validate_args=False: the argument checks call torch.unique, a host sync on every step.
        accuracy = lambda: MulticlassAccuracy(  # noqa: E731
            num_classes=vocab, ignore_index=PAD_ID, average="micro", validate_args=False
        )
        self.metrics = torch.nn.ModuleDict({"train_": torch.nn.ModuleDict({"acc": accuracy()})})
        for split in ("val_", "test_"):  # ModuleDict keys may not be "train"
            self.metrics[split] = torch.nn.ModuleDict(
                {
                    "acc": accuracy(),
                    "ppl": PerplexityFromSums(),
                    "exact_match": MeanMetric(),
                    "bleu": SacreBLEUScore(),
                    "chrf": CHRFScore(n_word_order=0),  # chrF as sacreBLEU (and mha-eval) define it, not chrF++
                }
            )

    # ----------------------------------------------------------------- sharding
    @override
    def configure_model(self) -> None:
        """Shard the model over the strategy's (dp, tp) mesh (on one device: activation checkpointing
        only), then compile it if asked; each once."""
        mesh = self.device_mesh
        if not getattr(self, "_parallelized", False):
            from mha_lightning.distributed.parallelize import describe_sharding, parallelize

            if mesh is not None:
                parallelize(self.model, mesh, self.parallel)
                print(describe_sharding(self.model, mesh, self.parallel), flush=True)
            else:
                from mha_lightning.distributed.activation_checkpointing import apply_activation_checkpointing

                apply_activation_checkpointing(self.model, self.parallel.activation_checkpointing)
            self._parallelized = True
        if self.ema is not None and not self.ema.tracking:
            self.ema.track(self.model)  # after sharding: the average is sharded like the weights
        compile = self.compile_config
        if compile.enabled and self._compiled_model is None:
            # The whole model, called as a module (its hooks included); lazily compiled at the first
            # training step. Compilation happens per process, after sharding (docs/design.md, "Compiling").
            self._compiled_model = torch.compile(self.model.__call__, backend=compile.backend, mode=compile.mode)

    @override
    def on_fit_start(self) -> None:
        """Give each data-parallel replica its own stream (a resumed run restores its saved ones instead)."""
        self.accumulation = GradientAccumulation(self.trainer.accumulate_grad_batches)
        if self._resumed_rng is None and self.dp_size > 1:
            # Every rank was seeded alike so that the model initialises identically everywhere; from
            # here, data-parallel replicas draw their own dropout masks (docs/design.md, "Randomness").
            torch.manual_seed(seeding.replica_seed(torch.initial_seed(), self.dp_rank))

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """A resumed run restores its random streams just before its first step.

        Not earlier: starting the data iterator draws from torch's global RNG (DataLoader's base
        seed), which the uninterrupted run did at the start of the epoch, long before this step."""
        if self._resumed_rng is not None:
            if self._resumed_layout == self.layout:
                seeding.restore(self._resumed_rng[self.global_rank])
            else:  # written at another layout: its streams belong to other ranks; fresh ones for this step
                step, layout = self.global_step, self._resumed_layout
                log.info("the checkpoint's random streams are of (dp, tp) = %s: reseeded at step %d", layout, step)
                seed = seeding.step_seed(torch.initial_seed(), step)
                torch.manual_seed(seeding.replica_seed(seed, self.dp_rank))
            self._resumed_rng = None
        self._begin_micro_batch(batch_idx)

    def _begin_micro_batch(self, batch_idx: int) -> None:
        """Where this batch falls in its optimizer step's window of ``k`` micro-batches (Lightning's own rule:
        a step after every k batches of the epoch, and after its last batch)."""
        k = self.accumulation.k
        self.window_ended = (batch_idx + 1) % k == 0 or batch_idx + 1 == self.trainer.num_training_batches
        self.accumulation.begin(self.model, last=self.window_ended, first=batch_idx % k == 0)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Every rank's random streams go into the checkpoint (rank 0 alone writes its metadata)."""
        states = seeding.capture()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, states)
        else:
            gathered = [states]
        checkpoint["rng_states"] = gathered
        checkpoint["parallel_layout"] = list(self.layout)  # whose streams these are
        from lightning.pytorch.loggers import WandbLogger

        wandb_ids = [lg.version for lg in self.loggers if isinstance(lg, WandbLogger)]
        if wandb_ids and wandb_ids[0]:
            checkpoint["wandb_run_id"] = wandb_ids[0]  # a resumed run continues this W&B run
        self.last_saved_step = checkpoint["global_step"]

    @override
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """After each optimizer step: the moving average of the weights takes its step."""
        if self.ema is not None and self.window_ended:
            self.ema.update(self.model)

    @override
    def on_validation_start(self) -> None:
        """Validate the moving average of the weights when there is one (module.ema)."""
        self._use_ema(True)

    @override
    def on_validation_epoch_end(self) -> None:
        """The trained weights back, before any checkpoint of this validation is written."""
        self._use_ema(False)

    @override
    def on_test_start(self) -> None:
        """Test the moving average too, as validation does."""
        self._use_ema(True)

    @override
    def on_test_epoch_end(self) -> None:
        """The trained weights back."""
        self._use_ema(False)

    def _use_ema(self, on: bool) -> None:
        if self.ema is None or not self.ema.tracking or self._ema_swapped == on:
            return
        if on and not self._ema_said:
            log.info("validating and testing with the EMA weights (module.ema.decay=%g)", self.ema.decay)
            self._ema_said = True
        self.ema.swap(self.model)
        self._ema_swapped = on

    @override
    def on_validation_end(self) -> None:
        """Note the step validated (``train.validate_final_weights`` reads it)."""
        if not self.trainer.sanity_checking:
            self.validated_step = self.global_step

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the saved random streams until ``on_fit_start`` (after Lightning's own restore)."""
        self._resumed_rng = checkpoint.get("rng_states")
        # Older checkpoints do not say: the config of the run that wrote them does.
        run_config = (checkpoint.get("hyper_parameters") or {}).get("run_config")
        saved = checkpoint.get("parallel_layout") or saved_layout(run_config)
        self._resumed_layout = tuple(saved) if saved is not None else None

    @property
    def layout(self) -> tuple[int, int]:
        """(data-parallel size, tensor-parallel size) of this run."""
        return self.dp_size, self.tp_rank_and_size[1]

    @property
    def tp_rank_and_size(self) -> tuple[int, int]:
        """(tensor-parallel rank, size) of this process; (0, 1) on one device."""
        ranks = ranks_of(self.device_mesh)
        return ranks.tp_rank, ranks.tp_size

    @property
    def dp_rank(self) -> int:
        """Data-parallel rank of this process."""
        mesh = self.device_mesh
        return ranks_of(mesh).dp_rank if mesh is not None else self.global_rank

    @property
    def dp_group(self):
        """The data-parallel process group (None on one device)."""
        mesh = self.device_mesh
        return mesh[DP].get_group() if mesh is not None else None

    @property
    def dp_size(self) -> int:
        """Number of data-parallel replicas."""
        mesh = self.device_mesh
        if mesh is not None:
            return ranks_of(mesh).dp_size
        trainer = self._attached_trainer()
        return trainer.world_size if trainer is not None else 1

    def _attached_trainer(self) -> L.Trainer | None:
        """The trainer running this module, or None outside ``fit``/``test`` (e.g. in a notebook)."""
        try:
            return self.trainer
        except RuntimeError:
            return None

    # ----------------------------------------------------------------- steps
    @override
    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        """src (B, S), tgt_in (B, T) ids -> logits (B, T, V); compiled on ordinary training steps."""
        if self._runs_compiled():
            self.compiled_calls += 1
            return self._compiled_model(src, tgt_in)
        return self.model(src, tgt_in)

    def _runs_compiled(self) -> bool:
        return self._compiled_model is not None and self.training and self._default_attention()

    def _default_attention(self) -> bool:
        """True unless the monitor (or analysis) swapped attention cores in: those steps run eager,
        so the compiled graph never sees a probing core and never recompiles (docs/design.md, "Compiling")."""
        return all(type(attn.core) is SDPACore for mods in self.model.attention_layers().values() for attn in mods)

    def _loss_dp_group(self):
        return self.dp_group if self.dp_size > 1 else None

    def _training_loss_sum(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """-> (summed token loss, argmax predictions). Eager steps run the output projection and the
        loss together (``Seq2SeqTransformer.teacher_forced_loss``: no logits tensor); compiled steps
        compile ``forward``, logits included."""
        src, tgt_in, tgt_out = batch["src"], batch["tgt_in"], batch["tgt_out"]
        if self._runs_compiled():
            logits = self(src, tgt_in)
            return token_loss_sum(logits, tgt_out, self.label_smoothing), logits.detach().argmax(-1)
        return self.model.teacher_forced_loss(src, tgt_in, tgt_out, self.label_smoothing)

    @override
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """-> the label-smoothed loss; logs its global per-token mean, accuracy and lr; counts the batch for resume."""
        loss_sum, predictions = self._training_loss_sum(batch)
        tokens = (batch["tgt_out"] != PAD_ID).sum()
        loss, mean_loss = self.accumulation.loss(loss_sum, tokens, self._loss_dp_group())
        loader = self.trainer.train_dataloader
        if hasattr(loader, "mark_step"):
            loader.mark_step()
        # One host sync per step. Every rank holds the same global mean (all-reduced over dp,
        # replicated over tp), so all agree on stopping or skipping and no collective is left waiting.
        if not bool(torch.isfinite(mean_loss)):
            return self._nonfinite("loss", float(mean_loss))
        metrics = self.metrics["train_"]
        metrics["acc"](predictions, batch["tgt_out"])
        if self.window_ended:  # one row per optimizer step; the loss over the whole window's tokens
            bsz = batch["src"].shape[0]
            self.log("train/loss", self.accumulation.window_mean(), prog_bar=True, batch_size=bsz)
            self.log("train/acc", metrics["acc"], prog_bar=True, batch_size=bsz)
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=bsz)
        # Lightning divides a micro-batch's loss by accumulate_grad_batches; ours is already over the window's
        # normaliser (GradientAccumulation), so undo that division.
        return loss * self.accumulation.k if self.accumulation.k > 1 else loss

    def _nonfinite(self, what: str, value: float) -> None:
        """Stop (raise), or skip this step's update and count it (``module.on_nonfinite``)."""
        if self.on_nonfinite == "stop":
            error = NonFiniteError(
                f"the training {what} is {value} at step {self.global_step}; stopped before saving it "
                "(lower module.optimizer.lr, keep trainer.gradient_clip_val, or set module.on_nonfinite=skip)"
            )
            if self.global_rank == 0:
                from mha_lightning.loggers import send_alert

                send_alert(self.loggers, f"training stopped: non-finite {what}", str(error), "ERROR")
            raise error
        self.skipped_steps += 1
        self.log("train/skipped_steps", float(self.skipped_steps), batch_size=1)
        return None  # Lightning skips the backward pass and the update of a step that returns None

    def _eval_step(self, batch: dict[str, Tensor], prefix: str) -> Tensor:
        # One pass through the vocabulary head for loss, perplexity and accuracy: under vocabulary
        # parallelism no rank makes the (tokens x vocabulary) logits here either.
        target = batch["tgt_out"]
        loss_sum, nll_sum, predictions = self.model.teacher_forced_scores(
            batch["src"], batch["tgt_in"], target, self.label_smoothing
        )
        _, mean_loss = per_global_token(loss_sum, target, self._loss_dp_group())
        m = self.metrics[f"{prefix}_"]
        m["acc"](predictions, target)
        m["ppl"](nll_sum, (target != PAD_ID).sum())
        bsz = batch["src"].shape[0]
        self.log(f"{prefix}/loss", mean_loss, batch_size=bsz, sync_dist=True)
        self.log(f"{prefix}/acc", m["acc"], batch_size=bsz)
        self.log(f"{prefix}/ppl", m["ppl"], batch_size=bsz)
        hyp = self.generate(batch["src"], self.test_decoding if prefix == "test" else None)
        self._score(hyp, batch["tgt_out"], m, prefix, bsz)
        return hyp  # (B, L) ids: mha-eval writes them out in corpus order

    def _score(self, hyp: Tensor, tgt_out: Tensor, m, prefix: str, bsz: int) -> None:
        L = max(hyp.shape[1], tgt_out.shape[1])
        hyp_p = F.pad(hyp, (0, L - hyp.shape[1]), value=PAD_ID)
        ref_p = F.pad(tgt_out, (0, L - tgt_out.shape[1]), value=PAD_ID)
        m["exact_match"]((hyp_p == ref_p).all(dim=1).float())
        self.log(f"{prefix}/exact_match", m["exact_match"], batch_size=bsz, prog_bar=prefix == "val")
        trainer = self._attached_trainer()
        dm = trainer.datamodule if trainer is not None else None
        if dm is not None and getattr(dm, "is_text", False):
            hyps = [dm.detokenize(h) for h in hyp.tolist()]
            refs = [[dm.detokenize(r)] for r in tgt_out.tolist()]
            m["bleu"](hyps, refs)
            m["chrf"](hyps, refs)
            self.log(f"{prefix}/bleu", m["bleu"], batch_size=bsz, prog_bar=prefix == "val")
            self.log(f"{prefix}/chrf", m["chrf"], batch_size=bsz)

    @override
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """Teacher-forced loss, accuracy, perplexity; then decoded scores (BLEU/chrF on text) -> hypotheses (B, L)."""
        return self._eval_step(batch, "val")

    @override
    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """As :meth:`validation_step`, logged under ``test/``."""
        return self._eval_step(batch, "test")

    # ----------------------------------------------------------------- decoding
    def decode_steps(self, src: Tensor) -> int:
        """Decoding's length limit for ``src`` (B, S) on this rank: the longest source plus
        ``decoding.max_extra_len`` tokens, within the model's ``max_len`` (BOS takes a position)."""
        longest = int((src != PAD_ID).sum(1).max()) + self.decoding.max_extra_len
        return min(longest, self.model.config.max_len - 1)

    def generate(self, src: Tensor, decoding: DecodingConfig | None = None) -> Tensor:
        """Decode ``src`` (B, S) with ``decoding`` (default: ``self.decoding``) -> (B, L) ids, no BOS, PAD after EOS."""
        cfg = decoding or self.decoding
        # Every rank must run the same number of decoder steps (FSDP/TP collectives per step).
        max_len = collectives.all_max(self.decode_steps(src), src.device)
        return self.model.generate(
            src,
            max_len,
            BOS_ID,
            EOS_ID,
            beam_size=cfg.beam,
            length_penalty=float(cfg.length_penalty),
            sync_done=lambda done: collectives.all_done(done, src.device),  # ranks decode in lockstep
        )

    # ----------------------------------------------------------------- optimisation
    @override
    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Sharding-aware clipping: "value" clamps elementwise, "norm" clips by the global norm across meshes."""
        if not gradient_clip_val:
            return
        if gradient_clip_algorithm == "value":
            for p in self.parameters():  # elementwise: the same on local shards as on whole tensors
                if p.grad is not None:
                    p.grad.clamp_(-float(gradient_clip_val), float(gradient_clip_val))
            return
        # Parameters live on different meshes under TP x FSDP: clip with a per-mesh norm.
        # The norm on_before_optimizer_step just measured (Lightning clips right after it): not computed twice.
        norm = collectives.clip_grad_norm(self.parameters(), float(gradient_clip_val), self._grad_norm)
        self.log("train/grad_norm", norm, batch_size=1)

    @override
    def on_before_optimizer_step(self, optimizer) -> None:
        """A finite loss can still give non-finite gradients: stop or skip before they reach the weights."""
        self.accumulation.finish(self.parameters())  # the window's gradients over its own target tokens
        collectives.reduce_partial_grads(self.parameters())  # sequence parallelism's norm weights
        norm = collectives.total_grad_norm(self.parameters())  # global over every mesh: all ranks agree
        self._grad_norm = norm
        if not bool(torch.isfinite(norm)):
            self._grad_norm = None  # skipped: the gradients are dropped below
            self._nonfinite("gradient norm", float(norm))
            self.zero_grad(set_to_none=True)  # skip: the optimizer leaves parameters without gradients alone

    @override
    def configure_optimizers(self):
        """The injected optimizer (and step-wise schedule), bound to the sharded parameters."""
        if self.optimizer_factory is None:
            raise ConfigError("this module was built for evaluation (no module.optimizer); it cannot train")
        optimizer = collectives.optimizer_for(self.optimizer_factory, list(self.parameters()))
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class PerplexityFromSums(Metric):
    """exp(summed negative log-likelihood / tokens), from each batch's sums: torchmetrics' Perplexity
    without needing the (tokens x vocabulary) logits."""

    def __init__(self) -> None:
        super().__init__()
        self.add_state("nll", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    @override
    def update(self, nll_sum: Tensor, tokens: Tensor) -> None:
        self.nll += nll_sum.detach().to(torch.float64)
        self.tokens += tokens.to(torch.float64)

    @override
    def compute(self) -> Tensor:
        return torch.exp(self.nll / self.tokens).float()


def token_loss(logits: Tensor, target: Tensor, label_smoothing: float = 0.0, dp_group=None) -> tuple[Tensor, Tensor]:
    """-> (loss to backpropagate, global mean loss per token for logging).

    The mean is over all target tokens of the global batch, not a mean of per-rank means:
    with ``dp_group`` (FSDP averages gradients over it) the gradient is exactly the dp=1 one."""
    return per_global_token(token_loss_sum(logits, target, label_smoothing), target, dp_group)


def token_loss_sum(logits: Tensor, target: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """logits (B, T, V), target (B, T) -> the label-smoothed cross-entropy summed over non-PAD tokens:
    ``F.cross_entropy``'s value and gradient, the gradient computed in the same pass (losses.py)."""
    return smoothed_cross_entropy_sum(logits.flatten(0, 1).float(), target.flatten(), PAD_ID, label_smoothing)


def per_global_token(token_loss_sum: Tensor, target: Tensor, dp_group=None) -> tuple[Tensor, Tensor]:
    """This rank's summed token loss -> :func:`token_loss`'s pair: (loss to backpropagate, global mean)."""
    totals = torch.stack([token_loss_sum.detach(), (target != PAD_ID).sum().float()])
    dp_size = 1
    if dp_group is not None:
        collectives.all_reduce_sum(totals, dp_group)
        dp_size = torch.distributed.get_world_size(dp_group)
    global_tokens = totals[1].clamp(min=1)
    return token_loss_sum * dp_size / global_tokens, totals[0] / global_tokens
