"""Bit-plane packing (llmcq_mixpack.packing): exact round trips for every width 1..8 and
awkward sizes, the documented bit layout on hand-computed words, and refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from llmcq_mixpack.packing import (
    pack_bitplanes,
    pack_codes,
    unpack_bitplanes,
    unpack_codes,
    width_map,
)

SIZES = (0, 1, 5, 31, 32, 33, 63, 97, 1000, 1031)


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_unpack_every_width_and_odd_sizes(bits: int) -> None:
    gen = torch.Generator().manual_seed(bits)
    for n in SIZES:
        codes = torch.randint(0, 1 << bits, (n,), generator=gen)
        if n:  # the extremes of the range too
            codes[0], codes[-1] = (1 << bits) - 1, 0
        planes = pack_bitplanes(codes, bits)
        assert planes.dtype == torch.int32 and tuple(planes.shape) == (bits, -(-n // 32))
        assert torch.equal(unpack_bitplanes(planes, n), codes.to(torch.int32)), (bits, n)


def test_layout_on_hand_computed_words() -> None:
    # codes 5, 0, 7, 1 of 3 bits: plane p holds bit p of code i at bit i of the word
    planes = pack_bitplanes(torch.tensor([5, 0, 7, 1]), 3)
    assert planes.tolist() == [[0b1101], [0b0100], [0b0101]]
    # 33 one-bit codes, all set: a full word (bit 31 too: int32 -1) and one bit of the next
    assert pack_bitplanes(torch.ones(33, dtype=torch.int64), 1).tolist() == [[-1, 1]]
    # code 255 at position 31 of 8 bits: bit 31 set in every plane
    codes = torch.zeros(32, dtype=torch.int64)
    codes[31] = 255
    assert pack_bitplanes(codes, 8).tolist() == [[-(1 << 31)]] * 8


@pytest.mark.parametrize("bits", [1, 3, 5, 8])
def test_numpy_unpackbits_reads_the_planes(bits: int) -> None:
    """What the README tells a reader to do, on the little-endian int32 words."""
    codes = torch.randint(0, 1 << bits, (77,), generator=torch.Generator().manual_seed(0))
    planes = pack_bitplanes(codes, bits).numpy()
    flat = np.unpackbits(planes.astype("<i4").view(np.uint8), bitorder="little")
    per_plane = flat.reshape(bits, -1)[:, :77].astype(np.int64)
    back = (per_plane << np.arange(bits)[:, None]).sum(axis=0)
    assert back.tolist() == codes.tolist()


def test_codes_split_by_width_map_round_trip() -> None:
    """A 7 x 53 linear, groups of 10 (a partial last group of 3), widths 1..8 mixed."""
    gen = torch.Generator().manual_seed(3)
    group_bits = torch.randint(1, 9, (7, 6), generator=gen)
    widths = width_map(group_bits, torch.arange(53) // 10, 7)
    assert widths.shape == (7, 53) and torch.equal(widths[:, 50:], group_bits[:, 5:6].expand(
        7, 3).int())
    codes = (torch.rand(7, 53, generator=gen) * (1 << widths).float()).floor().long()
    streams = pack_codes(codes, widths)
    assert sorted(streams) == sorted(int(b) for b in torch.unique(group_bits))
    for b, planes in streams.items():
        assert planes.shape == (b, -(-int((widths == b).sum()) // 32))
    assert torch.equal(unpack_codes(streams, widths), codes.int())
    # row-major order within a width: the first code of width b is the first position of b
    b = int(widths[0, 0])
    first = unpack_bitplanes(streams[b], int((widths == b).sum()))[0]
    assert int(first) == int(codes[0, 0])


def test_a_shared_bit_map_row_broadcasts() -> None:
    """Per tensor: one [1, 1] map for every row and column."""
    assert torch.equal(width_map(torch.tensor([[3]]), torch.zeros(5, dtype=torch.long), 4),
                       torch.full((4, 5), 3, dtype=torch.int32))


def test_refusals() -> None:
    with pytest.raises(ValueError, match="do not fit in 3 bits"):
        pack_bitplanes(torch.tensor([0, 8]), 3)
    with pytest.raises(ValueError, match="do not fit"):
        pack_bitplanes(torch.tensor([-1]), 4)
    for bits in (0, 9):
        with pytest.raises(ValueError, match="outside 1..8"):
            pack_bitplanes(torch.tensor([0]), bits)
    with pytest.raises(ValueError, match="cannot hold exactly 33"):
        unpack_bitplanes(torch.zeros(2, 1, dtype=torch.int32), 33)
    widths = torch.tensor([[2, 4]])
    with pytest.raises(ValueError, match="width 2: 1 codes do not fit"):
        pack_codes(torch.tensor([[4, 4]]), widths)
    with pytest.raises(ValueError, match=r"widths \[2, 4\] but the streams are \[2\]"):
        unpack_codes({2: torch.zeros(2, 1, dtype=torch.int32)}, widths)
