"""vLLM / SGLang exports in the compressed-tensors layout (llmc's ``save_vllm``, ``save_sgl``).

Torch-free: ``llmcq validate`` imports this module to run :meth:`CompressedTensorsSpec.supports`
before any model is loaded.

What the records hold beyond a uniform grid is declared in ``accepts`` (core refuses every
other record feature a run produces, at config time, with the producing algorithm's hint);
``supports`` checks the grids themselves through the run's typed specs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from llmcq.api import BackendSpec
from llmcq.errors import ConfigError
from llmcq.quant.spec import PerChannel, PerGroup, PerTensor, PerToken

if TYPE_CHECKING:
    from llmcq.api import ExportTarget, LayerTarget
    from llmcq.quant.spec import Granularity

__all__ = ["VLLM_SPEC", "SGL_SPEC", "LIGHTLLM_SPEC", "SPARSE", "CompressedTensorsSpec", "LightLLMSpec",
           "check_grids", "check_fused", "ACCEPTS", "REFUSALS"]

#: weight bits vLLM's compressed-tensors schemes read (WNA16: 4 and 8; W8A8; W4A8)
WEIGHT_ONLY_BITS = (4, 8)
#: group sizes vLLM's Marlin / machete kernels accept for grouped int weights
VLLM_GROUP_SIZES = (32, 64, 128)

#: record features the compressed-tensors writer holds: quantized activations (static
#: ``input_scale``/``input_zero_point`` or dynamic schemes), FP8 codes (float-quantized),
#: linears on different grids (one ``config_groups`` scheme per grid, its linears as
#: targets) and linears kept in float (the config's ``ignore`` list)
#: and an FP8 KV cache (``kv_cache_scheme`` with k/v scales, :mod:`llmcq_vllm.kvcache`)
ACCEPTS = frozenset({"act_quant", "float_format", "layer_grids", "float_linears",
                     "kv_cache_quant"})
#: pruned weights (``sparsity_mask``) are written in the same dense layouts, as the codes of
#: exact zero (:mod:`llmcq_vllm.sparse`): compressed-tensors >= 0.15 has no sparse compressor
#: left and vLLM >= 0.19.1 no sparse kernel, so no ``sparsity_config`` is written
SPARSE = frozenset({"sparsity_mask"})
#: why the others cannot be written (the generic sentence serves the rest)
REFUSALS = {
    "g_idx": "cannot write columns quantized out of group order (g_idx; compressed-tensors "
             ">= 0.20 stores no g_idx, its groups are consecutive columns)",
    "fractional_zero": "cannot write fractional zero points (compressed-tensors stores "
                       "integer int8 zero points)",
}


def gran_name(g: Granularity) -> str:
    """The YAML spelling of a granularity (``per_group``, not ``per_group(128)``)."""
    return str(g).split("(")[0]


def check_grids(target: ExportTarget, *, name: str) -> None:
    """Refuse, naming the YAML key, grids the compressed-tensors schemes vLLM reads cannot
    hold (read from the run's typed specs)."""
    w, a = target.specs.weight, target.specs.act
    assert w is not None  # BackendSpec.supports refused a run without quant.weight
    if w.is_float:
        # FP8 (e4m3): core already holds the section to what compressed-tensors'
        # float-quantized format and vLLM's FP8 schemes read (symmetric; weights per channel
        # or tensor; inputs absent (W8A16-FP8), dynamic per token or tensor, or static per
        # tensor; the same element type for both); nothing else to refuse.
        return
    wg = w.granularity
    if a is None:
        if w.bits not in WEIGHT_ONLY_BITS:
            raise ConfigError("quant.weight.bit", w.bits, allowed=WEIGHT_ONLY_BITS,
                              reason=f"{name}: vLLM's weight-only int kernels (WNA16) read "
                              "4- and 8-bit weights only")
        if not isinstance(wg, (PerChannel, PerGroup)):
            raise ConfigError("quant.weight.granularity", gran_name(wg),
                              allowed=("per_channel", "per_group"),
                              reason=f"{name}: weight-only int weights need a scale per "
                              "channel or per group")
    else:
        if a.bits != 8:
            raise ConfigError("quant.act.bit", a.bits, allowed=(8,),
                              reason=f"{name}: vLLM quantizes activations to int8 only")
        if w.bits not in (4, 8):
            raise ConfigError("quant.weight.bit", w.bits, allowed=(4, 8),
                              reason=f"{name}: with int8 activations vLLM reads W8A8 and W4A8")
        if not w.symmetric:
            raise ConfigError("quant.weight.symmetric", w.symmetric, allowed=(True,),
                              reason=f"{name}: vLLM's W8A8/W4A8 int kernels need symmetric "
                              "weights (zero points are supported for activations only)")
        if isinstance(a.granularity, PerGroup):
            raise ConfigError("quant.act.granularity", gran_name(a.granularity),
                              allowed=("per_token", "per_tensor"),
                              reason=f"{name}: no per-group activation scheme in vLLM")
        if not a.static and not isinstance(a.granularity, PerToken):
            raise ConfigError("quant.act.granularity", gran_name(a.granularity),
                              allowed=("per_token",),
                              reason=f"{name}: dynamic activations are quantized per token")
        if w.bits == 8 and isinstance(wg, PerGroup):
            raise ConfigError("quant.weight.granularity", gran_name(wg),
                              allowed=("per_channel", "per_tensor"),
                              reason=f"{name}: W8A8 weights need a scale per channel or tensor")
        if w.bits == 4:
            if isinstance(wg, PerTensor):
                raise ConfigError("quant.weight.granularity", gran_name(wg),
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
    if isinstance(wg, PerGroup):
        if wg.size not in VLLM_GROUP_SIZES:
            raise ConfigError("quant.weight.group_size", wg.size, allowed=VLLM_GROUP_SIZES,
                              reason=f"{name}: group sizes vLLM's grouped int kernels accept")
        dims = BackendSpec.linear_in_features(target.config)
        bad = {k: v for k, v in (dims or {}).items() if v % wg.size}
        if bad:
            widths = ", ".join(f"{k}={v}" for k, v in bad.items())
            raise ConfigError("quant.weight.group_size", wg.size,
                              reason=f"{name}: every group must be whole, but the model's "
                              f"linear input widths {widths} are not multiples of it "
                              "(partial groups cannot be packed); choose a group size that "
                              "divides them or per_channel")


def check_fused(target: LayerTarget, *, name: str) -> None:
    """vLLM runs the linears reading one input (q/k/v, gate/up) as one fused layer, and a
    block's MoE experts as one layer, each with one compressed-tensors scheme (a fused
    layer partly in ``ignore`` or with shards of different schemes is refused when vLLM
    loads it): their linears must share grids, or all stay in float."""
    for names in (*target.shared_input, *target.experts):
        specs = {n: target.plan.spec(n) for n in names}
        grids = {s.grids() for s in specs.values()}
        if len(grids) == 1:
            continue
        origins = sorted({s.origin for s in specs.values()})
        key = next((o for o in origins if o != "quant.weight"), origins[0])
        detail = "; ".join(f"{n.rsplit('.', 1)[-1] if '.' in n else n}: {s.describe()} "
                           f"({s.origin})" for n, s in specs.items())
        raise ConfigError(key, None, show_value=False, reason=f"{name} ({target.path}): "
                          f"vLLM runs {', '.join(names)} as one fused layer with one "
                          f"quantization scheme, but they get different grids ({detail}); "
                          "give all of them the same setting (name each in it)")


@dataclass(frozen=True, kw_only=True)
class CompressedTensorsSpec(BackendSpec):
    accepts: frozenset[str] = ACCEPTS | SPARSE
    refusals: dict[str, str] = field(default_factory=lambda: dict(REFUSALS))
    #: a pruned run without quant.weight exports the float model (vLLM, SGLang run it as is)
    pruned_float: bool = True

    def supports(self, target: ExportTarget) -> None:
        if self.pruned_float and target.specs.weight is None and \
                target.specs.sparsity is not None:
            return  # pruned, not quantized: the float model, dense with its zeros
        from llmcq_vllm.kvcache import check_kv

        super().supports(target)
        check_grids(target, name=self.name)
        check_kv(target, name=self.name)

    def check_layers(self, target: LayerTarget) -> None:
        check_fused(target, name=self.name)


VLLM_SPEC = CompressedTensorsSpec(
    name="vllm",
    summary="compressed-tensors checkpoint for vLLM: pack-quantized W4A16/W8A16, "
            "int-quantized W8A8 and W4A8, float-quantized FP8 (e4m3)",
    impl="llmcq_vllm.export:export",
    folder="vllm_quant_model",
    requires=("compressed-tensors",),
)

SGL_SPEC = CompressedTensorsSpec(
    name="sglang",
    aliases=("sgl",),
    summary="compressed-tensors checkpoint for SGLang (the same layout as vllm)",
    impl="llmcq_vllm.export:export",
    folder="sgl_quant_model",
    requires=("compressed-tensors",),
)


@dataclass(frozen=True, kw_only=True)
class LightLLMSpec(CompressedTensorsSpec):
    """LightLLM reads offline-quantized int8 checkpoints in its ``vllm-w8a8`` mode only: int8
    ``weight`` + ``weight_scale`` per output channel (+ ``input_scale`` when config.json says
    ``activation_scheme: static``), symmetric int8 activations."""

    accepts: frozenset[str] = frozenset({"act_quant"}) | SPARSE
    pruned_float: bool = False
    refusals: dict[str, str] = field(default_factory=lambda: {
        **REFUSALS,
        "float_format": "cannot write FP8 codes (its offline-quantized path, quant_type "
                        "vllm-w8a8, reads int8 W8A8 only; FP8 exports through vllm/sglang)",
        "layer_grids": "cannot write linears on different grids (its vllm-w8a8 mode takes "
                       "one W8A8 scheme for the whole model)",
        "float_linears": "cannot write linears kept in float (its vllm-w8a8 mode quantizes "
                         "every linear of the blocks)"})

    def supports(self, target: ExportTarget) -> None:
        super().supports(target)
        w, a = target.specs.weight, target.specs.act
        assert w is not None
        if a is None or w.bits != 8:
            raise ConfigError("quant.act" if a is None else "quant.weight.bit",
                              "absent" if a is None else w.bits, allowed="W8A8 (bit 8 with an "
                              "8-bit quant.act)", reason="lightllm: its offline-quantized "
                              "int path (quant_type vllm-w8a8) reads W8A8 only")
        if not isinstance(w.granularity, PerChannel):
            raise ConfigError("quant.weight.granularity", gran_name(w.granularity),
                              allowed=("per_channel",),
                              reason="lightllm: vllm-w8a8 takes one weight scale per channel")
        if not a.symmetric:
            raise ConfigError("quant.act.symmetric", False, allowed=(True,),
                              reason="lightllm: vllm-w8a8 quantizes activations symmetrically")
        if a.full_range and not a.static:
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
