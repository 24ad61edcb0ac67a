"""The package's one FLOP formula (perf/mfu in the training log, the benchmarks) against a hand count."""

from __future__ import annotations

from mha_lightning.model import TransformerConfig
from mha_lightning.model.flops import forward_flops, train_flops


def mm(m: int, k: int, n: int) -> int:
    """FLOPs of an (m, k) @ (k, n) matmul."""
    return 2 * m * k * n


def test_flop_count_matches_a_hand_count_of_every_matmul():
    config = dict(d_model=8, num_heads=2, head_dim=None, ffn_dim=16, vocab_size=10)
    config.update(num_encoder_layers=1, num_decoder_layers=1)
    B, S, T, D, heads, hd, F, V = 2, 3, 4, 8, 2, 4, 16, 10
    encoder = (
        4 * mm(B * S, D, D)  # q, k, v, o
        + B * heads * mm(S, hd, S)  # scores
        + B * heads * mm(S, S, hd)  # weighted sum
        + mm(B * S, D, F)
        + mm(B * S, F, D)
    )
    decoder = (
        4 * mm(B * T, D, D)  # self-attention q, k, v, o
        + B * heads * (mm(T, hd, T) + mm(T, T, hd))
        + 2 * mm(B * T, D, D)  # cross-attention q, o
        + 2 * mm(B * S, D, D)  # cross-attention k, v over the memory
        + B * heads * (mm(T, hd, S) + mm(T, S, hd))
        + mm(B * T, D, F)
        + mm(B * T, F, D)
    )
    output = mm(B * T, D, V)
    assert (encoder, decoder, output) == (6720, 13568, 1280)
    assert forward_flops(config, B, S, T) == 21568
    assert train_flops(config, B, S, T) == 3 * 21568
    # Two layers of each: the layers double, the output projection does not.
    deeper = {**config, "num_encoder_layers": 2, "num_decoder_layers": 2}
    assert forward_flops(deeper, B, S, T) == 2 * (6720 + 13568) + 1280
    # A TransformerConfig counts as its fields do (head_dim resolved: d_model / heads).
    assert forward_flops(TransformerConfig(**config), B, S, T) == 21568
