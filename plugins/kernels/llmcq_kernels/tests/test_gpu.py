"""On CUDA (skipped without a GPU): the compiled kernel equals the reference, float32,
bfloat16 and float16 activations, with tests/test_triton_interpreter.py's tolerances; and
KernelLinear dispatches to it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch


def _interp() -> object:
    spec = importlib.util.spec_from_file_location(
        "kernels_interp", Path(__file__).with_name("test_triton_interpreter.py"))
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.gpu
def test_kernel_matches_reference_on_cuda() -> None:
    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    rows = _interp().compare("cuda", (torch.float32, torch.bfloat16, torch.float16))
    bad = [r for r in rows if not r[3] <= r[4]]
    assert not bad, bad


@pytest.mark.gpu
def test_kernel_linear_dispatches_to_the_kernel_on_cuda() -> None:
    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from llmcq_kernels import triton_mm
    from llmcq_kernels.module import KernelLinear
    from llmcq_kernels.synthetic import random_packed

    calls = []
    real = triton_mm.kernel_linear

    def spy(*a: object, **k: object) -> torch.Tensor:
        calls.append(1)
        return real(*a, **k)  # type: ignore[arg-type]

    lin = KernelLinear(random_packed(256, 512, (2, 4), 128), None).cuda()
    triton_mm.kernel_linear = spy  # type: ignore[assignment]
    try:
        x = torch.randn(4, 512, device="cuda", dtype=torch.bfloat16)
        y = lin(x)
    finally:
        triton_mm.kernel_linear = real  # type: ignore[assignment]
    assert calls == [1]
    ref = lin.reference(x)
    assert float((y.float() - ref.float()).abs().max()) <= 2.0**-6 * float(ref.abs().max())


def _wa_interp() -> object:
    spec = importlib.util.spec_from_file_location(
        "kernels_wa_interp", Path(__file__).with_name("test_wa_interpreter.py"))
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.gpu
def test_wa_kernel_matches_reference_on_cuda() -> None:
    """The WxAy kernel compiled (int8 tensor cores) = the reference, float32 / bfloat16 /
    float16 activations, test_wa_interpreter.py's bounds; and WALinear dispatches to it."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    mod = _wa_interp()
    rows = mod.compare("cuda", (torch.float32, torch.bfloat16, torch.float16))
    rows.append(mod.module_forced("cuda"))
    bad = [r for r in rows if not r[4] <= 0]
    assert not bad, bad


@pytest.mark.gpu
def test_wa_kernel_matches_torch_int_mm() -> None:
    """W8A8 and W4A8: the kernel's output = torch._int_mm on the same int8 codes (llmcq's
    per-token quantizer, the layout's weight codes) with the same float32 epilogue."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from llmcq.quant.spec import ActQuantSpec
    from llmcq_kernels.synthetic import random_packed
    from llmcq_kernels.triton_wa import wa_linear
    from llmcq_kernels.wa_layout import pack_wa, quantize_tokens, unpack_wa

    act = ActQuantSpec(8, True)
    gen = torch.Generator().manual_seed(7)
    for bits in (8, 4):
        wp = pack_wa(random_packed(256, 512, bits, None, symmetric=True, seed=bits)).to("cuda")
        wq = unpack_wa(wp).to(torch.int8)  # [N, K]
        for m in (32, 256):
            x = (torch.randn(m, 512, generator=gen) * 3).cuda()
            xq, sx = quantize_tokens(x, act)
            acc = torch._int_mm(xq.to(torch.int8), wq.t())
            want = acc.float() * sx[:, None] * wp.scale[None, :]
            got = wa_linear(x, wp, act)
            assert ((got - want).abs() <= 2.0**-22 * want.abs()).all(), (bits, m)
            got16 = wa_linear(x.bfloat16(), wp, act)
            want16 = wa_linear(x.bfloat16().float(), wp, act).bfloat16()
            assert ((got16.float() - want16.float()).abs()
                    <= 2.0**-7 * want16.float().abs()).all(), (bits, m)
