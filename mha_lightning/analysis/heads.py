"""Per-head statistics of a trained model over a set of examples, in one pass.

- importance (Michel et al. 2019): a gate on each head's output, importance = mean over examples
  of |dL/d gate| (L: the example's mean token cross-entropy), also normalised per layer (L2);
- confidence (Voita et al. 2019): mean over queries of the largest attention weight;
- entropy and normalised entropy: the monitor's exact accumulator (``monitor.entropy``);
- similarity (Clark et al. 2019): mean over queries of the Jensen-Shannon distance between every
  two heads' attention distributions, a (heads x heads) matrix per layer;
- alignment (cross-attention on tasks with a gold alignment): how often a head's argmax is the
  source position the output token copies.

Model code stays single-device: a sharded caller passes ``gather``, which turns this rank's heads
into all heads (docs/design.md, "Analysing heads").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from mha_lightning.analysis.roles import SHARES, RoleCounts, RoleInputs
from mha_lightning.data.vocab import PAD_ID
from mha_lightning.kinds import ATTENTION_KINDS
from mha_lightning.model import AttentionMask, ProbingCore
from mha_lightning.monitor.entropy import HeadEntropyAccumulator, finalize

# Local heads (B, H_local, ...) -> all heads (B, H, ...), in global head order.
GatherHeads = Callable[[Tensor], Tensor]
# Pairs of heads whose distributions are compared at once: bounds the (B, H, H, Tq, Tk) temporary.
_JS_CHUNK_ELEMENTS = 1 << 24


def _whole(t: Tensor) -> Tensor:
    return t


def js_distance(probs: Tensor) -> Tensor:
    """(B, H, Tq, Tk) distributions -> (B, H, H, Tq) Jensen-Shannon distance in [0, 1] (base-2 JSD, square root)."""
    entropy = -torch.special.xlogy(probs, probs).sum(-1)  # (B, H, Tq)
    B, H, Tq, Tk = probs.shape
    rows = max(1, _JS_CHUNK_ELEMENTS // max(1, H * H * Tq * Tk))
    out = []
    for start in range(0, B, rows):
        p = probs[start : start + rows]
        mix = (p.unsqueeze(2) + p.unsqueeze(1)) / 2  # (b, H, H, Tq, Tk)
        mix_entropy = -torch.special.xlogy(mix, mix).sum(-1)  # (b, H, H, Tq)
        e = entropy[start : start + rows]
        jsd = mix_entropy - (e.unsqueeze(2) + e.unsqueeze(1)) / 2  # nats, >= 0 up to rounding
        out.append(torch.sqrt((jsd / math.log(2)).clamp(0.0, 1.0)))
    return torch.cat(out)


class HeadObserver:
    """The attention observer of one attention module (through ``ProbingCore``): sums per head."""

    def __init__(
        self, num_heads: int, gather: GatherHeads = _whole, similarity: bool = True, roles: RoleCounts | None = None
    ) -> None:
        self.num_heads = num_heads
        self.roles = roles
        self.gather = gather
        self.similarity = similarity
        self.entropy = HeadEntropyAccumulator(num_heads)
        self.confidence = torch.zeros(num_heads, dtype=torch.float64)
        self.queries = 0
        self.js = torch.zeros(num_heads, num_heads, dtype=torch.float64)
        self.aligned = torch.zeros(num_heads, dtype=torch.float64)
        self.aligned_queries = 0
        self.gold: Tensor | None = None  # (B, Tq) source position each query's output copies, -1: none
        self.capture = 0  # keep the maps of this many leading examples of the next batch
        self.maps: Tensor | None = None  # (n, H, Tq, Tk)

    @torch.no_grad()
    def __call__(self, probs: Tensor, mask: AttentionMask) -> None:
        """probs (B, H_local, Tq, Tk) fp32, masked keys exactly 0."""
        probs = self.gather(probs)
        self.entropy(probs, mask)
        valid = mask.queries & (mask.key_counts() > 0)  # (B, Tq)
        keep = valid.unsqueeze(1)  # (B, 1, Tq)
        top, argmax = probs.max(-1)  # (B, H, Tq)
        self.confidence += torch.where(keep, top.double(), 0.0).sum((0, 2)).cpu()
        self.queries += int(valid.sum())
        if self.roles is not None:
            self.roles.update(argmax, valid, mask.key_counts(), probs.shape[-1])
        if self.similarity:
            self.js += torch.where(keep.unsqueeze(1), js_distance(probs).double(), 0.0).sum((0, 3)).cpu()
        if self.gold is not None:
            scored = valid & (self.gold >= 0)  # (B, Tq)
            hits = (argmax == self.gold.unsqueeze(1)) & scored.unsqueeze(1)
            self.aligned += hits.sum((0, 2)).double().cpu()
            self.aligned_queries += int(scored.sum())
        if self.capture:
            self.maps = probs[: self.capture].cpu()
            self.capture = 0


@dataclass
class HeadStatistics:
    """Every statistic as numpy arrays per attention kind: (layers, heads), or (layers, heads, heads) for ``js``."""

    examples: int
    importance: dict[str, np.ndarray] = field(default_factory=dict)
    importance_norm: dict[str, np.ndarray] = field(default_factory=dict)
    entropy: dict[str, np.ndarray] = field(default_factory=dict)
    entropy_norm: dict[str, np.ndarray] = field(default_factory=dict)
    confidence: dict[str, np.ndarray] = field(default_factory=dict)
    js: dict[str, np.ndarray] = field(default_factory=dict)
    alignment: dict[str, np.ndarray] = field(default_factory=dict)  # cross-attention, on aligned tasks only
    # kind -> share name (``roles.SHARES``) -> (layers, heads): the evidence for each head's roles.
    roles_share: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)

    PER_HEAD = ("importance", "importance_norm", "entropy", "entropy_norm", "confidence", "alignment")

    def to_dict(self) -> dict:
        """JSON-ready nested lists."""
        out: dict = {"examples": self.examples}
        for name in (*self.PER_HEAD, "js"):
            out[name] = {kind: np.asarray(v).tolist() for kind, v in getattr(self, name).items()}
        out["roles_share"] = {
            kind: {name: np.asarray(v).tolist() for name, v in shares.items()}
            for kind, shares in self.roles_share.items()
        }
        return out


def normalise_per_layer(values: np.ndarray) -> np.ndarray:
    """(layers, heads) -> each layer divided by its L2 norm (Michel et al.'s normalisation)."""
    norms = np.linalg.norm(values, axis=1, keepdims=True)
    return values / np.where(norms > 0, norms, 1.0)


def example_losses(logits: Tensor, target: Tensor) -> Tensor:
    """(B, T, V) logits, (B, T) target -> (B,) each example's mean token cross-entropy (no smoothing)."""
    tokens = F.cross_entropy(logits.float().transpose(1, 2), target, ignore_index=PAD_ID, reduction="none")
    return tokens.sum(1) / (target != PAD_ID).sum(1).clamp(min=1)


@contextmanager
def kept_head_gates(model) -> Iterator[dict[str, list[Tensor | None]]]:
    """Yield each attention's current head gate (kind -> per layer; ``head_mask``'s, or None) and put them
    back when the block ends, however it ends: callers set gates of their own in between."""
    attention = model.attention_layers()
    saved = {kind: [attn.head_gate for attn in mods] for kind, mods in attention.items()}
    try:
        yield saved
    finally:
        for kind, mods in attention.items():
            for attn, gate in zip(mods, saved[kind], strict=True):
                attn.set_head_gate(gate)


def gate_importance(model, batch: dict[str, Tensor], local_heads: int) -> dict[str, Tensor]:
    """Michel et al.'s importance summed over the batch's examples: kind -> (layers, local_heads) sums of
    |dL_x / d gate_h|, one forward and one backward (into the gates only: no parameter gets a gradient).

    A gate of ones on every head of this rank multiplies the gate the model already has (``head_mask``),
    which is back afterwards. Under tensor parallelism the caller places the local heads globally."""
    attention = model.attention_layers()
    B, device = batch["src"].shape[0], batch["src"].device
    gates = {}
    with kept_head_gates(model) as fixed:
        for kind, mods in attention.items():
            for layer, attn in enumerate(mods):
                gate = torch.ones(B, local_heads, device=device, requires_grad=True)
                gates[kind, layer] = gate
                base = fixed[kind][layer]
                attn.set_head_gate(gate if base is None else gate * base)
        with torch.enable_grad():
            loss = example_losses(model(batch["src"], batch["tgt_in"]), batch["tgt_out"]).sum()
            grads = torch.autograd.grad(loss, list(gates.values()))
    sums = {kind: torch.zeros(len(mods), local_heads, device=device) for kind, mods in attention.items()}
    for (kind, layer), grad in zip(gates, grads, strict=True):
        sums[kind][layer] = grad.detach().abs().sum(0)
    return sums


def gold_positions(batch: dict[str, Tensor], examples: list, alignment: Callable) -> Tensor | None:
    """(B, Tq) gold source position of each decoder query (query t predicts target token t), -1 where none."""
    gold = torch.full(batch["tgt_in"].shape, -1, dtype=torch.long)
    for row, (src, _) in enumerate(examples):
        positions = alignment(src)
        if positions is None:
            return None
        gold[row, : len(positions)] = torch.tensor(positions, dtype=torch.long)
    return gold


def measure_heads(
    model,
    batches: Iterable[tuple[dict[str, Tensor], list]],
    *,
    local_heads: int,
    gather: GatherHeads = _whole,
    alignment: Callable | None = None,
    similarity: bool = True,
    capture: int = 0,
    roles: RoleInputs | None = None,
    progress: bool = True,
) -> tuple[HeadStatistics, dict[str, list[Tensor]]]:
    """One forward and backward per batch -> (statistics, maps of the first ``capture`` examples).

    ``batches`` yields (collated batch, its (src, tgt) examples). Under tensor parallelism this
    rank holds ``local_heads`` heads of each attention and ``gather`` collects all of them;
    importance is gathered the same way, so every rank returns the whole model's numbers.
    ``maps``: kind -> per layer (n, H, Tq, Tk). ``roles``: count the evidence for head roles (``roles``)."""
    attention = model.attention_layers()
    num_heads = model.config.num_heads

    def observer(kind: str) -> HeadObserver:
        counts = None if roles is None else RoleCounts(num_heads, kind, roles.diagonal_width)
        return HeadObserver(num_heads, gather, similarity, counts)

    observers = {kind: [observer(kind) for _ in mods] for kind, mods in attention.items()}
    importance = {kind: torch.zeros(len(mods), num_heads, dtype=torch.float64) for kind, mods in attention.items()}
    examples = 0
    model.eval()
    device = next(model.parameters()).device
    with model.attention_core(lambda kind, layer: ProbingCore(observers[kind][layer])):
        for n, (batch, pairs) in enumerate(tqdm(batches, desc="heads", unit="batch", disable=not progress)):
            batch = {k: v.to(device) for k, v in batch.items()}
            gold = gold_positions(batch, pairs, alignment) if alignment is not None else None
            gold = gold.to(device) if gold is not None else None
            marks = roles.marks(batch) if roles is not None else {}
            for kind, mods in attention.items():
                for layer in range(len(mods)):
                    observers[kind][layer].gold = gold if kind == "cross" else None
                    observers[kind][layer].capture = capture if n == 0 else 0
                    if roles is not None:
                        observers[kind][layer].roles.sink, observers[kind][layer].roles.rare = marks[kind]
            for kind, sums in gate_importance(model, batch, local_heads).items():
                importance[kind] += gather(sums).double().cpu()  # (layers, H_local) -> (layers, H)
            examples += batch["src"].shape[0]
    stats = HeadStatistics(examples=examples)
    maps: dict[str, list[Tensor]] = {}
    for kind in ATTENTION_KINDS:
        obs = observers[kind]
        raw = (importance[kind] / max(examples, 1)).numpy()
        stats.importance[kind] = raw
        stats.importance_norm[kind] = normalise_per_layer(raw)
        entropy, entropy_norm = finalize(torch.stack([o.entropy.state.cpu() for o in obs]))
        stats.entropy[kind], stats.entropy_norm[kind] = entropy.numpy(), entropy_norm.numpy()
        stats.confidence[kind] = torch.stack([o.confidence / max(o.queries, 1) for o in obs]).numpy()
        if similarity:
            stats.js[kind] = torch.stack([o.js / max(o.queries, 1) for o in obs]).numpy()
        if alignment is not None and kind == "cross" and obs[0].aligned_queries:
            stats.alignment[kind] = torch.stack([o.aligned / o.aligned_queries for o in obs]).numpy()
        if roles is not None:
            shares = [o.roles.shares() for o in obs]
            stats.roles_share[kind] = {name: np.stack([s[name] for s in shares]) for name in SHARES}
        if capture:
            maps[kind] = [o.maps for o in obs]
    return stats, maps
