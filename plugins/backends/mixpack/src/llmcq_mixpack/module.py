"""``MixPackLinear``: an ``nn.Linear`` stand-in that keeps the packed tensors and
dequantizes them on every forward (memory stays packed; speed is the kernel issue's), and
quantizes its input first when the linear has an activation setting (as ``FakeQuantLinear``
does, with the same function)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from llmcq.quant.qparams import fake_quantize_act
from llmcq.quant.spec import ActQuantSpec
from torch import nn
from torch.nn import functional as F

from llmcq_mixpack import dequant
from llmcq_mixpack.layout import PackedLinear

__all__ = ["MixPackLinear"]

_TENSORS = ("scale", "group_bits", "zero", "col_perm", "float_cols", "float_vals")
#: float32 buffers that stay float32 when the model is cast (``model.half()``): they are the
#: grid, and the weights equal the fake-quant ones only when it is exact
_GRID = ("scale", "zero", "float_vals")


class MixPackLinear(nn.Module):
    """``y = Q_a(x) @ W.T + b`` with ``W = dequantize(packed)`` and ``Q_a`` llmcq's
    ``fake_quantize_act`` at the linear's activation setting (``packed.act``, dynamic per
    token; the identity when None); the packed tensors are buffers (so ``.to(device)`` and
    ``state_dict`` see them), named as in the file. Casting the model (``.half()``) casts
    the bias, never the float32 grid."""

    def __init__(self, packed: PackedLinear, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = packed.in_features, packed.out_features
        self.act: ActQuantSpec | None = packed.act
        self._layout = replace(packed, streams={}, scale=torch.empty(0), group_bits=None,
                               zero=None, col_perm=None, float_cols=None, float_vals=None)
        self.widths_present = tuple(sorted(packed.streams))
        for b, planes in packed.streams.items():
            self.register_buffer(f"codes_b{b}", planes)
        for name in _TENSORS:
            self.register_buffer(name, getattr(packed, name))
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = nn.Parameter(bias, requires_grad=False)

    def _apply(self, fn: Any, recurse: bool = True) -> MixPackLinear:
        grid = {n: t for n in _GRID if (t := getattr(self, n)) is not None
                and t.dtype == torch.float32}
        super()._apply(fn, recurse)
        for name, before in grid.items():  # moved, never cast
            now = getattr(self, name)
            if now.dtype != torch.float32:
                setattr(self, name, before.to(now.device))
        return self

    def packed(self) -> PackedLinear:
        """The packed tensors as they are now (on this module's device)."""
        return replace(self._layout, act=self.act,
                       streams={b: getattr(self, f"codes_b{b}") for b in self.widths_present},
                       **{name: getattr(self, name) for name in _TENSORS})

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequant.dequantize(self.packed(), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is not None:  # FakeQuantLinear's step, dynamic: no calibrated scale
            x = fake_quantize_act(x, self.act)
        return F.linear(x, self.dequantize(x.dtype), self.bias)

    def extra_repr(self) -> str:
        p = self._layout
        grid = f"g{p.group_size}" if p.group_size else p.granularity
        widths = "/".join(str(b) for b in self.widths_present)
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={widths} {grid} {'sym' if p.symmetric else 'asym'}"
                + ("" if self.act is None else f", {self.act.describe()}"))
