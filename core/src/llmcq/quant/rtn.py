"""Round-to-nearest: the baseline every other algorithm is measured against, and the
quantizer core falls back to when no recipe step quantizes (e.g. SmoothQuant alone)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from llmcq.quant.qparams import QParams, quantize_weight
from llmcq.quant.record import QuantizedLinear, make_record
from llmcq.quant.spec import WeightQuantSpec

__all__ = ["rtn_record", "rtn_records", "QParamsFn"]


#: ``qparams(name, weight) -> QParams``: a grid chosen by the caller for one linear
QParamsFn = Callable[[str, torch.Tensor], QParams]


@torch.no_grad()
def rtn_record(linear: nn.Linear, spec: WeightQuantSpec,
               qparams: QParams | None = None) -> QuantizedLinear:
    """Quantize one linear's weight to the nearest point of its grid: ``qparams`` when
    given, else the spec's own range (min-max or mse)."""
    q, qp = quantize_weight(linear.weight.data, spec, qparams)
    return make_record(q, qp, spec, bias=linear.bias)


def rtn_records(linears: dict[str, nn.Linear],
                spec: WeightQuantSpec | Mapping[str, WeightQuantSpec | None], *,
                qparams: QParamsFn | None = None) -> dict[str, QuantizedLinear]:
    """One record per linear, rounding to nearest on ``spec``'s grid, or on the grid
    ``qparams(name, weight)`` returns (an algorithm that only chooses scales and zeros
    needs nothing else). ``spec`` may map each linear to its own grid (per-linear
    settings: ``Algorithm.weights_of(block)``); a linear mapped to None gets no record."""
    specs = spec if isinstance(spec, Mapping) else {name: spec for name in linears}
    return {name: rtn_record(lin, s, None if qparams is None
                             else qparams(name, lin.weight.data))
            for name, lin in linears.items() if (s := specs[name]) is not None}
