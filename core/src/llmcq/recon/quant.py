"""Differentiable fake quantization for training: straight-through rounding on llmcq's grids.

``round_ste`` rounds forward and passes the gradient through unchanged, so a loss reaches
whatever the grid's step ``h`` and zero point ``z`` depend on (learnable clip factors, or
the activations themselves)::

    symmetric:   x_hat = clamp(round_ste(x / h), -2^(b-1), 2^(b-1) - 1) h
    asymmetric:  x_hat = (clamp(round_ste(x / h + z), 0, 2^b - 1) - z) h

The values equal :func:`llmcq.quant.qparams.fake_quantize_act` / the weight grids'
(``minmax_qparams``): a model trained here evaluates the same numbers the records hold.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from llmcq.quant.qparams import SCALE_EPS, group_view, round_ste, sym_divisor, ungroup
from llmcq.quant.spec import ActQuantSpec, PerChannel, PerToken
from llmcq.recon.settings import ActQuant

__all__ = ["fake_quant_grouped", "act_fake_quant", "act_quant_hooks"]


def fake_quant_grouped(xg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                       bits: int, symmetric: bool, ste: bool = True,
                       qmax: int | None = None) -> torch.Tensor:
    """Quantize-dequantize grouped values ``[rows, G, g]`` with step ``scale`` and zero point
    ``zero`` (``[rows, G, 1]``; None when symmetric); straight-through rounding when
    ``ste``, plain rounding (no gradient through the rounding) otherwise. ``qmax``
    (asymmetric grids): the largest code when it is not ``2^bits - 1`` (bit balance)."""
    rnd = round_ste if ste else torch.round
    if symmetric:
        q = torch.clamp(rnd(xg / scale), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        return q * scale
    assert zero is not None
    q = torch.clamp(rnd(xg / scale + zero), 0, 2**bits - 1 if qmax is None else qmax)
    return (q - zero) * scale


def act_fake_quant(x: torch.Tensor, spec: ActQuantSpec, *, ste: bool = True) -> torch.Tensor:
    """Dynamic activation quantize-dequantize of ``x`` (``[..., hidden]``), the values of
    :func:`llmcq.quant.qparams.fake_quantize_act`, differentiable (straight-through rounding;
    the ranges keep their gradient, as in OmniQuant's reference)."""
    if spec.static:
        raise ValueError("training uses dynamic activation quantization (quant.act.static "
                         "ranges are fixed after the transform)")
    if spec.is_float:
        raise ValueError("training with float (FP8) activations is not supported")
    shape, dtype = x.shape, x.dtype
    x2 = x.reshape(-1, shape[-1]).float()
    gran = spec.granularity
    xg = group_view(x2, PerChannel() if isinstance(gran, PerToken) else gran)
    hi = xg.amax(dim=-1, keepdim=True)
    lo = xg.amin(dim=-1, keepdim=True)
    if spec.symmetric:
        scale = (torch.maximum(hi.abs(), lo.abs()) / sym_divisor(spec.bits, spec.full_range)
                 ).clamp(min=SCALE_EPS)
        zero = None
    else:
        qmax = 2**spec.bits - 1
        scale = ((hi - lo) / qmax).clamp(min=SCALE_EPS)
        zero = (-lo / scale).round().clamp(0, qmax)
    out = fake_quant_grouped(xg, scale, zero, spec.bits, spec.symmetric, ste)
    return ungroup(out, x2.shape).reshape(shape).to(dtype)


@contextmanager
def act_quant_hooks(act: ActQuant | None, linears: dict[str, nn.Module]) -> Iterator[None]:
    """While inside: every linear in ``act.linears`` (default ``linears``) sees its input
    fake-quantized (forward pre-hooks; the modules stay as they are). Nothing when ``act``
    or its spec is None."""
    if act is None or (act.spec is None and act.fn is None):
        yield
        return
    targets = act.linears if act.linears is not None else linears
    ste, fn = act.ste, act.fn
    specs = act.spec if isinstance(act.spec, Mapping) else {n: act.spec for n in targets}

    def hook(spec: ActQuantSpec | None) -> Any:
        def pre(_m: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            x = fn(args[0]) if fn is not None else act_fake_quant(args[0], spec, ste=ste)
            return (x, *args[1:])
        return pre

    handles = [m.register_forward_pre_hook(hook(specs.get(n)))
               for n, m in targets.items() if fn is not None or specs.get(n) is not None]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
