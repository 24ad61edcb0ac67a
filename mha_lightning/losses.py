"""Label-smoothed cross-entropy over the vocabulary with its gradient computed in the same pass.

``F.cross_entropy`` with label smoothing walks the (tokens, vocabulary) logits about eight times
(log-softmax, the target gather, the smoothing sum, and as many passes again backwards); with a
vocabulary of 8000 that tensor is the largest of the training step. Here each block of rows is
read once while it is in cache: its log-sum-exp, its loss and its gradient (softmax minus the
smoothed target) come out of that one visit, and backward only scales the stored gradient
(docs/design.md, "The loss").

:func:`linear_cross_entropy_sum` takes the output projection into the same loop: each block's
logits are made from the decoder states, used and dropped, so the (tokens, vocabulary) logits
and their gradient never exist.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Logits per block on CPU: 2**22 fp32 values (16 MB, 524 rows of an 8000-word vocabulary) stay in cache
# between the passes, and the block's three matmuls are large enough to run near the machine's peak
# (docs/design.md, "The loss"). A GPU gains nothing from blocks (its passes stream anyway): one block there.
CPU_BLOCK_ELEMENTS = 2**22
# The fused output projection's blocks on a GPU: logits of at most 2**26 values (256 MB in fp32) at a time,
# instead of all (tokens x vocabulary) of them.
GPU_BLOCK_ELEMENTS = 2**26


# Columns per chunk of :func:`row_max`: its argmax runs over one chunk a row.
_ARGMAX_CHUNK = 64


def row_max(x: Tensor) -> tuple[Tensor, Tensor]:
    """x (n, V) -> (each row's maximum (n, 1), the index of its first occurrence (n,)): ``x.max(-1)``.

    On CPU ``max`` with indices and ``argmax`` are scalar loops (2.6 ms for 262 x 8000 on 2 threads),
    ``amax`` is vectorised (0.12 ms). So: the maximum of each chunk of columns with ``amax``, the first
    chunk that holds the row's maximum, and ``argmax`` within that chunk only (0.6 ms in all)."""
    n, V = x.shape
    c = _ARGMAX_CHUNK
    whole = V // c * c
    chunk_max = x[:, :whole].reshape(n, V // c, c).amax(-1)  # (n, V // c)
    if whole < V:
        chunk_max = torch.cat([chunk_max, x[:, whole:].amax(-1, keepdim=True)], dim=1)
    peak, chunk = chunk_max.max(-1, keepdim=True)  # (n, 1): the first chunk holding the maximum
    # The chunk's columns; the last chunk may be short, so clamp (a repeated last column comes after the real one).
    cols = (chunk * c + torch.arange(c, device=x.device)).clamp_max_(V - 1)  # (n, c)
    return peak, chunk.squeeze(1) * c + x.gather(1, cols).argmax(-1)


def _block_loss_and_grad_(
    x: Tensor, g: Tensor, target: Tensor, ignore_index: int, smoothing: float
) -> tuple[Tensor, Tensor]:
    """One block of logits ``x`` (n, V) fp32 -> (row losses (n,), argmax (n,)); ``g`` receives
    d(row loss)/d(x), zero on ignored rows. ``g`` may be ``x`` itself (overwritten).

    Four passes over the block: its sum, its maximum, the softmax (row by row, so each row is in L1
    cache for its three visits) and the smoothing shift. ``torch.softmax``'s exponential is
    vectorised; ``exp_`` on CPU is not, and cost more than the rest together (docs/design.md, "The loss")."""
    V = x.shape[1]
    valid = target != ignore_index
    t = torch.where(valid, target, 0).unsqueeze(1)  # (n, 1): any index for ignored rows
    # Everything read from x comes first: g may share its memory.
    picked, summed = x.gather(1, t).squeeze(1), x.sum(-1)
    peak, argmax = row_max(x)
    torch.softmax(x, -1, out=g)
    # log-sum-exp from the softmax at the row's maximum, 1 / sum(exp(x - max)): at least 1/V, so its log is exact
    log_z = (peak - g.gather(1, argmax.unsqueeze(1)).log()).squeeze(1)  # (n,)
    # -(1 - e) log p_t - (e / V) sum_j log p_j, with log p_j = x_j - log_z
    loss = log_z - (1 - smoothing) * picked - (smoothing / V) * summed
    # softmax - smoothed one-hot; zero for ignored rows (filled, not multiplied: a NaN there must not stay)
    g.sub_(smoothing / V)
    g.scatter_add_(1, t, g.new_full(t.shape, -(1 - smoothing)))
    g.index_fill_(0, (~valid).nonzero().squeeze(1), 0.0)  # masked_fill_ with a (n, 1) mask walks all of g
    return torch.where(valid, loss, 0.0), argmax


def _rows_per_block(device: torch.device, vocab: int, gpu_elements: int) -> int:
    """Rows of logits per block: ``CPU_BLOCK_ELEMENTS`` values on CPU, ``gpu_elements`` elsewhere."""
    return max(1, (CPU_BLOCK_ELEMENTS if device.type == "cpu" else gpu_elements) // vocab)


class _SmoothedCrossEntropySum(torch.autograd.Function):
    """Sum over non-ignored rows of the label-smoothed cross-entropy (as ``F.cross_entropy`` defines it)."""

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, ignore_index: int, smoothing: float) -> Tensor:
        N, V = logits.shape  # (tokens, vocabulary)
        grad = torch.empty_like(logits)  # d(loss)/d(logits), filled block by block
        row_loss = logits.new_empty(N)
        rows = _rows_per_block(logits.device, V, gpu_elements=N * V)  # GPU: one block
        for start in range(0, N, rows):
            block = slice(start, start + rows)
            x, g, t = logits[block], grad[block], target[block]
            row_loss[block] = _block_loss_and_grad_(x, g, t, ignore_index, smoothing)[0]
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


class _LinearCrossEntropySum(torch.autograd.Function):
    """``smoothed_cross_entropy_sum(hidden @ weight.T, ...)`` and the argmax, one block of rows at a time:
    each block's logits are made, turned into their gradient in place, and multiplied back into the
    gradients of ``hidden`` and ``weight`` before the next block, so the (N, V) logits never exist."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, target: Tensor, ignore_index: int, smoothing: float):
        N, V = hidden.shape[0], weight.shape[0]
        device = hidden.device.type
        # Under autocast the matmuls run in its dtype, as nn.Linear's would; the loss in fp32.
        compute = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        with torch.autocast(device, enabled=False):
            h, w = hidden.to(compute), weight.to(compute)
            grad_h = torch.empty_like(hidden)
            # Written by the first block (zeros only when there is none).
            grad_w = (torch.empty if N else torch.zeros)(
                weight.shape, dtype=torch.promote_types(weight.dtype, torch.float32), device=w.device
            )
            row_loss = hidden.new_empty(N, dtype=torch.float32)
            argmax = target.new_empty(N)
            rows = _rows_per_block(hidden.device, V, GPU_BLOCK_ELEMENTS)
            for start in range(0, N, rows):
                block = slice(start, start + rows)
                x = (h[block] @ w.t()).float()  # (n, V): this block's logits
                row_loss[block], argmax[block] = _block_loss_and_grad_(x, x, target[block], ignore_index, smoothing)
                g = x.to(compute)
                grad_h[block] = g @ w
                first = start == 0  # the first block writes grad_w, the others add to it: no zero-filled start
                if grad_w.dtype == compute:
                    grad_w.addmm_(g.t(), h[block], beta=0 if first else 1)  # beta=0: the empty start is not read
                elif first:
                    grad_w.copy_(g.t() @ h[block])
                else:
                    grad_w += (g.t() @ h[block]).to(grad_w.dtype)
        ctx.grads = grad_h, grad_w.to(weight.dtype)
        ctx.mark_non_differentiable(argmax)
        return row_loss.sum(), argmax

    @staticmethod
    def backward(ctx, grad_output: Tensor, _argmax_grad):
        if ctx.grads is None:
            raise RuntimeError("the fused loss keeps its gradients for one backward pass only")
        grad_h, grad_w = ctx.grads
        ctx.grads = None
        return grad_h.mul_(grad_output), grad_w.mul_(grad_output), None, None, None


def linear_cross_entropy_sum(
    hidden: Tensor, weight: Tensor, target: Tensor, ignore_index: int, label_smoothing: float
) -> tuple[Tensor, Tensor]:
    """hidden (N, D), weight (V, D) of a bias-free output projection, target (N,) -> (the summed
    label-smoothed cross-entropy of ``hidden @ weight.T`` over non-ignored rows, its argmax (N,)).

    The value and gradients of ``smoothed_cross_entropy_sum(F.linear(hidden, weight), ...)``
    (fp32 rounding apart), without the (N, V) logits or their gradient: the largest tensors of a
    training step (docs/design.md, "The loss"). Without gradients it is that expression itself."""
    plain = all(type(t) in (Tensor, torch.nn.Parameter) for t in (hidden, weight))  # not DTensor
    if plain and torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropySum.apply(hidden, weight, target, ignore_index, float(label_smoothing))
    logits = torch.nn.functional.linear(hidden, weight).float()
    return smoothed_cross_entropy_sum(logits, target, ignore_index, label_smoothing), logits.argmax(-1)
