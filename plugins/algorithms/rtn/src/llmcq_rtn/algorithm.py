"""RTN: ``W_hat = s * (clamp(round(W / s) + z, qmin, qmax) - z)`` per group, nothing else."""

from __future__ import annotations

from llmcq.algorithm import Algorithm
from llmcq.pipeline.blockwise import Block, BlockInputs
from llmcq.quant.record import QuantizedLinear
from llmcq.quant.rtn import rtn_records

__all__ = ["RTN"]


class RTN(Algorithm):
    """Quantize every linear of the block independently, each on its own grid; no
    calibration of the weights."""

    def quantize(self, block: Block, inputs: BlockInputs | None) -> dict[str, QuantizedLinear]:
        assert self.weight is not None
        return rtn_records(block.linears(), self.weights_of(block))
