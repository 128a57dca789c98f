"""FP8 KV-cache scales in the vllm export (``quant.kvcache`` -> compressed-tensors'
``kv_cache_scheme`` and ``<attention>.k_scale`` / ``v_scale``) on the tiny Llama, and the
config-time refusals of KV settings vLLM's FP8 cache cannot read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from llmcq.config.loader import resolve_config
from llmcq.errors import ConfigError, ConfigErrors
from llmcq.model.loading import ModelSource, load_pretrained
from llmcq.pipeline.runner import run
from safetensors.torch import load_file

KV_FP8 = {"method": "Naive", "quant_type": "float-quant", "bit": "e4m3", "symmetric": True,
          "granularity": "per_tensor", "static": True}


def config(model: Path, data: Path, save: Path, kv: dict[str, Any]) -> dict[str, Any]:
    return {"base": {"seed": 0, "device": "cpu"}, "model": {"type": "llama", "path": str(model)},
            "quant": {"method": "rtn", "kvcache": kv,
                      "weight": {"bit": 4, "symmetric": True, "granularity": "per_group",
                                 "group_size": 32}},
            "calib": {"name": "wikitext2", "path": str(data / "wikitext2" / "valid.txt"),
                      "n_samples": 2, "seq_len": 48, "preproc": "wikitext2_gptq", "bs": 1},
            "save": {"save_path": str(save), "save_vllm": True}}


def test_fp8_kv_scales_written_for_vllm(tiny_llama_dir: Path, shared_data: Path,
                                        tmp_path: Path) -> None:
    from compressed_tensors.quantization import QuantizationConfig
    from transformers import DynamicCache

    resolved = resolve_config(config(tiny_llama_dir, shared_data, tmp_path / "o", KV_FP8))
    model, tok = load_pretrained(ModelSource(tiny_llama_dir))
    run(resolved, progress=False, model=model, tokenizer=tok)
    folder = tmp_path / "o" / "vllm_quant_model"
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    kv = QuantizationConfig.model_validate(qc).kv_cache_scheme  # the library reads it
    assert kv is not None and (kv.num_bits, kv.type, kv.strategy, kv.dynamic, kv.symmetric) == \
        (8, "float", "tensor", False, True)
    state = load_file(str(folder / "model.safetensors"))
    # the scales: max |k| / 448 over the calibration data through the fake-quantized model
    # (the run left it deployed), observed here with transformers' own float cache
    dspec = resolved.calib[0]
    samples = dspec.calibration_ids(tok, resolved.config.calib)
    n = model.config.num_hidden_layers
    kmax, vmax = torch.zeros(n), torch.zeros(n)
    with torch.no_grad():
        for s in samples:
            cache = DynamicCache(config=model.config)
            model(input_ids=torch.tensor([s]), use_cache=True, past_key_values=cache)
            for i in range(n):
                kmax[i] = max(kmax[i], cache.layers[i].keys.abs().max())
                vmax[i] = max(vmax[i], cache.layers[i].values.abs().max())
    for i in range(n):
        attn = f"model.layers.{i}.self_attn"
        k, v = state[f"{attn}.k_scale"], state[f"{attn}.v_scale"]
        assert k.dtype == torch.float32 and k.shape == (1,)
        torch.testing.assert_close(k, (kmax[i] / 448).reshape(1), rtol=1e-6, atol=0)
        torch.testing.assert_close(v, (vmax[i] / 448).reshape(1), rtol=1e-6, atol=0)


@pytest.mark.parametrize(("change", "path"), [
    ({"method": "Kivi", "static": False, "granularity": "per_token"}, "quant.kvcache.method"),
    ({"quant_type": "int-quant", "bit": 8}, "quant.kvcache.quant_type"),
    ({"granularity": "per_channel"}, "quant.kvcache.granularity"),
    ({"static": False}, "quant.kvcache.static"),
])
def test_kv_settings_vllm_cannot_read_are_refused(change: dict[str, Any], path: str,
                                                  tiny_llama_dir: Path, shared_data: Path,
                                                  tmp_path: Path) -> None:
    cfg = config(tiny_llama_dir, shared_data, tmp_path / "o", {**KV_FP8, **change})
    with pytest.raises((ConfigError, ConfigErrors)) as info:
        resolve_config(cfg)
    err = info.value
    errs = err.errors if isinstance(err, ConfigErrors) else [err]
    assert any(e.path == path for e in errs), str(err)
