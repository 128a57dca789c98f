"""The WxAy Triton kernel (``triton_wa``) equals the reference (``wa_layout.wa_reference``).

On a CPU the kernel runs under Triton's interpreter (``TRITON_INTERPRET=1`` before triton
is imported, hence a subprocess); tests/test_gpu.py runs :func:`compare` compiled on CUDA.
The integer accumulation is exact on both sides and the float32 epilogue is the same
sequence of operations, so what may differ is float rounding only:

* float32 activations: ``|y - ref| <= 2^-22 |ref|`` elementwise (a few units in the last
  place: the compiler may fuse a multiply-add), and ``2^-22 max |ref|`` with split-K (partial
  results rounded before they are added: cancellation leaves an absolute error);
* bfloat16 / float16: ``|y - ref| <= 2^-7 |ref|`` elementwise for bfloat16, ``2^-10 |ref|``
  for float16 (one unit in the last place: the interpreter's float32 -> bfloat16 cast
  truncates where torch's rounds to nearest).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from typing import Any

import pytest
import torch

#: (name, out, in, weight bits, symmetric, col_perm, act bits, act sym_range)
CASES = [
    ("w8a8_sym", 40, 100, 8, True, False, 8, "restricted"),
    ("w8a8_asym_full", 24, 64, 8, False, False, 8, "full"),
    ("w4a8_sym_actorder", 40, 100, 4, True, True, 8, "restricted"),
    ("w4a8_asym", 36, 128, 4, False, False, 8, "restricted"),
    ("w3a8_asym", 24, 70, 3, False, False, 8, "restricted"),
    ("w2a8_sym", 40, 100, 2, True, False, 8, "restricted"),
    ("w1a8_asym", 16, 66, 1, False, False, 8, "restricted"),
    ("w4a4_sym", 40, 100, 4, True, False, 4, "restricted"),
    ("w6a6_sym", 24, 64, 6, True, False, 6, "restricted"),
    ("w258a8_rows", 24, 70, (2, 5, 8), True, False, 8, "restricted"),
]
MS = (1, 3, 16)
#: forced configurations on the W4A8 asymmetric case: split-K (float32 atomics), the
#: int32 multiply-reduce at M = 16, tl.dot with padded rows at M = 3, a 64-row tile, and
#: the quantize as a pass of its own (PREQ) on both products
FORCED = [(1, dict(BLOCK_M=1, BLOCK_N=16, BLOCK_K=32, SPLIT_K=2, USE_DOT=0)),
          (16, dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, SPLIT_K=2, USE_DOT=1)),
          (16, dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, SPLIT_K=1, USE_DOT=0)),
          (3, dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, SPLIT_K=1, USE_DOT=1)),
          (40, dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=64, SPLIT_K=1, USE_DOT=1)),
          (3, dict(BLOCK_M=4, BLOCK_N=16, BLOCK_K=32, SPLIT_K=1, USE_DOT=0, PREQ=1)),
          (20, dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, SPLIT_K=1, USE_DOT=1, PREQ=1))]


def _rel(dtype: torch.dtype) -> float:
    return {torch.float32: 2.0**-22, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}[dtype]


def _row(name: str, m: int, y: torch.Tensor, ref: torch.Tensor, split: bool = False
         ) -> tuple[Any, ...]:
    """(case, M, dtype, max |y - ref|, max of |y - ref| - bound (<= 0 passes))."""
    assert y.dtype == ref.dtype and y.shape == ref.shape
    diff = (y.float() - ref.float()).abs()
    top = ref.float().abs()
    excess = diff - _rel(ref.dtype) * (top.max() if split else top)
    return (name, m, str(ref.dtype).split(".")[-1], float(diff.max()), float(excess.max()))


def compare(device: str, dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16)
            ) -> list[tuple[Any, ...]]:
    from llmcq.quant.spec import ActQuantSpec
    from llmcq_kernels.synthetic import random_packed
    from llmcq_kernels.triton_wa import wa_linear
    from llmcq_kernels.wa_layout import pack_wa, wa_reference

    gen = torch.Generator().manual_seed(5)
    rows = []
    for i, (name, out, n_in, bits, sym, perm, a, rng) in enumerate(CASES):
        wp = pack_wa(random_packed(out, n_in, bits, None, symmetric=sym, col_perm=perm,
                                   seed=20 + i)).to(device)
        act = ActQuantSpec(a, True, sym_range=rng)
        bias = torch.randn(out, generator=gen)
        for m in MS:
            x32 = torch.randn(m, n_in, generator=gen) * (1 + 9 * torch.rand(n_in, generator=gen))
            for dt in dtypes:
                x, b = x32.to(device, dt), bias.to(device, dt)
                rows.append(_row(name, m, wa_linear(x, wp, act, b), wa_reference(x, wp, act, b)))
    wp = pack_wa(random_packed(36, 128, 4, None, seed=23)).to(device)
    act = ActQuantSpec(8, True)
    for m, cfg in FORCED:
        x = torch.randn(m, 128, generator=gen).to(device)
        b = torch.randn(36, generator=gen).to(device)
        y = wa_linear(x, wp, act, b, config=cfg)
        rows.append(_row(f"forced_split{cfg['SPLIT_K']}_dot{cfg['USE_DOT']}"
                         f"_preq{cfg.get('PREQ', 0)}", m, y,
                         wa_reference(x, wp, act, b), split=cfg["SPLIT_K"] > 1))
    return rows


def module_forced(device: str) -> tuple[Any, ...]:
    """WALinear's forward with the kernel taken (forced on CPU tensors under the
    interpreter) against its reference path, 3-D input."""
    from llmcq_kernels import triton_wa
    from llmcq_kernels.module import WALinear
    from llmcq_kernels.synthetic import random_packed

    lin = WALinear(random_packed(32, 96, 4, None, seed=3), torch.randn(32), 8).to(device)
    calls = []
    real_available, real_linear = triton_wa.available, triton_wa.wa_linear
    triton_wa.available = lambda x: True
    triton_wa.wa_linear = lambda *a, **k: calls.append(1) or real_linear(*a, **k)
    try:
        x = torch.randn(2, 5, 96, generator=torch.Generator().manual_seed(6)).to(device)
        y = lin(x)
    finally:
        triton_wa.available, triton_wa.wa_linear = real_available, real_linear
    assert calls == [1]
    return _row("module", 10, y, lin.reference(x))


def test_wa_kernel_matches_reference_in_triton_interpreter() -> None:
    pytest.importorskip("triton")
    code = textwrap.dedent("""
        import importlib.util, sys
        import llmcq_kernels.triton_wa as tw
        assert tw._AVAILABLE, "triton did not build the kernel under the interpreter"
        spec = importlib.util.spec_from_file_location("t", sys.argv[1])
        mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
        for row in mod.compare("cpu") + [mod.module_forced("cpu")]:
            print(*row)
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, "-c", code, __file__], env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [line.split() for line in res.stdout.strip().splitlines()]
    assert len(rows) == len(CASES) * len(MS) * 2 + len(FORCED) + 1
    bad = [r for r in rows if not float(r[4]) <= 0]
    assert not bad, bad
    # float32 without split-K: the same operations in the same order, bit for bit
    exact = [r for r in rows if r[2] == "float32" and "split2" not in r[0]]
    assert all(float(r[3]) == 0 for r in exact), exact
