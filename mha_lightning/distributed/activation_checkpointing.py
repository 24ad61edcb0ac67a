"""Activation checkpointing: keep less of each layer for backward and compute the rest again.

``parallel.activation_checkpointing`` (docs/design.md, "Activation checkpointing"):

- ``full``: a layer keeps only its input; backward runs its forward again first;
- ``selective``: a layer keeps the outputs of every other matrix product, of its attention kernels and
  collectives, and computes the rest again (the other products, norms, activations, dropout,
  additions): torch's selective checkpointing (``create_selective_checkpoint_contexts``) with
  torchtitan's per-op policy. Keeping every product would keep more than no checkpointing does: a
  product whose output backward does not need (o's, fc2's) would be kept as well.

Each encoder and decoder layer's ``forward`` is wrapped (``torch.utils.checkpoint``, non-reentrant),
inside the module's hooks, so FSDP2 gathers the parameters and the dropout streams are entered as
for any forward; the recomputation restores the random state first, so it draws the same dropout
masks, and it tells no probing core's observer (``observers_paused``): the monitor counts each
attention once. Parameters' names do not change, nor do checkpoints.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from mha_lightning.distributed.layout import ACTIVATION_CHECKPOINTING as MODES
from mha_lightning.model.attention import observers_paused

_aten = torch.ops.aten
_c10d = torch.ops._c10d_functional
# Kept under "selective": what is costly to compute again (the projections' matrix products, every other
# one of them, and attention kernels) or would send data again (the collectives sequence and tensor
# parallelism run inside a layer). Not the batched products of attention over short sequences
# (``matmul_attention``): cheap, and the softmax scales and masks its output in place, which would
# corrupt a kept copy.
SAVED_OPS = {
    _aten.mm.default,
    _aten.addmm.default,
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
    _c10d.all_gather_into_tensor.default,
    _c10d.reduce_scatter_tensor.default,
    _c10d.all_reduce.default,
}


PRODUCTS = {_aten.mm.default, _aten.addmm.default}


def selective_policy() -> Callable:
    """A fresh policy for one layer's forward and its recomputation: SAVED_OPS kept, but of the matrix
    products every other one (counted apart in the forward and the recomputation, which see the same
    ops in the same order). ``policy(ctx, op, *args, **kwargs)`` -> keep or compute again."""
    products = {False: 0, True: 0}

    def policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
        if op in PRODUCTS:
            products[ctx.is_recompute] += 1
            if products[ctx.is_recompute] % 2 == 0:
                return CheckpointPolicy.PREFER_RECOMPUTE
        return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def _full_contexts():
    return contextlib.nullcontext(), observers_paused()


def _selective_contexts():
    forward, recompute = create_selective_checkpoint_contexts(selective_policy())
    return forward, _Both(recompute, observers_paused())


class _Both(contextlib.AbstractContextManager):
    """Two context managers entered as one (checkpoint's context_fn returns exactly two)."""

    def __init__(self, first, second) -> None:
        self.stack = contextlib.ExitStack()
        self.first, self.second = first, second

    def __enter__(self):
        self.stack.enter_context(self.first)
        self.stack.enter_context(self.second)
        return self

    def __exit__(self, *exc):
        return self.stack.__exit__(*exc)


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """Wrap every encoder and decoder layer's forward for ``mode`` (one of ``MODES``; "none": nothing)."""
    if mode not in MODES:
        raise ValueError(f"activation checkpointing mode {mode!r} is not one of {MODES}")
    if mode == "none":
        return
    contexts = _full_contexts if mode == "full" else _selective_contexts
    for layer in [*model.encoder_layers, *model.decoder_layers]:
        layer.forward = _checkpointed(layer.forward, contexts)


def _checkpointed(forward: Callable, contexts: Callable) -> Callable:
    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():  # nothing is kept for backward anyway
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, context_fn=contexts, **kwargs)

    return run
