"""Activation checkpointing: keep less of each layer for backward and compute the rest again.

``parallel.activation_checkpointing`` (docs/design.md, "Activation checkpointing"):

- ``full``: a layer keeps only its input; backward runs its forward again first;
- ``selective``: a layer keeps the outputs of its matrix products, attention kernels and collectives
  (the expensive ops) and computes the cheap ones again (norms, activations, dropout, softmax,
  additions), torch's selective checkpointing (``create_selective_checkpoint_contexts``).

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
# Kept under "selective": what is costly to compute again (the projections' matrix products, attention
# kernels) or would send data again (the collectives sequence and tensor parallelism run inside a
# layer). Not the batched products of attention over short sequences (``matmul_attention``): cheap,
# and the softmax scales and masks its output in place, which would corrupt a kept copy.
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


def _save_costly_ops(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _full_contexts():
    return contextlib.nullcontext(), observers_paused()


def _selective_contexts():
    forward, recompute = create_selective_checkpoint_contexts(_save_costly_ops)
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
