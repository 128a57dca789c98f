"""HQQ driver: each linear of a block quantized by :func:`llmcq_hqq.solver.hqq_quantize`.

Data-free: no calibration, no transform; ``quantize`` only, so HQQ can follow a transforming
step in a recipe (``[awq, hqq]``: AWQ scales the block, HQQ quantizes it). Records carry the
min-max scales and HQQ's fractional zero points (``QuantizedLinear.zero_is_integral`` is
False); activation settings, if any, are attached by core.
"""

from __future__ import annotations

from typing import Any

import torch

from llmcq.algorithm import Algorithm
from llmcq.pipeline.blockwise import Block, BlockInputs
from llmcq.quant.qparams import QParams
from llmcq.quant.record import QuantizedLinear, make_record

from llmcq_hqq import HQQSpecial
from llmcq_hqq.solver import hqq_quantize

__all__ = ["HQQ"]


class HQQ(Algorithm):
    """Half-quadratic zero points per group, min-max scales; see ``solver.py``."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._layers = 0
        self._err = 0.0
        self._err_init = 0.0
        self._rounds = 0.0

    @torch.no_grad()
    def quantize(self, block: Block, inputs: BlockInputs | None) -> dict[str, QuantizedLinear]:
        assert self.weight is not None
        sp = self.special
        assert isinstance(sp, HQQSpecial)
        out: dict[str, QuantizedLinear] = {}
        for name, lin in self.quantized_linears(block).items():
            spec = self.weight_of(block, name)  # each linear's own grid (quant.mix_bits)
            assert spec is not None
            res = hqq_quantize(lin.weight.data, spec.bits, spec.granularity,
                               lp_norm=sp.lp_norm, beta=sp.beta, kappa=sp.kappa,
                               iters=sp.iters, early_stop=sp.early_stop)
            out[name] = make_record(res.q, QParams(res.scale, res.zero), spec, bias=lin.bias)
            stats = torch.stack([res.error.mean(), res.error_init.mean(),
                                 res.step.float().mean()]).tolist()
            self._layers += 1
            self._err += stats[0]
            self._err_init += stats[1]
            self._rounds += stats[2]
        return out

    def summary(self) -> dict[str, Any]:
        """Mean absolute weight error before/after the zero-point fit, over the layers."""
        if not self._layers:
            return {}
        n = self._layers
        return {"hqq": {"layers": n, "mean_abs_error_minmax": self._err_init / n,
                        "mean_abs_error": self._err / n,
                        "mean_rounds_kept": self._rounds / n}}
