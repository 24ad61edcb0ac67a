"""The tensor-parallel plan, one readable dict per block (keys relative to the block).

Heads are the unit of sharding: q, k, v are split column-wise so each tensor-parallel rank holds
whole heads (global head = tp_rank * local_heads + local index), o is split row-wise. The FFN is
sharded like Megatron (fc1 column-, fc2 row-wise). The row-wise Linears hand back their partial
sums: what becomes of them (an all-reduce, or a reduce-scatter by position under sequence
parallelism) is decided where the region ends (``sequence.Regions``), as is how its input enters.
docs/design.md, "What changes when tp=2".
"""

from __future__ import annotations

from torch.distributed.tensor import Partial
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel


def _rowwise() -> RowwiseParallel:
    return RowwiseParallel(output_layouts=Partial(), use_local_output=False)


def attention_plan(prefix: str) -> dict:
    """q, k, v column-wise (whole heads per rank), o row-wise."""
    return {
        f"{prefix}.q": ColwiseParallel(),
        f"{prefix}.k": ColwiseParallel(),
        f"{prefix}.v": ColwiseParallel(),
        f"{prefix}.o": _rowwise(),
    }


def ffn_plan() -> dict:
    """fc1 column-wise, fc2 row-wise."""
    return {"ffn.fc1": ColwiseParallel(), "ffn.fc2": _rowwise()}


def encoder_layer_plan() -> dict:
    """The TP plan of one encoder layer."""
    return {**attention_plan("self_attn"), **ffn_plan()}


def decoder_layer_plan() -> dict:
    """The TP plan of one decoder layer: self- and cross-attention, then the FFN."""
    return {**attention_plan("self_attn"), **attention_plan("cross_attn"), **ffn_plan()}
