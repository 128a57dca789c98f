"""Bit-plane packing of unsigned codes, one stream per bit width (pure functions).

A stream of ``n`` codes of ``b`` bits is stored as ``b`` bit planes, int32 ``[b, ceil(n/32)]``:
bit ``i`` (LSB first) of word ``w`` of plane ``p`` is bit ``p`` of code ``32 * w + i``; the
padding bits after code ``n - 1`` are zero. Every width 1..8 has the same layout (no code
straddles two words), a plane is a binary matrix a bit-serial kernel (ABQ-LLM) multiplies
directly, and a little-endian reader gets plane ``p``'s bits in code order from
``numpy.unpackbits(plane.view(uint8), bitorder="little")``.

A linear's codes are split into streams by a **width map** ``[out, in]`` (the bit width of
every weight, from the per-group bit map): the stream of width ``b`` holds the codes of the
positions whose width is ``b``, in row-major order. That is each row's groups of that width
in column order, so a partial last group or a per-channel grid needs nothing special.
"""

from __future__ import annotations

import torch

__all__ = ["MAX_BITS", "pack_bitplanes", "unpack_bitplanes", "width_map", "pack_codes",
           "unpack_codes", "words_for"]

#: widest code a plane stream holds (and narrowest: 1)
MAX_BITS = 8
_WORD = 32


def words_for(count: int) -> int:
    """int32 words per plane for ``count`` codes."""
    return -(-count // _WORD)


def pack_bitplanes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned ``codes`` (1-D, each in ``[0, 2^bits)``) as int32 bit planes ``[bits, W]``."""
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bit width {bits} outside 1..{MAX_BITS}")
    c = codes.reshape(-1).to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= 1 << bits):
        bad = int(((c < 0) | (c >= 1 << bits)).sum())
        raise ValueError(f"{bad} codes do not fit in {bits} bits")
    n_words = words_for(c.numel())
    c = torch.nn.functional.pad(c, (0, n_words * _WORD - c.numel())).view(n_words, _WORD)
    lanes = torch.arange(_WORD, dtype=torch.int64, device=c.device)
    planes = torch.stack([(((c >> p) & 1) << lanes).sum(dim=1) for p in range(bits)])
    planes = torch.where(planes >= 1 << 31, planes - (1 << 32), planes)  # uint32 -> int32 bits
    return planes.to(torch.int32).reshape(bits, n_words)


def unpack_bitplanes(planes: torch.Tensor, count: int) -> torch.Tensor:
    """The first ``count`` codes (int32, 1-D) of the bit planes ``[bits, W]``."""
    bits, n_words = planes.shape
    if n_words != words_for(count):
        raise ValueError(f"{n_words} words per plane cannot hold exactly {count} codes "
                         f"(expected {words_for(count)})")
    lanes = torch.arange(_WORD, dtype=torch.int32, device=planes.device)
    bit = (planes.to(torch.int32).unsqueeze(-1) >> lanes) & 1  # [bits, W, 32]; >> is arithmetic
    weights = (torch.ones(bits, dtype=torch.int32, device=planes.device)
               << torch.arange(bits, dtype=torch.int32, device=planes.device))
    codes = (bit * weights.view(bits, 1, 1)).sum(dim=0, dtype=torch.int32)
    return codes.reshape(-1)[:count]


def width_map(group_bits: torch.Tensor, col_groups: torch.Tensor, rows: int) -> torch.Tensor:
    """The bit width of every weight, ``[rows, in]``, from the bit map ``[R, G]`` (``R`` is
    ``rows``, or 1 for one map shared by every row) and the group of each stored column."""
    gb = group_bits.to(torch.int32)
    if gb.shape[0] == 1 and rows != 1:
        gb = gb.expand(rows, gb.shape[1])
    return gb[:, col_groups.long()]


def pack_codes(codes: torch.Tensor, widths: torch.Tensor) -> dict[int, torch.Tensor]:
    """Split unsigned ``codes`` ``[out, in]`` by their ``widths`` ``[out, in]`` into one
    bit-plane stream per width present: ``{bits: int32 [bits, W]}``."""
    if codes.shape != widths.shape:
        raise ValueError(f"codes {tuple(codes.shape)} and widths {tuple(widths.shape)} differ")
    out = {}
    for b in sorted(int(v) for v in torch.unique(widths)):
        sel = widths == b
        try:
            out[b] = pack_bitplanes(codes[sel], b)
        except ValueError as exc:
            raise ValueError(f"width {b}: {exc}") from None
    return out


def unpack_codes(streams: dict[int, torch.Tensor], widths: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: unsigned codes ``[out, in]`` (int32)."""
    codes = torch.zeros(widths.shape, dtype=torch.int32, device=widths.device)
    present = {int(v) for v in torch.unique(widths)}
    if present != set(streams):
        raise ValueError(f"the width map has widths {sorted(present)} but the streams are "
                         f"{sorted(streams)}")
    for b, planes in streams.items():
        if planes.shape[0] != b:
            raise ValueError(f"the stream of width {b} has {planes.shape[0]} planes")
        sel = widths == b
        codes[sel] = unpack_bitplanes(planes.to(widths.device), int(sel.sum()))
    return codes
