"""Activation checkpointing on one device: full and selective give the gradients of none (dropout on,
the same random stream), keep less for backward, compile, and never make the monitor count twice."""

from __future__ import annotations

import pytest
import torch

from helpers.models import TINY
from mha_lightning.distributed.activation_checkpointing import apply_activation_checkpointing
from mha_lightning.model import ProbingCore, Seq2SeqTransformer
from mha_lightning.monitor.entropy import HeadEntropyAccumulator

DROPOUT = {"dropout": 0.2, "attention_dropout": 0.2}


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    src = torch.randint(4, TINY["vocab_size"], (6, 9), generator=g)
    tgt_in = torch.randint(4, TINY["vocab_size"], (6, 8), generator=g)
    tgt_out = torch.randint(4, TINY["vocab_size"], (6, 8), generator=g)
    src[1, 5:], tgt_in[2, 4:], tgt_out[2, 3:] = 0, 0, 0  # padding
    return src, tgt_in, tgt_out


def step(mode: str, compiled: bool = False, dropout: bool = True) -> tuple[float, dict[str, torch.Tensor], int]:
    """One training forward/backward -> (loss, gradients, bytes autograd saved outside checkpointed layers)."""
    torch.manual_seed(0)
    model = Seq2SeqTransformer(**{**TINY, **(DROPOUT if dropout else {})}).train()
    apply_activation_checkpointing(model, mode)
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    run = torch.compile(model.teacher_forced_loss, backend="aot_eager") if compiled else model.teacher_forced_loss
    torch.manual_seed(1)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = run(*batch(), 0.1)
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters()}, saved[0]


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_checkpointing_gives_the_gradients_of_none_with_dropout(mode):
    loss, grads, saved = step("none")
    got_loss, got_grads, got_saved = step(mode)
    assert got_loss == loss  # the same dropout masks: the recomputation restores the random stream
    for name, ref in grads.items():
        torch.testing.assert_close(got_grads[name], ref, atol=1e-6, rtol=1e-5, msg=name)
    assert got_saved < saved / 4  # what the layers kept is gone from autograd's graph


def test_checkpointing_compiles_and_keeps_the_gradients():
    # Without dropout: compiled code draws its own masks, in an order checkpointing changes.
    loss, grads, _ = step("none", dropout=False)
    got_loss, got_grads, _ = step("full", compiled=True, dropout=False)
    assert got_loss == pytest.approx(loss, rel=1e-6)
    for name, ref in grads.items():
        torch.testing.assert_close(got_grads[name], ref, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_the_recomputation_is_not_observed_twice(mode):
    counts = {}
    for m in ("none", mode):
        torch.manual_seed(0)
        model = Seq2SeqTransformer(**TINY).train()
        apply_activation_checkpointing(model, m)
        accumulators = {
            (kind, layer): HeadEntropyAccumulator(TINY["num_heads"])
            for kind, mods in model.attention_layers().items()
            for layer in range(len(mods))
        }
        model.set_attention_core(lambda kind, layer, found=accumulators: ProbingCore(found[kind, layer]))
        loss, _ = model.teacher_forced_loss(*batch(), 0.1)
        loss.backward()  # the recomputation runs the probing cores again
        counts[m] = torch.stack([acc.state for acc in accumulators.values()])
    torch.testing.assert_close(counts[mode], counts["none"])


def test_an_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="sometimes"):
        apply_activation_checkpointing(Seq2SeqTransformer(**TINY), "sometimes")
