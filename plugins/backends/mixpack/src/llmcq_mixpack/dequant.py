"""Packed linear -> float weight, in pure torch: the one function a kernel replaces.

``MixPackLinear`` calls :func:`dequantize` on every forward. A CUDA kernel (the ABQ-LLM
issue) takes the same :class:`~llmcq_mixpack.layout.PackedLinear` and either returns this
weight faster or fuses it into the matmul; the tests compare against this function.

The arithmetic is :meth:`llmcq.quant.record.QuantizedLinear.dequantize`'s, in float32 and in
the same order, so the weight equals the fake-quant model's bit for bit.
"""

from __future__ import annotations

import torch

from llmcq_mixpack.layout import PackedLinear
from llmcq_mixpack.packing import unpack_codes

__all__ = ["dequantize"]


def dequantize(p: PackedLinear, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight ``[out, in]`` (model column order) of a packed linear."""
    widths = p.widths()
    q = unpack_codes(p.streams, widths)
    if p.symmetric:
        q = q - (torch.ones_like(widths) << (widths - 1))
    groups = p.col_groups()
    scale = p.scale[:, groups]  # [R, in]; R = 1 broadcasts over rows (per tensor)
    if p.zero is None:
        w = q.float() * scale
    else:
        w = (q.float() - p.zero.float()[:, groups]) * scale
    if p.col_perm is not None:  # stored column k is model column col_perm[k]
        w = torch.empty_like(w).index_copy_(1, p.col_perm.long(), w)
    if p.float_cols is not None:
        assert p.float_vals is not None
        w[:, p.float_cols.long()] = p.float_vals.float()
    return w.to(dtype)
