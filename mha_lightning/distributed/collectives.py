"""The few collectives the rest of the package needs, and gradient norms across meshes.

Parameters of a sharded model live on different meshes (tensor-parallel ones on the tp mesh,
FSDP-sharded ones on the dp mesh or both, the rest plain), so the gradient norm is combined per
mesh here (docs/design.md, "What changes when tp=2"). Everything is a no-op on one process.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor


def is_distributed() -> bool:
    """Whether a default process group exists (False on one device)."""
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(t: Tensor, group=None) -> Tensor:
    """Sum ``t`` in place over ``group`` (default: the world) and return it; a no-op when not distributed."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def all_max(value: int, device: torch.device) -> int:
    """The largest ``value`` over all ranks (e.g. a decoding length every rank must agree on)."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def all_done(local_done: bool, device: torch.device) -> bool:
    """True when every rank is done: keeps FSDP/TP collectives in lockstep while decoding."""
    if not is_distributed():
        return local_done
    flag = torch.tensor([0.0 if local_done else 1.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.SUM)
    return flag.item() == 0.0


def optimizer_for(
    factory: Callable[..., torch.optim.Optimizer], parameters: list[nn.Parameter]
) -> torch.optim.Optimizer:
    """``factory(params=parameters)``, without ``fused=True`` when the parameters are DTensors (tp or
    FSDP2): torch's fused Adam kernels take plain tensors only (their step counters are not DTensors),
    so sharded runs keep torch's per-parameter implementation."""
    if any(isinstance(p, DTensor) for p in parameters) and getattr(factory, "keywords", {}).get("fused"):
        factory = functools.partial(factory, fused=False)
    return factory(params=parameters)


def reduce_partial_grads(parameters: Iterable[nn.Parameter]) -> None:
    """Complete the gradients DTensor left as partial sums, once, before they are read.

    A replicated weight applied to positions cut by sequence parallelism (a norm's) gets each rank's
    share of its gradient (``Partial``); FSDP2 completes these itself (dp > 1), here the rest are, so
    that the norm, clipping and the optimizer each see the whole gradient without reducing it again."""
    for p in parameters:
        grad = p.grad
        if isinstance(grad, DTensor) and any(placement.is_partial() for placement in grad.placements):
            p.grad = grad.redistribute(placements=p.placements)


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
