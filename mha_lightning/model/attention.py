"""Multi-head attention with separate q, k, v, o projections and a swappable core.

Single-device code. Tensor parallelism (``mha_lightning.parallel``) shards q, k, v
column-wise and o row-wise, so on a sharded rank the projections simply produce fewer
heads: every reshape below infers the head count from ``head_dim``.

The projections live in :class:`MultiHeadAttention`; what happens between them (scores,
softmax, dropout, the weighted sum) is ``self.core``, a parameter-free module that the
monitor, analysis and speed work swap in without touching ``forward`` or the sharding plan
(docs/design.md, "The model and the attention core").
"""

from __future__ import annotations

import math
from collections.abc import Callable
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


class SDPACore(nn.Module):
    """The default core: ``F.scaled_dot_product_attention`` (fused kernels where available)."""

    @override
    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, dropout_p: float) -> Tensor:
        """q (B, H, Tq, hd), k and v (B, H, Tk, hd) -> (B, H, Tq, hd)."""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.keys.unsqueeze(1), dropout_p=dropout_p)


class ProbingCore(nn.Module):
    """The readable core: the same maths as SDPA with the probabilities materialised.

    Scores and softmax run in fp32 (exact entropy even under bf16 autocast) and the
    probabilities, before dropout, go to ``observer``."""

    def __init__(self, observer: AttentionObserver) -> None:
        super().__init__()
        self.observer = observer

    @override
    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, dropout_p: float) -> Tensor:
        """q (B, H, Tq, hd), k and v (B, H, Tk, hd) -> (B, H, Tq, hd)."""
        probs = attention_probs(q, k, mask)
        self.observer(probs.detach(), mask)
        probs = F.dropout(probs, p=dropout_p).to(v.dtype)
        return probs @ v  # (B, H, Tq, hd)


def attention_probs(q: Tensor, k: Tensor, mask: AttentionMask) -> Tensor:
    """Softmax attention probabilities (B, H, Tq, Tk) in fp32; masked keys get exactly 0."""
    with torch.autocast(device_type=q.device.type, enabled=False):  # fp32 product, not bf16 then cast
        scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, Tq, Tk)
    scores = scores.masked_fill(~mask.keys.unsqueeze(1), float("-inf"))
    return torch.softmax(scores, dim=-1)


class MultiHeadAttention(nn.Module):
    """q, k, v, o projections around ``self.core`` (default :class:`SDPACore`)."""

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

    @override
    def forward(self, x: Tensor, *, mask: AttentionMask, memory: Tensor | None = None) -> Tensor:
        """x: (B, Tq, D) queries; memory: (B, Tk, D) keys/values, None for self-attention.

        ``mask`` and ``memory`` are keyword-only: the tensor-parallel plan names its inputs,
        so a new argument can never shift a layout onto the wrong tensor."""
        kv = x if memory is None else memory
        B, Tq, _ = x.shape
        Tk = kv.shape[1]
        q = self.q(x).view(B, Tq, -1, self.head_dim).transpose(1, 2)  # (B, H_local, Tq, hd)
        k = self.k(kv).view(B, Tk, -1, self.head_dim).transpose(1, 2)  # (B, H_local, Tk, hd)
        v = self.v(kv).view(B, Tk, -1, self.head_dim).transpose(1, 2)  # (B, H_local, Tk, hd)
        out = self.core(q, k, v, mask, self.dropout if self.training else 0.0)  # (B, H_local, Tq, hd)
        out = out.transpose(1, 2).reshape(B, Tq, -1)  # (B, Tq, H_local * hd)
        return self.o(out)
