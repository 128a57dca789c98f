"""Magnitude pruning: score ``|W_ij|``, keep the highest under the run's sparsity spec."""

from __future__ import annotations

import torch

from llmcq.algorithm import Algorithm
from llmcq.pipeline.blockwise import Block, BlockInputs
from llmcq.sparsity.masks import mask_from_scores
from llmcq_magnitude import MagnitudeSpecial

__all__ = ["Magnitude"]


class Magnitude(Algorithm):
    """One mask per linear of the block, from ``|w|`` alone (no calibration data)."""

    special: MagnitudeSpecial

    def prune(self, block: Block, inputs: BlockInputs | None) -> dict[str, torch.Tensor]:
        assert self.sparsity is not None
        per_row = self.special.scope == "row"
        return {name: mask_from_scores(lin.weight.detach().abs(), self.sparsity,
                                       per_row=per_row)
                for name, lin in block.linears().items()}
