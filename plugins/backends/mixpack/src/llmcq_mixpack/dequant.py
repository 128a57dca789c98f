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
from llmcq_mixpack.packing import split, unpack_codes

__all__ = ["dequantize"]


def dequantize(p: PackedLinear, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight ``[out, in]`` (model column order) of a packed linear:
    ``(u - c) * scale`` per group, ``u`` the stored unsigned code and ``c`` the zero point
    (asymmetric) or ``2^(b-1)`` (symmetric, ``b`` the group's width)."""
    rows, n_in, gw = p.out_features, p.in_features, p.group_width
    full, _ = split(n_in, gw)
    bit_map = p.bit_map()
    w = unpack_codes(p.streams, bit_map, (rows, n_in), gw).float()  # u, then w in place
    if p.symmetric:
        centre = (torch.ones_like(bit_map, dtype=torch.int32) << (bit_map.int() - 1)).float()
    else:
        assert p.zero is not None
        centre = p.zero.float()
    centre = centre.expand(rows, -1)  # per tensor: one [1, 1] grid for every row
    scale = p.scale.float().expand(rows, -1)
    # (u - c) * scale, on views of the full groups and of the partial one
    w[:, :full * gw].view(rows, full, gw).sub_(centre[:, :full, None]).mul_(
        scale[:, :full, None])
    w[:, full * gw:].sub_(centre[:, full:]).mul_(scale[:, full:])
    if p.col_perm is not None:  # stored column k is model column col_perm[k]
        w = torch.empty_like(w).index_copy_(1, p.col_perm.long(), w)
    if p.float_cols is not None:
        assert p.float_vals is not None
        w[:, p.float_cols.long()] = p.float_vals.float()
    return w.to(dtype)
