"""WALinear through load_model / swap_linears on a tiny Llama exported by mixpack with
per-channel RTN records (W8 symmetric, W4 asymmetric, W2 symmetric, W3 asymmetric in turn):
the model with ``act=`` computes what llmcq's fake-quant model with the same ``act`` on
every linear computes, on the reference path (the CPU's)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import llmcq_kernels
import pytest
import torch
from llmcq.model.loading import ModelSource, load_pretrained
from llmcq.quant.fake import FakeQuantLinear, set_module
from llmcq.quant.rtn import rtn_record
from llmcq.quant.spec import ActQuantSpec, PerChannel, PerGroup, WeightQuantSpec
from llmcq_kernels.module import KernelLinear, WALinear
from llmcq_mixpack import load_model as load_mixpack
from llmcq_mixpack.export import export

GRIDS = [(8, True), (4, False), (2, True), (3, False)]
IDS = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(1))


def _records(model: Any, per_group: bool = False) -> dict[str, Any]:
    names = [n for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")]
    out = {}
    for i, name in enumerate(names):
        bits, sym = GRIDS[i % len(GRIDS)]
        gran = PerGroup(32) if per_group and i == 3 else PerChannel()
        out[name] = rtn_record(model.get_submodule(name),
                               WeightQuantSpec(bits=bits, symmetric=sym, granularity=gran))
    return out


def _fake(folder: Path, records: dict[str, Any], act: ActQuantSpec | None) -> Any:
    model, _ = load_pretrained(ModelSource(folder))
    for name, rec in records.items():
        set_module(model, name, FakeQuantLinear.from_record(replace(rec, act=act),
                                                            dtype=torch.float32))
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Any:
    """(mixpack folder, records, float model)."""
    model, tok = load_pretrained(ModelSource(tiny_llama_dir))
    records = _records(model)
    fake = _fake(tiny_llama_dir, records, None)
    out = tmp_path_factory.mktemp("wa") / "mixpack_model"
    out.mkdir()
    export(SimpleNamespace(tokenizer=tok), fake, records, out)
    return out, records, model.eval(), tiny_llama_dir


def test_load_model_with_act_equals_fake_quant(exported: Any) -> None:
    folder, records, float_model, src = exported
    for bits in (8, 4):
        act = ActQuantSpec(bits, True)
        model = llmcq_kernels.load_model(folder, "cpu", act=bits)
        assert {n for n, m in model.named_modules() if isinstance(m, WALinear)} == set(records)
        assert not any(isinstance(m, KernelLinear) for m in model.modules())
        with torch.no_grad():
            got = model(input_ids=IDS).logits
            want = _fake(src, records, act)(input_ids=IDS).logits
            weight_only = _fake(src, records, None)(input_ids=IDS).logits
            ref = float_model(input_ids=IDS).logits
        err = float((got - want).abs().max())
        act_effect = float((weight_only - want).abs().max())
        # float rounding only (it may flip a rare activation code at a rounding boundary in
        # the next linear): far below what quantizing the activations changes
        assert err <= 1e-3 * act_effect, (bits, err, act_effect)
        assert act_effect > 0 and float((want - ref).abs().max()) > 0
        # the linears themselves, on the same inputs: within the float32 summation bound
        name = next(iter(records))
        x = torch.randn(5, records[name].in_features, generator=torch.Generator().manual_seed(2))
        fq = FakeQuantLinear.from_record(replace(records[name], act=act), dtype=torch.float32)
        with torch.no_grad():
            d = (model.get_submodule(name)(x) - fq(x)).abs().max()
            bound = 2 * x.shape[1] * 2.0**-24 * float(x.abs().max() * fq.weight.abs().sum(1)
                                                      .max()) + 1e-6
        assert float(d) <= bound


def test_swap_linears_with_act_on_a_loaded_mixpack_model(exported: Any) -> None:
    folder, records, _, src = exported
    mix = load_mixpack(folder)
    model = llmcq_kernels.swap_linears(mix, act={"bits": 8, "symmetric": True,
                                                 "granularity": "per_token", "static": False})
    assert sum(isinstance(m, WALinear) for m in model.modules()) == len(records)
    mod = model.get_submodule(next(iter(records)))
    assert "a8 per_token dynamic" in repr(mod)
    model.to(torch.bfloat16)  # the float32 grid stays
    assert mod.scale.dtype == torch.float32 and mod.qweight.dtype in (torch.int8, torch.uint8)
    with torch.no_grad():
        logits = model(input_ids=IDS).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def test_per_group_export_is_refused_by_name(tmp_path: Path, tiny_llama_dir: Path) -> None:
    model, tok = load_pretrained(ModelSource(tiny_llama_dir))
    records = _records(model, per_group=True)
    out = tmp_path / "mixpack_model"
    out.mkdir()
    export(SimpleNamespace(tokenizer=tok), _fake(tiny_llama_dir, records, None), records, out)
    bad = list(records)[3]
    mix = load_mixpack(out)
    with pytest.raises(ValueError, match=f"{bad}: granularity 'per_group'"):
        llmcq_kernels.swap_linears(mix, act=8)
    assert not any(isinstance(m, WALinear) for m in mix.modules())  # untouched
    with pytest.raises(ValueError, match="act.symmetric"):
        llmcq_kernels.load_model(out, act=ActQuantSpec(8, False))
