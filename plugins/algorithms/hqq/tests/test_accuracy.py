"""HQQ on the real bundled SmolLM2-135M: weight error and wikitext2 perplexity (16 x 512 tokens).

What holds on this model, measured (README, "Measured"): HQQ's weight error is below RTN's on
every linear (mean absolute and mean squared), yet its perplexity at W3 g64 is far above
RTN's (the reference ``hqq`` package's even more so). The cause: the fractional zero point
takes 0 off the grid, so the near-zero weights that v_proj holds for the few input channels
with large mean activations are reconstructed as +-(a fraction of a step); their error times
that mean is a bias in the values, which attention averaging does not remove. These tests
assert those facts, so a change that moves them is seen.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from llmcq.config.loader import resolve_config
from llmcq.model.loading import ModelSource, load_pretrained
from llmcq.pipeline.runner import run
from llmcq.quant.qparams import fake_quantize_weight
from llmcq.quant.spec import PerGroup, WeightQuantSpec

from llmcq_hqq.solver import hqq_quantize

pytestmark = pytest.mark.slow

W3G64 = {"bit": 3, "symmetric": False, "granularity": "per_group", "group_size": 64}
#: the reference package (hqq 0.2.8, Quantizer.quantize, axis 1, round_zero False) on the same
#: 16 x 512 tokens: the perplexity it scored (README, "Measured")
HQQ_PACKAGE_W3G64 = 346.80


@pytest.fixture(scope="module")
def smollm2(smollm2_path: Path) -> tuple[Any, Any]:
    return load_pretrained(ModelSource(smollm2_path.parent, smollm2_path.name))


def _config(data: Path, save: Path, method: str, weight: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": {"type": "llama"},
        "eval": {"eval_pos": ["fake_quant"], "name": "wikitext2",
                 "path": str(data / "wikitext2" / "test.txt"), "seq_len": 512,
                 "num_samples": 16},
        "quant": {"method": method, "weight": weight},
        "save": {"save_path": str(save)},
    }


@pytest.fixture(scope="module")
def ppl(smollm2: Any, shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    model, tok = smollm2
    out: dict[str, Any] = {}
    for method, weight in [("rtn", W3G64), ("hqq", {**W3G64, "round_zp": False})]:
        res = run(resolve_config(_config(shared_data, tmp_path_factory.mktemp(method), method,
                                         weight)),
                  progress=False, model=copy.deepcopy(model), tokenizer=tok)
        out[method] = res["eval"]["fake_quant"]["wikitext2"]["ppl"]
        out[f"{method}_recipe"] = res["recipe"]
    return out


@pytest.mark.parametrize("bits", [3, 2])
def test_weight_error_below_rtn_on_real_layers(smollm2: Any, bits: int) -> None:
    model, _ = smollm2
    spec = WeightQuantSpec(bits=bits, symmetric=False, granularity=PerGroup(64))
    ours, rtn = {}, {}
    for i in (0, 15, 29):
        for name, lin in model.model.layers[i].named_modules():
            if not isinstance(lin, torch.nn.Linear):
                continue
            w = lin.weight.detach().float()
            res = hqq_quantize(w, bits, PerGroup(64))
            idx = torch.arange(w.shape[1]) // 64
            where = f"layers.{i}.{name}"
            ours[where] = (w - (res.q - res.zero[:, idx]) * res.scale[:, idx]).abs().mean()
            rtn[where] = (w - fake_quantize_weight(w, spec)).abs().mean()
            assert torch.all(res.error <= res.error_init), where  # each group kept its best
    assert sum(ours.values()) < 0.97 * sum(rtn.values())
    if bits == 3:  # measured: 0.93-0.98 of RTN's error on every layer
        assert all(ours[k] < 0.99 * rtn[k] for k in ours), {k: float(ours[k] / rtn[k]) for k in ours}
    else:  # 2 bits: 0.94-0.97 except block 0's q, k, v (1.015-1.017 of RTN's: their float-zero
        # start is 6-16% above RTN's rounded zero, and the rounds win most but not all of it)
        assert sum(bool(ours[k] < rtn[k]) for k in ours) >= len(ours) - 3


def test_perplexity_w3g64_against_rtn_and_the_reference_package(ppl: dict) -> None:
    # measured on these 16 x 512 tokens: float 36.63, RTN 116.56, ours 312.78, package 346.80
    (step,) = ppl["hqq_recipe"]
    assert step["hqq"]["mean_abs_error"] < step["hqq"]["mean_abs_error_minmax"]
    assert ppl["hqq"] < HQQ_PACKAGE_W3G64, ppl  # no worse than the reference implementation
    assert ppl["hqq"] > ppl["rtn"], ppl  # and, on this model, worse than RTN (see above)
