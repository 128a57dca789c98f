"""FP8 KV-cache scales for vLLM: compressed-tensors' ``kv_cache_scheme`` (``quant.kvcache``).

vLLM's FP8 KV cache (``kv_cache_dtype: fp8``) reads one static scale per attention layer for
keys and one for values: ``<attention>.k_scale`` and ``<attention>.v_scale`` in the
checkpoint, and ``quantization_config.kv_cache_scheme`` (``num_bits: 8, type: float,
strategy: tensor, dynamic: false, symmetric: true``) in ``config.json``, the layout
llm-compressor writes. The scales are llmcq's static per-tensor E4M3 scales
(``max|k| / 448`` over the calibration data, :func:`llmcq.quant.kvcache.calibrate_static`),
fitted through the fake-quantized model, the same ones the ``fake_quant`` evaluation used.

The configuration check is torch-free (``llmcq validate`` runs it); the tensors are built at
export time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llmcq.errors import ConfigError

if TYPE_CHECKING:
    from llmcq.api import ExportTarget
    from llmcq.quant.spec import KVQuantSpec

__all__ = ["check_kv", "kv_cache_args", "kv_cache_export"]

_P = "quant.kvcache"


def check_kv(target: ExportTarget, *, name: str) -> None:
    """Refuse, naming the key, KV-cache settings vLLM's FP8 cache cannot read."""
    kv = target.specs.kv
    if kv is None:
        return
    why = f"{name}: vLLM's quantized KV cache is FP8 with one static scale per layer"
    if kv.method != "naive":
        raise ConfigError(f"{_P}.method", "Kivi", allowed=("Naive",), reason=why)
    if not kv.is_float:
        raise ConfigError(f"{_P}.quant_type", "int-quant", allowed=("float-quant",),
                          reason=why + " (bit: e4m3)")
    if str(kv.key_granularity) != "per_tensor":
        raise ConfigError(f"{_P}.granularity", str(kv.key_granularity),
                          allowed=("per_tensor",), reason=why)
    if not kv.static:
        raise ConfigError(f"{_P}.static", False, allowed=(True,),
                          reason=why + " (fitted on the calib data)")


def kv_cache_args(kv: KVQuantSpec) -> dict[str, Any]:
    """``QuantizationArgs`` keywords of ``kv_cache_scheme`` (after :func:`check_kv`)."""
    return {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False,
            "symmetric": True}


def _attention_modules(model: Any) -> list[tuple[str, Any]]:
    """``(name, module)`` of each layer's attention (the module holding ``k_proj`` and
    ``v_proj``), in layer order."""
    found = [(n, m) for n, m in model.named_modules()
             if hasattr(m, "k_proj") and hasattr(m, "v_proj")]
    return sorted(found, key=lambda nm: getattr(nm[1], "layer_idx", 0))


def kv_cache_export(run: Any, model: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``(tensors, kv_cache_scheme kwargs)``: ``<attention>.k_scale`` / ``v_scale`` (float32,
    shape ``[1]``) for the state dict, or ``({}, None)`` without ``quant.kvcache``."""
    import torch

    from llmcq.quant.kvcache import run_kv_cache

    kv = None if run is None else run.specs.kv
    if kv is None:
        return {}, None
    run_kv_cache(run, model, "fake_quant")  # fits (or reuses) the static ranges
    static = run.cache[("kv_static", "fake_quant")]
    attn = _attention_modules(model)
    if len(attn) != len(static):
        raise ValueError(f"{len(static)} KV-cache layers but {len(attn)} attention modules")
    out = {}
    for (name, _m), (ks, _kz, vs, _vz) in zip(attn, static):
        out[f"{name}.k_scale"] = ks.detach().float().reshape(1).cpu()
        out[f"{name}.v_scale"] = vs.detach().float().reshape(1).cpu()
    return out, kv_cache_args(kv)
