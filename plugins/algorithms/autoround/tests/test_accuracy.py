"""AutoRound on the real bundled SmolLM2-135M (30 blocks) on a short slice of wikitext2
(WINDOWS windows x SEQ tokens), calibrated on CALIB_N x CALIB_LEN tokens of
wikitext2/valid.txt with a short schedule (ITERS signed steps per block on all CALIB_N samples,
lr 1 / ITERS as auto-round derives it; auto-round's defaults are 128 x 2048 samples, 200
steps of 8: GPU work, see the README).

Each step sees every sample (BATCH = CALIB_N): with so few samples and steps, batches of 2
drawn as fresh random subsets (the harness's sampler) left some samples unseen and scored
153 against RTN's 99 (auto-round's cycling sampler: 88; see the README), so the test does
not depend on the draw.

The bound is computed, never a literal: round-to-nearest W3 g64 on the same windows, run
through ``llmcq run`` in this test session (``smollm2_ppl``, shared with the other tests
comparing with it; measured: RTN 99.15, AutoRound 88.74, later 90.77).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from llmcq.config.loader import resolve_config
from llmcq.pipeline.runner import run

pytestmark = pytest.mark.slow

CALIB_N, CALIB_LEN, ITERS, BATCH = 8, 128, 10, 8
WINDOWS, SEQ = 8, 512
W3G64 = {"bit": 3, "symmetric": False, "granularity": "per_group", "group_size": 64}


def _config(data: Path, save: Path, method: str, special: dict[str, Any] | None = None
            ) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "base": {"seed": 42},
        "model": {"type": "llama"},
        "eval": [{"eval_pos": ["fake_quant"], "name": "wikitext2",
                  "path": str(data / "wikitext2" / "test.txt"), "seq_len": SEQ,
                  "num_samples": WINDOWS}],
        # calib_error: False skips a measurement this test does not read
        "quant": {"method": method, "weight": W3G64, "quant_out": method != "rtn",
                  "calib_error": False,
                  "special": special or {}},
        "save": {"save_path": str(save)},
    }
    if method != "rtn":
        cfg["calib"] = {"name": "wikitext2", "path": str(data / "wikitext2" / "valid.txt"),
                        "n_samples": CALIB_N, "seq_len": CALIB_LEN,
                        "preproc": "wikitext2_gptq", "bs": 1, "seed": 42}
    return cfg


@pytest.fixture(scope="module")
def results(smollm2_copy: Any, smollm2_ppl: Any, shared_data: Path,
            tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    model, tok = smollm2_copy()
    res = run(resolve_config(_config(shared_data, tmp_path_factory.mktemp("autoround"),
                                     "autoround", {"iters": ITERS, "batch_size": BATCH})),
              progress=False, model=model, tokenizer=tok)
    out: dict[str, Any] = {
        "autoround": res["eval"]["fake_quant"]["wikitext2"]["ppl"],
        # RTN through llmcq run on the same windows, in this session (shared with other tests)
        "rtn": smollm2_ppl(WINDOWS, {"method": "rtn", "weight": W3G64}, seq_len=SEQ),
        "recipe": res["recipe"][0]}
    print({k: v for k, v in out.items() if isinstance(v, float)})
    return out


def test_w3g64_autoround_beats_rtn(results: dict[str, Any]) -> None:
    assert results["autoround"] < 0.95 * results["rtn"], results


def test_every_block_trained_with_auto_rounds_rates(results: dict[str, Any]) -> None:
    recipe = results["recipe"]
    assert recipe["lr"] == recipe["minmax_lr"] == 1 / ITERS
    rows = recipe["block_loss"]
    assert len(rows) == 30 and not recipe["nonfinite_loss_blocks"]
    assert all(row["best"] <= min(row["window_loss"]) for row in rows)
