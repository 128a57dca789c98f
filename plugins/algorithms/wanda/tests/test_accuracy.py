"""Wanda on a slice of the real bundled SmolLM2-135M (its first BLOCKS blocks): at 50 %
unstructured, the slice's output on held-out wikitext2 tokens moves less than with magnitude
pruning (llmc's per-layer rule and per row), computed in this test on the same calibration."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from llmcq.config.loader import resolve_config
from llmcq.pipeline.runner import run

pytestmark = pytest.mark.slow

BLOCKS, CALIB_N, CALIB_LEN, HELD_OUT = 3, 8, 256, 2 * 256


def _slice(smollm2_copy: Any) -> tuple[Any, Any]:
    model, tok = smollm2_copy()
    model.model.layers = model.model.layers[:BLOCKS]
    model.config.num_hidden_layers = BLOCKS
    return model, tok


def _held_out(tok: Any, data: Path) -> torch.Tensor:
    text = (data / "wikitext2" / "test.txt").read_text()[:20000]
    return tok(text, return_tensors="pt").input_ids[:, :HELD_OUT].reshape(2, -1)


def _hidden(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.model(ids).last_hidden_state


def _prune(smollm2_copy: Any, data: Path, save: Path, sparse: dict[str, Any]) -> Any:
    model, tok = _slice(smollm2_copy)
    cfg = {"base": {"seed": 0, "device": "cpu"}, "model": {"type": "llama"},
           "calib": {"name": "wikitext2", "path": str(data / "wikitext2" / "valid.txt"),
                     "n_samples": CALIB_N, "seq_len": CALIB_LEN, "preproc": "wikitext2_gptq",
                     "bs": 4, "seed": 0},
           "sparse": sparse, "save": {"save_path": str(save)}}
    run(resolve_config(cfg), progress=False, model=model, tokenizer=tok)
    return model


def test_wanda_beats_magnitude_at_50_percent(smollm2_copy: Any, shared_data: Path,
                                             tmp_path: Path) -> None:
    dense, tok = _slice(smollm2_copy)
    ids = _held_out(tok, shared_data)
    ref = _hidden(dense, ids)

    def err(sparse: dict[str, Any], save: str) -> float:
        model = _prune(smollm2_copy, shared_data, tmp_path / save, sparse)
        lin = model.model.layers[0].mlp.down_proj.weight
        assert float((lin == 0).float().mean()) == pytest.approx(0.5, abs=1e-3)  # pruned here
        return float((_hidden(model, ids) - ref).square().mean() / ref.square().mean())

    half = {"sparsity": 0.5}
    wanda = err({"method": "Wanda", "weight": half}, "w")
    mag_layer = err({"method": "Magnitude", "weight": half}, "ml")
    mag_row = err({"method": "Magnitude", "weight": half, "special": {"scope": "row"}}, "mr")
    print(f"relative output error of {BLOCKS} blocks: wanda {wanda:.4f}, magnitude per layer "
          f"{mag_layer:.4f}, per row {mag_row:.4f}")
    assert wanda < 0.9 * min(mag_layer, mag_row)
