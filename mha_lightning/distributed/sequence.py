"""Sequence parallelism: between the tensor-parallel regions, the residual stream is cut by position.

Megatron-SP and torchtitan's plan, on DTensor's own collectives (docs/design.md, "Sequence
parallelism"). With it, each tensor-parallel rank keeps the residual stream, the norms' inputs
and outputs and the dropout masks of 1/tp of the positions, where plain tensor parallelism keeps
all of them on every rank:

- after each embedding the (replicated) sum of token and position embeddings is cut by position
  (no communication; its backward all-gathers);
- each attention and FFN all-gathers its input (backward: reduce-scatter) and reduce-scatters its
  output (backward: all-gather): the same volume as the all-reduce plain TP needs there;
- the norms run on the local positions with replicated weights, whose gradients DTensor marks as
  partial sums (``collectives.reduce_partial_grads`` completes them before the optimizer step);
- the encoder's output is all-gathered once for every cross-attention, the decoder's once for the
  output projection and loss.

Positions are padded to a multiple of tp inside the residual stream (zeros, cut off again before
every attention and at the end), so any length works. It applies where autograd saves activations
(``torch.is_grad_enabled()``), which is all it saves memory on: passes without gradients
(validation, decoding with its one new token per step, analysis without gradients) run the
plain tensor-parallel layout on the same modules.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_module

SEQ = 1  # the sequence dimension of (B, T, D) activations


class Regions:
    """The boundaries of the tensor-parallel regions of one model, as forward hooks.

    Between regions activations are plain local tensors: (B, T_pad / tp, D) when sequence parallelism
    is on and gradients are recorded, (B, T, D) replicated otherwise. Inside a region (an attention or
    an FFN) they are DTensors the tensor-parallel plan's Linears take (``plan``)."""

    def __init__(self, mesh: DeviceMesh, sequence_parallel: bool) -> None:
        self.mesh = mesh
        self.size = mesh.size()
        self.sequence_parallel = sequence_parallel
        self.lengths: dict[str, int] = {}  # the true length of each stream ("src", "tgt") of this forward

    @property
    def active(self) -> bool:
        """Sequence parallelism applies to this pass: it is on and autograd records."""
        return self.sequence_parallel and torch.is_grad_enabled()

    def padded(self, length: int) -> int:
        """``length`` rounded up to a multiple of the tensor-parallel size."""
        return -(-length // self.size) * self.size

    # -------------------------------------------------------------- the stream's ends
    def split(self, stream: str):
        """A forward hook for an embedding: cut its replicated (B, T, D) output by position."""

        def hook(module: nn.Module, args, output: Tensor) -> Tensor:
            if not self.active:
                return output
            self.lengths[stream] = length = output.shape[SEQ]
            output = F.pad(output, (0, 0, 0, self.padded(length) - length))
            whole = DTensor.from_local(output, self.mesh, [Replicate()], run_check=False)
            return whole.redistribute(self.mesh, [Shard(SEQ)]).to_local()

        return hook

    def gather(self, stream: str, keep_dtensor: bool):
        """A forward hook for a stack's final norm: the whole (B, T, D) output on every rank again.

        ``keep_dtensor``: leave it a replicated DTensor (the encoder memory every cross-attention
        reads: its gradients then meet in one reduce-scatter, not one per layer)."""

        def hook(module: nn.Module, args, output: Tensor) -> Tensor:
            if not self.active:
                return output
            whole = self._gather(output)[:, : self.lengths[stream]]
            return whole if keep_dtensor else whole.to_local()

        return hook

    def _gather(self, local: Tensor) -> DTensor:
        return DTensor.from_local(local, self.mesh, [Shard(SEQ)], run_check=False).redistribute(
            self.mesh, [Replicate()]
        )

    # -------------------------------------------------------------- regions
    def enter(self, module: nn.Module, args: tuple, kwargs: dict):
        """Forward pre-hook of an attention or FFN: its inputs as replicated DTensors (all-gathered under
        sequence parallelism, and cut to the true length for an attention, whose mask has it)."""
        x, *rest = args
        if self.active:
            x = self._gather(x)
            mask = kwargs.get("mask")
            if mask is not None:
                x = x[:, : mask.queries.shape[1]]
        else:
            x = DTensor.from_local(x, self.mesh, [Replicate()], run_check=False)
        memory = kwargs.get("memory")
        if memory is not None and not isinstance(memory, DTensor):
            kwargs = {**kwargs, "memory": DTensor.from_local(memory, self.mesh, [Replicate()], run_check=False)}
        return (x, *rest), kwargs

    def leave(self, module: nn.Module, args, output: DTensor) -> Tensor:
        """Forward hook of an attention or FFN: its partial-sum output reduce-scattered by position under
        sequence parallelism (padded first), all-reduced otherwise; a plain local tensor either way."""
        if not self.active:
            return output.redistribute(self.mesh, [Replicate()]).to_local()
        local = output.to_local()
        length = local.shape[SEQ]
        local = F.pad(local, (0, 0, 0, self.padded(length) - length))
        partial = DTensor.from_local(local, self.mesh, [Partial()], run_check=False)
        return partial.redistribute(self.mesh, [Shard(SEQ)]).to_local()

    def norm_input(self, module: nn.Module, inputs: tuple, mesh: DeviceMesh) -> tuple:
        """``distribute_module`` input function of a norm: its local input as a DTensor, cut by position or whole."""
        (x,) = inputs
        placement = Shard(SEQ) if self.active else Replicate()
        return (DTensor.from_local(x, mesh, [placement], run_check=False),)

    @staticmethod
    def norm_output(module: nn.Module, output: DTensor, mesh: DeviceMesh) -> Tensor:
        """``distribute_module`` output function of a norm: a plain local tensor again."""
        return output.to_local()


def apply_regions(model: nn.Module, mesh: DeviceMesh, sequence_parallel: bool) -> Regions:
    """Register the region boundaries on ``model`` (after the tensor-parallel plan): around every
    attention and FFN; with sequence parallelism also at the embeddings, every norm and the stacks' ends."""
    regions = Regions(mesh, sequence_parallel)
    for layer in [*model.encoder_layers, *model.decoder_layers]:
        attentions = [layer.self_attn] + ([layer.cross_attn] if hasattr(layer, "cross_attn") else [])
        for module in [*attentions, layer.ffn]:
            module.register_forward_pre_hook(regions.enter, with_kwargs=True)
            module.register_forward_hook(regions.leave)
    if not sequence_parallel:
        return regions
    model.src_embed.register_forward_hook(regions.split("src"))
    model.tgt_embed.register_forward_hook(regions.split("tgt"))
    norms = [m for layer in [*model.encoder_layers, *model.decoder_layers] for m in layer.modules()]
    norms += [model.encoder_norm, model.decoder_norm]
    for norm in (m for m in norms if isinstance(m, nn.LayerNorm)):
        distribute_module(norm, mesh, input_fn=regions.norm_input, output_fn=regions.norm_output)
    model.encoder_norm.register_forward_hook(regions.gather("src", keep_dtensor=True))
    model.decoder_norm.register_forward_hook(regions.gather("tgt", keep_dtensor=False))
    return regions
