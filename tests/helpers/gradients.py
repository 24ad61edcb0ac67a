"""Gradients, observed: a callback that records them around Lightning's clipping step, the
assertion that value clipping clamped exactly the elements outside [-v, v], and the comparison
of a reordered computation with the plain one against an fp64 result."""

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


def assert_as_exact_as(result: Tensor, plain: Tensor, exact: Tensor, what: str = "") -> None:
    """``result`` is about as far from the fp64 ``exact`` as ``plain`` (the straightforward fp32 or
    bf16 computation) is: within twice its error, plus 1e-5 of the largest value (fp32 sums taken
    in another order, then carried back through a network, differ by a few 1e-6 of it)."""
    error, plain_error = ((t.double() - exact).abs().max().item() for t in (result, plain))
    assert error <= 2 * plain_error + 1e-5 * exact.abs().max().item(), (what, error, plain_error)
