"""The TensorRT-LLM export of the real bundled SmolLM2-135M (RTN W4 g64 symmetric,
W4A16_AWQ), read back with the independent reader of trtllm_reader.py (written from the
published TensorRT-LLM/ModelOpt source, see test_trtllm_format.py) into a HF Llama, against
llmcq's in-process fake-quant model on 2 x 256 tokens of wikitext2 test.

Bounds: perplexity of the read-back model within 0.5% of the fake-quant model's (fp16 scales
are the only difference) and max |logit difference| under 1% of max |logit|; the rank file
holds 0.53 bytes per linear parameter (4-bit codes + one fp16 scale per 64 weights).
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from llmcq.config.loader import resolve_config
from llmcq.pipeline.runner import run
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


def _reader() -> Any:
    spec = importlib.util.spec_from_file_location(
        "llmcq_trtllm_test_reader_slow", Path(__file__).with_name("trtllm_reader.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _ppl(model: Any, ids: torch.Tensor, seq: int) -> tuple[float, torch.Tensor]:
    nll, count, first = 0.0, 0, None
    with torch.no_grad():
        for i in range(ids.numel() // seq):
            x = ids[i * seq:(i + 1) * seq][None]
            logits = model(input_ids=x).logits.float()
            first = logits if first is None else first
            loss = torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum")
            nll += loss.item()
            count += seq - 1
    return math.exp(nll / count), first  # type: ignore[return-value]


def test_bundled_w4a16_export_reads_back_to_the_fake_quant_model(
        smollm2_copy: Any, shared_data: Path, tmp_path: Path) -> None:
    reader = _reader()
    model, tok = smollm2_copy()
    cfg = {"base": {"seed": 0, "device": "cpu"}, "model": {"type": "llama"},
           "quant": {"method": "rtn", "weight": {"bit": 4, "symmetric": True,
                                                 "granularity": "per_group",
                                                 "group_size": 64}},
           "save": {"save_path": str(tmp_path / "out"), "save_trtllm": True}}
    lin_params = sum(m.weight.numel() for n, m in model.named_modules()
                     if isinstance(m, torch.nn.Linear) and ".layers." in n)
    run(resolve_config(cfg), progress=False, model=model, tokenizer=tok)
    folder = tmp_path / "out" / "trtllm_checkpoint"
    tcfg = json.loads((folder / "config.json").read_text())
    assert tcfg["quantization"]["quant_algo"] == "W4A16_AWQ"
    assert tcfg["num_attention_heads"] == 9 and tcfg["num_key_value_heads"] == 3
    t = load_file(str(folder / "rank0.safetensors"))
    lin_bytes = sum(v.numel() * v.element_size() for k, v in t.items()
                    if ".layers." in k and "layernorm" not in k)
    assert 0.53 <= lin_bytes / lin_params <= 0.54
    back = reader.reader_model(model, reader.to_hf_state(t, tcfg))
    text = (shared_data / "wikitext2" / "test.txt").read_text()[:20_000]
    ids = tok(text, return_tensors="pt").input_ids[0][: 2 * 256]
    ppl_fake, logits_fake = _ppl(model, ids, 256)
    ppl_back, logits_back = _ppl(back, ids, 256)
    diff = (logits_back - logits_fake).abs().max().item()
    print(f"W4A16_AWQ g64 sym: ppl fake-quant {ppl_fake:.4f}, read back {ppl_back:.4f}, "
          f"max logit diff {diff:.4f}, {lin_bytes / lin_params:.4f} bytes/linear param")
    assert abs(ppl_back - ppl_fake) <= 0.005 * ppl_fake
    assert diff <= 0.01 * logits_fake.abs().max().item()
