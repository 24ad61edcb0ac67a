"""Model FLOPs of a training step: one formula for the training log's MFU and the benchmarks.

Matmuls only (2 x m x k x n each), for a batch of B sentences, S source and T target tokens (padded),
d_model D, inner width I = heads x head_dim, FFN F, vocabulary V, L_e encoder and L_d decoder layers:

    encoder layer   q, k, v, o projections 8 B S D I;  scores Q K^T and weights x V  4 B S^2 I;
                    FFN 4 B S D F
    decoder layer   self-attention 8 B T D I + 4 B T^2 I (the causal half counted whole, as the
                    kernels compute it); cross-attention q, o 4 B T D I, k, v over the memory
                    4 B S D I, scores and weighted sum 4 B T S I; FFN 4 B T D F
    output          2 B T D V
    training step   3 x forward (the backward pass is two matmuls per forward one)

Embedding lookups, norms, softmax, biases, the loss and the optimizer are not counted, nor is the
forward that activation checkpointing computes again: these are the model's FLOPs (MFU), not the
hardware's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, is_dataclass
from typing import Any


def forward_flops(config: Mapping[str, Any] | Any, batch: int, src_len: int, tgt_len: int) -> int:
    """Matmul FLOPs of one teacher-forced forward pass; ``config`` a ``TransformerConfig`` or its fields."""
    c = asdict(config) if is_dataclass(config) else dict(config)
    B, S, T = batch, src_len, tgt_len
    D, F_, V = c["d_model"], c["ffn_dim"], c["vocab_size"]
    inner = c["num_heads"] * (c.get("head_dim") or D // c["num_heads"])
    encoder = 8 * B * S * D * inner + 4 * B * S * S * inner + 4 * B * S * D * F_
    decoder = (
        8 * B * T * D * inner
        + 4 * B * T * T * inner  # self-attention
        + 4 * B * T * D * inner
        + 4 * B * S * D * inner
        + 4 * B * T * S * inner  # cross-attention
        + 4 * B * T * D * F_
    )
    output = 2 * B * T * D * V
    return c["num_encoder_layers"] * encoder + c["num_decoder_layers"] * decoder + output


def train_flops(config: Mapping[str, Any] | Any, batch: int, src_len: int, tgt_len: int) -> int:
    """Matmul FLOPs of one training step: forward + backward = 3 x forward."""
    return 3 * forward_flops(config, batch, src_len, tgt_len)
