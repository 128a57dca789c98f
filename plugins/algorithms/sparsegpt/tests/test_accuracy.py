"""SparseGPT on a slice of the real bundled SmolLM2-135M (its first BLOCKS blocks), on
held-out wikitext2 tokens: at 2:4 the slice's output moves less than with Wanda's 2:4 masks,
computed in this test on the same calibration. The Hessians of 576- and 1536-wide inputs need
more tokens than Wanda's norms: with 8 x 256 SparseGPT's lead was 0.96x, with 16 x 512 it is
0.80x (relative output error 0.0925 against 0.1161 when this test was written). The joint
sweep's advantage over pruning then rounding is tested on synthetic layers (test_solver)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from llmcq.config.loader import resolve_config
from llmcq.pipeline.runner import run

pytestmark = pytest.mark.slow

BLOCKS, CALIB_N, CALIB_LEN, HELD_OUT = 3, 16, 512, 2 * 256


def _slice(smollm2_copy: Any) -> tuple[Any, Any]:
    model, tok = smollm2_copy()
    model.model.layers = model.model.layers[:BLOCKS]
    model.config.num_hidden_layers = BLOCKS
    return model, tok


def _hidden(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.model(ids).last_hidden_state


@pytest.fixture(scope="module")
def errors(smollm2_copy: Any, shared_data: Path,
           tmp_path_factory: pytest.TempPathFactory) -> dict[str, float]:
    dense, tok = _slice(smollm2_copy)
    text = (shared_data / "wikitext2" / "test.txt").read_text()[:20000]
    ids = tok(text, return_tensors="pt").input_ids[:, :HELD_OUT].reshape(2, -1)
    ref = _hidden(dense, ids)

    def err(sparse: dict[str, Any]) -> float:
        model, tok = _slice(smollm2_copy)
        cfg: dict[str, Any] = {
            "base": {"seed": 0, "device": "cpu"}, "model": {"type": "llama"},
            "calib": {"name": "wikitext2", "path": str(shared_data / "wikitext2" / "valid.txt"),
                      "n_samples": CALIB_N, "seq_len": CALIB_LEN,
                      "preproc": "wikitext2_gptq", "bs": 4, "seed": 0},
            "sparse": sparse, "save": {"save_path": str(tmp_path_factory.mktemp("sgpt"))}}
        run(resolve_config(cfg), progress=False, model=model, tokenizer=tok)
        return float((_hidden(model, ids) - ref).square().mean() / ref.square().mean())

    two4 = {"mask_structure": "2:4"}
    out = {"sparsegpt_24": err({"method": "SparseGPT", "weight": two4}),
           "wanda_24": err({"method": "Wanda", "weight": two4})}
    print(f"relative output error of {BLOCKS} blocks: {out}")
    return out


def test_sparsegpt_beats_wanda_at_2of4(errors: dict[str, float]) -> None:
    assert errors["sparsegpt_24"] < 0.9 * errors["wanda_24"], errors

