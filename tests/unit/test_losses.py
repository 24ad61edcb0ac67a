"""losses.smoothed_cross_entropy_sum: F.cross_entropy's value and gradient, computed in one pass per block."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mha_lightning.losses import CPU_BLOCK_ELEMENTS, smoothed_cross_entropy_sum

PAD = 0


def reference(logits, target, smoothing):
    return F.cross_entropy(logits, target, ignore_index=PAD, label_smoothing=smoothing, reduction="sum")


def value_and_grad(fn, logits, target, smoothing, scale=1.0):
    x = logits.clone().requires_grad_()
    loss = fn(x, target, smoothing) if fn is reference else fn(x, target, PAD, smoothing)
    (loss * scale).backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_value_and_gradient_equal_cross_entropy_across_blocks(smoothing):
    V = 3000
    N = 2 * (CPU_BLOCK_ELEMENTS // V) + 17  # three blocks, the last one partial
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(N, V, generator=g) * 4
    target = torch.randint(1, V, (N,), generator=g)
    target[::5] = PAD  # ignored rows: no loss, no gradient
    ours, ours_grad = value_and_grad(smoothed_cross_entropy_sum, logits, target, smoothing, scale=0.37)
    ref, ref_grad = value_and_grad(reference, logits, target, smoothing, scale=0.37)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(ours_grad, ref_grad, rtol=1e-5, atol=1e-8)
    assert ours_grad[::5].abs().max() == 0 and ours_grad[1::5].abs().max() > 0


def test_a_nan_counts_in_a_real_row_and_not_in_an_ignored_one():
    logits = torch.randn(4, 10)
    target = torch.tensor([3, PAD, 5, 7])
    with_ignored_nan = logits.clone()
    with_ignored_nan[1, 2] = float("nan")
    loss, grad = value_and_grad(smoothed_cross_entropy_sum, with_ignored_nan, target, 0.1)
    ref, _ = value_and_grad(reference, logits, target, 0.1)
    torch.testing.assert_close(loss, ref)
    assert torch.isfinite(grad).all() and grad[1].abs().max() == 0
    with_real_nan = logits.clone()
    with_real_nan[2, 2] = float("nan")
    loss, _ = value_and_grad(smoothed_cross_entropy_sum, with_real_nan, target, 0.1)
    assert torch.isnan(loss)  # the module's non-finite check sees it
