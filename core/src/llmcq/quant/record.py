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

__all__ = ["QuantizedLinear", "make_record"]


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
    * ``group_bits``: bits of each group ``[out, G]`` for mixed precision (SliM-LLM style);
      ``None`` means ``bits`` everywhere.
    * ``float_columns``: ``(indices [k], values [out, k])`` input columns kept in float (OWQ).
    * ``act``, ``act_scale``, ``act_zero``: activation quantization of the layer's input.
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
    def group_size(self) -> int:
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

    def column_groups(self) -> torch.Tensor:
        """Group index of every input column (``[in]``)."""
        if self.g_idx is not None:
            return self.g_idx.long()
        cols = torch.arange(self.in_features, device=self.qweight.device)
        gran = self.weight.granularity
        if isinstance(gran, PerGroup):
            return cols // gran.size
        return torch.zeros_like(cols)

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
        return w.to(dtype)

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
                       group_bits=mv(self.group_bits), float_columns=fc)

    def describe(self) -> str:
        text = self.weight.describe()
        if self.act is not None:
            text += " " + self.act.describe()
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
