"""Gradient clipping, observed: a callback that records gradients around Lightning's clipping
step, and the assertion that value clipping clamped exactly the elements outside [-v, v]."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch import Tensor, nn


def grads(module: nn.Module) -> dict[str, Tensor]:
    """A copy of every parameter's gradient, by name (parameters without one are left out)."""
    return {name: p.grad.detach().clone() for name, p in module.named_parameters() if p.grad is not None}


class GradientRecorder(L.Callback):
    """Records each optimizer step's gradients before and after clipping; saves them to ``path``.

    Lightning calls ``on_before_optimizer_step`` right before it clips (Precision._after_closure),
    and zeroes gradients only inside the next step's closure, so at ``on_train_batch_end`` the
    gradients are the clipped ones the optimizer used. Add it to a run with
    ``+callbacks.grads._target_=helpers.gradients.GradientRecorder +callbacks.grads.path=<file>``;
    the file holds ``{"before": [step0, ...], "after": [step0, ...]}``, each a ``grads()`` dict.
    """

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.before: list[dict[str, Tensor]] = []
        self.after: list[dict[str, Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.before.append(grads(pl_module))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.after.append(grads(pl_module))

    def on_train_end(self, trainer, pl_module) -> None:
        torch.save({"before": self.before, "after": self.after}, self.path)


def assert_value_clipped(before: dict[str, Tensor], after: dict[str, Tensor], clip_val: float) -> tuple[int, int]:
    """Every gradient element within [-v, v] after clipping; the elements outside before clamped
    to exactly +-v, the others bit-for-bit unchanged. -> (clamped elements, all elements)."""
    assert before and before.keys() == after.keys(), (sorted(before), sorted(after))
    clamped = total = 0
    for name, g in before.items():
        out = after[name]
        bound = torch.tensor(clip_val, dtype=g.dtype)  # compare with the clamp's own rounding of v
        assert out.shape == g.shape, name
        assert (out.abs() <= bound).all(), f"{name}: |grad| up to {out.abs().max().item()} after clipping to {clip_val}"
        outside = g.abs() > bound
        assert torch.equal(out[~outside], g[~outside]), f"{name}: gradient elements inside [-v, v] changed"
        assert torch.equal(out[outside], g[outside].sign() * bound), f"{name}: elements outside not clamped to +-v"
        clamped += int(outside.sum())
        total += g.numel()
    return clamped, total
