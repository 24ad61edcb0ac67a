"""An exponential moving average of a model's weights (``module.ema.decay``; docs/design.md, "EMA weights").

The average lives beside the weights as buffers of its own module (``Seq2SeqModule.ema``): one per parameter,
a copy of it when tracking starts, so it has the parameter's type and layout (a DTensor sharded like it under
tensor parallelism and FSDP2), its update is elementwise and needs no communication, and checkpoints save and
reshard it with the weights (state-dict keys ``ema.<parameter name, dots as __>``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mha_lightning.errors import ConfigError
from mha_lightning.schema import from_mapping

EMA_PREFIX = "ema."


def buffer_name(parameter: str) -> str:
    """A parameter's name as an EMA buffer's (buffer names may not hold dots)."""
    return parameter.replace(".", "__")


def parameter_names(model: nn.Module) -> dict[str, str]:
    """Every name a parameter goes by (tied weights have several) -> the name its EMA buffer takes (the first)."""
    first: dict[int, str] = {}
    names = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names[name] = first.setdefault(id(p), name)
    return names


@dataclass(frozen=True)
class EMAConfig:
    """``module.ema``: ``decay`` in (0, 1), or null (off, the default)."""

    decay: float | None = None

    def __post_init__(self) -> None:
        d = self.decay
        if d is not None and (isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 < d < 1.0):
            raise ConfigError(f"module.ema.decay must be a number in (0, 1) (e.g. 0.999), or null for off; got {d!r}")

    @property
    def enabled(self) -> bool:
        """Whether an average is kept."""
        return self.decay is not None

    @classmethod
    def from_dict(cls, values: EMAConfig | Mapping[str, Any] | None) -> EMAConfig:
        """From the ``module.ema`` config node."""
        return values if isinstance(values, cls) else from_mapping(cls, values, "module.ema")


class EMAWeights(nn.Module):
    """ema <- decay * ema + (1 - decay) * weight after every optimizer step, for every parameter of a model."""

    def __init__(self, decay: float) -> None:
        super().__init__()
        self.decay = decay

    def track(self, model: nn.Module) -> None:
        """Start from ``model``'s current weights (once its parameters are real and sharded)."""
        for name, p in model.named_parameters():
            self.register_buffer(buffer_name(name), p.detach().clone())

    @property
    def tracking(self) -> bool:
        """Whether :meth:`track` has run."""
        return any(True for _ in self.buffers())

    def _pairs(self, model: nn.Module):
        buffers = dict(self.named_buffers())
        return [(p, buffers[buffer_name(name)]) for name, p in model.named_parameters()]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One step of the average towards ``model``'s weights."""
        for p, average in self._pairs(model):
            average.lerp_(p.detach(), 1.0 - self.decay)

    @torch.no_grad()
    def swap(self, model: nn.Module) -> None:
        """Exchange ``model``'s weights with the average, in place (twice: as before)."""
        for p, average in self._pairs(model):
            weight = p.detach()
            saved = weight.clone()
            weight.copy_(average)
            average.copy_(saved)
