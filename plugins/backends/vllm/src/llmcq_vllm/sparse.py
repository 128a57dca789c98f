"""Pruned weights in the dense compressed-tensors layouts.

compressed-tensors wrote sparse models with its sparsity compressors (``sparse-bitmask``,
``sparse-24-bitmask``, ``marlin-24``) and a ``sparsity_config``; those compressors were removed
from the library (vllm-project/compressed-tensors#610, in 0.15: the 0.19 and 0.20 releases hold
only the config classes), vLLM dropped its 2:4 kernels and raises ``NotImplementedError`` for
Sparse24 checkpoints (vllm-project/vllm#36799, v0.19.1) and transformers dropped
``sparsity_config`` handling (huggingface/transformers#46342). What current engines load is a
dense checkpoint, so a pruned model is written in the usual layouts with every pruned weight
stored as the code of exact zero: ``0`` on a symmetric grid, the zero point on an asymmetric
one (``(q - z) * s = 0``), ``0.0`` in FP8; a pruned model without quantization is the float
folder as it is. No ``sparsity_config`` is written: with a 2:4 structure it sends vLLM
releases that still parse it to the removed Sparse24 scheme.
"""

from __future__ import annotations

import torch

from llmcq.errors import PluginError
from llmcq.quant.record import QuantizedLinear
from llmcq.quant.spec import PerTensor

__all__ = ["zero_pruned_codes"]


def zero_pruned_codes(rec: QuantizedLinear, q: torch.Tensor, offset: int) -> torch.Tensor:
    """``q`` (signed codes ``[out, in]``, shifted by ``offset`` from the record's) with every
    pruned weight (``~rec.mask``) set to the code that dequantizes to exactly zero."""
    assert rec.mask is not None
    mask = rec.mask.to(q.device)
    if rec.zero is None:
        return torch.where(mask, q, torch.zeros_like(q))
    z = rec.zero.round().to(torch.int16) - offset
    if isinstance(rec.weight.granularity, PerTensor):
        z_full = z.reshape(1, 1).expand_as(q)
    else:
        z_full = z.reshape(z.shape[0], -1)[:, rec.column_groups().to(q.device)]
    lo, hi = -(2 ** (rec.bits - 1)), 2 ** (rec.bits - 1) - 1
    if bool(((z_full < lo) | (z_full > hi)).any()):
        raise PluginError("a zero point lies outside the code range, so a pruned weight has "
                          "no code of exact zero on this grid")
    return torch.where(mask, q, z_full.to(q.dtype))
