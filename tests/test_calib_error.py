"""results.json calibration_error: per-linear and per-block relative output errors equal a
direct computation and follow the grid's width (the pipeline writes them: the report tests
of plugins/reports/html render them from real runs)."""

from __future__ import annotations

import torch
from llmcq.pipeline.blockwise import BlockInputs
from llmcq.quant.calib_error import block_errors
from llmcq.quant.fake import FakeQuantLinear
from llmcq.quant.rtn import rtn_records
from llmcq.quant.spec import WeightQuantSpec
from torch import nn


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_block_errors_equal_direct_computation() -> None:
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(32, 48), nn.Linear(48, 16))
    hidden = [torch.randn(2, 5, 32), torch.randn(3, 5, 32)]
    spec = WeightQuantSpec(bits=3, symmetric=False)
    records = rtn_records({"0": block[0], "1": block[1]}, spec)
    b_err, l_err = block_errors(block, BlockInputs(hidden, [{}, {}]), records)
    x = torch.cat([h.reshape(-1, 32) for h in hidden])
    q = {n: FakeQuantLinear.from_record(r, dtype=torch.float32) for n, r in records.items()}
    with torch.no_grad():
        y0 = block[0](x)
        y = block[1](y0)
        assert abs(l_err["0"] - _rel(q["0"](x), y0)) < 1e-5
        assert abs(l_err["1"] - _rel(q["1"](y0), y)) < 1e-5  # on the float input
        assert abs(b_err - _rel(q["1"](q["0"](x)), y)) < 1e-5
    # 8 bits err less than 3 bits: the numbers follow the grid
    b8, l8 = block_errors(block, BlockInputs(hidden, [{}, {}]),
                          rtn_records({"0": block[0], "1": block[1]},
                                      WeightQuantSpec(bits=8, symmetric=False)))
    assert b8 < b_err and all(l8[n] < l_err[n] for n in l_err)


def test_pipeline_records_calibration_error_unless_switched_off(
        tmp_path, tiny_llama_dir, shared_data) -> None:
    """results.json holds ``calibration_error`` for every quantized block and linear by
    default; ``quant.calib_error: False`` (large blocks, timing runs) leaves it out."""
    import json

    from llmcq.config.loader import resolve_config
    from llmcq.model.loading import ModelSource, load_pretrained
    from llmcq.pipeline.runner import run

    got = {}
    for flag in (True, False):
        model, tok = load_pretrained(ModelSource(tiny_llama_dir))
        out = tmp_path / f"out{flag}"
        cfg = {"base": {"seed": 0, "device": "cpu"},
               "model": {"type": "llama", "path": str(tiny_llama_dir)},
               "calib": {"name": "wikitext2", "path": str(shared_data / "wikitext2" / "valid.txt"),
                         "n_samples": 4, "seq_len": 64, "preproc": "wikitext2_gptq", "bs": 2,
                         "seed": 1},
               "quant": {"method": "gptq", "calib_error": flag,
                         "weight": {"bit": 3, "symmetric": False, "granularity": "per_group",
                                    "group_size": 32}},
               "save": {"save_path": str(out)}}
        run(resolve_config(cfg), progress=False, model=model, tokenizer=tok)
        got[flag] = json.loads((out / "results.json").read_text())
    errs = got[True]["calibration_error"]
    assert set(errs["blocks"]) == {"model.layers.0", "model.layers.1"}
    assert len(errs["linears"]) == 14 and all(0 < e < 1 for e in errs["linears"].values())
    assert "calibration_error" not in got[False]
