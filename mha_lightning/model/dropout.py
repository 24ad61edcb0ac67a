"""Dropout whose mask costs a third of torch's on CPU (docs/design.md, "Dropout on CPU").

On CPU ``nn.Dropout`` draws its mask with ``bernoulli_``: one Mersenne-Twister number and a
conversion per element, on one thread whatever torch's thread count. For the ``small`` preset that
was 6-8% of a training step on one thread, and a larger share on two (the draw does not
parallelise). Here one 32-bit draw decides two elements: ``random_`` on int32 gives 31 uniform
bits; its low 16 and its high 15 bits are each compared with a threshold chosen so that both drop
with probability ``round(p * 2**15) / 2**15``, and the comparisons are written straight into a
float tensor holding 0 or the inverse of that keep probability. The output's expectation is the
input exactly; ``p`` itself is rounded by at most 2**-16. Backward multiplies by the same tensor,
which autograd keeps (4 bytes per value where ``nn.Dropout`` keeps a 1-byte mask).

The draw comes from torch's global CPU generator, so seeding, the tensor-parallel shard stream
(``seeding.ShardedDropoutRNG``) and checkpointed RNG states work as with ``nn.Dropout``. On other
devices (CUDA has its own fused kernel), under ``torch.compile`` (inductor generates its own random
numbers), for tensor subclasses such as DTensor, and for dtypes other than fp32 and fp64 (in bf16
the stored scale itself would round) this is ``nn.Dropout`` itself.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from typing_extensions import override

_LANE_BITS = 15  # uniform bits of the high half of a 31-bit draw; the low half has one more
_LANES = 1 << _LANE_BITS


def drop_count(p: float) -> int:
    """Out of 2**15, how many values a mask for dropout probability ``p`` drops."""
    return round(p * _LANES)


def dropout_scale(shape: torch.Size | tuple[int, ...], p: float, dtype: torch.dtype = torch.float32) -> Tensor:
    """A CPU tensor of ``shape`` holding 0 with probability ``drop_count(p) / 2**15`` and the inverse of
    the keep probability elsewhere: multiplying by it is dropout. ``p`` in [0, 1)."""
    drop = drop_count(p)
    if not 0 <= drop < _LANES:
        raise ValueError(f"dropout probability {p} must be in [0, 1)")
    n = math.prod(shape)
    low_lanes = (n + 1) // 2
    words = torch.empty(low_lanes, dtype=torch.int32).random_()  # [0, 2**31): 31 uniform bits each
    scale = torch.empty(n, dtype=dtype)
    # Comparisons written straight into `scale` as 0/1: one vectorised pass each, no bool tensor.
    torch.ge(words & 0xFFFF, 2 * drop, out=scale[:low_lanes])  # 16 bits: drops 2 * drop of 2**16
    torch.ge(words[: n - low_lanes] >> 16, drop, out=scale[low_lanes:])  # 15 bits: drop of 2**15
    return scale.mul_(_LANES / (_LANES - drop)).view(shape)


class Dropout(nn.Dropout):
    """``nn.Dropout`` with a cheaper mask for plain CPU tensors in eager mode (module docstring)."""

    @override
    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and 0 < self.p < 1 and not self.inplace and _cheap_mask_applies(x)):
            return super().forward(x)
        return x * dropout_scale(x.shape, self.p, x.dtype)


def _cheap_mask_applies(x: Tensor) -> bool:
    # fp32/fp64 only: in bf16 the stored inverse keep probability itself would round (a bias).
    plain_cpu = x.device.type == "cpu" and type(x) is Tensor and x.dtype in (torch.float32, torch.float64)
    return plain_cpu and not torch.compiler.is_compiling()
