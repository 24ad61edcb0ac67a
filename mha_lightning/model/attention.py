"""Multi-head attention with separate q, k, v, o projections.

Single-device code. Tensor parallelism (``mha_lightning.parallel``) shards q, k, v
column-wise and o row-wise, so on a sharded rank the projections simply produce fewer
heads: every reshape below infers the head count from ``head_dim``.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Called with (probs (B, H_local, Tq, Tk) fp32, query_valid (B, Tq) bool, key_mask (B, 1|Tq, Tk) bool).
AttentionObserver = Callable[[Tensor, Tensor, Tensor], None]


class MultiHeadAttention(nn.Module):
    def __init__(
        self,
        d_model: int,
        num_heads: int,
        head_dim: Optional[int] = None,
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
        # Set by the entropy monitor on the steps it measures; None means the fast path.
        self.observer: Optional[AttentionObserver] = None

    def forward(
        self,
        x: Tensor,
        memory: Optional[Tensor],
        mask: Tensor,
        query_valid: Tensor,
    ) -> Tensor:
        """x: (B, Tq, D) queries; memory: (B, Tk, D) keys/values or None for self-attention;
        mask: (B, 1|Tq, Tk) bool, True where a query may attend; query_valid: (B, Tq) bool."""
        kv = x if memory is None else memory
        B, Tq, _ = x.shape
        Tk = kv.shape[1]
        q = self.q(x).view(B, Tq, -1, self.head_dim).transpose(1, 2)  # (B, H_local, Tq, hd)
        k = self.k(kv).view(B, Tk, -1, self.head_dim).transpose(1, 2)  # (B, H_local, Tk, hd)
        v = self.v(kv).view(B, Tk, -1, self.head_dim).transpose(1, 2)  # (B, H_local, Tk, hd)
        attn_mask = mask.unsqueeze(1)  # (B, 1, 1|Tq, Tk), broadcast over heads
        p_drop = self.dropout if self.training else 0.0

        if self.observer is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p_drop)
        else:
            out = self._explicit_attention(q, k, v, attn_mask, p_drop, mask, query_valid)

        out = out.transpose(1, 2).reshape(B, Tq, -1)  # (B, Tq, H_local * hd)
        return self.o(out)

    def _explicit_attention(self, q, k, v, attn_mask, p_drop, mask, query_valid) -> Tensor:
        # The readable path: same maths as SDPA, but the probabilities are materialised
        # (in fp32, so entropy is exact even under bf16 autocast) for the observer.
        with torch.autocast(device_type=q.device.type, enabled=False):  # fp32 product, not bf16 then cast
            scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(self.head_dim)  # (B, H, Tq, Tk)
        scores = scores.masked_fill(~attn_mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        self.observer(probs.detach(), query_valid, mask)
        probs = F.dropout(probs, p=p_drop).to(v.dtype)
        return probs @ v  # (B, H, Tq, hd)
