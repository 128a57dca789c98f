"""Per-linear and per-block relative output error on the calibration data, recorded while the
block loop runs (results.json ``calibration_error``).

For a block with records, on each calibration batch of its inputs (the float stream of the
block loop; the quantized one with ``quant.quant_out``):

* each quantized linear: ``‖ŷ − y‖ / ‖y‖`` over all tokens, ``y`` the float (transformed)
  linear's output and ``ŷ`` the fake-quantized linear's (:class:`FakeQuantLinear`, its input
  transform and activation quantization included) on the same input;
* the block: ``‖B̂(h) − B(h)‖ / ‖B(h)‖`` with every recorded linear of the block
  fake-quantized at once.

Norms are Frobenius over every calibration token; the costs are two block forwards per batch.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from llmcq.pipeline.blockwise import BlockInputs, block_output
from llmcq.quant.fake import FakeQuantLinear, set_module
from llmcq.quant.record import QuantizedLinear

__all__ = ["block_errors"]


@torch.no_grad()
def block_errors(module: nn.Module, inputs: BlockInputs, records: dict[str, QuantizedLinear]
                 ) -> tuple[float, dict[str, float]]:
    """``(block relative error, {linear: relative error})`` of one block (names relative to
    the block, as in ``records``)."""
    fq: dict[str, nn.Module] = {}
    for name, rec in records.items():
        old = module.get_submodule(name)
        fq[name] = FakeQuantLinear.from_record(rec, dtype=old.weight.dtype,
                                               device=old.weight.device)
    err = {n: [0.0, 0.0] for n in records}

    def hook(name: str) -> Any:
        def fn(_m: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
            y = out.float()
            d = fq[name](args[0]).float() - y
            err[name][0] += float(d.square().sum())
            err[name][1] += float(y.square().sum())
        return fn

    handles = [module.get_submodule(n).register_forward_hook(hook(n)) for n in records]
    num = den = 0.0
    try:
        for h, kw in inputs.batches():
            y = block_output(module(h, **kw)).float()
            for h_ in handles:
                h_.remove()
            handles = []
            old = {n: set_module(module, n, m) for n, m in fq.items()}
            try:
                yq = block_output(module(h, **kw)).float()
            finally:
                for n, m in old.items():
                    set_module(module, n, m)
            num += float((yq - y).square().sum())
            den += float(y.square().sum())
            handles = [module.get_submodule(n).register_forward_hook(hook(n)) for n in records]
    finally:
        for h_ in handles:
            h_.remove()
    linear = {n: math.sqrt(a / b) if b > 0 else float("nan") for n, (a, b) in err.items()}
    return (math.sqrt(num / den) if den > 0 else float("nan")), linear
