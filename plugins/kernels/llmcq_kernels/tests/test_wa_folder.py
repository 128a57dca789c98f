"""``load_model(folder)`` without ``act=``: the activation setting comes from the mixpack
folder (format 2's per-linear ``act``). A tiny Llama with per-channel RTN records whose
linears carry A8 / A4 symmetric settings, none (weight-only) and an asymmetric A8 one (which
the WxA kernels do not compute): the first become WALinears at their own setting, the
weight-only ones KernelLinears, the asymmetric one stays a MixPackLinear (warned; refused
with ``strict=True``); the model's logits equal ``llmcq_mixpack.load_model``'s (the
fake-quant model's, bit for bit) within the README's tolerance, on the CPU's reference path
and, for one linear, with the Triton kernel under the interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
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
from llmcq.quant.spec import ActQuantSpec, PerChannel, WeightQuantSpec
from llmcq_kernels.module import KernelLinear, WALinear
from llmcq_mixpack import load_model as load_mixpack
from llmcq_mixpack.export import export
from llmcq_mixpack.module import MixPackLinear

#: per linear, in turn: (weight bits, weight symmetric, activation setting)
PLAN = [(8, True, ActQuantSpec(8, True)), (4, False, ActQuantSpec(4, True)),
        (4, True, None), (8, True, ActQuantSpec(8, False))]
IDS = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path
           ) -> tuple[Path, dict[str, Any]]:
    """A mixpack export of the tiny Llama with :data:`PLAN`'s records, and the records."""
    model, tok = load_pretrained(ModelSource(tiny_llama_dir))
    names = [n for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")]
    records = {}
    for i, name in enumerate(names):
        bits, sym, act = PLAN[i % len(PLAN)]
        rec = rtn_record(model.get_submodule(name),
                         WeightQuantSpec(bits=bits, symmetric=sym, granularity=PerChannel()))
        records[name] = replace(rec, act=act)
        set_module(model, name, FakeQuantLinear.from_record(records[name],
                                                            dtype=torch.float32))
    out = tmp_path_factory.mktemp("wa-folder") / "mixpack_model"
    out.mkdir()
    export(SimpleNamespace(tokenizer=tok), model, records, out)
    return out, records


def test_the_folder_settings_build_walinears_within_tolerance(folder: Any) -> None:
    path, records = folder
    with pytest.warns(UserWarning, match="stay MixPackLinear") as caught:
        model = llmcq_kernels.load_model(path, "cpu")
    for name, rec in records.items():
        mod = model.get_submodule(name)
        if rec.act is None:
            assert type(mod) is KernelLinear, name
        elif rec.act.symmetric:
            assert type(mod) is WALinear and mod.act == rec.act, name
        else:  # asymmetric activations: not a WxA kernel setting, the reference path stays
            assert type(mod) is MixPackLinear and mod.act == rec.act, name
            assert name in str(caught[0].message) and "act.symmetric" in str(
                caught[0].message)
    mix = load_mixpack(path)
    with torch.no_grad():
        got = model(input_ids=IDS).logits
        want = mix(input_ids=IDS).logits  # the fake-quant logits (mixpack's own tests)
        for m in mix.modules():
            if isinstance(m, MixPackLinear):
                m.act = None
        weight_only = mix(input_ids=IDS).logits
    err = float((got - want).abs().max())
    act_effect = float((weight_only - want).abs().max())
    # the README's tolerance: within 1e-3 of what quantizing the activations changes
    assert act_effect > 0 and err <= 1e-3 * act_effect, (err, act_effect)


def test_strict_refuses_and_act_overrides_the_folder(folder: Any) -> None:
    path, records = folder
    asym = next(n for n, r in records.items() if r.act is not None and not r.act.symmetric)
    with pytest.raises(ValueError, match=f"{asym}: act.symmetric False"):
        llmcq_kernels.load_model(path, strict=True)
    model = llmcq_kernels.load_model(path, act=8)  # every linear at A8 symmetric
    a8 = ActQuantSpec(8, True)
    assert all(type(model.get_submodule(n)) is WALinear and model.get_submodule(n).act == a8
               for n in records)


def test_walinear_kernel_from_the_folder_in_triton_interpreter(folder: Any) -> None:
    """One linear with its folder setting (W4 asymmetric, A4): the Triton kernel (forced on
    CPU tensors under the interpreter) against MixPackLinear, within the float32 summation
    bound (the activation codes are the same: ``x_q s_x`` is ``fake_quantize_act``'s output
    bit for bit, wa_layout's module doc)."""
    pytest.importorskip("triton")
    path, records = folder
    name = next(n for n, r in records.items() if r.act == ActQuantSpec(4, True))
    code = textwrap.dedent("""
        import sys
        from pathlib import Path
        import torch
        import llmcq_kernels.triton_wa as tw
        from llmcq_kernels.module import WALinear
        from llmcq_mixpack.layout import read_packed
        from llmcq_mixpack.loader import read_quantization_config, read_weights
        from llmcq_mixpack.module import MixPackLinear
        assert tw._AVAILABLE, "triton did not build the kernel under the interpreter"
        folder, name = Path(sys.argv[1]), sys.argv[2]  # the one linear, without transformers
        qc = read_quantization_config(folder)
        tensors = read_weights(folder, qc["weight_files"])
        mix = MixPackLinear(read_packed(name, qc["modules"][name], tensors),
                            tensors.get(name + ".bias"))
        lin = WALinear.from_mixpack(mix)
        x = torch.randn(2, 3, mix.in_features, generator=torch.Generator().manual_seed(4))
        x = x * (1 + 9 * torch.rand(mix.in_features, generator=torch.Generator().manual_seed(5)))
        calls = []
        real = tw.wa_linear
        tw.available = lambda t: True
        tw.wa_linear = lambda *a, **k: calls.append(1) or real(*a, **k)
        with torch.no_grad():
            y, want = lin(x), mix(x)
            w = mix.dequantize()
        assert calls == [1] and lin.act == mix.act
        bound = 2 * x.shape[-1] * 2.0**-24 * float(x.abs().max() * w.abs().sum(1).max()) + 1e-6
        print(float((y - want).abs().max()), bound)
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, "-c", code, str(path), name], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    err, bound = (float(v) for v in res.stdout.split()[-2:])
    assert err <= bound, (err, bound)
