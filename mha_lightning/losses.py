"""Label-smoothed cross-entropy over the vocabulary with its gradient computed in the same pass.

``F.cross_entropy`` with label smoothing walks the (tokens, vocabulary) logits about eight times
(log-softmax, the target gather, the smoothing sum, and as many passes again backwards); with a
vocabulary of 8000 that tensor is the largest of the training step. Here each block of rows is
read once while it is in cache: its log-sum-exp, its loss and its gradient (softmax minus the
smoothed target) come out of that one visit, and backward only scales the stored gradient
(docs/design.md, "Training speed").
"""

from __future__ import annotations

import torch
from torch import Tensor

# Logits per block on CPU: 2**21 fp32 values (8 MB, 262 rows of an 8000-word vocabulary) stay in cache
# between the passes. A GPU gains nothing from blocks (its passes stream anyway): one block there.
CPU_BLOCK_ELEMENTS = 2**21


class _SmoothedCrossEntropySum(torch.autograd.Function):
    """Sum over non-ignored rows of the label-smoothed cross-entropy (as ``F.cross_entropy`` defines it)."""

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, ignore_index: int, smoothing: float) -> Tensor:
        N, V = logits.shape  # (tokens, vocabulary)
        grad = torch.empty_like(logits)  # d(loss)/d(logits), filled block by block
        row_loss = logits.new_empty(N)
        rows = max(1, CPU_BLOCK_ELEMENTS // V) if logits.device.type == "cpu" else max(1, N)
        for start in range(0, N, rows):
            x, g = logits[start : start + rows], grad[start : start + rows]  # (n, V)
            t = target[start : start + rows]
            valid = t != ignore_index
            t = torch.where(valid, t, 0).unsqueeze(1)  # (n, 1): any index for ignored rows
            peak = x.amax(-1, keepdim=True)
            torch.sub(x, peak, out=g).exp_()  # g = exp(x - max)
            total = g.sum(-1, keepdim=True)
            log_z = (peak + total.log()).squeeze(1)  # (n,) log-sum-exp
            # -(1 - e) log p_t - (e / V) sum_j log p_j, with log p_j = x_j - log_z
            loss = log_z - (1 - smoothing) * x.gather(1, t).squeeze(1) - (smoothing / V) * x.sum(-1)
            row_loss[start : start + rows] = torch.where(valid, loss, 0.0)
            # softmax - smoothed one-hot; zero for ignored rows (masked_fill: a NaN there must not stay)
            g.div_(total).sub_(smoothing / V)
            g.scatter_add_(1, t, g.new_full(t.shape, -(1 - smoothing)))
            g.masked_fill_(~valid.unsqueeze(1), 0.0)
        ctx.save_for_backward(grad)
        return row_loss.sum()

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_output, None, None, None


def smoothed_cross_entropy_sum(logits: Tensor, target: Tensor, ignore_index: int, label_smoothing: float) -> Tensor:
    """logits (N, V) fp32, target (N,) -> the summed label-smoothed cross-entropy of non-ignored rows.

    Equal to ``F.cross_entropy(logits, target, ignore_index=..., label_smoothing=..., reduction="sum")``
    in value and gradient (fp32 rounding apart)."""
    if not logits.requires_grad:  # evaluation: nothing to fuse the gradient into
        return torch.nn.functional.cross_entropy(
            logits, target, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction="sum"
        )
    return _SmoothedCrossEntropySum.apply(logits, target, ignore_index, float(label_smoothing))
