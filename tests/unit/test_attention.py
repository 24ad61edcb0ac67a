"""The default attention core's two CPU paths: SDPA's kernel, and over short sequences the same maths
as plain matmuls (matmul_attention); both equal F.scaled_dot_product_attention in value and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers.gradients import assert_as_exact_as
from mha_lightning.model import AttentionMask, SDPACore
from mha_lightning.model.attention import CPU_MATMUL_ATTENTION_MAX_KEYS, matmul_attention

B, H, HD = 3, 4, 16


def masked_inputs(Tq: int, Tk: int, causal: bool):
    """q, k, v (B, H, T, hd) and a mask with padded keys (and a causal one for self-attention)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, T, HD, generator=g) for T in (Tq, Tk, Tk))
    lengths = torch.tensor([Tk, Tk - 3, max(1, Tk // 2)])
    keys = (torch.arange(Tk) < lengths[:, None]).unsqueeze(1)  # (B, 1, Tk): padding
    if causal:
        keys = keys & torch.ones(Tq, Tk, dtype=torch.bool).tril()  # (B, Tq, Tk)
    return q, k, v, AttentionMask(keys=keys, queries=torch.ones(B, Tq, dtype=torch.bool))


def value_and_grads(attend, q, k, v, mask):
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out = attend(q, k, v, mask)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


def sdpa(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.keys.unsqueeze(1))


@pytest.mark.parametrize("causal", [True, False], ids=["self_causal", "cross_padded"])
def test_matmul_attention_equals_sdpa_in_value_and_gradients(causal):
    inputs = masked_inputs(20, 20 if causal else 27, causal)
    ours = value_and_grads(lambda q, k, v, m: matmul_attention(q, k, v, m, 0.0), *inputs)
    kernel = value_and_grads(sdpa, *inputs)
    exact = value_and_grads(sdpa, *(t.double() for t in inputs[:3]), inputs[3])
    for mine, theirs, truth in zip(ours, kernel, exact, strict=True):
        assert_as_exact_as(mine, theirs, truth)
    assert ours[2][0].abs().max() > 0 and ours[2][2, :, -1].abs().max() == 0  # padded keys get no gradient


def test_sdpa_core_runs_matmuls_for_training_on_several_threads_over_short_keys_and_the_kernel_otherwise():
    def ops(Tk, n_threads, grad=True):
        torch.set_num_threads(n_threads)  # conftest's autouse fixture restores the count
        q, k, v, mask = masked_inputs(8, Tk, causal=False)
        with torch.set_grad_enabled(grad), torch.profiler.profile() as prof:
            out = SDPACore()(q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), mask, 0.0)
        torch.testing.assert_close(out, sdpa(q, k, v, mask), atol=1e-5, rtol=1e-5)
        return {e.name for e in prof.events()}

    flash = "aten::_scaled_dot_product_flash_attention_for_cpu"
    short = ops(CPU_MATMUL_ATTENTION_MAX_KEYS, 2)
    assert flash not in short and "aten::softmax" in short
    assert flash in ops(CPU_MATMUL_ATTENTION_MAX_KEYS + 1, 2)
    assert flash in ops(CPU_MATMUL_ATTENTION_MAX_KEYS, 1)  # one thread: the kernel is the faster there
    assert flash in ops(CPU_MATMUL_ATTENTION_MAX_KEYS, 2, grad=False)  # forward only (decoding): the kernel too


def test_matmul_attention_drops_probabilities_like_sdpa():
    q, k, v, mask = masked_inputs(10, 10, causal=True)
    assert matmul_attention(q, k, v, mask, 1.0).abs().max() == 0  # every probability dropped
    torch.manual_seed(0)
    dropped = matmul_attention(q, k, v, mask, 0.5)
    torch.manual_seed(0)
    assert torch.equal(dropped, matmul_attention(q, k, v, mask, 0.5))  # seeded
    kept = matmul_attention(q, k, v, mask, 0.0)
    assert not torch.allclose(dropped, kept)
    # Expectation: the mean over many draws approaches the undropped output.
    mean = torch.stack([matmul_attention(q, k, v, mask, 0.5) for _ in range(400)]).mean(0)
    assert (mean - kept).abs().mean() < 0.1 * kept.abs().mean()
