"""Every random stream of a run, seeded in one place and saved with every checkpoint.

A run has two dropout streams per process (docs/design.md, "Randomness"):

- the *replica* stream, torch's global RNG: dropout on replicated activations (embeddings,
  residuals). It must agree across the tensor-parallel ranks of one replica and differ
  between data-parallel replicas;
- the *shard* stream, used inside sharded modules (attention probabilities of the local heads,
  the local FFN units): it differs on every rank, so head h and head h + H/tp get different
  masks, as on one device (Megatron's model-parallel RNG).

Lightning does not save RNG states; :func:`capture` and :func:`restore` put every rank's
streams into the checkpoint, so a resumed run draws the masks the uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import torch
from torch import Tensor, nn

# Offsets keep the streams of one run apart; any fixed distinct constants would do.
_REPLICA_STRIDE = 7919
_SHARD_OFFSET = 2718


class RankSeeds(NamedTuple):
    """The seeds of one process's two streams."""

    replica: int
    shard: int


def rank_seeds(seed: int, dp_rank: int, tp_rank: int, tp_size: int) -> RankSeeds:
    """The seeds of rank (dp_rank, tp_rank): replicas differ over dp, shards over every rank.

    dp_rank 0 keeps ``seed`` itself, so a one-device run draws what it always drew."""
    return RankSeeds(replica=seed + _REPLICA_STRIDE * dp_rank, shard=seed + _SHARD_OFFSET + dp_rank * tp_size + tp_rank)


def _device_states(cuda: bool) -> Tensor:
    return torch.cuda.get_rng_state() if cuda else torch.get_rng_state()


def _set_device_states(state: Tensor, cuda: bool) -> None:
    (torch.cuda.set_rng_state if cuda else torch.set_rng_state)(state)


class ShardedDropoutRNG:
    """The shard stream: entered around each sharded module's forward, the replica stream around it.

    Attach with :meth:`attach`; its ``state`` goes into checkpoints through :func:`capture`."""

    def __init__(self, seed: int, device_type: str) -> None:
        self.cuda = device_type == "cuda"
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if self.cuda else []):
            torch.manual_seed(seed)
            self.state = _device_states(self.cuda)

    def _enter(self, module, args) -> None:
        self._replica = _device_states(self.cuda)
        _set_device_states(self.state, self.cuda)

    def _exit(self, module, args, output) -> None:
        self.state = _device_states(self.cuda)
        _set_device_states(self._replica, self.cuda)

    def attach(self, modules: Iterable[nn.Module]) -> ShardedDropoutRNG:
        """Run every module of ``modules`` on the shard stream."""
        for m in modules:
            m.register_forward_pre_hook(self._enter)
            m.register_forward_hook(self._exit)
        return self


def capture(shard_rng: ShardedDropoutRNG | None) -> dict[str, Tensor]:
    """This process's streams, to be saved: torch CPU (and CUDA) RNG, and the shard stream if any."""
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    if shard_rng is not None:
        states["shard"] = shard_rng.state.clone()
    return states


def restore(states: dict[str, Tensor], shard_rng: ShardedDropoutRNG | None) -> None:
    """Put back what :func:`capture` saved (the inverse, on the same rank of the same layout)."""
    torch.set_rng_state(states["cpu"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
    if shard_rng is not None and "shard" in states:
        shard_rng.state = states["shard"].clone()
