"""Function-preserving per-channel scaling between a producer and its consumer linears.

For a :class:`~llmcq.model.layout.LinearGroup` whose linears all read ``x = prev_op(...)``:
``prev_op`` outputs ``x / s`` and every linear multiplies its input columns by ``s``, so
``W (x / s) * s = W x``. AWQ, SmoothQuant, OS+ and OmniQuant's LET all move quantization
difficulty this way; this module is the one implementation they share.

The producer is a norm or a linear (its output rows and bias divided by ``s``). How a norm
absorbs ``1 / s`` depends on its kind, declared in the block layout's ``norms``
(:data:`llmcq.model.layout.NORM_KINDS`, carried as ``ResolvedGroup.prev_norm_kind``): an
RMSNorm's weight (``rms``) and a LayerNorm's weight and bias (``layer``) are divided by
``s``; Gemma's offset RMSNorm computes ``x / rms(x) * (1 + w)``, so its weight becomes
``w' = (1 + w) / s - 1`` (``rms_offset``). An undeclared kind is treated as ``rms`` /
``layer``. With grouped-query attention, ``v_proj`` has
``kv_heads * head_dim`` outputs while ``o_proj`` reads ``heads * head_dim`` inputs: each
query head reuses its kv head's values, so a scale on ``v_proj``'s outputs is repeated over
the query heads of that kv head on ``o_proj``'s columns (:func:`expand_kv_scale`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from llmcq.model.adapter import ResolvedGroup

__all__ = ["fold_scale", "expand_kv_scale", "reduce_to_kv", "scale_norm_", "consumer_width"]


def expand_kv_scale(s: torch.Tensor, n_heads: int, n_kv_heads: int) -> torch.Tensor:
    """Scale over ``kv_heads * head_dim`` channels -> over ``heads * head_dim`` channels."""
    head_dim = s.numel() // n_kv_heads
    return s.view(n_kv_heads, 1, head_dim).expand(n_kv_heads, n_heads // n_kv_heads,
                                                  head_dim).reshape(-1)


def reduce_to_kv(stat: torch.Tensor, n_heads: int, n_kv_heads: int) -> torch.Tensor:
    """Per-channel statistic over ``heads * head_dim`` -> mean over each kv head's queries."""
    head_dim = stat.numel() // n_heads
    return stat.view(n_kv_heads, n_heads // n_kv_heads, head_dim).mean(dim=1).reshape(-1)


def scale_norm_(norm: nn.Module, s: torch.Tensor, kind: str | None = None) -> None:
    """Make a norm's output ``y / s``: weight and bias divided by ``s`` (``rms``, ``layer``,
    or ``None``: undeclared), or for ``rms_offset`` (``y = x / rms(x) * (1 + w)``) the weight
    set to ``(1 + w) / s - 1`` (computed in float32)."""
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{type(norm).__name__} has no weight to absorb a scale")
    if kind == "rms_offset":
        w = weight.data.float()
        weight.data.copy_(((1.0 + w) / s.to(w.device) - 1.0).to(weight.dtype))
    elif kind in (None, "rms", "layer"):
        weight.data.div_(s.to(weight.dtype))
    else:
        raise ValueError(f"unknown norm kind {kind!r}")
    bias = getattr(norm, "bias", None)
    if isinstance(bias, torch.Tensor):
        bias.data.div_(s.to(bias.dtype))


def consumer_width(group: ResolvedGroup) -> int:
    widths = {lin.in_features for lin in group.linears.values()}
    if len(widths) != 1:
        raise ValueError(f"linears of one group read inputs of different widths: {widths}")
    return widths.pop()


@torch.no_grad()
def fold_scale(group: ResolvedGroup, s: torch.Tensor, *, n_heads: int | None = None,
               n_kv_heads: int | None = None) -> None:
    """Divide ``group.prev_op``'s outputs by ``s`` and multiply the linears' inputs by ``s``.

    ``s`` has one entry per producer output channel; a norm producer absorbs it according to
    ``group.prev_norm_kind`` (see the module docstring). When the producer is a linear with fewer
    outputs than the consumers read (GQA ``v_proj`` -> ``o_proj``), pass ``n_heads`` and
    ``n_kv_heads`` and give ``s`` over the producer's channels.
    """
    prev = group.prev_op
    if prev is None or group.spec.prev_kind == "none":
        raise ValueError(f"group {group.spec.linears} has no producer that can absorb a scale")
    from llmcq.quant.transform import online_transform_of

    online = [n for n, lin in group.linears.items() if online_transform_of(lin) is not None]
    if online:  # W T(x / s * s) != W T(x) / s * s: the scale would not cancel
        raise ValueError(f"{', '.join(online)} apply an online input transform (QuaRot's "
                         "R4): a per-channel scale cannot move through it; leave this pair "
                         "unscaled or rotate without online_rotate")
    s = s.detach().float().flatten()
    width = consumer_width(group)
    if group.spec.prev_kind == "linear":
        assert isinstance(prev, nn.Linear)
        if prev.out_features != s.numel():
            raise ValueError(f"scale has {s.numel()} entries; producer has "
                             f"{prev.out_features} outputs")
        prev.weight.data.div_(s.to(prev.weight.dtype).view(-1, 1))
        if prev.bias is not None:
            prev.bias.data.div_(s.to(prev.bias.dtype))
        consumer_s = s
        if prev.out_features != width:
            if n_heads is None or n_kv_heads is None:
                raise ValueError(f"producer has {prev.out_features} outputs, consumers read "
                                 f"{width}: pass n_heads/n_kv_heads for grouped-query attention")
            consumer_s = expand_kv_scale(s, n_heads, n_kv_heads)
    else:
        if s.numel() != width:
            raise ValueError(f"scale has {s.numel()} entries; consumers read {width}")
        scale_norm_(prev, s, group.prev_norm_kind)
        consumer_s = s
    for lin in group.linears.values():
        lin.weight.data.mul_(consumer_s.to(lin.weight.dtype).view(1, -1))
