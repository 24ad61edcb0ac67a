"""Length-bucketed, data-parallel-aware, resumable batching."""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from mha_lightning.data.vocab import BOS_ID, EOS_ID, PAD_ID

log = logging.getLogger(__name__)
Example = tuple[list[int], list[int]]  # (source ids, target ids), no BOS/EOS


class PairDataset(Dataset):
    """(source ids, target ids) pairs, indexable."""

    def __init__(self, pairs: Sequence[Example]) -> None:
        self.pairs = list(pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> Example:
        return self.pairs[i]


def pad(seqs: Sequence[Sequence[int]]) -> torch.Tensor:
    """(len(seqs), longest) long tensor, right-padded with PAD."""
    out = torch.full((len(seqs), max(len(s) for s in seqs)), PAD_ID, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def collate(batch: Sequence[Example]) -> dict[str, torch.Tensor]:
    """src gets EOS; the decoder reads BOS + target and predicts target + EOS."""
    return {
        "src": pad([s + [EOS_ID] for s, _ in batch]),
        "tgt_in": pad([[BOS_ID] + t for _, t in batch]),
        "tgt_out": pad([t + [EOS_ID] for _, t in batch]),
    }


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of similar length (little padding), identical across data-parallel sizes.

    Global batches of ``batch_size * num_replicas`` examples are formed from length-sorted
    pools and shuffled per epoch; replica ``rank`` takes its contiguous slice of each.
    So dp=2 with batch_size b sees the same global batches as dp=1 with batch_size 2b.
    Every replica gets the same number of batches (collectives stay in lockstep): with
    ``drop_last=False`` a short last global batch is topped up to a multiple of
    ``num_replicas`` (at most num_replicas - 1 repeated examples; none on one device).
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        drop_last: bool = False,
        pool_factor: int = 50,
    ) -> None:
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.drop_last = drop_last
        self.pool_factor = pool_factor
        self.epoch = 0
        self._start = 0  # batches of the current epoch already consumed (on resume)

    def _global_batches(self) -> list[list[int]]:
        n, size = len(self.lengths), self.batch_size * self.num_replicas
        order = list(range(n))
        rng = random.Random(self.seed + self.epoch)
        if self.shuffle:
            rng.shuffle(order)
        pool = size * self.pool_factor
        batches = []
        for p in range(0, n, pool):
            chunk = sorted(order[p : p + pool], key=lambda i: self.lengths[i])
            batches += [chunk[i : i + size] for i in range(0, len(chunk), size)]
        short = [b for b in batches if len(b) < size]
        batches = [b for b in batches if len(b) == size]
        leftover = [i for b in short for i in b]
        for i in range(0, len(leftover), size):
            b = leftover[i : i + size]
            if len(b) < size:
                if self.drop_last and batches:
                    continue
                # Top up only to a multiple of num_replicas: replicas get equal slices, and
                # on one device every example is scored exactly once.
                b = b + [order[j % n] for j in range(-len(b) % self.num_replicas)]
            batches.append(sorted(b, key=lambda i: self.lengths[i]))
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        start, self._start = self._start, 0
        for batch in self._global_batches()[start:]:
            per = len(batch) // self.num_replicas
            yield batch[self.rank * per : (self.rank + 1) * per]

    def __len__(self) -> int:
        return len(self._global_batches())

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for ``epoch`` (the order is a function of seed + epoch)."""
        self.epoch = epoch

    def state_dict(self, consumed: int) -> dict:
        """The epoch, ``consumed``: global batches of it already taken, and their size (examples)."""
        return {"epoch": self.epoch, "consumed": consumed, "global_batch": self.batch_size * self.num_replicas}

    def load_state_dict(self, state: dict) -> None:
        """Resume at a :meth:`state_dict`: the next iteration skips the consumed batches. Saved with another
        global batch size (another data-parallel size): as many examples as were taken are skipped
        (rounded down to whole batches), the same position in the epoch within one batch."""
        self.epoch = state["epoch"]
        size, saved = self.batch_size * self.num_replicas, state.get("global_batch")
        self._start = state["consumed"] if saved in (None, size) else state["consumed"] * saved // size
        if saved not in (None, size):
            log.info(
                "resuming with global batches of %d examples (saved: %d): epoch %d continues after %d of them",
                size,
                saved,
                self.epoch,
                self._start,
            )


class ResumableDataLoader(DataLoader):
    """A DataLoader Lightning can resume mid-epoch: it saves how many batches were taken.

    Lightning prefetches one batch ahead, so the count is of batches handed to the
    training step (``mark_step``), not of batches read."""

    def __init__(self, dataset, batch_sampler: BucketBatchSampler, **kwargs) -> None:
        super().__init__(dataset, batch_sampler=batch_sampler, **kwargs)
        self.consumed = 0

    def __iter__(self):
        self.consumed = self.batch_sampler._start
        return super().__iter__()

    def mark_step(self) -> None:
        """Count one batch as consumed (the training step calls this)."""
        self.consumed += 1

    def state_dict(self) -> dict:
        """Saved by Lightning with the loop state: the sampler's epoch and the batches consumed."""
        return self.batch_sampler.state_dict(self.consumed)

    def load_state_dict(self, state: dict) -> None:
        """Restored by Lightning on resume; see :meth:`BucketBatchSampler.load_state_dict`."""
        self.batch_sampler.load_state_dict(state)
