"""GPTQ-format checkpoints (AutoGPTQ / GPTQModel layout) from llmcq's records
(llmc's ``save_autogptq``). Torch-free.

Record features beyond a uniform grid: ``g_idx`` (the layout's ``g_idx`` tensor holds the group
of every input column, ``desc_act: true``), nothing else (``accepts``); core refuses the others
at config time. ``supports`` checks the grid through the run's typed specs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from llmcq.api import BackendSpec
from llmcq.errors import ConfigError
from llmcq.quant.spec import PerChannel, PerGroup

if TYPE_CHECKING:
    from llmcq.api import ExportTarget

__all__ = ["SPEC", "GPTQFormatSpec", "BITS"]

#: widths AutoGPTQ/GPTQModel pack (3 bits: 32 codes in 3 words, two codes split across words)
BITS = (2, 3, 4, 8)


@dataclass(frozen=True, kw_only=True)
class GPTQFormatSpec(BackendSpec):
    def supports(self, target: ExportTarget) -> None:
        super().supports(target)
        w = target.specs.weight
        assert w is not None  # BackendSpec.supports refused a run without quant.weight
        if w.bits not in BITS:
            raise ConfigError("quant.weight.bit", w.bits, allowed=BITS,
                              reason="gptq format: the widths AutoGPTQ/GPTQModel pack")
        if not isinstance(w.granularity, (PerGroup, PerChannel)):
            raise ConfigError("quant.weight.granularity", str(w.granularity),
                              allowed=("per_group", "per_channel"),
                              reason="gptq format: scales per group (per_channel = one group)")
        if not w.symmetric and not w.round_zp:
            raise ConfigError("quant.weight.round_zp", False, allowed=(True,),
                              reason="gptq format stores integer zero points")
        dims = BackendSpec.linear_in_features(target.config)
        bad = {k: v for k, v in (dims or {}).items() if v % 32}
        if bad:
            raise ConfigError("quant.weight.bit", w.bits, reason="gptq format: input widths "
                              + ", ".join(f"{k}={v}" for k, v in bad.items())
                              + " are not multiples of 32 (one packed block of rows)")


SPEC = GPTQFormatSpec(
    name="gptq",
    aliases=("gptq_format", "autogptq", "gptqmodel"),
    summary="GPTQ checkpoint (qweight/qzeros/scales/g_idx, quantize_config.json) for "
            "GPTQModel, AutoGPTQ, transformers and vLLM",
    impl="llmcq_gptqformat.export:export",
    folder="gptq_quant_model",
    accepts=frozenset({"g_idx"}),
    refusals={
        "act_quant": "cannot write activation quantization (the GPTQ format is weight-only)",
        "fractional_zero": "cannot write fractional zero points (qzeros are packed integers)",
        "group_bits": "cannot write per-group bit widths (one bits value per checkpoint)",
        "float_columns": "cannot write float columns (OWQ): the layout has no place for them",
        "float_format": "cannot write FP8 codes (the layout packs integer codes)",
        "layer_grids": "cannot write linears on different grids (one bits/group_size in "
                       "quantize_config.json; GPTQModel's per-module 'dynamic' overrides are "
                       "not written)",
        "float_linears": "cannot write linears kept in float (readers quantize every block "
                         "linear; no skip list is written)",
    },
)
