"""Wanda's maths (Sun et al. 2023, Eq. 1): tensors in, tensors out.

The score of weight ``W_ij`` is ``|W_ij| * ||X_j||_2``, ``X_j`` the ``j``-th input feature over
every calibration token: a small weight on a large-activation input can matter more than a
large weight on a quiet one. ``||X_j||_2^2`` is a running sum of squares (the activations are
never kept). Scores are compared within each output row (the paper's "per output"
comparison group: rows of one layer have very different scales) or within each group of M
consecutive inputs of a row for N:M.
"""

from __future__ import annotations

import torch

from llmcq.sparsity import SparsitySpec
from llmcq.sparsity.masks import mask_from_scores

__all__ = ["accumulate_sq_norms", "wanda_scores", "wanda_mask"]


@torch.no_grad()
def accumulate_sq_norms(acc: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """``acc + sum_t x_t^2`` per input feature (float64, so millions of tokens add up
    without loss); ``x`` is ``[..., d_in]``."""
    x = x.detach().reshape(-1, x.shape[-1]).double()
    part = x.square().sum(0)
    return part if acc is None else acc.add_(part)


def wanda_scores(W: torch.Tensor, sq_norms: torch.Tensor) -> torch.Tensor:
    """``|W| * sqrt(sq_norms)`` broadcast over rows (float32, ``W``'s shape)."""
    return W.detach().abs().float() * sq_norms.to(W.device).float().sqrt()[None, :]


def wanda_mask(W: torch.Tensor, sq_norms: torch.Tensor, spec: SparsitySpec) -> torch.Tensor:
    """Keep-mask of ``W``: the highest scores of every row (unstructured) or the ``n``
    highest of every ``m`` consecutive inputs of a row (N:M)."""
    return mask_from_scores(wanda_scores(W, sq_norms), spec, per_row=True)
