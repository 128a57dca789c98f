"""AWQ's scale search in the paper's notation (Lin et al. 2023, arXiv 2306.00978, Sec. 3.2).

For the linears of one group, all reading the input ``X`` (``[tokens, c_in]``), with
weights ``W`` and a quantizer ``Q``, AWQ looks for a per-input-channel scale ``s``:

    s* = argmin_s  L(s),   L(s) = || f(Q(W diag(s)), diag(s)^-1 X) - f(W, X) ||^2    (Eq. 4)

where ``f`` is the group's "inspect" module (the attention block for q/k/v, the MLP for
gate/up, the linear itself otherwise). ``s`` is searched on a grid of one exponent:

    v2 (the paper, Eq. 5):      s = s_X^a
    v1 (llmc's trans_version):  s = s_X^a / s_W^(1-a)
    a in {0, 1/n, ..., (n-1)/n},    n = n_grid = 20

``s_X`` is the mean of ``|x|`` per input channel over every calibration token; ``s_W`` is the
mean over output rows (and over the group's linears) of ``|w| / max|w|`` within each
quantization group. Each candidate is clamped to ``>= 1e-4`` and divided by
``sqrt(max(s) min(s))`` so that it is centred around 1 (as in the reference code).

The loss of every candidate is the error summed over *all* calibration batches; the best
candidate is chosen only once every loss is known (choosing inside the per-batch loop, on
partial sums, is a known bug of some ports). Losses stay on the device: one host sync per
search, at the end.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from llmcq.quant.qparams import fake_quantize_act, fake_quantize_weight, group_view, ungroup
from llmcq.quant.spec import ActQuantSpec, Granularity, WeightQuantSpec

__all__ = ["ChannelAbsMean", "weight_salience", "candidate_scale", "grid", "ScaleSearch",
           "search_scale", "scaled_linear_error", "SCALE_MIN"]

#: lower clamp of a candidate scale before normalisation (the reference's 1e-4)
SCALE_MIN = 1e-4
#: floor of the weight salience in v1, so all-zero columns do not divide by zero
_W_FLOOR = 1e-8


@dataclass
class ChannelAbsMean:
    """Running mean of ``|x|`` per channel (last dimension) over any number of batches: s_X."""

    total: torch.Tensor | None = None
    count: int = 0

    def update(self, x: torch.Tensor) -> None:
        x2 = x.detach().reshape(-1, x.shape[-1])
        part = x2.float().abs().sum(dim=0)
        self.total = part if self.total is None else self.total + part
        self.count += int(x2.shape[0])

    def mean(self) -> torch.Tensor:
        if self.total is None or self.count == 0:
            raise RuntimeError("no activations were observed")
        return self.total / self.count


def weight_salience(weights: Sequence[torch.Tensor],
                    granularity: Granularity | Sequence[Granularity]) -> torch.Tensor:
    """s_W: mean over rows of ``|w| / max|w|`` per quantization group, averaged over the
    group's linears (all reading the same ``c_in`` columns), each linear grouped by its own
    granularity when one per weight is given. Returns ``[c_in]`` float32."""
    grans = list(granularity) if isinstance(granularity, Sequence) else \
        [granularity] * len(weights)
    acc: torch.Tensor | None = None
    for w, gran in zip(weights, grans, strict=True):
        a = w.detach().float().abs()
        g = group_view(a, gran)  # [rows, G, g] (per-tensor: [1, 1, numel])
        rel = g / g.amax(dim=-1, keepdim=True).clamp(min=_W_FLOOR)
        col = ungroup(rel, a.shape).mean(dim=0)
        acc = col if acc is None else acc + col
    if acc is None:
        raise ValueError("weight_salience needs at least one weight")
    return acc / len(weights)


def candidate_scale(s_x: torch.Tensor, alpha: float, version: str = "v2",
                    s_w: torch.Tensor | None = None) -> torch.Tensor:
    """One grid point: ``s_X^a`` (v2) or ``s_X^a / s_W^(1-a)`` (v1), clamped and normalised."""
    s_x = s_x.float()
    if version == "v2":
        s = s_x.pow(alpha)
    elif version == "v1":
        if s_w is None:
            raise ValueError("trans_version v1 needs the weight salience s_W")
        s = s_x.pow(alpha) / s_w.float().clamp(min=_W_FLOOR).pow(1.0 - alpha)
    else:
        raise ValueError(f"trans_version {version!r}: allowed v1, v2")
    s = s.clamp(min=SCALE_MIN).flatten()
    return s / (s.max() * s.min()).sqrt()


def grid(n_grid: int) -> list[float]:
    """The exponents searched: ``i / n_grid`` for ``i < n_grid`` (0 is the identity in v2)."""
    if n_grid < 1:
        raise ValueError("n_grid must be >= 1")
    return [i / n_grid for i in range(n_grid)]


@dataclass
class ScaleSearch:
    """Result of :func:`search_scale`: the best scale, its exponent, and every loss."""

    scale: torch.Tensor
    alpha: float
    index: int
    losses: torch.Tensor = field(repr=False)


def search_scale(s_x: torch.Tensor, loss: Callable[[torch.Tensor], torch.Tensor], *,
                 n_grid: int = 20, version: str = "v2",
                 s_w: torch.Tensor | None = None) -> ScaleSearch:
    """Grid search of Eq. 4. ``loss(s)`` must return the error of candidate ``s`` summed (or
    averaged) over *all* calibration data, as a 0-d tensor; ties go to the smallest exponent.
    Non-finite losses never win; if every loss is non-finite, ``s = 1`` (no scaling)."""
    alphas = grid(n_grid)
    cands = [candidate_scale(s_x, a, version, s_w) for a in alphas]
    losses = torch.stack([loss(s).reshape(()).float() for s in cands])
    finite = torch.isfinite(losses)
    safe = torch.where(finite, losses, torch.full_like(losses, float("inf")))
    index = int(torch.argmin(safe))  # the one host sync
    if not bool(finite[index]):
        return ScaleSearch(torch.ones_like(cands[0]), float("nan"), -1, losses)
    return ScaleSearch(cands[index], alphas[index], index, losses)


def scaled_linear_error(w: torch.Tensor, x: torch.Tensor, s: torch.Tensor,
                        spec: WeightQuantSpec, act: ActQuantSpec | None = None) -> torch.Tensor:
    """L(s) of Eq. 4 for a single linear: mean of ``(X W^T - Q_a(X/s) Q(W s)^T)^2``."""
    x2 = x.reshape(-1, x.shape[-1]).float()
    w = w.float()
    ref = x2 @ w.t()
    xs = x2 / s
    if act is not None:
        xs = fake_quantize_act(xs, act)
    out = xs @ fake_quantize_weight(w * s, spec).t()
    return (out - ref).pow(2).mean()
