"""OmniQuant's maths in the paper's notation: tensors in, tensors out, no module plumbing.

Learnable weight clipping (LWC), per group of a weight ``W`` (``b`` bits)::

    gamma = sigmoid(u),  beta = sigmoid(l)                (u, l: learnable, one per group)
    asymmetric:  h = (gamma max W - beta min W) / (2^b - 1),  z = round(-beta min W / h)
                 W_q = clamp(round_ste(W / h + z), 0, 2^b - 1),   W_hat = (W_q - z) h
    symmetric:   h = gamma max|W| / (2^(b-1) - 1)     (2^(b-1) - 1/2 with sym_range: full)
                 W_q = clamp(round_ste(W / h), -2^(b-1), 2^(b-1) - 1),   W_hat = W_q h

``round_ste`` rounds forward and passes the gradient straight through, so the loss reaches
``u`` and ``l`` through ``h``. With ``gamma = beta = 1`` this is min-max round-to-nearest; the
grids are llmcq's (:mod:`llmcq.quant.qparams`), so a record built from the trained factors
dequantizes to exactly the weight the training saw.

Learnable equivalent transformation (LET), for linears reading ``X = producer(...)``::

    Y = X W^T + B = ((X - delta) / s) (W * s)^T + (B + W delta)

``s`` (and ``delta``) are learnable per channel: the producer (a norm, or a linear's output
rows) absorbs ``/ s`` and ``- delta``, the consumers' columns absorb ``* s`` and their biases
``+ W delta``. ``s`` starts SmoothQuant-style: ``s = max|X|^alpha / max|W|^(1 - alpha)``.
"""

from __future__ import annotations

import torch
from llmcq.quant.qparams import (SCALE_EPS, QParams, group_view, quantize_grouped,
                                 quantize_weight, sym_divisor, ungroup)
from llmcq.quant.spec import WeightQuantSpec
from llmcq.recon.quant import act_fake_quant as recon_act_fake_quant
from llmcq.recon.quant import fake_quant_grouped

__all__ = ["LWC_INIT", "LET_MIN", "lwc_range", "lwc_qparams", "lwc_fake_quant", "lwc_quantize",
           "lwc_clip", "clip_factors", "logit", "let_init_scale", "truncate_scale",
           "reduce_to_kv_max", "scale_producer", "scale_consumer", "act_fake_quant"]

#: initial clip factor of the reference implementation: sigmoid(4) = 0.982
LWC_INIT = 4.0
#: smallest |s| of a LET scale (llmc's truncation threshold)
LET_MIN = 1e-2
#: clamp of the statistics in the LET initialization (the reference's)
_STAT_MIN = 1e-5
#: a clip ratio of exactly 1 has an infinite logit: keep factors finite
_RATIO_EPS = 1e-4


def _on(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    return None if t is None else t.float().to(like.device)


def lwc_range(wg: torch.Tensor, up: torch.Tensor | None, low: torch.Tensor | None,
              symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped range ``(lo, hi)`` (``[rows, G, 1]`` each) of grouped weights ``[rows, G, g]``.

    ``up``/``low`` are the factors ``[rows, G]`` (``None``: no clipping on that side;
    symmetric grids use ``up`` only).
    """
    hi = wg.amax(dim=-1, keepdim=True)
    lo = wg.amin(dim=-1, keepdim=True)
    if symmetric:
        amax = torch.maximum(hi.abs(), lo.abs())
        if up is not None:
            amax = torch.sigmoid(up).unsqueeze(-1) * amax
        return -amax, amax
    if up is not None:
        hi = torch.sigmoid(up).unsqueeze(-1) * hi
    if low is not None:
        lo = torch.sigmoid(low).unsqueeze(-1) * lo
    return lo, hi


def lwc_qparams(wg: torch.Tensor, up: torch.Tensor | None, low: torch.Tensor | None,
                bits: int, symmetric: bool, *, round_zp: bool = True, full_range: bool = False,
                levels: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Step ``h`` and zero point ``z`` (``[rows, G, 1]``) of the clipped range, on llmcq's
    grids (see :func:`llmcq.quant.qparams.minmax_qparams`); differentiable in ``h``.
    ``levels`` (asymmetric): a grid of that many levels instead of ``2^bits`` (ABQ-LLM's bit
    balance: 5 at 2 bits, ``h = range / 4``)."""
    lo, hi = lwc_range(wg, up, low, symmetric)
    if symmetric:
        return (hi / sym_divisor(bits, full_range)).clamp(min=SCALE_EPS), None
    qmax = 2**bits - 1 if levels is None else levels - 1
    scale = ((hi - lo) / qmax).clamp(min=SCALE_EPS)
    zero = -lo / scale
    zero = zero.round().clamp(0, qmax) if round_zp else zero.clamp(0, qmax)
    return scale, zero


#: the grouped quantize-dequantize with straight-through rounding (core's, shared with the
#: harness's activation quantizer)
_fake_quant_groups = fake_quant_grouped


def lwc_fake_quant(w: torch.Tensor, spec: WeightQuantSpec, up: torch.Tensor | None,
                   low: torch.Tensor | None, *, ste: bool = True,
                   levels: int | None = None) -> torch.Tensor:
    """``W_hat`` of a weight ``[out, in]`` with clip factors ``[out, G]``, differentiable in
    ``w``, ``up`` and ``low`` (straight-through rounding when ``ste``); ``levels``: see
    :func:`lwc_qparams`."""
    wg = group_view(w, spec.granularity)
    scale, zero = lwc_qparams(wg, up, low, spec.bits, spec.symmetric, round_zp=spec.round_zp,
                              full_range=spec.full_range, levels=levels)
    if levels is None:
        return ungroup(_fake_quant_groups(wg, scale, zero, spec.bits, spec.symmetric, ste),
                       w.shape)
    return ungroup(_fake_quant_groups(wg, scale, zero, spec.bits, spec.symmetric, ste,
                                      qmax=levels - 1), w.shape)


@torch.no_grad()
def lwc_quantize(w: torch.Tensor, spec: WeightQuantSpec, up: torch.Tensor | None,
                 low: torch.Tensor | None, *, levels: int | None = None
                 ) -> tuple[torch.Tensor, QParams]:
    """Integer codes ``[out, in]`` and qparams ``[out, G]`` for a record (no gradient);
    ``levels``: see :func:`lwc_qparams` (the record then says ``levels``)."""
    wg = group_view(w.float(), spec.granularity)
    scale, zero = lwc_qparams(wg, _on(up, w), _on(low, w), spec.bits, spec.symmetric,
                              round_zp=spec.round_zp, full_range=spec.full_range, levels=levels)
    qp = QParams(scale.squeeze(-1), None if zero is None else zero.squeeze(-1))
    if levels is None:
        return quantize_weight(w, spec, qp)
    q = quantize_grouped(wg, scale, zero, spec.bits, spec.symmetric, qmax=levels - 1)
    return ungroup(q, w.shape), qp


@torch.no_grad()
def lwc_clip(w: torch.Tensor, spec: WeightQuantSpec, up: torch.Tensor | None,
             low: torch.Tensor | None) -> torch.Tensor:
    """``w`` clamped group-wise to its learned range (for a later step that quantizes)."""
    wg = group_view(w.float(), spec.granularity)
    lo, hi = lwc_range(wg, _on(up, w), _on(low, w), spec.symmetric)
    return ungroup(torch.clamp(wg, lo, hi), w.shape).to(w.dtype)


def logit(p: torch.Tensor) -> torch.Tensor:
    """Inverse of the sigmoid."""
    return torch.log(p / (1 - p))


@torch.no_grad()
def clip_factors(w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, spec: WeightQuantSpec,
                 *, symmetric_clip: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """LWC factors ``(up, low)`` (``[out, G]``) reproducing clip bounds ``lo``/``hi``
    (``[out, G]``, e.g. from :func:`llmcq.quant.clip.search_clip`): ``sigmoid(up) max W = hi``.

    Ratios are kept inside ``(0, 1)`` by 1e-4 so the factors stay finite. A symmetric clip of
    an asymmetric grid shrinks both ends by the same ratio.
    """
    wg = group_view(w.float(), spec.granularity)
    wmax = wg.amax(dim=-1)
    wmin = wg.amin(dim=-1)
    lo, hi = lo.float().to(w.device), hi.float().to(w.device)

    def ratio(bound: torch.Tensor, orig: torch.Tensor) -> torch.Tensor:
        safe = orig.abs() > 1e-12
        r = torch.where(safe, bound / torch.where(safe, orig, torch.ones_like(orig)),
                        torch.ones_like(orig))
        return logit(r.clamp(_RATIO_EPS, 1 - _RATIO_EPS))

    if spec.symmetric or symmetric_clip:
        up = ratio(hi, torch.maximum(wmax.abs(), wmin.abs()))
        return up, (None if spec.symmetric else up.clone())
    return ratio(hi, wmax), ratio(lo, wmin)


def let_init_scale(act_absmax: torch.Tensor, weight_absmax: torch.Tensor,
                   alpha: float) -> torch.Tensor:
    """SmoothQuant's ``s = max|X|^alpha / max|W|^(1 - alpha)`` per input channel."""
    act = act_absmax.float().clamp(min=_STAT_MIN)
    wmax = weight_absmax.float().clamp(min=_STAT_MIN)
    return (act.pow(alpha) / wmax.pow(1 - alpha)).clamp(min=_STAT_MIN)


def truncate_scale(s: torch.Tensor, threshold: float = LET_MIN) -> torch.Tensor:
    """``s`` with entries of magnitude below ``threshold`` pushed out to ``+-threshold``."""
    small = s.abs() < threshold
    signed = torch.where(s < 0, -threshold, threshold).to(s.dtype)
    return torch.where(small, signed, s)


def reduce_to_kv_max(stat: torch.Tensor, n_heads: int, n_kv_heads: int) -> torch.Tensor:
    """A per-channel maximum over ``heads * head_dim`` -> over ``kv_heads * head_dim``: the
    largest over the query heads that share each key/value head (grouped-query attention)."""
    head_dim = stat.numel() // n_heads
    return stat.reshape(n_kv_heads, n_heads // n_kv_heads, head_dim).amax(dim=1).reshape(-1)


def scale_producer(weight: torch.Tensor, bias: torch.Tensor | None, s: torch.Tensor,
                   shift: torch.Tensor | None, *, linear: bool, offset: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Producer parameters making its output ``(X - delta) / s``: a norm's ``weight``/``bias``
    (``[C]``) or a linear's output rows (``weight [C, in]``, ``bias [C]``). ``offset``: the
    norm multiplies by ``1 + weight`` (Gemma), so ``weight' = (1 + weight) / s - 1``."""
    if offset and not linear:
        w = (1.0 + weight) / s - 1.0
    else:
        w = weight / (s.view(-1, 1) if linear else s)
    if shift is not None:
        if bias is None:
            raise ValueError("a shift needs a producer bias to absorb it")
        return w, (bias - shift) / s
    return w, (None if bias is None else bias / s)


def scale_consumer(weight: torch.Tensor, bias: torch.Tensor | None, s: torch.Tensor,
                   shift: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Consumer parameters for the input ``(X - delta) / s``: ``W * s`` and ``B + W delta``
    (``s``/``delta`` already expanded to the consumer's input width)."""
    w = weight * s.view(1, -1)
    if shift is not None:
        if bias is None:
            raise ValueError("a shift needs a consumer bias to absorb it")
        return w, bias + weight @ shift
    return w, bias


#: dynamic activation quantize-dequantize with straight-through rounding: core's
#: :func:`llmcq.recon.act_fake_quant` (the values of ``fake_quantize_act``, differentiable)
act_fake_quant = recon_act_fake_quant
