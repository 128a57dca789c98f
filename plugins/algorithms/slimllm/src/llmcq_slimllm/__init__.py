"""SliM-LLM (Huang et al. 2024, arXiv:2405.14917) for llmcq: ``quant.method: slimllm`` (also
``SliMLLM``, ``slim_llm``). Salience-driven mixed precision per group on GPTQ's sweep.

This module is torch-free: ``llmcq validate`` and ``llmcq plugins`` import it.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmcq.api import AlgorithmSpec, StepSettings
from llmcq.capabilities import Feature
from llmcq.config.schema import SpecialConfig
from llmcq.errors import ConfigError
from llmcq.quant.spec import PerGroup
from pydantic import Field

__all__ = ["SPEC", "SPEC_PLUS", "SliMLLMSpecial", "SliMLLMSpec", "SliMLLMPlusSpecial",
           "SliMLLMPlusSpec"]


class SliMLLMSpecial(SpecialConfig):
    """``quant.special`` of SliM-LLM: the reference code's arguments (``run.py``) with its
    defaults, GPTQ's sweep keys, and the allocation file. The average width and the group
    size are ``quant.weight.bit`` and ``quant.weight.group_size``."""

    #: SQC: weight of the salient weights' error in the range search (1: no weighting, the
    #: reference's default)
    lambda_salience: float = Field(1.0, ge=0.0)
    #: SBA: fix k, the number of groups per linear at bit + 1 (-1: search k by the output
    #: KL divergence on the calibration tokens)
    salient_block: int = Field(-1, ge=-1)
    #: SBA: groups per linear at bit - 1; must equal salient_block (the mean stays exactly bit)
    nonsalient_block: int = Field(-1, ge=-1)
    #: (llmcq) SQC on: salience-weighted range search per group; off: min-max per group
    sqc: bool = True
    #: damping added to the Hessian diagonal, as a fraction of its mean
    percdamp: float = Field(0.01, ge=0.0)
    #: columns per lazy-batch update of the GPTQ sweep
    blocksize: int = Field(128, ge=1)
    #: (llmc's GPTQ key) quantize the block's linear groups in order, each on inputs produced
    #: by the groups before it already quantized; the reference code observes every linear of
    #: a layer on the float layer (False)
    true_sequential: bool = True
    #: (llmcq) GPTQ's act-order: sweep columns by decreasing Hessian diagonal; needs
    #: static_groups (SBA's groups stay contiguous columns); the reference has none
    actorder: bool = False
    #: (llmcq) GPTQ's static groups: SQC fits every group on the original weights before the
    #: sweep (the reference fits each group as the sweep reaches it)
    static_groups: bool = False
    #: split each calibration batch into this many chunks for the Hessian (memory only)
    chunk_num: int = Field(1, ge=1)
    #: Cholesky retries, each with 10x the damping, before a layer falls back to RTN
    damp_retries: int = Field(4, ge=0, le=12)
    #: the reference's calibration sample count: llmcq reads calib.n_samples (may repeat it)
    nsamples: int | None = Field(None, ge=1)
    #: read the bits of every group from this file (ours or the reference's
    #: block_precision_<g>_<N>bit/<model>.pt) instead of running SBA
    allocation_path: str | None = None
    #: write the bits of every group to this file after the last block
    save_allocation: str | None = None


@dataclass(frozen=True, kw_only=True)
class SliMLLMSpec(AlgorithmSpec):
    """Refuses at config time what SliM-LLM cannot honour; declares mixed widths."""

    def check(self, step: StepSettings) -> None:
        super().check(step)
        sp, w = step.special, step.specs.weight
        assert w is not None
        if not isinstance(w.granularity, PerGroup):
            raise ConfigError("quant.weight.granularity", str(w.granularity),
                              allowed="per_group", reason="SliM-LLM gives each group of "
                              "input columns its own width")
        fixed = sp.salient_block
        if sp.nonsalient_block != fixed:
            raise ConfigError(step.key("nonsalient_block"), sp.nonsalient_block,
                              allowed=f"{fixed} (= salient_block)",
                              reason="k groups go to bit + 1 and k to bit - 1: the mean stays "
                              "exactly quant.weight.bit only when both counts are equal")
        if fixed >= 0 and sp.allocation_path is not None:
            raise ConfigError(step.key("salient_block"), fixed, allowed="-1",
                              reason="allocation_path gives every group's width already; "
                              "remove salient_block/nonsalient_block or allocation_path")
        mixed = fixed != 0
        if mixed and w.bits >= 8:
            raise ConfigError("quant.weight.bit", w.bits, allowed="2-7 (8 with salient_block: "
                              "0 and nonsalient_block: 0)", reason="the salient groups would "
                              "need 9-bit codes, which records do not hold")
        if mixed and w.bits == 2 and w.symmetric:
            raise ConfigError("quant.weight.symmetric", True, allowed="False",
                              reason="at bit 2 the least salient groups get 1 bit, and a "
                              "symmetric 1-bit grid has the codes -1 and 0 only")
        if getattr(sp, "actorder", False) and not getattr(sp, "static_groups", False):
            raise ConfigError(step.key("actorder"), True,
                              allowed="False, or True with static_groups: True",
                              reason="act-order without static groups groups the columns in "
                              "sweep order (g_idx), while SBA gives widths to groups of "
                              "contiguous input columns")
        if not getattr(sp, "sqc", True) and "lambda_salience" in sp.model_fields_set:
            raise ConfigError(step.key("lambda_salience"), sp.lambda_salience,
                              reason="only used by SQC; set sqc: True or remove it")
        calib = step.config.calib
        if sp.nsamples is not None:
            if calib is None:
                raise ConfigError(step.key("nsamples"), sp.nsamples, reason="llmcq reads "
                                  "the sample count from calib.n_samples, and there is no "
                                  "calib section")
            if calib.n_samples != sp.nsamples:
                raise ConfigError(step.key("nsamples"), sp.nsamples,
                                  allowed=str(calib.n_samples),
                                  reason=f"llmcq's calibration size is calib.n_samples "
                                  f"({calib.n_samples}); set that instead (or drop nsamples)")

    def produces(self, step: StepSettings) -> list[Feature]:
        sp, w = step.special, step.specs.weight
        if sp.salient_block == 0 or w is None:
            return []
        field = step.key("allocation_path") if sp.allocation_path else step.method_path
        value = sp.allocation_path or self.name
        uniform = "set salient_block: 0 and nonsalient_block: 0 (uniform width, SQC only)"
        out = [Feature("group_bits", field, value, source=self.name, hint=uniform)]
        if w.bits == 2 and not w.symmetric:
            out.append(Feature("fractional_zero", field, value, source=self.name,
                               hint=uniform + "; its 1-bit groups are binarized (levels "
                               "mean +- a need a fractional zero point)"))
        return out

    def wants_calibration(self, step: StepSettings) -> bool:
        return True


SPEC = SliMLLMSpec(
    name="slimllm",
    summary="SliM-LLM: salience-driven mixed precision per group (SBA) with salience-weighted "
            "quantizer calibration (SQC) on GPTQ's sweep (weight-only, 2-7 bits average)",
    impl="llmcq_slimllm.algorithm:SliMLLM",
    aliases=("SliMLLM", "slim_llm"),
    paper="https://arxiv.org/abs/2405.14917",
    special=SliMLLMSpecial,
    needs_calibration=True,
    weight_calib_algos=("minmax",),
    uses_masks=True,
    per_layer_specs=True,
)


class SliMLLMPlusSpecial(SpecialConfig):
    """``quant.special`` of SliM-LLM+: the reference's ``slim-llm-plus/main.py`` arguments
    (OmniQuant's LWC) with its defaults, and SliM-LLM's allocation keys (a file, or SBA run
    on the float block)."""

    #: training passes over the calibration batches per block (the reference's scripts: 50)
    epochs: int = Field(10, ge=0)
    #: AdamW learning rate of the clipping factors
    lwc_lr: float = Field(0.01, gt=0)
    #: AdamW weight decay
    wd: float = Field(0.0, ge=0.0)
    #: also match the float block's output on the quantized inputs (OmniQuant's aug_loss)
    aug_loss: bool = False
    #: float32 training (False: bfloat16 autocast on CUDA)
    deactive_amp: bool = True
    #: widths of every group from this file (SliM-LLM's save_allocation, or the reference's
    #: block_precision_<g>_<N>bit/<model>.pt); absent: SBA on each float block
    allocation_path: str | None = None
    #: write the widths used to this file after the last block
    save_allocation: str | None = None
    #: SBA (without a file): fix k (-1: search by the output KL divergence)
    salient_block: int = Field(-1, ge=-1)
    #: SBA: must equal salient_block
    nonsalient_block: int = Field(-1, ge=-1)
    #: SBA: Hessian damping of the salience ranking, as a fraction of the mean diagonal
    percdamp: float = Field(0.01, ge=0.0)
    #: SBA: Cholesky retries with 10x the damping
    damp_retries: int = Field(4, ge=0, le=12)
    #: SBA: calibration batches split into this many chunks for the Hessian (memory only)
    chunk_num: int = Field(1, ge=1)
    #: the reference's sample count: llmcq reads calib.n_samples (may repeat it)
    nsamples: int | None = Field(None, ge=1)


@dataclass(frozen=True, kw_only=True)
class SliMLLMPlusSpec(SliMLLMSpec):
    """SliM-LLM's refusals (grids, widths, the allocation keys) for SliM-LLM+."""


SPEC_PLUS = SliMLLMPlusSpec(
    name="slimllm_plus",
    summary="SliM-LLM+: OmniQuant's learnable weight clipping with SliM-LLM's per-group "
            "widths (from its allocation file or SBA), trained per block",
    impl="llmcq_slimllm.plus:SliMLLMPlus",
    aliases=("SliMLLMPlus", "SliM-LLM+", "slimllm+"),
    paper="https://arxiv.org/abs/2405.14917",
    special=SliMLLMPlusSpecial,
    needs_calibration=True,
    weight_calib_algos=("minmax", "learnable"),
    per_layer_specs=True,
)
