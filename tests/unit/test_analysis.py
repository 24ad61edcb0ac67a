"""The pieces of `mha-analyze`: head gates and masks, importance, Jensen-Shannon distance, pruning orders."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mha_lightning.analysis.heads import js_distance, measure_heads
from mha_lightning.analysis.pruning import curve_points, prunable, random_order, ranked_heads, refine_removable
from mha_lightning.data.batching import collate
from mha_lightning.errors import ConfigError
from mha_lightning.kinds import Head
from mha_lightning.model import Seq2SeqTransformer

TINY = dict(vocab_size=20, d_model=32, num_heads=4, num_encoder_layers=2, num_decoder_layers=2, ffn_dim=64)


def pairs(n: int, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        src = torch.randint(4, 20, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
        out.append((src, src[::-1]))
    return out


def test_a_masked_head_is_a_head_whose_output_columns_are_zero():
    torch.manual_seed(0)
    masked = Seq2SeqTransformer(**TINY, head_mask=["cross/L1/H2", "enc_self/L0/H0"])
    plain = Seq2SeqTransformer(**TINY)
    plain.load_state_dict(masked.state_dict())  # the mask is config, not state: same keys, same weights
    hd = plain.config.head_dim
    with torch.no_grad():
        plain.decoder_layers[1].cross_attn.o.weight[:, 2 * hd : 3 * hd] = 0.0
        plain.encoder_layers[0].self_attn.o.weight[:, 0:hd] = 0.0
    batch = collate(pairs(5))
    masked.eval(), plain.eval()
    torch.testing.assert_close(masked(batch["src"], batch["tgt_in"]), plain(batch["src"], batch["tgt_in"]))
    assert masked.hparams()["head_mask"] == ["cross/L1/H2", "enc_self/L0/H0"]


@pytest.mark.parametrize(
    "mask, needle",
    [
        (["cross/L2/H0"], "model.head_mask: cross/L2/H0 does not exist; cross has layers 0-1 and heads 0-3"),
        (["cross/L0/H4"], "model.head_mask: cross/L0/H4 does not exist"),
        (["decoder/L0/H0"], "model.head_mask: 'decoder/L0/H0' is not a head name; write <kind>/L<layer>/H<head>"),
        ("cross/L0/H0", "model.head_mask must be a list of head names"),
    ],
)
def test_a_bad_head_mask_is_one_line_naming_it(mask, needle):
    with pytest.raises(ConfigError) as e:
        Seq2SeqTransformer(**TINY, head_mask=mask)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_importance_is_the_gate_gradient_of_each_example_and_zero_for_a_masked_head():
    torch.manual_seed(1)
    model = Seq2SeqTransformer(**TINY, head_mask=["dec_self/L1/H3"])
    data = pairs(3, seed=2)
    stats, _ = measure_heads(model, [(collate(data), data)], local_heads=4, progress=False)
    assert stats.importance["dec_self"][1, 3] == 0.0
    assert (stats.importance["enc_self"] > 0).all()

    # Finite differences of each example's own loss in one gate (fp64 for the check).
    model = model.double()
    attn = model.decoder_layers[0].cross_attn
    expected = 0.0

    def loss_at(batch, g: float) -> float:
        gate = torch.ones(4, dtype=torch.float64)
        gate[1] = g
        attn.set_head_gate(gate)
        with torch.no_grad():  # the example's mean token cross-entropy, in fp64 throughout
            logits, target = model(batch["src"], batch["tgt_in"]), batch["tgt_out"]
            return float(
                F.cross_entropy(logits.transpose(1, 2), target, ignore_index=0, reduction="sum") / target.ne(0).sum()
            )

    eps = 1e-6
    for src_tgt in data:
        batch = collate([src_tgt])
        expected += abs(loss_at(batch, 1 + eps) - loss_at(batch, 1 - eps)) / (2 * eps)
    attn.set_head_gate(None)
    assert stats.importance["cross"][0, 1] == pytest.approx(expected / len(data), rel=1e-4)
    norm = stats.importance_norm["cross"][0]
    assert np.linalg.norm(norm) == pytest.approx(1.0)


def test_js_distance_is_zero_for_equal_one_for_disjoint_and_matches_the_definition():
    p = torch.tensor([0.5, 0.5, 0.0, 0.0])
    q = torch.tensor([0.0, 0.0, 0.25, 0.75])
    r = torch.softmax(torch.randn(4, generator=torch.Generator().manual_seed(3)), 0)
    probs = torch.stack([p, q, r]).view(1, 3, 1, 4)  # (B=1, H=3, Tq=1, Tk=4)
    d = js_distance(probs)[0, :, :, 0]
    assert d[0, 0] == 0.0 and d[0, 1] == pytest.approx(1.0)

    def reference(a: np.ndarray, b: np.ndarray) -> float:
        m = (a + b) / 2
        kl = lambda x, y: sum(xi * math.log2(xi / yi) for xi, yi in zip(x, y, strict=True) if xi > 0)  # noqa: E731
        return math.sqrt((kl(a, m) + kl(b, m)) / 2)

    for i in range(3):
        for j in range(3):
            assert float(d[i, j]) == pytest.approx(reference(probs[0, i, 0].numpy(), probs[0, j, 0].numpy()), abs=1e-6)


def test_pruning_orders_points_and_the_removable_count():
    importance = {"enc_self": np.array([[0.3, 0.1]]), "cross": np.array([[0.2, 0.0]])}
    order = ranked_heads(importance, skip=[Head("cross", 0, 1)])
    assert [str(h) for h in order] == ["enc_self/L0/H1", "cross/L0/H0", "enc_self/L0/H0"]
    assert [str(h) for h in ranked_heads(importance, descending=True)][0] == "enc_self/L0/H0"
    assert sorted(random_order(order, 0)) == sorted(order) and random_order(order, 0) == random_order(order, 0)
    assert curve_points(24, 7) == [0, 4, 8, 12, 16, 20, 24]
    assert curve_points(3, 13) == [0, 1, 2, 3]
    # Within 1% of 0.9 until 8 heads are gone; a later recovery does not count.
    assert prunable([0, 4, 8, 12, 16], [0.9, 0.899, 0.8911, 0.5, 0.9], 0.9, 0.01) == 8
    # Between the measured points every head count is scored in one call; the first drop ends it.
    truth, asked = {k: 1.0 if k <= 5 or k == 7 else 0.5 for k in range(13)}, []
    found = refine_removable(
        lambda ks: asked.append(ks) or [truth[k] for k in ks], [0, 4, 8, 12], [1.0, 1.0, 0.5, 0.5], 1.0
    )
    assert found == 5 and asked == [[5, 6, 7]]
    # Nothing between the points (the last point holds, or the next point is adjacent): no call.
    assert refine_removable(lambda ks: asked.append(ks) or [], [0, 1, 2], [1.0, 1.0, 1.0], 1.0) == 2
    assert len(asked) == 1


def test_head_names_round_trip_and_match_the_logged_keys():
    head = Head.parse("cross/L1/H3")
    assert head == Head("cross", 1, 3) and str(head) == "cross/L1/H3"
    with pytest.raises(ValueError, match="not a head name"):
        Head.parse("cross/1/3")
