"""GPTQ on CUDA gives what it gives on the CPU (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

from llmcq.quant.spec import PerChannel, PerGroup, WeightQuantSpec
from llmcq_gptq.solver import accumulate_hessian, gptq_quantize, owq_weak_columns

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("actorder, static_groups, gran", [
    (False, False, PerGroup(32)), (True, False, PerGroup(32)), (True, True, PerGroup(48)),
    (True, False, PerChannel()),
])
def test_cuda_matches_cpu(actorder: bool, static_groups: bool, gran: object) -> None:
    g = torch.Generator().manual_seed(0)
    spec = WeightQuantSpec(bits=3, symmetric=False, granularity=gran)  # type: ignore[arg-type]
    x = torch.randn(2048, 200, generator=g, dtype=torch.float64) @ (
        torch.randn(200, 200, generator=g, dtype=torch.float64) / 14 + torch.eye(200))
    W = torch.randn(96, 200, generator=g, dtype=torch.float64)
    H = torch.zeros(200, 200, dtype=torch.float64)
    accumulate_hessian(H, 0, x)
    weak = owq_weak_columns(W, H, spec, 5)
    kw = dict(actorder=actorder, static_groups=static_groups, blocksize=64, weak=weak,
              return_dequant=True)
    cpu = gptq_quantize(W, H, spec, **kw)  # type: ignore[arg-type]
    gpu = gptq_quantize(W.cuda(), H.cuda(), spec, **kw)  # type: ignore[arg-type]
    gpu32 = gptq_quantize(W.float().cuda(), H.float().cuda(), spec, **kw)  # type: ignore[arg-type]
    assert gpu.q.device.type == "cuda" and gpu32.q.device.type == "cuda"

    def err(w_hat: torch.Tensor) -> float:  # the layer error GPTQ minimizes
        return float((x @ (W - w_hat.double().cpu()).T).square().sum())

    # other summation orders may flip a code at a rounding tie, and the sweep carries the
    # difference on: compare what GPTQ optimizes, and most codes
    for other in (gpu, gpu32):
        assert abs(err(other.w_hat) / err(cpu.w_hat) - 1) < 0.02
        assert (other.q.cpu() == cpu.q).double().mean() > 0.97
        assert torch.isfinite(other.w_hat).all()


def test_bf16_weights_float32_hessian_on_cuda() -> None:
    g = torch.Generator(device="cuda").manual_seed(1)
    spec = WeightQuantSpec(bits=4, symmetric=True, granularity=PerGroup(128))
    W = torch.randn(512, 576, generator=g, device="cuda").to(torch.bfloat16)
    H = torch.zeros(576, 576, device="cuda")
    n = 0
    for _ in range(4):
        n = accumulate_hessian(H, n, torch.randn(2, 256, 576, generator=g, device="cuda",
                                                 dtype=torch.bfloat16))
    res = gptq_quantize(W, H, spec, actorder=True, return_dequant=True)
    assert torch.isfinite(res.w_hat).all() and res.scale.shape == (512, 5)


def test_16bit_hessian_on_cuda_is_float32_exact() -> None:
    g = torch.Generator(device="cuda").manual_seed(2)
    xs = [torch.randn(2, 100, 64, generator=g, device="cuda").to(dt)
          for dt in (torch.bfloat16, torch.float16, torch.float32)]
    H, n = torch.zeros(64, 64, device="cuda"), 0
    for x in xs:
        n = accumulate_hessian(H, n, x)
    x64 = torch.cat([x.reshape(-1, 64).double().cpu() for x in xs])
    torch.testing.assert_close(H.double().cpu(), 2 * x64.T @ x64 / 600, rtol=1e-5, atol=1e-5)
