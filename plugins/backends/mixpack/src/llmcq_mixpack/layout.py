"""One quantized linear in the mixpack layout: built from a record (export), written as
tensors plus a JSON entry, and read back with every shape and dtype checked (load).

Columns are stored in **group order**: when the record has a ``g_idx`` (GPTQ act-order) the
columns are permuted so that group ``g`` occupies stored columns ``[g * gs, (g + 1) * gs)``,
and ``col_perm[k]`` is the model column of stored column ``k``. Codes are unsigned: a
symmetric code ``q`` of width ``b`` is stored as ``q + 2^(b-1)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from llmcq.quant.record import QuantizedLinear
from llmcq.quant.spec import ActQuantSpec, PerGroup

from llmcq_mixpack.format import MixPackFormatError, act_problem, codes_key, read_act, tensor_key
from llmcq_mixpack.packing import MAX_BITS, code_counts, pack_codes, words_for

__all__ = ["PackedLinear", "pack_record", "read_packed", "ACCEPTED_FEATURES"]

#: record features a packed linear reproduces exactly (``quantized_scales``: their float
#: values are stored, which are the record's ``scale``; ``act_quant``: dynamic per-token
#: integer settings only, see :func:`llmcq_mixpack.format.act_problem`)
ACCEPTED_FEATURES = frozenset({"group_bits", "g_idx", "float_columns", "fractional_zero",
                               "quantized_scales", "act_quant"})


@dataclass
class PackedLinear:
    """The stored tensors of one quantized linear (see the README's "Format")."""

    out_features: int
    in_features: int
    granularity: str
    group_size: int | None
    symmetric: bool
    bits: int
    #: ``{width: int32 [width, words]}`` bit-plane streams
    streams: dict[int, torch.Tensor]
    #: uint8 ``[R, G]`` per-group widths; ``None``: ``bits`` everywhere
    group_bits: torch.Tensor | None
    scale: torch.Tensor
    zero: torch.Tensor | None = None
    col_perm: torch.Tensor | None = None
    float_cols: torch.Tensor | None = None
    float_vals: torch.Tensor | None = None
    #: the linear's input quantization (dynamic per token, integer), None: float input
    act: ActQuantSpec | None = None

    @property
    def n_groups(self) -> int:
        if self.granularity == "per_group":
            assert self.group_size is not None
            return -(-self.in_features // self.group_size)
        return 1

    @property
    def n_rows(self) -> int:
        """Rows of ``scale``/``zero``/``group_bits``: 1 per tensor, else ``out``."""
        return 1 if self.granularity == "per_tensor" else self.out_features

    @property
    def group_width(self) -> int:
        """Columns per group: the group size, or the whole row per channel / per tensor."""
        if self.granularity == "per_group":
            assert self.group_size is not None
            return self.group_size
        return self.in_features

    def bit_map(self) -> torch.Tensor:
        """Per-group widths ``[R, G]`` (the stored map, or ``bits`` everywhere)."""
        if self.group_bits is not None:
            return self.group_bits
        return torch.full((self.n_rows, self.n_groups), self.bits, dtype=torch.uint8,
                          device=self.scale.device)

    def code_counts(self) -> dict[int, int]:
        """``{width: codes}``: the length of each stream."""
        return code_counts(self.bit_map(), self.out_features, self.in_features,
                           self.group_width)

    def tensors(self, module: str) -> dict[str, torch.Tensor]:
        """The safetensors entries of this linear, keyed as the format names them."""
        out = {codes_key(module, b): s.contiguous() for b, s in self.streams.items()}
        out[tensor_key(module, "scale")] = self.scale.contiguous()
        for what in ("group_bits", "zero", "col_perm", "float_cols", "float_vals"):
            t = getattr(self, what)
            if t is not None:
                out[tensor_key(module, what)] = t.contiguous()
        return out

    def entry(self, *, bias: bool) -> dict[str, Any]:
        """This linear's ``quantization_config.modules`` entry."""
        return {"shape": [self.out_features, self.in_features],
                "granularity": self.granularity, "group_size": self.group_size,
                "symmetric": self.symmetric, "bits": self.bits,
                "widths": {str(b): n for b, n in sorted(self.code_counts().items())},
                "group_bits": self.group_bits is not None,
                "zero": None if self.zero is None else str(self.zero.dtype).split(".")[-1],
                "col_perm": self.col_perm is not None,
                "float_columns": 0 if self.float_cols is None else int(self.float_cols.numel()),
                "bias": bias, "act": None if self.act is None else self.act.to_dict()}


# ----------------------------------------------------------------------------- export

def _granularity(rec: QuantizedLinear) -> str:
    return str(rec.weight.granularity).split("(")[0]


def _storage_order(rec: QuantizedLinear) -> torch.Tensor | None:
    """``col_perm`` for a record with ``g_idx``: its columns sorted by group (stable); the
    groups must then be the contiguous ones of ``group_size`` (as GPTQ act-order makes)."""
    if rec.g_idx is None:
        return None
    if not isinstance(rec.weight.granularity, PerGroup):
        raise ValueError("a g_idx on a grid that is not per group")
    g = rec.g_idx.to("cpu", torch.int64)
    perm = torch.argsort(g, stable=True)
    if not torch.equal(g[perm], torch.arange(rec.in_features) // rec.weight.granularity.size):
        raise ValueError("its g_idx groups are not all of group_size columns (the last "
                         "excepted), which the group-ordered columns need")
    return perm


def _zero(rec: QuantizedLinear) -> torch.Tensor | None:
    if rec.zero is None:
        return None
    z = rec.zero.to("cpu", torch.float32)
    if rec.zero_is_integral and (z.numel() == 0 or (int(z.min()) >= 0 and int(z.max()) <= 255)):
        return z.to(torch.uint8)
    return z.contiguous()


def pack_record(rec: QuantizedLinear) -> PackedLinear:
    """The packed form of ``rec``; raises ``ValueError`` saying why when it cannot be held
    exactly (a feature outside :data:`ACCEPTED_FEATURES`, codes off their grid)."""
    extra = set(rec.features()) - ACCEPTED_FEATURES
    if extra:
        raise ValueError(f"it holds {', '.join(sorted(extra))}, which mixpack does not write")
    if rec.act is not None and (problem := act_problem(rec.act)):
        key, got, allowed = problem
        raise ValueError(f"its activation setting has {key} {got!r}; mixpack writes dynamic "
                         f"per-token integer settings only (allowed {key}: "
                         f"{', '.join(map(str, allowed))})")
    rec = rec.to("cpu")
    out, n_in = rec.out_features, rec.in_features
    gran = _granularity(rec)
    perm = _storage_order(rec)
    group_bits = rec.group_bits.to(torch.uint8) if rec.mixed_bits else None
    packed = PackedLinear(out, n_in, gran, rec.group_size, rec.symmetric, rec.bits, {},
                          group_bits, rec.scale.float().contiguous(), _zero(rec),
                          None if perm is None else perm.to(torch.int32), act=rec.act)
    if tuple(packed.scale.shape) != (packed.n_rows, packed.n_groups):
        raise ValueError(f"scale shape {tuple(packed.scale.shape)}, expected "
                         f"{(packed.n_rows, packed.n_groups)} for {gran} over {n_in} columns")
    q = rec.qweight.to(torch.int32)
    if perm is not None:
        q = q[:, perm]
    bit_map = packed.bit_map().to(torch.int32)
    if rec.symmetric:  # stored unsigned: q + 2^(b-1), each group at its own width
        offset = (torch.ones_like(bit_map) << (bit_map - 1)).expand(out, -1)
        q = q + offset[:, torch.arange(n_in) // packed.group_width]
    codes = q
    if rec.float_columns is not None:
        cols, vals = rec.float_columns
        cols = cols.to(torch.int64).reshape(-1)
        stored = torch.argsort(perm)[cols] if perm is not None else cols
        codes[:, stored] = 0  # placeholders: these columns are overwritten by float_vals
        packed.float_cols = cols.to(torch.int32)
        packed.float_vals = vals.to(torch.float32).reshape(out, -1).contiguous()
    packed.streams = pack_codes(codes, bit_map, packed.group_width)
    return packed


# ------------------------------------------------------------------------------- load

def _take(tensors: dict[str, torch.Tensor], key: str, dtype: torch.dtype,
          shape: tuple[int, ...]) -> torch.Tensor:
    t = tensors.pop(key, None)
    if t is None:
        raise MixPackFormatError(f"tensor {key} is missing")
    if t.dtype != dtype or tuple(t.shape) != shape:
        raise MixPackFormatError(f"tensor {key} is {str(t.dtype).split('.')[-1]} "
                                 f"{list(t.shape)}, expected {str(dtype).split('.')[-1]} "
                                 f"{list(shape)}")
    return t


def _checked_entry(module: str, entry: dict[str, Any]) -> tuple[int, int, int | None]:
    try:
        out, n_in = (int(v) for v in entry["shape"])
        gs = None if entry["group_size"] is None else int(entry["group_size"])
        bits = int(entry["bits"])
    except (TypeError, ValueError) as exc:
        raise MixPackFormatError(f"module {module}: malformed entry ({exc})") from None
    if out < 1 or n_in < 1 or not 1 <= bits <= MAX_BITS or (
            (entry["granularity"] == "per_group") != (gs is not None and gs >= 1)):
        raise MixPackFormatError(f"module {module}: inconsistent entry {entry}")
    return out, n_in, gs


def read_packed(module: str, entry: dict[str, Any],
                tensors: dict[str, torch.Tensor]) -> PackedLinear:
    """The packed linear ``module`` from its JSON entry and the file's tensors (its keys are
    removed from ``tensors``); any missing tensor, wrong shape or dtype, invalid bit map,
    non-permutation or stray padding bit raises :class:`MixPackFormatError` naming it."""
    out, n_in, gs = _checked_entry(module, entry)
    p = PackedLinear(out, n_in, entry["granularity"], gs, bool(entry["symmetric"]),
                     int(entry["bits"]), {}, None, torch.empty(0),
                     act=read_act(f"module {module}", entry.get("act")))  # v1: no act key
    rg = (p.n_rows, p.n_groups)
    key = lambda what: tensor_key(module, what)  # noqa: E731
    p.scale = _take(tensors, key("scale"), torch.float32, rg)
    if entry["group_bits"]:
        p.group_bits = _take(tensors, key("group_bits"), torch.uint8, rg)
        if int(p.group_bits.min()) < 1 or int(p.group_bits.max()) > MAX_BITS:
            raise MixPackFormatError(f"tensor {key('group_bits')} has widths outside "
                                     f"1..{MAX_BITS}")
    if entry["zero"] is not None:
        if p.symmetric:
            raise MixPackFormatError(f"module {module}: a zero point on a symmetric grid")
        p.zero = _take(tensors, key("zero"), getattr(torch, entry["zero"]), rg)
    if entry["col_perm"]:
        p.col_perm = _take(tensors, key("col_perm"), torch.int32, (n_in,))
        if not torch.equal(torch.sort(p.col_perm.long()).values, torch.arange(n_in)):
            raise MixPackFormatError(f"tensor {key('col_perm')} is not a permutation")
    k = int(entry["float_columns"])
    if k:
        p.float_cols = _take(tensors, key("float_cols"), torch.int32, (k,))
        if int(p.float_cols.min()) < 0 or int(p.float_cols.max()) >= n_in:
            raise MixPackFormatError(f"tensor {key('float_cols')} indexes outside {n_in} "
                                     "columns")
        p.float_vals = _take(tensors, key("float_vals"), torch.float32, (out, k))
    expected = {str(b): n for b, n in sorted(p.code_counts().items())}
    if entry["widths"] != expected:
        raise MixPackFormatError(f"module {module}: code counts per width {entry['widths']} "
                                 f"disagree with its bit map ({expected})")
    for b_text, count in expected.items():
        b = int(b_text)
        planes = _take(tensors, codes_key(module, b), torch.int32, (b, words_for(count)))
        _check_padding(codes_key(module, b), planes, count)
        p.streams[b] = planes
    return p


def _check_padding(key: str, planes: torch.Tensor, count: int) -> None:
    """The bits after the last code are zero in a sound file; anything else is damage."""
    used = count % 32
    if used == 0 or planes.shape[1] == 0:
        return
    last = planes[:, -1].to(torch.int64) & 0xFFFFFFFF
    if bool((last >> used).any()):
        raise MixPackFormatError(f"tensor {key} has bits set past its last code (corrupt)")
