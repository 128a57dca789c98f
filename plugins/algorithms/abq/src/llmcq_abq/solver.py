"""ABQ-LLM's maths beyond OmniQuant's (:mod:`llmcq_omniquant.solver` holds LWC and LET):
tensors in, tensors out, no module plumbing.

Distribution-correcting block loss, for the quantized block's output ``Y_q`` against a float
target ``Y`` (the float chain's output; with ``aug_loss`` also the float block run on the
quantized inputs)::

    l(Y_q, Y) = MSE(Y_q, Y) - log |mean_t cos(Y_q[t], Y[t])|        (t: tokens)

plus, once per step, the bidirectional KL divergence between the head-averaged attention
maps of the float block (on the float chain's input) and of the quantized block::

    A = mean_h softmax(Q_h K_h^T / sqrt(d) + causal mask)           ([batch, L, L])
    KL(A_f || A_q) + KL(A_q || A_f)      (sum over keys, mean over queries and batch)

Queries and keys get the rotary position embedding first (Llama's ``rotate_half`` form);
under grouped-query attention each key head serves ``heads / kv_heads`` query heads.

Rank-1 compensation of a weight ``W [out, in]`` (``down_proj`` of the first and last blocks)::

    W' = W + a b^T,   a [out, 1] (starts at 0), b [1, in] (starts at 1)

trained with the block and added to the (LET-transformed) weight before it is quantized, so
folding ``a b^T`` into the weight afterwards gives an ordinary quantized linear.
"""

from __future__ import annotations

import torch
from llmcq.recon.losses import kl_divergence, mse
from torch.nn import functional as F

__all__ = ["rotate_half", "apply_rotary", "attention_map", "kl_both_ways",
           "neg_log_mean_cosine", "target_loss", "compensated"]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[-x2, x1]`` of the two halves of the last dimension (Llama's rotary form)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of ``x [batch, heads, L, d]`` with ``cos``/``sin``
    ``[batch or 1, L, d]``."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


def attention_map(q: torch.Tensor, k: torch.Tensor, n_heads: int, n_kv_heads: int, *,
                  cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
                  scaling: float | None = None) -> torch.Tensor:
    """Head-averaged causal attention probabilities ``[batch, L, L]`` from projected queries
    ``q [batch, L, heads * d]`` and keys ``k [batch, L, kv_heads * d]`` (float32;
    differentiable in both)."""
    b, length, width = q.shape
    d = width // n_heads
    qh = q.float().reshape(b, length, n_heads, d).transpose(1, 2)
    kh = k.float().reshape(b, length, n_kv_heads, d).transpose(1, 2)
    if cos is not None and sin is not None:
        qh = apply_rotary(qh, cos.float(), sin.float())
        kh = apply_rotary(kh, cos.float(), sin.float())
    if n_kv_heads != n_heads:
        kh = kh.repeat_interleave(n_heads // n_kv_heads, dim=1)
    scores = qh @ kh.transpose(-1, -2) * (d**-0.5 if scaling is None else scaling)
    future = torch.ones(length, length, dtype=torch.bool, device=q.device).triu(1)
    scores = scores.masked_fill(future, float("-inf"))
    return torch.softmax(scores, dim=-1).mean(dim=1)


def kl_both_ways(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``KL(p || q) + KL(q || p)`` of probability rows (last dimension), averaged over every
    other dimension (core's :func:`llmcq.recon.kl_divergence`)."""
    return kl_divergence(p, q) + kl_divergence(q, p)


def neg_log_mean_cosine(out: torch.Tensor, target: torch.Tensor,
                        eps: float = 1e-8) -> torch.Tensor:
    """``-log |mean_t cos(out_t, target_t)|`` over tokens (rows of the last dimension), as
    the reference computes it (the log of the mean, not the mean of the logs)."""
    cos = F.cosine_similarity(out.float(), target.float(), dim=-1, eps=eps)
    return -torch.log(cos.mean().abs().clamp(min=eps))


def target_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """One target's term of the block loss: ``MSE - log |mean cos|``."""
    return mse(out, target) + neg_log_mean_cosine(out, target)


def compensated(w: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``W + a b^T`` (``left`` ``[out, 1]``, ``right`` ``[1, in]``), in ``w``'s dtype."""
    return w + (left @ right).to(w.dtype)
