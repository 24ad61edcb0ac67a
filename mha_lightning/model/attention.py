"""Multi-head attention with separate q, k, v, o projections and a swappable core.

Single-device code. Tensor parallelism (``mha_lightning.distributed``) shards q, k, v
column-wise and o row-wise, so on a sharded rank the projections simply produce fewer
heads: every reshape below infers the head count from ``head_dim``.

The projections live in :class:`MultiHeadAttention`; what happens between them (scores,
softmax, dropout, the weighted sum) is ``self.core``, a parameter-free module that the
monitor, analysis and speed work swap in without touching ``forward`` or the sharding plan
(docs/design.md, "The model and the attention core").

Incremental decoding passes a :class:`KVCache` per attention module (docs/design.md,
"Decoding with a KV cache"): an explicit object the decoding loop owns, not module state.

A head gate scales each head's output after the core (docs/design.md, "Head gates and masks"):
0 removes a head (``model.head_mask``), a gradient-carrying gate measures its importance.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import override


class AttentionMask(NamedTuple):
    """Who may attend to whom, built once per forward by the model and shared by its layers.

    ``keys`` (B, 1|Tq, Tk) bool is True where a query may attend a key (what the kernel needs);
    ``queries`` (B, Tq) bool is True for real (non-padding) query tokens. Padding queries still
    see at least one key, so no softmax row is empty; statistics skip them via ``queries``.
    """

    keys: Tensor
    queries: Tensor

    def key_counts(self) -> Tensor:
        """(B, Tq) number of keys each query may attend to."""
        B, Tq = self.queries.shape
        return self.keys.expand(B, Tq, self.keys.shape[-1]).sum(-1)


# Called by ProbingCore with (probs (B, H_local, Tq, Tk) fp32, detached; the mask).
AttentionObserver = Callable[[Tensor, AttentionMask], None]


# Training on CPU with more than one thread, attention over at most this many keys runs as two batched
# matmuls around a softmax: SDPA's flash kernel hardly gains from a second thread at these sizes, and its
# backward costs 1.1-1.5x as much. Its forward alone is the faster (decoding, evaluation), and so is all
# of it on one thread (docs/design.md, "Attention over short sequences on CPU").
CPU_MATMUL_ATTENTION_MAX_KEYS = 48


class SDPACore(nn.Module):
    """The default core: ``F.scaled_dot_product_attention`` (fused kernels where available), or, when
    gradients flow on CPU with several threads over at most ``CPU_MATMUL_ATTENTION_MAX_KEYS`` keys, the
    same maths as plain matmuls."""

    @override
    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, dropout_p: float) -> Tensor:
        """q (B, H, Tq, hd), k and v (B, H, Tk, hd) -> (B, H, Tq, hd)."""
        backward = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        short = k.shape[-2] <= CPU_MATMUL_ATTENTION_MAX_KEYS
        if backward and short and q.device.type == "cpu" and torch.get_num_threads() > 1:
            return matmul_attention(q, k, v, mask, dropout_p)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.keys.unsqueeze(1), dropout_p=dropout_p)


def matmul_attention(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, dropout_p: float) -> Tensor:
    """``F.scaled_dot_product_attention`` as its definition reads: q (B, H, Tq, hd), k and v (B, H, Tk, hd)
    -> (B, H, Tq, hd), in the inputs' dtype. Every query sees at least one key (``AttentionMask``), so no
    softmax row is empty."""
    scores = torch.matmul(q, k.transpose(-2, -1)).mul_(1 / math.sqrt(q.shape[-1]))  # (B, H, Tq, Tk)
    probs = scores.masked_fill_(~mask.keys.unsqueeze(1), float("-inf")).softmax(-1)
    return F.dropout(probs, p=dropout_p) @ v


_observers_paused = False


@contextmanager
def observers_paused() -> Iterator[None]:
    """Probing cores compute as usual but tell their observers nothing: for a forward that runs again
    what was already observed (activation checkpointing's recomputation during backward)."""
    global _observers_paused
    previous, _observers_paused = _observers_paused, True
    try:
        yield
    finally:
        _observers_paused = previous


class ProbingCore(nn.Module):
    """The readable core: the same maths as SDPA with the probabilities materialised.

    Scores and softmax run in fp32 (exact entropy even under bf16 autocast) and the
    probabilities, before dropout, go to ``observer`` (unless :func:`observers_paused`)."""

    def __init__(self, observer: AttentionObserver) -> None:
        super().__init__()
        self.observer = observer

    @override
    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, dropout_p: float) -> Tensor:
        """q (B, H, Tq, hd), k and v (B, H, Tk, hd) -> (B, H, Tq, hd)."""
        probs = attention_probs(q, k, mask)
        if not _observers_paused:
            self.observer(probs.detach(), mask)
        probs = F.dropout(probs, p=dropout_p).to(v.dtype)
        return probs @ v  # (B, H, Tq, hd)


def attention_probs(q: Tensor, k: Tensor, mask: AttentionMask) -> Tensor:
    """Softmax attention probabilities (B, H, Tq, Tk) in fp32; masked keys get exactly 0."""
    with torch.autocast(device_type=q.device.type, enabled=False):  # fp32 product, not bf16 then cast
        scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, Tq, Tk)
    scores = scores.masked_fill(~mask.keys.unsqueeze(1), float("-inf"))
    return torch.softmax(scores, dim=-1)


@dataclass
class KVCache:
    """The keys and values one attention module has computed so far while decoding.

    ``keys`` and ``values`` are (B, H_local, T, hd), None before the first step. Under tensor
    parallelism they hold this rank's heads only (the projections' local outputs).
    Self-attention appends one position per step; cross-attention fills it once from the
    encoder memory and then only reads it."""

    keys: Tensor | None = None
    values: Tensor | None = None

    @property
    def length(self) -> int:
        """Cached positions (0 when empty)."""
        return 0 if self.keys is None else self.keys.shape[2]

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Add positions k, v (B, H_local, T_new, hd) after the cached ones -> all keys and values."""
        self.keys = k if self.keys is None else torch.cat([self.keys, k], dim=2)
        self.values = v if self.values is None else torch.cat([self.values, v], dim=2)
        return self.keys, self.values

    def reorder(self, rows: Tensor) -> None:
        """Keep batch rows ``rows`` (1-D indices), in that order: beam search's surviving beams."""
        if self.keys is not None and self.values is not None:
            self.keys, self.values = self.keys[rows], self.values[rows]  # (B', H_local, T, hd)


class MultiHeadAttention(nn.Module):
    """q, k, v, o projections around ``self.core`` (default :class:`SDPACore`), and an optional
    per-head output gate ``head_gate``."""

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        head_dim: int | None = None,
        dropout: float = 0.0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim or d_model // num_heads
        inner = num_heads * self.head_dim
        self.q = nn.Linear(d_model, inner, bias=bias)
        self.k = nn.Linear(d_model, inner, bias=bias)
        self.v = nn.Linear(d_model, inner, bias=bias)
        self.o = nn.Linear(inner, d_model, bias=bias)
        self.dropout = dropout
        self.core: nn.Module = SDPACore()
        # (H_local,) or (B, H_local): each head's output is multiplied by its gate before o. Not a
        # core: the monitor swaps cores on measured steps, and a head mask must hold on every step.
        # Not saved in checkpoints (the mask travels in the model config instead).
        self.register_buffer("head_gate", None, persistent=False)

    @override
    def forward(
        self, x: Tensor, *, mask: AttentionMask, memory: Tensor | None = None, cache: KVCache | None = None
    ) -> Tensor:
        """x: (B, Tq, D) queries; memory: (B, Tk, D) keys/values, None for self-attention.

        ``mask``, ``memory`` and ``cache`` are keyword-only: the tensor-parallel plan names its
        inputs, so a new argument can never shift a layout onto the wrong tensor (``cache`` is no
        tensor and passes through the plan untouched). With a ``cache``, self-attention appends
        x's keys and values to it and attends over all of them (``mask`` covers every cached
        key); cross-attention projects ``memory`` only when the cache is empty."""
        B, Tq, _ = x.shape
        q = self._heads(self.q(x))  # (B, H_local, Tq, hd)
        if cache is not None and memory is not None and cache.length:
            k, v = cache.keys, cache.values  # the memory's keys and values: fixed for the whole sentence
        else:
            kv = x if memory is None else memory
            k, v = self._heads(self.k(kv)), self._heads(self.v(kv))  # (B, H_local, Tk, hd)
            if cache is not None:
                k, v = cache.append(k, v)
        # Cached or not, the core computes the attention, so a probing core observes decoding too.
        out = self.core(q, k, v, mask, self.dropout if self.training else 0.0)  # (B, H_local, Tq, hd)
        if self.head_gate is not None:
            gate = self.head_gate
            out = out * gate.view(gate.shape[0] if gate.dim() == 2 else 1, -1, 1, 1).to(out.dtype)
        out = out.transpose(1, 2).reshape(B, Tq, -1)  # (B, Tq, H_local * hd)
        return self.o(out)

    def set_head_gate(self, gate: Tensor | None) -> None:
        """Scale head outputs by ``gate`` ((H_local,) for every example, or (B, H_local)); None: no gate."""
        self.head_gate = gate

    def _heads(self, projected: Tensor) -> Tensor:
        """(B, T, H_local * hd) -> (B, H_local, T, hd); the head count comes from the tensor, so a
        tensor-parallel shard simply has fewer heads."""
        B, T, _ = projected.shape
        return projected.view(B, T, -1, self.head_dim).transpose(1, 2)
