"""SliM-LLM's plumbing: Hessians and output-KL statistics from the block's calibration inputs,
one allocation and one GPTQ sweep per linear.

Per block, for each linear group in layout order (with ``true_sequential``, on inputs from the
groups already quantized; otherwise every group on the float block, as the reference):

* one pass accumulates the Hessians (GPTQ's :class:`~llmcq_gptq.algorithm.HessianBank`);
* SBA: each linear's group salience from its weight and ``[H^-1]_jj``; unless ``k`` is fixed
  or the widths come from a file, a second pass sums the output KL divergence of every
  candidate ``k`` over the tokens (accumulated per batch, reduced over ranks), and the best
  ``k`` sets the widths;
* GPTQ's sweep (:func:`llmcq_gptq.solver.gptq_quantize`) with those widths and SQC as the
  group fit (as the sweep reaches each group, or before it with ``static_groups``, which
  ``actorder`` needs); the record carries the widths (``group_bits``).

The model's float weights are never changed: core builds the fake-quantized model from the
records.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import torch
from torch import nn

from llmcq import dist
from llmcq.algorithm import Algorithm
from llmcq.errors import ConfigError, DataError
from llmcq.model.adapter import ResolvedGroup
from llmcq.pipeline.blockwise import Block, BlockInputs
from llmcq.quant.fake import fake_quantized
from llmcq.quant.qparams import QParams
from llmcq.quant.record import QuantizedLinear, make_record
from llmcq.quant.spec import PerGroup, WeightQuantSpec

from llmcq_gptq.algorithm import HessianBank
from llmcq_gptq.solver import GroupFit, gptq_quantize
from llmcq_slimllm import SliMLLMSpecial
from llmcq_slimllm.allocation import (
    Allocation,
    check_writable,
    load_allocation,
    save_allocation,
    widths_for,
)
from llmcq_slimllm.solver import (
    allocate,
    cholesky_diagonal,
    fake_quant_groups,
    group_salience,
    kl_curve,
    kl_plan,
    plain_qparams,
    search_ks,
    sqc_qparams,
)

__all__ = ["SliMLLM"]

log = logging.getLogger("llmcq.slimllm")


class _Search:
    """SBA's candidates for one linear and their summed output KL divergence."""

    def __init__(self, lin: nn.Linear, spec: WeightQuantSpec, salience: torch.Tensor,
                 n_full: int) -> None:
        W = lin.weight.data
        g = spec.group_size
        assert g is not None
        self.lin, self.salience, self.n_full, self.bits = lin, salience, n_full, spec.bits
        self.ks = search_ks(n_full)
        by_width = {b: fake_quant_groups(W, g, b, spec)
                    for b in {spec.bits - 1, spec.bits, spec.bits + 1}}
        self.plan = kl_plan(by_width, spec.bits, salience, n_full, g, max(self.ks))
        self.kl = torch.zeros(len(self.ks), dtype=torch.float64)
        self.tokens = 0

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.kl += kl_curve(x, y, self.lin.bias, self.plan, self.ks)
        self.tokens += int(x.numel() // x.shape[-1])

    def best_k(self) -> tuple[int, list[float]]:
        """The ``k`` of the lowest KL over every rank's tokens (the first on a tie), and the
        KL per token of every candidate."""
        dev = self.lin.weight.device
        kl = dist.all_reduce_sum(self.kl.to(dev)).cpu()
        tokens = int(dist.all_reduce_sum(torch.tensor([self.tokens], device=dev)))
        return self.ks[int(torch.argmin(kl))], (kl / max(tokens, 1)).tolist()


class SliMLLM(Algorithm):
    """SliM-LLM: SBA widths per group, SQC grids, GPTQ's sweep.

    ```yaml
    quant:
        method: SliMLLM
        weight: {bit: 2, symmetric: False, granularity: per_group, group_size: 64}
        special: {lambda_salience: 1, salient_block: -1, nonsalient_block: -1,
                  percdamp: 0.01, save_allocation: ./alloc/w2g64.pt}
    ```
    """

    special: SliMLLMSpecial

    def __init__(self, *, run: Any, step: Any) -> None:
        super().__init__(run=run, step=step)
        sp = self.special
        self.loaded: Allocation | None = None
        if sp.allocation_path is not None:
            self.loaded = load_allocation(sp.allocation_path)
        if sp.save_allocation is not None:  # fail before any block is processed
            check_writable(sp.save_allocation, overwrite=self.run.resolved.overwrite)
        self.allocation: Allocation = {}
        #: SBA's search: full linear name -> {k: output KL per calibration token}
        self.kl_per_token: dict[str, dict[int, float]] = {}
        self._bank: HessianBank | None = None
        self._bank_block: int | None = None
        self._ks: Counter[int] = Counter()
        self._retries = 0
        self._damping_raised: list[str] = []
        self._fallbacks: list[str] = []
        self._unseen: list[str] = []
        self._written: str | None = None

    # ------------------------------------------------------------------ stages

    def calibrate(self, block: Block, inputs: BlockInputs | None) -> None:
        inputs = self._need(inputs, block)
        groups = block.groups[:1] if self.special.true_sequential else block.groups
        self._bank = self._observe(block, inputs, groups)
        self._bank_block = block.index

    def quantize(self, block: Block, inputs: BlockInputs | None) -> dict[str, QuantizedLinear]:
        inputs = self._need(inputs, block)
        seq = self.special.true_sequential
        records: dict[str, QuantizedLinear] = {}
        bank = self._bank if self._bank_block == block.index else None
        if bank is None and not seq:
            bank = self._observe(block, inputs, block.groups)
        for gi, group in enumerate(block.groups):
            with fake_quantized(block.module, records if seq else {}):
                if bank is None or (seq and gi > 0):
                    bank = self._observe(block, inputs, [group])
                widths = self._allocate(block, group, bank, inputs)
            records.update(self._solve_group(block, group, bank, widths))
            self.allocation.setdefault(block.index, {}).update(
                {nm: w.tolist() for nm, w in widths.items()})
        self._bank = None
        self._bank_block = None
        if block.index == len(self.run.adapter.blocks(self.run.model)) - 1:
            self._write()
        return records

    def summary(self) -> dict[str, Any]:
        return {"k_per_linear": {str(k): n for k, n in sorted(self._ks.items())},
                "allocation_loaded": self.special.allocation_path,
                "allocation_written": self._written, "cholesky_retries": self._retries,
                "damping_raised": self._damping_raised, "rtn_fallbacks": self._fallbacks,
                "uncalibrated_linears": self._unseen}

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _need(inputs: BlockInputs | None, block: Block) -> BlockInputs:
        if inputs is None:
            raise DataError(f"SliM-LLM needs calibration inputs ({block.name}); add a calib "
                            "section")
        return inputs

    def _observe(self, block: Block, inputs: BlockInputs,
                 groups: list[ResolvedGroup]) -> HessianBank:
        bank = HessianBank(self.special.chunk_num)
        targets: dict[str, nn.Module] = {}
        for g in groups:
            targets.update(g.linears)
        try:
            inputs.observe(block.module, targets, bank, stop_early=True)
        finally:
            bank.close()
        bank.all_reduce(targets)
        return bank

    def _hessian(self, bank: HessianBank, name: str) -> torch.Tensor | None:
        H, n = bank.get(bank.owner.get(name, name))
        return None if H is None or n == 0 else H

    def _allocate(self, block: Block, group: ResolvedGroup, bank: HessianBank,
                  inputs: BlockInputs) -> dict[str, torch.Tensor]:
        """Every quantized linear's widths ``[G]`` (each on its own grid: ``quant.mix_bits``):
        from the file, a fixed ``k``, or the KL search."""
        sp = self.special
        out: dict[str, torch.Tensor] = {}
        searches: dict[str, _Search] = {}
        for nm, lin in group.linears.items():
            spec = self.weight_of(block, nm)
            if spec is None:  # kept in float (ignored_layers, do_quant: False)
                continue
            assert isinstance(spec.granularity, PerGroup)
            g = spec.granularity.size
            C = lin.weight.shape[1]
            G, n_full = -(-C // g), C // g
            H = self._hessian(bank, nm)
            if self.loaded is not None:
                assert sp.allocation_path is not None
                out[nm] = widths_for(self.loaded, sp.allocation_path, block.index, nm, C, g,
                                     spec.bits)
                continue
            if H is None:  # saw no token (an MoE expert): uniform, rounded to nearest
                out[nm] = torch.full((G,), spec.bits, dtype=torch.long)
                continue
            d = cholesky_diagonal(H, sp.percdamp, sp.damp_retries)
            salience = group_salience(lin.weight.data, d, g).cpu()
            if sp.salient_block >= 0:
                if 2 * sp.salient_block > n_full:
                    raise ConfigError("quant.special.salient_block", sp.salient_block,
                                      allowed=f"0..{n_full // 2}", reason=f"{block.full_name(nm)}"
                                      f" has {n_full} full groups of {g} columns")
                out[nm] = allocate(salience, sp.salient_block, spec.bits, n_full)
                self._ks[sp.salient_block] += 1
            else:
                searches[nm] = _Search(lin, spec, salience, n_full)
        if searches:
            inputs.observe(block.module, dict(group.linears),
                           lambda nm, x, y: searches[nm](x, y) if nm in searches else None,
                           stop_early=True)
            for nm, s in searches.items():
                k, per_token = s.best_k()
                self._ks[k] += 1
                self.kl_per_token[block.full_name(nm)] = dict(zip(s.ks, per_token, strict=True))
                out[nm] = allocate(s.salience, k, s.bits, s.n_full)
                log.debug("SliM-LLM %s: k=%d (KL per token %s)", block.full_name(nm), k,
                          per_token)
        return out

    def _fitter(self, spec: WeightQuantSpec) -> GroupFit:
        """The group fit of a linear on ``spec``'s grid: SQC, or min-max without it."""
        lam = self.special.lambda_salience

        def fit(w: torch.Tensor, bits: torch.Tensor, d: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
            if self.special.sqc:
                return sqc_qparams(w, bits, d, spec, lam=lam)
            return plain_qparams(w, bits, spec)

        return fit

    def _solve_group(self, block: Block, group: ResolvedGroup, bank: HessianBank,
                     widths: dict[str, torch.Tensor]) -> dict[str, QuantizedLinear]:
        sp = self.special
        out: dict[str, QuantizedLinear] = {}
        for nm, lin in group.linears.items():
            spec = self.weight_of(block, nm)
            if spec is None:
                continue
            W = lin.weight.data
            label = block.full_name(nm)
            rows = widths[nm].to(W.device)[None, :].expand(W.shape[0], -1).contiguous()
            H = self._hessian(bank, nm)
            damp = sp.percdamp
            if H is None:  # an identity Hessian: round to nearest on the widths' grids
                self._unseen.append(label)
                log.warning("SliM-LLM %s saw no calibration tokens; rounded to nearest",
                            label)
                H, damp = torch.eye(W.shape[1], dtype=torch.float32, device=W.device), 0.0
            res = gptq_quantize(W, H, spec, blocksize=sp.blocksize, percdamp=damp,
                                actorder=sp.actorder, static_groups=sp.static_groups,
                                retries=sp.damp_retries, mask=block.masks.get(nm),
                                group_bits=rows, fit_group=self._fitter(spec))
            if res.fallback:
                self._fallbacks.append(label)
                log.warning("SliM-LLM %s: the damped Hessian could not be factorized; this "
                            "layer was rounded to nearest on its widths", label)
            elif res.retries:
                self._damping_raised.append(label)
            self._retries += res.retries
            rec = make_record(res.q, QParams(res.scale, res.zero), spec, bias=lin.bias,
                              group_bits=rows.to(torch.int32))
            if nm in block.masks:
                rec.mask = block.masks[nm]
            out[nm] = rec
        return out

    def _write(self) -> None:
        path = self.special.save_allocation
        if path is None:
            return
        if dist.is_main():
            save_allocation(path, self.allocation)
        self._written = str(path)
        self.run.log.info("SliM-LLM allocation written to %s", path)
