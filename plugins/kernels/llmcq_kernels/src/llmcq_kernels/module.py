"""``KernelLinear``: a mixpack linear that computes through the Triton kernel on CUDA and
through the reference path (mixpack's ``dequantize`` + ``F.linear``) elsewhere;
``WALinear``: the same for a weight-activation setting (activations quantized per token,
int8 tensor cores); and the calls that put them into a transformers model."""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from llmcq.quant.fake import set_module
from llmcq.quant.spec import ActQuantSpec
from llmcq_mixpack.dequant import dequantize
from llmcq_mixpack.layout import PackedLinear
from llmcq_mixpack.module import MixPackLinear
from torch import nn
from torch.nn import functional as F

from llmcq_kernels import triton_mm, triton_wa
from llmcq_kernels.layout import KernelPack, repack
from llmcq_kernels.wa_layout import WAPack, act_spec, pack_wa, wa_reference

__all__ = ["KernelLinear", "WALinear", "swap_linears", "load_model"]

_TENSORS = ("planes", "stream_base", "stream_words", "bits", "group_pos", "scale", "zero",
            "col_perm", "float_cols", "float_vals")
#: the float32 grid: moved with the module, never cast (as MixPackLinear's)
_GRID = ("scale", "zero", "float_vals")
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class KernelLinear(nn.Module):
    """``y = x @ W_hat^T + bias`` for a mixpack linear (``W_hat`` as mixpack dequantizes
    it). CUDA input with triton importable: the Triton kernel; otherwise (CPU, no triton,
    float columns, another dtype) the reference path, which equals ``MixPackLinear``."""

    def __init__(self, packed: PackedLinear, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = packed.in_features, packed.out_features
        kp = repack(packed)
        self._layout = replace(packed, streams={}, scale=torch.empty(0), group_bits=None,
                               zero=None, col_perm=None, float_cols=None, float_vals=None)
        self._had_map = packed.group_bits is not None
        self._meta = replace(kp, **{name: None for name in _TENSORS})
        for name in _TENSORS:
            self.register_buffer(name, getattr(kp, name))
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_mixpack(cls, mod: MixPackLinear) -> KernelLinear:
        return cls(mod.packed(), None if mod.bias is None else mod.bias.data)

    def _apply(self, fn: Any, recurse: bool = True) -> KernelLinear:
        grid = {n: t for n in _GRID if (t := getattr(self, n)) is not None
                and t.dtype == torch.float32}
        super()._apply(fn, recurse)
        for name, before in grid.items():
            now = getattr(self, name)
            if now.dtype != torch.float32:
                setattr(self, name, before.to(now.device))
        return self

    def kernel_pack(self) -> KernelPack:
        """The kernel's tensors as they are now (on this module's device)."""
        return replace(self._meta, **{name: getattr(self, name) for name in _TENSORS})

    def packed(self) -> PackedLinear:
        """mixpack's :class:`PackedLinear` (streams are views of ``planes``)."""
        kp = self.kernel_pack()
        template = replace(self._layout, group_bits=torch.empty(0) if self._had_map else None)
        return kp.packed(template)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.packed(), dtype)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize(x.dtype), self.bias)

    def uses_kernel(self, x: torch.Tensor) -> bool:
        return (triton_mm.available(x) and x.dtype in _KERNEL_DTYPES
                and self.float_cols is None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.uses_kernel(x):
            return triton_mm.kernel_linear(x, self.kernel_pack(), self.bias)
        return self.reference(x)

    def extra_repr(self) -> str:
        p = self._layout
        grid = f"g{p.group_size}" if p.group_size else p.granularity
        kp = self._meta
        widths = str(kp.uniform_bits) if kp.uniform_bits else f"mixed<= {kp.max_bits}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={widths} {grid} {'sym' if p.symmetric else 'asym'}")


class WALinear(nn.Module):
    """``y = Q_a(x) @ W_hat^T + bias``: ``Q_a`` llmcq's dynamic per-token symmetric
    activation quantizer at ``act.bits``, ``W_hat`` a per-channel mixpack weight (the
    ``wa_layout`` module doc). CUDA input with triton importable: the int8 tensor-core
    kernel (``triton_wa``); otherwise the reference path (``wa_layout.wa_reference``).
    Both equal the fake-quant linear (``FakeQuantLinear`` with the same ``act``) up to float
    rounding."""

    def __init__(self, packed: PackedLinear, bias: torch.Tensor | None,
                 act: ActQuantSpec | dict[str, Any] | int) -> None:
        super().__init__()
        self.act = act_spec(act)
        self.in_features, self.out_features = packed.in_features, packed.out_features
        wp = pack_wa(packed)
        self._meta = replace(wp, qweight=torch.empty(0), scale=torch.empty(0), zero=None)
        self.register_buffer("qweight", wp.qweight)
        self.register_buffer("scale", wp.scale)
        self.register_buffer("zero", wp.zero)
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_mixpack(cls, mod: MixPackLinear,
                     act: ActQuantSpec | dict[str, Any] | int | None = None) -> WALinear:
        """The WALinear of a mixpack linear, at ``act`` (default: the linear's own setting,
        as the folder records it)."""
        act = mod.act if act is None else act
        if act is None:
            raise ValueError("act: the linear has no activation setting and none was given")
        return cls(mod.packed(), None if mod.bias is None else mod.bias.data, act)

    def _apply(self, fn: Any, recurse: bool = True) -> WALinear:
        grid = {n: t for n in ("scale", "zero") if (t := getattr(self, n)) is not None}
        super()._apply(fn, recurse)
        for name, before in grid.items():  # the float32 grid is never cast
            now = getattr(self, name)
            if now.dtype != torch.float32:
                setattr(self, name, before.to(now.device))
        return self

    def wa_pack(self) -> WAPack:
        return replace(self._meta, qweight=self.qweight, scale=self.scale, zero=self.zero)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return wa_reference(x, self.wa_pack(), self.act, self.bias)

    def uses_kernel(self, x: torch.Tensor) -> bool:
        return triton_wa.available(x) and x.dtype in _KERNEL_DTYPES

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.uses_kernel(x):
            return triton_wa.wa_linear(x, self.wa_pack(), self.act, self.bias)
        return self.reference(x)

    def extra_repr(self) -> str:
        m = self._meta
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"w{m.bits} (in {m.container}-bit fields) per channel "
                f"{'asym' if self.zero is not None else 'sym'}, "
                f"{self.act.describe()}")


def swap_linears(model: nn.Module, *, act: ActQuantSpec | dict[str, Any] | int | None = None,
                 strict: bool = False) -> nn.Module:
    """Replace the ``MixPackLinear``s of ``model`` (as ``llmcq_mixpack.load_model`` builds
    them) by kernel-backed linears holding the same tensors; returns ``model``.

    ``act=None`` (default): each linear as its folder records it (mixpack format 2's
    per-linear ``act``): a weight-only linear becomes a :class:`KernelLinear`, a linear
    with an activation setting a :class:`WALinear` at that setting. A linear with a
    setting the WxA kernels do not compute (per-group weights, OWQ float columns,
    asymmetric activations, activation bits outside 2..8) stays a ``MixPackLinear`` (the
    reference path: it quantizes its input as the fake-quant model does, and dequantizes
    in torch), with one warning naming them; ``strict=True`` raises instead, before the
    model is touched.

    ``act`` given (an ``ActQuantSpec``, its ``to_dict``, or the bit width of dynamic
    per-token symmetric activations): an override, every linear becomes a WALinear at
    ``act`` whatever its folder says (a linear it cannot be raises before the model is
    touched)."""
    names = [n for n, m in model.named_modules() if isinstance(m, MixPackLinear)]
    spec = None if act is None else act_spec(act)
    new: dict[str, nn.Module] = {}
    kept: list[str] = []
    for name in names:
        old = model.get_submodule(name)
        assert isinstance(old, MixPackLinear)
        own = spec if spec is not None else old.act
        if own is None:
            new[name] = KernelLinear.from_mixpack(old).to(old.scale.device)
            continue
        try:
            new[name] = WALinear.from_mixpack(old, own).to(old.scale.device)
        except ValueError as exc:
            if spec is not None or strict:
                raise ValueError(f"{name}: {exc}") from exc
            kept.append(f"{name} ({exc})")
    for name, mod in new.items():
        set_module(model, name, mod)
    if kept:
        warnings.warn(f"{len(kept)} linear(s) with an activation setting the WxA kernels do "
                      "not compute stay MixPackLinear (the torch reference path, exact "
                      f"fake-quant): {'; '.join(kept)}", stacklevel=2)
    return model


def load_model(folder: str | Path, device: torch.device | str = "cpu", *,
               dtype: torch.dtype | str | None = None, verify: bool = True,
               act: ActQuantSpec | dict[str, Any] | int | None = None,
               strict: bool = False) -> nn.Module:
    """The model of a mixpack folder with kernel-backed linears, in eval mode on ``device``
    (``llmcq_mixpack.load_model``'s arguments, then :func:`swap_linears`): without ``act``
    each linear as the folder records it (:class:`KernelLinear` weight-only,
    :class:`WALinear` at the linear's recorded activation setting); ``act`` overrides the
    setting of every linear."""
    from llmcq_mixpack.loader import load_model as load_mixpack

    model = load_mixpack(folder, device="cpu", dtype=dtype, verify=verify)
    return swap_linears(model, act=act, strict=strict).to(device).eval()
