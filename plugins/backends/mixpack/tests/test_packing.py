"""Bit-plane packing (llmcq_mixpack.packing): exact round trips for every width 1..8 and
awkward sizes, the documented bit layout on hand-computed words, and refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from llmcq_mixpack.packing import (
    code_counts,
    pack_bitplanes,
    pack_codes,
    unpack_bitplanes,
    unpack_codes,
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
        back = unpack_bitplanes(planes, n)
        assert back.dtype == torch.uint8 and torch.equal(back.long(), codes), (bits, n)


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


def _codes_for(group_bits: torch.Tensor, n_in: int, gw: int, gen: torch.Generator
               ) -> torch.Tensor:
    rows = group_bits.shape[0]
    widths = group_bits.expand(rows, -1)[:, torch.arange(n_in) // gw]
    return (torch.rand(rows, n_in, generator=gen) * (1 << widths).float()).floor().long()


@pytest.mark.parametrize(("rows", "n_in", "gw"), [(7, 53, 10), (5, 64, 32), (3, 9, 16),
                                                  (4, 33, 33)])
def test_codes_split_by_bit_map_round_trip(rows: int, n_in: int, gw: int) -> None:
    """Widths 1..8 mixed; partial last groups (53 = 5 x 10 + 3), none (64 = 2 x 32), a
    row shorter than a group (9 < 16), one group per row (per channel)."""
    gen = torch.Generator().manual_seed(n_in)
    group_bits = torch.randint(1, 9, (rows, -(-n_in // gw)), generator=gen)
    codes = _codes_for(group_bits, n_in, gw, gen)
    streams = pack_codes(codes, group_bits, gw)
    counts = code_counts(group_bits, rows, n_in, gw)
    assert sorted(streams) == sorted(counts) == sorted(int(b) for b in group_bits.unique())
    assert sum(counts.values()) == rows * n_in
    for b, planes in streams.items():
        assert planes.shape == (b, -(-counts[b] // 32))
    back = unpack_codes(streams, group_bits, (rows, n_in), gw)
    assert back.dtype == torch.uint8 and torch.equal(back.long(), codes)


def test_stream_order_full_groups_row_major_then_partial_groups() -> None:
    """2 rows of 5 columns in groups of 2 (a partial group of 1 column per row)."""
    group_bits = torch.tensor([[2, 3, 2], [2, 2, 3]])
    codes = torch.tensor([[0, 1, 2, 3, 0], [1, 2, 3, 0, 5]])  # row 0: a0..a4, row 1: b0..b4
    streams = pack_codes(codes, group_bits, 2)
    # width 2: groups (0,0) (1,0) (1,1), then row 0's partial group
    assert unpack_bitplanes(streams[2], 7).tolist() == [0, 1, 1, 2, 3, 0, 0]
    # width 3: group (0,1), then row 1's partial group
    assert unpack_bitplanes(streams[3], 3).tolist() == [2, 3, 5]


def test_one_width_and_a_shared_bit_map_row() -> None:
    """Per tensor: one [1, 1] map for every row, the whole row as one group."""
    codes = torch.randint(0, 8, (4, 21), generator=torch.Generator().manual_seed(0))
    streams = pack_codes(codes, torch.tensor([[3]]), 21)
    assert list(streams) == [3] and streams[3].shape == (3, 3)  # 84 codes: 3 words a plane
    assert torch.equal(unpack_bitplanes(streams[3], 84).long(), codes.reshape(-1))
    assert torch.equal(unpack_codes(streams, torch.tensor([[3]]), (4, 21), 21).long(), codes)


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
    with pytest.raises(ValueError, match="width 2: 1 codes do not fit"):
        pack_codes(torch.tensor([[4, 4]]), torch.tensor([[2, 4]]), 1)
    with pytest.raises(ValueError, match="does not fit 1 rows of 2 columns in groups of 1"):
        pack_codes(torch.tensor([[0, 0]]), torch.tensor([[2]]), 1)
    with pytest.raises(ValueError, match="2 codes of other widths"):
        unpack_codes({2: torch.zeros(2, 1, dtype=torch.int32)}, torch.tensor([[2, 4, 2]]),
                     (1, 6), 2)
