"""GPTQ-format checkpoints (AutoGPTQ / GPTQModel layout) from llmcq's records
(llmc's ``save_autogptq``). Torch-free."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from llmcq.api import BackendSpec
from llmcq.errors import ConfigError

if TYPE_CHECKING:
    from llmcq.config.schema import RunConfig

__all__ = ["SPEC", "GPTQFormatSpec", "BITS"]

#: widths AutoGPTQ/GPTQModel pack (3 bits: 32 codes in 3 words, two codes split across words)
BITS = (2, 3, 4, 8)


@dataclass(frozen=True, kw_only=True)
class GPTQFormatSpec(BackendSpec):
    def supports(self, config: RunConfig, *, path: str) -> None:
        super().supports(config, path=path)
        quant = config.quant
        if quant is None or quant.weight is None:
            raise ConfigError(path, True, reason="gptq format exports quantized linears; the "
                              "config needs quant.weight")
        w = quant.weight
        if w.bit not in BITS:
            raise ConfigError("quant.weight.bit", w.bit, allowed=BITS,
                              reason="gptq format: the widths AutoGPTQ/GPTQModel pack")
        if w.granularity not in ("per_group", "per_channel"):
            raise ConfigError("quant.weight.granularity", w.granularity,
                              allowed=("per_group", "per_channel"),
                              reason="gptq format: scales per group (per_channel = one group)")
        if quant.act is not None:
            raise ConfigError("quant.act", "present", show_value=False,
                              reason="gptq format is weight-only (remove quant.act)")
        if not w.symmetric and not w.round_zp:
            raise ConfigError("quant.weight.round_zp", False, allowed=(True,),
                              reason="gptq format stores integer zero points")
        dims = BackendSpec.linear_in_features(config)
        bad = {k: v for k, v in (dims or {}).items() if v % 32}
        if bad:
            raise ConfigError("quant.weight.bit", w.bit, reason="gptq format: input widths "
                              + ", ".join(f"{k}={v}" for k, v in bad.items())
                              + " are not multiples of 32 (one packed block of rows)")


SPEC = GPTQFormatSpec(
    name="gptq",
    aliases=("gptq_format", "autogptq", "gptqmodel"),
    summary="GPTQ checkpoint (qweight/qzeros/scales/g_idx, quantize_config.json) for "
            "GPTQModel, AutoGPTQ, transformers and vLLM",
    impl="llmcq_gptqformat.export:export",
    folder="gptq_quant_model",
)
