"""model.dropout: the CPU mask drops at the configured rate, independently, unbiased, and seeded like torch's."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mha_lightning.model.dropout import Dropout, drop_count, dropout_scale

N = 2_000_001  # odd: the last high lane is unused


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_the_mask_drops_at_the_rounded_rate_and_keeps_the_expectation(p):
    torch.manual_seed(0)
    scale = dropout_scale((N,), p)
    q = drop_count(p) / 2**15
    assert abs(q - p) <= 2**-16
    dropped = scale == 0
    sigma = math.sqrt(q * (1 - q) / N)
    assert abs(dropped.float().mean().item() - q) < 5 * sigma
    # Every kept value is exactly 1 / (1 - q): the output's expectation is the input.
    assert torch.equal(scale[~dropped], torch.full_like(scale[~dropped], 1 / (1 - q)))
    assert abs(scale.double().mean().item() - 1) < 5 * sigma / (1 - q)
    # Both lanes of a draw drop at the same rate (the low half decides the first half of the values).
    half = (N + 1) // 2
    for lane in (dropped[:half], dropped[half:]):
        assert abs(lane.float().mean().item() - q) < 5 * math.sqrt(q * (1 - q) / lane.numel())


def test_the_two_decisions_of_one_draw_are_independent():
    torch.manual_seed(1)
    dropped = dropout_scale((N,), 0.5) == 0
    half = N // 2
    low, high = dropped[:half].float(), dropped[(N + 1) // 2 :].float()  # element i and half + i share a word
    both = (low * high).mean().item()
    assert abs(both - low.mean().item() * high.mean().item()) < 5 * math.sqrt(0.25 * 0.75 / half)


def test_dropout_module_on_cpu_scales_kept_values_and_their_gradient():
    torch.manual_seed(2)
    x = torch.randn(64, 24, 512, requires_grad=True)
    out = Dropout(0.1).train()(x)
    kept = out != 0
    keep_scale = 1 / (1 - drop_count(0.1) / 2**15)
    torch.testing.assert_close(out[kept], x[kept] * keep_scale)
    out.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() * keep_scale)
    assert 0.09 < 1 - kept.float().mean().item() < 0.11


def test_seeded_masks_repeat_and_differ_between_seeds():
    x = torch.ones(4096)
    drop = Dropout(0.2).train()
    masks = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        masks.append(drop(x) == 0)
    assert torch.equal(masks[0], masks[1])
    assert not torch.equal(masks[0], masks[2])


def test_evaluation_zero_p_and_other_dtypes_behave_as_nn_dropout():
    x = torch.randn(1000)
    assert torch.equal(Dropout(0.3).eval()(x), x)
    assert torch.equal(Dropout(0.0).train()(x), x)
    # bf16 takes torch's own dropout: the same draw as nn.Dropout from the same seed.
    xb = x.to(torch.bfloat16)
    torch.manual_seed(5)
    ours = Dropout(0.3).train()(xb)
    torch.manual_seed(5)
    assert torch.equal(ours, nn.Dropout(0.3).train()(xb))


def test_a_probability_outside_the_mask_range_is_refused():
    with pytest.raises(ValueError, match="dropout probability 1.0"):
        dropout_scale((10,), 1.0)
