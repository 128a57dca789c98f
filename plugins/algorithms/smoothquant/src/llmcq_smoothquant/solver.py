"""SmoothQuant's maths (Xiao et al. 2022, arXiv:2211.10438, Section 4, Eq. 4).

For a linear ``Y = X W^T`` with ``X`` ``[tokens, C_in]`` and ``W`` ``[C_out, C_in]``, a
per-input-channel scale ``s`` gives the same product ``Y = (X diag(s)^-1) (W diag(s))^T``.
Eq. 4 picks

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

so that after smoothing ``max|X_j / s_j| = max|X_j|^(1-alpha) max|W_j|^(1-alpha)`` and
``max|W_j s_j| = max|X_j|^alpha max|W_j|^alpha``: with ``alpha = 0.5`` both ranges equal
``sqrt(max|X_j| max|W_j|)``. ``max|X_j|`` is over every calibration token (core's
:class:`llmcq.stats.ChannelAbsMax`, re-exported here: under ``torchrun`` its ``reduce()``
takes the maximum over every rank's tokens, so the scales are exactly one process's);
``max|W_j|`` is over the output rows of every linear reading ``X`` (q, k and v share one
scale). As in the reference implementation, ``max|W_j|`` and ``s`` are clamped below at
``1e-5``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from llmcq.stats import ChannelAbsMax

__all__ = ["ChannelAbsMax", "weight_absmax", "smooth_scales", "CLAMP"]

#: lower clamp of ``max|W_j|`` and of ``s`` (the reference implementation's)
CLAMP = 1e-5


@torch.no_grad()
def weight_absmax(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """``max|W_j|`` per input column over the rows of every weight, clamped at ``CLAMP``."""
    if not weights:
        raise ValueError("weight_absmax needs at least one weight")
    cols = {int(w.shape[1]) for w in weights}
    if len(cols) != 1:
        raise ValueError(f"weights read inputs of different widths: {sorted(cols)}")
    per = torch.stack([w.detach().abs().amax(dim=0).float() for w in weights])
    return per.amax(dim=0).clamp(min=CLAMP)


@torch.no_grad()
def smooth_scales(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """Eq. 4: ``s = max|X|^alpha / max|W|^(1 - alpha)``, clamped at ``CLAMP``."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    if x_absmax.shape != w_absmax.shape:
        raise ValueError(f"activation stats {tuple(x_absmax.shape)} and weight stats "
                         f"{tuple(w_absmax.shape)} differ")
    x = x_absmax.float().to(w_absmax.device)
    return (x.pow(alpha) / w_absmax.float().pow(1.0 - alpha)).clamp(min=CLAMP)
