"""GGUF files for llama.cpp from llmcq's quantized records (``save_gguf``). Torch-free."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from llmcq.api import BackendSpec
from llmcq.errors import ConfigError

if TYPE_CHECKING:
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
    def supports(self, config: RunConfig, *, path: str) -> None:
        super().supports(config, path=path)
        quant = config.quant
        if quant is None or quant.weight is None:
            raise ConfigError(path, True, reason="gguf exports quantized linears; the config "
                              "needs quant.weight")
        w = quant.weight
        if ggml_type_for(w.bit, w.symmetric) is None:
            allowed = "bit 8 symmetric (Q8_0), bit 4 symmetric (Q4_0), bit 4 asymmetric (Q4_1)"
            field = "quant.weight.bit" if w.bit not in (4, 8) else "quant.weight.symmetric"
            raise ConfigError(field, w.bit if field.endswith("bit") else w.symmetric,
                              allowed=allowed, reason="gguf: no llama.cpp type holds this "
                              "grid exactly")
        if w.granularity != "per_group" or w.group_size != BLOCK:
            raise ConfigError("quant.weight.group_size" if w.granularity == "per_group"
                              else "quant.weight.granularity",
                              w.group_size if w.granularity == "per_group" else w.granularity,
                              allowed="per_group with group_size 32",
                              reason="gguf: Q4_0/Q4_1/Q8_0 hold one scale per 32 weights")
        if quant.act is not None:
            raise ConfigError("quant.act", "present", show_value=False,
                              reason="gguf: llama.cpp quantizes activations itself; the "
                              "file holds weights only (remove quant.act)")
        dims = BackendSpec.linear_in_features(config)
        bad = {k: v for k, v in (dims or {}).items() if v % BLOCK}
        if bad:
            raise ConfigError("quant.weight.group_size", w.group_size,
                              reason="gguf: linear input widths "
                              + ", ".join(f"{k}={v}" for k, v in bad.items())
                              + " are not multiples of 32")
        mtype = _model_type(config)
        if mtype is not None and mtype not in MODEL_TYPES:
            raise ConfigError("model.type", mtype, allowed=MODEL_TYPES,
                              reason="gguf: tensor names and layout are written for "
                              "llama.cpp's llama architecture")
        _refuse_g_idx(config)


def _refuse_g_idx(config: RunConfig) -> None:
    quant = config.quant
    assert quant is not None
    names = [m.lower() for m in quant.methods]
    if "gptq" not in names:
        return
    special = quant.special or {}
    if len(names) > 1:
        special = next((v for k, v in special.items() if k.lower() == "gptq"
                        and isinstance(v, dict)), {})
    if special.get("actorder", True) and not special.get("static_groups", False):
        raise ConfigError("quant.special.actorder", True, allowed=(False,),
                          reason="gguf: blocks hold 32 consecutive columns, so GPTQ act-order "
                          "with dynamic groups (g_idx) cannot be written; set static_groups: "
                          "True (act-order kept, groups contiguous) or actorder: False")


SPEC = GGUFSpec(
    name="gguf",
    aliases=("llamacpp", "llama_cpp"),
    summary="GGUF for llama.cpp: Q8_0 / Q4_0 / Q4_1 blocks written from the records' codes",
    impl="llmcq_gguf.export:export",
    folder="gguf_quant_model",
    requires=("gguf",),
)
