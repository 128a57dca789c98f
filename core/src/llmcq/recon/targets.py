"""Float targets of a block: what its quantized version is trained to reproduce.

Without ``quant_out`` the block's inputs are the float model's, and the target is the float
block's output on them. With ``quant_out`` the engine feeds each block the outputs of the
*quantized* blocks before it; the target stays the float model's output, so the float chain
(float blocks on float inputs) is carried beside the quantized one, one block at a time:

    block 0:  x_f = x_q = embeddings;   target_0 = B_0(x_f)
    block i:  x_f = target_{i-1};        target_i = B_i(x_f);   x_q from the engine

``aug_loss`` adds a second target, the float block on the quantized inputs, ``B_i(x_q)``
(the same tensor as ``target`` in block 0, or without ``quant_out``).

Targets are the float block's: when the engine kept ``block.float_params`` (the block
before the recipe's first quant step, for an algorithm with ``float_targets``) the float
block runs with those parameters, so an earlier step's in-place change
that is not function-preserving (AWQ's clipping) is not learned as the target. Otherwise
they are computed on the block as it is when called (before the calling step changes it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.func import functional_call

from llmcq.pipeline.blockwise import Block, BlockInputs, block_output

__all__ = ["Targets", "FloatChain"]


@dataclass
class Targets:
    """One tensor per calibration batch: ``target`` (float block outputs), ``aug`` (float
    block on the quantized inputs, or None), ``float_hidden`` (the float chain's inputs of
    this block, kept only when asked for)."""

    target: list[torch.Tensor]
    aug: list[torch.Tensor] | None = None
    float_hidden: list[torch.Tensor] | None = None


class FloatChain:
    """Carries the float chain from block to block (one instance per run, blocks in order).

    ``targets(block, inputs, quant_out=..., aug_loss=...)`` returns the block's targets and,
    under ``quant_out``, advances the chain to this block's float outputs. Memory: one copy
    of the calibration activations for the chain, plus one for ``aug``."""

    def __init__(self) -> None:
        self._hidden: list[torch.Tensor] | None = None

    def reset(self) -> None:
        self._hidden = None

    @torch.no_grad()
    def targets(self, block: Block, inputs: BlockInputs, *, quant_out: bool, aug_loss: bool,
                keep_inputs: bool = False) -> Targets:
        module, params = block.module, block.float_params

        def run(hidden: list[torch.Tensor]) -> list[torch.Tensor]:
            if params is None:
                return [block_output(module(h, **kw))
                        for h, kw in zip(hidden, inputs.kwargs, strict=True)]
            return [block_output(functional_call(module, params, (h,), kw))
                    for h, kw in zip(hidden, inputs.kwargs, strict=True)]

        if not quant_out:
            out = inputs.forward(module) if params is None else run(list(inputs.hidden))
            return Targets(out, out if aug_loss else None,
                           list(inputs.hidden) if keep_inputs else None)
        if block.index == 0 or self._hidden is None:
            self._hidden = list(inputs.hidden)
        float_in = self._hidden
        out = run(float_in)
        self._hidden = out
        aug = None
        if aug_loss:
            aug = out if block.index == 0 else run(list(inputs.hidden))
        return Targets(out, aug, float_in if keep_inputs else None)
