"""Bit-plane packing of unsigned codes, one stream per bit width (pure functions).

A stream of ``n`` codes of ``b`` bits is stored as ``b`` bit planes, int32 ``[b, ceil(n/32)]``:
bit ``i`` (LSB first) of word ``w`` of plane ``p`` is bit ``p`` of code ``32 * w + i``; the
padding bits after code ``n - 1`` are zero. Every width 1..8 has the same layout (no code
straddles two words), a plane is a binary matrix a bit-serial kernel (ABQ-LLM) multiplies
directly, and a little-endian reader gets plane ``p``'s bits in code order from
``numpy.unpackbits(plane.view(uint8), bitorder="little")``.

A linear's codes ``[out, in]`` are cut into **groups** of ``group_width`` consecutive columns
per row (the group size; the whole row per channel or per tensor), the last one **partial**
when ``group_width`` does not divide ``in``, and each group has one width (the bit map
``[R, G]``, ``R`` = ``out`` or 1 shared by every row). The stream of width ``b`` holds, in
this order: the full groups of width ``b`` in row-major order (row, then group), then the
partial groups of width ``b`` by row; codes in column order within a group. So every full
group starts at a multiple of ``group_width`` codes in its stream (word-aligned when that is
a multiple of 32), and unpacking moves whole groups.
"""

from __future__ import annotations

import sys

import torch

__all__ = ["MAX_BITS", "pack_bitplanes", "unpack_bitplanes", "pack_codes", "unpack_codes",
           "code_counts", "split", "words_for"]

#: widest code a plane stream holds (and narrowest: 1)
MAX_BITS = 8
_WORD = 32


def words_for(count: int) -> int:
    """int32 words per plane for ``count`` codes."""
    return -(-count // _WORD)


def _byte_order_check() -> None:
    if sys.byteorder != "little":  # the planes are reinterpreted as little-endian words
        raise RuntimeError("llmcq_mixpack packs and unpacks on little-endian hosts only")


def pack_bitplanes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned ``codes`` (1-D, each in ``[0, 2^bits)``) as int32 bit planes ``[bits, W]``."""
    _byte_order_check()
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bit width {bits} outside 1..{MAX_BITS}")
    c = codes.reshape(-1)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= 1 << bits):
        bad = int(((c < 0) | (c >= 1 << bits)).sum())
        raise ValueError(f"{bad} codes do not fit in {bits} bits")
    n_words = words_for(c.numel())
    if n_words == 0:
        return torch.zeros(bits, 0, dtype=torch.int32, device=c.device)
    c = torch.nn.functional.pad(c.to(torch.uint8), (0, n_words * _WORD - c.numel()))
    c = c.view(n_words * 4, 8)  # 8 codes per byte of a plane, LSB first
    lanes = torch.arange(8, dtype=torch.uint8, device=c.device)
    planes = torch.stack([(((c >> p) & 1) << lanes).sum(dim=1, dtype=torch.uint8)
                          for p in range(bits)])  # [bits, 4 W] bytes of little-endian words
    return planes.view(torch.int32)


def unpack_bitplanes(planes: torch.Tensor, count: int) -> torch.Tensor:
    """The first ``count`` codes (uint8, 1-D) of the bit planes ``[bits, W]``."""
    _byte_order_check()
    bits, n_words = planes.shape
    if n_words != words_for(count):
        raise ValueError(f"{n_words} words per plane cannot hold exactly {count} codes "
                         f"(expected {words_for(count)})")
    if n_words == 0:
        return torch.zeros(0, dtype=torch.uint8, device=planes.device)
    data = planes.contiguous().view(torch.uint8)  # [bits, 4 W], little-endian bytes
    lanes = torch.arange(8, dtype=torch.uint8, device=planes.device)
    bit = (data.unsqueeze(-1) >> lanes) & 1  # [bits, 4 W, 8]: bit p of every code
    weight = (torch.ones(bits, dtype=torch.uint8, device=planes.device)
              << torch.arange(bits, dtype=torch.uint8, device=planes.device))
    codes = (bit * weight.view(bits, 1, 1)).sum(dim=0, dtype=torch.uint8).reshape(-1)
    return codes[:count]


def _rows(group_bits: torch.Tensor, rows: int) -> torch.Tensor:
    gb = group_bits
    return gb.expand(rows, gb.shape[1]) if gb.shape[0] == 1 and rows != 1 else gb


def split(n_in: int, group_width: int) -> tuple[int, int]:
    """``(full groups, columns of the partial last group)`` of a row of ``n_in`` columns."""
    full = n_in // group_width
    return full, n_in - full * group_width


def _check_map(group_bits: torch.Tensor, rows: int, n_in: int, group_width: int) -> None:
    full, rem = split(n_in, group_width)
    if group_bits.dim() != 2 or group_bits.shape[0] not in (1, rows) or \
            group_bits.shape[1] != full + (1 if rem else 0):
        raise ValueError(f"bit map {tuple(group_bits.shape)} does not fit {rows} rows of "
                         f"{n_in} columns in groups of {group_width}")


def code_counts(group_bits: torch.Tensor, rows: int, n_in: int,
                group_width: int) -> dict[int, int]:
    """``{width: number of codes}`` of a linear (the length of each stream)."""
    _check_map(group_bits, rows, n_in, group_width)
    full, rem = split(n_in, group_width)
    gb = _rows(group_bits.long(), rows)
    n = torch.bincount(gb[:, :full].reshape(-1), minlength=MAX_BITS + 1) * group_width
    if rem:
        n = n + torch.bincount(gb[:, full], minlength=MAX_BITS + 1) * rem
    return {b: int(c) for b, c in enumerate(n.tolist()) if c}


def pack_codes(codes: torch.Tensor, group_bits: torch.Tensor,
               group_width: int) -> dict[int, torch.Tensor]:
    """Unsigned ``codes`` ``[out, in]`` as one bit-plane stream per width in the bit map
    ``group_bits`` ``[R, G]``: ``{bits: int32 [bits, W]}`` (order: see the module doc)."""
    rows, n_in = codes.shape
    _check_map(group_bits, rows, n_in, group_width)
    full, rem = split(n_in, group_width)
    gb = _rows(group_bits, rows)
    grouped = codes[:, :full * group_width].reshape(rows, full, group_width)
    partial = codes[:, full * group_width:]
    out = {}
    for b in sorted(int(v) for v in torch.unique(gb)):
        parts = [grouped[gb[:, :full] == b].reshape(-1)]
        if rem:
            parts.append(partial[gb[:, full] == b].reshape(-1))
        try:
            out[b] = pack_bitplanes(torch.cat(parts), b)
        except ValueError as exc:
            raise ValueError(f"width {b}: {exc}") from None
    return out


def unpack_codes(streams: dict[int, torch.Tensor], group_bits: torch.Tensor,
                 shape: tuple[int, int], group_width: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: unsigned codes ``[out, in]`` (uint8)."""
    rows, n_in = shape
    full, rem = split(n_in, group_width)
    gb = _rows(group_bits, rows)
    codes = torch.empty(rows, n_in, dtype=torch.uint8, device=gb.device)
    grouped = codes[:, :full * group_width].view(rows, full, group_width)
    partial = codes[:, full * group_width:]
    seen = 0
    for b, planes in streams.items():
        if planes.shape[0] != b:
            raise ValueError(f"the stream of width {b} has {planes.shape[0]} planes")
        if len(streams) == 1 and bool((gb == b).all()):  # every group, in order
            n_full, n_part = rows * full * group_width, rows * rem
            vals = unpack_bitplanes(planes, n_full + n_part)
            grouped.copy_(vals[:n_full].view(rows, full, group_width))
            partial.copy_(vals[n_full:].view(rows, rem))
        else:
            sel_full = gb[:, :full] == b
            n_full = int(sel_full.sum()) * group_width
            sel_part = gb[:, full] == b if rem else None
            n_part = int(sel_part.sum()) * rem if sel_part is not None else 0
            vals = unpack_bitplanes(planes, n_full + n_part)
            grouped[sel_full] = vals[:n_full].view(-1, group_width)
            if sel_part is not None:
                partial[sel_part] = vals[n_full:].view(-1, rem)
        seen += n_full + n_part
    if seen != rows * n_in:
        raise ValueError(f"the streams hold widths {sorted(streams)}, but the bit map has "
                         f"{rows * n_in - seen} codes of other widths")
    return codes
