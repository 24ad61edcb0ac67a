"""What each head does: the roles Voita et al. (2019) found in translation models, from argmax counts.

Per head and attention kind, over real queries (the share of queries whose largest weight falls on):

- ``previous`` / ``same`` / ``next``: the key one position before, at, or after the query (self-attention;
  the decoder's causal mask rules out ``next``) -> role **positional**;
- ``sink``: BOS, EOS or a punctuation token -> role **sink**;
- ``rare``: the least frequent token of the sentence (frequencies counted over the analysed examples, one
  count per side), beside ``rare_chance``, the share a head attending uniformly at random would reach
  -> role **rare**;
- ``diagonal`` (cross-attention): a source position within ``diagonal_width`` of the source length from
  the proportional diagonal (query i of T -> key i * (S - 1) / (T - 1)) -> role **monotone**; on tasks
  with a gold alignment, the ``alignment`` statistic -> role **alignment**;

and **diffuse** from the normalised entropy. A role is given where its share reaches the threshold in
``roles`` (``conf/analyze.yaml``); a head may have several or none (docs/design.md, "Head roles").
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mha_lightning.data.vocab import BOS_ID, EOS_ID, NUM_SPECIAL, PAD_ID

OFFSETS = {"previous": -1, "same": 0, "next": 1}
SHARES = (*OFFSETS, "sink", "rare", "rare_chance", "diagonal")
ROLES = ("positional", "sink", "rare", "diffuse", "monotone", "alignment")
# A count no real token has: special ids never count as the rarest token of a sentence.
_NEVER_RARE = np.iinfo(np.int64).max


def punctuation_ids(tokenizer) -> set[int]:
    """The ids of ``tokenizer`` whose text is punctuation only (``.``, ``,``, ``"``...): sink candidates."""
    ids = set()
    for i in range(NUM_SPECIAL, tokenizer.vocab_size):
        text = tokenizer.decode([i]).strip()
        if text and all(unicodedata.category(c).startswith("P") for c in text):
            ids.add(i)
    return ids


def token_counts(sequences: Iterable[Sequence[int]], vocab_size: int) -> np.ndarray:
    """(vocab_size,) occurrences of each id in ``sequences``; special ids get a count no token has."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for seq in sequences:
        np.add.at(counts, np.asarray(seq, dtype=np.int64), 1)
    counts[:NUM_SPECIAL] = _NEVER_RARE
    return counts


def rarest_keys(tokens: Tensor, counts: np.ndarray) -> Tensor:
    """(B, T) token ids -> (B, T) bool, True at the positions holding a least frequent token of their row."""
    freq = torch.as_tensor(counts, dtype=torch.int64, device=tokens.device)[tokens.clamp(max=len(counts) - 1)]
    real = tokens >= NUM_SPECIAL
    freq = torch.where(real, freq, _NEVER_RARE)
    return real & (freq == freq.min(1, keepdim=True).values)


def sink_keys(tokens: Tensor, punctuation: set[int]) -> Tensor:
    """(B, T) token ids -> (B, T) bool, True at BOS, EOS and punctuation."""
    sink = (tokens == BOS_ID) | (tokens == EOS_ID)
    if punctuation:
        sink |= torch.isin(tokens, torch.tensor(sorted(punctuation), device=tokens.device))
    return sink


class RoleCounts:
    """Argmax hits of one attention module's heads, summed over batches (sums, so batching changes nothing).

    Before each batch the caller sets ``keys`` (B, Tk) token ids of the keys (the source for encoder
    self- and cross-attention, the decoder input for decoder self-attention); ``sink`` and ``rare`` mark
    their sink and rarest positions."""

    def __init__(self, num_heads: int, kind: str, diagonal_width: float = 0.1) -> None:
        self.kind = kind
        self.diagonal_width = diagonal_width
        self.hits = {name: torch.zeros(num_heads, dtype=torch.float64) for name in SHARES if name != "rare_chance"}
        self.rare_chance = 0.0
        self.queries = 0
        self.sink: Tensor | None = None  # (B, Tk) bool
        self.rare: Tensor | None = None  # (B, Tk) bool

    @torch.no_grad()
    def update(self, argmax: Tensor, valid: Tensor, key_counts: Tensor, Tk: int) -> None:
        """argmax (B, H, Tq) key of each query's largest weight over ``Tk`` keys; valid (B, Tq) real queries;
        key_counts (B, Tq) keys each query may see."""
        B, H, Tq = argmax.shape
        keep = valid.unsqueeze(1)  # (B, 1, Tq)

        def count(hit: Tensor) -> Tensor:
            return (hit & keep).sum((0, 2)).double().cpu()

        if self.kind != "cross":
            offset = argmax - torch.arange(Tq, device=argmax.device)
            for name, delta in OFFSETS.items():
                self.hits[name] += count(offset == delta)
        else:
            # The proportional diagonal of each sentence pair: query i of T real ones -> key i * (S - 1) / (T - 1).
            T = valid.sum(1, keepdim=True).clamp(min=2).double()  # (B, 1)
            S = key_counts.max(1, keepdim=True).values.double()  # (B, 1) real source positions
            diagonal = torch.arange(Tq, device=argmax.device).double() * (S - 1) / (T - 1)  # (B, Tq)
            width = (self.diagonal_width * S).clamp(min=1.0)  # (B, 1)
            self.hits["diagonal"] += count((argmax.double() - diagonal.unsqueeze(1)).abs() <= width.unsqueeze(1))
        sink, rare = (None if m is None else _fit(m, Tk) for m in (self.sink, self.rare))
        for name, marks in (("sink", sink), ("rare", rare)):
            if marks is not None:
                self.hits[name] += count(marks.gather(1, argmax.reshape(B, -1)).view(B, H, Tq))
        if rare is not None:
            # A uniform head's hit rate: the share of the keys each query may see that are rarest, those
            # before it in the decoder (causal), all of them elsewhere.
            seen = rare.double().cumsum(1)[:, :Tq] if self.kind == "dec_self" else rare.double().sum(1, keepdim=True)
            self.rare_chance += float(torch.where(valid, seen / key_counts.double().clamp(min=1), 0.0).sum())
        self.queries += int(valid.sum())

    def shares(self) -> dict[str, np.ndarray]:
        """Each share (heads,), NaN where it does not apply to this kind."""
        q = max(self.queries, 1)
        out = {name: (hits / q).numpy() for name, hits in self.hits.items()}
        out["rare_chance"] = np.full(len(out["sink"]), self.rare_chance / q)
        if self.kind == "cross":
            for name in OFFSETS:
                out[name][:] = np.nan
        else:
            out["diagonal"][:] = np.nan
        if self.rare is None:
            out["rare"][:], out["rare_chance"][:] = np.nan, np.nan
        return out


def _fit(marks: Tensor, Tk: int) -> Tensor:
    """(B, T) key marks -> (B, Tk): the model may pad a sequence (sequence parallelism); padding is never marked."""
    if marks.shape[1] >= Tk:
        return marks[:, :Tk]
    return torch.nn.functional.pad(marks, (0, Tk - marks.shape[1]))


def assign_roles(
    kind: str, shares: dict[str, float], entropy_norm: float, alignment: float | None, cfg: dict
) -> list[str]:
    """A head's roles from its shares (one value each), normalised entropy and gold alignment (None: not measured)."""

    def reaches(value: float | None, threshold: float) -> bool:
        return value is not None and not np.isnan(value) and value >= threshold

    roles = []
    if any(reaches(shares.get(name), cfg["positional"]) for name in OFFSETS):
        roles.append("positional")
    if reaches(shares.get("sink"), cfg["sink"]):
        roles.append("sink")
    if reaches(shares.get("rare"), cfg["rare"]):
        roles.append("rare")
    if reaches(entropy_norm, cfg["diffuse"]):
        roles.append("diffuse")
    if kind == "cross" and reaches(shares.get("diagonal"), cfg["monotone"]):
        roles.append("monotone")
    if kind == "cross" and reaches(alignment, cfg["monotone"]):
        roles.append("alignment")
    return roles


def head_roles(stats: dict[str, Any], cfg: dict) -> dict[str, dict[str, list[list[list[str]]]]]:
    """``results["statistics"]`` -> kind -> per layer, per head, its roles."""
    out: dict[str, Any] = {}
    for kind, layers in stats["roles_share"].items():
        per_layer = []
        for layer in range(len(stats["entropy_norm"][kind])):
            row = []
            for head in range(len(stats["entropy_norm"][kind][layer])):
                shares = {name: float(values[layer][head]) for name, values in layers.items()}
                aligned = stats.get("alignment", {}).get(kind)
                row.append(
                    assign_roles(
                        kind,
                        shares,
                        float(stats["entropy_norm"][kind][layer][head]),
                        None if aligned is None else float(aligned[layer][head]),
                        cfg,
                    )
                )
            per_layer.append(row)
        out[kind] = per_layer
    return out


def key_marks(tokens: Tensor, counts: np.ndarray | None, punctuation: set[int]) -> tuple[Tensor, Tensor | None]:
    """(sink, rare) marks of the keys ``tokens`` (B, Tk), PAD never either."""
    real = tokens != PAD_ID
    return sink_keys(tokens, punctuation) & real, None if counts is None else rarest_keys(tokens, counts)


class RoleInputs:
    """What the role counts need of the data: token frequencies of each side and the punctuation ids."""

    def __init__(
        self,
        pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
        vocab_size: int,
        punctuation: set[int],
        diagonal_width: float,
    ) -> None:
        self.src_counts = token_counts((s for s, _ in pairs), vocab_size)
        self.tgt_counts = token_counts((t for _, t in pairs), vocab_size)
        self.punctuation = punctuation
        self.diagonal_width = diagonal_width

    def marks(self, batch: dict[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
        """kind -> (sink, rare) marks of its keys: the source for encoder self- and cross-attention, the
        decoder input for decoder self-attention."""
        src = key_marks(batch["src"], self.src_counts, self.punctuation)
        tgt = key_marks(batch["tgt_in"], self.tgt_counts, self.punctuation)
        return {"enc_self": src, "cross": src, "dec_self": tgt}
