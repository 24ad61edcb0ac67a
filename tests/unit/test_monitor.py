"""Per-head attention entropy against an independent, naive reference."""

from __future__ import annotations

import math

import numpy as np
import torch

from helpers.models import tiny
from mha_lightning.model import AttentionMask, ProbingCore, SDPACore, Seq2SeqTransformer
from mha_lightning.monitor.entropy import HeadEntropyAccumulator, finalize, global_head_state

PAD = 0


def tiny_model() -> Seq2SeqTransformer:
    return tiny(max_len=64)


def naive_head_entropy(probs, query_valid, mask):
    """Loop-by-loop definition: mean over valid queries of -sum_j p log p over valid keys."""
    B, H, Tq, Tk = probs.shape
    mask = mask.expand(B, Tq, Tk)  # (B, Tq, Tk) keys each query may attend
    ent, norm = [[] for _ in range(H)], [[] for _ in range(H)]
    for b in range(B):
        for i in range(Tq):
            if not query_valid[b, i]:
                continue
            keys = [j for j in range(Tk) if mask[b, i, j]]
            for h in range(H):
                value = -sum(
                    float(probs[b, h, i, j]) * math.log(float(probs[b, h, i, j])) for j in keys if probs[b, h, i, j] > 0
                )
                ent[h].append(value)
                if len(keys) > 1:
                    norm[h].append(value / math.log(len(keys)))
    return np.array([np.mean(e) for e in ent]), np.array([np.mean(n) for n in norm])


def measure(model, src, tgt_in):
    """Run one forward with accumulators attached -> {kind: (entropy (L, H), normalised (L, H))}."""
    layers = model.attention_layers()
    accs = {kind: [HeadEntropyAccumulator(model.config.num_heads) for _ in mods] for kind, mods in layers.items()}
    with torch.no_grad(), model.attention_core(lambda kind, layer: ProbingCore(accs[kind][layer])):
        model(src, tgt_in)
    return {
        kind: tuple(t.numpy() for t in finalize(global_head_state(a, model.config.num_heads, 0)))
        for kind, a in accs.items()
    }, accs


def padded_batch():
    src = torch.tensor([[5, 6, 7, 8, 9, 2], [5, 6, 2, PAD, PAD, PAD], [7, 7, 7, 2, PAD, PAD]])
    tgt = torch.tensor([[1, 9, 8, 7, 6, 5], [1, 6, 5, PAD, PAD, PAD], [1, 7, 7, 7, PAD, PAD]])
    return src, tgt


def test_zero_query_key_weights_give_log_n_valid_for_every_head():
    model = tiny_model()
    for mods in model.attention_layers().values():
        for attn in mods:
            for lin in (attn.q, attn.k):
                torch.nn.init.zeros_(lin.weight)
                torch.nn.init.zeros_(lin.bias)
    src, tgt = padded_batch()
    values, _ = measure(model, src, tgt)
    src_len = (src != PAD).sum(1).double()
    tgt_len = (tgt != PAD).sum(1)
    # Uniform attention over n valid keys has entropy log(n).
    expected_enc = (src_len * src_len.log()).sum() / src_len.sum()  # every source query sees all its keys
    expected_cross = sum(int(t) * math.log(float(s)) for t, s in zip(tgt_len, src_len, strict=True)) / tgt_len.sum()
    # Causal rows: query i sees i + 1 keys.
    causal = [math.log(i + 1) for t in tgt_len for i in range(int(t))]
    expected_dec = sum(causal) / len(causal)
    np.testing.assert_allclose(values["enc_self"][0], float(expected_enc), rtol=1e-6)
    np.testing.assert_allclose(values["cross"][0], float(expected_cross), rtol=1e-6)
    np.testing.assert_allclose(values["dec_self"][0], expected_dec, rtol=1e-6)
    # Normalised entropy of a uniform row is exactly 1.
    for kind in values:
        np.testing.assert_allclose(values[kind][1], 1.0, rtol=1e-6)


def test_one_hot_attention_gives_zero_and_masked_rows_never_nan():
    B, H, T = 2, 3, 5
    probs = torch.zeros(B, H, T, T)
    probs[..., 0] = 1.0  # every query attends to key 0 only
    mask = torch.ones(B, 1, T, dtype=torch.bool)
    query_valid = torch.ones(B, T, dtype=torch.bool)
    query_valid[1, 3:] = False
    probs[1, :, 3:] = float("nan")  # a padded query row may hold anything: it must not leak
    acc = HeadEntropyAccumulator(H)
    acc(probs, AttentionMask(mask, query_valid))
    ent, norm = finalize(global_head_state([acc], H, 0))
    assert torch.equal(ent, torch.zeros(1, H, dtype=torch.float64))
    assert torch.equal(norm, torch.zeros(1, H, dtype=torch.float64))
    assert acc.state[1, 0] == B * T - 2  # valid query count excludes the padded rows


def test_random_model_matches_naive_reference_per_head():
    model = tiny_model()
    src, tgt = padded_batch()
    captured = {}

    def capture(kind, layer):
        def observer(probs, mask):
            captured[kind, layer] = (probs.clone(), mask.queries.clone(), mask.keys.clone())

        return ProbingCore(observer)

    with torch.no_grad(), model.attention_core(capture):
        model(src, tgt)
    values, _ = measure(model, src, tgt)
    for (kind, layer), (probs, qv, mask) in captured.items():
        ent, norm = naive_head_entropy(probs, qv, mask)
        np.testing.assert_allclose(values[kind][0][layer], ent, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(values[kind][1][layer], norm, rtol=1e-6, atol=1e-9)


def test_padded_batch_equals_sentences_one_by_one():
    model = tiny_model()
    src, tgt = padded_batch()
    _, batched = measure(model, src, tgt)
    totals = {kind: [torch.zeros(4, 4, dtype=torch.float64) for _ in accs] for kind, accs in batched.items()}
    for b in range(src.shape[0]):
        s = src[b : b + 1, : int((src[b] != PAD).sum())]
        t = tgt[b : b + 1, : int((tgt[b] != PAD).sum())]
        _, single = measure(model, s, t)
        for kind, accs in single.items():
            for layer, acc in enumerate(accs):
                totals[kind][layer] += acc.state
    for kind, accs in batched.items():
        for layer, acc in enumerate(accs):
            # Sums and counts add up exactly, so the per-head means agree too.
            torch.testing.assert_close(acc.state, totals[kind][layer], rtol=1e-6, atol=1e-6)


def test_causal_rows_use_i_plus_one_keys():
    T = 4
    probs = torch.zeros(1, 1, T, T)
    mask = torch.ones(T, T, dtype=torch.bool).tril().unsqueeze(0)  # (1, T, T)
    for i in range(T):
        probs[0, 0, i, : i + 1] = 1.0 / (i + 1)
    acc = HeadEntropyAccumulator(1)
    acc(probs, AttentionMask(mask, torch.ones(1, T, dtype=torch.bool)))
    sums = acc.state[:, 0]
    assert sums[1] == T  # every row counts for the entropy
    assert sums[3] == T - 1  # the first row has one key: no normalised value
    # fp32 probabilities: agreement to fp32 precision.
    np.testing.assert_allclose(float(sums[0]), sum(math.log(i + 1) for i in range(T)), rtol=1e-6)
    np.testing.assert_allclose(float(sums[2]), T - 1, rtol=1e-6)


def test_global_state_places_local_heads_at_their_global_index():
    acc = HeadEntropyAccumulator(2)
    acc(
        torch.full((1, 2, 1, 2), 0.5),
        AttentionMask(torch.ones(1, 1, 2, dtype=torch.bool), torch.ones(1, 1, dtype=torch.bool)),
    )
    placed = global_head_state([acc], num_heads=4, tp_rank=1)
    assert torch.all(placed[0, :, :2] == 0)
    torch.testing.assert_close(placed[0, :, 2:], acc.state)


def test_detached_monitor_leaves_the_fast_path_with_same_outputs():
    model = tiny_model()
    src, tgt = padded_batch()
    with torch.no_grad():
        fast = model(src, tgt)
    _, _ = measure(model, src, tgt)
    assert all(isinstance(attn.core, SDPACore) for mods in model.attention_layers().values() for attn in mods)
    with torch.no_grad():
        torch.testing.assert_close(model(src, tgt), fast)
