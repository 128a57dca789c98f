"""SmoothQuant's plumbing: measure each smoothable group's input, fold the scales.

Per block: ``calibrate`` runs the block once over the calibration batches and keeps a
running ``max|X_j|`` (:class:`llmcq.stats.ChannelAbsMax`, max-reduced over the ranks under
``torchrun``: every rank gets one process's statistic exactly, hence the same scales) for
the input of every group whose producer is a norm (llmc smooths
exactly those: ``input_layernorm -> q/k/v`` and ``post_attention_layernorm -> gate/up`` in
Llama; never ``v -> o`` nor ``up -> down``, as in the paper and llmc). ``transform``
computes the scales (:mod:`llmcq_smoothquant.solver`) and folds them with core's
:func:`~llmcq.transforms.scaling.fold_scale`: the norm's weight is divided by ``s``, the
group's weight columns multiplied by ``s``. Quantization is left to the run's quantizer
(core's round-to-nearest, or a later recipe step such as GPTQ).

With ``true_sequential`` every group after the first is measured again with the groups
before it fake-quantized (round-to-nearest weights and the run's activation quantizer;
static activation settings are applied as dynamic per-tensor ones there), as llmc does;
those measurements are max-reduced over the ranks too.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from llmcq.algorithm import Algorithm
from llmcq.errors import PluginError
from llmcq.model.adapter import ResolvedGroup
from llmcq.pipeline.blockwise import Block, BlockInputs
from llmcq.quant.fake import fake_quantized
from llmcq.quant.record import QuantizedLinear
from llmcq.quant.rtn import rtn_records
from llmcq.transforms.scaling import fold_scale

from llmcq_smoothquant.solver import ChannelAbsMax, smooth_scales, weight_absmax

__all__ = ["SmoothQuant", "smoothable_groups"]


def smoothable_groups(block: Block) -> list[int]:
    """Indices of the groups fed by a norm (the only ones SmoothQuant scales)."""
    return [k for k, g in enumerate(block.groups)
            if g.prev_op is not None and g.spec.prev_kind == "norm"]


def _first_linear(group: ResolvedGroup) -> torch.nn.Linear:
    return next(iter(group.linears.values()))


class SmoothQuant(Algorithm):
    """Per-channel smoothing of norm -> linear groups (Eq. 4 of the paper)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._absmax: dict[int, torch.Tensor] = {}
        self._smoothed = 0
        self._scale_lo = float("inf")
        self._scale_hi = 0.0

    # -- statistics ------------------------------------------------------------------------

    def _observe(self, block: Block, inputs: BlockInputs, ks: list[int]) -> dict[int, torch.Tensor]:
        stats = {str(k): ChannelAbsMax() for k in ks}
        targets = {str(k): _first_linear(block.groups[k]) for k in ks}
        inputs.observe(block.module, targets, lambda name, x, _y: stats[name].update(x))
        out = {}
        for k in ks:  # the same groups in the same order on every rank
            stat = stats[str(k)]
            if stat.count == 0:
                raise PluginError(f"{block.full_name(_name(block.groups[k]))} never ran on the "
                                  "calibration batches", stage="calibrate", where=block.name)
            out[k] = stat.reduce().value  # max over every rank's tokens (torchrun)
        return out

    def _earlier_fake_quant(self, block: Block, k: int) -> dict[str, QuantizedLinear]:
        """Round-to-nearest records of every linear in the groups before ``k``, each on its
        own grids (linears kept in float stay float)."""
        assert self.weight is not None
        linears: dict[str, torch.nn.Linear] = {}
        for g in block.groups[:k]:
            linears.update(g.linears)
        records = rtn_records(linears, {n: self.weight_of(block, n) for n in linears})
        for name, rec in records.items():
            act = self.act_of(block, name)
            rec.act = None if act is None else replace(act, static=False)
        return records

    # -- stages ----------------------------------------------------------------------------

    def calibrate(self, block: Block, inputs: BlockInputs | None) -> None:
        inputs = _need(inputs, block)
        ks = smoothable_groups(block)
        if self.special.true_sequential:
            ks = ks[:1]  # the others are measured in transform, after their predecessors
        self._absmax = self._observe(block, inputs, ks) if ks else {}

    def transform(self, block: Block, inputs: BlockInputs | None) -> None:
        inputs = _need(inputs, block)
        alpha = float(self.special.alpha)
        for k in smoothable_groups(block):
            if all(self.weight_of(block, n) is None for n in block.groups[k].linears):
                self._absmax.pop(k, None)  # kept in float: nothing to smooth for
                continue
            if k not in self._absmax:  # true_sequential: measure after the earlier groups
                with fake_quantized(block.module, self._earlier_fake_quant(block, k)):
                    self._absmax.update(self._observe(block, inputs, [k]))
            group = block.groups[k]
            w_max = weight_absmax([lin.weight for lin in group.linears.values()])
            s = smooth_scales(self._absmax[k], w_max, alpha)
            fold_scale(group, s)
            self._smoothed += 1
            self._scale_lo = min(self._scale_lo, float(s.min()))
            self._scale_hi = max(self._scale_hi, float(s.max()))
        self._absmax = {}

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"alpha": float(self.special.alpha), "smoothed_groups":
                               self._smoothed}
        if self._smoothed:
            out["scale_range"] = [self._scale_lo, self._scale_hi]
        return out


def _name(group: ResolvedGroup) -> str:
    return next(iter(group.linears))


def _need(inputs: BlockInputs | None, block: Block) -> BlockInputs:
    if inputs is None:
        raise PluginError("SmoothQuant needs calibration data (calib section)",
                          stage="calibrate", where=block.name)
    return inputs
