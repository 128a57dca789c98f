"""TensorRT-LLM checkpoints (llmc's ``save_trtllm``): ``config.json`` and one
``rank{r}.safetensors`` per rank, the folder ``trtllm-build --checkpoint_dir`` reads.

Torch-free: ``llmcq validate`` imports this module to run :meth:`TRTLLMSpec.supports` before
any model is loaded. Which TensorRT-LLM ``quant_algo`` a run exports to follows from the run's
typed specs (see :func:`quant_algo_for`); every grid the format cannot hold is refused here,
naming the YAML key. Record features beyond a uniform grid are declared in ``SPEC.accepts``
(dynamic activation quantization, fractional zero points) and core refuses the others.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llmcq.api import BackendSpec
from llmcq.errors import ConfigError
from llmcq.quant.spec import PerChannel, PerGroup, PerToken

if TYPE_CHECKING:
    from llmcq.api import ExportTarget
    from llmcq.config.schema import RunConfig
    from llmcq.quant.spec import Granularity
    from llmcq.specs import RunSpecs

__all__ = ["SPEC", "TRTLLMSpec", "TRTLLMOptions", "FAMILIES", "GROUP_SIZES", "quant_algo_for",
           "model_dims", "check_shapes", "W4A16_AWQ", "W8A16", "W8A8_SQ"]

#: llmcq model family -> TensorRT-LLM ``architecture`` (tensorrt_llm/models/__init__.py
#: MODEL_MAP: Llama and Mistral load as LLaMAForCausalLM, Qwen2 as QWenForCausalLM, all with
#: the Llama weight layout: fused qkv, dense, gated mlp fc/gate/proj, RMS norms)
FAMILIES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM"}
#: group sizes of TensorRT-LLM's fine-grained int4 kernel (weight_only_groupwise_quant_matmul)
GROUP_SIZES = (64, 128)

W4A16_AWQ = "W4A16_AWQ"
W8A16 = "W8A16"
W8A8_SQ = "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN"
EXPORTED_ALGOS = (W4A16_AWQ, W8A16, W8A8_SQ)
#: names TensorRT-LLM knows but this exporter cannot write from an integer record
_NOT_WRITTEN = ("W4A16", "W4A16_GPTQ", "W8A16_GPTQ", "W4A8_AWQ", "W8A8_SQ_PER_CHANNEL",
                "W8A8_SQ_PER_TENSOR_PLUGIN", "W8A8_SQ_PER_CHANNEL_PER_TENSOR_PLUGIN",
                "W8A8_SQ_PER_TENSOR_PER_TOKEN_PLUGIN", "W4A8_QSERVE_PER_GROUP",
                "W4A8_QSERVE_PER_CHANNEL", "FP8", "FP8_PER_CHANNEL_PER_TOKEN",
                "FP8_BLOCK_SCALES", "NVFP4", "MIXED_PRECISION")
_FP8_REASON = ("trtllm: this exporter writes integer checkpoints only; FP8 (e4m3) records "
               "(quant_type: float-quant) export through vllm/sglang, not as TensorRT-LLM FP8 "
               "checkpoints yet")
DTYPES = ("auto", "float16", "bfloat16")
_CFG = "save.trtllm_cfg"


@dataclass(frozen=True)
class TRTLLMOptions:
    """``save.trtllm_cfg`` (llmc's keys ``tp_size``, ``pp_size``; llmcq adds ``dtype`` and an
    optional ``quant_algo`` that must agree with the quant section)."""

    tp_size: int = 1
    pp_size: int = 1
    dtype: str = "auto"
    quant_algo: str | None = None
    kv_cache_quant_algo: str | None = None

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> TRTLLMOptions:
        known = ("tp_size", "pp_size", "dtype", "quant_algo", "kv_cache_quant_algo")
        for key in raw:
            if key not in known:
                raise ConfigError(f"{_CFG}.{key}", raw[key], allowed=known,
                                  reason="trtllm: unknown option")
        for key in ("tp_size", "pp_size"):
            v = raw.get(key, 1)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{_CFG}.{key}", v, allowed="a positive integer")
        dtype = str(raw.get("dtype", "auto")).lower()
        dtype = {"fp16": "float16", "half": "float16", "bf16": "bfloat16"}.get(dtype, dtype)
        if dtype not in DTYPES:
            raise ConfigError(f"{_CFG}.dtype", raw.get("dtype"), allowed=DTYPES,
                              reason="trtllm: activation dtype of the engine (the int4 and "
                              "int8 weight-only kernels run in float16 or bfloat16)")
        algo = raw.get("quant_algo")
        if algo is not None:
            algo = str(algo).upper()
            if algo.startswith("FP8") or "FP4" in algo:
                raise ConfigError(f"{_CFG}.quant_algo", raw["quant_algo"],
                                  allowed=EXPORTED_ALGOS, reason=_FP8_REASON)
            if algo not in EXPORTED_ALGOS:
                why = ("known to TensorRT-LLM but not written by this exporter (see the "
                       "plugin README)" if algo in _NOT_WRITTEN else "not a TensorRT-LLM "
                       "quant_algo this exporter writes")
                raise ConfigError(f"{_CFG}.quant_algo", raw["quant_algo"],
                                  allowed=EXPORTED_ALGOS, reason=f"trtllm: {why}")
        kv = raw.get("kv_cache_quant_algo")
        if kv is not None:
            reason = (_FP8_REASON if str(kv).upper().startswith("FP8") else
                      "trtllm: KV-cache quantization is not part of llmcq's records (llmcq "
                      "does not implement quant.kvcache)")
            raise ConfigError(f"{_CFG}.kv_cache_quant_algo", kv, allowed=(None,), reason=reason)
        return cls(tp_size=raw.get("tp_size", 1), pp_size=raw.get("pp_size", 1), dtype=dtype,
                   quant_algo=algo)


def quant_algo_for(specs: RunSpecs) -> str:
    """The TensorRT-LLM ``quant_algo`` a run exports to (from its typed specs), or
    :class:`ConfigError` naming the YAML key that has no TensorRT-LLM checkpoint form."""
    w, a = specs.weight, specs.act
    if w is None:
        raise ConfigError("quant.weight", None, reason="trtllm exports quantized linears; the "
                          "config needs quant.weight")
    if w.is_float or (a is not None and a.is_float):
        raise ConfigError("quant.weight.quant_type" if w.is_float else "quant.act.quant_type",
                          "float-quant", allowed=("int-quant",), reason=_FP8_REASON)
    g = w.granularity
    if a is None:
        if w.bits == 4:
            if not isinstance(g, PerGroup):
                raise ConfigError("quant.weight.granularity", str(g),
                                  allowed=("per_group",),
                                  reason="trtllm: int4 weight-only checkpoints (W4A16_AWQ) "
                                  "hold scales per group of 64 or 128 input columns")
            if g.size not in GROUP_SIZES:
                raise ConfigError("quant.weight.group_size", g.size, allowed=GROUP_SIZES,
                                  reason="trtllm: group sizes of TensorRT-LLM's fine-grained "
                                  "int4 GEMM")
            return W4A16_AWQ
        if w.bits == 8:
            if not isinstance(g, PerChannel):
                raise ConfigError("quant.weight.granularity", _gran_name(g),
                                  allowed=("per_channel",),
                                  reason="trtllm: W8A16 holds one scale per output channel")
            if not w.symmetric:
                raise ConfigError("quant.weight.symmetric", False, allowed=(True,),
                                  reason="trtllm: W8A16 weights are symmetric (no zero point)")
            return W8A16
        raise ConfigError("quant.weight.bit", w.bits, allowed=(4, 8),
                          reason="trtllm: TensorRT-LLM's integer weight-only checkpoints hold "
                          "int4 (W4A16_AWQ) or int8 (W8A16) weights")
    if a.bits != 8 or w.bits != 8:
        field, value = ("quant.act.bit", a.bits) if a.bits != 8 else ("quant.weight.bit", w.bits)
        raise ConfigError(field, value, allowed=(8,),
                          reason="trtllm: with quantized activations the exported scheme is "
                          "SmoothQuant W8A8 (int8 weights and int8 activations)")
    if not w.symmetric or not isinstance(g, PerChannel):
        field = "quant.weight.symmetric" if not w.symmetric else "quant.weight.granularity"
        raise ConfigError(field, w.symmetric if not w.symmetric else _gran_name(g),
                          allowed="symmetric per_channel",
                          reason="trtllm: W8A8 SmoothQuant weights are symmetric int8 with one "
                          "scale per output channel")
    if a.static or not isinstance(a.granularity, PerToken) or not a.symmetric:
        raise ConfigError("quant.act", "static" if a.static else
                          (_gran_name(a.granularity) if a.symmetric else "asymmetric"),
                          show_value=True, allowed="dynamic symmetric per_token",
                          reason="trtllm: exported as W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN "
                          "(int8 activations quantized per token at run time)")
    if a.full_range:
        raise ConfigError("quant.act.sym_range", "full", allowed=("restricted",),
                          reason="trtllm: the SmoothQuant plugin scales each token by "
                          "absmax / 127 at run time")
    return W8A8_SQ


def _gran_name(g: Granularity) -> str:
    """The YAML spelling of a granularity (``per_group``, not ``per_group(128)``)."""
    return str(g).split("(")[0]


def _checkpoint_model_type(config: RunConfig) -> str | None:
    from llmcq.model.loading import locate, peek_model_type

    try:
        return peek_model_type(locate(config.model.path))
    except ConfigError:
        return None


def model_dims(config: RunConfig) -> dict[str, Any] | None:
    """Sizes the checkpoint layout depends on, read without torch (HF folder or GGUF)."""
    from llmcq.model.loading import locate, peek_dims

    try:
        return peek_dims(locate(config.model.path))
    except ConfigError:
        return None


def check_shapes(dims: dict[str, Any], algo: str, opts: TRTLLMOptions,
                 group_size: int | None, path: str = "save.save_trtllm") -> None:
    """Refuse mappings and group sizes the TensorRT-LLM layers cannot hold without padding
    (``group_size``: ``None`` per channel)."""
    tp, pp = opts.tp_size, opts.pp_size
    heads, kv, hd = dims["heads"], dims["kv_heads"], dims["head_dim"]
    if heads % tp:
        raise ConfigError(f"{_CFG}.tp_size", tp, reason=f"trtllm: {heads} attention heads are "
                          "not divisible by tp_size")
    if kv % tp and tp % kv:
        raise ConfigError(f"{_CFG}.tp_size", tp, reason=f"trtllm: {kv} key/value heads must "
                          "divide tp_size or be divisible by it")
    if dims["inter"] % tp:
        raise ConfigError(f"{_CFG}.tp_size", tp, reason=f"trtllm: intermediate size "
                          f"{dims['inter']} is not divisible by tp_size")
    if dims["layers"] and dims["layers"] % pp:
        raise ConfigError(f"{_CFG}.pp_size", pp, reason=f"trtllm: {dims['layers']} layers are "
                          "not divisible by pp_size")
    if algo == W8A8_SQ:
        return
    # TensorRT-LLM's weight-only linears pad in/out widths that are not multiples of
    # max(64, group) * tp_size (quantization/layers.py), which a checkpoint cannot match
    kv_rank = max(kv, tp)
    widths = {"hidden": dims["hidden"], "attention": heads * hd, "mlp": dims["inter"],
              "qkv": (heads + 2 * kv_rank) * hd}
    multiple = max(64, group_size or 0) * tp
    bad = {k: v for k, v in widths.items() if v % multiple}
    if not bad:
        return
    if any(v % 64 for v in bad.values()):  # no mapping or group helps: the model's widths
        field, value = path, True
        hint = "; export W8A8 (quant.act) or use another backend"
    elif any(v % (64 * tp) for v in bad.values()):
        field, value, hint = f"{_CFG}.tp_size", tp, "; choose a smaller tp_size"
    else:
        field, value, hint = "quant.weight.group_size", group_size, "; choose group_size 64"
    text = ", ".join(f"{k}={v}" for k, v in bad.items())
    raise ConfigError(field, value, reason=f"trtllm: {algo} linears need widths that are "
                      f"multiples of max(64, group) * tp_size = {multiple} (TensorRT-LLM pads "
                      f"the others, which a checkpoint cannot match), but the model has {text}"
                      + hint)


@dataclass(frozen=True, kw_only=True)
class TRTLLMSpec(BackendSpec):
    def supports(self, target: ExportTarget) -> None:
        super().supports(target)
        config = target.config
        opts = TRTLLMOptions.parse(dict(config.save.trtllm_cfg))
        algo = quant_algo_for(target.specs)
        if opts.quant_algo is not None and opts.quant_algo != algo:
            raise ConfigError(f"{_CFG}.quant_algo", opts.quant_algo, allowed=(algo,),
                              reason="trtllm: the quant section exports as " + algo)
        family = (config.model.type or _checkpoint_model_type(config) or "").lower()
        if family and family not in FAMILIES:
            raise ConfigError("model.type", config.model.type or family,
                              allowed=tuple(FAMILIES),
                              reason="trtllm: families whose TensorRT-LLM layout is the Llama "
                              "one (fused qkv, gated mlp fc/gate/proj)")
        w = target.specs.weight
        assert w is not None
        dims = model_dims(config)
        if dims is not None:
            check_shapes(dims, algo, opts, w.group_size, target.path)


SPEC = TRTLLMSpec(
    name="trtllm",
    aliases=("tensorrt_llm", "tensorrt-llm", "trt_llm"),
    summary="TensorRT-LLM checkpoint (config.json + rank{r}.safetensors, tensor/pipeline "
            "parallel) for trtllm-build: W4A16_AWQ, W8A16, W8A8 SmoothQuant per-token",
    impl="llmcq_trtllm.export:export",
    folder="trtllm_checkpoint",
    # W8A8 SmoothQuant with per-token dynamic activations; W4A16_AWQ's additive zero term
    # (8 - z) * s holds a fractional zero point as well as an integral one. Nothing else:
    # no g_idx, FP8, mixed bits, float columns, masks or transforms in these layouts.
    accepts=frozenset({"act_quant", "fractional_zero"}),
    accepts_detail={"act_quant": ("dynamic",)},
    refusals={
        "act_quant": "cannot write static activation scales (quantized activations are "
                     "exported as W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN: int8, quantized per "
                     "token at run time)",
        "g_idx": "cannot write columns quantized out of group order (g_idx; the W4A16_AWQ "
                 "layout holds groups of consecutive columns)",
        "float_format": "cannot write FP8 codes (this exporter writes integer checkpoints "
                        "only; FP8 (e4m3) records export through vllm/sglang, not as "
                        "TensorRT-LLM FP8 checkpoints yet)",
        "kv_cache_quant": "cannot write a quantized KV cache (kv_cache_quant_algo is not "
                          "written yet)",
        "layer_grids": "cannot write linears on different grids (one quant_algo in the "
                       "checkpoint's config.json; per-layer quant_cfg is not written)",
        "float_linears": "cannot write linears kept in float (exclude_modules is not "
                         "written: every block linear is exported quantized)",
    },
)
