"""KV-cache quantization maths: pure functions on ``[batch, heads, tokens, head_dim]`` tensors.

A key or value tensor of one attention layer is viewed as ``[rows, 1, g]`` groups so the
shared grid functions of :mod:`llmcq.quant.qparams` (min-max scale and zero point, rounding,
dequantization) serve every granularity:

* ``per_token``: one scale per token over all heads (``h * d`` values);
* ``per_head``: one scale per token and head (``d`` values);
* ``per_channel``: one scale per head channel ``(h, d)`` over the tokens quantized together
  (KIVI's keys: a group of ``G`` consecutive tokens);
* ``per_tensor``: one scale per sequence (over every head, token and channel).

Dynamic grids take their range from the tokens quantized together; static grids
(``per_tensor``, ``per_channel``) take fixed ranges observed on calibration data
(:class:`RangeObserver`). Integer grids: symmetric ``s = max|x| / (2^(b-1) - 1)`` (llmc's);
asymmetric ``s = (max x - min x) / (2^b - 1)`` with the integer offset ``z = round(-min x / s)``
left unclamped, as KIVI's min-offset grid: a group of keys that does not straddle zero (a
shifted head) keeps its full range, so every element is within half a step. Weight grids
(:func:`llmcq.quant.qparams.minmax_qparams`) clamp ``z`` into the code range instead. FP8
(e4m3) grids scale ``max|x|`` to 448.

KIVI (Liu et al., 2024, arXiv:2402.02750): keys per channel in groups of ``G`` tokens,
values per token; the most recent tokens stay in full precision (the key residual holds the
``L mod R`` tokens of the last incomplete window of ``R``, the value residual the last ``R``
tokens): :func:`kivi_split`.
"""

from __future__ import annotations

import torch

from llmcq.quant.qparams import (SCALE_EPS, dequantize_grouped, float_scale, quantize_to_grid,
                                 sym_divisor)
from llmcq.quant.spec import Granularity, KVQuantSpec, PerChannel, PerHead, PerTensor, PerToken

__all__ = ["kv_qparams", "kv_group_view", "kv_ungroup", "fake_quant_kv", "fake_quant_key_groups",
           "kivi_split", "RangeObserver", "static_qparams", "kv_step"]


def kv_qparams(xg: torch.Tensor, spec: KVQuantSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Min-max scale (and zero offset) per row of ``xg`` (``[rows, 1, g]``) -> ``[rows, 1, 1]``."""
    xg = xg.float()
    if spec.is_float:
        return float_scale(xg, spec.fmt), None
    if spec.symmetric:
        absmax = xg.abs().amax(dim=-1, keepdim=True)
        return (absmax / sym_divisor(spec.bits, spec.full_range)).clamp(min=SCALE_EPS), None
    hi, lo = xg.amax(dim=-1, keepdim=True), xg.amin(dim=-1, keepdim=True)
    scale = ((hi - lo) / (2**spec.bits - 1)).clamp(min=SCALE_EPS)
    return scale, torch.round(-lo / scale)


def kv_group_view(x: torch.Tensor, gran: Granularity) -> torch.Tensor:
    """``x`` (``[b, h, s, d]``) as ``[rows, 1, g]``: one row per scale of ``gran``."""
    b, h, s, d = x.shape
    if isinstance(gran, PerToken):
        return x.permute(0, 2, 1, 3).reshape(b * s, 1, h * d)
    if isinstance(gran, PerHead):
        return x.reshape(b * h * s, 1, d)
    if isinstance(gran, PerChannel):
        return x.permute(0, 1, 3, 2).reshape(b * h * d, 1, s)
    if isinstance(gran, PerTensor):
        return x.reshape(b, 1, h * s * d)
    raise TypeError(f"unsupported KV-cache granularity {gran!r}")


def kv_ungroup(xg: torch.Tensor, gran: Granularity, shape: torch.Size) -> torch.Tensor:
    """Inverse of :func:`kv_group_view`."""
    b, h, s, d = shape
    if isinstance(gran, PerToken):
        return xg.reshape(b, s, h, d).permute(0, 2, 1, 3)
    if isinstance(gran, PerHead):
        return xg.reshape(b, h, s, d)
    if isinstance(gran, PerChannel):
        return xg.reshape(b, h, d, s).permute(0, 1, 3, 2)
    return xg.reshape(b, h, s, d)


def _broadcast_static(t: torch.Tensor | None, gran: Granularity, b: int) -> torch.Tensor | None:
    """A static scale/zero (``[]`` per tensor, ``[h, d]`` per channel) as ``[rows, 1, 1]``."""
    if t is None:
        return None
    if isinstance(gran, PerTensor):
        return t.reshape(1, 1, 1).expand(b, 1, 1)
    return t.reshape(1, -1).expand(b, -1).reshape(-1, 1, 1)


def fake_quant_kv(x: torch.Tensor, spec: KVQuantSpec, gran: Granularity,
                  scale: torch.Tensor | None = None,
                  zero: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize-dequantize ``x`` (``[b, h, s, d]``) on ``spec``'s grid, one scale per row of
    ``gran``; ``scale``/``zero`` given: the static grid (:func:`static_qparams`), else the
    range of ``x`` itself. Returns ``x``'s dtype."""
    if x.numel() == 0:
        return x
    xg = kv_group_view(x.float(), gran)
    if scale is None:
        s, z = kv_qparams(xg, spec)
    else:
        s = _broadcast_static(scale.float().to(x.device), gran, x.shape[0])
        z = _broadcast_static(None if zero is None else zero.float().to(x.device), gran,
                              x.shape[0])
    q = quantize_to_grid(xg, s, z, spec)
    return kv_ungroup(dequantize_grouped(q, s, z), gran, x.shape).to(x.dtype)


def kv_step(x: torch.Tensor, spec: KVQuantSpec, gran: Granularity) -> torch.Tensor:
    """The grid step (dynamic integer grids) of each element of ``x``, shaped as ``x``: what
    an element's quantization error is bounded by (half of it) when the grid is min-max."""
    xg = kv_group_view(x.float(), gran)
    s, _ = kv_qparams(xg, spec)
    return kv_ungroup(s.expand_as(xg), gran, x.shape)


def fake_quant_key_groups(x: torch.Tensor, spec: KVQuantSpec, group: int) -> torch.Tensor:
    """KIVI's keys: per channel over each run of ``group`` consecutive tokens (``x``'s token
    count a multiple of ``group``)."""
    b, h, s, d = x.shape
    if s == 0:
        return x
    if s % group:
        raise ValueError(f"{s} tokens are not whole groups of {group}")
    n = s // group
    xs = x.reshape(b, h, n, group, d).permute(0, 2, 1, 3, 4).reshape(b * n, h, group, d)
    out = fake_quant_kv(xs, spec, PerChannel())
    return out.reshape(b, n, h, group, d).permute(0, 2, 1, 3, 4).reshape(b, h, s, d)


def kivi_split(length: int, residual: int) -> tuple[int, int]:
    """``(keys quantized, values quantized)``: how many leading tokens of a sequence of
    ``length`` KIVI holds quantized. Keys: whole windows of ``residual`` tokens (the last
    ``length mod residual`` stay in float); values: all but the last ``residual``."""
    return (length // residual) * residual, max(0, length - residual)


class RangeObserver:
    """Running min and max of keys or values for a static grid: one per tensor (``[]``) or
    per head channel (``[h, d]``), over every batch, head and token observed."""

    def __init__(self, gran: Granularity) -> None:
        if not isinstance(gran, (PerTensor, PerChannel)):
            raise ValueError(f"a static KV grid is per_tensor or per_channel, not {gran}")
        self.gran = gran
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None

    def observe(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        if isinstance(self.gran, PerTensor):
            lo, hi = x.amin(), x.amax()
        else:
            lo, hi = x.amin(dim=(0, 2)), x.amax(dim=(0, 2))
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)


def static_qparams(obs: RangeObserver, spec: KVQuantSpec
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and zero point) of the static grid from an observer's range: ``[]`` per tensor,
    ``[h, d]`` per channel (the min-max grid of the observed extremes)."""
    if obs.lo is None or obs.hi is None:
        raise ValueError("the observer has seen no data")
    shape = obs.lo.shape
    pair = torch.stack([obs.lo.reshape(-1), obs.hi.reshape(-1)], dim=-1).unsqueeze(1)
    s, z = kv_qparams(pair, spec)
    return s.reshape(shape), None if z is None else z.reshape(shape)
