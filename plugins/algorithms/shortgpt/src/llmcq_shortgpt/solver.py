"""Block Influence (ShortGPT, Men et al. 2024), as running sums.

For block ``i`` with input hidden states ``X_i`` and output ``X_{i+1}`` (the residual stream
before and after the block), per token ``t``::

    BI_i = 1 - E_t [ <X_{i,t}, X_{i+1,t}> / (||X_{i,t}|| ||X_{i+1,t}||) ]

A block that barely turns the residual stream (cosine near 1) has low influence and is
removed first. :func:`influence_sum` folds one batch into ``(sum of 1 - cos, tokens)``: one
dot product and two norms per token, never a ``[tokens, tokens]`` matrix (llmc forms
``X Y^T`` and keeps its diagonal: 16 GiB for 128 x 512 tokens) nor the hidden states of
several blocks. A token with a zero-norm input or output has no direction: its cosine counts
as 0.5, llmc's ``nan_to_num(nan=0.5)``.
"""

from __future__ import annotations

import torch

__all__ = ["influence_sum", "lowest", "CHUNK_TOKENS"]

#: tokens per chunk of the float64 computation (bounds the temporary copies)
CHUNK_TOKENS = 4096


@torch.no_grad()
def influence_sum(x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
    """``(sum over tokens of 1 - cos(x_t, y_t), tokens)`` for hidden states ``[..., d]``."""
    if x.shape != y.shape:
        raise ValueError(f"input {tuple(x.shape)} and output {tuple(y.shape)} differ")
    d = x.shape[-1]
    xs, ys = x.reshape(-1, d), y.reshape(-1, d)
    total = 0.0
    for start in range(0, xs.shape[0], CHUNK_TOKENS):
        a = xs[start:start + CHUNK_TOKENS].double()
        b = ys[start:start + CHUNK_TOKENS].double()
        dot = torch.linalg.vecdot(a, b)
        norms = a.norm(dim=-1) * b.norm(dim=-1)
        cos = torch.where(norms > 0, dot / norms.clamp_min(torch.finfo(torch.float64).tiny),
                          torch.full_like(dot, 0.5))
        total += float((1.0 - cos).sum())
    return total, int(xs.shape[0])


def lowest(influence: list[float], n: int) -> list[int]:
    """The ``n`` blocks of lowest influence (ties: the earlier block), in index order."""
    if not 0 <= n < len(influence):
        raise ValueError(f"cannot remove {n} of {len(influence)} blocks")
    order = sorted(range(len(influence)), key=lambda i: (influence[i], i))
    return sorted(order[:n])
