"""Gradient accumulation against one step on the union of the micro-batches, in real gloo worlds.

Each world builds the tiny model twice from one seed (tests/distributed/test_parallel.py's twins): the
sharded copy runs k micro-batches through ``GradientAccumulation`` (FSDP2's gradient sync and resharding
switched off between them where dp > 1), the single-device reference one backward on the union of the
same examples, normalised by the union's target tokens. Micro-batches differ in size and length, and
dp ranks' slices in token count, so a mean of per-micro-batch (or per-rank) means would differ.
"""

from __future__ import annotations

import pytest
import torch
from test_parallel import LABEL_SMOOTHING, full_grads, full_params, loss_of, make_batch, twin_models
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.nn.functional import pad

from helpers.distributed import mesh_ranks, run_distributed
from mha_lightning.data.vocab import PAD_ID
from mha_lightning.distributed import collectives
from mha_lightning.distributed.accumulation import GradientAccumulation

# (rows, source length, target length) of each global micro-batch.
MICRO_BATCHES = ((4, 9, 8), (6, 5, 4), (2, 12, 11))
LR = 0.5  # plain SGD: the update is lr x gradient, so a gradient error shows in the weights as it is


def union(batches: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """One batch holding every row of ``batches``, padded to the longest."""
    out = {}
    for key in batches[0]:
        width = max(b[key].shape[1] for b in batches)
        out[key] = torch.cat([pad(b[key], (0, width - b[key].shape[1]), value=PAD_ID) for b in batches])
    return out


def accumulation_worker(mesh: DeviceMesh) -> dict:
    """k micro-batches accumulated on the sharded model vs one step on their union on the reference."""
    model, reference = twin_models(mesh)
    dp_rank, _ = mesh_ranks(mesh)
    dp = mesh["data_parallel"].size()
    group = mesh["data_parallel"].get_group() if dp > 1 else None
    batches = [make_batch(rows, seed=10 + i, src_len=s, tgt_len=t) for i, (rows, s, t) in enumerate(MICRO_BATCHES)]

    accumulation = GradientAccumulation(len(batches))
    means = []
    for i, batch in enumerate(batches):
        accumulation.begin(model, last=i == len(batches) - 1, first=i == 0)
        per = batch["src"].shape[0] // dp
        mine = {key: value[dp_rank * per : (dp_rank + 1) * per] for key, value in batch.items()}
        loss_sum, _ = model.teacher_forced_loss(mine["src"], mine["tgt_in"], mine["tgt_out"], LABEL_SMOOTHING)
        loss, mean = accumulation.loss(loss_sum, (mine["tgt_out"] != PAD_ID).sum(), group)
        loss.backward()
        means.append(float(mean))
    accumulation.finish(model.parameters())
    collectives.reduce_partial_grads(model.parameters())
    window_mean = float(accumulation.window_mean())

    # What averaging the k per-micro-batch means would have given (the reference's own, one micro-batch at a time).
    naive = {name: torch.zeros_like(p) for name, p in reference.named_parameters()}
    for batch in batches:
        reference.zero_grad()
        loss_of(reference, batch)[0].backward()
        for name, p in reference.named_parameters():
            naive[name] += p.grad / len(batches)
    reference.zero_grad()
    loss, ref_mean = loss_of(reference, union(batches))
    loss.backward()

    out = {"grads": full_grads(model), "ref_grads": full_grads(reference), "naive_grads": naive}
    for m in (model, reference):
        torch.optim.SGD(m.parameters(), lr=LR).step()
    out.update(params=full_params(model), ref_params=full_params(reference))
    out.update(window_mean=window_mean, ref_mean=float(ref_mean), means=means)
    return out


def assert_exact(results: list[dict]) -> None:
    for rank, out in enumerate(results):
        assert out["window_mean"] == pytest.approx(out["ref_mean"], rel=1e-6), f"rank {rank}: logged loss"
        assert out["grads"].keys() == out["ref_grads"].keys()
        for name, ref in out["ref_grads"].items():
            torch.testing.assert_close(out["grads"][name], ref, atol=1e-6, rtol=1e-5, msg=f"rank {rank}: {name}")
            torch.testing.assert_close(
                out["params"][name], out["ref_params"][name], atol=1e-6, rtol=1e-5, msg=f"rank {rank}: {name}"
            )
        # The test can tell: the mean of the micro-batches' means is another gradient.
        differs = [
            name
            for name, ref in out["ref_grads"].items()
            if not torch.allclose(out["naive_grads"][name], ref, atol=1e-4, rtol=1e-3)
        ]
        assert len(differs) > len(out["ref_grads"]) // 2, differs


@pytest.mark.parametrize("shape", [(1, 2), (2, 1)], ids=["tp2", "dp2"])
def test_accumulated_step_equals_the_union_step(tmp_path, shape):
    assert_exact(run_distributed(accumulation_worker, shape, tmp_path))


@pytest.mark.slow
def test_dp2_tp2_accumulated_step_equals_the_union_step(tmp_path):
    assert_exact(run_distributed(accumulation_worker, (2, 2), tmp_path, timeout=300))
