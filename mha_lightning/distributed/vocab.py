"""Vocabulary parallelism: embedding rows, output-projection rows and the loss on vocabulary shards.

Tensor-parallel rank r holds rows [offset, offset + V_r) of the (V, D) token embedding and of the
output projection (one matrix when they are shared; torch.chunk's split, so V need not divide by
tp). The embedding looks up its own rows and the lookups are summed over the ranks; its backward
adds into its own rows only. The head below makes only its rank's (tokens x V_r) logits,
a block of rows at a time, and combines four numbers per token over the ranks (the maximum, the
sum of exponentials, the target's logit, the sum of logits for label smoothing; Megatron's
vocab-parallel cross-entropy): the loss, its gradient, perplexity, greedy and beam decoding come
out exact, and no rank ever holds the whole output matrix or the whole logits
(docs/design.md, "Vocabulary parallelism").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from mha_lightning.losses import CPU_BLOCK_ELEMENTS, GPU_BLOCK_ELEMENTS, row_max
from mha_lightning.model.vocabulary import VocabularyHead, frozen_beam

MAX, MIN, SUM = dist.ReduceOp.MAX, dist.ReduceOp.MIN, dist.ReduceOp.SUM


@dataclass(frozen=True)
class VocabShard:
    """Which rows of the vocabulary this rank holds, and the group holding the others."""

    offset: int
    rows: int
    vocab_size: int
    group: dist.ProcessGroup
    mesh: DeviceMesh

    def reduce(self, t: Tensor, op) -> Tensor:
        """``t`` reduced in place over the tensor-parallel ranks."""
        dist.all_reduce(t, op=op, group=self.group)
        return t

    def gather(self, t: Tensor) -> Tensor:
        """(..., n) from every rank -> (..., tp * n), in rank order."""
        parts = [torch.empty_like(t) for _ in range(self.mesh.size())]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


def chunk_rows(vocab_size: int, tp_size: int, tp_rank: int) -> tuple[int, int]:
    """(offset, rows) of ``tp_rank``'s part under torch.chunk's split (DTensor's ``Shard(0)``)."""
    per = -(-vocab_size // tp_size)
    offset = min(tp_rank * per, vocab_size)
    return offset, min(per, vocab_size - offset)


def _block_scores(
    x: Tensor, g: Tensor | None, target: Tensor, ignore_index: int, smoothing: float, shard: VocabShard
) -> tuple[Tensor, Tensor, Tensor]:
    """One block of this rank's logits ``x`` (n, V_r) fp32 -> (row losses, row negative log-likelihoods,
    argmax (n,)), all over the whole vocabulary; ``g`` (may be ``x``) receives d(row loss)/d(x)."""
    V = shard.vocab_size
    valid = target != ignore_index
    local = target - shard.offset
    here = valid & (local >= 0) & (local < x.shape[1])  # this rank holds the target's row
    t = torch.where(here, local, 0).unsqueeze(1)
    # Everything read from x first: g may share its memory.
    picked = torch.where(here, x.gather(1, t).squeeze(1), 0.0)
    summed = x.sum(-1)
    peak, argmax = row_max(x)  # (n, 1), (n,)
    top = shard.reduce(peak.clone(), MAX)
    # The first index holding the global maximum, as argmax over the whole row gives it.
    first = shard.reduce(torch.where(peak.squeeze(1) == top.squeeze(1), argmax + shard.offset, V), MIN)
    if g is not None:
        torch.softmax(x, -1, out=g)  # this rank's softmax: vectorised, unlike exp_ on CPU
        local_sum = 1.0 / g.gather(1, argmax.unsqueeze(1))  # sum(exp(x - peak)), read at the maximum
    else:
        local_sum = (x - peak).exp_().sum(-1, keepdim=True)
    local_sum = local_sum * (peak - top).exp()  # relative to the global maximum
    total, picked, summed = shard.reduce(torch.cat([local_sum.squeeze(1), picked, summed]), SUM).chunk(3)
    log_z = top.squeeze(1) + total.log()
    nll = log_z - picked
    loss = nll + smoothing * picked - (smoothing / V) * summed  # -(1 - e) log p_t - (e / V) sum_j log p_j
    if g is not None:
        g.mul_(local_sum / total.unsqueeze(1))  # the global softmax
        g.sub_(smoothing / V)
        g.scatter_add_(1, t, torch.where(here, -(1 - smoothing), 0.0).unsqueeze(1))
        g.index_fill_(0, (~valid).nonzero().squeeze(1), 0.0)
    return torch.where(valid, loss, 0.0), torch.where(valid, nll, 0.0), first


def _rows_per_block(device: torch.device, rows: int) -> int:
    return max(1, (CPU_BLOCK_ELEMENTS if device.type == "cpu" else GPU_BLOCK_ELEMENTS) // max(rows, 1))


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """(label-smoothed loss sum, nll sum, argmax) of ``hidden @ weight.T`` over the whole vocabulary,
    from this rank's rows ``weight`` (V_r, D); gradients computed in the same pass, block by block."""

    @staticmethod
    def forward(ctx, hidden, weight, target, ignore_index: int, smoothing: float, shard: VocabShard, grads: bool):
        N = hidden.shape[0]
        device = hidden.device.type
        compute = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        with torch.autocast(device, enabled=False):
            h, w = hidden.to(compute), weight.to(compute)
            grad_h = torch.zeros_like(hidden) if grads else None
            grad_dtype = torch.promote_types(weight.dtype, torch.float32)
            grad_w = torch.zeros(weight.shape, dtype=grad_dtype, device=w.device) if grads else None
            loss = hidden.new_empty(N, dtype=torch.float32)
            nll, argmax = torch.empty_like(loss), target.new_empty(N)
            # The same blocks on every rank (their collectives pair up), whatever its share of an uneven split.
            rows = _rows_per_block(hidden.device, -(-shard.vocab_size // shard.mesh.size()))
            for start in range(0, N, rows):
                block = slice(start, start + rows)
                x = (h[block] @ w.t()).float()  # (n, V_r): this rank's logits of the block
                g = x if grads else None
                loss[block], nll[block], argmax[block] = _block_scores(
                    x, g, target[block], ignore_index, smoothing, shard
                )
                if grads:
                    g = g.to(compute)
                    grad_h[block] = g @ w  # this rank's part of d loss / d hidden
                    grad_w += (g.t() @ h[block]).to(grad_w.dtype)
        if grads:
            shard.reduce(grad_h, SUM)  # every rank holds the same hidden states: the whole gradient on each
            ctx.grads = grad_h, grad_w.to(weight.dtype)
        ctx.mark_non_differentiable(argmax)
        return loss.sum(), nll.sum().detach(), argmax

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _grad_nll, _grad_argmax):
        grad_h, grad_w = ctx.grads
        ctx.grads = None
        return grad_h * grad_loss, grad_w * grad_loss, None, None, None, None, None


class VocabParallelHead(VocabularyHead):
    """:class:`~mha_lightning.model.vocabulary.VocabularyHead` on this rank's rows of the vocabulary."""

    def __init__(self, shard: VocabShard) -> None:
        self.shard = shard

    def _local(self, weight: Tensor) -> Tensor:
        return weight.to_local() if isinstance(weight, DTensor) else weight

    def logits(self, states: Tensor, weight: Tensor) -> Tensor:
        """The whole (..., V) logits, gathered over the ranks, for callers that need them all (analysis).

        As DTensors, so that a backward pass sums the states' gradient over the ranks' vocabulary parts."""
        states = DTensor.from_local(states, self.shard.mesh, [Replicate()], run_check=False)
        return F.linear(states, weight).full_tensor()

    def loss(self, states, weight, target, ignore_index, smoothing):
        """The training loss from vocabulary shards: (smoothed sum, argmax), the logits never whole."""
        weight = self._local(weight)
        grads = torch.is_grad_enabled() and (states.requires_grad or weight.requires_grad)
        loss, _, argmax = _VocabParallelCrossEntropy.apply(
            states, weight, target, ignore_index, float(smoothing), self.shard, grads
        )
        return loss, argmax

    def scores(self, states, weight, target, ignore_index, smoothing):
        """Evaluation's (smoothed sum, nll sum, argmax) from vocabulary shards."""
        with torch.no_grad():
            return _VocabParallelCrossEntropy.apply(
                states, self._local(weight), target, ignore_index, float(smoothing), self.shard, False
            )

    def _local_logits(self, states: Tensor, weight: Tensor, banned: Sequence[int]) -> Tensor:
        x = (states @ self._local(weight).t()).float()  # (R, V_r)
        local = [b - self.shard.offset for b in banned if 0 <= b - self.shard.offset < x.shape[1]]
        x[:, local] = float("-inf")
        return x

    def best_tokens(self, states, weight, banned):
        """Greedy: the first token holding the row's global maximum."""
        x = self._local_logits(states, weight, banned)
        peak, argmax = x.max(-1)
        top = self.shard.reduce(peak.clone(), MAX)
        candidate = torch.where(peak == top, argmax + self.shard.offset, self.shard.vocab_size)
        return self.shard.reduce(candidate, MIN)

    def top_candidates(self, states, weight, scores, finished, pad_id, banned):
        """A beam step on shards: each rank's K best candidates, then the K best of all of them."""
        B, K = scores.shape
        shard = self.shard
        x = self._local_logits(states, weight, banned)
        peak = shard.reduce(x.amax(-1, keepdim=True), MAX)
        total = shard.reduce((x - peak).exp().sum(-1, keepdim=True), SUM)
        logp = x - (peak + total.log())  # (B*K, V_r): log-probabilities over the whole vocabulary
        logp = torch.where(finished.unsqueeze(1), frozen_beam(logp, pad_id, shard.offset), logp)
        candidates = (scores.view(B * K, 1) + logp).view(B, K * shard.rows)
        values, index = candidates.topk(min(K, K * shard.rows), dim=-1)  # this rank's best
        flat = (index // shard.rows) * shard.vocab_size + shard.offset + index % shard.rows  # into K * V
        values, flat = shard.gather(values), shard.gather(flat)  # (B, tp * K)
        best, pick = values.topk(K, dim=-1)
        return best, flat.gather(1, pick)


class _VocabParallelLookup(torch.autograd.Function):
    """Embedding rows of the ids this rank holds (0 for the others), summed over the ranks. Backward adds
    the (replicated) output gradient into this rank's rows only: DTensor's own embedding backward makes
    the whole (V, D) gradient on every rank first (Megatron's VocabParallelEmbedding does the same as here)."""

    @staticmethod
    def forward(ctx, ids: Tensor, weight: Tensor, shard: VocabShard, padding_idx: int | None):
        local = ids - shard.offset
        here = (local >= 0) & (local < weight.shape[0])
        local = torch.where(here, local, 0)
        out = F.embedding(local, weight) * here.unsqueeze(-1).to(weight.dtype)  # (..., D)
        ctx.save_for_backward(local, here)
        ctx.shard, ctx.rows, ctx.padding_idx = shard, weight.shape[0], padding_idx
        return shard.reduce(out, SUM)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        local, here = ctx.saved_tensors
        shard = ctx.shard
        grad = grad_out.new_zeros(ctx.rows, grad_out.shape[-1])
        grad.index_add_(0, local[here], grad_out[here])
        if ctx.padding_idx is not None and 0 <= ctx.padding_idx - shard.offset < ctx.rows:
            grad[ctx.padding_idx - shard.offset] = 0.0  # nn.Embedding's padding row gets no gradient
        return None, grad, None, None


def _lookup(tokens: nn.Embedding, shard: VocabShard):
    def forward(ids: Tensor) -> Tensor:
        weight = tokens.weight
        local = weight.to_local() if isinstance(weight, DTensor) else weight
        return _VocabParallelLookup.apply(ids, local, shard, tokens.padding_idx)

    return forward


def apply_vocab_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Token embeddings by vocabulary rows, the output projection likewise (the same matrix when shared),
    and the model's vocabulary head swapped for :class:`VocabParallelHead`."""
    V = model.config.vocab_size
    offset, rows = chunk_rows(V, tp_mesh.size(), tp_mesh.get_local_rank())
    shard = VocabShard(offset, rows, V, tp_mesh.get_group(), tp_mesh)
    embeddings = {id(e.tokens): e.tokens for e in (model.src_embed, model.tgt_embed)}.values()
    for tokens in embeddings:  # once per matrix: source and target share one when tied
        weight = tokens.weight
        tokens.weight = nn.Parameter(distribute_tensor(weight, tp_mesh, [Shard(0)]), weight.requires_grad)
        tokens.forward = _lookup(tokens, shard)
    if model.config.share_embeddings:
        model.tie_weights()
    else:
        weight = model.output.weight
        model.output.weight = nn.Parameter(distribute_tensor(weight, tp_mesh, [Shard(0)]), weight.requires_grad)
    model.vocabulary = VocabParallelHead(shard)
