"""Synthetic seq2seq tasks, generated deterministically from a seed.

Symbols are token ids NUM_SPECIAL .. vocab_size-1. ``reverse`` and ``pairswap`` have
non-monotonic alignments, which is where cross-attention heads have to do real work.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from mha_lightning.data.vocab import NUM_SPECIAL
from mha_lightning.errors import ConfigError


def _pairswap(s: list[int]) -> list[int]:
    out = list(s)
    for i in range(0, len(s) - 1, 2):
        out[i], out[i + 1] = s[i + 1], s[i]
    return out


TASKS: dict[str, Callable[[list[int]], list[int]]] = {
    "copy": lambda s: list(s),
    "reverse": lambda s: s[::-1],
    "sort": sorted,
    "pairswap": _pairswap,  # a b c d -> b a d c
}


# Which source position each target position copies: the gold alignment a cross-attention head can learn
# (mha-analyze scores heads against it). Sort's ties keep source order (one valid alignment of several).
ALIGNMENTS: dict[str, Callable[[list[int]], list[int]]] = {
    "copy": lambda s: list(range(len(s))),
    "reverse": lambda s: list(range(len(s) - 1, -1, -1)),
    "sort": lambda s: sorted(range(len(s)), key=lambda i: s[i]),
    "pairswap": lambda s: [i ^ 1 if (i ^ 1) < len(s) else i for i in range(len(s))],
}


def generate(task: str, num_examples: int, vocab_size: int, min_len: int, max_len: int, seed: int):
    """-> list of (source ids, target ids)."""
    if task not in TASKS:
        raise ConfigError(f"data.task={task!r} is not a known task; choose one of {sorted(TASKS)}")
    if vocab_size <= NUM_SPECIAL + 1:
        raise ConfigError(f"data.vocab_size ({vocab_size}) must exceed {NUM_SPECIAL + 1} (ids 0-3 are special)")
    if not 1 <= min_len <= max_len:
        raise ConfigError(f"data.min_len ({min_len}) and data.max_len ({max_len}) need 1 <= min_len <= max_len")
    if num_examples < 1:
        raise ConfigError(f"data.num_examples must be positive, got {num_examples}")
    rng = random.Random(seed)
    fn = TASKS[task]
    pairs = []
    for _ in range(num_examples):
        src = [rng.randrange(NUM_SPECIAL, vocab_size) for _ in range(rng.randint(min_len, max_len))]
        pairs.append((src, fn(src)))
    return pairs
