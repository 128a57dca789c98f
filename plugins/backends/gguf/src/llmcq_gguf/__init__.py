"""GGUF files for llama.cpp from llmcq's quantized records (``save_gguf``). Torch-free.

Record features beyond a uniform grid: fractional zero points, and per-linear grids
(``quant.mix_bits``: each tensor in its own type; ``ignored_layers``: F32 tensors) as
``accepts`` says; core refuses the others at config time. ``supports`` checks the grid through
the run's typed specs (core runs it for every ``quant.mix_bits`` setting's grid too)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from llmcq.api import BackendSpec
from llmcq.errors import ConfigError
from llmcq.quant.spec import PerGroup

if TYPE_CHECKING:
    from llmcq.api import ExportTarget
    from llmcq.config.schema import RunConfig

__all__ = ["SPEC", "GGUFSpec", "ggml_type_for", "BLOCK", "MODEL_TYPES"]

#: llama.cpp's block width for Q4_0, Q4_1 and Q8_0
BLOCK = 32
#: HF model types written (llama.cpp architecture "llama": same tensor names, same Q/K
#: row permutation)
MODEL_TYPES = ("llama", "mistral")


def ggml_type_for(bits: int, symmetric: bool) -> str | None:
    """The llama.cpp type whose grid is exactly llmcq's: Q8_0 = signed 8-bit times d,
    Q4_0 = (nibble - 8) times d (llmcq's signed 4-bit grid), Q4_1 = nibble times d plus m
    (llmcq's unsigned 4-bit grid with m = -zero * scale)."""
    return {(8, True): "Q8_0", (4, True): "Q4_0", (4, False): "Q4_1"}.get((bits, symmetric))


def _model_type(config: RunConfig) -> str | None:
    from llmcq.model.loading import locate, peek_model_type

    try:
        return peek_model_type(locate(config.model.path))
    except ConfigError:
        return None


@dataclass(frozen=True, kw_only=True)
class GGUFSpec(BackendSpec):
    def supports(self, target: ExportTarget) -> None:
        super().supports(target)
        w = target.specs.weight
        assert w is not None  # BackendSpec.supports refused a run without quant.weight
        if ggml_type_for(w.bits, w.symmetric) is None:
            allowed = "bit 8 symmetric (Q8_0), bit 4 symmetric (Q4_0), bit 4 asymmetric (Q4_1)"
            field = "quant.weight.bit" if w.bits not in (4, 8) else "quant.weight.symmetric"
            raise ConfigError(field, w.bits if field.endswith("bit") else w.symmetric,
                              allowed=allowed, reason="gguf: no llama.cpp type holds this "
                              "grid exactly")
        g = w.granularity
        if not isinstance(g, PerGroup) or g.size != BLOCK:
            per_group = isinstance(g, PerGroup)
            raise ConfigError("quant.weight.group_size" if per_group
                              else "quant.weight.granularity",
                              g.size if per_group else str(g),
                              allowed="per_group with group_size 32",
                              reason="gguf: Q4_0/Q4_1/Q8_0 hold one scale per 32 weights")
        dims = BackendSpec.linear_in_features(target.config)
        bad = {k: v for k, v in (dims or {}).items() if v % BLOCK}
        if bad:
            raise ConfigError("quant.weight.group_size", g.size,
                              reason="gguf: linear input widths "
                              + ", ".join(f"{k}={v}" for k, v in bad.items())
                              + " are not multiples of 32")
        mtype = _model_type(target.config)
        if mtype is not None and mtype not in MODEL_TYPES:
            raise ConfigError("model.type", mtype, allowed=MODEL_TYPES,
                              reason="gguf: tensor names and layout are written for "
                              "llama.cpp's llama architecture")


SPEC = GGUFSpec(
    name="gguf",
    aliases=("llamacpp", "llama_cpp"),
    summary="GGUF for llama.cpp: Q8_0 / Q4_0 / Q4_1 blocks written from the records' codes",
    impl="llmcq_gguf.export:export",
    folder="gguf_quant_model",
    requires=("gguf",),
    # Q4_1 stores m = -zero * scale in fp16, so a fractional zero point (HQQ, round_zp:
    # False) is written as faithfully as an integral one; every tensor of a GGUF file has
    # its own type, so linears on different grids (each one of Q8_0/Q4_0/Q4_1) and linears
    # kept in float (F32) are written as they are
    accepts=frozenset({"fractional_zero", "layer_grids", "float_linears"}),
    refusals={
        "act_quant": "cannot write activation quantization (llama.cpp quantizes activations "
                     "itself; the file holds weights only)",
        "g_idx": "cannot write columns quantized out of group order (g_idx; a Q4_0/Q4_1/Q8_0 "
                 "block holds 32 consecutive columns)",
        "float_format": "cannot write FP8 codes (Q4_0/Q4_1/Q8_0 hold integer codes)",
        "group_bits": "cannot write per-group bit widths (one llama.cpp type per tensor)",
    },
)
