"""Outlier Suppression+'s maths (Wei et al. 2023, arXiv:2304.09145, Section 4).

For the input ``X`` (``[tokens, C]``) of the linears ``W_i`` fed by one norm, with
per-channel minimum ``m_j`` and maximum ``M_j`` over the calibration tokens:

* **shift** (Eq. 3): ``z_j = (M_j + m_j) / 2`` centres every channel, so ``X - z`` has the
  symmetric range ``[-(M_j - m_j) / 2, (M_j - m_j) / 2]``. It is absorbed exactly:
  the norm's bias becomes ``beta - z`` and each linear's bias ``b_i + W_i z``.
* **scale** (Eq. 5-6): for a threshold ``t``, channels whose shifted range leaves
  ``[-t, t]`` are scaled back into it, the others untouched:
  ``s_j = max(1, max(M_j - z_j, z_j - m_j) / t)``; the norm is divided by ``s``, the
  weights' columns multiplied by ``s``.
* **search**: ``t`` runs down a uniform grid from ``max(|min X|, max X)`` to ``1.0`` in
  ``max(100, int(max X / 0.5))`` steps (llmc's grid), each candidate scored by the output
  error ``mean_tokens sum_channels (Y - Y_hat)^2`` of the group's inspected module with
  fake-quantized weights ``Q(W diag(s))`` and activations ``Q((X - z) / s)``; the first
  minimum wins. The first candidate scales nothing (``s = 1``), so the result is never worse
  than no scaling on the scored data. A candidate's loss is the sum of its scored batches'
  errors, added in batch order (:func:`batch_totals`).

Data-parallel calibration: the ranges come from core's :class:`llmcq.stats.ChannelRange`
(re-exported here), min/max-reduced over the ranks, and the search's ``total`` hook lets the
algorithm add every rank's per-batch losses in the global batch order, so every rank picks
exactly the threshold one process picks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from llmcq.stats import ChannelRange

__all__ = ["ChannelRange", "channel_shift", "migration_scale", "candidate_thresholds",
           "search_threshold", "output_error", "batch_totals", "Migration", "FLOOR"]

#: lowest threshold of llmc's grid
FLOOR = 1.0


def channel_shift(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Eq. 3: ``z = (max + min) / 2`` per channel."""
    return (hi.float() + lo.float()) / 2


def migration_scale(lo: torch.Tensor, hi: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
    """``s_j = max(1, max(hi_j, -lo_j) / t)`` for the (shifted) channel range ``[lo, hi]``."""
    reach = torch.maximum(hi.float(), -lo.float())
    return (reach / t).clamp(min=1.0)


def candidate_thresholds(lo: torch.Tensor, hi: torch.Tensor, steps: int | None = None,
                         floor: float = FLOOR) -> torch.Tensor:
    """llmc's grid: from ``max(|min|, max)`` down to ``floor`` in ``steps`` equal steps.

    ``steps`` defaults to ``max(100, int(max / 0.5))``. Empty when the whole range already
    lies inside ``[-floor, floor]`` (nothing to scale).
    """
    amx = max(float(hi.max()), 0.0)
    amn = min(float(lo.min()), 0.0)
    top = max(-amn, amx)
    if top < floor:
        return torch.empty(0)
    n = steps if steps is not None else max(100, int(amx / 0.5))
    return top - torch.arange(n + 1, dtype=torch.float64) * ((top - floor) / n)


def output_error(ref: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``mean over tokens of sum over channels of (ref - out)^2`` (float32)."""
    return (ref.float() - out.float()).pow(2).sum(-1).mean()


def batch_totals(per_batch: torch.Tensor) -> torch.Tensor:
    """``[candidates, batches]`` losses -> ``[candidates]``: the batches added one at a time
    in column order, so the same per-batch losses always give the same bits (however many
    processes computed them)."""
    total = torch.zeros(per_batch.shape[0], dtype=per_batch.dtype, device=per_batch.device)
    for j in range(per_batch.shape[1]):
        total = total + per_batch[:, j]
    return total


@dataclass
class Migration:
    """The search's outcome: threshold, scale, its loss and every candidate's loss."""

    threshold: float
    scale: torch.Tensor
    loss: float
    losses: torch.Tensor
    candidates: torch.Tensor

    @property
    def loss_ratio(self) -> float:
        """Best loss over the loss of no scaling (the first candidate); 1.0 if none."""
        if self.losses.numel() == 0 or float(self.losses[0]) == 0.0:
            return 1.0
        return self.loss / float(self.losses[0])


@torch.no_grad()
def search_threshold(lo: torch.Tensor, hi: torch.Tensor,
                     loss: Callable[[torch.Tensor], torch.Tensor], *,
                     steps: int | None = None, floor: float = FLOOR,
                     total: Callable[[torch.Tensor], torch.Tensor] = batch_totals
                     ) -> Migration:
    """Grid search of ``t`` minimizing ``loss(migration_scale(lo, hi, t))``.

    ``loss`` maps a scale ``[C]`` to a scalar tensor or to one loss per scored batch
    (``[B]``, ``B`` may be 0); ``total`` turns the ``[candidates, B]`` losses into one loss
    per candidate (default :func:`batch_totals`; under ``torchrun`` the algorithm passes one
    that adds every rank's batches). Losses stay on their device until the single
    ``argmin`` at the end.
    """
    cands = candidate_thresholds(lo, hi, steps, floor)
    if cands.numel() == 0:
        ones = torch.ones_like(hi, dtype=torch.float32)
        return Migration(float(max(float(hi.max()), -float(lo.min()))), ones, float("nan"),
                         torch.empty(0), cands)
    per_batch = torch.stack([loss(migration_scale(lo, hi, float(t))).float().reshape(-1)
                             for t in cands])
    losses = torch.nan_to_num(total(per_batch), nan=float("inf"))
    best = int(torch.argmin(losses))  # the first minimum, as llmc's strict comparison
    t = float(cands[best])
    return Migration(t, migration_scale(lo, hi, t), float(losses[best]), losses.cpu(), cands)
