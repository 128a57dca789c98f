"""Input-aware weight clipping search (AWQ's ``auto_clip``), shared by AWQ and OmniQuant.

For each group of a weight ``W`` (``[out, in]``) and calibration inputs ``X``
(``[tokens, in]``), find the clip range minimizing the group's output error

    E(r) = mean_t ( X_g W_g^T - X_g Q(clip(W_g, r))^T )^2

over shrink ratios ``r = 1 - i / grid`` for ``i < max_shrink * grid``. Symmetric clipping
shrinks ``[-max|w|, max|w|]``; asymmetric clipping shrinks ``[min w, max w]``. Each group's
partial output (its columns' share of ``X W^T``) is scored separately, as in AWQ. A partial
last group is padded with zero inputs, so padding contributes nothing to the error.
"""

from __future__ import annotations

import torch

from llmcq.quant.qparams import (
    dequantize_grouped,
    grid_qparams,
    group_view,
    minmax_qparams,
    quantize_grouped,
    quantize_to_grid,
)
from llmcq.quant.spec import PerGroup, WeightQuantSpec

__all__ = ["search_clip", "apply_clip"]


def _grouped_inputs(x: torch.Tensor, spec: WeightQuantSpec, in_features: int) -> torch.Tensor:
    """``[tokens, in]`` -> ``[tokens, G, g]`` with zero padding for a partial last group."""
    g = spec.granularity.size if isinstance(spec.granularity, PerGroup) else in_features
    pad = (-in_features) % g
    if pad:
        x = torch.cat([x, x.new_zeros(x.shape[0], pad)], dim=1)
    return x.reshape(x.shape[0], -1, g)


@torch.no_grad()
def search_clip(w: torch.Tensor, x: torch.Tensor, spec: WeightQuantSpec, *, grid: int = 20,
                max_shrink: float = 0.5, n_tokens: int = 512, symmetric_clip: bool = True,
                rows_per_chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group clip bounds ``(lo, hi)``, each ``[out, G]``, minimizing the output error."""
    out_f, in_f = w.shape
    x = x.reshape(-1, in_f).float()
    if x.shape[0] > n_tokens:
        x = x[:: max(1, x.shape[0] // n_tokens)][:n_tokens]
    xg = _grouped_inputs(x, spec, in_f)  # [T, G, g]
    wg_all = group_view(w.float(), spec.granularity if isinstance(spec.granularity, PerGroup)
                        else PerGroup(in_f))  # [out, G, g]
    los, his = [], []
    for start in range(0, out_f, rows_per_chunk):
        wg = wg_all[start:start + rows_per_chunk]  # [o, G, g]
        ref = torch.einsum("tGg,oGg->oGt", xg, wg)
        hi0 = wg.amax(-1, keepdim=True)
        lo0 = wg.amin(-1, keepdim=True)
        if symmetric_clip:
            hi0 = torch.maximum(hi0.abs(), lo0.abs())
            lo0 = -hi0
        best_err = torch.full(hi0.shape, float("inf"), device=w.device)
        best_hi, best_lo = hi0.clone(), lo0.clone()
        for i in range(int(max_shrink * grid)):
            r = 1 - i / grid
            hi, lo = hi0 * r, lo0 * r
            cw = torch.clamp(wg, lo, hi)
            if spec.is_float:  # FP8 grid: max|w| / 448, nearest E4M3 value
                scale, zero = grid_qparams(cw, spec)
                q = quantize_to_grid(cw, scale, zero, spec)
            else:
                scale, zero = minmax_qparams(cw, spec.bits, spec.symmetric,
                                             round_zp=spec.round_zp, full_range=spec.full_range)
                q = quantize_grouped(cw, scale, zero, spec.bits, spec.symmetric)
            out = torch.einsum("tGg,oGg->oGt", xg, dequantize_grouped(q, scale, zero))
            err = (out - ref).pow(2).mean(-1, keepdim=True)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_hi = torch.where(better, hi, best_hi)
            best_lo = torch.where(better, lo, best_lo)
        los.append(best_lo.squeeze(-1))
        his.append(best_hi.squeeze(-1))
    return torch.cat(los), torch.cat(his)


@torch.no_grad()
def apply_clip(w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
               spec: WeightQuantSpec) -> torch.Tensor:
    """``w`` clamped group-wise to ``[lo, hi]`` (shapes ``[out, G]``), same shape and dtype."""
    gran = spec.granularity if isinstance(spec.granularity, PerGroup) else PerGroup(w.shape[1])
    wg = group_view(w.float(), gran)
    clipped = torch.clamp(wg, lo.unsqueeze(-1).float(), hi.unsqueeze(-1).float())
    return clipped.reshape(w.shape[0], -1)[:, : w.shape[1]].to(w.dtype)
