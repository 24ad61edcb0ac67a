"""Head sharding: the tensor-parallel plan, FSDP2 on the data-parallel dimension, and
the few collectives the rest of the package needs (all on PyTorch's own DTensor engine).

Heads are the unit of sharding: q, k, v are split column-wise so each tensor-parallel
rank holds whole heads (global head = tp_rank * local_heads + local index), o is split
row-wise and all-reduces. The FFN is sharded like Megatron (fc1 column-, fc2 row-wise).
Embeddings, norms and the output projection stay replicated.
"""

from __future__ import annotations

import functools
import os
from collections import defaultdict
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    parallelize_module,
)

from mha_lightning.errors import ConfigError
from mha_lightning.seeding import ShardedDropoutRNG, rank_seeds


def attention_plan(prefix: str, cross: bool = False) -> dict:
    """q, k, v column-wise (whole heads per rank), o row-wise, inputs entering replicated."""
    # The attention's inputs enter as one replicated DTensor each, so the input gradients of
    # q, k and v add up as partial sums and are all-reduced once per input, not once per Linear.
    # Inputs are named (x positional; memory and mask keyword-only): a new argument cannot shift
    # a layout, and the mask (no tensor to shard) passes through untouched.
    kwarg_layouts = {"memory": Replicate()} if cross else {}
    prepare = PrepareModuleInput(
        input_layouts=(Replicate(),),
        desired_input_layouts=(Replicate(),),
        input_kwarg_layouts=kwarg_layouts,
        desired_input_kwarg_layouts=kwarg_layouts,
        use_local_output=False,
    )
    return {
        prefix: prepare,
        f"{prefix}.q": ColwiseParallel(),
        f"{prefix}.k": ColwiseParallel(),
        f"{prefix}.v": ColwiseParallel(),
        f"{prefix}.o": RowwiseParallel(),
    }


def ffn_plan() -> dict:
    """fc1 column-wise, fc2 row-wise: one all-reduce per feed-forward."""
    return {"ffn.fc1": ColwiseParallel(), "ffn.fc2": RowwiseParallel()}


def encoder_layer_plan() -> dict:
    """The TP plan of one encoder layer (keys relative to the layer)."""
    return {**attention_plan("self_attn"), **ffn_plan()}


def decoder_layer_plan() -> dict:
    """The TP plan of one decoder layer: self- and cross-attention, then the FFN."""
    return {**attention_plan("self_attn"), **attention_plan("cross_attn", cross=True), **ffn_plan()}


def validate_parallel_config(
    num_heads: int, ffn_dim: int, data_parallel_size: int, tensor_parallel_size: int, devices: int, num_nodes: int
) -> None:
    """Fail in the launching process, before any worker exists, with one line naming the values."""
    dp, tp = data_parallel_size, tensor_parallel_size
    checks = (
        ("model.num_heads", num_heads),
        ("model.ffn_dim", ffn_dim),
        ("parallel.tensor_parallel_size", tp),
        ("parallel.data_parallel_size", dp),
    )
    for key, value in checks:
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{key} must be a positive integer, got {value!r}")
    if tp > num_heads:
        raise ConfigError(
            f"parallel.tensor_parallel_size ({tp}) is larger than model.num_heads ({num_heads}): "
            "every rank must hold at least one head; lower the tp size or add heads"
        )
    if num_heads % tp:
        raise ConfigError(
            f"model.num_heads ({num_heads}) must be divisible by parallel.tensor_parallel_size ({tp}): "
            "heads are the unit of sharding"
        )
    if ffn_dim % tp:
        raise ConfigError(f"model.ffn_dim ({ffn_dim}) must be divisible by parallel.tensor_parallel_size ({tp})")
    if dp * tp != devices * num_nodes:
        raise ConfigError(
            f"parallel.data_parallel_size ({dp}) x parallel.tensor_parallel_size ({tp}) = {dp * tp} must equal "
            f"trainer.devices ({devices}) x trainer.num_nodes ({num_nodes}) = {devices * num_nodes}"
        )


def sharded_modules(model: nn.Module) -> list[nn.Module]:
    """The modules whose activations are split across tp ranks: attention and FFN."""
    out = [m for kind in model.attention_layers().values() for m in kind]
    return out + [layer.ffn for layer in [*model.encoder_layers, *model.decoder_layers]]


def shard_rng_for(model: nn.Module, mesh: DeviceMesh, seed: int) -> ShardedDropoutRNG | None:
    """The shard dropout stream this rank needs, or None (no tensor parallelism or no dropout)."""
    tp_mesh = mesh["tensor_parallel"]
    if tp_mesh.size() == 1 or (model.config.dropout == 0 and model.config.attention_dropout == 0):
        return None
    dp_rank = mesh["data_parallel"].get_local_rank()
    shard_seed = rank_seeds(seed, dp_rank, tp_mesh.get_local_rank(), tp_mesh.size()).shard
    return ShardedDropoutRNG(shard_seed, mesh.device_type)


def parallelize(model: nn.Module, mesh: DeviceMesh, shard_rng: ShardedDropoutRNG | None = None) -> nn.Module:
    """Apply TP over the mesh's tensor_parallel dim, then FSDP2 over data_parallel (torchtitan's order).

    Dropout inside sharded modules runs on ``shard_rng`` (default: seeded from torch's initial seed)."""
    tp_mesh = mesh["tensor_parallel"]
    if tp_mesh.size() > 1:
        for layer in model.encoder_layers:
            parallelize_module(layer, tp_mesh, encoder_layer_plan())
        for layer in model.decoder_layers:
            parallelize_module(layer, tp_mesh, decoder_layer_plan())
        shard_head_gates(model, tp_mesh.get_local_rank(), tp_mesh.size())
        shard_rng = shard_rng or shard_rng_for(model, mesh, torch.initial_seed())
        if shard_rng is not None:
            shard_rng.attach(sharded_modules(model))
    dp_mesh = mesh["data_parallel"]
    if dp_mesh.size() > 1:
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        for layer in [*model.encoder_layers, *model.decoder_layers]:
            fully_shard(layer, mesh=dp_mesh)
        fully_shard(model, mesh=dp_mesh)
        # Decoding and the training loss (output projection fused with it) call encode/decode, not
        # forward: without this the root's parameters (embeddings, norms, output) stay sharded.
        for method in ("greedy_decode", "beam_decode", "teacher_forced_loss"):
            register_fsdp_forward_method(model, method)
    return model


def shard_head_gates(model: nn.Module, tp_rank: int, tp_size: int) -> None:
    """Keep each attention's head gate (``model.head_mask``) for this rank's heads only: q, k, v
    are sharded by whole heads, so the core's output holds the local heads alone."""
    heads = head_layout(model.config.num_heads, tp_rank, tp_size)
    for attn in (m for mods in model.attention_layers().values() for m in mods):
        if attn.head_gate is not None:
            attn.set_head_gate(attn.head_gate[..., heads.start : heads.stop])


def head_layout(num_heads: int, tp_rank: int, tp_size: int) -> range:
    """Global indices of the heads that tensor-parallel rank ``tp_rank`` holds."""
    local = num_heads // tp_size
    return range(tp_rank * local, (tp_rank + 1) * local)


def describe_sharding(model: nn.Module, mesh: DeviceMesh | None) -> str:
    """One line per rank: the mesh coordinates and which global heads of every layer it holds."""
    num_heads = model.config.num_heads
    if mesh is None:
        return f"single device: all {num_heads} heads of every layer (0-{num_heads - 1})"
    tp_rank, tp = mesh["tensor_parallel"].get_local_rank(), mesh["tensor_parallel"].size()
    dp_rank, dp = mesh["data_parallel"].get_local_rank(), mesh["data_parallel"].size()
    heads = head_layout(num_heads, tp_rank, tp)
    layers = {kind: len(mods) for kind, mods in model.attention_layers().items()}
    per_kind = ", ".join(f"{kind} x{n}" for kind, n in layers.items())
    return (
        f"rank {dist.get_rank()}: mesh (dp={dp}, tp={tp}) at (dp_rank={dp_rank}, tp_rank={tp_rank}); "
        f"holds {len(heads)}/{num_heads} heads [{heads.start}-{heads.stop - 1}] of every attention layer "
        f"({per_kind}) and 1/{tp} of every FFN"
    )


def share_cpu_cores(processes_per_node: int) -> int | None:
    """Give each of this node's ``processes_per_node`` processes an equal share of its CPU cores for
    torch's threads -> the threads per process, or None where nothing was changed.

    torch's default is every core in every process; its OpenMP threads then wait for each other at
    every parallel op, and N ranks on N cores run much slower (docs/design.md, "Training
    speed"). Sets this process's threads and ``OMP_NUM_THREADS`` for the processes it starts (Lightning's
    launcher, ``mp.spawn``), as torchrun does. An ``OMP_NUM_THREADS`` already set (by the user, torchrun
    or a parent process) wins; under SLURM each task gets its ``SLURM_CPUS_PER_TASK``."""
    if processes_per_node <= 1 or "OMP_NUM_THREADS" in os.environ:
        return None
    if "SLURM_CPUS_PER_TASK" in os.environ:
        threads = int(os.environ["SLURM_CPUS_PER_TASK"])
    else:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = max(1, cores // processes_per_node)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    return threads


def optimizer_for(
    factory: Callable[..., torch.optim.Optimizer], parameters: list[nn.Parameter]
) -> torch.optim.Optimizer:
    """``factory(params=parameters)``, without ``fused=True`` when the parameters are DTensors (tp or
    FSDP2): torch's fused Adam kernels take plain tensors only (their step counters are not DTensors),
    so sharded runs keep torch's per-parameter implementation."""
    if any(isinstance(p, DTensor) for p in parameters) and getattr(factory, "keywords", {}).get("fused"):
        factory = functools.partial(factory, fused=False)
    return factory(params=parameters)


def _mesh_key(t: Tensor):
    return id(t.device_mesh) if isinstance(t, DTensor) else None


def total_grad_norm(parameters: Iterable[nn.Parameter]) -> Tensor:
    """The global 2-norm of all gradients, for parameters living on different meshes.

    ``clip_grad_norm_`` stacks every norm into one tensor, which DTensor refuses across meshes
    ("All operands ... must have the same mesh"); here each mesh's norm is reduced on its own
    mesh, turned into a plain tensor, and the squares are added."""
    groups: dict = defaultdict(list)
    for p in parameters:
        if p.grad is not None:
            groups[_mesh_key(p.grad)].append(p.grad)
    squares = []
    for grads in groups.values():
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        squares.append(norm.float() ** 2)
    if not squares:
        return torch.tensor(0.0)
    return torch.stack(squares).sum().sqrt()


@torch.no_grad()
def clip_grad_norm(parameters: Iterable[nn.Parameter], max_norm: float, norm: Tensor | None = None) -> Tensor:
    """Clip like ``torch.nn.utils.clip_grad_norm_`` but across meshes; returns the pre-clip norm.

    ``norm``: the gradients' total norm if the caller already has it (computed here otherwise)."""
    from torch.distributed.tensor.experimental import implicit_replication

    parameters = list(parameters)
    norm = total_grad_norm(parameters) if norm is None else norm
    # A tensor, never .item(): no host sync on the hot path (as torch's own clip_grad_norm_).
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    with implicit_replication():  # the plain scalar multiplies DTensor grads as a replicated value
        for p in parameters:
            if p.grad is not None:
                p.grad.mul_(coef.to(p.grad.device))
    return norm


def all_reduce_sum(t: Tensor, group=None) -> Tensor:
    """Sum ``t`` in place over ``group`` (default: the world) and return it; a no-op when not distributed."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def all_max(value: int, device: torch.device) -> int:
    """The largest ``value`` over all ranks (e.g. a decoding length every rank must agree on)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def all_done(local_done: bool, device: torch.device) -> bool:
    """True when every rank is done: keeps FSDP/TP collectives in lockstep while decoding."""
    if not (dist.is_available() and dist.is_initialized()):
        return local_done
    flag = torch.tensor([0.0 if local_done else 1.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.SUM)
    return flag.item() == 0.0
