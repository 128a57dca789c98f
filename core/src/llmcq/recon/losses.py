"""Reconstruction losses: pure functions of tensors, and the default per-batch loss.

* :func:`mse`: ``mean((out - target)^2)`` (OmniQuant, TesseraQ, AutoRound);
* :func:`neg_log_cosine`: ``-log(cos(out, target))`` per token, averaged (ABQ-LLM);
* :func:`kl_divergence`: ``KL(p || q)`` of two distributions over the last dimension given
  as probabilities (attention maps), averaged over every other dimension (ABQ-LLM's
  bidirectional term is ``kl(p, q) + kl(q, p)``).

:class:`TargetLoss` turns a pairwise loss into the harness's per-batch loss
(:data:`llmcq.recon.BatchLoss`): ``l(out, target)``, plus ``l(out, aug)`` when an aug_loss
target is present, summed (OmniQuant) or averaged (TesseraQ).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch.nn import functional as F

from llmcq.recon.settings import Batch

__all__ = ["mse", "neg_log_cosine", "kl_divergence", "TargetLoss"]


def mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error (``target`` cast to float32)."""
    return F.mse_loss(out, target.float())


def neg_log_cosine(out: torch.Tensor, target: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``mean_t -log(cos(out_t, target_t))`` over tokens (rows of the last dimension); the
    cosine is clamped to ``eps`` so opposite directions give a large finite loss."""
    cos = F.cosine_similarity(out.float(), target.float(), dim=-1, eps=eps)
    return -torch.log(cos.clamp(min=eps)).mean()


def kl_divergence(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """``mean over rows of sum_j p_j (log p_j - log q_j)`` for probability rows (last dim
    sums to 1), e.g. attention maps ``[batch, heads, L, L]``; ``eps`` keeps logs finite."""
    p, q = p.float(), q.float()
    return (p * (torch.log(p + eps) - torch.log(q + eps))).sum(-1).mean()


class TargetLoss:
    """A pairwise loss against the batch's float target (and its aug target when present),
    combined by ``aug: "sum"`` (OmniQuant: ``l(t) + l(a)``) or ``"mean"`` (TesseraQ:
    ``(l(t) + l(a)) / 2``)."""

    def __init__(self, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = mse, *,
                 aug: Literal["sum", "mean"] = "sum") -> None:
        if aug not in ("sum", "mean"):
            raise ValueError(f"aug {aug!r}; allowed: sum, mean")
        self.fn = fn
        self.aug = aug

    def __call__(self, out: torch.Tensor, batch: Batch) -> torch.Tensor:
        loss = self.fn(out, batch.target)
        if batch.aug is not None:
            loss = loss + self.fn(out, batch.aug)
            if self.aug == "mean":
                loss = loss / 2
        return loss
