"""SparseGPT's plumbing: Hessians from the block's calibration inputs (GPTQ's
:class:`~llmcq_gptq.algorithm.HessianBank`: running sums, linears reading one input share
one), then one sweep per linear in ``prune``.

``prune`` writes the pruned, updated weights into the block (pruning changes the kept
weights: that is the method) and returns the masks. In joint mode (``quant.method: RTN``
beside ``sparse``, ``joint_quant: True``) the sweep also rounds the kept weights onto each
linear's grid; the weights written are then the dequantized ones and the sweep's codes and
grids become the block's records: the driver registers an ``llmcq_quantize`` implementation
on the run (the hook a plugin uses to take over a block's records) that hands them over
instead of RTN rounding the already rounded weights again.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from llmcq.algorithm import Algorithm
from llmcq.errors import DataError
from llmcq.hookspecs import hookimpl
from llmcq.pipeline.blockwise import Block, BlockInputs
from llmcq.quant.qparams import QParams
from llmcq.quant.record import QuantizedLinear, make_record
from llmcq_gptq.algorithm import HessianBank

from llmcq_sparsegpt import SparseGPTSpecial
from llmcq_sparsegpt.solver import sparsegpt_prune

__all__ = ["SparseGPT"]

log = logging.getLogger("llmcq.sparsegpt")


class _JointRecords:
    """``llmcq_quantize`` for a joint run: the records SparseGPT's sweep made for the block
    (first result wins over core's RTN)."""

    def __init__(self, owner: SparseGPT) -> None:
        self.owner = owner

    @hookimpl
    def llmcq_quantize(self, block: Block) -> dict[str, QuantizedLinear] | None:
        return self.owner.take_records(block)


class SparseGPT(Algorithm):
    """OBS pruning per linear, optionally joint with quantization of the kept weights.

    ```yaml
    sparse:
        method: SparseGPT
        weight: {sparsity: 0.5}            # or mask_structure: 2:4
        special: {blocksize: 128, percdamp: 0.01}
    ```
    """

    special: SparseGPTSpecial

    def __init__(self, *, run: Any, step: Any) -> None:
        super().__init__(run=run, step=step)
        self._bank: HessianBank | None = None
        self._bank_block: int | None = None
        self._records: dict[int, dict[str, QuantizedLinear]] = {}
        self._retries = 0
        self._fallbacks: list[str] = []
        self._unseen: list[str] = []
        self.joint = self._joint()
        if self.joint:
            run.pm.register(_JointRecords(self), name=f"llmcq-sparsegpt-joint-{id(self)}")

    def _joint(self) -> bool:
        if not self.special.joint_quant or self.weight is None:
            return False
        resolved = getattr(self.run, "resolved", None)
        if resolved is None:
            return False
        from llmcq.plugins import registry

        quant = [registry.normalize(st.spec.name) for st in resolved.steps
                 if st.section == "quant"]
        return quant == ["rtn"]

    # ------------------------------------------------------------------ stages

    def calibrate(self, block: Block, inputs: BlockInputs | None) -> None:
        if inputs is None:
            raise DataError(f"SparseGPT needs calibration inputs ({block.name}); add a calib "
                            "section")
        targets = dict(block.linears())
        bank = HessianBank()
        try:
            inputs.observe(block.module, targets, bank, stop_early=True)
        finally:
            bank.close()
        bank.all_reduce(targets)
        self._bank, self._bank_block = bank, block.index

    def prune(self, block: Block, inputs: BlockInputs | None) -> dict[str, torch.Tensor]:
        assert self.sparsity is not None
        if self._bank_block != block.index:
            self.calibrate(block, inputs)
        bank = self._bank
        assert bank is not None
        sp = self.special
        linears = block.linears()
        masks: dict[str, torch.Tensor] = {}
        records: dict[str, QuantizedLinear] = {}
        for owner, names in bank.slots(list(linears)):
            H, n = bank.get(owner)
            for name in names:
                lin = linears[name]
                label = block.full_name(name)
                if H is None or n == 0:
                    self._unseen.append(label)
                    log.warning("SparseGPT %s saw no calibration tokens; left dense", label)
                    continue
                spec = self.weight_of(block, name) if self.joint else None
                res = sparsegpt_prune(lin.weight.data, H, self.sparsity.structure,
                                      self.sparsity.sparsity, blocksize=sp.blocksize,
                                      percdamp=sp.percdamp, retries=sp.damp_retries,
                                      keep=block.masks.get(name), spec=spec)
                if res.fallback:
                    self._fallbacks.append(label)
                    log.warning("SparseGPT %s: the damped Hessian could not be factorized; "
                                "pruned by magnitude without updates", label)
                self._retries += res.retries
                lin.weight.data.copy_(res.w.to(lin.weight.dtype))
                masks[name] = res.mask
                if spec is not None:
                    assert res.q is not None and res.scale is not None
                    records[name] = make_record(res.q, QParams(res.scale, res.zero), spec,
                                                bias=lin.bias)
        if self.joint:
            self._records[block.index] = records
        self._bank, self._bank_block = None, None
        return masks

    def take_records(self, block: Block) -> dict[str, QuantizedLinear] | None:
        """The joint sweep's records of ``block`` (once), None when it made none."""
        return self._records.pop(block.index, None)

    def summary(self) -> dict[str, Any]:
        return {"joint_quant": self.joint, "cholesky_retries": self._retries,
                "magnitude_fallbacks": self._fallbacks, "uncalibrated_linears": self._unseen}
