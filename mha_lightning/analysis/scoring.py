"""The task metric of a model with chosen heads removed, for many head masks at once.

A pruning curve asks the same question dozens of times: the metric without these heads. Each
mask is a per-example head gate (``MultiHeadAttention.head_gate`` of shape (B, H_local)), so one
batch carries several masks side by side, each over the same examples: rows ``i * n .. (i+1) * n``
hold mask ``i``. Larger batches, fewer passes (docs/design.md, "Analysing heads").

How a mask is scored, as validation scores the model:

- **exact match, greedy decoding**: one teacher-forced forward. Greedy decoding outputs the target
  and then EOS exactly when, at every target position, the argmax over the tokens decoding may emit
  is the target token (by induction over the prefix), and it has room to (the decoding length
  limit). So no decoding loop is needed, and the number is the one validation reports.
- **BLEU, or exact match under beam search**: the model's own decoding (greedy: masks batched;
  beam: one mask at a time, as beams reorder rows), scored as validation scores it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from mha_lightning.analysis.heads import kept_head_gates
from mha_lightning.data.batching import collate
from mha_lightning.data.vocab import BOS_ID, EOS_ID, PAD_ID
from mha_lightning.kinds import Head

# Rows (examples x masks) of one batched pass: large matmuls, bounded memory.
ROWS_PER_PASS = 512


class TaskScorer:
    """Scores ``pairs`` under head masks with the module's own decoding settings.

    ``heads``: the global head indices this process holds (all of them on one device, one
    tensor-parallel rank's share when sharded); ``fixed``: heads the model's own ``head_mask``
    already removes, removed under every mask too; ``teacher_forced``: None takes the teacher-forced
    path wherever it is exact (exact match under greedy decoding), False always decodes (the
    reference that path must equal)."""

    def __init__(
        self,
        module,
        data,
        pairs: list,
        batch_size: int,
        heads: range,
        fixed: Sequence[Head] = (),
        teacher_forced: bool | None = None,
        progress: bool = True,
    ) -> None:
        self.module, self.data = module, data
        self.pairs = sorted(pairs, key=lambda p: len(p[0]))
        self.batch_size, self.heads, self.fixed = batch_size, heads, list(fixed)
        self.name = "bleu" if getattr(data, "is_text", False) else "exact_match"
        self.greedy = module.decoding.beam == 1
        exact = self.name == "exact_match" and self.greedy
        self.teacher_forced = exact if teacher_forced is None else teacher_forced and exact
        self.progress = progress
        self.passes = 0  # batched forward or decoding passes so far

    @torch.no_grad()
    def scores(self, masks: Sequence[Sequence[Head]]) -> list[float]:
        """The metric without each mask's heads, one number per mask."""
        attention = self.module.model.attention_layers()
        together = len(masks) if self.greedy else 1
        hits: list[list[float]] = [[] for _ in masks]  # per mask, per example (exact match)
        hyps: list[list[list[int]]] = [[] for _ in masks]  # per mask, per example (decoded)
        chunks = [self.pairs[i : i + self.batch_size] for i in range(0, len(self.pairs), self.batch_size)]
        groups = [max(1, min(together, ROWS_PER_PASS // len(chunk))) for chunk in chunks]
        bar = tqdm(
            total=sum(-(-len(masks) // g) for g in groups),
            desc=f"scoring {len(masks)} head masks",
            unit="pass",
            disable=not self.progress or len(masks) < 2,
        )
        with bar, kept_head_gates(self.module.model):  # the bar closes and the gates return however it ends
            for chunk, per_pass in zip(chunks, groups, strict=True):
                batch = {k: v.to(self.module.device) for k, v in collate(chunk).items()}  # once per chunk
                for first in range(0, len(masks), per_pass):
                    group = masks[first : first + per_pass]
                    self._set_gates(attention, group, len(chunk))
                    if self.teacher_forced:
                        for i, row in enumerate(self._teacher_forced_hits(batch, len(group))):
                            hits[first + i] += row
                    else:
                        for i, row in enumerate(self._decode(batch["src"], len(group))):
                            hyps[first + i] += row
                    self.passes += 1
                    bar.update()
        if self.teacher_forced:
            return [float(np.mean(h)) for h in hits]
        return [self._score(h) for h in hyps]

    @torch.no_grad()
    def token_losses(self, masks: Sequence[Sequence[Head]]) -> list[float]:
        """The teacher-forced cross-entropy per target token (no smoothing) without each mask's heads, one
        number per mask: masks batched side by side as :meth:`scores` does, one forward per pass."""
        attention = self.module.model.attention_layers()
        nll, tokens = [0.0] * len(masks), 0
        chunks = [self.pairs[i : i + self.batch_size] for i in range(0, len(self.pairs), self.batch_size)]
        with kept_head_gates(self.module.model):
            for chunk in chunks:
                batch = {k: v.to(self.module.device) for k, v in collate(chunk).items()}
                tokens += int((batch["tgt_out"] != PAD_ID).sum())
                per_pass = max(1, ROWS_PER_PASS // len(chunk))
                for first in range(0, len(masks), per_pass):
                    group = masks[first : first + per_pass]
                    self._set_gates(attention, group, len(chunk))
                    src, tgt_in, tgt_out = (batch[k].repeat(len(group), 1) for k in ("src", "tgt_in", "tgt_out"))
                    logits = self.module.model(src, tgt_in).float()  # (masks * B, T, V)
                    rows = F.cross_entropy(logits.transpose(1, 2), tgt_out, ignore_index=PAD_ID, reduction="none")
                    for i, total in enumerate(rows.sum(1).view(len(group), -1).sum(1).tolist()):
                        nll[first + i] += total
                    self.passes += 1
        return [total / max(tokens, 1) for total in nll]

    def _set_gates(self, attention: dict, masks: Sequence[Sequence[Head]], rows_per_mask: int) -> None:
        """Each attention module's gate: (masks * rows_per_mask, H_local), 0 on removed heads."""
        gates = self.module.model.head_gates([[*self.fixed, *mask] for mask in masks])
        for kind, mods in attention.items():
            for layer, attn in enumerate(mods):
                gate = gates[kind, layer]
                local = None if gate is None else gate[:, self.heads.start : self.heads.stop]
                none = local is None or bool(local.all())  # no head of this rank's removed
                attn.set_head_gate(None if none else local.repeat_interleave(rows_per_mask, 0))

    def _teacher_forced_hits(self, batch: dict[str, Tensor], copies: int) -> list[list[float]]:
        """Per mask, per example of the collated ``batch``: 1.0 where greedy decoding would output
        exactly the target."""
        src, tgt_in, tgt_out = (batch[k].repeat(copies, 1) for k in ("src", "tgt_in", "tgt_out"))
        logits = self.module.model.never_emit(self.module.model(src, tgt_in), BOS_ID)  # (copies * B, T, V)
        real = tgt_out != PAD_ID
        right = ((logits.argmax(-1) == tgt_out) | ~real).all(1)
        fits = real.sum(1) <= self.module.decode_steps(batch["src"])  # the target and its EOS fit the limit
        return (right & fits).float().view(copies, -1).tolist()

    def _decode(self, src: Tensor, copies: int) -> list[list[list[int]]]:
        """Per mask, per example of ``src`` (B, S): the decoded ids."""
        out = self.module.generate(src.repeat(copies, 1)).tolist()
        B = src.shape[0]
        return [out[i * B : (i + 1) * B] for i in range(copies)]

    def _score(self, hyps: list[list[int]]) -> float:
        if self.name == "exact_match":
            # As validation scores it: the hypothesis is the target, then EOS, then only padding.
            hits = [
                h[: len(tgt) + 1] == [*tgt, EOS_ID] and all(t == PAD_ID for t in h[len(tgt) + 1 :])
                for h, (_, tgt) in zip(hyps, self.pairs, strict=True)
            ]
            return float(np.mean(hits))
        from torchmetrics.text import SacreBLEUScore

        refs = [[self.data.detokenize(list(tgt) + [EOS_ID])] for _, tgt in self.pairs]
        return float(SacreBLEUScore()([self.data.detokenize(h) for h in hyps], refs))
