"""Seq2SeqTransformer: masking, causality, head_dim, decoding (full and cached), config validation, init."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from helpers.gradients import assert_as_exact_as, grads
from helpers.models import TINY, tiny
from mha_lightning.data.batching import collate
from mha_lightning.data.vocab import BOS_ID, EOS_ID, PAD_ID
from mha_lightning.errors import ConfigError
from mha_lightning.losses import CPU_BLOCK_ELEMENTS
from mha_lightning.model import DecoderCache, ProbingCore, SDPACore, Seq2SeqTransformer


def all_attention(model):
    return [a for mods in model.attention_layers().values() for a in mods]


def force_explicit_path(model) -> list[int]:
    """Swap in probing cores everywhere (the explicit softmax path); returns call counters."""
    calls = [0] * len(all_attention(model))
    n_layers = len(model.encoder_layers)
    offsets = {"enc_self": 0, "dec_self": n_layers, "cross": n_layers + len(model.decoder_layers)}

    def make(kind, layer):
        i = offsets[kind] + layer

        def observe(probs, mask):
            assert not torch.isnan(probs).any()
            calls[i] += 1

        return ProbingCore(observe)

    model.set_attention_core(make)
    return calls


# Three sentences of different lengths (ids 4..19 are symbols): the first is the shortest.
PAIRS = [([5, 6, 7], [7, 6]), ([8, 9, 10, 11, 12, 13, 14], [14, 13, 12, 11, 10]), ([15, 16, 17, 18, 19], [4, 5, 6, 7])]


# ----------------------------------------------------------------------------- padding
@pytest.mark.parametrize("norm_first", [True, False], ids=["pre_ln", "post_ln"])
@pytest.mark.parametrize("explicit", [False, True], ids=["sdpa", "explicit"])
def test_padding_does_not_change_outputs(norm_first, explicit):
    model = tiny(norm_first=norm_first)
    calls = force_explicit_path(model) if explicit else None
    batch = collate(PAIRS)
    with torch.no_grad():
        memory, src_valid = model.encode(batch["src"])
        logits = model(batch["src"], batch["tgt_in"])
        for i, pair in enumerate(PAIRS):
            alone = collate([pair])
            S, T = alone["src"].shape[1], alone["tgt_in"].shape[1]
            mem_alone, _ = model.encode(alone["src"])
            assert_close(memory[i, :S], mem_alone[0], atol=1e-5, rtol=0)
            assert_close(logits[i, :T], model(alone["src"], alone["tgt_in"])[0], atol=1e-5, rtol=0)
    # The shortest sentence really was padded in the batch.
    assert (batch["src"][0] == PAD_ID).sum() == 4 and (batch["tgt_in"][0] == PAD_ID).sum() == 3
    assert src_valid.tolist()[0] == [True] * 4 + [False] * 4
    if explicit:
        assert all(c > 0 for c in calls), calls  # every attention module took the explicit path


@pytest.mark.parametrize("norm_first", [True, False], ids=["pre_ln", "post_ln"])
@pytest.mark.parametrize("threads", [1, 2], ids=["sdpa_kernel", "matmuls"])  # SDPACore's two CPU paths
def test_sdpa_path_equals_explicit_path(norm_first, threads):
    torch.set_num_threads(threads)  # conftest's autouse fixture restores the count
    model = tiny(norm_first=norm_first)
    batch = collate(PAIRS)
    fast = model(batch["src"], batch["tgt_in"]).detach()  # with gradients on, as a training step (matmuls on 2 threads)
    with torch.no_grad():
        calls = force_explicit_path(model)
        explicit = model(batch["src"], batch["tgt_in"])
    assert all(c == 1 for c in calls), calls
    valid = batch["tgt_in"] != PAD_ID
    assert_close(explicit[valid], fast[valid], atol=1e-5, rtol=1e-5)


def test_explicit_probabilities_respect_masks():
    model = tiny()
    seen = {}

    def make(kind, layer):
        return ProbingCore(lambda probs, mask: seen.setdefault(kind, (probs, mask)))

    batch = collate(PAIRS)
    with torch.no_grad(), model.attention_core(make):
        model(batch["src"], batch["tgt_in"])
    B, S, T = 3, batch["src"].shape[1], batch["tgt_in"].shape[1]
    src_valid = batch["src"] != PAD_ID
    tgt_valid = batch["tgt_in"] != PAD_ID
    for kind, (probs, mask) in seen.items():
        assert probs.dtype == torch.float32 and probs.shape[:2] == (B, 4)
        Tk = probs.shape[-1]
        assert Tk == (T if kind == "dec_self" else S)
        # Rows are distributions, and masked keys get exactly zero probability.
        assert_close(probs.sum(-1), torch.ones_like(probs.sum(-1)))
        assert (probs.masked_select(~mask.keys.unsqueeze(1).expand_as(probs)) == 0).all()
        # The mask names the real queries: source tokens in the encoder, target tokens in the decoder.
        assert torch.equal(mask.queries, src_valid if kind == "enc_self" else tgt_valid)
    assert torch.equal(seen["enc_self"][1].keys[:, 0], src_valid)
    probs, _ = seen["dec_self"]
    assert (probs.triu(diagonal=1) == 0).all()  # causal


def test_attention_core_swaps_for_a_block_and_restores_the_previous_cores():
    model = tiny()
    model.set_attention_core(lambda kind, layer: ProbingCore(lambda probs, mask: None))
    with model.attention_core(lambda kind, layer: SDPACore()):
        assert all(isinstance(a.core, SDPACore) for a in all_attention(model))
    assert all(isinstance(a.core, ProbingCore) for a in all_attention(model))
    model.set_attention_core(None)
    assert all(isinstance(a.core, SDPACore) for a in all_attention(model))
    # Cores hold no parameters: swapping never changes the state dict (or the sharding plan).
    assert all(".core." not in name for name in model.state_dict())


# ----------------------------------------------------------------------------- causality
@pytest.mark.parametrize("norm_first", [True, False], ids=["pre_ln", "post_ln"])
def test_decoder_is_causal(norm_first):
    model = tiny(norm_first=norm_first)
    src = torch.tensor([[5, 6, 7, 8, EOS_ID]])
    tgt = torch.tensor([[BOS_ID, 9, 10, 11, 12, 13]])
    changed = tgt.clone()
    t = 3
    changed[0, t + 1 :] = torch.tensor([17, 4])
    with torch.no_grad():
        a, b = model(src, tgt), model(src, changed)
    assert_close(a[0, : t + 1], b[0, : t + 1], atol=1e-5, rtol=0)
    assert (a[0, t + 1 :] - b[0, t + 1 :]).abs().max() > 1e-3  # later positions do see the change


# ----------------------------------------------------------------------------- head_dim
def fit(model, batch, steps: int, lr: float = 3e-3) -> list[float]:
    """Plain AdamW steps on one batch -> the loss at each step."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        logits = model(batch["src"], batch["tgt_in"])
        loss = F.cross_entropy(logits.flatten(0, 1), batch["tgt_out"].flatten(), ignore_index=PAD_ID)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_head_dim_independent_of_d_model_trains():
    model = tiny(head_dim=16).train()
    attn = model.encoder_layers[0].self_attn
    assert attn.head_dim == 16 and model.config.head_dim == 16
    for a in all_attention(model):
        assert a.q.weight.shape == (64, 32) and a.k.weight.shape == (64, 32) and a.v.weight.shape == (64, 32)
        assert a.o.weight.shape == (32, 64)
    batch = collate(PAIRS)
    losses = fit(model, batch, steps=8)
    assert losses[-1] < 0.8 * losses[0], losses
    # The explicit path agrees with SDPA for this shape too (scale is 1/sqrt(head_dim), not d_model/heads).
    model.eval()
    with torch.no_grad():
        fast = model(batch["src"], batch["tgt_in"])
        force_explicit_path(model)
        assert_close(model(batch["src"], batch["tgt_in"]), fast, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- decoding
DECODE_PAIRS = [([5, 6], [6, 5]), ([7, 8, 9, 10, 11], [11, 10, 9, 8, 7]), ([12, 13, 14], [14, 13, 12])]


@pytest.fixture(scope="module")
def reverser():
    """A tiny model overfitted to reverse three sentences of different lengths."""
    torch.set_num_threads(1)  # module-scoped: runs before the per-test thread fixture
    model = tiny(vocab_size=16).train()
    batch = collate(DECODE_PAIRS)
    assert fit(model, batch, steps=150)[-1] < 0.05
    return model.eval(), batch


def test_greedy_stops_early_and_pads_after_eos(reverser):
    model, batch = reverser
    out = model.greedy_decode(batch["src"], max_len=20, bos_id=BOS_ID, eos_id=EOS_ID)
    # Stops as soon as every row has emitted EOS: longest target (5) + EOS, not max_len.
    assert out.shape == (3, 6)
    assert torch.equal(out, batch["tgt_out"])
    assert out[0].tolist() == [6, 5, EOS_ID, PAD_ID, PAD_ID, PAD_ID]
    # Never more than max_len tokens.
    assert model.greedy_decode(batch["src"], max_len=2, bos_id=BOS_ID, eos_id=EOS_ID).shape == (3, 2)


def test_beam_size_one_equals_greedy(reverser):
    model, batch = reverser
    greedy = model.greedy_decode(batch["src"], 20, BOS_ID, EOS_ID)
    beam = model.beam_decode(batch["src"], 20, BOS_ID, EOS_ID, beam_size=1)
    assert torch.equal(beam, greedy)
    # Also on an untrained model, where the argmax is far from certain.
    untrained = tiny(seed=3)
    src = collate(PAIRS)["src"]
    g = untrained.greedy_decode(src, 7, BOS_ID, EOS_ID)
    assert torch.equal(untrained.beam_decode(src, 7, BOS_ID, EOS_ID, beam_size=1, length_penalty=0.0), g)


def test_beam_output_shapes_and_content(reverser):
    model, batch = reverser
    out = model.beam_decode(batch["src"], 20, BOS_ID, EOS_ID, beam_size=4)
    assert out.dtype == torch.long and out.shape[0] == 3 and 6 <= out.shape[1] <= 20
    ref = batch["tgt_out"]
    assert torch.equal(out[:, : ref.shape[1]], ref)
    assert (out[:, ref.shape[1] :] == PAD_ID).all()
    # Untrained model: at most max_len tokens per row, ids within the vocabulary.
    untrained = tiny(seed=1)
    src = collate(PAIRS)["src"]
    for k in (1, 3):
        out = untrained.beam_decode(src, 5, BOS_ID, EOS_ID, beam_size=k)
        assert out.shape[0] == 3 and out.shape[1] <= 5
        assert ((out >= 0) & (out < TINY["vocab_size"])).all()
    # max_len is capped by the model's positional range (BOS takes one position).
    assert untrained.greedy_decode(src, 100, BOS_ID, EOS_ID).shape[1] <= TINY["max_len"] - 1


# ----------------------------------------------------------------------------- cached decoding
# Eight random sources of 2-9 tokens (padded in one batch), for a model trained 40 steps to
# reverse them: unsure enough that beams overtake each other (the cache must follow them), sure
# enough to emit varied tokens and EOS at different steps.
_g = torch.Generator().manual_seed(0)
RANDOM_SOURCES = [
    torch.randint(4, 20, (int(n),), generator=_g).tolist() for n in torch.randint(2, 10, (8,), generator=_g)
]
CACHE_CONFIGS = {"pre_ln": {}, "post_ln": {"norm_first": False}, "learned_positions": {"positional": "learned"}}


def half_trained(**overrides) -> tuple[Seq2SeqTransformer, torch.Tensor]:
    """A tiny model trained briefly to reverse RANDOM_SOURCES, and those sources (B, S) padded."""
    model = tiny(**overrides).train()
    batch = collate([(s, s[::-1]) for s in RANDOM_SOURCES])
    fit(model, batch, steps=40)
    return model.eval(), batch["src"]


def step_by_step(model, tgt_in, memory, src_valid) -> tuple[torch.Tensor, DecoderCache, list]:
    """Feed tgt_in one position at a time through a cache -> (logits (B, T, V), cache, per-step shapes)."""
    cache = DecoderCache.empty(len(model.decoder_layers))
    logits, shapes = [], []
    for t in range(1, tgt_in.shape[1] + 1):
        logits.append(model.decode(tgt_in[:, :t], memory, src_valid, cache))
        shapes.append([(c.self_attn.keys.shape, c.cross_attn.keys.shape) for c in cache.layers])
    return torch.cat(logits, dim=1), cache, shapes


@pytest.mark.parametrize("overrides", CACHE_CONFIGS.values(), ids=CACHE_CONFIGS.keys())
def test_cached_decoding_emits_the_same_tokens_as_full_recompute(overrides):
    model, src = half_trained(**overrides)
    assert (src == PAD_ID).any()  # padded sources
    for beam_size in (1, 3):
        cached = model.generate(src, 12, BOS_ID, EOS_ID, beam_size=beam_size)
        full = model.generate(src, 12, BOS_ID, EOS_ID, beam_size=beam_size, use_cache=False)
        assert torch.equal(cached, full), beam_size
        # Not degenerate: varied tokens, and rows that end with EOS at different steps.
        assert len(set(cached.flatten().tolist())) > 10 and (cached == EOS_ID).any()
        assert len(set((cached != PAD_ID).sum(1).tolist())) > 3


@pytest.mark.parametrize("overrides", [*CACHE_CONFIGS.values(), {"head_dim": 16}], ids=[*CACHE_CONFIGS, "head_dim"])
def test_cache_grows_one_position_per_step_and_matches_teacher_forcing(overrides):
    model = tiny(**overrides)
    batch = collate(PAIRS)  # padded sources and targets
    B, S, T = 3, batch["src"].shape[1], batch["tgt_in"].shape[1]
    heads, head_dim = model.config.num_heads, model.config.head_dim
    with torch.no_grad():
        memory, src_valid = model.encode(batch["src"])
        full = model.decode(batch["tgt_in"], memory, src_valid)
        stepped, cache, shapes = step_by_step(model, batch["tgt_in"], memory, src_valid)
    for t, per_layer in enumerate(shapes):
        for self_keys, cross_keys in per_layer:
            assert self_keys == (B, heads, t + 1, head_dim)
            assert cross_keys == (B, heads, S, head_dim)
    assert cache.length == T
    valid = batch["tgt_in"] != PAD_ID
    assert_close(stepped[valid], full[valid], atol=1e-5, rtol=1e-5)


def test_reordered_cache_continues_each_row_from_its_parent():
    model = tiny()
    # Three beams of one sentence (one source, three target prefixes of different lengths): beams
    # never leave their sentence, so the cross-attention cache needs no reordering.
    batch = collate([(PAIRS[1][0], target) for _, target in PAIRS])
    rows = torch.tensor([2, 0, 0])  # a beam dropped, one duplicated, the order changed
    nxt = torch.tensor([[9], [10], [11]])
    with torch.no_grad():
        memory, src_valid = model.encode(batch["src"])
        _, cache, _ = step_by_step(model, batch["tgt_in"], memory, src_valid)
        cache.reorder(rows)
        ys = torch.cat([batch["tgt_in"][rows], nxt], dim=1)
        cached = model.decode(ys, memory, src_valid, cache)[:, -1]
        full = model.decode(ys, memory, src_valid)[:, -1]
    assert_close(cached, full, atol=1e-5, rtol=1e-5)
    # The reorder mattered: without it the continuations differ.
    _, stale, _ = step_by_step(model, batch["tgt_in"], memory, src_valid)
    with torch.no_grad():
        assert (model.decode(ys, memory, src_valid, stale)[:, -1] - full).abs().max() > 1e-3


@pytest.mark.parametrize("beam_size", [1, 3])
def test_cross_attention_keys_are_projected_once_per_batch(beam_size):
    model = tiny()  # untrained: some rows never emit EOS, so decoding runs to max_len
    src = collate(PAIRS)["src"]
    calls = [0] * len(model.decoder_layers)
    hooks = [
        layer.cross_attn.k.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
        for i, layer in enumerate(model.decoder_layers)
    ]
    steps = model.generate(src, 6, BOS_ID, EOS_ID, beam_size=beam_size, use_cache=False).shape[1]
    assert steps == 6 and calls == [steps] * len(calls)  # the full recompute projects the memory every step
    calls[:] = [0] * len(calls)
    model.generate(src, 6, BOS_ID, EOS_ID, beam_size=beam_size)
    for hook in hooks:
        hook.remove()
    assert calls == [1] * len(calls)


def test_probing_core_sees_cached_decoding():
    model = tiny()
    seen = []
    src = collate(PAIRS)["src"]

    def make(kind, layer):
        return ProbingCore(lambda probs, mask: seen.append(probs) if (kind, layer) == ("dec_self", 0) else None)

    with model.attention_core(make):
        out = model.greedy_decode(src, 5, BOS_ID, EOS_ID)
    # One query (the newest token) per step, over every position decoded so far.
    assert [p.shape for p in seen] == [(3, 4, 1, t + 1) for t in range(out.shape[1])]
    assert all(torch.allclose(p.sum(-1), torch.ones(3, 4, 1)) for p in seen)


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"d_model": 0}, "model.d_model"),
        ({"num_heads": 0}, "model.num_heads"),
        ({"d_model": 30, "num_heads": 4}, "model.d_model"),
        ({"d_model": 30, "num_heads": 4}, "model.num_heads"),
        ({"activation": "swish"}, "model.activation"),
        ({"head_dim": 0}, "model.head_dim"),
        ({"vocab_size": -1}, "model.vocab_size"),
        ({"positional": "rotary"}, "model.positional"),
        ({"dropout": 1.0}, "model.dropout"),
        ({"num_encoder_layers": 0}, "model.num_encoder_layers"),
    ],
)
def test_invalid_config_raises_config_error_naming_key(overrides, key):
    with pytest.raises(ConfigError) as info:
        Seq2SeqTransformer(**{**TINY, **overrides})
    message = str(info.value)
    assert key in message
    assert "\n" not in message


def test_d_model_not_divisible_is_fine_with_explicit_head_dim():
    model = tiny(d_model=30, num_heads=4, head_dim=8)
    for a in all_attention(model):  # 4 heads x 8 = 32 inner width, projected back to d_model 30
        assert a.head_dim == 8 and a.q.weight.shape == (32, 30) and a.o.weight.shape == (30, 32)
    batch = collate(PAIRS)
    with torch.no_grad():
        fast = model(batch["src"], batch["tgt_in"])
        assert fast.shape == (3, batch["tgt_in"].shape[1], TINY["vocab_size"])
        # The explicit softmax path (scale 1/sqrt(8)) agrees with SDPA for this shape too.
        force_explicit_path(model)
        explicit = model(batch["src"], batch["tgt_in"])
    valid = batch["tgt_in"] != PAD_ID
    assert_close(explicit[valid], fast[valid], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- init
def test_token_embedding_init_scale_and_pad_row():
    torch.manual_seed(0)
    model = Seq2SeqTransformer(**{**TINY, "vocab_size": 2000, "share_embeddings": False})
    for emb in (model.src_embed.tokens, model.tgt_embed.tokens):
        w = emb.weight.detach()
        assert emb.padding_idx == PAD_ID
        assert (w[PAD_ID] == 0).all()
        std = w[PAD_ID + 1 :].std().item()
        # N(0, 1/d_model): 1999 * 32 samples, the estimate is within ~1% of 32**-0.5 = 0.177.
        assert abs(std - 32**-0.5) < 0.05 * 32**-0.5, std
    assert model.src_embed.tokens is not model.tgt_embed.tokens
    assert model.output.weight is not model.tgt_embed.tokens.weight


def test_shared_embeddings_tie_source_target_and_output():
    model = tiny()
    assert model.src_embed.tokens is model.tgt_embed.tokens
    assert model.output.weight is model.tgt_embed.tokens.weight
    names = [n for n, _ in model.named_parameters()]
    assert sum("tokens.weight" in n or n == "output.weight" for n in names) == 1
    # The scaled embedding of a real token has roughly unit RMS per coordinate (Vaswani et al.).
    emb = model.src_embed.tokens.weight[4:] * model.src_embed.scale
    assert 0.7 < emb.pow(2).mean().sqrt().item() < 1.3


@pytest.mark.parametrize("share_embeddings", [True, False])
def test_teacher_forced_loss_is_forward_then_cross_entropy(share_embeddings):
    """The fused training loss: forward's logits through label-smoothed cross-entropy, same value,
    predictions and gradients (as close to fp64's as the unfused fp32 ones), with shared or
    separate output weights and PAD targets ignored."""
    V = CPU_BLOCK_ELEMENTS // 20  # blocks of 20 tokens: the 42 targets take three
    model = tiny(share_embeddings=share_embeddings, vocab_size=V)
    g = torch.Generator().manual_seed(3)
    src = torch.randint(4, V, (6, 9), generator=g)
    tgt = torch.randint(4, V, (6, 8), generator=g)
    tgt[0, 5:] = PAD_ID
    tgt_in, tgt_out = tgt[:, :-1], tgt[:, 1:]

    def unfused(m):
        logits = m(src, tgt_in)
        loss = F.cross_entropy(
            logits.flatten(0, 1), tgt_out.flatten(), ignore_index=PAD_ID, label_smoothing=0.1, reduction="sum"
        )
        loss.backward()
        return loss.detach(), logits.argmax(-1), grads(m)

    exact = unfused(copy.deepcopy(model).double())
    plain = unfused(model)
    model.zero_grad()
    with torch.profiler.profile(record_shapes=True) as prof:
        loss, predictions = model.teacher_forced_loss(src, tgt_in, tgt_out, label_smoothing=0.1)
        loss.backward()
    # The fused path ran: blocks of 20 tokens' logits, never all 42.
    shapes = {tuple(s) for event in prof.events() for s in event.input_shapes if s}
    assert (20, V) in shapes and (42, V) not in shapes and (6, 7, V) not in shapes
    assert_close(loss, plain[0])
    assert torch.equal(predictions, plain[1])
    fused_grads = grads(model)
    assert fused_grads.keys() == plain[2].keys() and model.output.weight.grad.abs().max() > 0
    for name, grad in fused_grads.items():
        assert_as_exact_as(grad, plain[2][name], exact[2][name], name)
