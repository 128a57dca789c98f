"""What to quantize to: granularity values and weight/activation specs (torch-free).

Granularity is a value, not a sentinel: ``PerGroup(128)`` rather than ``group_size=128,
granularity="per_group"``. Integer grids follow llmc: symmetric is signed
``[-2^(b-1), 2^(b-1)-1]`` with scale ``absmax / (2^(b-1)-1)``; asymmetric is unsigned
``[0, 2^b-1]`` with a zero point. ``sym_range="full"`` (config key ``sym_range: full``)
switches symmetric grids to the compressed-tensors/llm-compressor scale ``absmax / (2^(b-1)
- 1/2)``, which uses code ``-2^(b-1)`` as well.

Float grids (llmc's ``quant_type: float-quant``): ``fmt`` names the element format
(``"e4m3"``: FP8 E4M3, torch's ``float8_e4m3fn``, largest magnitude 448); they are symmetric,
8 bits wide, with scale ``absmax / 448`` and codes ``(x / scale)`` rounded to the nearest
E4M3 value. ``fmt == "int"`` is the integer grid above.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

if TYPE_CHECKING:
    from llmcq.config.schema import ActQuantSection, KVCacheSection, WeightQuantSection

__all__ = ["SYM_RANGES", "PerTensor", "PerChannel", "PerGroup", "PerToken", "PerHead",
           "Granularity", "WeightQuantSpec", "ActQuantSpec", "KVQuantSpec", "FLOAT_FORMATS",
           "INT"]

#: symmetric integer scale conventions: "restricted" (llmc: absmax / (2^(b-1) - 1)) and
#: "full" (compressed-tensors / llm-compressor: absmax / (2^(b-1) - 1/2))
SYM_RANGES = ("restricted", "full")
#: the integer element format (``fmt`` of an integer grid)
INT = "int"
#: float element formats llmcq quantizes to: name -> largest finite magnitude
FLOAT_FORMATS = {"e4m3": 448.0}


@dataclass(frozen=True)
class PerTensor:
    """One scale for the whole tensor."""

    def __str__(self) -> str:
        return "per_tensor"


@dataclass(frozen=True)
class PerChannel:
    """One scale per output channel (weight row)."""

    def __str__(self) -> str:
        return "per_channel"


@dataclass(frozen=True)
class PerGroup:
    """One scale per ``size`` consecutive input columns of a row; the last group may be
    partial when ``size`` does not divide the input dimension."""

    size: int

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"PerGroup size must be >= 1, got {self.size}")

    def __str__(self) -> str:
        return f"per_group({self.size})"


@dataclass(frozen=True)
class PerToken:
    """Activations: one scale per token (row of the flattened input)."""

    def __str__(self) -> str:
        return "per_token"


@dataclass(frozen=True)
class PerHead:
    """KV cache: one scale per attention head of each token."""

    def __str__(self) -> str:
        return "per_head"


Granularity = Union[PerTensor, PerChannel, PerGroup, PerToken, PerHead]


def _granularity(name: str, group_size: int) -> Granularity:
    if name == "per_tensor":
        return PerTensor()
    if name == "per_channel":
        return PerChannel()
    if name == "per_group":
        return PerGroup(group_size)
    if name == "per_token":
        return PerToken()
    if name == "per_head":
        return PerHead()
    raise ValueError(f"unknown granularity {name!r}")


@dataclass(frozen=True)
class _IntGrid:
    bits: int
    symmetric: bool

    # ``fmt`` is declared by each subclass, after its defaulted fields
    @property
    def is_float(self) -> bool:
        """True for a float element format (FP8), False for an integer grid."""
        return getattr(self, "fmt", INT) != INT

    @property
    def qmin(self) -> int | float:
        if self.is_float:
            return -FLOAT_FORMATS[self.fmt]  # type: ignore[attr-defined]
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int | float:
        if self.is_float:
            return FLOAT_FORMATS[self.fmt]  # type: ignore[attr-defined]
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    @property
    def full_range(self) -> bool:
        """Symmetric integer grid with the full-range scale (see ``SYM_RANGES``)."""
        return getattr(self, "sym_range", "restricted") == "full"

    def _check_grid(self) -> None:
        sym_range = getattr(self, "sym_range", "restricted")
        if sym_range not in SYM_RANGES:
            raise ValueError(f"unknown sym_range {sym_range!r}: allowed {', '.join(SYM_RANGES)}")
        if sym_range == "full" and (not self.symmetric or self.is_float):
            raise ValueError("sym_range full applies to symmetric integer grids only")
        fmt = getattr(self, "fmt", INT)
        if fmt == INT:
            return
        if fmt not in FLOAT_FORMATS:
            raise ValueError(f"unknown element format {fmt!r}: allowed int, "
                             + ", ".join(FLOAT_FORMATS))
        if self.bits != 8 or not self.symmetric:
            raise ValueError(f"{fmt} grids are 8 bits wide and symmetric")


def _fmt_of(section: WeightQuantSection | ActQuantSection) -> tuple[int, str]:
    """(bits, fmt) of a config section: ``bit: e4m3`` with ``quant_type: float-quant`` is
    an 8-bit float grid."""
    if section.quant_type == "float-quant":
        return 8, str(section.bit)
    return int(section.bit), INT


@dataclass(frozen=True)
class WeightQuantSpec(_IntGrid):
    granularity: Granularity = PerChannel()
    #: "minmax", or "mse" (per-group clip-ratio grid search minimizing the Lp error)
    calib_algo: str = "minmax"
    round_zp: bool = True
    #: element format: "int" (integer grid) or a float format of FLOAT_FORMATS ("e4m3")
    fmt: str = INT
    #: symmetric scale convention, one of SYM_RANGES
    sym_range: str = "restricted"

    def __post_init__(self) -> None:
        self._check_grid()

    @property
    def group_size(self) -> int | None:
        """The group width, or ``None`` when the grid is not per-group (no ``-1``
        sentinel: formats that spell per-channel as ``-1`` convert at their boundary)."""
        return self.granularity.size if isinstance(self.granularity, PerGroup) else None

    @classmethod
    def from_section(cls, s: WeightQuantSection) -> WeightQuantSpec:
        calib = "minmax" if s.calib_algo == "learnable" else s.calib_algo
        bits, fmt = _fmt_of(s)
        return cls(bits=bits, symmetric=s.symmetric,
                   granularity=_granularity(s.granularity, s.group_size),
                   calib_algo=calib, round_zp=s.round_zp, fmt=fmt, sym_range=s.sym_range)

    def describe(self) -> str:
        g = f"g{self.group_size}" if self.group_size is not None else str(self.granularity)
        if self.is_float:
            return f"w-fp8({self.fmt}) {g}"
        return f"w{self.bits} {g} {_sym_label(self)}"


@dataclass(frozen=True)
class ActQuantSpec(_IntGrid):
    granularity: Granularity = PerToken()
    #: static: the scale is fixed on calibration data (per-tensor); dynamic otherwise.
    static: bool = False
    #: element format: "int" (integer grid) or a float format of FLOAT_FORMATS ("e4m3")
    fmt: str = INT
    #: symmetric scale convention, one of SYM_RANGES
    sym_range: str = "restricted"

    def __post_init__(self) -> None:
        self._check_grid()

    @classmethod
    def from_section(cls, s: ActQuantSection) -> ActQuantSpec:
        bits, fmt = _fmt_of(s)
        return cls(bits=bits, symmetric=s.symmetric,
                   granularity=_granularity(s.granularity, s.group_size), static=s.static,
                   fmt=fmt, sym_range=s.sym_range)

    def describe(self) -> str:
        kind = "static" if self.static else "dynamic"
        if self.is_float:
            return f"a-fp8({self.fmt}) {self.granularity} {kind}"
        return f"a{self.bits} {self.granularity} {kind} {_sym_label(self)}"

    def to_dict(self) -> dict[str, object]:
        g = self.granularity
        out: dict[str, object] = {
            "bits": self.bits, "symmetric": self.symmetric, "granularity": str(g).split("(")[0],
            "group_size": g.size if isinstance(g, PerGroup) else None, "static": self.static}
        if self.is_float:
            out["fmt"] = self.fmt
        if self.full_range:
            out["sym_range"] = self.sym_range
        return out

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> ActQuantSpec:
        return cls(bits=int(d["bits"]), symmetric=bool(d["symmetric"]),  # type: ignore[arg-type]
                   granularity=_granularity(str(d["granularity"]),
                                            int(d.get("group_size") or 0)),  # type: ignore[arg-type]
                   static=bool(d["static"]), fmt=str(d.get("fmt", INT)),
                   sym_range=str(d.get("sym_range", "restricted")))


@dataclass(frozen=True)
class KVQuantSpec(_IntGrid):
    """KV-cache quantization: the keys' and values' grids as the attention stores them.

    ``method``: "naive" (one grid for keys and values) or "kivi" (keys per channel in groups
    of ``key_group`` tokens, values per token, the last ``residual`` tokens kept in float, as
    the KIVI paper). Built from llmc's ``quant.kvcache`` section (:meth:`from_section`); the
    cache that applies it is :mod:`llmcq.quant.kvcache`, its maths :mod:`llmcq.quant.kvmath`.
    """

    key_granularity: Granularity = PerToken()
    value_granularity: Granularity = PerToken()
    static: bool = False
    method: str = "naive"
    #: KIVI: most recent tokens kept in float
    residual: int = 0
    fmt: str = INT
    sym_range: str = "restricted"
    #: KIVI: tokens per key group (per-channel scale over each group); 0 for naive
    key_group: int = 0

    def __post_init__(self) -> None:
        self._check_grid()
        if self.method not in ("naive", "kivi"):
            raise ValueError(f"unknown KV-cache method {self.method!r}: allowed naive, kivi")
        if self.residual < 0:
            raise ValueError("residual must be >= 0")
        if self.method == "kivi" and (self.key_group < 1 or self.residual < 1
                                      or self.residual % self.key_group):
            raise ValueError("kivi needs residual >= 1 and a key_group dividing it")

    @classmethod
    def from_section(cls, s: KVCacheSection) -> KVQuantSpec:
        bits, fmt = (8, str(s.bit)) if s.quant_type == "float-quant" else (int(s.bit), INT)
        gran = _granularity(s.granularity, 0)
        if s.method_name == "kivi":
            residual = s.residual
            group = s.group_size if s.group_size >= 1 else residual
            return cls(bits=bits, symmetric=s.symmetric, key_granularity=PerChannel(),
                       value_granularity=gran, static=False, method="kivi",
                       residual=residual, fmt=fmt, key_group=group)
        return cls(bits=bits, symmetric=s.symmetric, key_granularity=gran,
                   value_granularity=gran, static=s.static, method="naive", fmt=fmt)

    def describe(self) -> str:
        kind = "static" if self.static else "dynamic"
        el = f"fp8({self.fmt})" if self.is_float else f"{self.bits}"
        extra = f" R={self.residual} G={self.key_group}" if self.method == "kivi" else ""
        return (f"kv{el} {self.method} k:{self.key_granularity} "
                f"v:{self.value_granularity} {kind}{extra}")

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "method": self.method, "bits": self.bits, "symmetric": self.symmetric,
            "key_granularity": str(self.key_granularity),
            "value_granularity": str(self.value_granularity), "static": self.static}
        if self.is_float:
            out["fmt"] = self.fmt
        if self.method == "kivi":
            out.update(residual_length=self.residual, key_group=self.key_group)
        return out


def _sym_label(spec: _IntGrid) -> str:
    if not spec.symmetric:
        return "asym"
    return "sym full-range" if spec.full_range else "sym"
