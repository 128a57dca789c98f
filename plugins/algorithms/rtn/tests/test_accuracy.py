"""RTN on the real bundled SmolLM2-135M, on a short slice of wikitext2 (WINDOWS x 512 tokens).

Bounds a broken quantizer cannot meet: W8 within 1% of float; W4 g64 worse than W8 and
better than W3 g64 (the bundled weights sit on a 4-bit g32 grid already, so 3 bits is where
error shows); the fake-quantized export reloads with the same logits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from llmcq.config.loader import resolve_config
from llmcq.pipeline.runner import run

pytestmark = pytest.mark.slow

#: the windows GPTQ's, AWQ's, AutoRound's and OmniQuant's tests evaluate too, so their RTN W3 g64
#: baseline is this test's (one run per test run: ``smollm2_ppl``)
WINDOWS = 8
SETTINGS = {
    "w8": {"bit": 8, "symmetric": False, "granularity": "per_channel"},
    "w4g64": {"bit": 4, "symmetric": False, "granularity": "per_group", "group_size": 64},
    "w3g64": {"bit": 3, "symmetric": False, "granularity": "per_group", "group_size": 64},
}


def _config(data: Path, save: Path, weight: dict[str, Any] | None) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "model": {"type": "llama"},
        "eval": {"eval_pos": ["pretrain"] if weight is None else ["fake_quant"],
                 "name": "wikitext2", "path": str(data / "wikitext2" / "test.txt"),
                 "seq_len": 512, "num_samples": WINDOWS},
        "save": {"save_path": str(save)},
    }
    if weight is not None:
        cfg["quant"] = {"method": "rtn", "weight": weight}
    return cfg


@pytest.fixture(scope="module")
def ppl(smollm2_ppl: Any) -> dict[str, float]:
    """Float and RTN perplexities on the same WINDOWS x 512 tokens, each through ``llmcq run``
    (the test run's shared runs: GPTQ's, AWQ's, AutoRound's and OmniQuant's tests compare
    with the same RTN W3 g64)."""
    out = {"float": smollm2_ppl(WINDOWS)}
    for name, weight in SETTINGS.items():
        out[name] = smollm2_ppl(WINDOWS, {"method": "rtn", "weight": weight})
    print(out)  # shown by pytest -rP
    return out


def test_w8_within_one_percent_of_float(ppl: dict[str, float]) -> None:
    assert abs(ppl["w8"] / ppl["float"] - 1) < 0.01, ppl


def test_bits_order(ppl: dict[str, float]) -> None:
    assert ppl["w8"] < ppl["w4g64"] < ppl["w3g64"], ppl
    assert ppl["w3g64"] > ppl["float"] * 1.05, ppl  # 3 bits costs real accuracy here


def test_partial_group_fake_export_reloads_exactly(smollm2_copy: Any, shared_data: Path,
                                                   tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model, tok = smollm2_copy()
    cfg = _config(shared_data, tmp_path / "out", {"bit": 4, "symmetric": False,
                                                  "granularity": "per_group",
                                                  "group_size": 128})
    cfg["eval"]["eval_pos"] = []
    cfg["save"]["save_fake"] = True
    run(resolve_config(cfg), progress=False, model=model, tokenizer=tok)
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out" / "fake_quant_model"))
    x = tok("Quantization of language models", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=x).logits, model(input_ids=x).logits)
    # 576 columns, g128: four full groups and one of 64, each with at most 16 levels
    w = reloaded.model.layers[3].self_attn.q_proj.weight
    for start in range(0, 576, 128):
        assert all(row.unique().numel() <= 16 for row in w[:, start:start + 128])
