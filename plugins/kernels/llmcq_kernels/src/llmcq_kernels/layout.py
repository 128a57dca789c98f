"""The kernel-friendly form of a mixpack linear, computed at load time from its tensors.

mixpack (README "Format") keeps one bit-plane stream per width; the stream of width ``b``
holds the full groups of width ``b`` row-major, then the partial groups of width ``b`` by
row. Where a group's codes start in its stream is therefore a prefix count over the bit
map: a kernel tile cannot find its codes without it. :func:`repack` computes that once:

* ``planes``: every stream's planes concatenated into one int32 buffer (``streams[b]`` is
  the view ``planes[stream_base[b]:][:b * stream_words[b]].view(b, stream_words[b])``, no
  copy kept of the originals);
* ``stream_base`` / ``stream_words`` (int32 ``[9]``, by width): where width ``b``'s planes
  start in ``planes`` and the words per plane;
* ``group_pos`` (int32 ``[out, G]``, mixed widths only): the stream position of each group's
  first code. With one width the position is computed in the kernel:
  ``r * full * gw + k`` in a full group, ``out * full * gw + r * rem + (k - full * gw)`` in
  the partial one.

Code ``j`` of group ``(r, g)`` of width ``b`` is then bit ``pos & 31`` of word
``stream_base[b] + p * stream_words[b] + (pos >> 5)`` for plane ``p``, ``pos =
group_pos[r, g] + j``. The codes themselves are not rewritten.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from llmcq_mixpack.layout import PackedLinear
from llmcq_mixpack.packing import MAX_BITS, split

__all__ = ["KernelPack", "repack", "group_positions", "unpack_positions"]


@dataclass
class KernelPack:
    """A mixpack linear as the kernel reads it (see the module doc)."""

    out_features: int
    in_features: int
    group_width: int
    n_groups: int
    symmetric: bool
    #: the one width of every group, or 0 when groups differ (then ``bits``, ``group_pos``)
    uniform_bits: int
    max_bits: int
    planes: torch.Tensor        # int32 [sum_b b * words_b]
    stream_base: torch.Tensor   # int32 [MAX_BITS + 1]
    stream_words: torch.Tensor  # int32 [MAX_BITS + 1]
    bits: torch.Tensor | None   # uint8 [out, G] (mixed only)
    group_pos: torch.Tensor | None  # int32 [out, G] (mixed only)
    scale: torch.Tensor         # float32 [R, G], R = out or 1 (per tensor)
    zero: torch.Tensor | None   # float32 [R, G] (asymmetric)
    col_perm: torch.Tensor | None   # int64 [in]: stored column k is model column col_perm[k]
    float_cols: torch.Tensor | None
    float_vals: torch.Tensor | None

    @property
    def full_groups(self) -> int:
        return split(self.in_features, self.group_width)[0]

    @property
    def rem(self) -> int:
        return split(self.in_features, self.group_width)[1]

    def streams(self) -> dict[int, torch.Tensor]:
        """mixpack's ``{width: int32 [width, words]}`` streams, as views of ``planes``."""
        out = {}
        for b in range(1, MAX_BITS + 1):
            words = int(self.stream_words[b])
            if words or self._has_width(b):
                base = int(self.stream_base[b])
                out[b] = self.planes[base:base + b * words].view(b, words)
        return out

    def _has_width(self, b: int) -> bool:
        if self.uniform_bits:
            return b == self.uniform_bits
        assert self.bits is not None
        return bool((self.bits == b).any())

    def packed(self, template: PackedLinear) -> PackedLinear:
        """The mixpack :class:`PackedLinear` these tensors hold (``template`` gives the
        metadata), for the reference path."""
        from dataclasses import replace

        rows = template.n_rows
        gb = None
        if template.group_bits is not None or not self.uniform_bits:
            gb = self.bits if self.bits is not None else torch.full(
                (rows, self.n_groups), self.uniform_bits, dtype=torch.uint8,
                device=self.planes.device)
            gb = gb[:rows]
        return replace(template, streams=self.streams(), group_bits=gb, scale=self.scale,
                       zero=self.zero,
                       col_perm=None if self.col_perm is None else self.col_perm.int(),
                       float_cols=self.float_cols, float_vals=self.float_vals)


def group_positions(bit_map: torch.Tensor, rows: int, n_in: int, gw: int) -> torch.Tensor:
    """int32 ``[rows, G]``: the position of each group's first code in the stream of its
    width (mixpack's stream order: full groups row-major, then partial groups by row)."""
    full, rem = split(n_in, gw)
    gb = bit_map.long().expand(rows, -1)
    pos = torch.zeros(gb.shape, dtype=torch.int64, device=gb.device)
    fmap = gb[:, :full].reshape(-1)
    fpos = pos[:, :full].reshape(-1).clone()
    for b in torch.unique(gb).tolist():
        sel = fmap == b
        fpos[sel] = (torch.cumsum(sel.long(), 0) - 1)[sel] * gw
        if rem:
            psel = gb[:, full] == b
            base = int(sel.sum()) * gw
            pos[psel, full] = base + (torch.cumsum(psel.long(), 0) - 1)[psel] * rem
    pos[:, :full] = fpos.view(rows, full)
    if pos.numel() and int(pos.max()) >= 2**31:
        raise ValueError("a stream longer than 2^31 codes")
    return pos.to(torch.int32)


def repack(p: PackedLinear) -> KernelPack:
    """The :class:`KernelPack` of a mixpack linear (codes shared, tables computed)."""
    dev = p.scale.device
    bit_map = p.bit_map()
    widths = sorted(p.streams)
    base = torch.zeros(MAX_BITS + 1, dtype=torch.int32)
    words = torch.zeros(MAX_BITS + 1, dtype=torch.int32)
    chunks, at = [], 0
    for b in widths:
        planes = p.streams[b]
        base[b], words[b] = at, planes.shape[1]
        chunks.append(planes.reshape(-1))
        at += planes.numel()
    planes = torch.cat(chunks).contiguous() if chunks else torch.zeros(0, dtype=torch.int32)
    uniform = widths[0] if len(widths) == 1 else 0
    rows, gw = p.out_features, p.group_width
    bits = gpos = None
    if not uniform:
        bits = bit_map.expand(rows, -1).contiguous()
        gpos = group_positions(bit_map, rows, p.in_features, gw)
    zero = None if p.zero is None else p.zero.float().contiguous()
    return KernelPack(rows, p.in_features, gw, p.n_groups, p.symmetric, uniform,
                      max(widths), planes.to(dev), base.to(dev), words.to(dev), bits, gpos,
                      p.scale.float().contiguous(), zero,
                      None if p.col_perm is None else p.col_perm.long(),
                      p.float_cols, p.float_vals)


def unpack_positions(kp: KernelPack) -> torch.Tensor:
    """Unsigned codes ``[out, in]`` (int32, stored column order) read through the kernel's
    addressing (``stream_base``, ``stream_words``, ``group_pos``), in torch: what the kernel
    computes per element, checked against mixpack's ``unpack_codes`` by the tests."""
    rows, n_in, gw = kp.out_features, kp.in_features, kp.group_width
    full, rem = kp.full_groups, kp.rem
    dev = kp.planes.device
    r = torch.arange(rows, device=dev)[:, None]
    k = torch.arange(n_in, device=dev)[None, :]
    g = k // gw
    j = k - g * gw
    if kp.uniform_bits:
        b = torch.full((rows, n_in), kp.uniform_bits, dtype=torch.int64, device=dev)
        pos = torch.where(g < full, r * (full * gw) + k, rows * full * gw + r * rem + j)
    else:
        assert kp.bits is not None and kp.group_pos is not None
        b = kp.bits.long()[:, g[0]]
        pos = kp.group_pos.long()[:, g[0]] + j
    base = kp.stream_base.long()[b]
    stride = kp.stream_words.long()[b]
    u = torch.zeros(rows, n_in, dtype=torch.int64, device=dev)
    flat = kp.planes.long() & 0xFFFFFFFF
    for p in range(kp.max_bits):
        on = p < b
        idx = torch.where(on, base + p * stride + (pos >> 5), 0)
        word = flat[idx] if flat.numel() else torch.zeros_like(idx)
        u |= torch.where(on, (word >> (pos & 31)) & 1, 0) << p
    return u.to(torch.int32)
