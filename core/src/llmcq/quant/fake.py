"""Fake quantization for evaluation: linears that compute with the dequantized weight of
their record and quantize-dequantize their input when activations are quantized.

:class:`FakeQuantLinear` keeps ``weight``/``bias`` under the names ``nn.Linear`` uses, so
``save_pretrained`` of a fake-quantized model is an ordinary checkpoint. Its activation
settings are non-persistent (exporters write them separately).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F

from llmcq.quant.qparams import fake_quantize_act, grid_qparams, minmax_qparams
from llmcq.quant.record import QuantizedLinear
from llmcq.quant.spec import ActQuantSpec
from llmcq.quant.transform import OnlineTransform
from llmcq.stats import ChannelRange

__all__ = ["FakeQuantLinear", "ActRangeObserver", "swap_in_fake_quant", "fake_quantized",
           "set_module"]


class FakeQuantLinear(nn.Module):
    """``y = fq_act(T(x)) @ W_hat.T + b`` with ``W_hat`` from a :class:`QuantizedLinear` and
    ``T`` its online input transform (identity when the record has none)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, *,
                 act: ActQuantSpec | None = None, act_scale: torch.Tensor | None = None,
                 act_zero: torch.Tensor | None = None, label: str = "",
                 input_transform: OnlineTransform | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = int(weight.shape[0]), int(weight.shape[1])
        self.weight = nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            self.bias = nn.Parameter(bias.to(dtype=weight.dtype, device=weight.device),
                                     requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.act: ActQuantSpec | None = act
        self.register_buffer("act_scale", _opt(act_scale, weight.device), persistent=False)
        self.register_buffer("act_zero", _opt(act_zero, weight.device), persistent=False)
        self.input_transform = None if input_transform is None else \
            input_transform.to(weight.device)
        self.label = label

    @classmethod
    def from_record(cls, record: QuantizedLinear, *, dtype: torch.dtype,
                    device: torch.device | str | None = None) -> FakeQuantLinear:
        weight = record.dequantize(dtype)
        if device is not None:
            weight = weight.to(device)
        return cls(weight, record.bias, act=record.act, act_scale=record.act_scale,
                   act_zero=record.act_zero, label=record.describe(),
                   input_transform=record.input_transform)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_transform is not None:
            x = self.input_transform.apply(x)
        if self.act is not None:
            x = fake_quantize_act(x, self.act, self.act_scale, self.act_zero)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.label}"


def _opt(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if t is None else t.to(device)


class ActRangeObserver:
    """Running min/max of a layer's input over calibration batches (static per-tensor),
    combined over data-parallel ranks (:class:`llmcq.stats.ChannelRange`) before the scale
    is fitted, so every rank fixes the scale on every rank's tokens."""

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.range = ChannelRange(per_tensor=True, device=device)

    def update(self, x: torch.Tensor) -> None:
        self.range.update(x)

    def qparams(self, spec: ActQuantSpec, *, where: str = "the layer"
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scale and zero of the range over every rank's tokens; every rank calls it, also
        one whose share sent no token here (it joins the reduction with an empty range)."""
        from llmcq.errors import DataError

        self.range.reduce()
        if self.range.empty:
            raise DataError(f"no calibration token reached {where}, so its static activation "
                            "range cannot be fitted (an MoE expert no token was routed to?); "
                            "use more calibration samples or dynamic activations")
        lo, hi = self.range.value
        rng = torch.stack([lo.reshape(()), hi.reshape(())]).reshape(1, 1, 2)
        if spec.is_float:  # FP8: max|x| / 448
            scale, zero = grid_qparams(rng, spec)
        else:
            scale, zero = minmax_qparams(rng, spec.bits, spec.symmetric,
                                         full_range=spec.full_range)
        return scale.reshape(()), None if zero is None else zero.reshape(())


def set_module(root: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Replace the sub-module at dotted ``name``; returns the old one."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    old = getattr(parent, child)
    setattr(parent, child, module)
    return old


def swap_in_fake_quant(root: nn.Module, records: dict[str, QuantizedLinear]) -> dict[str, nn.Module]:
    """Replace each linear named in ``records`` (relative to ``root``) by a FakeQuantLinear.

    Returns the replaced modules, keyed by name, so a caller can put them back.
    """
    replaced: dict[str, nn.Module] = {}
    for name, rec in records.items():
        old = root.get_submodule(name)
        fq = FakeQuantLinear.from_record(rec, dtype=old.weight.dtype, device=old.weight.device)
        replaced[name] = set_module(root, name, fq)
    return replaced


@contextmanager
def fake_quantized(root: nn.Module, records: dict[str, QuantizedLinear]) -> Iterator[None]:
    """Temporarily run ``root`` with the given linears fake-quantized."""
    replaced = swap_in_fake_quant(root, records)
    try:
        yield
    finally:
        for name, old in replaced.items():
            set_module(root, name, old)
