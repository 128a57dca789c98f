"""Optimizers and learning-rate schedules the harness can name (pure plumbing).

* :class:`SignSGD`: signed gradient descent, ``p <- p - lr * sign(grad)``, the update of
  SignRound (AutoRound): every step moves each coordinate by exactly ``lr``, whatever the
  gradient's scale, which suits bounded variables (rounding offsets in [-0.5, 0.5]).
* :func:`lr_factor`: the multiplier of every group's base learning rate after ``t`` of ``T``
  steps: ``constant`` 1; ``cosine`` ``(1 + cos(pi t / T)) / 2`` (torch's
  ``CosineAnnealingLR`` with ``eta_min`` 0, closed form); ``linear`` ``1 - t / T`` (torch's
  ``LinearLR`` from 1 to 0).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["SignSGD", "lr_factor"]


class SignSGD(torch.optim.Optimizer):
    """``p <- p - lr * sign(grad)`` (no momentum, no weight decay)."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3) -> None:
        if lr < 0:
            raise ValueError(f"lr {lr} < 0")
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(torch.sign(p.grad), alpha=-group["lr"])
        return loss


def lr_factor(schedule: str, t: int, total: int) -> float:
    """Multiplier of the base learning rate for step ``t`` (0-based) of ``total``."""
    if schedule == "constant" or total <= 0:
        return 1.0
    frac = min(max(t / total, 0.0), 1.0)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * frac))
    if schedule == "linear":
        return 1.0 - frac
    raise ValueError(f"lr_schedule {schedule!r}; allowed: constant, cosine, linear")
