"""Weight-activation (WxAy) linears: the int8-friendly weight layout, the activation
setting the kernels accept, and the pure-torch reference of the op.

The op (``y = Q_a(x) @ W_hat^T + bias``, ``Q_a`` llmcq's dynamic per-token symmetric
activation fake-quant, ``W_hat`` mixpack's per-channel weight) is computed as

* ``s_x[m] = max(max_k |x[m, k]| / D, 1e-8)`` in float32, ``D = 2^(a-1) - 1`` (``sym_range:
  full``: ``2^(a-1) - 1/2``), ``x_q[m, k] = clamp(round(x[m, k] / s_x[m]), -2^(a-1),
  2^(a-1) - 1)`` (round half to even): :func:`llmcq.quant.qparams.fake_quantize_act`'s
  ``per_token`` arithmetic, so ``x_q * s_x`` is its output bit for bit (float32);
* ``q_w[n, k] = u[n, k] - 2^(b_n - 1)``: the weight's unsigned mixpack code as a signed
  integer (``b_n`` the row's width), so ``W_hat[n, k] = (q_w[n, k] - z_n) * s_w[n]`` with
  ``z_n = 0`` (symmetric) or ``zero[n] - 2^(b_n - 1)`` (asymmetric, integral or not);
* ``acc[m, n] = sum_k x_q[m, k] q_w[n, k]`` exactly (int32; int8 tensor cores on the GPU);
  ``r[m] = sum_k x_q[m, k]`` (asymmetric weights only);
* ``y = ((float(acc) - float(r) z_n) * s_x[m]) * s_w[n] (+ bias)`` in float32, stored in
  the activation dtype.

Only the float rounding of the last line (and of ``sum (x_q s_x)(q_w - z) s_w`` in the
fake-quant model) separates it from ``F.linear(fake_quantize_act(x), W_hat)``.

Weight layout (:class:`WAPack`). The codes are read once from mixpack's bit planes at load
time and stored as signed fields of a ``C``-bit container, ``C`` = 2 (W1/W2), 4 (W3/W4) or 8
(W5..W8), ``P = 8 / C`` fields a byte, **split by quarters/halves of K**: byte ``j`` of row
``n`` holds the codes of columns ``j + i * KS`` (``i < P``, ``KS = ceil(K / P)``) in its bits
``[i C, (i + 1) C)``, as ``q_w + 2^(C-1)`` (unsigned; W8: the plain int8 ``q_w``). A kernel
tile of ``BLOCK_K`` bytes then expands to ``P`` int8 operand tiles of ``BLOCK_K`` columns
each, one shift and mask per code and no interleaving shuffle, and each matches a contiguous
``[BLOCK_M, BLOCK_K]`` slice of ``x``. Why not mixpack's planes: a ``b``-bit code is ``b``
bits in ``b`` words there (``b`` loads and ``b`` shift/or per code, see README), while an
int8 MMA wants a dense int8 tile; the container costs bytes only where ``b`` is not
``C`` (W3 in 4 bits, W5..W7 in 8), which the README states.

Weights must be per channel (or per tensor): a per-group scale cannot leave the integer
accumulation (see README, "Weight-activation"). Float columns (OWQ) are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from llmcq.quant.qparams import minmax_qparams, quantize_grouped
from llmcq.quant.spec import ActQuantSpec, PerToken
from llmcq_mixpack.layout import PackedLinear
from llmcq_mixpack.packing import unpack_codes

__all__ = ["WAPack", "pack_wa", "unpack_wa", "check_act", "act_spec", "quantize_tokens",
           "wa_reference", "container_bits"]


def container_bits(bits: int) -> int:
    """The field width holding a ``bits``-bit code: 2, 4 or 8."""
    if not 1 <= bits <= 8:
        raise ValueError(f"weight bits {bits}: the WxA kernels take 1..8")
    return 2 if bits <= 2 else (4 if bits <= 4 else 8)


@dataclass
class WAPack:
    """A per-channel linear in the WxA layout (module doc)."""

    out_features: int
    in_features: int
    bits: int                   # the largest weight width of the linear
    container: int              # C: 2, 4 or 8
    qweight: torch.Tensor       # [out, KS]: uint8 fields (C < 8) or int8 codes (C = 8)
    scale: torch.Tensor         # float32 [out]
    zero: torch.Tensor | None   # float32 [out]: zero - 2^(b_n - 1) (asymmetric), else None

    @property
    def per_byte(self) -> int:
        return 8 // self.container

    @property
    def k_split(self) -> int:
        """KS: the columns each field position covers (bytes per row)."""
        return int(self.qweight.shape[1])

    def to(self, device: Any) -> WAPack:
        from dataclasses import replace

        return replace(self, qweight=self.qweight.to(device), scale=self.scale.to(device),
                       zero=None if self.zero is None else self.zero.to(device))


def pack_wa(p: PackedLinear) -> WAPack:
    """The :class:`WAPack` of a mixpack linear (per channel or per tensor; codes read once
    through mixpack's own unpacking, columns put back into model order)."""
    if p.granularity not in ("per_channel", "per_tensor"):
        raise ValueError(f"granularity {p.granularity!r} (group_size {p.group_size}): the WxA "
                         "kernels need per-channel or per-tensor weights (allowed: "
                         "per_channel, per_tensor)")
    if p.float_cols is not None:
        raise ValueError("float_columns: the WxA kernels hold no float columns (OWQ)")
    rows, n_in = p.out_features, p.in_features
    bit_map = p.bit_map()  # [R, 1]
    u = unpack_codes(p.streams, bit_map, (rows, n_in), p.group_width).to(torch.int32)
    if p.col_perm is not None:  # per channel: the grid does not depend on column order
        u = torch.empty_like(u).index_copy_(1, p.col_perm.long().to(u.device), u)
    b_row = bit_map.long().expand(rows, -1)[:, 0].to(u.device)  # [out]
    q = u - (1 << (b_row - 1)).to(torch.int32)[:, None]  # signed, in [-2^(b-1), 2^(b-1))
    bits = int(b_row.max())
    cont = container_bits(bits)
    scale = p.scale.float().reshape(-1).expand(rows).contiguous()
    zero = None
    if not p.symmetric:
        assert p.zero is not None
        zero = (p.zero.float().reshape(-1).expand(rows)
                - (1 << (b_row - 1)).float()).contiguous()
    per = 8 // cont
    ks = -(-n_in // per)
    if cont == 8:
        qweight = q.to(torch.int8).contiguous()
    else:
        half = 1 << (cont - 1)
        fields = torch.full((rows, ks * per), half, dtype=torch.int32, device=q.device)
        fields[:, :n_in] = q + half
        fields = fields.view(rows, per, ks)
        packed = torch.zeros(rows, ks, dtype=torch.int32, device=q.device)
        for i in range(per):
            packed |= fields[:, i] << (i * cont)
        qweight = packed.to(torch.uint8).contiguous()
    return WAPack(rows, n_in, bits, cont, qweight, scale, zero)


def unpack_wa(wp: WAPack) -> torch.Tensor:
    """Signed codes ``q_w`` ``[out, in]`` (int32, model column order) read back from the
    layout as the kernel reads it."""
    if wp.container == 8:
        return wp.qweight.to(torch.int32)
    half, mask = 1 << (wp.container - 1), (1 << wp.container) - 1
    b = wp.qweight.to(torch.int32)
    parts = [((b >> (i * wp.container)) & mask) - half for i in range(wp.per_byte)]
    return torch.cat(parts, dim=1)[:, :wp.in_features].contiguous()


def act_spec(act: ActQuantSpec | dict[str, Any] | int) -> ActQuantSpec:
    """An :class:`ActQuantSpec` from a spec, its ``to_dict`` form, or a bit width (dynamic
    per-token symmetric), checked by :func:`check_act`."""
    if isinstance(act, bool):
        raise ValueError(f"act {act!r}: give an ActQuantSpec, its dict, or the bit width")
    if isinstance(act, int):
        act = ActQuantSpec(bits=act, symmetric=True, granularity=PerToken())
    elif isinstance(act, dict):
        act = ActQuantSpec.from_dict(act)
    check_act(act)
    return act


def check_act(act: ActQuantSpec) -> None:
    """Refuse what the kernels do not compute, naming the field and the allowed values."""
    if act.is_float:
        raise ValueError(f"act.fmt {act.fmt!r}: the WxA kernels quantize to integers "
                         "(allowed: int)")
    if not 2 <= act.bits <= 8:
        raise ValueError(f"act.bits {act.bits}: allowed 2..8 (int8 operands)")
    if not act.symmetric:
        raise ValueError("act.symmetric False: the WxA kernels quantize activations "
                         "symmetrically (allowed: True)")
    if act.static:
        raise ValueError("act.static True: the WxA kernels compute a dynamic scale per "
                         "token (allowed: False)")
    if not isinstance(act.granularity, PerToken):
        raise ValueError(f"act.granularity {act.granularity}: allowed per_token")


def quantize_tokens(x: torch.Tensor, act: ActQuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_q, s_x)`` of ``x`` ``[M, K]``: integer codes as float32 ``[M, K]`` and float32
    scales ``[M]``, through llmcq's own per-token functions (so ``x_q * s_x[:, None]`` is
    ``fake_quantize_act(x, act)`` in float32)."""
    x3 = x.float().unsqueeze(1)  # [M, 1, K]: one group per token
    s, _ = minmax_qparams(x3, act.bits, True, full_range=act.full_range)
    q = quantize_grouped(x3, s, None, act.bits, True)
    return q.squeeze(1), s.reshape(-1)


def wa_reference(x: torch.Tensor, wp: WAPack, act: ActQuantSpec,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """The op (module doc) in torch: exact integer accumulation (float64 holds these sums
    exactly), the kernel's float32 epilogue, ``x``'s dtype out."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    xq, sx = quantize_tokens(x2, act)
    qw = unpack_wa(wp).to(x2.device)
    acc = (xq.double() @ qw.double().t()).float()  # int32 -> float32 rounding, as the kernel
    if wp.zero is not None:
        acc = acc - xq.sum(1).float()[:, None] * wp.zero[None, :]
    y = acc * sx[:, None] * wp.scale[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*shape[:-1], wp.out_features)
