"""Head roles on constructed attention patterns whose right role is known."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mha_lightning.analysis.heads import HeadObserver
from mha_lightning.analysis.roles import RoleCounts, RoleInputs, assign_roles, punctuation_ids, rarest_keys
from mha_lightning.data.vocab import BOS_ID, EOS_ID, PAD_ID
from mha_lightning.model import AttentionMask
from mha_lightning.monitor.entropy import finalize

THRESHOLDS = {"positional": 0.9, "sink": 0.5, "rare": 0.5, "diffuse": 0.85, "monotone": 0.7, "diagonal_width": 0.1}
PUNCT = 9  # the punctuation token of these sentences


def one_hot_rows(keys: torch.Tensor, Tk: int) -> torch.Tensor:
    """(B, Tq) key index per query -> (B, Tq, Tk) distributions with all weight there."""
    return torch.nn.functional.one_hot(keys, Tk).float()


def sentences() -> list[tuple[list[int], list[int]]]:
    # Token 7 appears once in all the examples: the rarest of the first sentence; 11 of the second. Long
    # enough that a positional head's first or last query (which has no neighbour) keeps it above 90%.
    return [
        ([5, 6] * 5 + [7] + [5, 6] * 5 + [PUNCT], [5, 6] * 4),
        ([5, 6] * 4 + [11] + [6, 5] * 5 + [PUNCT], [6, 5, 6, 5, 6]),
    ]


def observe(kind: str, probs_of, pairs, src: bool):
    """Feed one constructed batch to an observer of ``kind`` -> (shares, normalised entropy) per head."""
    from mha_lightning.data.batching import collate

    batch = collate(pairs)
    inputs = RoleInputs(pairs, 16, {PUNCT}, THRESHOLDS["diagonal_width"])
    marks = inputs.marks(batch)[kind]
    keys = batch["src"] if src else batch["tgt_in"]
    queries = batch["src"] if kind == "enc_self" else batch["tgt_in"]
    key_real = keys != PAD_ID
    Tq, Tk = queries.shape[1], keys.shape[1]
    allowed = key_real.unsqueeze(1).expand(-1, Tq, -1)
    if kind == "dec_self":
        allowed = allowed & torch.ones(Tq, Tk, dtype=torch.bool).tril()
    mask = AttentionMask(keys=allowed, queries=queries != PAD_ID)
    probs = probs_of(batch, keys, queries, allowed)  # (B, H, Tq, Tk)
    observer = HeadObserver(probs.shape[1], similarity=False, roles=RoleCounts(probs.shape[1], kind, 0.1))
    observer.roles.sink, observer.roles.rare = marks
    observer(probs, mask)
    _, entropy_norm = finalize(observer.entropy.state.unsqueeze(0))
    return observer.roles.shares(), entropy_norm[0].numpy(), mask


def test_each_constructed_self_attention_pattern_gets_its_role_and_no_other():
    pairs = sentences()

    def probs_of(batch, keys, queries, allowed):
        B, Tq = queries.shape
        Tk = keys.shape[1]
        q = torch.arange(Tq).expand(B, Tq)
        lengths = (keys != PAD_ID).sum(1, keepdim=True)
        rare = rarest_keys(keys, RoleInputs(pairs, 16, {PUNCT}, 0.1).src_counts).float().argmax(1, keepdim=True)
        uniform = allowed.float() / allowed.float().sum(-1, keepdim=True)
        heads = [
            one_hot_rows((q - 1).clamp(min=0), Tk),  # previous token (query 0: itself)
            one_hot_rows(torch.minimum(q + 1, lengths - 1), Tk),  # next token (the last: itself)
            one_hot_rows((lengths - 1).expand(B, Tq), Tk),  # EOS: a sink
            one_hot_rows(rare.expand(B, Tq), Tk),  # the sentence's rarest token
            uniform,  # diffuse
        ]
        return torch.stack(heads, 1)

    shares, entropy_norm, mask = observe("enc_self", probs_of, pairs, src=True)
    lengths = [len(src) + 1 for src, _ in pairs]  # with EOS
    queries = int(mask.queries.sum())
    assert queries == sum(lengths)
    assert shares["previous"][0] == pytest.approx((queries - 2) / queries)  # every query but the first of each
    assert shares["next"][1] == pytest.approx((queries - 2) / queries)
    assert shares["sink"][2] == pytest.approx(1.0)
    assert shares["rare"][3] == pytest.approx(1.0)
    # Chance: one rarest position among each sentence's keys, averaged over queries.
    assert shares["rare_chance"][0] == pytest.approx(len(pairs) / queries)
    expected = [["positional"], ["positional"], ["sink"], ["rare"], ["diffuse"]]
    for head, roles in enumerate(expected):
        one = {name: float(values[head]) for name, values in shares.items()}
        assert assign_roles("enc_self", one, float(entropy_norm[head]), None, THRESHOLDS) == roles, (head, one)


def test_cross_attention_along_the_diagonal_is_monotone_and_against_it_is_not():
    pairs = sentences()

    def probs_of(batch, keys, queries, allowed):
        B, Tq = queries.shape
        Tk = keys.shape[1]
        S = (keys != PAD_ID).sum(1, keepdim=True).float()
        T = (queries != PAD_ID).sum(1, keepdim=True).float()
        q = torch.arange(Tq).float().expand(B, Tq)
        diagonal = (q * (S - 1) / (T - 1)).round().long().clamp(max=Tk - 1)
        anti = ((S - 1).long() - diagonal).clamp(min=0)
        return torch.stack([one_hot_rows(diagonal, Tk), one_hot_rows(anti, Tk)], 1)

    shares, entropy_norm, _ = observe("cross", probs_of, pairs, src=True)
    assert shares["diagonal"][0] == pytest.approx(1.0)
    assert shares["diagonal"][1] < 0.5
    assert np.isnan(shares["previous"]).all()  # positions of two sequences: positional does not apply
    roles = [
        assign_roles("cross", {n: float(v[h]) for n, v in shares.items()}, float(entropy_norm[h]), None, THRESHOLDS)
        for h in range(2)
    ]
    assert roles == [["monotone"], []]
    # A gold alignment (a synthetic task's) names the anti-diagonal head instead.
    assert "alignment" in assign_roles("cross", {}, 0.0, 0.95, THRESHOLDS)


def test_decoder_heads_on_bos_are_sinks_and_on_themselves_positional():
    pairs = sentences()

    def probs_of(batch, keys, queries, allowed):
        B, Tq = queries.shape
        q = torch.arange(Tq).expand(B, Tq)
        return torch.stack([one_hot_rows(torch.zeros_like(q), Tq), one_hot_rows(q, Tq)], 1)

    shares, entropy_norm, _ = observe("dec_self", probs_of, pairs, src=False)
    assert shares["sink"][0] == pytest.approx(1.0) and shares["same"][1] == pytest.approx(1.0)
    queries = sum(len(tgt) + 1 for _, tgt in pairs)  # with BOS
    assert shares["previous"][0] == pytest.approx(2 / queries)  # query 1 of each sentence sees BOS one back
    assert shares["sink"][1] == pytest.approx(2 / queries)  # query 0 of each sentence is BOS itself
    assert np.isnan(shares["diagonal"]).all()


def test_rarest_keys_skip_special_tokens_and_mark_every_tie():
    counts = np.array([0, 0, 0, 0, 5, 1, 1, 9])
    counts[:4] = np.iinfo(np.int64).max
    tokens = torch.tensor([[BOS_ID, 4, 5, 6, EOS_ID, PAD_ID], [4, 7, 7, EOS_ID, PAD_ID, PAD_ID]])
    marks = rarest_keys(tokens, counts)
    assert marks.tolist() == [[False, False, True, True, False, False], [True, False, False, False, False, False]]


def test_punctuation_ids_of_a_trained_tokenizer_are_punctuation_only():
    from mha_lightning.data.tokenizer import BPETokenizer

    tok = BPETokenizer.train(["ein Hund , der läuft .", "a dog , running !", "zwei Hunde ."] * 20, 300)
    ids = punctuation_ids(tok)
    texts = {tok.decode([i]).strip() for i in ids}
    assert {".", ","} <= texts and "!" in texts
    assert not any(t.isalnum() for t in texts)
