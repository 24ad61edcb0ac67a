"""Every random stream of a run, seeded in one place and saved with every checkpoint.

A run has two dropout streams per process (docs/design.md, "Randomness"):

- the *replica* stream, torch's global RNG: dropout on replicated activations (embeddings,
  residuals). It must agree across the tensor-parallel ranks of one replica and differ
  between data-parallel replicas;
- the *shard* stream, used inside sharded regions (attention probabilities of the local heads,
  the local FFN units; with sequence parallelism whole layers, whose residual stream is cut by
  position): it differs on every rank, so head h and head h + H/tp, or positions t and t + T/tp,
  get different masks, as on one device (Megatron's model-parallel RNG). It is derived from the
  replica stream, not kept beside it: each region draws one seed from the replica stream and runs
  on (that seed, its tp rank).

Lightning does not save RNG states; :func:`capture` and :func:`restore` put every rank's
streams into the checkpoint, so a resumed run draws the masks the uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

# Keeps the replica streams of one run's data-parallel replicas apart; any fixed constant would do.
_REPLICA_STRIDE = 7919
_STEP_STRIDE = 1_000_003
# A region's seed is drawn below 2**56 and shifted by 8 bits for the tp rank: distinct for tp < 256.
_SEED_BITS = 56
_TP_BITS = 8


def replica_seed(seed: int, dp_rank: int) -> int:
    """The replica stream's seed of data-parallel rank ``dp_rank``: replicas differ, and dp_rank 0 keeps
    ``seed`` itself, so a one-device run draws what it always drew."""
    return seed + _REPLICA_STRIDE * dp_rank


def step_seed(seed: int, step: int) -> int:
    """A seed for the streams of a run resumed at ``step`` on another layout: the saved streams belong to
    other ranks, and reusing the start's seed would repeat the masks of the first steps."""
    return seed + _STEP_STRIDE * step


class ShardedDropoutRNG:
    """The shard stream: entered around each sharded region's forward, the replica stream around it.

    Entering draws one seed from the replica stream (the CPU generator, so every tp rank of a replica
    draws the same one) and seeds the device's generator with it and this process's tp rank; leaving
    puts the replica stream back, one draw further on. Nothing is stored between regions, so a region
    that activation checkpointing runs again (after restoring the replica stream, as it does) draws
    the same masks, and a resumed run needs only the replica stream."""

    def __init__(self, tp_rank: int, device_type: str) -> None:
        if not 0 <= tp_rank < 1 << _TP_BITS:
            raise ValueError(f"tp_rank {tp_rank} out of range")
        self.tp_rank = tp_rank
        self.cuda = device_type == "cuda"
        self._saved: list[Tensor] = []

    def _enter(self, module, args) -> None:
        seed = int(torch.randint(1 << _SEED_BITS, (), dtype=torch.int64)) << _TP_BITS | self.tp_rank
        if self.cuda:
            self._saved.append(torch.cuda.get_rng_state())
            torch.cuda.manual_seed(seed)
        else:
            self._saved.append(torch.get_rng_state())
            torch.default_generator.manual_seed(seed)

    def _exit(self, module, args, output) -> None:
        (torch.cuda.set_rng_state if self.cuda else torch.set_rng_state)(self._saved.pop())

    def attach(self, modules: Iterable[nn.Module]) -> ShardedDropoutRNG:
        """Run every module of ``modules`` on the shard stream."""
        for m in modules:
            m.register_forward_pre_hook(self._enter)
            m.register_forward_hook(self._exit)
        return self


def capture() -> dict[str, Tensor]:
    """This process's streams, to be saved: torch's CPU (and CUDA) generator state."""
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def restore(states: dict[str, Tensor]) -> None:
    """Put back what :func:`capture` saved (the inverse, on the same rank of the same layout)."""
    torch.set_rng_state(states["cpu"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
