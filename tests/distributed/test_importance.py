"""The monitor's per-head importance on the probe set, sharded against one device, in real gloo worlds.

Every sharding technique on (sequence and vocabulary parallelism, selective activation checkpointing):
each rank measures the heads it holds, one all-reduce places them, and the numbers must equal the
single-device model's. Measuring touches no parameter's gradient, and training goes on as before."""

from __future__ import annotations

import pytest
import torch
from test_parallel import full_grads, layout, loss_of, make_batch, step_grads, twin_models
from torch.distributed.device_mesh import DeviceMesh

from helpers.distributed import mesh_ranks, run_distributed
from helpers.models import TINY
from mha_lightning.monitor.importance import probe_importance


def importance_worker(mesh: DeviceMesh) -> dict:
    dp_rank, tp_rank = mesh_ranks(mesh)
    dp, tp = mesh["data_parallel"].size(), mesh["tensor_parallel"].size()
    model, reference = twin_models(mesh, config=layout(mesh, activation_checkpointing="selective"))
    probe = make_batch(6, seed=3)  # the probe set: the same on every rank
    for m in (model, reference):
        m.eval()
    got = probe_importance(model, probe, TINY["num_heads"], tp_rank, tp)
    ref = probe_importance(reference, probe, TINY["num_heads"], 0, 1)
    untouched = all(p.grad is None for m in (model, reference) for p in m.parameters())
    # Training after a measurement: the same gradients as one device (each dp rank on its rows).
    for m in (model, reference):
        m.train()
    batch = make_batch(4 * dp, seed=4)
    rows = slice(dp_rank * 4, (dp_rank + 1) * 4)
    group = mesh["data_parallel"].get_group() if dp > 1 else None
    loss_of(model, {k: v[rows] for k, v in batch.items()}, group)[0].backward()
    loss_of(reference, batch)[0].backward()
    step_grads(model)
    return {
        "got": got,
        "ref": ref,
        "untouched": untouched,
        "grads": full_grads(model),
        "ref_grads": full_grads(reference),
    }


def assert_importance_matches(world: list[dict]) -> None:
    for rank, out in enumerate(world):
        assert out["untouched"], f"rank {rank}: measuring importance left a parameter gradient"
        assert out["got"].keys() == out["ref"].keys() == {"enc_self", "dec_self", "cross"}
        for kind, ref in out["ref"].items():
            assert ref.shape == (TINY["num_encoder_layers" if kind == "enc_self" else "num_decoder_layers"], 4)
            assert (ref > 0).all(), (kind, ref)  # every head matters a little to an untrained model
            torch.testing.assert_close(torch.from_numpy(out["got"][kind]), torch.from_numpy(ref), rtol=1e-5, atol=1e-8)
        for key, ref in out["ref_grads"].items():
            torch.testing.assert_close(out["grads"][key], ref, atol=1e-6, rtol=1e-5, msg=f"rank {rank}: {key}")


def test_probe_importance_at_tp2_equals_one_device(tmp_path):
    assert_importance_matches(run_distributed(importance_worker, (1, 2), tmp_path, timeout=300))


@pytest.mark.slow
def test_probe_importance_at_dp2_tp2_equals_one_device(tmp_path):
    assert_importance_matches(run_distributed(importance_worker, (2, 2), tmp_path, timeout=600))
