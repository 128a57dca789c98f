"""KernelLinear and load_model on a tiny Llama exported by llmcq's mixpack backend (every
record kind the format holds, one linear left in float): the swapped model's logits equal
the mixpack model's and the fake-quant model's bit for bit on the reference path, and
within a stated tolerance with the kernel forced under Triton's interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import llmcq_kernels
import pytest
import torch
from llmcq_kernels.module import KernelLinear
from llmcq_mixpack import load_model as load_mixpack
from llmcq_mixpack import testing as MB
from llmcq_mixpack.export import export
from llmcq_mixpack.module import MixPackLinear


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Any:
    """(mixpack folder, the in-process fake-quant model, its records)."""
    model, tok, records = MB.fake_quantized(tiny_llama_dir)
    out = tmp_path_factory.mktemp("kernels") / "mixpack_model"
    out.mkdir()
    export(SimpleNamespace(tokenizer=tok), model, records, out)
    return out, model, records


IDS = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(1))


def test_swapped_model_equals_mixpack_and_fake_quant(exported: Any) -> None:
    folder, fake, records = exported
    model = llmcq_kernels.load_model(folder, "cpu")
    mix = load_mixpack(folder)
    swapped = {n for n, m in model.named_modules() if isinstance(m, KernelLinear)}
    assert swapped == set(records)
    assert not any(isinstance(m, MixPackLinear) for m in model.modules())
    with torch.no_grad():
        got = model(input_ids=IDS).logits
        assert torch.equal(got, mix(input_ids=IDS).logits)
        assert torch.equal(got, fake(input_ids=IDS).logits)
    for name, rec in records.items():
        assert torch.equal(model.get_submodule(name).dequantize(), rec.dequantize()), name

    half = llmcq_kernels.load_model(folder, "cpu", dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(half(input_ids=IDS).logits,
                           load_mixpack(folder, dtype=torch.bfloat16)(input_ids=IDS).logits)
    half.half()  # a later cast moves the bias, never the float32 grid
    mod = half.get_submodule(name)
    assert mod.scale.dtype == torch.float32 and mod.planes.dtype == torch.int32
    assert torch.equal(mod.dequantize(), rec.dequantize())


def test_swap_linears_on_a_loaded_mixpack_model(exported: Any) -> None:
    folder, _, records = exported
    mix = load_mixpack(folder)
    with torch.no_grad():
        want = mix(input_ids=IDS).logits
    model = llmcq_kernels.swap_linears(mix)
    assert sum(isinstance(m, KernelLinear) for m in model.modules()) == len(records)
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, want)


def run_forced_kernel(folder: str) -> list[tuple[str, float, float]]:
    """Under the interpreter: (dtype, max |logits kernel - mixpack|, max |mixpack logits|)
    with the kernel forced on CPU tensors (float-column linears stay on the reference)."""
    from llmcq_kernels import triton_mm

    assert triton_mm._AVAILABLE
    triton_mm.available = lambda x: True  # CPU tensors, interpreted
    calls = []
    real = triton_mm.kernel_linear
    triton_mm.kernel_linear = lambda *a, **k: calls.append(1) or real(*a, **k)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        model = llmcq_kernels.load_model(folder, "cpu", dtype=dtype)
        mix = load_mixpack(folder, dtype=dtype)
        with torch.no_grad():
            a = model(input_ids=IDS).logits.float()
            b = mix(input_ids=IDS).logits.float()
        rows.append((str(dtype).split(".")[-1], float((a - b).abs().max()),
                     float(b.abs().max())))
    assert calls, "the kernel was not called"
    return rows


def test_swapped_model_with_the_kernel_in_triton_interpreter(exported: Any) -> None:
    pytest.importorskip("triton")
    folder = exported[0]
    code = textwrap.dedent("""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("t", sys.argv[1])
        mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
        for row in mod.run_forced_kernel(sys.argv[2]):
            print(*row)
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, "-c", code, __file__, str(folder)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = {r[0]: (float(r[1]), float(r[2])) for r in
            (line.split() for line in res.stdout.strip().splitlines())}
    # float32: the same weights, another summation order in 14 linears and 2 blocks;
    # bfloat16: the bf16 model's own rounding through 2 blocks (a few units of 2^-8)
    print("forced-kernel logits", rows)
    diff, top = rows["float32"]
    assert diff <= 1e-4 * (1 + top)
    diff, top = rows["bfloat16"]
    assert diff <= 0.05 * top
