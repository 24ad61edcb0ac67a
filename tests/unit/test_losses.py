"""losses: F.cross_entropy's value and gradient, computed in one pass per block, and with the output
projection fused in (linear_cross_entropy_sum: no logits tensor)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers.gradients import assert_as_exact_as
from mha_lightning.losses import CPU_BLOCK_ELEMENTS, linear_cross_entropy_sum, row_max, smoothed_cross_entropy_sum

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


@pytest.mark.parametrize("V", [5, 64, 3000])  # one short chunk, one whole chunk, a short last chunk
def testrow_max_is_the_maximum_and_the_first_index_holding_it(V):
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 4, (50, V), generator=g).float()  # rows full of ties
    x[7, -1] = 9.0  # the maximum in the last column
    x[8, V // 2 :] = 9.0  # a tie across chunks: the first one counts
    peak, index = row_max(x)
    assert torch.equal(peak, x.amax(-1, keepdim=True)) and torch.equal(index, x.argmax(-1))
    assert index[7] == V - 1 and index[8] == V // 2


def fused_and_unfused(hidden, weight, target, smoothing, scale=0.37):
    """-> [(loss, argmax, hidden grad, weight grad)] of linear_cross_entropy_sum and of the unfused expression."""
    out = []
    for fused in (True, False):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        if fused:
            loss, argmax = linear_cross_entropy_sum(h, w, target, PAD, smoothing)
        else:
            logits = F.linear(h, w)
            loss, argmax = reference(logits, target, smoothing), logits.argmax(-1)
        (loss * scale).backward()
        out.append((loss.detach(), argmax, h.grad, w.grad))
    return out


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_fused_output_projection_equals_linear_then_cross_entropy(smoothing):
    V, D = 3000, 48
    N = 2 * (CPU_BLOCK_ELEMENTS // V) + 17  # three blocks, the last one partial
    g = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(N, D, generator=g), torch.randn(V, D, generator=g) / 3
    target = torch.randint(1, V, (N,), generator=g)
    target[::5] = PAD
    fused, unfused = fused_and_unfused(hidden, weight, target, smoothing)
    exact = fused_and_unfused(hidden.double(), weight.double(), target, smoothing)[1]
    torch.testing.assert_close(fused[0], unfused[0], rtol=1e-6, atol=0)
    assert torch.equal(fused[1], unfused[1])  # the argmax
    for i in (2, 3):  # the gradients of hidden and weight
        assert_as_exact_as(fused[i], unfused[i], exact[i])
    grad_h = fused[2]
    assert grad_h[::5].abs().max() == 0 and grad_h[1::5].abs().max() > 0  # ignored rows get no gradient


def test_fused_output_projection_never_makes_the_logits():
    V, D = 3000, 32
    N = CPU_BLOCK_ELEMENTS // V * 3 // 2  # a block and a half
    hidden = torch.randn(N, D, requires_grad=True)
    weight = torch.randn(V, D, requires_grad=True)
    target = torch.randint(1, V, (N,))
    with torch.profiler.profile(record_shapes=True) as prof:
        loss, _ = linear_cross_entropy_sum(hidden, weight, target, PAD, 0.1)
        loss.backward()
    shapes = {tuple(s) for event in prof.events() for s in event.input_shapes if s}
    assert (N, V) not in shapes and (N, D) in shapes  # the profile did record the inputs
    assert max(rows for rows, *rest in shapes if rest == [V]) == CPU_BLOCK_ELEMENTS // V


def test_fused_output_projection_under_cpu_autocast_is_as_exact_as_the_unfused_one():
    g = torch.Generator().manual_seed(2)
    hidden, weight = torch.randn(300, 32, generator=g), torch.randn(500, 32, generator=g) / 3
    target = torch.randint(1, 500, (300,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused, unfused = fused_and_unfused(hidden, weight, target, 0.1)
    exact = fused_and_unfused(hidden.double(), weight.double(), target, 0.1)[1]
    assert fused[2].dtype == fused[3].dtype == torch.float32  # the parameters' dtype, as autocast leaves it
    for i in (0, 2, 3):  # the loss, the gradients of hidden and weight: bf16 matmuls in both
        assert_as_exact_as(fused[i], unfused[i], exact[i])
    # bf16 did run: the loss is off by more than fp32 rounding would be, and by far less than a bug.
    assert 1e-6 * exact[0] < (fused[0].double() - exact[0]).abs() < 1e-3 * exact[0]


def test_without_gradients_the_fused_call_is_the_plain_expression():
    hidden, weight = torch.randn(40, 16), torch.randn(90, 16)
    target = torch.randint(1, 90, (40,))
    with torch.no_grad():
        loss, argmax = linear_cross_entropy_sum(hidden, weight, target, PAD, 0.1)
    logits = F.linear(hidden, weight)
    torch.testing.assert_close(loss, reference(logits, target, 0.1))
    assert torch.equal(argmax, logits.argmax(-1))


def test_a_second_backward_through_the_fused_loss_is_refused():
    hidden = torch.randn(8, 4, requires_grad=True)
    loss, _ = linear_cross_entropy_sum(hidden, torch.randn(6, 4), torch.randint(1, 6, (8,)), PAD, 0.0)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward pass only"):
        loss.backward()
