"""Checks that need CUDA (marker ``gpu``; scripts/gpu_check.sh runs them): they skip without a GPU."""

from __future__ import annotations

import pytest
import torch

from mha_lightning.config import CompileConfig
from mha_lightning.data.vocab import BOS_ID, NUM_SPECIAL
from mha_lightning.losses import smoothed_cross_entropy_sum
from mha_lightning.model import Seq2SeqTransformer
from mha_lightning.module import Seq2SeqModule, token_loss

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
TINY = dict(vocab_size=64, d_model=64, num_heads=4, num_encoder_layers=2, num_decoder_layers=2, ffn_dim=128)


def bf16_losses(device: str, compile: CompileConfig | None, steps: int = 5) -> tuple[list[float], Seq2SeqModule]:
    """``steps`` AdamW steps under bf16 autocast on fixed batches -> (losses, module)."""
    torch.manual_seed(0)
    module = Seq2SeqModule(Seq2SeqTransformer(**TINY), compile=compile).to(device).train()
    module.configure_model()
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    src = torch.randint(NUM_SPECIAL, TINY["vocab_size"], (16, 12), generator=g).to(device)
    tgt = torch.randint(NUM_SPECIAL, TINY["vocab_size"], (16, 12), generator=g).to(device)
    tgt_in = torch.cat([torch.full_like(tgt[:, :1], BOS_ID), tgt[:, :-1]], dim=1)
    losses = []
    for _ in range(steps):
        with torch.autocast(device, dtype=torch.bfloat16):
            logits = module(src, tgt_in)
        loss, mean = token_loss(logits, tgt, 0.1)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(mean))
    return losses, module


def test_inductor_compiled_bf16_training_follows_eager_on_cuda():
    eager, _ = bf16_losses("cuda", None)
    compiled, module = bf16_losses("cuda", CompileConfig(enabled=True))
    assert module.compiled_calls == len(compiled)
    # bf16: inductor keeps fused intermediates in fp32 where eager rounds each op to bf16.
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=2e-2, atol=0)
    assert compiled[-1] < compiled[0]


def test_fused_loss_equals_cross_entropy_on_cuda():
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(1000, 8000, generator=g) * 4).cuda()
    target = torch.randint(1, 8000, (1000,), generator=g).cuda()
    target[::7] = 0
    grads = []
    for fn in (
        lambda x: smoothed_cross_entropy_sum(x, target, 0, 0.1),
        lambda x: torch.nn.functional.cross_entropy(x, target, ignore_index=0, label_smoothing=0.1, reduction="sum"),
    ):
        x = logits.clone().requires_grad_()
        loss = fn(x)
        loss.backward()
        grads.append((loss.detach(), x.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=0)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-5, atol=1e-8)


def test_fused_output_projection_under_bf16_autocast_follows_the_unfused_one_on_cuda():
    """linear_cross_entropy_sum on CUDA: bf16 matmuls in blocks of GPU_BLOCK_ELEMENTS logits (two blocks
    here), as close to the fp64 result as F.linear then F.cross_entropy under the same autocast."""
    from helpers.gradients import assert_as_exact_as
    from mha_lightning.losses import GPU_BLOCK_ELEMENTS, linear_cross_entropy_sum

    V, D = 32_000, 256
    N = GPU_BLOCK_ELEMENTS // V + 100
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(N, D, generator=g).cuda(), (torch.randn(V, D, generator=g) / 16).cuda()
    target = torch.randint(1, V, (N,), generator=g).cuda()
    target[::7] = 0
    results = []
    for how in ("fused", "unfused", "exact"):
        dtype = torch.float64 if how == "exact" else torch.float32
        h, w = (t.to(dtype, copy=True).requires_grad_() for t in (hidden, weight))
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=how != "exact"):
            if how == "fused":
                loss, _ = linear_cross_entropy_sum(h, w, target, 0, 0.1)
            else:
                logits = torch.nn.functional.linear(h, w).float()
                loss = smoothed_cross_entropy_sum(logits, target, 0, 0.1)
        loss.backward()
        results.append((loss.detach(), h.grad, w.grad))
    fused, unfused, exact = results
    for i in range(3):
        assert_as_exact_as(fused[i], unfused[i], exact[i], ("loss", "hidden grad", "weight grad")[i])
