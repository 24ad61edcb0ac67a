"""The tiny model the unit and distributed tests share: small enough for 4 gloo processes on 2 cores."""

from __future__ import annotations

import torch

from mha_lightning.model import Seq2SeqTransformer

TINY = dict(
    vocab_size=20,
    d_model=32,
    num_heads=4,
    num_encoder_layers=2,
    num_decoder_layers=2,
    ffn_dim=64,
    dropout=0.0,
    attention_dropout=0.0,
    max_len=32,
)


def tiny(seed: int = 0, **overrides) -> Seq2SeqTransformer:
    """A freshly initialised tiny model (seeded), in eval mode; ``overrides`` change TINY's settings."""
    torch.manual_seed(seed)
    return Seq2SeqTransformer(**{**TINY, **overrides}).eval()
