"""TesseraQ's maths in the paper's notation: tensors in, tensors out, no module plumbing.

Per linear with weight ``W`` (``[out, in]``, already clipped), a fixed grid ``(s, z)``
(min-max per group, ``[out, G]``) and, per weight, a rounding variable ``r``::

    h(r)   = clamp(sigmoid(r) (zeta - gamma) + gamma, 0, 1)    zeta = 1.1, gamma = -0.1
    q      = clamp(floor(W / s) + h + z, qmin, qmax)            (z = 0 when symmetric)
    s'     = s * 2 h(nu)                                        (nu per group, from 0: s' = s)
    W_hat  = (q - z) s'

``h`` is AdaRound's rectified sigmoid; ``r`` starts at ``h^-1(W / s - floor(W / s))``, so
the soft weight starts at ``W`` itself wherever it is inside the grid. Progressive adaptive
rounding hardens the variables in stages: before stage ``k`` with threshold ``t_k``, the
variables whose confidence ``|h - 1/2|`` exceeds the ``t_k``-quantile of the linear's
confidences are fixed to ``1`` (``h > 1/2``) or ``0``; then Adam trains the rest (and
``nu``) on the block-output loss. After the last stage every variable is fixed (``r > 0``
means up), and the integer codes ``q`` and the scales ``s'`` are the record's: the
fake-quantized weight the run evaluates is exactly ``(q - z) s'``.

The per-group tensors (``s``, ``z``, ``nu``) are ``[out, G]``; everything per weight is kept
in the weight's own ``[out, in]`` shape (a partial last group has no padding variables).
"""

from __future__ import annotations

import math

import torch

from llmcq.quant.qparams import SCALE_EPS, group_view, minmax_qparams
from llmcq.quant.spec import PerGroup, WeightQuantSpec

__all__ = ["ZETA", "GAMMA", "SOFT", "rectified_sigmoid", "rectified_sigmoid_inverse",
           "grid_qparams", "per_column", "init_rounding", "rounding", "harden", "quantile",
           "final_rounding", "scale_factor", "effective_scale", "codes", "fake_quant",
           "hard_share", "l2_loss", "change_ratio", "bounds", "dequantize"]

#: AdaRound's stretch of the sigmoid: h = clamp(sigmoid(r) (ZETA - GAMMA) + GAMMA, 0, 1)
ZETA = 1.1
GAMMA = -0.1
#: the state of a rounding variable still trained (hardened ones hold 0 or 1)
SOFT = -1


def rectified_sigmoid(r: torch.Tensor) -> torch.Tensor:
    """``clamp(sigmoid(r) (zeta - gamma) + gamma, 0, 1)``: reaches 0 and 1 at finite ``r``."""
    return torch.clamp(torch.sigmoid(r) * (ZETA - GAMMA) + GAMMA, 0, 1)


def rectified_sigmoid_inverse(h: torch.Tensor) -> torch.Tensor:
    """``r`` with ``rectified_sigmoid(r) = h`` for ``h`` in ``[0, 1]`` (finite at both ends)."""
    return -torch.log((ZETA - GAMMA) / (h - GAMMA) - 1)


def grid_qparams(w: torch.Tensor, spec: WeightQuantSpec
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The fixed grid: min-max scale and zero point of ``w`` per group, ``[out, G]`` each
    (``[1, 1]`` per tensor; zero None when symmetric)."""
    wg = group_view(w.float(), spec.granularity)
    scale, zero = minmax_qparams(wg, spec.bits, spec.symmetric, round_zp=spec.round_zp,
                                 full_range=spec.full_range)
    return scale.squeeze(-1), None if zero is None else zero.squeeze(-1)


def per_column(t: torch.Tensor, spec: WeightQuantSpec, in_features: int) -> torch.Tensor:
    """A per-group tensor ``[out, G]`` spread over the columns it covers: ``[out, in]``
    (per-channel ``[out, 1]`` and per-tensor ``[1, 1]`` stay as they are and broadcast)."""
    gran = spec.granularity
    if isinstance(gran, PerGroup):
        return t.repeat_interleave(gran.size, dim=1)[:, :in_features]
    return t


def init_rounding(w: torch.Tensor, scale: torch.Tensor, spec: WeightQuantSpec
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(floor(W / s), r0)``, both ``[out, in]`` float32: ``r0`` makes ``h(r0)`` the
    fractional part of ``W / s`` (AdaRound's initialization)."""
    x = w.float() / per_column(scale, spec, w.shape[1])
    base = torch.floor(x)
    return base, rectified_sigmoid_inverse(x - base)


def rounding(r: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """The rounding offsets ``h`` in ``[0, 1]``: ``h(r)`` where ``state`` is :data:`SOFT`,
    the hardened value (0 or 1) elsewhere; differentiable in ``r`` on the soft entries."""
    return torch.where(state == SOFT, rectified_sigmoid(r), state.to(r.dtype))


def quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """The ``q``-quantile of all entries of ``x`` with linear interpolation (numpy's default,
    llmc's ``np.quantile``), without ``torch.quantile``'s size limit."""
    flat = x.reshape(-1)
    n = flat.numel()
    pos = q * (n - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, n - 1)
    a = flat.kthvalue(lo + 1).values
    b = a if hi == lo else flat.kthvalue(hi + 1).values
    return a + (b - a) * (pos - lo)


@torch.no_grad()
def harden(r: torch.Tensor, state: torch.Tensor, threshold: float) -> torch.Tensor:
    """The state after hardening at ``threshold`` (llmc's ``update_mask``): variables whose
    confidence ``|h - 1/2|`` is above the ``threshold``-quantile of all of the linear's
    confidences (hardened ones count as fully confident, 1/2) are fixed to 0 or 1. About
    ``1 - threshold`` of the variables are hard afterwards (exactly
    ``n - 1 - floor(threshold (n - 1))`` of ``n`` distinct confidences)."""
    h = rounding(r, state)
    value = quantile((h - 0.5).abs(), threshold)
    up = h > value + 0.5
    down = h < 0.5 - value
    out = state.clone()
    out[up] = 1
    out[down] = 0
    return out


@torch.no_grad()
def final_rounding(r: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """Every variable fixed (the end of the last stage): the soft ones round up where
    ``r > 0`` (``h > 1/2``), as llmc merges them; float32 zeros and ones."""
    return torch.where(state == SOFT, (r > 0).to(torch.float32), state.to(torch.float32))


def hard_share(state: torch.Tensor) -> float:
    """Share of hardened variables."""
    return float((state != SOFT).float().mean())


def scale_factor(nu: torch.Tensor) -> torch.Tensor:
    """The dequantization scale factor ``2 h(nu)`` in ``[0, 2]``; exactly 1 at ``nu = 0``."""
    return 2 * rectified_sigmoid(nu)


def effective_scale(scale: torch.Tensor, nu: torch.Tensor | None) -> torch.Tensor:
    """The tuned dequantization scale ``s * 2 h(nu)`` (``[out, G]``; ``s`` without ``nu``),
    kept at least :data:`~llmcq.quant.qparams.SCALE_EPS` so no group collapses to zero."""
    if nu is None:
        return scale
    return (scale * scale_factor(nu)).clamp(min=SCALE_EPS)


def bounds(spec: WeightQuantSpec) -> tuple[int, int]:
    """``(qmin, qmax)`` of the integer grid."""
    if spec.symmetric:
        return -(2 ** (spec.bits - 1)), 2 ** (spec.bits - 1) - 1
    return 0, 2**spec.bits - 1


def codes(base: torch.Tensor, h: torch.Tensor, zero: torch.Tensor | None,
          spec: WeightQuantSpec) -> torch.Tensor:
    """``clamp(floor(W / s) + h + z, qmin, qmax)`` (``[out, in]``; ``zero`` per group): the
    integer codes when ``h`` is hard, differentiable in ``h`` inside the grid."""
    lo, hi = bounds(spec)
    q = base + h
    if zero is not None:
        q = q + per_column(zero, spec, base.shape[1])
    return torch.clamp(q, lo, hi)


def fake_quant(base: torch.Tensor, h: torch.Tensor, scale: torch.Tensor,
               zero: torch.Tensor | None, nu: torch.Tensor | None,
               spec: WeightQuantSpec) -> torch.Tensor:
    """``W_hat = (q - z) s'`` (``[out, in]``): the training forward's weight, and with hard
    ``h`` exactly what a record of :func:`codes` and :func:`effective_scale` dequantizes
    to (the same operations in the same order as ``QuantizedLinear.dequantize``)."""
    q = codes(base, h, zero, spec)
    cols = base.shape[1]
    return dequantize(q, None if zero is None else per_column(zero, spec, cols),
                      per_column(effective_scale(scale, nu), spec, cols))


def dequantize(q: torch.Tensor, zero_cols: torch.Tensor | None,
               scale_cols: torch.Tensor) -> torch.Tensor:
    """``(q - z) s`` with the zero points and scales spread over the columns (the order of
    ``QuantizedLinear.dequantize``)."""
    return q * scale_cols if zero_cols is None else (q - zero_cols) * scale_cols


def l2_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """llmc's ``l2`` reconstruction loss: squared error summed over the hidden dimension,
    averaged over tokens (MSE times the width: the same Adam steps up to its epsilon)."""
    return (out - target.float()).pow(2).sum(-1).mean()


@torch.no_grad()
def change_ratio(base: torch.Tensor, h: torch.Tensor, w: torch.Tensor,
                 scale: torch.Tensor, spec: WeightQuantSpec) -> float:
    """Share of weights whose learned rounding differs from rounding to nearest on the same
    grid (llmc logs it as the change ratio)."""
    nearest = torch.round(w.float() / per_column(scale, spec, w.shape[1])) - base
    return float((h != nearest).float().mean())
