"""What the model does with its output projection over the vocabulary, behind one swap point.

:class:`VocabularyHead` turns decoder states and the projection's weight into logits, the training
loss, evaluation's scores and decoding's next tokens. It holds no parameters (the weight stays the
model's ``output.weight``, so checkpoints do not change). Vocabulary parallelism
(``distributed.vocab``) swaps in a head that works on this rank's rows of the weight, so no rank
makes the (tokens x vocabulary) logits (docs/design.md, "Vocabulary parallelism").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mha_lightning.losses import linear_cross_entropy_sum


class VocabularyHead:
    """Single-device vocabulary operations; ``weight`` is the (V, D) output projection."""

    def logits(self, states: Tensor, weight: Tensor) -> Tensor:
        """(..., D) -> (..., V) logits."""
        return F.linear(states, weight)

    def loss(
        self, states: Tensor, weight: Tensor, target: Tensor, ignore_index: int, smoothing: float
    ) -> tuple[Tensor, Tensor]:
        """states (N, D), target (N,) -> (the label-smoothed cross-entropy summed over non-ignored rows,
        the argmax predictions (N,)); with gradients, the logits are never made (``losses``)."""
        return linear_cross_entropy_sum(states, weight, target, ignore_index, smoothing)

    def scores(
        self, states: Tensor, weight: Tensor, target: Tensor, ignore_index: int, smoothing: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Evaluation, no gradients: -> (smoothed loss sum, negative log-likelihood sum, argmax (N,))."""
        logits = self.logits(states, weight).float()
        loss = F.cross_entropy(logits, target, ignore_index=ignore_index, label_smoothing=smoothing, reduction="sum")
        nll = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum")
        return loss, nll, logits.argmax(-1)

    def best_tokens(self, states: Tensor, weight: Tensor, banned: Sequence[int]) -> Tensor:
        """Greedy decoding: states (R, D) -> (R,) the most likely token of each row, never one of ``banned``."""
        logits = self.logits(states, weight)
        logits[:, list(banned)] = float("-inf")
        return logits.argmax(-1)

    def top_candidates(
        self, states: Tensor, weight: Tensor, scores: Tensor, finished: Tensor, pad_id: int, banned: Sequence[int]
    ) -> tuple[Tensor, Tensor]:
        """One beam-search step: states (B*K, D) of the beams' newest positions, their ``scores`` (B, K) and
        ``finished`` (B*K,) flags -> the K best (scores (B, K), indices into each sentence's K * V
        candidates). A finished beam extends only with PAD, at no cost; ``banned`` tokens never."""
        B, K = scores.shape
        logits = self.logits(states, weight).float()
        logits[:, list(banned)] = float("-inf")
        logp = F.log_softmax(logits, dim=-1)  # (B*K, V)
        logp = torch.where(finished.unsqueeze(1), frozen_beam(logp, pad_id, 0), logp)
        return (scores.view(B * K, 1) + logp).view(B, -1).topk(K, dim=-1)


def frozen_beam(like: Tensor, pad_id: int, first_column: int) -> Tensor:
    """Log-probabilities of a finished beam, shaped like ``like`` (rows, V_local): 0 for PAD, -inf elsewhere.
    ``first_column``: the vocabulary id of column 0 (a shard's offset)."""
    frozen = torch.full_like(like, float("-inf"))
    if 0 <= pad_id - first_column < like.shape[-1]:
        frozen[:, pad_id - first_column] = 0.0
    return frozen
