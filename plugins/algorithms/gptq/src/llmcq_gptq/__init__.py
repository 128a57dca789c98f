"""GPTQ (Frantar et al. 2022, arXiv:2210.17323) and its OWQ variant (Lee et al. 2023,
arXiv:2306.02272) for llmcq: ``quant.method: gptq`` (llmc's ``GPTQ``).

This module is torch-free: ``llmcq validate`` and ``llmcq plugins`` import it.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from llmcq.api import AlgorithmSpec, StepSettings
from llmcq.capabilities import Feature
from llmcq.config.schema import SpecialConfig
from llmcq.errors import ConfigError
from llmcq.quant.spec import PerGroup

__all__ = ["SPEC", "GPTQSpecial", "GPTQSpec"]


class GPTQSpecial(SpecialConfig):
    """``quant.special`` of GPTQ: llmc's keys with the values of llmc's GPTQ configs.

    llmc reads these keys without defaults; the defaults here are the values every llmc GPTQ
    config uses (``configs/quantization/methods/GPTQ/gptq_w_only.yml``).
    """

    #: quantize columns by decreasing Hessian diagonal (GPTQ's "act-order")
    actorder: bool = True
    #: with act-order and per-group weights: fix every group's grid on the original column
    #: order before the sweep, so groups stay contiguous in the export (no g_idx)
    static_groups: bool = False
    #: damping added to the Hessian diagonal, as a fraction of its mean
    percdamp: float = Field(0.01, ge=0.0)
    #: columns per lazy-batch update
    blocksize: int = Field(128, ge=1)
    #: quantize the block's linear groups in order, each on inputs produced by the groups
    #: before it already quantized
    true_sequential: bool = True
    #: split each calibration batch into this many chunks when accumulating the Hessian
    #: (memory; the result is the same)
    chunk_num: int = Field(1, ge=1)
    #: OWQ: keep each linear's weakest input columns in float
    owq: bool = False
    #: OWQ: number of float columns for each linear of a block, in the block layout's order
    #: (for Llama: q, k, v, o, gate, up, down)
    n_outs: list[Annotated[int, Field(ge=0)]] | None = None
    #: OWQ (llmcq extension): instead of n_outs, this fraction of every linear's input
    #: columns is kept in float
    owq_ratio: float | None = Field(None, gt=0.0, lt=1.0)
    #: OWQ (llmcq extension): how weak columns are ranked. "sensitivity": H_jj times the
    #: column's squared round-to-nearest error (the OWQ paper and its code); "hessian": H_jj
    #: alone (llmc)
    owq_metric: Literal["sensitivity", "hessian"] = "sensitivity"
    #: OWQ (llmcq extension): dtype the float columns are stored in; auto = the weight's
    fp_dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    #: (llmcq extension) how many times a failed Cholesky factorization is retried, each
    #: time with 10x the damping, before the layer falls back to round-to-nearest
    damp_retries: int = Field(4, ge=0, le=12)


class GPTQSpec(AlgorithmSpec):
    """Config-time checks of the OWQ keys, and what GPTQ's records hold."""

    def check(self, step: StepSettings) -> None:
        super().check(step)
        special = step.special
        assert isinstance(special, GPTQSpecial)
        if special.owq:
            given = [k for k in ("n_outs", "owq_ratio") if getattr(special, k) is not None]
            if len(given) != 1:
                raise ConfigError(step.key("owq"), True, reason="OWQ needs the number of float "
                                  "columns: give exactly one of n_outs (one count per linear "
                                  "of a block) or owq_ratio (a fraction of the input columns)",
                                  allowed="n_outs: [..] or owq_ratio: 0.0-1.0", show_value=False)
            if special.n_outs is not None and len(special.n_outs) == 0:
                raise ConfigError(step.key("n_outs"), [], reason="needs one count per linear "
                                  "of a block")
        else:
            for key in ("n_outs", "owq_ratio"):
                if getattr(special, key) is not None:
                    raise ConfigError(step.key(key), getattr(special, key),
                                      reason="only used by OWQ; set owq: True or remove it")

    def produces(self, step: StepSettings) -> list[Feature]:
        special = step.special
        assert isinstance(special, GPTQSpecial)
        out = []
        w = step.specs.weight
        if w is not None and isinstance(w.granularity, PerGroup) and special.actorder \
                and not special.static_groups:
            out.append(Feature("g_idx", step.key("actorder"), True, source=self.name,
                               hint="set static_groups: True (act-order kept, groups "
                                    "contiguous) or actorder: False"))
        if special.owq:
            out.append(Feature("float_columns", step.key("owq"), True, source=self.name,
                               hint="set owq: False"))
        return out

    def wants_calibration(self, step: StepSettings) -> bool:
        return True


SPEC = GPTQSpec(
    name="gptq",
    summary="GPTQ: Hessian-based error-compensating weight quantization (act-order, static "
            "groups, true-sequential, OWQ float columns)",
    impl="llmcq_gptq.algorithm:GPTQ",
    special=GPTQSpecial,
    paper="https://arxiv.org/abs/2210.17323",
    needs_calibration=True,
    supports_act=True,
    weight_calib_algos=("minmax", "mse"),
    uses_masks=True,
    # each linear solved on its own grid (linears sharing a Hessian are stacked only when
    # their grids match); linears kept in float are neither observed nor recorded
    per_layer_specs=True,
)
