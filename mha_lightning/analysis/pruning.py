"""Pruning curves: the task metric as heads are removed one after another, in a chosen order.

Orders: increasing importance (Michel et al. 2019's one-shot ranking, importance normalised per
layer), decreasing normalised entropy (the most diffuse heads first), and random orders. Removing
a head gates its output to 0 (``Seq2SeqTransformer.set_head_mask``), exactly what
``model.head_mask`` does in training and evaluation.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import numpy as np

from mha_lightning.kinds import Head


def ranked_heads(values: dict[str, np.ndarray], descending: bool = False, skip: Sequence[Head] = ()) -> list[Head]:
    """Every head, ordered by ``values`` (kind -> (layers, heads)); ties keep kind, layer, head order."""
    heads = [
        (float(v), Head(kind, layer, head))
        for kind, table in values.items()
        for layer, row in enumerate(np.asarray(table))
        for head, v in enumerate(row)
        if Head(kind, layer, head) not in skip
    ]
    heads.sort(key=lambda pair: -pair[0] if descending else pair[0])
    return [head for _, head in heads]


def random_order(heads: Sequence[Head], seed: int) -> list[Head]:
    """``heads`` shuffled with its own seeded generator."""
    order = list(heads)
    random.Random(seed).shuffle(order)
    return order


def curve_points(num_heads: int, points: int) -> list[int]:
    """``points`` evenly spaced head counts from 0 to ``num_heads`` (both included), without repeats."""
    if points >= num_heads + 1:
        return list(range(num_heads + 1))
    return sorted({round(i * num_heads / (points - 1)) for i in range(points)})


def prunable(points: Sequence[int], metric: Sequence[float], baseline: float, tolerance: float = 0.01) -> int:
    """The most heads removable, along one curve, while every point so far keeps the metric within
    ``tolerance`` (relative) of ``baseline``."""
    best = 0
    for k, value in zip(points, metric, strict=True):
        if value < baseline * (1.0 - tolerance) - 1e-12:
            break
        best = k
    return best


def refine_removable(
    scores_at: Callable[[list[int]], list[float]],
    points: Sequence[int],
    metric: Sequence[float],
    baseline: float,
    tolerance: float = 0.01,
) -> int:
    """:func:`prunable` to the exact head: between the last measured point within ``tolerance`` and
    the next one, every head count is scored (``scores_at(ks)``: the metric with the first k heads of
    the order removed, for each k; one batched call), and the count before the first drop wins."""
    low = prunable(points, metric, baseline, tolerance)
    later = [k for k in points if k > low]
    between = list(range(low + 1, later[0])) if later else []
    for k, value in zip(between, scores_at(between) if between else [], strict=True):
        if value < baseline * (1.0 - tolerance) - 1e-12:
            break
        low = k
    return low


def ranks(values: Sequence[float]) -> np.ndarray:
    """1-based ranks of ``values``, ties sharing their mean rank."""
    values = np.asarray(values, dtype=float)
    order = np.argsort(values, kind="stable")
    ranked = np.empty(len(values))
    ranked[order] = np.arange(1, len(values) + 1)
    for value in np.unique(values):  # average the ranks of ties
        tied = values == value
        ranked[tied] = ranked[tied].mean()
    return ranked


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation of ``a`` and ``b`` (NaN when either is constant)."""
    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])
