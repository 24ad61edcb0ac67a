"""Gradient accumulation that stays exact on every layout (docs/design.md, "Gradient accumulation").

An optimizer step over k micro-batches must equal one step on their union, whose loss is the mean
over the union's target tokens: sum_i loss_sum_i / N with N the tokens of all k micro-batches on all
data-parallel ranks. N is known only after the last micro-batch, so each micro-batch backpropagates
its summed loss over a fixed normaliser (the first micro-batch's global tokens, so gradients keep
the size of an ordinary step) and :meth:`GradientAccumulation.finish` rescales the summed gradients
by that normaliser / N, once, before the gradient norm, clipping and the optimizer read them.

Under FSDP2 (dp > 1) the micro-batches before the last neither reduce-scatter their gradients nor
reshard the parameters after backward (``set_requires_gradient_sync(False)``,
``set_reshard_after_backward(False)``): each rank accumulates its whole (tp-local) gradients, and
the last micro-batch reduces the sum once. Model code knows nothing of this.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mha_lightning.distributed.collectives import all_reduce_sum


class GradientAccumulation:
    """The loss normalisation and FSDP2 switches of ``k`` micro-batches per optimizer step.

    Per micro-batch: :meth:`begin` (before its forward), :meth:`loss` (its backpropagated loss);
    after the window's last backward: :meth:`finish`. ``k=1`` is an ordinary step, bit for bit.
    ``defer_reduction``: reduce-scatter only after the last micro-batch; ``keep_unsharded``: also keep the
    parameters gathered between micro-batches (both on: the choice measured in docs/design.md,
    "Gradient accumulation"; scripts/bench_accumulation.py turns them off to compare)."""

    def __init__(self, k: int = 1, defer_reduction: bool = True, keep_unsharded: bool = True) -> None:
        self.k = k
        self.defer_reduction = defer_reduction
        self.keep_unsharded = keep_unsharded
        self._norm: Tensor | None = None  # the window's normaliser: its first micro-batch's global tokens
        self._totals: Tensor | None = None  # (loss sum, target tokens) of the window so far, over dp
        self.micro_batches = 0  # of the current window

    def begin(self, model: nn.Module, last: bool, first: bool) -> None:
        """Before a micro-batch's forward: ``first`` opens a window; FSDP2 reduces (and reshards) only after the
        window's ``last`` micro-batch."""
        from torch.distributed.fsdp import FSDPModule

        if first:
            self.micro_batches = 0  # a window whose step never came (a skipped one) is not carried over
        if self.k == 1:
            return
        for module in model.modules():
            if isinstance(module, FSDPModule):
                if self.defer_reduction:
                    module.set_requires_gradient_sync(last, recurse=False)
                if self.keep_unsharded:
                    module.set_reshard_after_backward(last, recurse=False)

    def loss(self, loss_sum: Tensor, target_tokens: Tensor, dp_group=None) -> tuple[Tensor, Tensor]:
        """This rank's summed token loss and target-token count -> (loss to backpropagate, this
        micro-batch's global mean loss per token, for logging).

        FSDP2 averages gradients over ``dp_group``, hence the factor dp_size: the reduced gradient is the
        sum over all ranks' tokens, over the normaliser."""
        totals = torch.stack([loss_sum.detach().float(), target_tokens.float()])
        dp_size = 1
        if dp_group is not None:
            all_reduce_sum(totals, dp_group)
            dp_size = dist.get_world_size(dp_group)
        if self.micro_batches == 0:
            self._norm = totals[1].clamp(min=1)
            self._totals = totals.clone()
        else:
            self._totals += totals
        self.micro_batches += 1
        return loss_sum * dp_size / self._norm, totals[0] / totals[1].clamp(min=1)

    def window_mean(self) -> Tensor:
        """The global mean loss per target token over the window's micro-batches so far."""
        return self._totals[0] / self._totals[1].clamp(min=1)

    @torch.no_grad()
    def finish(self, parameters: Iterable[nn.Parameter]) -> None:
        """After the window's last backward: gradients over the normaliser -> over the window's tokens."""
        if self.micro_batches > 1:
            scale = float(self._norm / self._totals[1].clamp(min=1))  # every rank holds the same value
            for p in parameters:
                if p.grad is not None:
                    p.grad.mul_(scale)
        self.micro_batches = 0
