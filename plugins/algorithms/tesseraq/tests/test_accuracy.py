"""TesseraQ on the real bundled SmolLM2-135M (30 blocks, 9 query / 3 key-value heads), W2 g64
asymmetric, on a short slice of wikitext2 (WINDOWS x SEQ tokens), calibrated on CALIB_N x
CALIB_LEN tokens of wikitext2/valid.txt.

The bound is computed here: AWQ alone (scales and clipping, then round-to-nearest) runs first
and saves its scales and clip ranges (llmc's step 1); TesseraQ then starts from exactly that
(llmc's step 2: load_transform folds the saved scales, clip_version v2 takes the saved clip
ranges) and must beat AWQ's perplexity on the same windows by a clear margin. The schedule is
a sliver of the paper's (ITERATIONS steps per stage over STAGES instead of 250 over 20) so
it runs in about a minute on two CPU cores.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from llmcq.config.loader import resolve_config
from llmcq.pipeline.runner import run
from llmcq.plugins import registry

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    "awq" not in [i.name for i in registry.discover("llmcq.algorithms")],
    reason="the awq plugin (llmcq-awq) is not installed")]

CALIB_N, CALIB_LEN = 4, 128
WINDOWS, SEQ = 4, 512
ITERATIONS, STAGES = 4, [0.5, 0.1]
N_GRID = 5
W2G64 = {"bit": 2, "symmetric": False, "granularity": "per_group", "group_size": 64}


def _config(data: Path, save: Path, method: str, weight: dict[str, Any],
            special: dict[str, Any]) -> dict[str, Any]:
    return {
        "base": {"seed": 42, "device": "cpu"},
        "model": {"type": "llama"},
        "calib": {"name": "wikitext2", "path": str(data / "wikitext2" / "valid.txt"),
                  "n_samples": CALIB_N, "seq_len": CALIB_LEN, "preproc": "wikitext2_gptq",
                  "bs": 1, "seed": 42},
        "eval": {"eval_pos": ["fake_quant"], "name": "wikitext2",
                 "path": str(data / "wikitext2" / "test.txt"), "seq_len": SEQ,
                 "num_samples": WINDOWS},
        # calib_error: False skips a measurement this test does not read
        "quant": {"method": method, "weight": weight, "special": special, "quant_out": True,
                  "calib_error": False},
        "save": {"save_path": str(save)},
    }


@pytest.fixture(scope="module")
def results(smollm2_copy: Any, shared_data: Path,
            tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    model, tok = smollm2_copy()
    files = tmp_path_factory.mktemp("awq_files")
    # AWQ's scale grid coarsened from 20 to N_GRID ratios to fit the CPU budget (the same
    # AWQ result is TesseraQ's start and the bound)
    awq = {"trans": True, "trans_version": "v2", "n_grid": N_GRID, "weight_clip": True,
           "clip_version": "v1", "clip_sym": False, "save_scale": True, "scale_path": str(files),
           "save_clip": True, "clip_path": str(files)}
    tesseraq = {"iterations": ITERATIONS, "batch_size": 2, "lr": 0.005, "scale_lr": 0.002,
                "thresholds": STAGES, "load_transform": True, "scale_path": str(files),
                "weight_clip": True, "clip_version": "v2", "clip_path": str(files)}
    out: dict[str, Any] = {}
    for name, method, weight, special in (
            ("awq", "awq", W2G64, awq),
            ("tesseraq", "tesseraq", {**W2G64, "calib_algo": "learnable"}, tesseraq)):
        cfg = _config(shared_data, tmp_path_factory.mktemp(name), method, weight, special)
        res = run(resolve_config(cfg), progress=False, model=copy.deepcopy(model),
                  tokenizer=tok)
        out[name] = res["eval"]["fake_quant"]["wikitext2"]["ppl"]
        out[f"{name}_recipe"] = res["recipe"][0]
    print({k: v for k, v in out.items() if isinstance(v, float)})
    return out


def test_w2g64_tesseraq_beats_awq(results: dict[str, Any]) -> None:
    # measured: AWQ 1574, TesseraQ 413 (8 steps per block); 356 with 12, 229 with 16
    assert results["tesseraq"] < 0.5 * results["awq"], results
    summary = results["tesseraq_recipe"]
    assert len(summary["block_loss"]) == 30 and not summary["nonfinite_loss_blocks"]
    # the learned rounding and scales beat AWQ's round-to-nearest on the calibration samples
    # in almost every block. Measured: every block, or all but block 11 in some runs (where
    # SmolLM2's massive activation appears and dominates the L2 loss; a few Adam steps of 2
    # samples can overshoot there)
    losses = summary["block_loss"]
    assert sum(after < before for before, after in losses) >= 25, losses
