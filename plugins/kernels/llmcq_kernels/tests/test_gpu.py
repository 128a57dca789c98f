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
