"""The one record of a quantized linear that every exporter reads.

An algorithm's ``quantize`` returns one :class:`QuantizedLinear` per linear. The record holds
unpacked codes and their grid, so any exporter can pack it its own way, and
:meth:`QuantizedLinear.dequantize` gives the exact float weight the fake-quantized model uses.
Codes are integers, or FP8 values (``torch.float8_e4m3fn``) for float grids
(``record.is_float``); an exporter that packs integers must refuse float records (its
``BackendSpec.supports`` does so at config time from ``quant.weight.quant_type``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from llmcq.quant.qparams import QParams, storage_dtype
from llmcq.quant.spec import ActQuantSpec, PerGroup, PerTensor, WeightQuantSpec
from llmcq.quant.transform import OnlineTransform
from llmcq.sparsity import MaskStructure

__all__ = ["QuantizedLinear", "SparseOutliers", "QuantizedScales", "make_record"]


@dataclass
class SparseOutliers:
    """Weights kept in float at scattered positions (SpQR's outliers):
    ``W_hat[rows[i], cols[i]] = values[i]``, overriding the grid there."""

    rows: torch.Tensor
    cols: torch.Tensor
    values: torch.Tensor

    def to(self, device: torch.device | str, mv: Any) -> SparseOutliers:
        return SparseOutliers(mv(self.rows), mv(self.cols), mv(self.values))


@dataclass
class QuantizedScales:
    """Per-group scales stored on a grid of their own (SpQR, DGQ).

    ``codes`` ``[out, G]`` are integers of ``bits`` bits; ``step`` and ``zero`` are the
    second-level scale and zero point, ``[ceil(out / group_rows), G]`` (one per
    ``group_rows`` consecutive output rows of a group column; ``group_rows = out`` is one
    per column of groups) and the first-level scale is ``(codes - zero) * step``, which must
    equal the record's ``scale`` (checked by :meth:`QuantizedLinear.problems`).
    """

    codes: torch.Tensor
    step: torch.Tensor
    zero: torch.Tensor | None
    bits: int
    group_rows: int

    def values(self) -> torch.Tensor:
        rep = lambda t: t.repeat_interleave(self.group_rows, dim=0)[: self.codes.shape[0]]  # noqa: E731
        q = self.codes.float()
        z = 0.0 if self.zero is None else rep(self.zero.float())
        return (q - z) * rep(self.step.float())

    def to(self, device: torch.device | str, mv: Any) -> QuantizedScales:
        return replace(self, codes=mv(self.codes), step=mv(self.step), zero=mv(self.zero))


@dataclass
class QuantizedLinear:
    """A quantized ``nn.Linear``: ``W_hat[:, j] = (qweight[:, j] - zero[:, g(j)]) * scale[:, g(j)]``.

    * ``qweight``: ``[out, in]`` codes; int8 for symmetric (signed grid), uint8 otherwise;
      ``torch.float8_e4m3fn`` for an FP8 grid (``weight.is_float``; ``zero`` is then None and
      ``W_hat = float(qweight) * scale``).
    * ``scale``: ``[out, G]`` float32 (``[1, 1]`` per-tensor, ``[out, 1]`` per-channel).
    * ``zero``: ``[out, G]`` or ``None`` (symmetric). Integral values for standard
      asymmetric grids; HQQ-style algorithms may store fractional zeros (``zero_is_integral``).
    * ``g_idx``: group of each input column (``[in]`` int32), when columns were quantized out
      of order (GPTQ act-order without static groups); ``None`` means ``j // group_size``.
    * ``group_bits``: bits of each group ``[out, G]`` (int) for mixed precision within the
      linear (SliM-LLM); each group's codes lie on its own grid; ``None``: ``bits`` everywhere.
    * ``float_columns``: ``(indices [k], values [out, k])`` input columns kept in float (OWQ).
    * ``outliers``: :class:`SparseOutliers`, float weights at scattered positions (SpQR).
    * ``scale_codes``: :class:`QuantizedScales`, when the scales are themselves quantized.
    * ``mask``: ``[out, in]`` bool, ``True`` where the weight is kept (pruning); pruned weights
      dequantize to exactly zero. ``mask_structure``: its structure (``Unstructured()`` or
      ``NM(n, m)``), checked against the mask.
    * ``input_transform``: an :class:`~llmcq.quant.transform.OnlineTransform` applied to the
      input before the activation quantizer and the matmul (rotations).
    * ``act``, ``act_scale``, ``act_zero``: activation quantization of the layer's input.
    * ``levels``: an asymmetric grid with this many levels (codes ``0..levels-1``) instead of
      ``2^bits`` (ABQ-LLM's bit balance: 5 levels at 2 bits); None: ``2^bits``.

    Dequantization order: grid, then float columns, then outliers, then the mask.
    :meth:`features` names what beyond a uniform grid the record holds (the capability
    names of :data:`llmcq.capabilities.RECORD_FEATURES`); exporters write each faithfully
    or refuse it at config time.
    """

    qweight: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    weight: WeightQuantSpec
    bias: torch.Tensor | None = None
    act: ActQuantSpec | None = None
    act_scale: torch.Tensor | None = None
    act_zero: torch.Tensor | None = None
    g_idx: torch.Tensor | None = None
    group_bits: torch.Tensor | None = None
    float_columns: tuple[torch.Tensor, torch.Tensor] | None = None
    outliers: SparseOutliers | None = None
    scale_codes: QuantizedScales | None = None
    mask: torch.Tensor | None = None
    mask_structure: MaskStructure | None = None
    input_transform: OnlineTransform | None = None
    levels: int | None = None
    #: algorithm-specific extras exporters may read (documented by the algorithm)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def bits(self) -> int:
        return self.weight.bits

    @property
    def symmetric(self) -> bool:
        return self.weight.symmetric

    @property
    def is_float(self) -> bool:
        """True when ``qweight`` holds float8 codes (``quant_type: float-quant``)."""
        return self.weight.is_float

    @property
    def group_size(self) -> int | None:
        """The group width, ``None`` when not per-group."""
        return self.weight.group_size

    @property
    def out_features(self) -> int:
        return int(self.qweight.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.qweight.shape[1])

    @property
    def zero_is_integral(self) -> bool:
        return self.zero is None or bool(torch.equal(self.zero, self.zero.round()))

    @property
    def mixed_bits(self) -> bool:
        """True when groups use different bit widths (or another width than ``bits``)."""
        return self.group_bits is not None and bool((self.group_bits != self.bits).any())

    def features(self) -> list[str]:
        """Capability names (:data:`llmcq.capabilities.RECORD_FEATURES`) this record holds."""
        out = []
        if self.g_idx is not None:
            out.append("g_idx")
        if self.mixed_bits:
            out.append("group_bits")
        if self.float_columns is not None:
            out.append("float_columns")
        if self.outliers is not None:
            out.append("sparse_outliers")
        if self.mask is not None:
            out.append("sparsity_mask")
        if self.input_transform is not None:
            out.append("input_transform")
        if self.act is not None:
            out.append("act_quant")
        if self.is_float or (self.act is not None and self.act.is_float):
            out.append("float_format")
        if not self.zero_is_integral:
            out.append("fractional_zero")
        if self.scale_codes is not None:
            out.append("quantized_scales")
        if self.levels is not None:
            out.append("grid_levels")
        return out

    def column_groups(self) -> torch.Tensor:
        """Group index of every input column (``[in]``)."""
        if self.g_idx is not None:
            return self.g_idx.long()
        cols = torch.arange(self.in_features, device=self.qweight.device)
        gran = self.weight.granularity
        if isinstance(gran, PerGroup):
            return cols // gran.size
        return torch.zeros_like(cols)

    def code_bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lo, hi)`` ``[out, G]``: the integer code range of every group's grid."""
        bits = self.group_bits if self.group_bits is not None else torch.full_like(
            self.scale, self.bits, dtype=torch.int64)
        bits = bits.long().to(self.scale.device)
        one = torch.ones_like(bits)
        if self.levels is not None and not self.symmetric:
            return torch.zeros_like(bits), torch.full_like(bits, self.levels - 1)
        if self.symmetric:
            return -(one << (bits - 1)), (one << (bits - 1)) - 1
        return torch.zeros_like(bits), (one << bits) - 1

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight ``[out, in]`` this record stands for."""
        q = self.qweight.float()
        scale = self.scale.float()
        zero = None if self.zero is None else self.zero.float()
        if isinstance(self.weight.granularity, PerTensor):
            w = (q - zero) * scale if zero is not None else q * scale
        else:
            idx = self.column_groups().to(q.device)
            s = scale[:, idx]
            w = (q - zero[:, idx]) * s if zero is not None else q * s
        if self.float_columns is not None:
            cols, values = self.float_columns
            w[:, cols.long()] = values.float()
        if self.outliers is not None:
            o = self.outliers
            w[o.rows.long(), o.cols.long()] = o.values.float()
        if self.mask is not None:
            w = w * self.mask.to(w.device)
        return w.to(dtype)

    def problems(self) -> list[str]:
        """What is inconsistent in this record (empty when it is sound): codes outside
        their group's grid, a mask breaking its structure, quantized scales that do not
        reproduce ``scale``, an input transform of the wrong width."""
        out: list[str] = []
        n_groups = int(self.scale.shape[1]) if self.scale.dim() == 2 else 1
        if self.group_bits is not None:
            if tuple(self.group_bits.shape) != tuple(self.scale.shape):
                out.append(f"group_bits shape {tuple(self.group_bits.shape)} != scale shape "
                           f"{tuple(self.scale.shape)}")
            elif int(self.group_bits.min()) < 1 or int(self.group_bits.max()) > 8:
                out.append("group_bits outside 1..8")
        if self.levels is not None and (self.symmetric or self.is_float or
                                        self.group_bits is not None or
                                        not 2 <= self.levels <= 2**self.bits + 1):
            out.append(f"levels {self.levels}: only an asymmetric integer grid without "
                       f"group_bits may have 2..{2**self.bits + 1} levels")
        if not self.is_float and not out and n_groups >= 1:
            lo, hi = self.code_bounds()
            idx = self.column_groups().to(self.qweight.device)
            if isinstance(self.weight.granularity, PerTensor):
                lo_c, hi_c = lo.reshape(1, 1), hi.reshape(1, 1)
            else:
                lo_c, hi_c = lo[:, idx], hi[:, idx]
            q = self.qweight.long()
            bad = (q < lo_c) | (q > hi_c)
            if self.float_columns is not None:
                bad[:, self.float_columns[0].long()] = False
            if bool(bad.any()):
                out.append(f"{int(bad.sum())} codes lie outside their group's grid")
        if self.mask is not None:
            if tuple(self.mask.shape) != tuple(self.qweight.shape) or self.mask.dtype != \
                    torch.bool:
                out.append("mask must be a bool tensor of the weight's shape")
            elif self.mask_structure is not None:
                from llmcq.sparsity.masks import structure_violations

                bad_groups = structure_violations(self.mask, self.mask_structure)
                if bad_groups:
                    out.append(f"mask breaks its {self.mask_structure} structure in "
                               f"{bad_groups} places")
        if self.scale_codes is not None:
            v = self.scale_codes.values().to(self.scale.device)
            if v.shape != self.scale.shape or not torch.allclose(v, self.scale.float(),
                                                                 rtol=1e-5, atol=1e-8):
                out.append("scale_codes do not reproduce scale")
        if self.input_transform is not None and self.input_transform.size != self.in_features:
            out.append(f"input transform of size {self.input_transform.size} on a linear "
                       f"reading {self.in_features} inputs")
        return out

    def to(self, device: torch.device | str) -> QuantizedLinear:
        from llmcq.pipeline.transfer import to_host

        to_cpu = torch.device(device).type == "cpu"

        def mv(t: Any) -> Any:
            if not isinstance(t, torch.Tensor):
                return t
            # GPU -> host through the pinned buffer (several times a pageable copy's speed)
            return to_host(t) if to_cpu and t.is_cuda else t.to(device)

        fc = None if self.float_columns is None else (mv(self.float_columns[0]),
                                                       mv(self.float_columns[1]))
        return replace(self, qweight=mv(self.qweight), scale=mv(self.scale), zero=mv(self.zero),
                       bias=mv(self.bias), act_scale=mv(self.act_scale),
                       act_zero=mv(self.act_zero), g_idx=mv(self.g_idx),
                       group_bits=mv(self.group_bits), float_columns=fc,
                       outliers=None if self.outliers is None else self.outliers.to(device, mv),
                       scale_codes=None if self.scale_codes is None
                       else self.scale_codes.to(device, mv),
                       mask=mv(self.mask),
                       input_transform=None if self.input_transform is None
                       else self.input_transform.to(device))

    def describe(self) -> str:
        text = self.weight.describe()
        if self.mixed_bits:
            assert self.group_bits is not None
            text += f" (mixed {int(self.group_bits.min())}-{int(self.group_bits.max())} bits)"
        if self.act is not None:
            text += " " + self.act.describe()
        if self.mask is not None:
            text += f" sparse {self.mask_structure or 'mask'}"
        if self.input_transform is not None:
            text += f" input {self.input_transform.describe()}"
        return text


def make_record(q: torch.Tensor, qparams: QParams, spec: WeightQuantSpec, *,
                bias: torch.Tensor | None = None, act: ActQuantSpec | None = None,
                act_qparams: QParams | None = None, **kwargs: Any) -> QuantizedLinear:
    """Build a record from codes (any dtype holding values of ``spec``'s grid: integers, or
    E4M3 values for a float grid) and qparams."""
    if spec.is_float and qparams.zero is not None:
        raise ValueError("float grids are symmetric: no zero point")
    store = storage_dtype(spec)
    return QuantizedLinear(
        qweight=q.to(store), scale=qparams.scale.float(),
        zero=None if qparams.zero is None else qparams.zero.float(), weight=spec,
        bias=None if bias is None else bias.detach().clone(), act=act,
        act_scale=None if act_qparams is None else act_qparams.scale.float(),
        act_zero=None if act_qparams is None or act_qparams.zero is None
        else act_qparams.zero.float(), **kwargs)
