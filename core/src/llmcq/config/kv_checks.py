"""Config-time rules of ``quant.kvcache`` that span several keys (torch-free).

Each error names the key to change and the values it may take."""

from __future__ import annotations

from llmcq.config.schema import FLOAT_BITS, KVCacheSection, RunConfig
from llmcq.errors import ConfigError

__all__ = ["check_kvcache", "check_kv_evals"]

_P = "quant.kvcache"


def check_kvcache(kv: KVCacheSection) -> None:
    """Refuse the ``quant.kvcache`` settings llmcq does not implement, naming the key."""
    if kv.quant_type == "float-quant":
        if kv.bit not in FLOAT_BITS:
            raise ConfigError(f"{_P}.bit", kv.bit, allowed=FLOAT_BITS,
                              reason="float-quant: the FP8 element format")
        if not kv.symmetric:
            raise ConfigError(f"{_P}.symmetric", False, allowed=(True,),
                              reason="float-quant grids are symmetric (no zero point)")
    elif not isinstance(kv.bit, int):
        raise ConfigError(f"{_P}.bit", kv.bit, allowed="an integer from 2 to 16",
                          reason="int-quant needs an integer bit width; for FP8 set "
                          f"{_P}.quant_type: float-quant")
    if kv.method_name == "kivi":
        if kv.static:
            raise ConfigError(f"{_P}.static", True, allowed=(False,),
                              reason="Kivi quantizes each group of tokens with its own range "
                              "(dynamic); static ranges are for Naive per_tensor/per_channel")
        if kv.granularity not in ("per_token", "per_head"):
            raise ConfigError(f"{_P}.granularity", kv.granularity,
                              allowed=("per_token", "per_head"),
                              reason="Kivi quantizes keys per channel (in groups of "
                              "group_size tokens) and values per token: granularity names "
                              "the values' grid")
        r = kv.residual
        if kv.group_size not in (-1, 0) and (kv.group_size < 1 or r % kv.group_size):
            divisors = tuple(d for d in range(1, r + 1) if r % d == 0)
            raise ConfigError(f"{_P}.group_size", kv.group_size, allowed=(-1, *divisors),
                              reason=f"Kivi's key groups tile the residual window "
                              f"(residual_length={r}): the group size must divide it")
        return
    if kv.residual_length is not None:
        raise ConfigError(f"{_P}.residual_length", kv.residual_length, allowed=(None,),
                          reason="the full-precision window is Kivi's (method: Kivi); Naive "
                          "quantizes every token")
    if kv.group_size not in (-1, 0):
        raise ConfigError(f"{_P}.group_size", kv.group_size, allowed=(-1,),
                          reason="Naive has no token groups (group_size is Kivi's key group)")
    if kv.static and kv.granularity not in ("per_tensor", "per_channel"):
        raise ConfigError(f"{_P}.granularity", kv.granularity,
                          allowed=("per_tensor", "per_channel"),
                          reason="static ranges are fixed on calibration data for the whole "
                          "tensor or per channel; per-token scales are dynamic (set "
                          "static: False)")


def check_kv_evals(cfg: RunConfig) -> None:
    """Evaluations that run through a KV cache need the whole model on the device: refuse
    ``inference_per_block: True`` for ``decode_ppl``, and for any evaluation at
    ``fake_quant`` when ``quant.kvcache`` is set."""
    kv = cfg.quant is not None and cfg.quant.kvcache is not None
    for i, e in enumerate(cfg.eval):
        prefix = "eval" if len(cfg.eval) == 1 else f"eval[{i}]"
        decode = e.type.strip().lower().replace("-", "_") == "decode_ppl"
        if e.inference_per_block and (decode or (kv and "fake_quant" in e.eval_pos)):
            raise ConfigError(f"{prefix}.inference_per_block", True, allowed=(False,),
                              reason="decoding through a KV cache runs the whole model on "
                              "the device" if decode else "the quantized KV cache "
                              "(quant.kvcache) is evaluated on the whole model")
