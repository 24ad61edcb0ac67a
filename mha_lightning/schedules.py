"""Learning-rate schedules, built as Hydra partials that bind to the optimizer after sharding."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def inverse_sqrt(optimizer: Optimizer, warmup_steps: int = 4000) -> LambdaLR:
    """Vaswani et al.: linear warmup to the base lr, then decay with 1/sqrt(step)."""
    warmup = max(1, warmup_steps)
    return LambdaLR(optimizer, lambda step: min((step + 1) / warmup, math.sqrt(warmup / (step + 1))))


def warmup_cosine(optimizer: Optimizer, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> LambdaLR:
    """Linear warmup to the base lr, then cosine decay to ``min_ratio`` x base lr at ``total_steps``."""
    if total_steps <= warmup_steps:
        from mha_lightning.errors import ConfigError

        raise ConfigError(
            f"the cosine schedule needs module.scheduler.total_steps ({total_steps}) > warmup_steps ({warmup_steps}); "
            "it follows trainer.max_steps, so set trainer.max_steps when training by epochs"
        )
    warmup, total = max(1, warmup_steps), total_steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / (total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)
