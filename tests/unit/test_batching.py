"""BucketBatchSampler, the resumable loader, collate and the synthetic tasks."""

from __future__ import annotations

import random

import pytest
import torch

from mha_lightning.data.batching import BucketBatchSampler, PairDataset, ResumableDataLoader, collate
from mha_lightning.data.synthetic import TASKS, generate
from mha_lightning.data.vocab import BOS_ID, EOS_ID, NUM_SPECIAL, PAD_ID
from mha_lightning.errors import ConfigError

N = 1003  # not a multiple of any batch size below: exercises the topped-up last batch


@pytest.fixture(scope="module")
def lengths() -> list[int]:
    rng = random.Random(7)
    return [rng.randint(2, 60) for _ in range(N)]


def batches(lengths, **kwargs) -> list[list[int]]:
    return list(BucketBatchSampler(lengths, **kwargs))


def padding(lengths, bs) -> int:
    return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in bs)


# ----------------------------------------------------------------------------- coverage
@pytest.mark.parametrize("shuffle", [True, False])
def test_eval_epoch_covers_every_example(lengths, shuffle):
    bs = batches(lengths, batch_size=32, shuffle=shuffle, drop_last=False, pool_factor=4)
    seen = [i for b in bs for i in b]
    assert set(seen) == set(range(N))
    assert sum(len(b) != 32 for b in bs) <= 1  # one short batch at most (anywhere, once shuffled)
    assert len(bs) == -(-N // 32)
    assert len(seen) == N  # one device scores every example exactly once: no top-up
    assert len(bs) == len(BucketBatchSampler(lengths, batch_size=32, shuffle=shuffle, drop_last=False))


def test_train_epoch_drop_last_has_no_duplicates(lengths):
    bs = batches(lengths, batch_size=32, shuffle=True, drop_last=True, pool_factor=4)
    seen = [i for b in bs for i in b]
    assert len(seen) == len(set(seen)) == (N // 32) * 32
    assert all(len(b) == 32 for b in bs)


def test_bucketing_reduces_padding(lengths):
    bs = batches(lengths, batch_size=32, shuffle=True, seed=0, pool_factor=8)
    order = list(range(N))
    random.Random(0).shuffle(order)
    rand = [order[i : i + 32] for i in range(0, N, 32)]
    assert padding(lengths, bs) < 0.5 * padding(lengths, rand)
    # Within a batch the lengths are sorted.
    assert all([lengths[i] for i in b] == sorted(lengths[i] for i in b) for b in bs)


# ----------------------------------------------------------------------------- order
def test_deterministic_for_a_seed_and_shuffled_per_epoch(lengths):
    kw = dict(batch_size=16, shuffle=True, pool_factor=4)
    assert batches(lengths, seed=3, **kw) == batches(lengths, seed=3, **kw)
    assert batches(lengths, seed=3, **kw) != batches(lengths, seed=4, **kw)
    sampler = BucketBatchSampler(lengths, seed=3, **kw)
    epoch0 = list(sampler)
    assert list(sampler) == epoch0  # same epoch, same order
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert epoch1 != epoch0
    assert sorted(map(sorted, epoch1)) != sorted(map(sorted, epoch0))  # different batches, not only reordered
    assert {i for b in epoch1 for i in b} == {i for b in epoch0 for i in b} == set(range(N))


def test_no_shuffle_ignores_epoch(lengths):
    sampler = BucketBatchSampler(lengths, batch_size=16, shuffle=False)
    first = list(sampler)
    sampler.set_epoch(5)
    assert list(sampler) == first


# ----------------------------------------------------------------------------- data parallel
@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("epoch", [0, 2])
def test_two_replicas_see_the_dp1_global_batches(lengths, drop_last, epoch):
    kw = dict(shuffle=True, seed=11, drop_last=drop_last, pool_factor=4)
    ref = BucketBatchSampler(lengths, batch_size=24, **kw)
    ranks = [BucketBatchSampler(lengths, batch_size=12, num_replicas=2, rank=r, **kw) for r in (0, 1)]
    for s in (ref, *ranks):
        s.set_epoch(epoch)
    ref_batches = list(ref)
    r0, r1 = (list(s) for s in ranks)
    assert len(r0) == len(r1) == len(ref_batches) == len(ranks[0]) == len(ranks[1])
    assert all(len(a) == len(b) for a, b in zip(r0, r1, strict=True))  # equal slices: collectives stay in lockstep
    short = 0
    for a, b, g in zip(r0, r1, ref_batches, strict=True):
        if len(g) == 24:
            assert len(a) == 12 and a + b == g
        else:  # the one short global batch, topped up by at most num_replicas - 1 repeats
            short += 1
            assert set(g) <= set(a + b) and len(a + b) - len(g) <= 1
    assert short <= 1
    if not drop_last:
        assert set(i for b in r0 + r1 for i in b) == set(range(N))


def test_replicas_get_equal_batch_counts_for_awkward_sizes():
    for n in (1, 5, 37, 100):
        lengths = list(range(1, n + 1))
        for drop_last in (False, True):
            counts = [
                len(list(BucketBatchSampler(lengths, batch_size=8, num_replicas=3, rank=r, drop_last=drop_last)))
                for r in range(3)
            ]
            assert len(set(counts)) == 1, (n, drop_last, counts)
            assert counts[0] >= 1  # an eval split smaller than one global batch is still evaluated


# ----------------------------------------------------------------------------- resume
@pytest.mark.parametrize("consumed", [0, 5, 31])
def test_sampler_resume_yields_exactly_the_remaining_batches(lengths, consumed):
    kw = dict(batch_size=32, shuffle=True, seed=5, pool_factor=4)
    sampler = BucketBatchSampler(lengths, **kw)
    sampler.set_epoch(3)
    full = list(sampler)
    state = sampler.state_dict(consumed)
    resumed = BucketBatchSampler(lengths, **kw)
    resumed.load_state_dict(state)
    assert resumed.epoch == 3
    assert list(resumed) == full[consumed:]
    assert list(resumed) == full  # the offset applies to the resumed epoch only


def test_loader_resume_mid_epoch_with_two_replicas(lengths):
    pairs = [([4] * n, [5] * n) for n in lengths]

    def loader(rank):
        sampler = BucketBatchSampler(lengths, batch_size=8, num_replicas=2, rank=rank, seed=1, drop_last=True)
        return ResumableDataLoader(PairDataset(pairs), sampler, collate_fn=collate)

    for rank in (0, 1):
        first = loader(rank)
        full = [b["src"] for b in first]
        it = iter(first)
        for _ in range(7):
            next(it)
            first.mark_step()
        state = first.state_dict()
        assert state == {"epoch": 0, "consumed": 7, "global_batch": 16}
        second = loader(rank)
        second.load_state_dict(state)
        rest = [b["src"] for b in second]
        assert len(rest) == len(full) - 7
        assert all(torch.equal(a, b) for a, b in zip(rest, full[7:], strict=True))
        # Saved again right after the resume, before any step: still 7 consumed.
        third = loader(rank)
        third.load_state_dict(state)
        iter(third)
        assert third.state_dict()["consumed"] == 7


def test_resume_at_another_global_batch_skips_as_many_examples(lengths):
    """Saved by 2 replicas of 8 (global batches of 16), resumed by one replica of 8: 7 batches of 16 taken
    are 14 of 8, so the epoch goes on after the same 112 examples."""
    pairs = [([4] * n, [5] * n) for n in lengths]
    two = ResumableDataLoader(
        PairDataset(pairs), BucketBatchSampler(lengths, batch_size=8, num_replicas=2, seed=1), collate_fn=collate
    )
    one = ResumableDataLoader(PairDataset(pairs), BucketBatchSampler(lengths, batch_size=8, seed=1), collate_fn=collate)
    all_batches = len(one)
    one.load_state_dict({**two.batch_sampler.state_dict(7), "epoch": 0})
    assert sum(1 for _ in one) == all_batches - 14
    # A checkpoint of an older version (no global_batch): taken as written at this size.
    one.load_state_dict({"epoch": 0, "consumed": 7})
    assert sum(1 for _ in one) == all_batches - 7


# ----------------------------------------------------------------------------- collate
def test_collate_places_bos_eos_and_pad():
    out = collate([([5, 6, 7], [8, 9]), ([10], [11, 12, 13, 14])])
    assert set(out) == {"src", "tgt_in", "tgt_out"}
    assert all(t.dtype == torch.long for t in out.values())
    assert out["src"].tolist() == [[5, 6, 7, EOS_ID], [10, EOS_ID, PAD_ID, PAD_ID]]
    assert out["tgt_in"].tolist() == [[BOS_ID, 8, 9, PAD_ID, PAD_ID], [BOS_ID, 11, 12, 13, 14]]
    assert out["tgt_out"].tolist() == [[8, 9, EOS_ID, PAD_ID, PAD_ID], [11, 12, 13, 14, EOS_ID]]
    # Teacher forcing: tgt_out is tgt_in shifted left by one.
    assert torch.equal(
        out["tgt_in"][:, 1:][out["tgt_out"][:, :-1] != EOS_ID], out["tgt_out"][:, :-1][out["tgt_out"][:, :-1] != EOS_ID]
    )


# ----------------------------------------------------------------------------- synthetic tasks
@pytest.mark.parametrize(
    "task, src, tgt",
    [
        ("copy", [5, 9, 4, 7], [5, 9, 4, 7]),
        ("reverse", [5, 9, 4, 7], [7, 4, 9, 5]),
        ("sort", [5, 9, 4, 7, 4], [4, 4, 5, 7, 9]),
        ("pairswap", [5, 9, 4, 7], [9, 5, 7, 4]),
        ("pairswap", [5, 9, 4, 7, 8], [9, 5, 7, 4, 8]),
    ],
)
def test_task_functions(task, src, tgt):
    assert TASKS[task](src) == tgt


@pytest.mark.parametrize("task", ["copy", "reverse", "sort", "pairswap"])
def test_generated_targets_are_correct(task):
    pairs = generate(task, 300, vocab_size=16, min_len=3, max_len=9, seed=0)
    assert len(pairs) == 300
    for src, tgt in pairs:
        assert 3 <= len(src) <= 9 and len(tgt) == len(src)
        assert all(NUM_SPECIAL <= i < 16 for i in src)
        if task == "copy":
            assert tgt == src
        elif task == "reverse":
            assert tgt == src[::-1]
        elif task == "sort":
            assert tgt == sorted(src)
        else:
            assert tgt[0::2] == src[1::2] + src[-1:] * (len(src) % 2)
            assert tgt[1::2] == src[0::2][: len(src) // 2]
    assert {len(s) for s, _ in pairs} == set(range(3, 10))
    assert {i for s, _ in pairs for i in s} == set(range(NUM_SPECIAL, 16))


def test_generation_is_deterministic_per_seed():
    a = generate("reverse", 50, 24, 4, 12, seed=1)
    assert a == generate("reverse", 50, 24, 4, 12, seed=1)
    assert a != generate("reverse", 50, 24, 4, 12, seed=2)


@pytest.mark.parametrize(
    "kwargs, key",
    [
        (dict(task="nope"), "data.task"),
        (dict(vocab_size=5), "data.vocab_size"),
        (dict(min_len=0), "data.min_len"),
        (dict(min_len=9, max_len=3), "data.max_len"),
    ],
)
def test_invalid_synthetic_settings_raise_config_error(kwargs, key):
    args = {**dict(task="copy", num_examples=5, vocab_size=16, min_len=2, max_len=6, seed=0), **kwargs}
    with pytest.raises(ConfigError) as info:
        generate(**args)
    assert key in str(info.value) and "\n" not in str(info.value)


def test_synthetic_datamodule_splits_and_loaders():
    from mha_lightning.data import SyntheticDataModule

    dm = SyntheticDataModule(
        task="sort", vocab_size=16, num_train=64, num_val=20, num_test=10, batch_size=8, eval_batch_size=16, seed=4
    )
    assert [len(dm.splits[s]) for s in ("train", "val", "test")] == [64, 20, 10]
    assert dm.splits["train"] != dm.splits["val"]  # different seeds per split
    assert (
        dm.splits
        == SyntheticDataModule(
            task="sort", vocab_size=16, num_train=64, num_val=20, num_test=10, batch_size=8, eval_batch_size=16, seed=4
        ).splits
    )
    train = list(dm.train_dataloader())
    assert len(train) == 8 and all(b["src"].shape[0] == 8 for b in train)
    val = list(dm.val_dataloader())
    seen = {tuple(row[row != PAD_ID][:-1].tolist()) for b in val for row in b["src"]}
    assert seen == {tuple(s) for s, _ in dm.splits["val"]}
    assert dm.probe_batch()["src"].shape[0] == 20
    with pytest.raises(ConfigError, match="data.task"):
        SyntheticDataModule(task="nope")


# --------------------------------------------------------------------------- batches by tokens
def token_corpus(n: int = 400, seed: int = 3) -> list[tuple[list[int], list[int]]]:
    """Pairs whose source and target lengths differ (either may be the longer), 1 to 40 tokens."""
    rng = random.Random(seed)
    return [([5] * rng.randint(1, 40), [6] * rng.randint(1, 40)) for _ in range(n)]


def token_sampler(pairs, rank=0, replicas=1, max_tokens=200, batch_size=None, **kwargs) -> BucketBatchSampler:
    return BucketBatchSampler(
        [len(s) + len(t) for s, t in pairs],
        batch_size=batch_size,
        num_replicas=replicas,
        rank=rank,
        max_tokens=max_tokens,
        sizes=[max(len(s), len(t)) + 1 for s, t in pairs],
        **kwargs,
    )


def padded(pairs, batch) -> int:
    """Padded tokens of a collated batch: its rows x the longer of its source and target columns."""
    b = collate([pairs[i] for i in batch])
    return b["src"].shape[0] * max(b["src"].shape[1], b["tgt_out"].shape[1])


@pytest.mark.parametrize("batch_size", [None, 6])
def test_token_batches_hold_both_limits_and_every_example_once(batch_size):
    pairs = token_corpus()
    sampler = token_sampler(pairs, max_tokens=200, batch_size=batch_size, seed=1)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(len(pairs)))
    assert all(padded(pairs, b) <= 200 for b in batches)
    assert max(padded(pairs, b) for b in batches) > 150  # batches are filled, not merely small
    if batch_size is not None:
        assert max(len(b) for b in batches) == batch_size
    assert sampler.padded_tokens() == [padded(pairs, b) for b in batches]


def test_token_batches_give_every_replica_as_many_batches_of_similar_length():
    pairs = token_corpus(401)
    per_rank = [list(token_sampler(pairs, rank=r, replicas=3, max_tokens=150, seed=2)) for r in range(3)]
    assert len({len(batches) for batches in per_rank}) == 1
    seen = sorted(i for batches in per_rank for b in batches for i in b)
    assert set(seen) == set(range(len(pairs))) and len(seen) - len(pairs) < 3  # a repeat only in a tiny remainder
    assert all(padded(pairs, b) <= 150 for batches in per_rank for b in batches)
    # The replicas' batches of one step come from neighbouring lengths (one sorted run).
    sizes = [[max(max(len(pairs[i][0]), len(pairs[i][1])) for i in b) for b in batches] for batches in per_rank]
    spread = [max(step) - min(step) for step in zip(*sizes, strict=True)]
    assert sorted(spread)[len(spread) // 2] <= 2


def test_token_batches_are_seeded_and_reshuffled_per_epoch():
    pairs = token_corpus()
    first, again = token_sampler(pairs, seed=4), token_sampler(pairs, seed=4)
    assert list(first) == list(again)
    again.set_epoch(1)
    assert list(again) != list(first)
    assert list(token_sampler(pairs, seed=5)) != list(first)


def test_token_batches_resume_mid_epoch():
    pairs = token_corpus()
    for rank in (0, 1):
        loader = ResumableDataLoader(PairDataset(pairs), token_sampler(pairs, rank, 2, seed=1), collate_fn=collate)
        full = [b["src"] for b in loader]
        it = iter(loader)
        for _ in range(5):
            next(it)
            loader.mark_step()
        state = loader.state_dict()
        resumed = ResumableDataLoader(PairDataset(pairs), token_sampler(pairs, rank, 2, seed=1), collate_fn=collate)
        resumed.load_state_dict(state)
        rest = [b["src"] for b in resumed]
        assert len(rest) == len(full) - 5
        assert all(torch.equal(a, b) for a, b in zip(rest, full[5:], strict=True))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.max_tokens=12"], r"data.max_tokens \(12\) is smaller than the longest allowed sentence"),
        (["data.batch_size=null", "data.max_tokens=null"], "set data.batch_size"),
        (["data.max_tokens=0"], "data.max_tokens must be a positive integer"),
    ],
)
def test_bad_token_limits_are_one_line(make_cfg, overrides, message):
    from mha_lightning.config import instantiate

    with pytest.raises(ConfigError, match=message) as error:
        instantiate(make_cfg(*overrides).data, config_key="data")
    assert "\n" not in str(error.value)


def test_token_batches_in_a_run_log_their_count_and_padding(make_cfg, caplog):
    from helpers.config import QUIET
    from mha_lightning.train import train

    cfg = make_cfg(*QUIET, "logger=none", "test=false", "data.batch_size=null", "data.max_tokens=160")
    cfg.trainer.max_steps = 3
    with caplog.at_level("INFO"):
        train(cfg)
    lines = [r.getMessage() for r in caplog.records if "token batches" in r.getMessage()]
    assert lines and "batches per epoch per replica" in lines[0] and "max" in lines[0]
