"""A fake-quantized KV cache for transformers models (llmc's ``quant.kvcache``).

:class:`FakeQuantKVCache` is a :class:`transformers.Cache` whose layers store every key and
value as its quantize-dequantize image on the grid of a :class:`~llmcq.quant.spec.KVQuantSpec`
(the maths: :mod:`llmcq.quant.kvmath`): what attention reads back from the cache is exactly
the dequantized values, so a forward through it measures the accuracy of a quantized cache.

* ``naive``: each token is quantized as it enters the cache. ``per_token`` / ``per_head``
  scales are the token's own; dynamic ``per_channel`` / ``per_tensor`` scales span the tokens
  of one ``update`` (one forward's chunk: the whole prompt at prefill, one token in
  token-by-token decoding); static ones are fixed on calibration data (:func:`calibrate_static`).
* ``kivi`` (the paper's algorithm, not llmc's one-granularity variant): keys per channel, in
  groups of ``key_group`` tokens, once a window of ``residual`` tokens is complete; values per
  token once they are older than the last ``residual`` tokens. The residual tokens are kept
  in full precision. What is stored depends only on positions, not on how the sequence was
  chunked into forwards.

:func:`run_kv_cache` gives an evaluator the cache to use at an evaluation position.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer

from llmcq.quant.kvmath import (RangeObserver, fake_quant_key_groups, fake_quant_kv, kivi_split,
                                static_qparams)
from llmcq.quant.spec import KVQuantSpec

if TYPE_CHECKING:
    from llmcq.pipeline.context import RunContext

__all__ = ["FakeQuantKVLayer", "FakeQuantKVCache", "ObserverKVLayer", "calibrate_static",
           "num_cache_layers", "kv_cache_factory", "run_kv_cache", "KV_POSITIONS"]

#: static qparams of one layer: (key scale, key zero, value scale, value zero)
StaticParams = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]

#: evaluation positions at which the quantized cache is in place (llmc's: ``fake_quant``)
KV_POSITIONS = ("fake_quant",)


class FakeQuantKVLayer(DynamicLayer):
    """One attention layer's cache: ``keys``/``values`` hold the dequantized quantized tokens
    followed by the full-precision residual (KIVI), ``[b, h, tokens, d]``."""

    is_croppable = False

    def __init__(self, spec: KVQuantSpec, static: StaticParams | None = None) -> None:
        super().__init__()
        if spec.static and static is None:
            raise ValueError("a static KV grid needs its calibrated scales (calibrate_static)")
        self.spec = spec
        self.static = static
        #: leading key / value tokens already on the grid
        self.n_keys_q = 0
        self.n_values_q = 0

    def _naive(self, x: torch.Tensor, is_key: bool) -> torch.Tensor:
        spec = self.spec
        gran = spec.key_granularity if is_key else spec.value_granularity
        if self.static is not None:
            s, z = (self.static[0], self.static[1]) if is_key else (self.static[2], self.static[3])
            return fake_quant_kv(x, spec, gran, s, z)
        return fake_quant_kv(x, spec, gran)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.spec.method == "naive":
            self.keys = torch.cat([self.keys, self._naive(key_states, True)], dim=-2)
            self.values = torch.cat([self.values, self._naive(value_states, False)], dim=-2)
            self.n_keys_q = self.n_values_q = self.keys.shape[-2]
            return self.keys, self.values
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        nk, nv = kivi_split(keys.shape[-2], self.spec.residual)
        if nk > self.n_keys_q:
            fresh = fake_quant_key_groups(keys[..., self.n_keys_q:nk, :], self.spec,
                                          self.spec.key_group)
            keys = torch.cat([keys[..., :self.n_keys_q, :], fresh, keys[..., nk:, :]], dim=-2)
            self.n_keys_q = nk
        if nv > self.n_values_q:
            fresh = fake_quant_kv(values[..., self.n_values_q:nv, :], self.spec,
                                  self.spec.value_granularity)
            values = torch.cat([values[..., :self.n_values_q, :], fresh, values[..., nv:, :]],
                               dim=-2)
            self.n_values_q = nv
        self.keys, self.values = keys, values
        return keys, values

    def reset(self) -> None:
        super().reset()
        self.n_keys_q = self.n_values_q = 0


class FakeQuantKVCache(Cache):
    """A cache of :class:`FakeQuantKVLayer`, one per attention layer of the model."""

    def __init__(self, spec: KVQuantSpec, num_layers: int,
                 static: list[StaticParams] | None = None) -> None:
        if static is not None and len(static) != num_layers:
            raise ValueError(f"{len(static)} static layers for {num_layers} cache layers")
        super().__init__(layers=[FakeQuantKVLayer(spec, None if static is None else static[i])
                                 for i in range(num_layers)])
        self.spec = spec


class ObserverKVLayer(DynamicLayer):
    """A float cache layer that records the range of every key and value it receives."""

    def __init__(self, spec: KVQuantSpec) -> None:
        super().__init__()
        self.k_obs = RangeObserver(spec.key_granularity)
        self.v_obs = RangeObserver(spec.value_granularity)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        self.k_obs.observe(key_states)
        self.v_obs.observe(value_states)
        return super().update(key_states, value_states, *args, **kwargs)


def num_cache_layers(model: nn.Module) -> int:
    """How many attention-cache layers the model's decoder has (full attention only)."""
    cfg = model.config.get_text_config(decoder=True)
    kinds = set(getattr(cfg, "layer_types", None) or ["full_attention"])
    if kinds - {"full_attention"}:
        raise ValueError(f"KV-cache quantization serves full-attention layers only; the model "
                         f"has layer types {sorted(kinds)}")
    return int(cfg.num_hidden_layers)


@torch.no_grad()
def calibrate_static(model: nn.Module, spec: KVQuantSpec, batches: Iterable[torch.Tensor],
                     device: torch.device | str = "cpu") -> list[StaticParams]:
    """Static per-layer scales (and zero points) of keys and values: the min-max grid of the
    ranges seen over the calibration ``batches`` (each ``[b, seq]`` token ids)."""
    from llmcq.eval.ppl import cache_kwarg

    n = num_cache_layers(model)
    observers = [ObserverKVLayer(spec) for _ in range(n)]
    key = cache_kwarg(model)
    for batch in batches:
        cache = Cache(layers=list(observers))
        model(input_ids=batch.to(device), use_cache=True, **{key: cache})
        for layer in observers:  # keep the ranges, drop the stored tensors
            DynamicLayer.reset(layer)
    out = []
    for layer in observers:
        ks, kz = static_qparams(layer.k_obs, spec)
        vs, vz = static_qparams(layer.v_obs, spec)
        out.append((ks, kz, vs, vz))
    return out


def kv_cache_factory(model: nn.Module, spec: KVQuantSpec | None,
                     static: list[StaticParams] | None = None) -> Callable[[], Cache]:
    """A callable making a fresh cache per sequence: the quantized one, or transformers'
    float ``DynamicCache`` when ``spec`` is None."""
    if spec is None:
        from transformers import DynamicCache

        return lambda: DynamicCache(config=model.config)
    n = num_cache_layers(model)
    return lambda: FakeQuantKVCache(spec, n, static)


def run_kv_cache(run: RunContext, model: nn.Module, position: str
                 ) -> Callable[[], Cache] | None:
    """The KV cache an evaluator uses at ``position``: the quantized cache of
    ``quant.kvcache`` at the fake-quant position (static ranges calibrated once on the run's
    calibration data, through the fake-quantized model), else None (a float cache)."""
    spec = run.specs.kv
    if spec is None or position not in KV_POSITIONS:
        return None
    static = None
    if spec.static:
        static = run.cache.get(("kv_static", position))
        if static is None:
            static = _calibrate_on_run(run, model, spec)
            run.cache[("kv_static", position)] = static
    return kv_cache_factory(model, spec, static)


def _calibrate_on_run(run: RunContext, model: nn.Module,
                      spec: KVQuantSpec) -> list[StaticParams]:
    from llmcq.pipeline.runner import calibration_batches

    cfg = run.config.calib
    if cfg is None or run.resolved.calib is None:
        raise ValueError("static KV-cache quantization needs the calib section")
    dspec = run.resolved.calib[0]
    samples = dspec.calibration_ids(run.token_source(dspec), cfg)
    batches = calibration_batches(samples, cfg.bs)
    home = next(model.parameters()).device
    model.to(run.device)
    try:
        static = calibrate_static(model, spec, batches, run.device)
    finally:
        model.to(home)
    run.log.info("quant.kvcache: static %s ranges fitted on %d calibration batches",
                 spec.key_granularity, len(batches))
    return static
