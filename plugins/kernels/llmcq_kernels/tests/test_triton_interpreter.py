"""The Triton kernel equals the reference path.

On a CPU the kernel runs under Triton's interpreter (``TRITON_INTERPRET=1``, set before
triton is imported, hence a subprocess, as GPTQ's sweep test does); on a GPU it is compiled
(``gpu`` marker, tests/test_gpu.py runs :func:`compare` on CUDA). Tolerances, against the
reference ``F.linear(x, dequantize(packed, x.dtype), bias)``:

* float32 activations: ``max |y - ref| <= 1e-5 * (1 + max |ref|)`` (same float32 weights,
  another summation order);
* bfloat16 / float16: ``max |y - ref| <= 2^-6 * max |ref|`` (two units in the last place of
  the largest output: the kernel rounds its float32 sum once, the reference's own matmul
  rounds differently).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from typing import Any

import pytest
import torch
from llmcq_mixpack import testing as MB

#: (name, out, in, bits, group size, random_packed kwargs)
SYNTHETIC = [
    ("w2_g32", 32, 64, 2, 32, {}),
    ("w3_g64_sym", 48, 128, 3, 64, {"symmetric": True}),
    ("w4_g128_actorder", 64, 256, 4, 128, {"col_perm": True}),
    ("w8_g16", 32, 64, 8, 16, {}),
    ("w4_partial_g48", 40, 100, 4, 48, {}),                    # 100 = 2 x 48 + 4
    ("mixed_2348_g32", 40, 96, (2, 3, 4, 8), 32, {}),
    ("mixed_24_partial_actorder", 36, 100, (2, 4), 48, {"col_perm": True, "symmetric": True}),
    ("mixed_per_channel", 24, 70, (1, 5, 8), None, {"symmetric": True}),
]
MS = (1, 3, 16)


def _tolerance(ref: torch.Tensor) -> float:
    top = float(ref.float().abs().max())
    return 1e-5 * (1 + top) if ref.dtype == torch.float32 else 2.0**-6 * top


def cases(device: str) -> list[tuple[str, Any]]:
    """(name, PackedLinear): the synthetic ones and every kind of mixpack's test records
    the kernel takes (per tensor, fractional zeros, quantized scales, 1..8-bit maps)."""
    from llmcq_kernels.synthetic import random_packed
    from llmcq_mixpack.layout import pack_record

    out = [(name, random_packed(o, i, b, g, seed=n, **kw))
           for n, (name, o, i, b, g, kw) in enumerate(SYNTHETIC)]
    mb = MB
    gen = torch.Generator().manual_seed(0)
    for kind in mb.KINDS:
        if kind == "float_columns":  # the reference path's (tests/test_module.py)
            continue
        rec = mb.hand_record(kind, torch.randn(32, 96, generator=gen), None, gen)
        out.append((kind, pack_record(rec)))
    return [(name, _to(p, device)) for name, p in out]


def _to(p: Any, device: str) -> Any:
    from dataclasses import replace

    mv = lambda t: None if t is None else t.to(device)  # noqa: E731
    return replace(p, streams={b: s.to(device) for b, s in p.streams.items()},
                   group_bits=mv(p.group_bits), scale=mv(p.scale), zero=mv(p.zero),
                   col_perm=mv(p.col_perm))


def compare(device: str, dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16)
            ) -> list[tuple[str, int, str, float, float]]:
    """(case, M, dtype, max |kernel - reference|, tolerance) for every case, M and dtype,
    plus forced split-K runs and the per-element path on a linear the whole-word path
    takes by default (8 of the 16 cases take the whole-word path by default: no partial
    group, groups a multiple of 32)."""
    from llmcq_kernels.layout import repack
    from llmcq_kernels.reference import reference_linear
    from llmcq_kernels.triton_mm import kernel_linear, word_path

    gen = torch.Generator().manual_seed(1)
    rows = []
    for name, p in cases(device):
        kp = repack(p)
        bias = torch.randn(p.out_features, generator=gen)
        for m in MS:
            x32 = torch.randn(m, p.in_features, generator=gen)
            for dt in dtypes:
                x, b = x32.to(device, dt), bias.to(device, dt)
                ref = reference_linear(x, p, b)
                y = kernel_linear(x, kp, b)
                assert y.dtype == dt and y.shape == ref.shape
                rows.append((name, m, str(dt).split(".")[-1],
                             float((y.float() - ref.float()).abs().max()), _tolerance(ref)))
    p = cases(device)[2][1]  # W4 g128 act-order, K = 256: split in 2 and 4, both paths
    kp = repack(p)
    assert word_path(kp)  # whole-word path by default; the per-element one forced here too
    for m, cfg in ((1, dict(BLOCK_M=1, BLOCK_N=32, BLOCK_K=64, SPLIT_K=4, USE_DOT=0)),
                   (16, dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, SPLIT_K=2, USE_DOT=1)),
                   (1, dict(BLOCK_M=1, BLOCK_N=32, BLOCK_K=64, SPLIT_K=2, USE_DOT=0, WORDS=0)),
                   (16, dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, SPLIT_K=1, USE_DOT=1,
                             WORDS=0))):
        x = torch.randn(m, p.in_features, generator=gen).to(device)
        b = torch.randn(p.out_features, generator=gen).to(device)
        ref = reference_linear(x, p, b)
        y = kernel_linear(x, kp, b, config=cfg)
        rows.append((f"split_k{cfg['SPLIT_K']}_words{cfg.get('WORDS', 1)}", m, "float32",
                     float((y - ref).abs().max()), _tolerance(ref)))
    return rows


def test_kernel_matches_reference_in_triton_interpreter() -> None:
    pytest.importorskip("triton")
    code = textwrap.dedent("""
        import importlib.util, sys
        import llmcq_kernels.triton_mm as tm
        assert tm._AVAILABLE, "triton did not build the kernel under the interpreter"
        spec = importlib.util.spec_from_file_location("t", sys.argv[1])
        mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
        for row in mod.compare("cpu"):
            print(*row)
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, "-c", code, __file__], env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [line.split() for line in res.stdout.strip().splitlines()]
    n_kinds = len(MB.KINDS) - 1
    assert len(rows) == (len(SYNTHETIC) + n_kinds) * len(MS) * 2 + 4
    bad = [r for r in rows if not float(r[3]) <= float(r[4])]
    assert not bad, bad
