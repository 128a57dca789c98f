"""AutoAWQ GEMM checkpoints (llmc's ``save_autoawq``) and the same layout for MLC-LLM
(llmc's ``save_mlcllm``). Torch-free."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from llmcq.api import BackendSpec
from llmcq.errors import ConfigError

if TYPE_CHECKING:
    from llmcq.config.schema import RunConfig

__all__ = ["AUTOAWQ_SPEC", "MLCLLM_SPEC", "AWQFormatSpec", "PACK"]

#: codes per int32 word (AutoAWQ's GEMM layout is 4-bit only)
PACK = 8


@dataclass(frozen=True, kw_only=True)
class AWQFormatSpec(BackendSpec):
    def supports(self, config: RunConfig, *, path: str) -> None:
        super().supports(config, path=path)
        quant = config.quant
        if quant is None or quant.weight is None:
            raise ConfigError(path, True, reason=f"{self.name} exports quantized linears; the "
                              "config needs quant.weight")
        w = quant.weight
        if w.bit != 4:
            raise ConfigError("quant.weight.bit", w.bit, allowed=(4,),
                              reason=f"{self.name}: the AWQ GEMM layout packs 4-bit codes only")
        if w.granularity not in ("per_group", "per_channel"):
            raise ConfigError("quant.weight.granularity", w.granularity,
                              allowed=("per_group", "per_channel"),
                              reason=f"{self.name}: scales per group (per_channel = one group "
                              "per row)")
        if quant.act is not None:
            raise ConfigError("quant.act", "present", show_value=False,
                              reason=f"{self.name} is weight-only (remove quant.act)")
        if not w.symmetric and not w.round_zp:
            raise ConfigError("quant.weight.round_zp", False, allowed=(True,),
                              reason=f"{self.name} stores integer zero points")
        if w.granularity == "per_group":
            dims = BackendSpec.linear_in_features(config)
            bad = {k: v for k, v in (dims or {}).items() if v % w.group_size}
            if bad:
                raise ConfigError("quant.weight.group_size", w.group_size,
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
