"""SliM-LLM+'s plumbing: SliM-LLM's widths per group, then OmniQuant's learnable weight
clipping trained on core's block-reconstruction harness with each group on its own width.

Per block:

* ``calibrate``: the widths of every linear, from the allocation file or SBA on the float
  block (Hessians of every linear in one pass, then SliM-LLM's KL search; the reference's
  SliM-LLM+ reads the file its SliM-LLM wrote);
* ``transform``: clip factors ``up``, ``low`` (one each per group and row; 4 at the start,
  ``sigmoid(4) = 0.982`` of the range, and 0 for the spread of 1-bit groups) trained with
  AdamW (``lwc_lr``, ``wd``) on ``MSE(block_q(X), target)`` (plus the aug_loss term) for
  ``epochs`` passes, the block run with its weights replaced by
  :func:`llmcq_slimllm.solver.mixed_lwc_fake_quant` (float targets,
  :class:`llmcq.recon.FloatChain`); weights untouched;
* ``quantize``: records of the float weights on the trained grids, with ``group_bits``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from llmcq import dist, recon
from llmcq.errors import DataError
from llmcq.pipeline.blockwise import Block, BlockInputs
from llmcq.quant.qparams import QParams
from llmcq.quant.record import QuantizedLinear, make_record

from llmcq_omniquant.solver import LWC_INIT
from llmcq_slimllm.algorithm import SliMLLM
from llmcq_slimllm.solver import mixed_lwc_fake_quant, mixed_lwc_quantize

__all__ = ["SliMLLMPlus"]

log = logging.getLogger("llmcq.slimllm")
_KEY = "slimllm_plus"


class SliMLLMPlus(SliMLLM):
    """SliM-LLM+ (the paper's Section 4, "SliM-LLM+"): LWC with per-group widths.

    ```yaml
    quant:
        method: slimllm_plus
        weight: {bit: 2, symmetric: False, granularity: per_group, group_size: 64}
        special: {epochs: 10, lwc_lr: 0.01, aug_loss: False,
                  allocation_path: ./save/slimllm_w2g64_allocation.pt}
        quant_out: True
    ```
    """

    #: trained against the float block's outputs
    float_targets = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        quant = self.run.config.quant
        self._quant_out = bool(quant is not None and quant.quant_out)
        self._chain = recon.FloatChain()
        self._losses: list[tuple[float, float]] = []
        self._nonfinite: list[int] = []
        self._amp = False

    # ------------------------------------------------------------------ stages

    def calibrate(self, block: Block, inputs: BlockInputs | None) -> None:
        inputs = self._need(inputs, block)
        widths: dict[str, torch.Tensor] = {}
        bank = None if self.loaded is not None else self._observe(block, inputs, block.groups)
        for group in block.groups:
            widths.update(self._allocate(block, group, bank, inputs))
        self.run.scratch(block.index)[_KEY] = {"widths": widths}
        self.allocation[block.index] = {n: w.tolist() for n, w in widths.items()}

    def transform(self, block: Block, inputs: BlockInputs | None) -> None:
        inputs = self._need(inputs, block)
        state = self.run.scratch(block.index)[_KEY]
        widths: dict[str, torch.Tensor] = state["widths"]
        dev = next(block.module.parameters()).device
        factors: dict[str, tuple[nn.Parameter, nn.Parameter | None]] = {}
        for name, lin in block.linears().items():
            spec = self.weight_of(block, name)
            if spec is None or name not in widths:
                continue
            w = widths[name].to(dev)
            up0 = torch.where(w == 1, 0.0, LWC_INIT).float()[None, :].expand(
                lin.out_features, -1).contiguous()
            widths[name] = w
            factors[name] = (nn.Parameter(up0),
                             None if spec.symmetric else nn.Parameter(up0.clone()))
        sp = self.special
        if sp.epochs > 0 and factors:
            targets = self._chain.targets(block, inputs, quant_out=self._quant_out,
                                          aug_loss=sp.aug_loss)
            with torch.enable_grad():
                self._train(block, inputs, widths, factors, targets)
            del targets
        state["lwc"] = {n: (u.detach(), None if lo is None else lo.detach())
                        for n, (u, lo) in factors.items()}

    def quantize(self, block: Block, inputs: BlockInputs | None) -> dict[str, QuantizedLinear]:
        state = self.run.scratch(block.index).pop(_KEY)
        out = {}
        for name, (up, low) in state["lwc"].items():
            lin = block.linears()[name]
            spec = self.weight_of(block, name)
            assert spec is not None
            widths = state["widths"][name]
            q, scale, zero = mixed_lwc_quantize(lin.weight.data, widths, spec, up, low)
            rows = widths[None, :].expand(lin.out_features, -1).to(torch.int32)
            out[name] = make_record(q, QParams(scale, zero), spec, bias=lin.bias,
                                    group_bits=rows)
        if block.index == len(self.run.adapter.blocks(self.run.model)) - 1:
            self._write()
        return out

    def summary(self) -> dict[str, Any]:
        return {**{k: v for k, v in super().summary().items()
                   if k in ("k_per_linear", "allocation_loaded", "allocation_written")},
                "epochs": self.special.epochs,
                "train_dtype": "bfloat16 autocast" if self._amp else "float32",
                "block_loss": [[float(f"{a:.4g}"), float(f"{b:.4g}")] for a, b in self._losses],
                "nonfinite_loss_blocks": self._nonfinite}

    # ------------------------------------------------------------------ pieces

    def _hessian(self, bank: Any, name: str) -> torch.Tensor | None:
        return None if bank is None else super()._hessian(bank, name)

    def _train(self, block: Block, inputs: BlockInputs, widths: dict[str, torch.Tensor],
               factors: dict[str, tuple[nn.Parameter, nn.Parameter | None]],
               targets: recon.Targets) -> None:
        sp = self.special
        grids = {n: self.weight_of(block, n) for n in factors}
        tensors = [p for up, low in factors.values() for p in (up, low) if p is not None]

        def params(base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            eff = dict(base)
            for name, (up, low) in factors.items():
                spec = grids[name]
                assert spec is not None
                key = f"{name}.weight"
                eff[key] = mixed_lwc_fake_quant(eff[key], widths[name], spec, up, low).to(
                    eff[key].dtype)
            return eff

        result = recon.reconstruct(
            block, inputs, targets, [recon.ParamGroup(tensors, lr=sp.lwc_lr, name="lwc")],
            settings=recon.ReconSettings(epochs=sp.epochs, amp=not sp.deactive_amp,
                                         weight_decay=sp.wd, optimizer="adamw"),
            params=params, loss=recon.TargetLoss(recon.mse, aug="sum"),
            progress=self.run.progress and dist.is_main(), desc=f"slimllm+ {block.name}")
        self._amp = result.amp
        if not result.losses:
            return
        if result.rolled_back:
            self._nonfinite.append(block.index)
        self._losses.append((result.first, result.last))
        log.info("%s: SliM-LLM+ loss %.3g -> %.3g", block.name, result.first, result.last)

    @staticmethod
    def _need(inputs: BlockInputs | None, block: Block) -> BlockInputs:
        if inputs is None:
            raise DataError(f"SliM-LLM+ needs calibration inputs ({block.name}); add a calib "
                            "section")
        return inputs
