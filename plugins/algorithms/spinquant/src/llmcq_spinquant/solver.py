"""SpinQuant's maths as pure functions: Cayley SGD on the orthogonal group, the rotated
weights the training forward uses, and their straight-through fake quantization.

**Cayley SGD** (Li, Wang & Lin, ICLR 2020, Algorithm 2; the optimizer of SpinQuant). For an
orthogonal ``R`` (``R^T R = I``) and the Euclidean gradient ``G = dL/dR``, with momentum
``beta`` (0 in the paper)::

    M  <- beta M - G                               (the momentum, as a Euclidean step)
    W  =  1/2 (M R^T - R M^T)                      (skew-symmetric: W^T = -W)
    M  <- W R                                      (the momentum kept on the tangent space)
    a  =  min(lr, 1 / (||W||_1 + eps))             (||.||_1: the largest column sum of |W|)
    R  <- (I - a/2 W)^-1 (I + a/2 W) R             (the Cayley transform of a W)

``W = 1/2 (M R^T - R M^T)`` is the general ``W_hat - W_hat^T`` with
``W_hat = M R^T - 1/2 R (R^T M R^T)`` specialised to square ``R`` (``R R^T = I``). The Cayley
transform of a skew-symmetric matrix is orthogonal, so ``R`` stays on the manifold up to
rounding; the linear solve is exact (the reference iterates the fixed point
``Y = R + a/2 W (R + Y)`` a few times instead), computed in float64. With ``beta = 0`` the
first-order change of the loss is ``-a/2 (||G||^2 - tr((G^T R)^2)) <= 0``: a descent
direction, zero exactly where ``G^T R`` is symmetric (a critical point on the manifold).

**Rotated weights** (rows as in ``y = x W^T``, the residual stream ``x' = x R1``): a reader
``W R1``; a writer ``R1^T W`` (bias ``R1^T b``); per head of ``head_dim`` (R2) the values'
rows ``R2^T W_v[h]`` and ``o_proj``'s columns ``W_o[:, h] R2`` - the same maps
:mod:`llmcq_quarot.rotation` applies in place, written here differentiably.
"""

from __future__ import annotations

import torch
from llmcq.quant.qparams import SCALE_EPS, group_view, sym_divisor, ungroup
from llmcq.quant.spec import WeightQuantSpec
from llmcq.recon.quant import fake_quant_grouped

__all__ = ["skew_direction", "cayley", "cayley_step", "orthogonality_error", "reader",
           "writer", "value_rows", "output_columns", "weight_fake_quant"]


def skew_direction(r: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``W = 1/2 (M R^T - R M^T)`` for a square orthogonal ``R`` and a step direction
    ``M`` (``-G`` without momentum)."""
    a = m @ r.T
    return 0.5 * (a - a.T)


def cayley(w: torch.Tensor, r: torch.Tensor, alpha: float) -> torch.Tensor:
    """``(I - alpha/2 W)^-1 (I + alpha/2 W) R`` (exact linear solve)."""
    eye = torch.eye(w.shape[0], dtype=w.dtype, device=w.device)
    return torch.linalg.solve(eye - 0.5 * alpha * w, (eye + 0.5 * alpha * w) @ r)


def cayley_step(r: torch.Tensor, grad: torch.Tensor, lr: float, *,
                momentum: float = 0.0, buf: torch.Tensor | None = None,
                eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One Cayley SGD step of the orthogonal ``r`` along the Euclidean gradient ``grad``.
    Returns ``(new r, new momentum buffer, the step size used)``; computed in float64 and
    returned in ``r``'s dtype."""
    dtype = r.dtype
    r64, g64 = r.to(torch.float64), grad.to(r.device, torch.float64)
    m = -g64 if buf is None or momentum == 0.0 else momentum * buf.to(torch.float64) - g64
    w = skew_direction(r64, m)
    alpha = min(float(lr), 1.0 / (float(w.abs().sum(dim=0).max()) + eps))
    new = cayley(w, r64, alpha)
    return new.to(dtype), (w @ r64).to(dtype), alpha


def orthogonality_error(r: torch.Tensor) -> float:
    """``max |R^T R - I|``."""
    r64 = r.detach().to(torch.float64)
    return float((r64.T @ r64 - torch.eye(r.shape[0], dtype=torch.float64,
                                            device=r.device)).abs().max())


def reader(w: torch.Tensor, r1: torch.Tensor) -> torch.Tensor:
    """A residual reader's weight ``[out, hidden]`` in the rotated basis: ``W R1``."""
    return w @ r1


def writer(w: torch.Tensor, r1: torch.Tensor) -> torch.Tensor:
    """A residual writer's weight ``[hidden, in]`` (or bias ``[hidden]``): ``R1^T W``."""
    return r1.T @ w if w.dim() == 2 else w @ r1


def value_rows(w: torch.Tensor, r2: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """``v_proj``'s weight ``[kv_heads * hd, in]`` (or bias) with each head's rows rotated:
    ``R2^T W_v[h]`` (bias ``b_v[h] R2``)."""
    hd = r2.shape[0]
    if w.dim() == 1:
        return (w.view(kv_heads, hd) @ r2).reshape(-1)
    return (r2.T @ w.view(kv_heads, hd, -1)).reshape(w.shape)


def output_columns(w: torch.Tensor, r2: torch.Tensor, heads: int) -> torch.Tensor:
    """``o_proj``'s weight ``[out, heads * hd]`` with each head's columns rotated:
    ``W_o[:, h] R2``."""
    hd = r2.shape[0]
    return (w.view(w.shape[0], heads, hd) @ r2).reshape(w.shape)


def weight_fake_quant(w: torch.Tensor, spec: WeightQuantSpec) -> torch.Tensor:
    """Min-max round-to-nearest quantize-dequantize of ``w`` on ``spec``'s integer grid with
    straight-through rounding (the gradient reaches ``w`` directly and through the range).
    The values are core's ``fake_quantize_weight`` with ``calib_algo: minmax``."""
    wg = group_view(w.float(), spec.granularity)
    hi = wg.amax(dim=-1, keepdim=True)
    lo = wg.amin(dim=-1, keepdim=True)
    if spec.symmetric:
        scale = (torch.maximum(hi.abs(), lo.abs()) / sym_divisor(spec.bits, spec.full_range)
                 ).clamp(min=SCALE_EPS)
        zero = None
    else:
        qmax = 2 ** spec.bits - 1
        scale = ((hi - lo) / qmax).clamp(min=SCALE_EPS)
        zero = (-lo / scale).detach()
        zero = zero.round().clamp(0, qmax) if spec.round_zp else zero.clamp(0, qmax)
    out = fake_quant_grouped(wg, scale, zero, spec.bits, spec.symmetric, True)
    return ungroup(out, w.shape).to(w.dtype)
