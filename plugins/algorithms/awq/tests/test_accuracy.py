"""AWQ on the real bundled SmolLM2-135M, on a short slice of wikitext2 (8 x 512 tokens).

The issue's ordering: AWQ beats round-to-nearest at W3 g64 (asymmetric), RTN computed on the
same windows in this test session (``smollm2_ppl``). Calibration is in-domain and small to
fit the CPU budget: CALIB_N random windows of 256 tokens of wikitext2/valid.txt
(wikitext2_gptq); see the README for why, and for the full measurement. Measured: AWQ 60.36
against RTN's 99.15 with 4 windows (0.61), 59.07 with 2 (0.60); with 2 and the scale grid of
N_GRID = 10 ratios instead of 20: 62.97 (0.635).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from llmcq.config.loader import resolve_config
from llmcq.pipeline.runner import run

pytestmark = pytest.mark.slow

WINDOWS, CALIB_N = 8, 2
W3G64 = {"bit": 3, "symmetric": False, "granularity": "per_group", "group_size": 64}
# llmc's awq_w_only recipe, asymmetric clip; the scale grid coarsened from 20 ratios to N_GRID
# to fit the CPU budget
N_GRID = 10
AWQ = {"weight_clip": True, "clip_sym": False, "n_grid": N_GRID}


def _config(data: Path, save: Path, method: str, special: dict[str, Any] | None) -> dict:
    cfg: dict[str, Any] = {
        "base": {"seed": 42, "device": "cpu"},
        "model": {"type": "llama"},
        "eval": {"eval_pos": ["fake_quant"], "name": "wikitext2",
                 "path": str(data / "wikitext2" / "test.txt"), "seq_len": 512,
                 "num_samples": WINDOWS},
        # calib_error: False skips a measurement this test does not read
        "quant": {"method": method, "weight": W3G64, "special": special or {},
                  "calib_error": False},
        "save": {"save_path": str(save)},
    }
    if method == "awq":
        cfg["calib"] = {"name": "wikitext2", "path": str(data / "wikitext2" / "valid.txt"),
                        "n_samples": CALIB_N, "seq_len": 256, "preproc": "wikitext2_gptq",
                        "bs": 1, "seed": 42}
    return cfg


@pytest.fixture(scope="module")
def ppl(smollm2_copy: Any, smollm2_ppl: Any, shared_data: Path,
        tmp_path_factory: pytest.TempPathFactory) -> dict:
    model, tok = smollm2_copy()
    cfg = _config(shared_data, tmp_path_factory.mktemp("awq"), "awq", AWQ)
    res = run(resolve_config(cfg), progress=False, model=model, tokenizer=tok)
    # RTN through llmcq run on the same windows, in this session (shared with other tests)
    return {"awq": res["eval"]["fake_quant"]["wikitext2"]["ppl"], "awq_recipe": res["recipe"],
            "rtn": smollm2_ppl(WINDOWS, {"method": "rtn", "weight": W3G64})}


def test_awq_beats_rtn_at_w3_g64(ppl: dict[str, Any]) -> None:
    assert ppl["awq"] < 0.95 * ppl["rtn"], ppl
    summary = ppl["awq_recipe"][0]
    # 9 heads / 3 kv heads: v_proj -> o_proj is left alone (llmc's do_gqa_trans: False)
    assert summary["groups_scaled"] == 30 * 3 and summary["groups_skipped_gqa"] == 30
    assert summary["linears_clipped"] == 30 * 5
    assert summary["alpha_mean"] > 0  # the search moved away from the identity
