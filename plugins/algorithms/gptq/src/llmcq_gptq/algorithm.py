"""GPTQ's plumbing: Hessians from the block's calibration inputs, one solve per weight.

Per block:

* ``calibrate``: one pass of the block over its inputs accumulates ``H = 2/n sum x x^T`` for
  every linear (running mean, float32, one ``addmm_`` per batch; activations are never
  kept). Linears fed the very same input tensor (q/k/v, gate/up) share one Hessian.
  With ``true_sequential`` only the first linear group is observed here.
* ``quantize``: the groups are solved in layout order. With ``true_sequential`` the Hessians
  of each later group come from a pass of the block in which the groups already solved are
  fake-quantized. Linears sharing a Hessian are solved as one stacked weight (GPTQ treats
  rows independently, so this is exact and saves a column sweep). The model's float weights
  are never changed: core builds the fake-quantized model from the records.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from llmcq import dist
from llmcq.algorithm import Algorithm
from llmcq.errors import ConfigError, DataError
from llmcq.model.adapter import ResolvedGroup
from llmcq.pipeline.blockwise import Block, BlockInputs
from llmcq.quant.fake import fake_quantized
from llmcq.quant.qparams import QParams, quantize_weight
from llmcq.quant.record import QuantizedLinear, make_record
from llmcq.quant.spec import PerTensor, WeightQuantSpec

from llmcq_gptq import GPTQSpecial
from llmcq_gptq.solver import (
    GPTQResult,
    accumulate_hessian,
    gptq_quantize,
    owq_count,
    owq_weak_columns,
)

__all__ = ["GPTQ", "HessianBank"]

log = logging.getLogger("llmcq.gptq")

_FP_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class HessianBank:
    """Running Hessians of some linears, one per distinct input tensor.

    Use as the ``fn`` of :meth:`BlockInputs.observe`. On the first batch, a linear whose input
    is the very object another linear just received (q/k/v reading one normed hidden state)
    is attached to that linear's Hessian; later batches check the sharing still holds.
    """

    def __init__(self, chunks: int = 1) -> None:
        self.chunks = chunks
        self.H: dict[str, torch.Tensor] = {}
        self.n: dict[str, int] = {}
        self.owner: dict[str, str] = {}
        self._last: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, x: torch.Tensor, _y: Any) -> None:
        owner = self.owner.get(name)
        if owner is None:
            owner = next((o for o, seen in self._last.items() if seen is x), name)
            self.owner[name] = owner
        if owner != name:
            if self._last.get(owner) is not x:
                raise RuntimeError(f"{name} shared its input with {owner} on the first "
                                   "calibration batch but not on a later one")
            return
        H = self.H.get(name)
        if H is None:
            H = self.H[name] = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float32,
                                           device=x.device)
            self.n[name] = 0
        self.n[name] = accumulate_hessian(H, self.n[name], x.detach(), chunks=self.chunks)
        self._last[name] = x

    def close(self) -> None:
        """Drop the references to the last inputs (kept only to detect sharing)."""
        self._last.clear()

    def all_reduce(self, targets: dict[str, nn.Module]) -> None:
        """Data-parallel calibration: each Hessian becomes the mean over every rank's
        tokens (a no-op on one rank).

        ``targets`` are the observed linears, the same names in the same order on every
        rank. A linear may have run on some ranks only (an MoE expert no token of this
        rank's share was routed to): which Hessian it uses is taken from a rank that saw
        it, and this rank joins that Hessian's reduction with zeros and a count of 0, so
        every rank reduces the same Hessians in the same order and holds one process's."""
        if not dist.active():
            return
        names = list(targets)
        index = {n: i for i, n in enumerate(names)}
        device = next(iter(targets.values())).weight.device  # the block's compute device
        owner = torch.full((len(names),), -1, dtype=torch.int64, device=device)
        for name, own in self.owner.items():
            owner[index[name]] = index[own]
        dist.all_reduce_max(owner)  # -1 where no rank saw the linear
        for i, name in enumerate(names):
            o = int(owner[i])
            if o < 0:
                continue
            self.owner[name] = names[o]
            if o != i:
                continue
            if name not in self.H:
                w = targets[name].weight
                self.H[name] = torch.zeros(w.shape[1], w.shape[1], dtype=torch.float32,
                                           device=w.device)
                self.n[name] = 0
            self.H[name], self.n[name] = dist.weighted_mean(self.H[name], self.n[name])

    def slots(self, names: list[str]) -> list[tuple[str, list[str]]]:
        """``names`` grouped by the Hessian they use, in order: ``[(owner, [names])]``."""
        out: dict[str, list[str]] = {}
        for name in names:
            out.setdefault(self.owner.get(name, name), []).append(name)
        return list(out.items())

    def get(self, owner: str) -> tuple[torch.Tensor | None, int]:
        return self.H.get(owner), self.n.get(owner, 0)


class GPTQ(Algorithm):
    """GPTQ with act-order, static groups, true-sequential and OWQ float columns.

    ```yaml
    quant:
        method: GPTQ
        weight: {bit: 3, symmetric: False, granularity: per_group, group_size: 64}
        special: {actorder: True, static_groups: False, percdamp: 0.01, blocksize: 128,
                  true_sequential: True}
    ```
    """

    special: GPTQSpecial

    def __init__(self, *, run: Any, step: Any) -> None:
        super().__init__(run=run, step=step)
        self._bank: HessianBank | None = None
        self._bank_block: int | None = None
        self._retries = 0
        self._damping_raised: list[str] = []
        self._fallbacks: list[str] = []
        self._unseen: list[str] = []
        self._float_columns = 0

    # ------------------------------------------------------------------ stages

    def calibrate(self, block: Block, inputs: BlockInputs | None) -> None:
        inputs = self._need(inputs, block)
        groups = block.groups[:1] if self.special.true_sequential else block.groups
        self._bank = self._observe(block, inputs, groups)
        self._bank_block = block.index

    def quantize(self, block: Block, inputs: BlockInputs | None) -> dict[str, QuantizedLinear]:
        assert self.weight is not None
        inputs = self._need(inputs, block)
        records: dict[str, QuantizedLinear] = {}
        bank = self._bank if self._bank_block == block.index else None
        if bank is None and not self.special.true_sequential:
            bank = self._observe(block, inputs, block.groups)
        for gi, group in enumerate(block.groups):
            if bank is None or (self.special.true_sequential and gi > 0):
                with fake_quantized(block.module, self._as_forward(block, records)):
                    bank = self._observe(block, inputs, [group])
            records.update(self._solve_group(block, group, bank))
        self._bank = None
        self._bank_block = None
        return records

    def summary(self) -> dict[str, Any]:
        return {"cholesky_retries": self._retries, "damping_raised": self._damping_raised,
                "rtn_fallbacks": self._fallbacks, "uncalibrated_linears": self._unseen,
                "owq_float_columns": self._float_columns}

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _need(inputs: BlockInputs | None, block: Block) -> BlockInputs:
        if inputs is None:
            raise DataError(f"GPTQ needs calibration inputs ({block.name}); add a calib section")
        return inputs

    def _observe(self, block: Block, inputs: BlockInputs,
                 groups: list[ResolvedGroup]) -> HessianBank:
        bank = HessianBank(self.special.chunk_num)
        targets: dict[str, nn.Module] = {}
        for g in groups:  # linears kept in float need no Hessian
            targets.update({n: lin for n, lin in g.linears.items()
                            if self.weight_of(block, n) is not None})
        if not targets:
            return bank
        try:
            # the rest of the block is not needed once every target has seen its input
            inputs.observe(block.module, targets, bank, stop_early=True)
        finally:
            bank.close()
        bank.all_reduce(targets)
        return bank

    def _as_forward(self, block: Block, records: dict[str, QuantizedLinear]
                    ) -> dict[str, QuantizedLinear]:
        """Records as the later groups should see them (each linear's dynamic activation
        quantization; static ranges are fixed by core after quantize)."""
        out = {}
        for n, r in records.items():
            act = self.act_of(block, n)
            out[n] = r if act is None or act.static else replace(r, act=act)
        return out

    def _n_out(self, block: Block, name: str, in_features: int) -> int:
        sp = self.special
        if sp.owq_ratio is not None:
            return owq_count(in_features, sp.owq_ratio)
        assert sp.n_outs is not None
        names = list(block.linears())
        if len(sp.n_outs) != len(names):
            raise ConfigError("quant.special.n_outs", sp.n_outs,
                              reason=f"needs one count per linear of a block: {len(names)} "
                                     f"({', '.join(names)}), got {len(sp.n_outs)}")
        n = sp.n_outs[names.index(name)]
        if n >= in_features:
            raise ConfigError("quant.special.n_outs", sp.n_outs,
                              reason=f"{n} float columns for {name}, which has only "
                                     f"{in_features} input columns")
        return n

    def _solve(self, label: str, W: torch.Tensor, H: torch.Tensor, spec: WeightQuantSpec,
               weak: torch.Tensor | None = None,
               float_dtype: torch.dtype | None = None,
               mask: torch.Tensor | None = None) -> GPTQResult:
        sp = self.special
        res = gptq_quantize(W, H, spec, blocksize=sp.blocksize, percdamp=sp.percdamp,
                            actorder=sp.actorder, static_groups=sp.static_groups, weak=weak,
                            float_dtype=float_dtype, retries=sp.damp_retries, mask=mask)
        if res.fallback:
            self._fallbacks.append(label)
            log.warning("GPTQ %s: the damped Hessian could not be factorized even with %gx "
                        "the damping; this layer was quantized with round-to-nearest",
                        label, 10.0 ** sp.damp_retries)
        elif res.retries:
            self._damping_raised.append(label)
            log.warning("GPTQ %s: Cholesky factorization failed with percdamp=%g; succeeded "
                        "after %d retr%s with %gx the damping", label, sp.percdamp, res.retries,
                        "y" if res.retries == 1 else "ies", 10.0 ** res.retries)
        self._retries += res.retries
        return res

    def _record(self, lin: nn.Linear, res: GPTQResult, spec: WeightQuantSpec,
                rows: slice | None = None) -> QuantizedLinear:
        if rows is None:
            q, scale, zero = res.q, res.scale, res.zero
        else:
            q, scale = res.q[rows], res.scale[rows]
            zero = None if res.zero is None else res.zero[rows]
        g_idx = None if res.g_idx is None else res.g_idx.clone()
        return make_record(q, QParams(scale, zero), spec, bias=lin.bias, g_idx=g_idx,
                           float_columns=res.float_columns)

    def _solve_group(self, block: Block, group: ResolvedGroup,
                     bank: HessianBank) -> dict[str, QuantizedLinear]:
        out: dict[str, QuantizedLinear] = {}
        quantized = [n for n in group.linears if self.weight_of(block, n) is not None]
        for owner, slot in bank.slots(quantized):
            H, n = bank.get(owner)
            for spec, names in _by_grid(slot, lambda nm: self.weight_of(block, nm)):
                out.update(self._solve_slot(block, group, names, spec, H, n))
        for nm, rec in out.items():  # pruned weights stay zero in the later groups' inputs too
            if nm in block.masks:
                rec.mask = block.masks[nm]
        return out

    def _solve_slot(self, block: Block, group: ResolvedGroup, names: list[str],
                    spec: WeightQuantSpec, H: torch.Tensor | None, n: int
                    ) -> dict[str, QuantizedLinear]:
        """Records of linears sharing one Hessian ``H`` and one grid ``spec``."""
        sp = self.special
        out: dict[str, QuantizedLinear] = {}
        lins = [group.linears[nm] for nm in names]
        if H is None or n == 0:
            for nm, lin in zip(names, lins):
                self._unseen.append(block.full_name(nm))
                log.warning("GPTQ %s saw no calibration tokens; quantized with "
                            "round-to-nearest", block.full_name(nm))
                q, qp = quantize_weight(lin.weight.data, spec)
                out[nm] = make_record(q, qp, spec, bias=lin.bias)
            return out
        if sp.owq:
            for nm, lin in zip(names, lins):
                W = lin.weight.data
                n_out = self._n_out(block, nm, W.shape[1])
                weak = (owq_weak_columns(W, H, spec, n_out, metric=sp.owq_metric)
                        if n_out else None)
                fp = W.dtype if sp.fp_dtype == "auto" else _FP_DTYPES[sp.fp_dtype]
                res = self._solve(block.full_name(nm), W, H, spec, weak, fp,
                                  block.masks.get(nm))
                self._float_columns += n_out
                out[nm] = self._record(lin, res, spec)
        elif len(lins) > 1 and not isinstance(spec.granularity, PerTensor):
            W = torch.cat([lin.weight.data for lin in lins], dim=0)
            label = ", ".join(block.full_name(nm) for nm in names)
            mask = None
            if any(nm in block.masks for nm in names):
                mask = torch.cat([block.masks[nm] if nm in block.masks else
                                  torch.ones_like(lin.weight, dtype=torch.bool)
                                  for nm, lin in zip(names, lins)], dim=0)
            res = self._solve(label, W, H, spec, mask=mask)
            r0 = 0
            for nm, lin in zip(names, lins):
                r1 = r0 + lin.weight.shape[0]
                out[nm] = self._record(lin, res, spec, slice(r0, r1))
                r0 = r1
        else:
            for nm, lin in zip(names, lins):
                out[nm] = self._record(lin, self._solve(block.full_name(nm),
                                                        lin.weight.data, H, spec,
                                                        mask=block.masks.get(nm)), spec)
        return out


def _by_grid(names: list[str], grid: Any) -> list[tuple[WeightQuantSpec, list[str]]]:
    """``names`` partitioned by their grid (``grid(name)``), in order: linears sharing a
    Hessian are stacked into one solve only when they share a grid too."""
    parts: dict[WeightQuantSpec, list[str]] = {}
    for nm in names:
        parts.setdefault(grid(nm), []).append(nm)
    return list(parts.items())
