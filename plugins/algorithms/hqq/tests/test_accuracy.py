"""HQQ on the real bundled SmolLM2-135M: weight error and wikitext2 perplexity (WINDOWS x 512
tokens).

What holds on this model, measured (README, "Measured"): HQQ's weight error is below RTN's on
every linear (mean absolute and mean squared), yet its perplexity at W3 g64 is far above
RTN's (the reference ``hqq`` package's even more so). The cause: the fractional zero point
takes 0 off the grid, so the near-zero weights that v_proj holds for the few input channels
with large mean activations are reconstructed as +-(a fraction of a step); their error times
that mean is a bias in the values, which attention averaging does not remove.

The perplexity test therefore never compares HQQ with RTN (a better HQQ, one that beat RTN,
must pass). It bounds HQQ by perplexities it computes itself on the same tokens: below HQQ's
own min-max start (the same grids with the unfitted fractional zero points, which is what an
HQQ whose zero-point rounds never help would return, since each group keeps its best round),
and no worse than the reference ``hqq`` package (when installed; it is a dev requirement).
"""

from __future__ import annotations

import copy
import importlib.util
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from llmcq.config.loader import resolve_config
from llmcq.pipeline.runner import run
from llmcq.quant.qparams import fake_quantize_weight
from llmcq.quant.spec import PerGroup, WeightQuantSpec

from llmcq_hqq.solver import hqq_quantize

pytestmark = pytest.mark.slow

WINDOWS = 8
W3G64 = {"bit": 3, "symmetric": False, "granularity": "per_group", "group_size": 64}


@pytest.fixture(scope="module")
def smollm2(smollm2_copy: Any) -> tuple[Any, Any]:
    return smollm2_copy()


def _config(data: Path, save: Path, quant: dict[str, Any] | None) -> dict[str, Any]:
    """Evaluate the first WINDOWS x 512 tokens: the quantized model (``quant``), else the model as
    passed in (``pretrain``)."""
    cfg: dict[str, Any] = {
        "model": {"type": "llama"},
        "eval": {"eval_pos": ["fake_quant" if quant else "pretrain"], "name": "wikitext2",
                 "path": str(data / "wikitext2" / "test.txt"), "seq_len": 512,
                 "num_samples": WINDOWS},
        "save": {"save_path": str(save)},
    }
    if quant:
        cfg["quant"] = quant
    return cfg


def _replaced(model: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """A copy of ``model`` whose decoder-block linears hold ``fn(weight)`` (the tied
    embedding/head stays float, as in ``llmcq run``)."""
    m = copy.deepcopy(model)
    for name, mod in m.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in f".{name}":
            mod.weight.data = fn(mod.weight.data.float()).to(mod.weight.dtype)
    return m


def _minmax_fractional(w: torch.Tensor) -> torch.Tensor:
    """HQQ's start, computed here from its definition (not by the solver): per group of 64
    input columns, ``s = (max - min) / 7``, ``z = -min / s`` not rounded,
    ``W_r = s (clamp(round(W / s + z), 0, 7) - z)``."""
    g = w.reshape(w.shape[0], -1, 64)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    s = ((hi - lo) / 7).clamp(min=1e-8)
    z = -lo / s
    return (s * (torch.round(g / s + z).clamp(0, 7) - z)).reshape(w.shape)


def _hqq_package(w: torch.Tensor) -> torch.Tensor:
    """hqq's ``Quantizer.quantize``: axis 1 (groups of input columns), ``round_zero=False``."""
    from hqq.core.quantize import Quantizer

    W_q, meta = Quantizer.quantize(w, nbits=3, group_size=64, axis=1, optimize=True,
                                   round_zero=False, bitpack=False, device="cpu")
    return ((W_q - meta["zero"]) * meta["scale"]).reshape(w.shape)


@pytest.fixture(scope="module")
def ppl(smollm2: Any, shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """W3 g64 perplexities on the same WINDOWS x 512 tokens: ``hqq`` (ours, through the pipeline),
    ``start`` (its min-max start) and, when the package is installed, ``package``."""
    model, tok = smollm2
    cfg = _config(shared_data, tmp_path_factory.mktemp("hqq"),
                  {"method": "hqq", "weight": {**W3G64, "round_zp": False}})
    res = run(resolve_config(cfg), progress=False, model=copy.deepcopy(model), tokenizer=tok)
    out: dict[str, Any] = {"hqq": res["eval"]["fake_quant"]["wikitext2"]["ppl"],
                           "hqq_recipe": res["recipe"]}
    fns = {"start": _minmax_fractional}
    if importlib.util.find_spec("hqq") is not None:
        fns["package"] = _hqq_package
    for name, fn in fns.items():
        cfg = _config(shared_data, tmp_path_factory.mktemp(name), None)  # same evaluation
        res = run(resolve_config(cfg), progress=False, model=_replaced(model, fn),
                  tokenizer=tok)
        out[name] = res["eval"]["pretrain"]["wikitext2"]["ppl"]
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
        assert all(ours[k] < 0.99 * rtn[k] for k in ours), {k: float(ours[k] / rtn[k])
                                                            for k in ours}
    else:  # 2 bits: 0.94-0.97 except block 0's q, k, v (1.015-1.017 of RTN's: their float-zero
        # start is 6-16% above RTN's rounded zero, and the rounds win most but not all of it)
        assert sum(bool(ours[k] < rtn[k]) for k in ours) >= len(ours) - 3


def test_perplexity_w3g64_below_its_start_and_no_worse_than_the_reference_package(
        ppl: dict) -> None:
    # measured on these 8 x 512 tokens: ours 251.12, start 262.16, package 277.90 (float 30.64,
    # RTN 99.15: on this model HQQ is worse than RTN, which this test never requires); on
    # 16 x 512: float 36.63, ours 311.52, start 329.39, package 346.80, RTN 116.56
    print({k: v for k, v in ppl.items() if k != "hqq_recipe"})  # shown by pytest -rP
    (step,) = ppl["hqq_recipe"]
    assert step["hqq"]["mean_abs_error"] < step["hqq"]["mean_abs_error_minmax"]
    assert math.isfinite(ppl["hqq"]), ppl
    assert ppl["hqq"] < ppl["start"], ppl  # the zero-point rounds lower the perplexity
    if "package" not in ppl:
        pytest.skip("the reference package is not installed (pip install hqq): "
                    f"only the bound by the start was checked ({ppl})")
    assert ppl["hqq"] <= ppl["package"], ppl  # no worse than the reference implementation
