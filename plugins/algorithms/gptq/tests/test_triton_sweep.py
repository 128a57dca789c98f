"""The Triton sweep of a lazy block gives the torch column loop's result.

On a CPU the kernel runs under triton's interpreter (``TRITON_INTERPRET=1``, set before
triton is imported, hence a subprocess); on a GPU it is compiled (``gpu`` marker). Both skip
where triton is not installed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from llmcq.quant.spec import PerChannel, PerGroup, WeightQuantSpec
from llmcq_gptq.solver import accumulate_hessian, gptq_quantize, owq_weak_columns

CASES = [  # (symmetric, actorder, static_groups, granularity, blocksize, owq columns)
    (False, False, False, PerGroup(32), 64, 0),
    (False, True, False, PerGroup(32), 64, 0),   # groups fitted mid-block, g_idx
    (True, True, True, PerGroup(48), 64, 0),     # static groups across block edges
    (False, True, False, PerChannel(), 200, 0),  # a block longer than one launch takes
    (True, False, False, PerGroup(40), 128, 5),  # OWQ float columns, partial last group
]


def _problem(device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 200, generator=g) @ (torch.randn(200, 200, generator=g) / 14
                                                + torch.eye(200))
    W = torch.randn(40, 200, generator=g)
    H = torch.zeros(200, 200)
    accumulate_hessian(H, 0, x)
    return x.to(device), W.to(device), H.to(device)


def compare(device: str) -> list[tuple[float, float]]:
    """(share of equal codes, kernel error / loop error) for every case."""
    x, W, H = _problem(device)
    out = []
    for sym, actorder, static, gran, bs, k in CASES:
        spec = WeightQuantSpec(bits=3, symmetric=sym, granularity=gran)
        weak = owq_weak_columns(W, H, spec, k) if k else None
        kw = dict(actorder=actorder, static_groups=static, blocksize=bs, weak=weak,
                  return_dequant=True)
        loop = gptq_quantize(W, H, spec, kernel=False, **kw)  # type: ignore[arg-type]
        kern = gptq_quantize(W, H, spec, kernel=True, **kw)  # type: ignore[arg-type]

        def err(w_hat: torch.Tensor) -> float:
            return float((x @ (W - w_hat).T).square().sum())

        assert torch.isfinite(kern.w_hat).all()
        if loop.g_idx is not None:
            assert torch.equal(loop.g_idx, kern.g_idx)
        out.append((float((loop.q == kern.q).double().mean()),
                    err(kern.w_hat) / err(loop.w_hat)))
    return out


def test_kernel_matches_loop_in_triton_interpreter(tmp_path: object) -> None:
    pytest.importorskip("triton")
    code = textwrap.dedent("""
        import torch
        import llmcq_gptq.triton_sweep as ts
        assert ts._AVAILABLE, "triton did not build the kernel under the interpreter"
        ts.available = lambda t: t.dtype == torch.float32   # CPU tensors, interpreted
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("t", sys.argv[1])
        mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
        for codes, ratio in mod.compare("cpu"):
            print(codes, ratio)
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, "-c", code, __file__], env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [tuple(map(float, line.split())) for line in res.stdout.strip().splitlines()]
    assert len(rows) == len(CASES)
    for codes, ratio in rows:
        # same float32 operations in another order: at most a tie flips a code
        assert codes > 0.999 and abs(ratio - 1) < 1e-3


@pytest.mark.gpu
def test_kernel_matches_loop_on_cuda() -> None:
    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    for codes, ratio in compare("cuda"):
        assert codes > 0.99 and abs(ratio - 1) < 0.01


@pytest.mark.gpu
def test_kernel_is_the_default_on_cuda() -> None:
    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from llmcq_gptq import triton_sweep

    calls = []
    real = triton_sweep.sweep_block

    def spy(*a: object, **k: object) -> None:
        calls.append(1)
        real(*a, **k)  # type: ignore[arg-type]

    triton_sweep.sweep_block = spy  # type: ignore[assignment]
    try:
        _, W, H = _problem("cuda")
        gptq_quantize(W, H, WeightQuantSpec(bits=4, symmetric=True,
                                            granularity=PerGroup(32)), blocksize=64)
    finally:
        triton_sweep.sweep_block = real  # type: ignore[assignment]
    # 200 columns, lazy blocks of 64, groups of 32 fitted during the sweep (no static
    # groups): one launch per group, 2 + 2 + 2 + 1 (the last block holds 8 columns)
    assert len(calls) == 7
