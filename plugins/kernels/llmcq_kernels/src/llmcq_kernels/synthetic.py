"""Random mixpack linears (random codes, scales, zeros, widths): for tests and the speed
benchmark, built with mixpack's own packing so the layout is the format's."""

from __future__ import annotations

import torch
from llmcq_mixpack.layout import PackedLinear
from llmcq_mixpack.packing import pack_codes

__all__ = ["random_packed"]


def random_packed(out: int, n_in: int, bits: int | tuple[int, ...] = 4,
                  group_size: int | None = 128, *, symmetric: bool = False,
                  col_perm: bool = False, seed: int = 0,
                  device: str | torch.device = "cpu") -> PackedLinear:
    """A :class:`PackedLinear` ``[out, n_in]``. ``bits``: one width, or a tuple of widths
    drawn per group (a bit map; every width present). ``group_size=None``: per channel."""
    gen = torch.Generator().manual_seed(seed)
    gw = group_size or n_in
    n_groups = -(-n_in // gw)
    if isinstance(bits, int):
        bit_map = torch.full((out, n_groups), bits, dtype=torch.uint8)
        group_bits = None
    else:
        choice = torch.tensor(bits, dtype=torch.uint8)
        bit_map = choice[torch.randint(0, len(bits), (out, n_groups), generator=gen)]
        bit_map.view(-1)[:len(bits)] = choice  # every width present
        group_bits = bit_map
    cols = torch.arange(n_in) // gw
    top = (1 << bit_map.long()) - 1  # [out, G]
    codes = (torch.rand(out, n_in, generator=gen) * (top[:, cols] + 1)).floor().long()
    codes = torch.minimum(codes, top[:, cols]).to(torch.int32)
    levels = (1 << bit_map.long()).float()
    scale = (torch.rand(out, n_groups, generator=gen) * 0.02 + 0.005) / levels
    zero = None
    if not symmetric:
        zero = torch.minimum((torch.rand(out, n_groups, generator=gen) * (top + 1)).floor(),
                             top.float()).to(torch.uint8)
    perm = torch.randperm(n_in, generator=gen).to(torch.int32) if col_perm else None
    streams = pack_codes(codes, bit_map, gw)
    p = PackedLinear(out, n_in, "per_group" if group_size else "per_channel", group_size,
                     symmetric, int(bit_map.max()) if group_bits is None else int(bits[0]),
                     streams, group_bits, scale.contiguous(), zero, perm)
    if torch.device(device).type != "cpu":
        from dataclasses import replace

        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        p = replace(p, streams={b: s.to(device) for b, s in p.streams.items()},
                    group_bits=mv(p.group_bits), scale=mv(p.scale), zero=mv(p.zero),
                    col_perm=mv(p.col_perm))
    return p
