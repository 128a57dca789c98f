"""Integer quantization maths shared by every algorithm.

Weights are ``[out, in]``; groups run along ``in``. A tensor is viewed as ``[rows, G, g]``
(``G`` groups of width ``g`` per row) so one code path serves per-tensor (one group of
everything), per-channel (one group per row) and per-group. When ``g`` does not divide
``in`` the last group is partial: it is padded by repeating its last column, which leaves
its min and max unchanged, and the padding is cut off again after quantization.

Formulas (``b`` bits; symmetric grids are signed, asymmetric unsigned):

* symmetric:  ``s = max|w| / (2^(b-1) - 1)``, ``q = clamp(round(w / s), -2^(b-1), 2^(b-1)-1)``
  (llmc's restricted range; with ``sym_range: full``, the compressed-tensors/llm-compressor
  convention, ``s = max|w| / (2^(b-1) - 1/2)``, so code ``-2^(b-1)`` is used too)
* asymmetric: ``s = (max w - min w) / (2^b - 1)``, ``z = round(-min w / s)``,
  ``q = clamp(round(w / s) + z, 0, 2^b - 1)``
* dequantized: ``w_hat = (q - z) * s``

Float grids (``spec.is_float``, FP8 E4M3; ``F = 448`` its largest magnitude):

* ``s = max|w| / F`` (per channel or tensor; per token for activations)
* ``q = float8_e4m3fn(clamp(w / s, -F, F))`` (round to the nearest E4M3 value, ties to even)
* ``w_hat = float(q) * s``

The functions taking a spec (``fit_weight_qparams``, ``quantize_weight``,
``fake_quantize_weight``, ``fake_quantize_act``, ``grid_qparams``, ``quantize_to_grid``)
dispatch on it; their integer code paths are the same as before float grids existed. The
``bits``/``symmetric`` functions (``minmax_qparams``, ``quantize_grouped``, ``mse_shrink``)
are integer-only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmcq.quant.spec import (
    FLOAT_FORMATS,
    ActQuantSpec,
    Granularity,
    PerChannel,
    PerGroup,
    PerTensor,
    PerToken,
    WeightQuantSpec,
)

__all__ = ["QParams", "sym_divisor", "group_view", "ungroup", "minmax_qparams", "quantize_grouped",
           "dequantize_grouped", "fit_weight_qparams", "quantize_weight", "fake_quantize_weight",
           "fake_quantize_act", "round_ste", "mse_shrink", "n_groups", "FLOAT_DTYPES",
           "float_scale", "float_codes", "grid_qparams", "quantize_to_grid", "storage_dtype"]

#: smallest scale, so all-zero groups quantize to zero instead of dividing by zero
SCALE_EPS = 1e-8


#: torch dtype holding the codes of each float format
FLOAT_DTYPES = {"e4m3": torch.float8_e4m3fn}


def float_scale(xg: torch.Tensor, fmt: str,
                shrink: torch.Tensor | float = 1.0) -> torch.Tensor:
    """``max|x| * shrink / F`` per group of ``xg`` (``[rows, G, g]``) -> ``[rows, G, 1]``."""
    absmax = xg.float().abs().amax(dim=-1, keepdim=True) * shrink
    return (absmax / FLOAT_FORMATS[fmt]).clamp(min=SCALE_EPS)


def float_codes(xg: torch.Tensor, scale: torch.Tensor, fmt: str) -> torch.Tensor:
    """The float8 codes of ``xg / scale`` (saturated to ``[-F, F]``), in the float8 dtype."""
    fmax = FLOAT_FORMATS[fmt]
    return (xg.float() / scale).clamp(-fmax, fmax).to(FLOAT_DTYPES[fmt])


def storage_dtype(spec: WeightQuantSpec) -> torch.dtype:
    """The dtype a record stores codes in: int8 (symmetric int), uint8 (asymmetric int), or
    the float8 dtype of a float grid."""
    if spec.is_float:
        return FLOAT_DTYPES[spec.fmt]
    return torch.int8 if spec.symmetric else torch.uint8


def grid_qparams(xg: torch.Tensor, spec: WeightQuantSpec | ActQuantSpec, *,
                 shrink: torch.Tensor | float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Min-max scale (and zero point) per group of ``xg`` on ``spec``'s grid, int or float."""
    if spec.is_float:
        return float_scale(xg, spec.fmt, shrink), None
    return minmax_qparams(xg, spec.bits, spec.symmetric,
                          round_zp=getattr(spec, "round_zp", True), shrink=shrink,
                          full_range=spec.full_range)


def quantize_to_grid(xg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                     spec: WeightQuantSpec | ActQuantSpec) -> torch.Tensor:
    """Codes of ``xg`` on ``spec``'s grid as float32 values (integers, or E4M3 values), ready
    for :func:`dequantize_grouped`."""
    if spec.is_float:
        return float_codes(xg, scale, spec.fmt).float()
    return quantize_grouped(xg, scale, zero, spec.bits, spec.symmetric)


@dataclass
class QParams:
    """Scales and zero points of a weight, shaped ``[rows, G]`` (``zero`` None if symmetric)."""

    scale: torch.Tensor
    zero: torch.Tensor | None


def n_groups(in_features: int, granularity: Granularity) -> int:
    if isinstance(granularity, PerGroup):
        return -(-in_features // granularity.size)
    return 1


def group_view(w: torch.Tensor, granularity: Granularity) -> torch.Tensor:
    """View a 2-D tensor as ``[rows, G, g]`` groups (padding a partial last group)."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    rows, cols = w.shape
    if isinstance(granularity, PerTensor):
        return w.reshape(1, 1, rows * cols)
    if isinstance(granularity, (PerChannel, PerToken)):
        return w.unsqueeze(1)
    if isinstance(granularity, PerGroup):
        g = granularity.size
        pad = (-cols) % g
        if pad:
            w = torch.cat([w, w[:, -1:].expand(rows, pad)], dim=1)
        return w.reshape(rows, -1, g)
    raise TypeError(f"unsupported granularity {granularity!r}")


def ungroup(wg: torch.Tensor, shape: torch.Size | tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`group_view`: back to ``shape``, dropping padding columns."""
    rows, cols = shape
    if wg.shape[0] == 1 and wg.shape[1] == 1 and rows != 1:  # per-tensor
        return wg.reshape(rows, cols)
    return wg.reshape(rows, -1)[:, :cols]


def sym_divisor(bits: int, full_range: bool = False) -> float:
    """What ``max|w|`` is divided by for a symmetric scale: ``2^(b-1) - 1`` (llmc: ``max|w|``
    lands on the largest positive code) or, full range, ``2^(b-1) - 1/2`` (compressed-tensors:
    the range spans all ``2^b`` codes, ``-2^(b-1)`` included)."""
    return 2 ** (bits - 1) - (0.5 if full_range else 1.0)


def minmax_qparams(wg: torch.Tensor, bits: int, symmetric: bool, *, round_zp: bool = True,
                   shrink: torch.Tensor | float = 1.0, full_range: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero point per group of ``wg`` (``[rows, G, g]``) -> ``[rows, G, 1]`` each.

    ``shrink`` (scalar or ``[rows, G, 1]``) scales the range down, for clipping searches;
    ``full_range`` picks the symmetric convention (:func:`sym_divisor`).
    """
    wg = wg.float()
    if symmetric:
        absmax = wg.abs().amax(dim=-1, keepdim=True) * shrink
        return (absmax / sym_divisor(bits, full_range)).clamp(min=SCALE_EPS), None
    qmax = 2**bits - 1
    hi = wg.amax(dim=-1, keepdim=True) * shrink
    lo = wg.amin(dim=-1, keepdim=True) * shrink
    scale = ((hi - lo) / qmax).clamp(min=SCALE_EPS)
    zero = -lo / scale
    zero = zero.round().clamp(0, qmax) if round_zp else zero.clamp(0, qmax)
    return scale, zero


def quantize_grouped(wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                     bits: int, symmetric: bool, qmax: int | None = None) -> torch.Tensor:
    """Integer codes (as a float tensor) of ``wg`` on the grid given by ``scale``/``zero``;
    ``qmax`` (asymmetric grids): the largest code when it is not ``2^bits - 1``."""
    if symmetric:
        lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        return torch.clamp(torch.round(wg / scale), lo, hi)
    return torch.clamp(torch.round(wg / scale + zero), 0, 2**bits - 1 if qmax is None else qmax)


def dequantize_grouped(q: torch.Tensor, scale: torch.Tensor,
                       zero: torch.Tensor | None) -> torch.Tensor:
    return (q - zero) * scale if zero is not None else q * scale


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round with a straight-through gradient (for learnable quantizers)."""
    return (x.round() - x).detach() + x


def mse_shrink(wg: torch.Tensor, bits: int, symmetric: bool, *, round_zp: bool = True,
               grid: int = 100, max_shrink: float = 0.8, norm: float = 2.4,
               full_range: bool = False) -> torch.Tensor:
    """Per-group clip ratio in ``[1 - max_shrink, 1]`` minimizing ``sum |w - w_hat|^norm``.

    The grid search of GPTQ's ``mse`` quantizer, vectorized over all groups.
    """
    wg = wg.float()
    best_err = torch.full(wg.shape[:-1] + (1,), float("inf"), device=wg.device)
    best = torch.ones_like(best_err)
    for i in range(int(max_shrink * grid) + 1):
        p = 1.0 - i / grid
        scale, zero = minmax_qparams(wg, bits, symmetric, round_zp=round_zp, shrink=p,
                                     full_range=full_range)
        q = quantize_grouped(wg, scale, zero, bits, symmetric)
        err = (dequantize_grouped(q, scale, zero) - wg).abs_().pow_(norm).sum(-1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, p), best)
    return best


def fit_weight_qparams(w: torch.Tensor, spec: WeightQuantSpec) -> QParams:
    """Scales/zeros for ``w`` by ``spec.calib_algo`` (minmax or mse), shaped ``[rows, G]``."""
    wg = group_view(w.float(), spec.granularity)
    if spec.is_float:
        if spec.calib_algo != "minmax":
            raise ValueError(f"calib_algo {spec.calib_algo!r}: float grids allow minmax")
        return QParams(float_scale(wg, spec.fmt).squeeze(-1), None)
    shrink: torch.Tensor | float = 1.0
    if spec.calib_algo == "mse":
        shrink = mse_shrink(wg, spec.bits, spec.symmetric, round_zp=spec.round_zp,
                            full_range=spec.full_range)
    elif spec.calib_algo != "minmax":
        raise ValueError(f"calib_algo {spec.calib_algo!r}: allowed minmax, mse")
    scale, zero = minmax_qparams(wg, spec.bits, spec.symmetric, round_zp=spec.round_zp,
                                 shrink=shrink, full_range=spec.full_range)
    return QParams(scale.squeeze(-1), None if zero is None else zero.squeeze(-1))


def quantize_weight(w: torch.Tensor, spec: WeightQuantSpec,
                    qparams: QParams | None = None) -> tuple[torch.Tensor, QParams]:
    """Integer codes ``[out, in]`` (float dtype, integral values) and the qparams used.
    For a float grid the codes are in the float8 dtype (``storage_dtype(spec)``)."""
    qp = qparams or fit_weight_qparams(w, spec)
    wg = group_view(w.float(), spec.granularity)
    if spec.is_float:
        return ungroup(float_codes(wg, qp.scale.unsqueeze(-1), spec.fmt), w.shape), qp
    zero = None if qp.zero is None else qp.zero.unsqueeze(-1)
    q = quantize_grouped(wg, qp.scale.unsqueeze(-1), zero, spec.bits, spec.symmetric)
    return ungroup(q, w.shape), qp


def fake_quantize_weight(w: torch.Tensor, spec: WeightQuantSpec,
                         qparams: QParams | None = None) -> torch.Tensor:
    """``dequantize(quantize(w))`` in ``w``'s dtype."""
    qp = qparams or fit_weight_qparams(w, spec)
    wg = group_view(w.float(), spec.granularity)
    scale = qp.scale.unsqueeze(-1)
    if spec.is_float:
        q = float_codes(wg, scale, spec.fmt).float()
        return ungroup(q * scale, w.shape).to(w.dtype)
    zero = None if qp.zero is None else qp.zero.unsqueeze(-1)
    q = quantize_grouped(wg, scale, zero, spec.bits, spec.symmetric)
    return ungroup(dequantize_grouped(q, scale, zero), w.shape).to(w.dtype)


def fake_quantize_act(x: torch.Tensor, spec: ActQuantSpec, scale: torch.Tensor | None = None,
                      zero: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize-dequantize activations ``[..., hidden]``.

    Dynamic: scales from ``x`` itself (per token, per tensor, or per group of the hidden
    dimension). Static: the calibrated per-tensor ``scale``/``zero`` are used.
    """
    shape, dtype = x.shape, x.dtype
    x2 = x.reshape(-1, shape[-1]).float()
    if spec.is_float:
        return _fake_quantize_act_float(x2, spec, scale).reshape(shape).to(dtype)
    if spec.static:
        if scale is None:
            raise ValueError("static activation quantization needs a calibrated scale")
        q = quantize_grouped(x2, scale, zero, spec.bits, spec.symmetric)
        return dequantize_grouped(q, scale, zero).reshape(shape).to(dtype)
    gran = spec.granularity
    wg = group_view(x2, PerChannel() if isinstance(gran, PerToken) else gran)
    s, z = minmax_qparams(wg, spec.bits, spec.symmetric, full_range=spec.full_range)
    q = quantize_grouped(wg, s, z, spec.bits, spec.symmetric)
    return ungroup(dequantize_grouped(q, s, z), x2.shape).reshape(shape).to(dtype)


def _fake_quantize_act_float(x2: torch.Tensor, spec: ActQuantSpec,
                             scale: torch.Tensor | None) -> torch.Tensor:
    """FP8 activations ``[tokens, hidden]``: static (calibrated per-tensor scale), or dynamic
    per token / per tensor (``max|x| / F`` of each token, or of the whole tensor)."""
    if spec.static:
        if scale is None:
            raise ValueError("static activation quantization needs a calibrated scale")
        s = scale.float()
    elif isinstance(spec.granularity, PerToken):
        s = float_scale(x2.unsqueeze(1), spec.fmt).squeeze(1)  # [tokens, 1]
    elif isinstance(spec.granularity, PerTensor):
        s = float_scale(x2.reshape(1, 1, -1), spec.fmt).reshape(())
    else:
        raise ValueError(f"float activations: granularity {spec.granularity} (allowed "
                         "per_token, per_tensor)")
    return float_codes(x2, s, spec.fmt).float() * s
