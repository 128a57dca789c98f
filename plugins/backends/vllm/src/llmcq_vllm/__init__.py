"""vLLM / SGLang exports in the compressed-tensors layout (llmc's ``save_vllm``, ``save_sgl``).

Torch-free: ``llmcq validate`` imports this module to run :meth:`CompressedTensorsSpec.supports`
before any model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from llmcq.api import BackendSpec
from llmcq.errors import ConfigError

if TYPE_CHECKING:
    from llmcq.config.schema import RunConfig

__all__ = ["VLLM_SPEC", "SGL_SPEC", "LIGHTLLM_SPEC", "CompressedTensorsSpec", "LightLLMSpec",
           "check_config"]

#: weight bits vLLM's compressed-tensors schemes read (WNA16: 4 and 8; W8A8; W4A8)
WEIGHT_ONLY_BITS = (4, 8)
#: group sizes vLLM's Marlin / machete kernels accept for grouped int weights
VLLM_GROUP_SIZES = (32, 64, 128)


def _gptq_writes_g_idx(config: RunConfig) -> bool:
    """GPTQ with act-order and dynamic groups stores ``g_idx`` (columns out of group order)."""
    sp = None if config.quant is None else config.quant.special_of("gptq")
    if sp is None or config.quant is None or config.quant.weight is None:
        return False
    return (config.quant.weight.granularity == "per_group" and sp.get("actorder", True)
            and not sp.get("static_groups", False))


def check_config(config: RunConfig, *, path: str, name: str) -> None:
    """Refuse, naming the field, what the compressed-tensors schemes vLLM reads cannot hold."""
    quant = config.quant
    if quant is None or quant.weight is None:
        raise ConfigError(path, True, reason=f"backend {name!r} exports quantized linears; "
                          "the config needs quant.weight")
    w, a = quant.weight, quant.act
    if w.is_float:
        # FP8 (e4m3): core already holds the section to what compressed-tensors'
        # float-quantized format and vLLM's FP8 schemes read (symmetric; weights per channel
        # or tensor; inputs absent (W8A16-FP8), dynamic per token or tensor, or static per
        # tensor; the same element type for both); nothing else to refuse.
        return
    if a is None:
        if w.bit not in WEIGHT_ONLY_BITS:
            raise ConfigError("quant.weight.bit", w.bit, allowed=WEIGHT_ONLY_BITS,
                              reason=f"{name}: vLLM's weight-only int kernels (WNA16) read "
                              "4- and 8-bit weights only")
        if w.granularity not in ("per_channel", "per_group"):
            raise ConfigError("quant.weight.granularity", w.granularity,
                              allowed=("per_channel", "per_group"),
                              reason=f"{name}: weight-only int weights need a scale per "
                              "channel or per group")
    else:
        if a.bit != 8:
            raise ConfigError("quant.act.bit", a.bit, allowed=(8,),
                              reason=f"{name}: vLLM quantizes activations to int8 only")
        if w.bit not in (4, 8):
            raise ConfigError("quant.weight.bit", w.bit, allowed=(4, 8),
                              reason=f"{name}: with int8 activations vLLM reads W8A8 and W4A8")
        if not w.symmetric:
            raise ConfigError("quant.weight.symmetric", w.symmetric, allowed=(True,),
                              reason=f"{name}: vLLM's W8A8/W4A8 int kernels need symmetric "
                              "weights (zero points are supported for activations only)")
        if a.granularity == "per_group":
            raise ConfigError("quant.act.granularity", a.granularity,
                              allowed=("per_token", "per_tensor"),
                              reason=f"{name}: no per-group activation scheme in vLLM")
        if not a.static and a.granularity != "per_token":
            raise ConfigError("quant.act.granularity", a.granularity, allowed=("per_token",),
                              reason=f"{name}: dynamic activations are quantized per token")
        if w.bit == 8 and w.granularity == "per_group":
            raise ConfigError("quant.weight.granularity", w.granularity,
                              allowed=("per_channel", "per_tensor"),
                              reason=f"{name}: W8A8 weights need a scale per channel or tensor")
        if w.bit == 4:
            if w.granularity == "per_tensor":
                raise ConfigError("quant.weight.granularity", w.granularity,
                                  allowed=("per_channel", "per_group"),
                                  reason=f"{name}: W4A8 weights need a scale per channel or group")
            if a.static or not a.symmetric:
                raise ConfigError("quant.act", "static" if a.static else "asymmetric",
                                  allowed="dynamic symmetric per_token",
                                  reason=f"{name}: vLLM's W4A8 int scheme reads dynamic "
                                  "symmetric per-token activations only", show_value=True)
    if not w.round_zp and not w.symmetric:
        raise ConfigError("quant.weight.round_zp", False, allowed=(True,),
                          reason=f"{name}: compressed-tensors stores integer zero points; "
                          "fractional zeros (HQQ-style) cannot be exported")
    if w.granularity == "per_group":
        if w.group_size not in VLLM_GROUP_SIZES:
            raise ConfigError("quant.weight.group_size", w.group_size, allowed=VLLM_GROUP_SIZES,
                              reason=f"{name}: group sizes vLLM's grouped int kernels accept")
        dims = BackendSpec.linear_in_features(config)
        bad = {k: v for k, v in (dims or {}).items() if v % w.group_size}
        if bad:
            widths = ", ".join(f"{k}={v}" for k, v in bad.items())
            raise ConfigError("quant.weight.group_size", w.group_size,
                              reason=f"{name}: every group must be whole, but the model's "
                              f"linear input widths {widths} are not multiples of it "
                              "(partial groups cannot be packed); choose a group size that "
                              "divides them or per_channel")
    if _gptq_writes_g_idx(config):
        raise ConfigError("quant.special.actorder", True, allowed=(False,),
                          reason=f"{name}: compressed-tensors (>=0.20) stores no g_idx, so "
                          "GPTQ act-order with dynamic groups cannot be exported; set "
                          "static_groups: True (act-order kept, groups contiguous) or "
                          "actorder: False")


@dataclass(frozen=True, kw_only=True)
class CompressedTensorsSpec(BackendSpec):
    def supports(self, config: RunConfig, *, path: str) -> None:
        super().supports(config, path=path)
        check_config(config, path=path, name=self.name)


VLLM_SPEC = CompressedTensorsSpec(
    name="vllm",
    summary="compressed-tensors checkpoint for vLLM: pack-quantized W4A16/W8A16, "
            "int-quantized W8A8 and W4A8, float-quantized FP8 (e4m3)",
    impl="llmcq_vllm.export:export",
    folder="vllm_quant_model",
    requires=("compressed-tensors",),
    weight_formats=("int", "float"),
)

SGL_SPEC = CompressedTensorsSpec(
    name="sglang",
    aliases=("sgl",),
    summary="compressed-tensors checkpoint for SGLang (the same layout as vllm)",
    impl="llmcq_vllm.export:export",
    folder="sgl_quant_model",
    requires=("compressed-tensors",),
    weight_formats=("int", "float"),
)


@dataclass(frozen=True, kw_only=True)
class LightLLMSpec(CompressedTensorsSpec):
    """LightLLM reads offline-quantized int8 checkpoints in its ``vllm-w8a8`` mode only: int8
    ``weight`` + ``weight_scale`` per output channel (+ ``input_scale`` when config.json says
    ``activation_scheme: static``), symmetric int8 activations."""

    def supports(self, config: RunConfig, *, path: str) -> None:
        super().supports(config, path=path)
        quant = config.quant
        assert quant is not None and quant.weight is not None
        w, a = quant.weight, quant.act
        if a is None or w.bit != 8:
            raise ConfigError("quant.act" if a is None else "quant.weight.bit",
                              "absent" if a is None else w.bit, allowed="W8A8 (bit 8 with an "
                              "8-bit quant.act)", reason="lightllm: its offline-quantized "
                              "int path (quant_type vllm-w8a8) reads W8A8 only")
        if w.granularity != "per_channel":
            raise ConfigError("quant.weight.granularity", w.granularity,
                              allowed=("per_channel",),
                              reason="lightllm: vllm-w8a8 takes one weight scale per channel")
        if not a.symmetric:
            raise ConfigError("quant.act.symmetric", False, allowed=(True,),
                              reason="lightllm: vllm-w8a8 quantizes activations symmetrically")
        if a.sym_range == "full" and not a.static:
            raise ConfigError("quant.act.sym_range", "full", allowed=("restricted",),
                              reason="lightllm: vllm-w8a8's scaled_int8_quant scales each token "
                              "by absmax / 127 at run time")


LIGHTLLM_SPEC = LightLLMSpec(
    name="lightllm",
    summary="int8 W8A8 checkpoint for LightLLM's vllm-w8a8 mode (compressed-tensors "
            "int-quantized layout, fp32 scales, activation_scheme in config.json)",
    impl="llmcq_vllm.export:export_lightllm",
    folder="lightllm_quant_model",
    requires=("compressed-tensors",),
)
