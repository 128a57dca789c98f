"""Test-only mixed-precision quantizer (until SliM-LLM lands): records whose groups carry
their own bit widths, on real weights, so the mixpack round trips see what SliM-LLM makes.

Loaded by the tests and by bench/mixpack_size.py as module :data:`MODULE`, registered in
``sys.modules`` so the algorithm's ``impl`` string imports (test modules cannot import each
other under ``--import-mode=importlib``). Not a test module itself.

Allocation (``mixed_rtn``): per linear, the quarter of groups with the largest round-to-
nearest error at ``N`` bits get ``N + 1`` bits and the quarter with the smallest get
``N - 1``, so the mean is exactly ``N``; each group is then rounded to nearest on a min-max
grid of its own width.
"""

from __future__ import annotations

from typing import Any

import torch
from llmcq.algorithm import Algorithm
from llmcq.api import AlgorithmSpec, StepSettings
from llmcq.capabilities import Feature
from llmcq.quant.qparams import QParams, group_view, ungroup
from llmcq.quant.record import QuantizedLinear, make_record
from llmcq.quant.spec import WeightQuantSpec

MODULE = "llmcq_mixpack_test_mixed_bits"
NAME = "mixed_rtn"


def grid_codes(wg: torch.Tensor, bits: torch.Tensor, symmetric: bool
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest codes of groups ``wg`` ``[R, G, g]`` on min-max grids of per-group
    widths ``bits`` ``[R, G]`` (llmc's conventions): ``(codes, scale, zero)``."""
    b = bits.unsqueeze(-1).to(torch.float32)
    wg = wg.float()
    if symmetric:
        qmax = 2 ** (b - 1) - 1
        scale = (wg.abs().amax(-1, keepdim=True) / qmax).clamp(min=1e-8)
        q = torch.maximum(torch.minimum(torch.round(wg / scale), qmax), -qmax - 1)
        return q, scale.squeeze(-1), None
    qmax = 2**b - 1
    hi, lo = wg.amax(-1, keepdim=True), wg.amin(-1, keepdim=True)
    scale = ((hi - lo) / qmax).clamp(min=1e-8)
    zero = torch.minimum((-lo / scale).round(), qmax).clamp(min=0)
    q = torch.minimum(torch.round(wg / scale + zero), qmax).clamp(min=0)
    return q, scale.squeeze(-1), zero.squeeze(-1)


def mixed_record(w: torch.Tensor, spec: WeightQuantSpec, group_bits: torch.Tensor,
                 bias: torch.Tensor | None = None) -> QuantizedLinear:
    """The record of ``w`` with each group on a grid of its own width."""
    wg = group_view(w, spec.granularity)
    q, scale, zero = grid_codes(wg, group_bits, spec.symmetric)
    return make_record(ungroup(q, w.shape), QParams(scale, zero), spec, bias=bias,
                       group_bits=group_bits.to(torch.int64))


def allocate(w: torch.Tensor, spec: WeightQuantSpec) -> torch.Tensor:
    """Per-group widths ``[R, G]`` with mean exactly ``spec.bits`` (see the module doc)."""
    wg = group_view(w, spec.granularity)
    n = torch.full(wg.shape[:2], spec.bits)
    q, scale, zero = grid_codes(wg, n, spec.symmetric)
    deq = (q - (0 if zero is None else zero.unsqueeze(-1))) * scale.unsqueeze(-1)
    err = (deq - wg.float()).pow(2).sum(-1).reshape(-1)
    k = err.numel() // 4
    order = torch.argsort(err, stable=True)
    bits = n.reshape(-1).clone()
    bits[order[err.numel() - k:]] += 1
    bits[order[:k]] -= 1
    return bits.reshape(n.shape)


class MixedRTN(Algorithm):
    """``quant.method: mixed_rtn``: :func:`allocate` then :func:`mixed_record`."""

    def quantize(self, block: Any, inputs: Any) -> dict[str, QuantizedLinear]:
        out = {}
        with torch.no_grad():
            for name, lin in block.linears().items():
                w = lin.weight.data.float()
                out[name] = mixed_record(w, self.weight, allocate(w, self.weight),
                                         bias=lin.bias)
        return out


class MixedRTNSpec(AlgorithmSpec):
    def produces(self, step: StepSettings) -> list[Feature]:
        return [Feature("group_bits", step.method_path, NAME, source=NAME,
                        hint="use a uniform-grid algorithm")]


SPEC = MixedRTNSpec(name=NAME, impl=f"{MODULE}:MixedRTN",
                    summary="test-only: RTN with per-group widths N-1/N/N+1, mean N")
