"""OS+'s plumbing: channel ranges, the threshold search on the inspected module, and the
exact absorption of shift and scale.

Per block, for every group whose producer is a norm (llmc transforms exactly those:
``input_layernorm -> q/k/v`` and ``post_attention_layernorm -> gate/up`` in Llama):

1. ``calibrate``: one pass over the calibration batches keeps each group input's running
   per-channel min/max (:class:`llmcq.stats.ChannelRange`), and the inputs of the first
   ``search_batches`` batches;
2. ``transform``: the shift ``z`` (only where the norm and every linear have a bias, see
   ``use_shift``), then the threshold search (:mod:`llmcq_osplus.solver`): each candidate
   scale is scored by running the group's ``inspect`` module (``ResolvedGroup.run_inspect``:
   the attention or the MLP) with the group's weights fake-quantized as ``Q(W diag(s))``
   (biases ``b + W z``) on the fake-quantized input ``Q((X - z) / s)``, against the float
   output; then ``z`` goes into the norm's and the linears' biases and ``s`` is folded with
   core's :func:`~llmcq.transforms.scaling.fold_scale`.

Quantization is left to the run's quantizer. Static activation settings are scored as
dynamic per-tensor ones (their calibrated scale is not known yet); without ``quant.act``
(weight-only) only the weights are fake-quantized in the score.

Data-parallel calibration (``torchrun``, rank ``r`` of ``w`` holding batches
``r, r + w, ...``, see :func:`llmcq.dist.shard`): the channel ranges are min/max-reduced
over the ranks, and "the first ``search_batches`` batches" are those of the whole
calibration set, as on one process: each rank scores the ones in its share (possibly none),
and the per-batch losses of every candidate are gathered and added in global batch order
(:func:`_sum_over_ranks`). Every rank then picks the threshold, shift and scale one process
picks, bit for bit (the per-batch losses are computed on the same inputs by the same code).
A rank-local reading of ``search_batches`` (each rank's own first batches) would score
``w`` times the tokens on different data than one process, and a process-count-dependent
choice is what data-parallel calibration must not make.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from llmcq import dist
from llmcq.algorithm import Algorithm
from llmcq.errors import ConfigError, PluginError
from llmcq.model.adapter import ResolvedGroup
from llmcq.pipeline.blockwise import Block, BlockInputs
from llmcq.quant.fake import fake_quantized
from llmcq.quant.qparams import fake_quantize_act, fake_quantize_weight
from llmcq.quant.record import QuantizedLinear
from llmcq.quant.rtn import rtn_records
from llmcq.transforms.scaling import fold_scale
from torch import nn

from llmcq_osplus.solver import (
    ChannelRange,
    batch_totals,
    channel_shift,
    output_error,
    search_threshold,
)

__all__ = ["OsPlus", "norm_fed_groups", "shift_blocker", "absorb_shift"]


def norm_fed_groups(block: Block) -> list[int]:
    """Indices of the groups fed by a norm (the only ones OS+ transforms, as in llmc)."""
    return [k for k, g in enumerate(block.groups)
            if g.prev_op is not None and g.spec.prev_kind == "norm"]


def shift_blocker(group: ResolvedGroup) -> str | None:
    """Why the shift cannot be absorbed exactly into ``group`` (None when it can)."""
    if not isinstance(getattr(group.prev_op, "bias", None), torch.Tensor):
        return f"the norm {group.spec.prev_op} has no bias"
    missing = [n for n, lin in group.linears.items() if lin.bias is None]
    if missing:
        return f"{', '.join(missing)} {'has' if len(missing) == 1 else 'have'} no bias"
    return None


@torch.no_grad()
def absorb_shift(group: ResolvedGroup, z: torch.Tensor) -> None:
    """The norm outputs ``y - z``; each linear adds ``W z`` to its bias (before scaling)."""
    norm_bias = group.prev_op.bias  # type: ignore[union-attr]
    norm_bias.data.sub_(z.to(norm_bias.dtype))
    for lin in group.linears.values():
        lin.bias.data.add_((lin.weight.data.float() @ z.float()).to(lin.bias.dtype))


def scored_here(search_batches: int, local_batches: int) -> int:
    """How many of this rank's batches (its first ones) are among the first
    ``search_batches`` calibration batches of the whole set: local batch ``i`` is global
    batch ``rank + i * world`` (:func:`llmcq.dist.shard`). All of ``min(search_batches,
    local_batches)`` on one process; may be 0 on a rank > 0."""
    r, w = dist.rank(), dist.world_size()
    return max(0, min(local_batches, -(-(search_batches - r) // w)))


def _sum_over_ranks(per_batch: torch.Tensor) -> torch.Tensor:
    """``[candidates, local scored batches]`` -> ``[candidates]``: every rank's per-batch
    losses, gathered, put in global batch order and added as one process adds its own
    (:func:`~llmcq_osplus.solver.batch_totals`); the same result on every rank. In one
    process: ``batch_totals(per_batch)``."""
    if not dist.active():
        return batch_totals(per_batch)
    rows = per_batch.T.contiguous()  # one row per scored batch of this rank
    r, w = dist.rank(), dist.world_size()
    index = torch.tensor([r + i * w for i in range(rows.shape[0])], dtype=torch.int64,
                         device=rows.device)
    rows, index = dist.all_gather_rows(rows), dist.all_gather_rows(index)
    return batch_totals(rows[torch.argsort(index)].T)


class _Observed:
    """One group's statistics: channel range over all batches, the first inputs kept."""

    def __init__(self, keep: int) -> None:
        self.range = ChannelRange()
        self.inputs: list[torch.Tensor] = []
        self.keep = keep

    def update(self, x: torch.Tensor) -> None:
        self.range.update(x)
        if len(self.inputs) < self.keep:
            self.inputs.append(x.detach())


class OsPlus(Algorithm):
    """Channel-wise shift and searched scale for norm -> linear groups."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._obs: dict[int, _Observed] = {}
        self._transformed = 0
        self._shifted = 0
        self._ratios: list[float] = []
        self._loss_ratios: list[float] = []

    # -- statistics ------------------------------------------------------------------------

    def _observe(self, block: Block, inputs: BlockInputs, ks: list[int]) -> dict[int, _Observed]:
        keep = scored_here(int(self.special.search_batches), len(inputs))
        obs = {str(k): _Observed(keep) for k in ks}
        targets = {str(k): next(iter(block.groups[k].linears.values())) for k in ks}
        inputs.observe(block.module, targets, lambda name, x, _y: obs[name].update(x))
        for k in ks:  # the same groups in the same order on every rank
            if obs[str(k)].range.count == 0:
                raise PluginError(f"the input of group {k} never ran on the calibration "
                                  "batches", stage="calibrate", where=block.name)
            obs[str(k)].range.reduce()  # min/max over every rank's tokens (torchrun)
        return {int(k): v for k, v in obs.items()}

    def _earlier_fake_quant(self, block: Block, k: int) -> dict[str, QuantizedLinear]:
        """Round-to-nearest records of the groups before ``k``, each linear on its own
        grids (linears kept in float stay float)."""
        assert self.weight is not None
        linears: dict[str, nn.Linear] = {}
        for g in block.groups[:k]:
            linears.update(g.linears)
        records = rtn_records(linears, {n: self.weight_of(block, n) for n in linears})
        for name, rec in records.items():
            rec.act = _dynamic(self.act_of(block, name))
        return records

    # -- the search ------------------------------------------------------------------------

    def _use_shift(self, block: Block, group: ResolvedGroup) -> bool:
        wanted = self.special.use_shift
        if wanted is False:
            return False
        blocker = shift_blocker(group)
        if blocker is None:
            return True
        if wanted:
            where = f"{block.name}: {blocker}"
            step = f".{self.step.name}" if len(getattr(self.run, "steps", [])) > 1 else ""
            raise ConfigError(f"quant.special{step}.use_shift", True, reason=(
                f"the shift cannot be absorbed exactly ({where}); llmc shifts only models "
                "with norm and linear biases (OPT, BLOOM). Leave use_shift unset or set "
                "it to false to scale only"))
        return False

    def _loss(self, block: Block, group: ResolvedGroup, xs: list[torch.Tensor],
              kwargs: list[dict[str, Any]],
              z: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor]:
        """``s -> [output_error(inspect(X_b), inspect_q(X_b; s)) for each scored batch b]``
        (empty on a rank that scores none of the first ``search_batches`` batches). Each
        linear on its own weight grid (float ones scaled only); the shared input quantized
        as the group's first quantized linear's (as llmc's search)."""
        assert self.weight is not None
        wspecs = [self.weight_of(block, n) for n in group.linears]
        first = next(n for n in group.linears if self.weight_of(block, n) is not None)
        act = _dynamic(self.act_of(block, first))
        lins = list(group.linears.values())
        w0 = [lin.weight.data for lin in lins]
        b0 = [None if lin.bias is None else lin.bias.data for lin in lins]
        refs = [group.run_inspect(x, kw) for x, kw in zip(xs, kwargs, strict=True)]
        if z is not None:
            b_shift = [b + (w.float() @ z).to(b.dtype) for w, b in zip(w0, b0, strict=True)]  # type: ignore[operator]
            xs = [x - z.to(x.dtype) for x in xs]

        def loss(s: torch.Tensor) -> torch.Tensor:
            if not xs:
                return torch.zeros(0, device=s.device)
            try:
                for i, lin in enumerate(lins):
                    scaled = (w0[i].float() * s.view(1, -1)).to(w0[i].dtype)
                    lin.weight.data = scaled if wspecs[i] is None else \
                        fake_quantize_weight(scaled, wspecs[i])
                    if z is not None:
                        lin.bias.data = b_shift[i]
                errs = []
                for x, ref, kw in zip(xs, refs, kwargs, strict=True):
                    xin = x / s.to(x.dtype)
                    if act is not None:
                        xin = fake_quantize_act(xin, act)
                    errs.append(output_error(ref, group.run_inspect(xin, kw)))
                return torch.stack(errs)
            finally:
                for i, lin in enumerate(lins):
                    lin.weight.data = w0[i]
                    if b0[i] is not None:
                        lin.bias.data = b0[i]

        return loss

    # -- stages ----------------------------------------------------------------------------

    def calibrate(self, block: Block, inputs: BlockInputs | None) -> None:
        inputs = _need(inputs, block)
        ks = norm_fed_groups(block)
        if self.special.true_sequential:
            ks = ks[:1]  # the others are measured in transform, after their predecessors
        self._obs = self._observe(block, inputs, ks) if ks else {}

    @torch.no_grad()
    def transform(self, block: Block, inputs: BlockInputs | None) -> None:
        inputs = _need(inputs, block)
        for k in norm_fed_groups(block):
            if all(self.weight_of(block, n) is None for n in block.groups[k].linears):
                self._obs.pop(k, None)  # kept in float: nothing to transform for
                continue
            if k not in self._obs:  # true_sequential: measure after the earlier groups
                with fake_quantized(block.module, self._earlier_fake_quant(block, k)):
                    self._obs.update(self._observe(block, inputs, [k]))
            group, obs = block.groups[k], self._obs.pop(k)
            lo, hi = obs.range.value
            z = channel_shift(lo, hi) if self._use_shift(block, group) else None
            if z is not None:
                lo, hi = lo - z, hi - z
            device = next(iter(group.linears.values())).weight.device
            xs = [x.to(device) for x in obs.inputs]
            kws = [inputs.kwargs[i] if group.spec.inspect_kwargs else {}
                   for i in range(len(xs))]
            mig = search_threshold(lo.to(device), hi.to(device),
                                   self._loss(block, group, xs, kws,
                                              None if z is None else z.to(device)),
                                   steps=self.special.search_steps, total=_sum_over_ranks)
            if z is not None:
                absorb_shift(group, z.to(device))
                self._shifted += 1
            fold_scale(group, mig.scale)
            self._transformed += 1
            top = max(float(hi.max()), -float(lo.min()))
            self._ratios.append(mig.threshold / top if top > 0 else 1.0)
            self._loss_ratios.append(mig.loss_ratio)
        self._obs = {}

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"transformed_groups": self._transformed,
                               "shifted_groups": self._shifted}
        if self._ratios:
            out["threshold_over_range_mean"] = sum(self._ratios) / len(self._ratios)
            out["loss_over_unscaled_mean"] = sum(self._loss_ratios) / len(self._loss_ratios)
        return out


def _dynamic(act: Any) -> Any:
    """``act`` as the search applies it: dynamic (static ranges are fixed by core later)."""
    return None if act is None else replace(act, static=False)


def _need(inputs: BlockInputs | None, block: Block) -> BlockInputs:
    if inputs is None:
        raise PluginError("OS+ needs calibration data (calib section)", stage="calibrate",
                          where=block.name)
    return inputs
