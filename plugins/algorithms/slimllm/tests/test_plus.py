"""SliM-LLM+: learnable weight clipping with per-group widths. The maths against OmniQuant's
single-width LWC and SliM-LLM's binarization; whole tiny runs: the training lowers the block
loss, records reproduce the trained weights, widths come from SliM-LLM's allocation file."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

import llmcq
from llmcq.config.loader import resolve_config
from llmcq.errors import ConfigError
from llmcq.model.loading import ModelSource, load_pretrained
from llmcq.pipeline.runner import run
from llmcq.quant.qparams import QParams
from llmcq.quant.record import make_record
from llmcq.quant.spec import PerGroup, WeightQuantSpec
from llmcq_omniquant.solver import lwc_fake_quant
from llmcq_slimllm.solver import (
    binarize_qparams,
    mixed_lwc_fake_quant,
    mixed_lwc_quantize,
)

SPEC = WeightQuantSpec(bits=2, symmetric=False, granularity=PerGroup(8))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("symmetric", [False, True])
def test_each_width_is_omniquants_lwc_at_that_width(symmetric: bool) -> None:
    spec = replace(SPEC, symmetric=symmetric)
    w = torch.randn(6, 32, generator=gen(0))
    widths = torch.tensor([2, 3, 4, 3])
    up = torch.randn(6, 4, generator=gen(1)) + 2
    low = None if symmetric else torch.randn(6, 4, generator=gen(2)) + 2
    got = mixed_lwc_fake_quant(w, widths, spec, up, low)
    for gi, b in enumerate(widths.tolist()):
        cols = slice(8 * gi, 8 * gi + 8)
        ref = lwc_fake_quant(w[:, cols], replace(spec, bits=b), up[:, gi:gi + 1],
                             None if low is None else low[:, gi:gi + 1])
        torch.testing.assert_close(got[:, cols], ref)


def test_one_bit_groups_start_at_slimllms_binarization_and_learn_the_spread() -> None:
    w = torch.randn(5, 16, generator=gen(3))
    widths = torch.tensor([1, 3])
    up = torch.tensor([[0.0, 4.0]]).expand(5, 2).clone().requires_grad_(True)
    low = torch.full((5, 2), 4.0, requires_grad=True)
    got = mixed_lwc_fake_quant(w, widths, SPEC, up, low)
    s, z = binarize_qparams(w[:, :8])
    torch.testing.assert_close(got[:, :8], ((w[:, :8] / s + z).round().clamp(0, 1) - z) * s)
    target = w.clone()
    (got - target).square().sum().backward()
    assert up.grad is not None and bool((up.grad[:, 0] != 0).all())  # the spread learns


def test_records_reproduce_the_trained_weights() -> None:
    w = torch.randn(7, 40, generator=gen(4))  # 5 groups of 8
    widths = torch.tensor([1, 3, 2, 2, 2])
    up = torch.randn(7, 5, generator=gen(5)) + 1
    low = torch.randn(7, 5, generator=gen(6)) + 1
    q, scale, zero = mixed_lwc_quantize(w, widths, SPEC, up, low)
    rec = make_record(q, QParams(scale, zero), SPEC, group_bits=widths.expand(7, 5))
    assert rec.problems() == []
    torch.testing.assert_close(rec.dequantize(), mixed_lwc_fake_quant(w, widths, SPEC, up, low),
                               rtol=0, atol=1e-6)
    assert int(q[:, :8].max()) <= 1 and int(q[:, 8:16].max()) <= 7


# ---------------------------------------------------------------------- whole runs


class Capture:
    def __init__(self) -> None:
        self.records: dict[str, Any] = {}

    @llmcq.hookimpl(wrapper=True)
    def llmcq_quantize(self, run: Any, step: Any, block: Any, inputs: Any) -> Any:
        out = yield
        self.records.update({block.full_name(n): r for n, r in (out or {}).items()})
        return out


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir: Path) -> tuple[Any, Any]:
    return load_pretrained(ModelSource(tiny_llama_dir))


def run_method(tiny: tuple[Any, Any], save: Path, method: str,
               special: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    model, tok = tiny
    cfg = {"base": {"seed": 0, "device": "cpu"}, "model": {"type": "llama"},
           "calib": {"name": "random", "n_samples": 4, "seq_len": 48, "bs": 2, "seed": 3},
           "eval": {"eval_pos": ["fake_quant"], "name": "random", "seq_len": 48,
                    "num_samples": 4},
           "quant": {"method": method, "special": special, "quant_out": True,
                     "weight": {"bit": 2, "symmetric": False, "granularity": "per_group",
                                "group_size": 8}},
           "save": {"save_path": str(save)}}
    cap = Capture()
    res = run(resolve_config(cfg), progress=False, model=copy.deepcopy(model), tokenizer=tok,
              extra_plugins=[cap])
    return res, cap.records


def test_trains_on_slimllms_widths(tiny: tuple[Any, Any], tmp_path: Path) -> None:
    alloc = tmp_path / "w2g8.pt"
    _, slim = run_method(tiny, tmp_path / "slim", "slimllm", {"save_allocation": str(alloc)})
    res, plus = run_method(tiny, tmp_path / "plus", "SliMLLMPlus",
                           {"allocation_path": str(alloc), "epochs": 3, "lwc_lr": 0.05})
    assert res["compression"]["weight_bits_mean"] == 2
    assert set(plus) == set(slim)
    for name, rec in plus.items():
        assert torch.equal(rec.group_bits, slim[name].group_bits), name
        assert rec.problems() == [], name
    summary = res["recipe"][0]
    assert summary["allocation_loaded"] == str(alloc) and summary["k_per_linear"] == {}
    assert len(summary["block_loss"]) == 2
    for first, last in summary["block_loss"]:
        assert last < first, summary["block_loss"]  # the clipping learned something
    # without training: SliM-LLM's binarization and min-max grids (factors at their start)
    untrained, rec0 = run_method(tiny, tmp_path / "plus0", "slimllm_plus",
                                 {"allocation_path": str(alloc), "epochs": 0})
    ppl = lambda r: r["eval"]["fake_quant"]["random"]["ppl"]  # noqa: E731
    assert ppl(res) < ppl(untrained), (ppl(res), ppl(untrained))


def test_runs_sba_itself_without_a_file(tiny: tuple[Any, Any], tmp_path: Path) -> None:
    res, plus = run_method(tiny, tmp_path / "plus", "slimllm_plus",
                           {"epochs": 1, "salient_block": 2, "nonsalient_block": 2,
                            "save_allocation": str(tmp_path / "a.pt")})
    assert res["compression"]["weight_bits_mean"] == 2
    for name, rec in plus.items():
        widths = rec.group_bits[0]
        assert int((widths == 3).sum()) == 2 and int((widths == 1).sum()) == 2, name
    saved = torch.load(tmp_path / "a.pt", weights_only=True)
    assert saved[1]["mlp.down_proj"] == plus["model.layers.1.mlp.down_proj"].group_bits[0].tolist()


def test_refusals_name_the_key(shared_data: Path) -> None:
    base = {"model": {"type": "llama"}, "save": {"save_path": "/tmp/never"},
            "calib": {"name": "random", "n_samples": 4, "seq_len": 48},
            "quant": {"method": "slimllm_plus", "special": {},
                      "weight": {"bit": 2, "symmetric": True, "granularity": "per_group",
                                 "group_size": 8}}}
    with pytest.raises(ConfigError, match="quant.weight.symmetric"):
        resolve_config(base)
    base["quant"]["weight"]["symmetric"] = False
    base["quant"]["special"] = {"lwc_lr": 0}
    with pytest.raises(ConfigError, match="quant.special.lwc_lr"):
        resolve_config(base)
    base["quant"]["special"] = {"salient_block": 1, "nonsalient_block": 1,
                                "allocation_path": "x.pt"}
    with pytest.raises(ConfigError, match="quant.special.salient_block"):
        resolve_config(base)
    base["quant"]["special"] = {"sqc": False}
    with pytest.raises(ConfigError, match="quant.special.sqc"):
        resolve_config(base)
