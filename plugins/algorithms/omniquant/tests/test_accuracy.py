"""OmniQuant on the real bundled SmolLM2-135M (30 blocks, 9 query / 3 key-value heads) on a
short slice of wikitext2 (WINDOWS x SEQ tokens; W4A4 on the first WINDOWS_A4), calibrated on
CALIB_N x CALIB_LEN tokens of wikitext2/valid.txt (W4A4: the first CALIB_N_A4 of them) for
EPOCHS epoch(s) (the paper: 128 x 2048, 20 epochs; see the README).

Bounds a broken implementation cannot meet: at W4A4 (per-channel weights, per-token dynamic
activations, asymmetric) round-to-nearest collapses and OmniQuant (LWC + LET) recovers most
of the float perplexity; the LET-folded float model keeps the float logits (grouped-query
value/output scales included); weight-only W3 g64 OmniQuant (LWC) beats RTN W3 g64.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

import llmcq
from llmcq.config.loader import resolve_config
from llmcq.pipeline.runner import run

pytestmark = pytest.mark.slow

CALIB_N, CALIB_LEN, EPOCHS = 8, 256, 1
WINDOWS, SEQ = 8, 512
# W4A4: round-to-nearest collapses, so a shorter calibration and evaluation keep the comparison
# clear. Measured: OmniQuant 364.9 against RTN's 2409 (0.151) with 4 samples on 2 windows,
# 449.0 against 2545 (0.176) with 8 on 4; W3 g64: 91.99 against 99.15 (0.928)
CALIB_N_A4, WINDOWS_A4 = 4, 2

W4 = {"bit": 4, "symmetric": False, "granularity": "per_channel"}
A4 = {"bit": 4, "symmetric": False, "granularity": "per_token", "ste": True}
W3G64 = {"bit": 3, "symmetric": False, "granularity": "per_group", "group_size": 64}
LEARN = {"calib_algo": "learnable", "ste": True}


def _config(data: Path, save: Path, method: str, weight: dict[str, Any],
            act: dict[str, Any] | None = None, special: dict[str, Any] | None = None
            ) -> dict[str, Any]:
    windows = WINDOWS if act is None else WINDOWS_A4
    # calib_error: False skips a measurement this test does not read (two block forwards
    # per calibration batch)
    quant: dict[str, Any] = {"method": method, "weight": weight, "quant_out": True,
                             "calib_error": False}
    if act is not None:
        quant["act"] = act
    if special is not None:
        quant["special"] = special
    cfg: dict[str, Any] = {
        "base": {"seed": 42},
        "model": {"type": "llama"},
        "eval": [{"eval_pos": ["fake_quant"], "name": "wikitext2",
                  "path": str(data / "wikitext2" / "test.txt"), "seq_len": SEQ,
                  "num_samples": windows}],
        "quant": quant,
        "save": {"save_path": str(save)},
    }
    if method != "rtn":
        cfg["calib"] = {"name": "wikitext2", "path": str(data / "wikitext2" / "valid.txt"),
                        "n_samples": CALIB_N if act is None else CALIB_N_A4,
                        "seq_len": CALIB_LEN, "preproc": "wikitext2_gptq",
                        "bs": 1, "seed": 42}
    return cfg


PROBE = torch.randint(0, 49152, (1, 48), generator=torch.Generator().manual_seed(0))


class _TransformedLogits:
    """Logits of the transformed (LET-folded, float) model, before fake quantization."""

    def __init__(self) -> None:
        self.logits: torch.Tensor | None = None

    @llmcq.hookimpl
    def llmcq_evaluate(self, run: Any, model: Any, position: str) -> list:
        if position == "transformed":
            with torch.no_grad():
                self.logits = model(input_ids=PROBE).logits.float()
        return []


@pytest.fixture(scope="module")
def results(smollm2_copy: Any, smollm2_ppl: Any, shared_data: Path,
            tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    model, tok = smollm2_copy()
    with torch.no_grad():
        float_logits = model(input_ids=PROBE).logits.float()
    # RTN through llmcq run on the same windows, in this session (shared with other tests)
    out: dict[str, Any] = {
        "float_logits": float_logits,
        "rtn_w4a4": smollm2_ppl(WINDOWS_A4, {"method": "rtn", "weight": W4, "act": A4},
                                seq_len=SEQ),
        "rtn_w3g64": smollm2_ppl(WINDOWS, {"method": "rtn", "weight": W3G64}, seq_len=SEQ)}
    runs = {
        "omni_w4a4": _config(shared_data, tmp_path_factory.mktemp("b"), "omniquant",
                             {**W4, **LEARN}, A4,
                             {"epochs": EPOCHS, "lwc": True, "let": True, "alpha": 0.75,
                              "let_lr": 0.001}),
        "omni_w3g64": _config(shared_data, tmp_path_factory.mktemp("d"), "omniquant",
                              {**W3G64, **LEARN}, None, {"epochs": EPOCHS, "lwc": True}),
    }
    # one extra 64-token window at the "transformed" position, so the spy sees that model
    runs["omni_w4a4"]["eval"].append({"eval_pos": ["transformed"], "name": "wikitext2",
                                      "path": str(shared_data / "wikitext2" / "test.txt"),
                                      "seq_len": 64, "num_samples": 1})
    for name, cfg in runs.items():
        spy = _TransformedLogits()
        res = run(resolve_config(cfg), progress=False, model=copy.deepcopy(model),
                  tokenizer=tok, extra_plugins=[spy])
        out[name] = res["eval"]["fake_quant"]["wikitext2"]["ppl"]
        if spy.logits is not None:
            out["transformed_logits"] = spy.logits
        if name.startswith("omni"):
            out[f"{name}_recipe"] = res["recipe"][0]
    print({k: v for k, v in out.items() if isinstance(v, float)})
    return out


def test_w4a4_omniquant_beats_rtn(results: dict[str, Any]) -> None:
    assert results["omni_w4a4"] < 0.5 * results["rtn_w4a4"], results
    recipe = results["omni_w4a4_recipe"]
    assert len(recipe["block_loss"]) == 30 and not recipe["nonfinite_loss_blocks"]
    assert recipe["let_sites"][1] == "self_attn.v_proj -> self_attn.o_proj"  # GQA 9/3


def test_let_folded_model_keeps_float_logits(results: dict[str, Any]) -> None:
    got, want = results["transformed_logits"], results["float_logits"]
    # measured: 6.6e-5 on logits up to 34 (float32 folds through 30 blocks)
    assert torch.allclose(got, want, atol=5e-4, rtol=0), (got - want).abs().max()


def test_w3g64_omniquant_beats_rtn(results: dict[str, Any]) -> None:
    assert results["omni_w3g64"] < 0.95 * results["rtn_w3g64"], results
