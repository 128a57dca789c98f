"""Wanda's plumbing: per-input-channel sums of squares from the block's calibration inputs
(one forward pass, running sums), then one mask per linear."""

from __future__ import annotations

from typing import Any

import torch

from llmcq.algorithm import Algorithm
from llmcq.errors import DataError
from llmcq.pipeline.blockwise import Block, BlockInputs
from llmcq.stats import SumObserver

from llmcq_wanda.solver import wanda_mask

__all__ = ["Wanda"]


class Wanda(Algorithm):
    """``calibrate`` accumulates ``sum_t x_tj^2`` at every linear's input; ``prune`` keeps
    the weights of highest ``|W_ij| * ||X_j||`` under the run's sparsity spec."""

    def __init__(self, *, run: Any, step: Any) -> None:
        super().__init__(run=run, step=step)
        self._norms: dict[str, SumObserver] = {}
        self._block: int | None = None
        self._tokens = 0

    def calibrate(self, block: Block, inputs: BlockInputs | None) -> None:
        if inputs is None:
            raise DataError(f"Wanda needs calibration inputs ({block.name}); add a calib "
                            "section")
        targets = dict(block.linears())
        obs = {n: SumObserver() for n in targets}

        def fold(name: str, x: torch.Tensor, _y: Any) -> None:
            x = x.detach().reshape(-1, x.shape[-1])
            obs[name].update(x.double().square().sum(0), rows=int(x.shape[0]))

        inputs.observe(block.module, targets, fold, stop_early=True)
        for n, o in obs.items():  # every rank reduces every linear, in the same order
            if o.total is None:
                o.update(torch.zeros(targets[n].weight.shape[1]), rows=0)
            o.reduce()
        # a linear no calibration token reached (an MoE expert) is left unpruned
        self._norms = {n: o for n, o in obs.items() if o.count > 0}
        self._block = block.index

    def prune(self, block: Block, inputs: BlockInputs | None) -> dict[str, torch.Tensor]:
        assert self.sparsity is not None
        if self._block != block.index:
            self.calibrate(block, inputs)
        masks = {}
        for name, lin in block.linears().items():
            o = self._norms.get(name)
            if o is None:
                continue
            self._tokens = max(self._tokens, o.count)
            masks[name] = wanda_mask(lin.weight, o.value.to(lin.weight.device), self.sparsity)
        self._norms, self._block = {}, None
        return masks

    def summary(self) -> dict[str, Any]:
        return {"calibration_tokens": self._tokens}
