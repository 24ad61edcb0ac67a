"""``parallelize``: every sharding technique, one function each, applied in a fixed order.

Tensor parallelism over heads first, then FSDP2 over the data-parallel dimension (torchtitan's
order). docs/design.md, "What changes when tp=2".
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.distributed.tensor.parallel import parallelize_module

from mha_lightning.distributed.activation_checkpointing import apply_activation_checkpointing
from mha_lightning.distributed.layout import DP, TP, ParallelConfig, head_layout, ranks_of
from mha_lightning.distributed.plan import decoder_layer_plan, encoder_layer_plan
from mha_lightning.distributed.sequence import apply_regions
from mha_lightning.distributed.vocab import apply_vocab_parallel
from mha_lightning.seeding import ShardedDropoutRNG


def parallelize(model: nn.Module, mesh: DeviceMesh, config: ParallelConfig | None = None) -> nn.Module:
    """Shard ``model`` over ``mesh`` in place and return it, in this order: tensor parallelism over the
    tp dimension (heads, FFN units; with sequence parallelism between them), vocabulary parallelism
    (embeddings, output projection, loss), activation checkpointing, then FSDP2 over dp; a model built
    on the meta device is then initialised, each rank its own shards (:func:`materialize`). Dropout
    inside sharded regions runs on this rank's shard stream (``seeding.ShardedDropoutRNG``).

    ``config``: the techniques (default: ``ParallelConfig()`` at this mesh's sizes)."""
    config = config or ParallelConfig(tensor_parallel_size=mesh[TP].size(), data_parallel_size=mesh[DP].size())
    if mesh[TP].size() > 1:
        apply_tensor_parallel(model, mesh[TP], config.sequence_parallel_on)
        if config.vocab_parallel_on:
            apply_vocab_parallel(model, mesh[TP])
        shard_rng = shard_rng_for(model, mesh)
        if shard_rng is not None:
            # Sequence parallelism cuts the residual stream by position: its dropout is per rank too.
            layers = [*model.encoder_layers, *model.decoder_layers]
            shard_rng.attach(layers if config.sequence_parallel_on else sharded_modules(model))
    apply_activation_checkpointing(model, config.activation_checkpointing)
    if mesh[DP].size() > 1:
        apply_fsdp(model, mesh[DP])
    if model.output.weight.is_meta:
        materialize(model, mesh)
    return model


def materialize(model: nn.Module, mesh: DeviceMesh) -> None:
    """Initialise a sharded model built on the meta device on ``mesh``'s device: every parameter's whole
    initial value is drawn in the unsharded model's order (``Seq2SeqTransformer.reset_parameters``) and
    each rank keeps its part, so the weights equal a single-device build from the same seed while no
    rank ever holds more than one whole parameter (docs/design.md, "Initialisation")."""
    device = torch.device(mesh.device_type, torch.cuda.current_device()) if mesh.device_type == "cuda" else "cpu"

    def keep_own_part(param: nn.Parameter, value: Tensor) -> None:
        if isinstance(param, DTensor):
            value = distribute_tensor(value.to(device), param.device_mesh, param.placements, src_data_rank=None)
        param.copy_(value)

    model.materialize(device, keep_own_part)
    ranks = ranks_of(mesh)
    shard_head_gates(model, ranks.tp_rank, ranks.tp_size)  # reset_parameters set whole gates


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool) -> None:
    """Heads and FFN units over ``tp_mesh`` (``plan``), the regions' boundaries (``sequence``), and each
    attention's head gate cut to its heads."""
    for layer in model.encoder_layers:
        parallelize_module(layer, tp_mesh, encoder_layer_plan())
    for layer in model.decoder_layers:
        parallelize_module(layer, tp_mesh, decoder_layer_plan())
    apply_regions(model, tp_mesh, sequence_parallel)
    shard_head_gates(model, tp_mesh.get_local_rank(), tp_mesh.size())


def apply_fsdp(model: nn.Module, dp_mesh: DeviceMesh) -> None:
    """FSDP2 over ``dp_mesh``: each layer, then the root (embeddings, norms, output)."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    for layer in [*model.encoder_layers, *model.decoder_layers]:
        fully_shard(layer, mesh=dp_mesh)
    fully_shard(model, mesh=dp_mesh)
    # Decoding, the training loss and evaluation's scores (the output projection inside them) are not
    # forward: without this the root's parameters (embeddings, norms, output) stay sharded there.
    for method in ("greedy_decode", "beam_decode", "teacher_forced_loss", "teacher_forced_scores"):
        register_fsdp_forward_method(model, method)


def sharded_modules(model: nn.Module) -> list[nn.Module]:
    """The modules whose activations are split across tp ranks: attention and FFN."""
    out = [m for kind in model.attention_layers().values() for m in kind]
    return out + [layer.ffn for layer in [*model.encoder_layers, *model.decoder_layers]]


def shard_rng_for(model: nn.Module, mesh: DeviceMesh) -> ShardedDropoutRNG | None:
    """The shard dropout stream this rank needs, or None (no tensor parallelism or no dropout)."""
    ranks = ranks_of(mesh)
    if ranks.tp_size == 1 or (model.config.dropout == 0 and model.config.attention_dropout == 0):
        return None
    return ShardedDropoutRNG(ranks.tp_rank, mesh.device_type)


def shard_head_gates(model: nn.Module, tp_rank: int, tp_size: int) -> None:
    """Keep each attention's head gate (``model.head_mask``) for this rank's heads only: q, k, v
    are sharded by whole heads, so the core's output holds the local heads alone."""
    heads = head_layout(model.config.num_heads, tp_rank, tp_size)
    for attn in (m for mods in model.attention_layers().values() for m in mods):
        if attn.head_gate is not None:
            attn.set_head_gate(attn.head_gate[..., heads.start : heads.stop])


def describe_sharding(model: nn.Module, mesh: DeviceMesh | None, config: ParallelConfig | None = None) -> str:
    """One line per rank: the mesh coordinates, which global heads of every layer it holds, and what else
    ``config``'s techniques cut (the vocabulary's rows, the residual stream by position)."""
    num_heads = model.config.num_heads
    if mesh is None:
        return f"single device: all {num_heads} heads of every layer (0-{num_heads - 1})"
    r = ranks_of(mesh)
    heads = head_layout(num_heads, r.tp_rank, r.tp_size)
    layers = {kind: len(mods) for kind, mods in model.attention_layers().items()}
    per_kind = ", ".join(f"{kind} x{n}" for kind, n in layers.items())
    line = (
        f"rank {dist.get_rank()}: mesh (dp={r.dp_size}, tp={r.tp_size}) at (dp_rank={r.dp_rank}, "
        f"tp_rank={r.tp_rank}); holds {len(heads)}/{num_heads} heads [{heads.start}-{heads.stop - 1}] of every "
        f"attention layer ({per_kind}) and 1/{r.tp_size} of every FFN"
    )
    shard = getattr(model.vocabulary, "shard", None)
    if shard is not None:
        line += f"; vocabulary rows [{shard.offset}-{shard.offset + shard.rows - 1}] of {shard.vocab_size}"
    if config is not None and config.sequence_parallel_on and r.tp_size > 1:
        line += "; the residual stream by position (sequence parallel)"
    return line
