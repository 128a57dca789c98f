"""Masks from scores, and their structure checks (torch).

A mask is a bool tensor of a weight's shape ``[out, in]``, ``True`` where the weight is
kept. Pruning algorithms compute a score per weight (``|w|`` for magnitude, ``|w| ·
||x_j||`` for Wanda) and turn it into a mask with :func:`mask_from_scores`, which keeps the
highest scores under the run's :class:`~llmcq.sparsity.SparsitySpec`: ``sparsity`` of each
row (or of the whole layer) for unstructured masks, or ``n`` of every ``m`` consecutive
input weights of a row for ``N:M``.
"""

from __future__ import annotations

import torch

from llmcq.sparsity import NM, MaskStructure, SparsitySpec, Unstructured

__all__ = ["mask_from_scores", "nm_mask", "unstructured_mask", "structure_violations",
           "mask_sparsity"]


def unstructured_mask(scores: torch.Tensor, sparsity: float, *, per_row: bool = True
                      ) -> torch.Tensor:
    """Prune the ``round(sparsity * n)`` lowest scores of each row (or of the layer)."""
    if per_row:
        k = int(round(sparsity * scores.shape[1]))
        mask = torch.ones_like(scores, dtype=torch.bool)
        if k:
            idx = torch.topk(scores.float(), k, dim=1, largest=False).indices
            mask.scatter_(1, idx, False)
        return mask
    flat = scores.float().flatten()
    k = int(round(sparsity * flat.numel()))
    mask = torch.ones_like(flat, dtype=torch.bool)
    if k:
        mask[torch.topk(flat, k, largest=False).indices] = False
    return mask.view_as(scores)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` highest scores of every ``m`` consecutive input columns of a row; a
    partial last block keeps ``min(n, width)`` of its columns."""
    out_f, in_f = scores.shape
    full = in_f - in_f % m
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if full:
        blocks = scores[:, :full].float().reshape(out_f, -1, m)
        idx = torch.topk(blocks, n, dim=-1).indices
        mask[:, :full] = torch.zeros_like(blocks, dtype=torch.bool).scatter_(
            -1, idx, True).reshape(out_f, full)
    if full < in_f:
        tail = scores[:, full:].float()
        keep = min(n, tail.shape[1])
        idx = torch.topk(tail, keep, dim=-1).indices
        mask[:, full:] = torch.zeros_like(tail, dtype=torch.bool).scatter_(-1, idx, True)
    return mask


def mask_from_scores(scores: torch.Tensor, spec: SparsitySpec, *, per_row: bool = True
                     ) -> torch.Tensor:
    """The mask ``spec`` asks for, keeping the highest ``scores``."""
    if isinstance(spec.structure, NM):
        return nm_mask(scores, spec.structure.n, spec.structure.m)
    return unstructured_mask(scores, spec.sparsity, per_row=per_row)


def structure_violations(mask: torch.Tensor, structure: MaskStructure) -> int:
    """How many ``m``-blocks of ``mask`` keep more than ``n`` weights (0 for unstructured)."""
    if isinstance(structure, Unstructured):
        return 0
    out_f, in_f = mask.shape
    m, n = structure.m, structure.n
    full = in_f - in_f % m
    bad = 0
    if full:
        bad += int((mask[:, :full].reshape(out_f, -1, m).sum(-1) > n).sum())
    if full < in_f:
        bad += int((mask[:, full:].sum(-1) > n).sum())
    return bad


def mask_sparsity(mask: torch.Tensor) -> float:
    """Fraction of pruned weights."""
    return 1.0 - float(mask.float().mean())
