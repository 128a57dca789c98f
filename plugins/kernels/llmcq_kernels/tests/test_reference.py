"""The kernel-friendly addressing reads mixpack's codes exactly, and the reference path
equals fake-quant (no triton needed)."""

from __future__ import annotations

import pytest
import torch
from llmcq.quant.fake import FakeQuantLinear
from llmcq_kernels.layout import group_positions, repack, unpack_positions
from llmcq_kernels.reference import reference_linear
from llmcq_kernels.synthetic import random_packed
from llmcq_mixpack import testing as MB
from llmcq_mixpack.dequant import dequantize
from llmcq_mixpack.layout import pack_record
from llmcq_mixpack.packing import unpack_codes

CASES = [  # (out, in, bits, group_size, kwargs)
    (32, 64, 4, 16, {}),
    (33, 100, 3, 48, {"symmetric": True}),             # partial last group (100 = 2*48 + 4)
    (40, 96, (2, 3, 4, 8), 32, {}),                    # mixed widths
    (40, 100, (2, 4), 48, {"col_perm": True}),         # mixed + partial + act-order
    (8, 70, (1, 5, 8), None, {"symmetric": True}),     # per-channel widths
    (16, 64, 8, None, {}),
    (24, 128, 2, 128, {"col_perm": True}),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}-b{c[2]}-g{c[3]}")
def test_kernel_addressing_reads_mixpack_codes(case: tuple) -> None:
    out, n_in, bits, gs, kw = case
    p = random_packed(out, n_in, bits, gs, **kw)
    kp = repack(p)
    want = unpack_codes(p.streams, p.bit_map(), (out, n_in), p.group_width)
    assert torch.equal(unpack_positions(kp).to(torch.uint8), want)
    assert torch.equal(dequantize(kp.packed(p)), dequantize(p))  # views of one buffer
    assert kp.planes.numel() == sum(s.numel() for s in p.streams.values())  # no copy kept


def test_group_positions_on_a_hand_made_map() -> None:
    # 2 rows, groups of 4 over 10 columns (2 full + a partial of 2), widths:
    #   row 0: 2 3 | 2      row 1: 3 2 | 3
    m = torch.tensor([[2, 3, 2], [3, 2, 3]], dtype=torch.uint8)
    # stream 2: (0,0) at 0, (1,1) at 4, partial (0,2) at 8;  stream 3: (0,1) 0, (1,0) 4,
    # partial (1,2) at 8
    assert group_positions(m, 2, 10, 4).tolist() == [[0, 0, 8], [4, 4, 8]]


def test_reference_equals_fake_quant_on_every_mixpack_kind() -> None:
    mb = MB
    gen = torch.Generator().manual_seed(0)
    for kind in mb.KINDS:
        w = torch.randn(24, 96, generator=gen)
        bias = torch.randn(24, generator=gen)
        rec = mb.hand_record(kind, w, bias, gen)
        packed = pack_record(rec)
        fq = FakeQuantLinear.from_record(rec, dtype=torch.float32)
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(3, 5, 96, generator=gen).to(dtype)
            with torch.no_grad():
                want = fq.to(dtype)(x) if dtype != torch.float32 else fq(x)
                got = reference_linear(x, packed, bias.to(dtype))
            assert torch.equal(got, want), (kind, dtype)
