"""KV-cache quantization (``quant.kvcache``): error bounds of the naive grids and of KIVI
(residual window exact, keys per channel in token groups, values per token), the cache against
a float cache and against K/V fake-quantized by hand inside attention, static ranges,
``decode_ppl`` against ``ppl``, KIVI against naive per-tensor, and config-time refusals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from llmcq.config.loader import resolve_config
from llmcq.errors import ConfigError, ConfigErrors
from llmcq.quant.kvcache import (FakeQuantKVCache, FakeQuantKVLayer, calibrate_static,
                                 kv_cache_factory)
from llmcq.quant.kvmath import fake_quant_kv
from llmcq.quant.spec import KVQuantSpec, PerChannel, PerHead, PerTensor, PerToken

#: the dims each granularity reduces over, on ``[b, h, s, d]`` (written here, not imported)
REDUCE = {"per_token": (1, 3), "per_head": (3,), "per_channel": (2,), "per_tensor": (1, 2, 3)}
GRANS = {"per_token": PerToken(), "per_head": PerHead(), "per_channel": PerChannel(),
         "per_tensor": PerTensor()}


def kv_tensor(b: int = 2, h: int = 3, s: int = 24, d: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, h, s, d, generator=g)
    x[:, :, :, 1] *= 12  # an outlier channel, as real keys have
    x[:, 1] += 3.0       # a shifted head
    return x


def half_step(x: torch.Tensor, bits: int, symmetric: bool, dims: tuple[int, ...]) -> torch.Tensor:
    """Half the min-max grid step of each element's group (the round-to-nearest bound)."""
    if symmetric:
        step = x.abs().amax(dim=dims, keepdim=True) / (2 ** (bits - 1) - 1)
    else:
        step = (x.amax(dim=dims, keepdim=True) - x.amin(dim=dims, keepdim=True)) / (2**bits - 1)
    return (step / 2).expand_as(x)


def assert_within_half_step(x: torch.Tensor, xq: torch.Tensor, bits: int, symmetric: bool,
                            dims: tuple[int, ...]) -> None:
    bound = half_step(x, bits, symmetric, dims)
    err = (xq - x).abs()
    assert bool((err <= bound * (1 + 1e-5) + 1e-6).all()), float((err - bound).max())
    assert float(err.max()) > 0  # 4 bits are lossy: the bound is not met by doing nothing


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("gran", list(REDUCE))
def test_naive_error_within_half_step(gran: str, symmetric: bool) -> None:
    x = kv_tensor()
    spec = KVQuantSpec(bits=4, symmetric=symmetric, key_granularity=GRANS[gran],
                       value_granularity=GRANS[gran])
    xq = fake_quant_kv(x, spec, GRANS[gran])
    assert_within_half_step(x, xq, 4, symmetric, REDUCE[gran])
    # at most 2^b levels per group
    dims = REDUCE[gran]
    kept = [i for i in range(4) if i not in dims]
    rows = xq.permute(*kept, *dims).reshape(-1 if kept else 1,
                                            int(torch.tensor([x.shape[i] for i in dims]).prod()))
    assert max(len(torch.unique(row)) for row in rows) <= 16


def _feed(layer: FakeQuantKVLayer, k: torch.Tensor, v: torch.Tensor,
          chunks: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    i = 0
    for c in chunks:
        keys, values = layer.update(k[:, :, i:i + c], v[:, :, i:i + c])
        i += c
    assert i == k.shape[2]
    return keys, values


@pytest.mark.parametrize("symmetric", [True, False])
def test_kivi_residual_exact_keys_per_channel_groups_values_per_token(symmetric: bool) -> None:
    k, v = kv_tensor(s=45, seed=1), kv_tensor(s=45, seed=2)
    residual, group = 16, 8
    spec = KVQuantSpec(bits=4, symmetric=symmetric, method="kivi", key_granularity=PerChannel(),
                       value_granularity=PerToken(), residual=residual, key_group=group)
    keys, values = _feed(FakeQuantKVLayer(spec), k, v, [1] * 45)
    n_kq, n_vq = 45 // residual * residual, 45 - residual  # 32 keys, 29 values quantized
    assert torch.equal(keys[:, :, n_kq:], k[:, :, n_kq:])       # the key residual: exact
    assert torch.equal(values[:, :, n_vq:], v[:, :, n_vq:])     # the value residual: exact
    for g0 in range(0, n_kq, group):                              # keys: per channel per group
        assert_within_half_step(k[:, :, g0:g0 + group], keys[:, :, g0:g0 + group], 4, symmetric,
                                (2,))
    assert_within_half_step(v[:, :, :n_vq], values[:, :, :n_vq], 4, symmetric, (1, 3))
    # what is stored depends on positions only: a prefill and odd chunks store the same
    for chunks in ([45], [7, 20, 1, 17], [31, 14]):
        k2, v2 = _feed(FakeQuantKVLayer(spec), k, v, chunks)
        assert torch.equal(k2, keys) and torch.equal(v2, values)


def _tiny_model(seed: int = 0, outliers: bool = True) -> Any:
    from transformers import LlamaForCausalLM

    from llmcq.testing.tiny_models import tiny_llama_config

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(attn_implementation="sdpa")).eval()
    if outliers:  # a few key channels far larger than the rest, as in trained models
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.k_proj.weight[3::16] *= 8.0
    return model


def _decode(model: Any, ids: torch.Tensor, cache: Any, chunk: int = 1) -> torch.Tensor:
    from llmcq.eval.ppl import cache_kwarg

    out = []
    with torch.no_grad():
        for i in range(0, ids.shape[1], chunk):
            out.append(model(input_ids=ids[:, i:i + chunk], use_cache=True,
                             **{cache_kwarg(model): cache}).logits)
    return torch.cat(out, dim=1)


IDS = torch.randint(0, 500, (2, 40), generator=torch.Generator().manual_seed(3))


def test_16_bit_cache_gives_the_float_cache_logits() -> None:
    from transformers import DynamicCache

    model = _tiny_model()
    ref = _decode(model, IDS, DynamicCache(config=model.config))
    errs = {}
    for bits in (16, 8):
        spec = KVQuantSpec(bits=bits, symmetric=False)
        errs[bits] = float((_decode(model, IDS, FakeQuantKVCache(spec, 2)) - ref).abs().max())
    assert errs[16] <= 1e-3 * float(ref.abs().max())
    assert errs[16] < errs[8] / 50  # 8 more bits: a step 256 times smaller


def test_cache_equals_kv_fake_quantized_by_hand() -> None:
    """A prefill through the naive per-head cache equals attention on K and V that the test
    rounds itself (symmetric 4-bit, one scale per token and head) inside the attention."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def by_hand(t: torch.Tensor) -> torch.Tensor:
        s = t.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / 7
        return torch.clamp(torch.round(t / s), -8, 7) * s

    def hand_attention(module: Any, query: torch.Tensor, key: torch.Tensor,
                       value: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return sdpa_attention_forward(module, query, by_hand(key), by_hand(value), *args,
                                      **kwargs)

    AttentionInterface.register("llmcq_kv_by_hand", hand_attention)
    model = _tiny_model()
    spec = KVQuantSpec(bits=4, symmetric=True, key_granularity=PerHead(),
                       value_granularity=PerHead())
    with torch.no_grad():
        ours = _decode(model, IDS, FakeQuantKVCache(spec, 2), chunk=IDS.shape[1])
        float_logits = model(input_ids=IDS).logits
        model.set_attn_implementation("llmcq_kv_by_hand")
        hand = model(input_ids=IDS, use_cache=False).logits
    assert float((ours - float_logits).abs().max()) > 1e-3  # the grid does change them
    torch.testing.assert_close(ours, hand, rtol=1e-5, atol=1e-5)


def test_static_ranges_are_the_calibration_extremes() -> None:
    from transformers import DynamicCache

    model = _tiny_model()
    batches = [IDS[:, :20], IDS[:, 20:]]
    seen: list[list[torch.Tensor]] = [[], []]  # keys of layer 0 / 1 through a float cache
    for b in batches:
        cache = DynamicCache(config=model.config)
        _decode(model, b, cache, chunk=b.shape[1])
        for i in range(2):
            seen[i].append(cache.layers[i].keys)
    for gran, dims in (("per_tensor", (0, 2, 1, 3)), ("per_channel", (0, 2))):
        spec = KVQuantSpec(bits=8, symmetric=True, key_granularity=GRANS[gran],
                           value_granularity=GRANS[gran], static=True)
        static = calibrate_static(model, spec, batches)
        for i in range(2):
            k = torch.cat(seen[i], dim=0)
            absmax = k.abs().amax(dim=(0, 1, 2, 3) if gran == "per_tensor" else (0, 2))
            torch.testing.assert_close(static[i][0], absmax / 127, rtol=1e-5, atol=0)


def _decode_error(model: Any, spec: KVQuantSpec | None, ids: torch.Tensor) -> float:
    from transformers import DynamicCache

    ref = torch.log_softmax(_decode(model, ids, DynamicCache(config=model.config)), -1)
    got = torch.log_softmax(_decode(model, ids, kv_cache_factory(model, spec)()), -1)
    return float((ref.exp() * (ref - got)).sum(-1).mean())  # KL(float || quantized)


def test_kivi_4bit_closer_to_float_than_naive_per_tensor() -> None:
    model = _tiny_model()
    naive = KVQuantSpec(bits=4, symmetric=False, key_granularity=PerTensor(),
                        value_granularity=PerTensor())
    kivi = KVQuantSpec(bits=4, symmetric=False, method="kivi", key_granularity=PerChannel(),
                       value_granularity=PerToken(), residual=8, key_group=8)
    ids = IDS[:, :40]
    kl_naive, kl_kivi = _decode_error(model, naive, ids), _decode_error(model, kivi, ids)
    assert 0 < kl_kivi < kl_naive, (kl_kivi, kl_naive)


# ------------------------------------------------------------------ runs and config


def _config(model: Path, data: Path, save: Path, kv: dict[str, Any] | None,
            evals: list[dict[str, Any]], calib: bool = False) -> dict[str, Any]:
    quant: dict[str, Any] = {"method": "rtn", "weight": {"bit": 8, "symmetric": True,
                                                         "granularity": "per_channel"}}
    if kv is not None:
        quant["kvcache"] = kv
    cfg: dict[str, Any] = {
        "base": {"seed": 0, "device": "cpu"}, "model": {"type": "llama", "path": str(model)},
        "eval": [{"name": "wikitext2", "path": str(data / "wikitext2" / "test.txt"),
                  "seq_len": 48, **e} for e in evals],
        "quant": quant, "save": {"save_path": str(save)}}
    if calib:
        cfg["calib"] = {"name": "wikitext2", "path": str(data / "wikitext2" / "valid.txt"),
                        "n_samples": 2, "seq_len": 48, "preproc": "wikitext2_gptq", "bs": 1}
    return cfg


def test_decode_ppl_16_bits_equals_ppl_and_4_bits_is_worse(tiny_llama_dir: Path,
                                                            shared_data: Path,
                                                            tmp_path: Path) -> None:
    from llmcq.pipeline.runner import run

    def once(bits: int, name: str) -> dict[str, Any]:
        evals = [{"type": "ppl", "eval_pos": ["fake_quant_wo_kv"], "num_samples": 2},
                 {"type": "decode_ppl", "eval_pos": ["fake_quant"], "num_samples": 2},
                 {"type": "ppl", "eval_pos": ["fake_quant"], "num_samples": 2, "kv_chunk": 5}]
        cfg = _config(tiny_llama_dir, shared_data, tmp_path / name,
                      {"method": "Naive", "bit": bits, "symmetric": False,
                       "granularity": "per_head"}, evals)
        return run(resolve_config(cfg), progress=False)

    r16, r4 = once(16, "k16"), once(4, "k4")
    plain = r16["eval"]["fake_quant_wo_kv"]["wikitext2"]["ppl"]
    dec16 = r16["eval"]["fake_quant"]["wikitext2"]
    assert dec16["decode_ppl"] == pytest.approx(plain, rel=1e-4)
    assert dec16["ppl"] == pytest.approx(plain, rel=1e-4)
    assert "kv16 naive" in dec16["kv_cache"]
    assert r4["eval"]["fake_quant_wo_kv"]["wikitext2"]["ppl"] == pytest.approx(plain, rel=1e-6)
    dec4 = r4["eval"]["fake_quant"]["wikitext2"]
    assert dec4["decode_ppl"] > dec16["decode_ppl"] and dec4["ppl"] > plain
    saved = json.loads((tmp_path / "k4" / "results.json").read_text())
    assert saved["config"]["quant"]["kvcache"]["bit"] == 4
    assert saved["config"]["quant"]["kvcache"]["granularity"] == "per_head"


def test_static_naive_runs_on_calibration_data(tiny_llama_dir: Path, shared_data: Path,
                                               tmp_path: Path) -> None:
    from llmcq.pipeline.runner import run

    evals = [{"type": "ppl", "eval_pos": ["fake_quant", "fake_quant_wo_kv"], "num_samples": 2}]
    cfg = _config(tiny_llama_dir, shared_data, tmp_path / "s",
                  {"method": "Naive", "bit": 4, "symmetric": True, "granularity": "per_tensor",
                   "static": True}, evals, calib=True)
    r = run(resolve_config(cfg), progress=False)["eval"]
    assert r["fake_quant"]["wikitext2"]["ppl"] > r["fake_quant_wo_kv"]["wikitext2"]["ppl"]
    assert "static" in r["fake_quant"]["wikitext2"]["kv_cache"]


NAIVE = {"method": "Naive", "bit": 4}
REFUSED = [
    ({"method": "Quarot", "bit": 4}, "quant.kvcache.method", "Naive, Kivi"),
    ({**NAIVE, "bit": 1}, "quant.kvcache.bit", None),
    ({**NAIVE, "quant_type": "float-quant", "bit": "e5m2"}, "quant.kvcache.bit", "e4m3"),
    ({**NAIVE, "granularity": "per_group"}, "quant.kvcache.granularity", "per_head"),
    ({**NAIVE, "static": True}, "quant.kvcache.granularity", "per_channel"),
    ({**NAIVE, "residual_length": 64}, "quant.kvcache.residual_length", None),
    ({**NAIVE, "group_size": 32}, "quant.kvcache.group_size", None),
    ({"method": "Kivi", "bit": 2, "static": True}, "quant.kvcache.static", None),
    ({"method": "Kivi", "bit": 2, "granularity": "per_tensor"}, "quant.kvcache.granularity",
     "per_token"),
    ({"method": "Kivi", "bit": 2, "group_size": 48}, "quant.kvcache.group_size", "32"),
    ({**NAIVE, "granularity": "per_tensor", "static": True}, "calib", None),  # no calib
]


def test_per_block_evaluation_through_a_cache_is_refused(tiny_llama_dir: Path,
                                                         shared_data: Path,
                                                         tmp_path: Path) -> None:
    for kv, ev in ((NAIVE, {"eval_pos": ["fake_quant"]}),
                   (None, {"type": "decode_ppl", "eval_pos": ["pretrain"]})):
        cfg = _config(tiny_llama_dir, shared_data, tmp_path / "x", kv,
                      [{**ev, "inference_per_block": True}])
        with pytest.raises(ConfigError) as info:
            resolve_config(cfg)
        assert info.value.path == "eval.inference_per_block", str(info.value)


@pytest.mark.parametrize(("kv", "path", "allowed"), REFUSED)
def test_config_refusals(kv: dict[str, Any], path: str, allowed: str | None,
                         tiny_llama_dir: Path, shared_data: Path, tmp_path: Path) -> None:
    cfg = _config(tiny_llama_dir, shared_data, tmp_path / "x", kv, [{"eval_pos": ["fake_quant"]}])
    with pytest.raises((ConfigError, ConfigErrors)) as info:
        resolve_config(cfg)
    err = info.value
    errs = err.errors if isinstance(err, ConfigErrors) else [err]
    assert any(e.path == path for e in errs), str(err)
    if allowed is not None:
        assert allowed in str(err)


def test_backend_without_kv_runtime_refuses(tiny_llama_dir: Path, shared_data: Path,
                                            tmp_path: Path) -> None:
    cfg = _config(tiny_llama_dir, shared_data, tmp_path / "f", NAIVE,
                  [{"eval_pos": ["fake_quant"]}])
    cfg["save"]["save_fake"] = True
    with pytest.raises((ConfigError, ConfigErrors)) as info:
        resolve_config(cfg)
    assert "quant.kvcache" in str(info.value)


def test_llmc_kivi_config_resolves_as_the_paper(tiny_llama_dir: Path, shared_data: Path,
                                                tmp_path: Path) -> None:
    kv = {"method": "Kivi", "bit": 8, "symmetric": True, "granularity": "per_token"}  # llmc's
    r = resolve_config(_config(tiny_llama_dir, shared_data, tmp_path / "k", kv,
                               [{"type": "decode_ppl", "eval_pos": ["fake_quant",
                                                                    "fake_quant_wo_kv"]}]))
    assert r.specs.kv == KVQuantSpec(bits=8, symmetric=True, method="kivi",
                                     key_granularity=PerChannel(), value_granularity=PerToken(),
                                     residual=128, key_group=128)


def test_fp8_grid_matches_transformers_fp8_cache() -> None:
    """transformers' ``QuantizedCache("fp8")`` fixes one E4M3 scale per layer on its first
    update and appends later tokens on it: llmcq's static per-tensor FP8 cache given that scale
    stores the same values (where transformers' unsaturated cast stays finite)."""
    from transformers import QuantizedCache

    model = _tiny_model(outliers=False)
    hf = QuantizedCache("fp8", model.config)
    _decode(model, IDS[:, :24], hf, chunk=24)               # prefill: fixes the scales
    static = [(layer._quantized_keys[1], None, layer._quantized_values[1], None)
              for layer in hf.layers]
    spec = KVQuantSpec(bits=8, symmetric=True, key_granularity=PerTensor(),
                       value_granularity=PerTensor(), static=True, fmt="e4m3")
    ours = FakeQuantKVCache(spec, len(static), static)
    _decode(model, IDS[:, :24], ours, chunk=24)
    _decode(model, IDS[:, 24:32], hf)                        # decode on the fixed scales
    _decode(model, IDS[:, 24:32], ours)
    # layer 0 only: transformers' prefill returns the float keys (its attention reads them),
    # llmcq's the quantized ones, so the hidden states of later layers differ by design
    h, o = hf.layers[0], ours.layers[0]
    for theirs, mine in ((h._dequantize(h._quantized_keys), o.keys),
                         (h._dequantize(h._quantized_values), o.values)):
        ok = torch.isfinite(theirs)
        assert ok.float().mean() > 0.9 and mine.shape == theirs.shape == (2, 2, 32, 16)
        torch.testing.assert_close(mine[ok], theirs[ok], rtol=0, atol=0)
