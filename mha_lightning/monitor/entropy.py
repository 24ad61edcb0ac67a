"""Exact per-head attention entropy, accumulated as sums and counts.

For one head and one valid query i with n_i valid keys: H_i = -sum_j p_ij log p_ij (nats),
and the normalised H_i / log(n_i) for rows with n_i > 1. A head's value over any set of
batches, ranks and shards is sum(H_i) / count: sums add exactly where means would not.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

from mha_lightning.model.attention import AttentionMask


class HeadEntropyAccumulator:
    """The attention observer for one attention module (via ``ProbingCore``): sums over its local heads."""

    def __init__(self, local_heads: int) -> None:
        self.local_heads = local_heads
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated."""
        # (4, H_local) float64: entropy sum, query count, normalised sum, normalised count.
        # Created on the first call, on the attention's device (no host sync per layer).
        self.state: Tensor | None = None

    @torch.no_grad()
    def __call__(self, probs: Tensor, mask: AttentionMask) -> None:
        """probs (B, H, Tq, Tk) fp32; mask.keys (B, 1|Tq, Tk) True = may attend; mask.queries (B, Tq)."""
        H = probs.shape[1]
        # xlogy gives 0 * log 0 = 0 for masked keys (their probability is exactly 0).
        row_entropy = -torch.special.xlogy(probs, probs).sum(-1)  # (B, H, Tq)
        n_keys = mask.key_counts()  # (B, Tq) valid keys per query
        valid = (mask.queries & (n_keys > 0)).unsqueeze(1)  # (B, 1, Tq)
        norm_valid = valid & (n_keys > 1).unsqueeze(1)
        log_n = torch.log(n_keys.clamp(min=2).double()).unsqueeze(1)  # (B, 1, Tq)
        # torch.where, never multiplication: an excluded row must not carry a NaN in.
        ent = torch.where(valid, row_entropy.double(), 0.0)
        norm = torch.where(norm_valid, row_entropy.double() / log_n, 0.0)
        update = torch.stack(
            [
                ent.sum((0, 2)),
                valid.sum((0, 2)).double().expand(H),
                norm.sum((0, 2)),
                norm_valid.sum((0, 2)).double().expand(H),
            ]
        )
        self.state = update if self.state is None else self.state + update


def global_head_state(accumulators: Iterable[HeadEntropyAccumulator], num_heads: int, tp_rank: int) -> Tensor:
    """(layers, 4, num_heads): this rank's sums placed at its heads' global indices, zeros elsewhere, on the
    device the sums are on.

    Summing this over every rank (one all-reduce) reports each head once, from the
    tensor-parallel rank that holds it, summed over the data-parallel ranks."""
    accumulators = list(accumulators)
    # On the accumulators' device: the caller's one all-reduce and one copy to the host, not one per layer.
    device = next((acc.state.device for acc in accumulators if acc.state is not None), torch.device("cpu"))
    out = torch.zeros(len(accumulators), 4, num_heads, dtype=torch.float64, device=device)
    for layer, acc in enumerate(accumulators):
        start = tp_rank * acc.local_heads
        if acc.state is not None:
            out[layer, :, start : start + acc.local_heads] = acc.state
    return out


def finalize(state: Tensor) -> tuple[Tensor, Tensor]:
    """(layers, 4, heads) summed state -> (entropy, normalised entropy), each (layers, heads); NaN if empty."""
    nan = torch.tensor(math.nan, dtype=torch.float64)
    entropy = torch.where(state[:, 1] > 0, state[:, 0] / state[:, 1].clamp(min=1), nan)
    normalised = torch.where(state[:, 3] > 0, state[:, 2] / state[:, 3].clamp(min=1), nan)
    return entropy, normalised
