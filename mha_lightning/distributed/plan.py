"""The tensor-parallel plan, one readable dict per block (keys relative to the block).

Heads are the unit of sharding: q, k, v are split column-wise so each tensor-parallel rank holds
whole heads (global head = tp_rank * local_heads + local index), o is split row-wise. The FFN is
sharded like Megatron (fc1 column-, fc2 row-wise). docs/design.md, "What changes when tp=2".
"""

from __future__ import annotations

from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, PrepareModuleInput, RowwiseParallel


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
    """The TP plan of one encoder layer."""
    return {**attention_plan("self_attn"), **ffn_plan()}


def decoder_layer_plan() -> dict:
    """The TP plan of one decoder layer: self- and cross-attention, then the FFN."""
    return {**attention_plan("self_attn"), **attention_plan("cross_attn", cross=True), **ffn_plan()}
