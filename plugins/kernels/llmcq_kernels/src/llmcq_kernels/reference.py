"""The pure-torch path of the op: ``y = x @ W_hat^T + bias`` with ``W_hat`` mixpack's own
dequantization (``llmcq_mixpack.dequant.dequantize``: float32, cast to the activation
dtype), so on the CPU a :class:`~llmcq_kernels.module.KernelLinear` computes exactly what
``MixPackLinear`` (and the fake-quant model) computes."""

from __future__ import annotations

import torch
from llmcq_mixpack.dequant import dequantize
from llmcq_mixpack.layout import PackedLinear
from torch.nn import functional as F

__all__ = ["reference_linear"]


def reference_linear(x: torch.Tensor, packed: PackedLinear,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, dequantize(packed, x.dtype), bias)
