"""AutoAWQ GEMM checkpoints (llmc's ``save_autoawq``) and the same layout for MLC-LLM
(llmc's ``save_mlcllm``). Torch-free.

Record features beyond a uniform grid: none (``accepts`` is empty; core refuses every record
feature at config time). ``supports`` checks the grid through the run's typed specs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from llmcq.api import BackendSpec
from llmcq.errors import ConfigError
from llmcq.quant.spec import PerChannel, PerGroup

if TYPE_CHECKING:
    from llmcq.api import ExportTarget

__all__ = ["AUTOAWQ_SPEC", "MLCLLM_SPEC", "AWQFormatSpec", "PACK", "REFUSALS"]

#: codes per int32 word (AutoAWQ's GEMM layout is 4-bit only)
PACK = 8

#: the format's own sentences for the record features it cannot hold
REFUSALS = {
    "act_quant": "cannot write activation quantization (the AWQ GEMM layout is weight-only)",
    "g_idx": "cannot write columns quantized out of group order (g_idx; AWQ groups are "
             "consecutive columns)",
    "fractional_zero": "cannot write fractional zero points (qzeros are packed integers)",
    "float_format": "cannot write FP8 codes (the layout packs 4-bit integer codes)",
    "layer_grids": "cannot write linears on different grids (one w_bit/q_group_size in "
                   "quant_config for the whole checkpoint)",
    "float_linears": "cannot write linears kept in float (this exporter writes no "
                     "modules_to_not_convert: every block linear is packed)",
}


@dataclass(frozen=True, kw_only=True)
class AWQFormatSpec(BackendSpec):
    refusals: dict[str, str] = field(default_factory=lambda: dict(REFUSALS))

    def supports(self, target: ExportTarget) -> None:
        super().supports(target)
        w = target.specs.weight
        assert w is not None  # BackendSpec.supports refused a run without quant.weight
        if w.bits != 4:
            raise ConfigError("quant.weight.bit", w.bits, allowed=(4,),
                              reason=f"{self.name}: the AWQ GEMM layout packs 4-bit codes only")
        g = w.granularity
        if not isinstance(g, (PerGroup, PerChannel)):
            raise ConfigError("quant.weight.granularity", str(g),
                              allowed=("per_group", "per_channel"),
                              reason=f"{self.name}: scales per group (per_channel = one group "
                              "per row)")
        if not w.symmetric and not w.round_zp:
            raise ConfigError("quant.weight.round_zp", False, allowed=(True,),
                              reason=f"{self.name} stores integer zero points")
        if isinstance(g, PerGroup):
            dims = BackendSpec.linear_in_features(target.config)
            bad = {k: v for k, v in (dims or {}).items() if v % g.size}
            if bad:
                raise ConfigError("quant.weight.group_size", g.size,
                                  reason=f"{self.name}: AutoAWQ needs whole groups, but the "
                                  "model's linear input widths "
                                  + ", ".join(f"{k}={v}" for k, v in bad.items())
                                  + " are not multiples of it")


AUTOAWQ_SPEC = AWQFormatSpec(
    name="autoawq",
    aliases=("awq_gemm",),
    summary="AutoAWQ GEMM checkpoint (qweight/qzeros in AWQ order, fp16 scales) for AutoAWQ, "
            "transformers, vLLM, SGLang",
    impl="llmcq_autoawq.export:export",
    folder="autoawq_quant_model",
)

MLCLLM_SPEC = AWQFormatSpec(
    name="mlcllm",
    aliases=("mlc", "mlc_llm"),
    summary="AutoAWQ GEMM layout for MLC-LLM's AWQ loader (q4f16_awq)",
    impl="llmcq_autoawq.export:export",
    folder="mlcllm_quant_model",
)
