"""SignRound's maths: tensors in, tensors out, no module plumbing.

Per quantization group of a weight ``W`` (``b`` bits), with learnable ``V`` (one rounding
offset per weight, in ``[-1/2, 1/2]``) and ``alpha``, ``beta`` (one min and one max factor per
group, in ``[0, 1]``)::

    lo = alpha min W,  hi = beta max W
    asymmetric:  h = (hi - lo) / (2^b - 1),  z = round_ste(-lo / h)
                 q = clamp(round_ste(W / h + z + V), 0, 2^b - 1),      W_hat = (q - z) h
    symmetric:   h = max(-lo, hi) / (2^(b-1) - 1)       (2^(b-1) - 1/2 with sym_range: full)
                 q = clamp(round_ste(W / h + V), -2^(b-1), 2^(b-1) - 1),   W_hat = q h

``round_ste`` rounds forward and passes the gradient straight through, so the loss reaches
``V`` directly and the factors through ``h`` and ``z``. ``V = 0`` and ``alpha = beta = 1`` is
min-max round-to-nearest on llmcq's grids (:mod:`llmcq.quant.qparams`), bit for bit; the codes,
scales and zero points of a record (:func:`quantize`) are the ones :func:`fake_quant`
evaluates, so ``record.dequantize()`` equals the weight the training saw.

Signed gradient descent (the optimizer): ``theta <- theta - lr_t sign(grad)`` with
``lr_t = lr (1 - t / T)``; after each step ``V`` and the factors are clamped back into their
ranges (:func:`clamp_`).
"""

from __future__ import annotations

import torch
from llmcq.quant.qparams import SCALE_EPS, QParams, group_view, round_ste, sym_divisor, ungroup
from llmcq.quant.spec import WeightQuantSpec

__all__ = ["V_BOUND", "FACTOR_BOUNDS", "grid", "fake_quant", "quantize", "clamp_",
           "sign_step", "factor_shape"]

#: the rounding offsets stay in [-V_BOUND, V_BOUND] (the paper's constraint)
V_BOUND = 0.5
#: the min/max factors stay in this range (auto-round's ``minmax_scale_bound``)
FACTOR_BOUNDS = (0.0, 1.0)


def _grouped(w: torch.Tensor, spec: WeightQuantSpec) -> torch.Tensor:
    return group_view(w.float(), spec.granularity)


def grid(wg: torch.Tensor, spec: WeightQuantSpec, fmin: torch.Tensor | None,
         fmax: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Step ``h`` and zero point ``z`` (``[rows, G, 1]``) of grouped weights ``[rows, G, g]``
    with min/max factors ``[rows, G]`` (None: 1); differentiable in the factors."""
    lo = wg.amin(dim=-1, keepdim=True)
    hi = wg.amax(dim=-1, keepdim=True)
    if fmin is not None:
        lo = lo * fmin.unsqueeze(-1)
    if fmax is not None:
        hi = hi * fmax.unsqueeze(-1)
    if spec.symmetric:
        amax = torch.maximum(-lo, hi)
        return (amax / sym_divisor(spec.bits, spec.full_range)).clamp(min=SCALE_EPS), None
    qmax = 2**spec.bits - 1
    scale = ((hi - lo) / qmax).clamp(min=SCALE_EPS)
    zero = torch.clamp(round_ste(-lo / scale), 0, qmax)
    return scale, zero


def _codes(wg: torch.Tensor, vg: torch.Tensor | None, scale: torch.Tensor,
           zero: torch.Tensor | None, spec: WeightQuantSpec) -> torch.Tensor:
    """Integer codes (float dtype) with straight-through rounding of ``W / h (+ z) + V``."""
    x = wg / scale
    if zero is not None:
        x = x + zero
    if vg is not None:
        x = x + vg
    if spec.symmetric:
        return torch.clamp(round_ste(x), -(2 ** (spec.bits - 1)), 2 ** (spec.bits - 1) - 1)
    return torch.clamp(round_ste(x), 0, 2**spec.bits - 1)


def fake_quant(w: torch.Tensor, spec: WeightQuantSpec, v: torch.Tensor | None,
               fmin: torch.Tensor | None, fmax: torch.Tensor | None) -> torch.Tensor:
    """``W_hat`` (``[out, in]``, float32) of a weight with offsets ``v`` (``[out, in]``) and
    factors ``[out, G]``; differentiable in ``v`` and the factors (and ``w``)."""
    wg = _grouped(w, spec)
    scale, zero = grid(wg, spec, fmin, fmax)
    q = _codes(wg, None if v is None else _grouped(v, spec), scale, zero, spec)
    out = q * scale if zero is None else (q - zero) * scale
    return ungroup(out, w.shape)


@torch.no_grad()
def quantize(w: torch.Tensor, spec: WeightQuantSpec, v: torch.Tensor | None,
             fmin: torch.Tensor | None, fmax: torch.Tensor | None
             ) -> tuple[torch.Tensor, QParams]:
    """Codes ``[out, in]`` (integral float values) and qparams ``[out, G]`` for a record:
    exactly the grid and codes :func:`fake_quant` evaluates."""
    def on(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.detach().float().to(w.device)

    wg = _grouped(w, spec)
    scale, zero = grid(wg, spec, on(fmin), on(fmax))
    vv = on(v)
    q = _codes(wg, None if vv is None else _grouped(vv, spec), scale, zero, spec)
    return ungroup(q, w.shape), QParams(scale.squeeze(-1),
                                        None if zero is None else zero.squeeze(-1))


@torch.no_grad()
def clamp_(v: list[torch.Tensor], factors: list[torch.Tensor]) -> None:
    """Project in place: offsets into ``[-V_BOUND, V_BOUND]``, factors into
    :data:`FACTOR_BOUNDS` (after every step, as auto-round clamps before every forward)."""
    for t in v:
        t.clamp_(-V_BOUND, V_BOUND)
    for t in factors:
        t.clamp_(*FACTOR_BOUNDS)


@torch.no_grad()
def sign_step(p: torch.Tensor, grad: torch.Tensor, lr: float) -> torch.Tensor:
    """One signed-gradient update ``p - lr sign(grad)`` (what the harness's ``signsgd`` does;
    here for the tests and for reading)."""
    return p - lr * torch.sign(grad)


def factor_shape(out_features: int, in_features: int, spec: WeightQuantSpec
                 ) -> tuple[int, int]:
    """Shape ``[rows, G]`` of one linear's min/max factors (one per quantization group)."""
    probe = group_view(torch.empty(out_features, in_features, device="meta"),
                       spec.granularity)
    return int(probe.shape[0]), int(probe.shape[1])
