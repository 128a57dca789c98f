"""ShortGPT driver: Block Influence per block before the block loop, then the blocks of
lowest influence are removed (core deletes them and renumbers the model)."""

from __future__ import annotations

from typing import Any

import torch

from llmcq import dist
from llmcq.algorithm import Algorithm
from llmcq.errors import ConfigError
from llmcq.pipeline.blockwise import Block, BlockInputs
from llmcq_shortgpt import KEY
from llmcq_shortgpt.solver import influence_sum, lowest

__all__ = ["ShortGPT"]


class ShortGPT(Algorithm):
    """Running sums of ``1 - cos`` per block (float64), reduced over ranks at the end."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        assert self.sparsity is not None and self.sparsity.n_prune_layers is not None
        self.n = int(self.sparsity.n_prune_layers)
        depth = len(self.run.adapter.blocks(self.run.model))
        if self.n >= depth:
            raise ConfigError(KEY, self.n, allowed=f"1 to {depth - 1}",
                              reason=f"the model has {depth} blocks")
        self.sums = torch.zeros(depth, dtype=torch.float64)
        self.tokens = torch.zeros(depth, dtype=torch.float64)
        self.influence: list[float] = []
        self.removed: list[int] = []

    def observe_block(self, block: Block, inputs: BlockInputs,
                      outputs: list[torch.Tensor]) -> None:
        for h, out in zip(inputs.hidden, outputs, strict=True):
            s, n = influence_sum(h, out)
            self.sums[block.index] += s
            self.tokens[block.index] += n

    def remove_blocks(self) -> list[int]:
        device = self.run.device
        sums, tokens = self.sums.to(device), self.tokens.to(device)
        dist.all_reduce_sum(sums)
        dist.all_reduce_sum(tokens)
        if not bool((tokens > 0).all()):
            raise RuntimeError("some block saw no calibration token")
        self.influence = (sums / tokens).cpu().tolist()
        self.removed = lowest(self.influence, self.n)
        return self.removed

    def summary(self) -> dict[str, Any]:
        return {"block_influence": [round(v, 8) for v in self.influence],
                "removed_blocks": self.removed}
