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

    ``max_tokens`` (with ``sizes``: each example's padded length, the longer of its source and
    target with EOS/BOS) batches by tokens instead: :class:`TokenBatches`.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int | None,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        drop_last: bool = False,
        pool_factor: int = 50,
        max_tokens: int | None = None,
        sizes: Sequence[int] | None = None,
    ) -> None:
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.drop_last = drop_last
        self.pool_factor = pool_factor
        self.tokens = TokenBatches(sizes, max_tokens, batch_size) if max_tokens is not None else None
        self.epoch = 0
        self._start = 0  # batches of the current epoch already consumed (on resume)
        self._cache: tuple[int, list[list[list[int]]]] | None = None  # (epoch, its global batches)

    def _global_batches(self) -> list[list[list[int]]]:
        """This epoch's global batches, each as its replicas' parts (computed once per epoch)."""
        if self._cache is not None and self._cache[0] == self.epoch:
            return self._cache[1]
        if self.tokens is not None:
            batches = self._token_batches()
        else:
            n = self.num_replicas  # a sized global batch is cut into equal contiguous slices
            batches = [[b[r * len(b) // n : (r + 1) * len(b) // n] for r in range(n)] for b in self._sized_batches()]
        self._cache = (self.epoch, batches)
        return batches

    def _sized_batches(self) -> list[list[int]]:
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

    def _token_batches(self) -> list[list[list[int]]]:
        """Global batches of ``num_replicas`` token batches each, shuffled."""
        rng = random.Random(self.seed + self.epoch)
        order = list(range(len(self.tokens.sizes)))
        if self.shuffle:
            rng.shuffle(order)
        groups = self.tokens.global_batches(order, self.num_replicas, pool=self.pool_factor * 100)
        if self.shuffle:
            rng.shuffle(groups)
        return groups

    def __iter__(self) -> Iterator[list[int]]:
        start, self._start = self._start, 0
        for parts in self._global_batches()[start:]:
            yield parts[self.rank]

    def __len__(self) -> int:
        return len(self._global_batches())

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for ``epoch`` (the order is a function of seed + epoch)."""
        self.epoch = epoch

    def padded_tokens(self) -> list[int]:
        """Padded tokens of each of this epoch's batches on this replica (source or target, whichever is longer)."""
        sizes = self.tokens.sizes if self.tokens is not None else [length + 1 for length in self.lengths]
        return [len(p[self.rank]) * max(sizes[i] for i in p[self.rank]) for p in self._global_batches()]

    def state_dict(self, consumed: int) -> dict:
        """The epoch, ``consumed``: global batches of it already taken, and their size (examples)."""
        state = {"epoch": self.epoch, "consumed": consumed, "global_batch": self._global_size()}
        if self.tokens is not None:
            state["epoch_batches"] = len(self)  # at another layout the epoch has another number of batches
        return state

    def _global_size(self) -> int | str:
        if self.tokens is not None:  # token batches: a resume at another layout skips by batch count
            return f"tokens:{self.tokens.max_tokens}x{self.num_replicas}"
        return self.batch_size * self.num_replicas

    def load_state_dict(self, state: dict) -> None:
        """Resume at a :meth:`state_dict`: the next iteration skips the consumed batches. Saved with another
        global batch size (another data-parallel size): as many examples as were taken are skipped
        (rounded down to whole batches), the same position in the epoch within one batch."""
        self.epoch = state["epoch"]
        size, saved = self._global_size(), state.get("global_batch")
        if saved in (None, size):
            self._start = state["consumed"]
        elif isinstance(size, int) and isinstance(saved, int):
            self._start = state["consumed"] * saved // size
        else:  # token batches, or a change between token and sized ones: the same fraction of the epoch
            self._start = state["consumed"] * len(self) // max(1, state.get("epoch_batches") or len(self))
        if saved not in (None, size):
            log.info(
                "resuming with global batches of %s (saved: %s): epoch %d continues after %d of them",
                size,
                saved,
                self.epoch,
                self._start,
            )


class TokenBatches:
    """Batching by tokens (fairseq's ``--max-tokens``): each replica's batch holds at most ``max_tokens``
    padded tokens (examples x the longest example's ``sizes``) and at most ``batch_size`` examples.

    Examples are sorted by size within pools (shuffled first, so the pools and the order among equal sizes
    change every epoch) and cut greedily into batches; ``num_replicas`` consecutive batches, of similar
    lengths, make one global batch, so every replica gets the same number of batches. Left over at the end:
    fewer batches than replicas, whose largest is split in two until there are enough (a single example
    is repeated only when there are fewer examples than replicas)."""

    def __init__(self, sizes: Sequence[int] | None, max_tokens: int, batch_size: int | None = None) -> None:
        if sizes is None:
            raise ValueError("token batching needs each example's size")
        self.sizes = list(sizes)
        self.max_tokens = max_tokens
        self.batch_size = batch_size

    def batches(self, order: Sequence[int], pool: int) -> list[list[int]]:
        """``order`` cut into token batches, each sorted by size, in the order the pools give them."""
        out: list[list[int]] = []
        for p in range(0, len(order), pool):
            current: list[int] = []
            for i in sorted(order[p : p + pool], key=lambda j: self.sizes[j]):
                # Sorted ascending: the new example is the batch's longest.
                full = (len(current) + 1) * self.sizes[i] > self.max_tokens
                if current and (full or (self.batch_size is not None and len(current) == self.batch_size)):
                    out.append(current)
                    current = []
                current.append(i)
            if current:
                out.append(current)
        return out

    def global_batches(self, order: Sequence[int], replicas: int, pool: int) -> list[list[list[int]]]:
        """Groups of ``replicas`` token batches (one per replica)."""
        batches = self.batches(order, pool)
        whole = len(batches) - len(batches) % replicas
        groups = [batches[g : g + replicas] for g in range(0, whole, replicas)]
        rest = batches[whole:]
        if rest:
            while len(rest) < replicas:
                largest = max(range(len(rest)), key=lambda b: len(rest[b]))
                b = rest.pop(largest)
                rest += [b[: len(b) // 2], b[len(b) // 2 :]] if len(b) > 1 else [b, list(b)]
            groups.append(rest)
        return groups


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
