"""``parallelize``: every sharding technique, one function each, applied in a fixed order.

Tensor parallelism over heads first, then FSDP2 over the data-parallel dimension (torchtitan's
order). docs/design.md, "What changes when tp=2".
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import parallelize_module

from mha_lightning.distributed.layout import DP, TP, head_layout, ranks_of
from mha_lightning.distributed.plan import decoder_layer_plan, encoder_layer_plan
from mha_lightning.seeding import ShardedDropoutRNG, rank_seeds


def parallelize(model: nn.Module, mesh: DeviceMesh, shard_rng: ShardedDropoutRNG | None = None) -> nn.Module:
    """Shard ``model`` over ``mesh`` in place and return it: tensor parallelism over the tp dimension
    (heads, FFN units), then FSDP2 over dp.

    Dropout inside sharded modules runs on ``shard_rng`` (default: seeded from torch's initial seed)."""
    if mesh[TP].size() > 1:
        apply_tensor_parallel(model, mesh[TP])
        shard_rng = shard_rng or shard_rng_for(model, mesh, torch.initial_seed())
        if shard_rng is not None:
            shard_rng.attach(sharded_modules(model))
    if mesh[DP].size() > 1:
        apply_fsdp(model, mesh[DP])
    return model


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Heads and FFN units over ``tp_mesh`` (``plan``), and each attention's head gate cut to its heads."""
    for layer in model.encoder_layers:
        parallelize_module(layer, tp_mesh, encoder_layer_plan())
    for layer in model.decoder_layers:
        parallelize_module(layer, tp_mesh, decoder_layer_plan())
    shard_head_gates(model, tp_mesh.get_local_rank(), tp_mesh.size())


def apply_fsdp(model: nn.Module, dp_mesh: DeviceMesh) -> None:
    """FSDP2 over ``dp_mesh``: each layer, then the root (embeddings, norms, output)."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    for layer in [*model.encoder_layers, *model.decoder_layers]:
        fully_shard(layer, mesh=dp_mesh)
    fully_shard(model, mesh=dp_mesh)
    # Decoding and the training loss (output projection fused with it) call encode/decode, not
    # forward: without this the root's parameters (embeddings, norms, output) stay sharded.
    for method in ("greedy_decode", "beam_decode", "teacher_forced_loss"):
        register_fsdp_forward_method(model, method)


def sharded_modules(model: nn.Module) -> list[nn.Module]:
    """The modules whose activations are split across tp ranks: attention and FFN."""
    out = [m for kind in model.attention_layers().values() for m in kind]
    return out + [layer.ffn for layer in [*model.encoder_layers, *model.decoder_layers]]


def shard_rng_for(model: nn.Module, mesh: DeviceMesh, seed: int) -> ShardedDropoutRNG | None:
    """The shard dropout stream this rank needs, or None (no tensor parallelism or no dropout)."""
    ranks = ranks_of(mesh)
    if ranks.tp_size == 1 or (model.config.dropout == 0 and model.config.attention_dropout == 0):
        return None
    shard_seed = rank_seeds(seed, ranks.dp_rank, ranks.tp_rank, ranks.tp_size).shard
    return ShardedDropoutRNG(shard_seed, mesh.device_type)


def shard_head_gates(model: nn.Module, tp_rank: int, tp_size: int) -> None:
    """Keep each attention's head gate (``model.head_mask``) for this rank's heads only: q, k, v
    are sharded by whole heads, so the core's output holds the local heads alone."""
    heads = head_layout(model.config.num_heads, tp_rank, tp_size)
    for attn in (m for mods in model.attention_layers().values() for m in mods):
        if attn.head_gate is not None:
            attn.set_head_gate(attn.head_gate[..., heads.start : heads.stop])


def describe_sharding(model: nn.Module, mesh: DeviceMesh | None) -> str:
    """One line per rank: the mesh coordinates and which global heads of every layer it holds."""
    num_heads = model.config.num_heads
    if mesh is None:
        return f"single device: all {num_heads} heads of every layer (0-{num_heads - 1})"
    r = ranks_of(mesh)
    heads = head_layout(num_heads, r.tp_rank, r.tp_size)
    layers = {kind: len(mods) for kind, mods in model.attention_layers().items()}
    per_kind = ", ".join(f"{kind} x{n}" for kind, n in layers.items())
    return (
        f"rank {dist.get_rank()}: mesh (dp={r.dp_size}, tp={r.tp_size}) at (dp_rank={r.dp_rank}, "
        f"tp_rank={r.tp_rank}); holds {len(heads)}/{num_heads} heads [{heads.start}-{heads.stop - 1}] of every "
        f"attention layer ({per_kind}) and 1/{r.tp_size} of every FFN"
    )
