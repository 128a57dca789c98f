"""HQQ's half-quadratic solver for the zero points of an asymmetric integer grid.

Badri & Shaji (2023), *Half-Quadratic Quantization of Large Machine Learning Models*,
https://mobiusml.github.io/hqq_blog/. Notation of the blog, per group of a weight ``W``,
``b`` bits, scale ``s`` and zero point ``z``:

    W_q = Q_{z,s}(W)    = clamp(round(W / s + z), 0, 2^b - 1)     (integer codes)
    W_r = Q^{-1}(W_q)   = s (W_q - z)                             (reconstruction)

HQQ keeps the min-max scale ``s`` and fits ``z`` to a sparsity-promoting error
``phi(W - W_r) = ||W - W_r||_p^p`` with ``p < 1`` (``lp_norm``). With an auxiliary error
variable ``W_e`` the problem becomes half-quadratic,

    min_{z, W_e}  ||W_e||_p^p + beta / 2 ||W_e - (W - Q^{-1}(Q_{z,s}(W)))||_2^2,

solved by alternating two closed-form steps while ``beta`` grows by ``kappa`` each round:

    (sp1)  W_e  <- shrink_p(W - W_r, beta)             the generalised soft threshold
    (sp2)  z    <- mean_group(W_q - (W - W_e) / s)     the zero point, in closed form
           beta <- kappa * beta

with ``shrink_p(x, beta) = sign(x) relu(|x| - |x|^(p-1) / beta)``; for ``p = 1`` it is the
soft threshold ``sign(x) relu(|x| - 1 / beta)``, the exact proximal operator of ``|x| / beta``.

Every iterate ``z`` is scored by the group's mean absolute error ``mean |W - W_r|`` (the
criterion of the reference package, whatever ``p``), and each group returns its best iterate,
so the result is never worse than the min-max start. By default every group runs all
``iters`` rounds, so each group's error is at most what the reference package's default
reaches for it (the package stops all groups together, when the whole tensor's error stops
falling). With ``early_stop`` a group stops at its first round that does not lower its error
(hqq's ``optimize_weights_proximal_v2`` rule, per group): faster, but the L1 error is
piecewise linear in ``z`` and a flat stretch stops a group that would have improved later.

All groups of a weight are solved at once on the weight's device, in float32. A partial last
group (group size not dividing the row) is masked out of the means, so it is fitted on its
real columns only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from llmcq.quant.qparams import group_view, ungroup
from llmcq.quant.spec import Granularity, PerGroup

__all__ = ["HQQResult", "shrink_lp", "group_mask", "group_mean", "minmax_init", "quantize",
           "dequantize", "zero_step", "optimize_zero", "hqq_quantize"]

#: smallest scale, so a constant group does not divide by zero
SCALE_EPS = 1e-8


@dataclass
class HQQResult:
    """What :func:`hqq_quantize` returns; per-group tensors are ``[rows, G]``.

    ``q`` holds the integer codes ``[out, in]`` (float dtype, integral values),
    ``W_hat = (q - zero[:, g(j)]) * scale[:, g(j)]``. ``error``/``error_init`` are the mean
    absolute reconstruction errors of the returned and of the min-max zero points; ``step``
    is the round whose zero point was kept (0 = the min-max start).
    """

    q: Tensor
    scale: Tensor
    zero: Tensor
    error: Tensor
    error_init: Tensor
    step: Tensor


def shrink_lp(x: Tensor, beta: float, p: float) -> Tensor:
    """The generalised soft-threshold ``sign(x) relu(|x| - |x|^(p-1) / beta)`` (``p`` in (0, 1]).

    At ``x = 0`` the threshold is infinite for ``p < 1`` and the result is 0, as in the limit.
    """
    a = x.abs()
    threshold = a.pow(p - 1.0).div_(beta) if p != 1.0 else 1.0 / beta
    return torch.sign(x) * torch.relu(a - threshold)


def group_mask(cols: int, granularity: Granularity, device: torch.device) -> Tensor | None:
    """``[1, G, g]`` float mask of the real columns of :func:`group_view`'s padded groups;
    None when no group is padded."""
    if not isinstance(granularity, PerGroup) or cols % granularity.size == 0:
        return None
    g = granularity.size
    n = -(-cols // g) * g
    mask = (torch.arange(n, device=device) < cols).float()
    return mask.reshape(1, -1, g)


def group_mean(x: Tensor, mask: Tensor | None) -> Tensor:
    """Mean over the last axis (one value per group, kept as ``[..., 1]``), real columns only."""
    if mask is None:
        return x.mean(dim=-1, keepdim=True)
    return (x * mask).sum(dim=-1, keepdim=True) / mask.sum(dim=-1, keepdim=True)


def minmax_init(W: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """The start: ``s = (max W - min W) / (2^b - 1)``, ``z = -min W / s`` per group
    (``[rows, G, 1]`` each), the zero point not rounded (hqq's default ``round_zero=False``).

    ``W`` is ``[rows, G, g]``; padding columns repeat a real one, so min and max are exact.
    """
    qmax = 2**bits - 1
    lo = W.amin(dim=-1, keepdim=True)
    hi = W.amax(dim=-1, keepdim=True)
    s = ((hi - lo) / qmax).clamp_(min=SCALE_EPS)
    return s, -lo / s


def quantize(W: Tensor, s: Tensor, z: Tensor, bits: int) -> Tensor:
    """``W_q = clamp(round(W / s + z), 0, 2^b - 1)``."""
    return torch.round(W / s + z).clamp_(0, 2**bits - 1)


def dequantize(W_q: Tensor, s: Tensor, z: Tensor) -> Tensor:
    """``W_r = s (W_q - z)``."""
    return (W_q - z) * s


def zero_step(W: Tensor, W_q: Tensor, W_r: Tensor, s: Tensor, mask: Tensor | None, *,
              beta: float, p: float) -> Tensor:
    """One half-quadratic round in the paper's form: (sp1) shrink the error, (sp2) the new
    zero point per group. :func:`optimize_zero` computes the same in grid units."""
    W_e = shrink_lp(W - W_r, beta, p)
    return group_mean(W_q - (W - W_e) / s, mask)


@torch.no_grad()
def optimize_zero(W: Tensor, s: Tensor, z: Tensor, bits: int, mask: Tensor | None = None, *,
                  lp_norm: float = 0.7, beta: float = 10.0, kappa: float = 1.01,
                  iters: int = 20, early_stop: bool = False
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fit the zero points of grouped ``W`` (``[rows, G, g]``) from the start ``(s, z)``.

    Runs ``iters`` rounds of :func:`zero_step`, scores every iterate (the start included) by
    its group's mean absolute error and keeps each group's best (``early_stop``: see above).
    Returns ``(z_best, err_best, err_init, step_best)``, each ``[rows, G, 1]``.

    Computed in grid units, ``U = W / s`` and ``D = U - (W_q - z) = (W - W_r) / s``, where
    (sp1) and (sp2) fold into one clamp: ``W - W_e = W_r + (D - shrink(D))`` and
    ``x - shrink_p(x, beta) = clamp(x, -t, t)`` with ``t = |x|^(p-1) / beta``, so

        z <- z - mean_group(clamp(D, -T, T)),   T = |D|^(p-1) s^(p-2) / beta.

    Groups lie along the columns of ``U`` (``[g, groups]``), so per-group values broadcast
    over rows, which is much faster on CPU than broadcasting over the last axis.
    """
    rows, G, g = W.shape
    qmax = 2**bits - 1
    U = (W.float() / s).reshape(rows * G, g).t().contiguous()  # [g, N]
    st = s.float().reshape(1, -1)
    zt = z.float().expand(rows, G, 1).reshape(1, -1).clone()
    m = None if mask is None else mask.expand(rows, G, g).reshape(rows * G, g).t().contiguous()
    n = float(g) if m is None else m.sum(dim=0, keepdim=True)

    def mean(x: Tensor) -> Tensor:  # over the real weights of each group
        return (x.sum(dim=0, keepdim=True) if m is None else (x * m).sum(dim=0, keepdim=True)) / n

    c = st.pow(lp_norm - 2.0).div_(beta)  # T = |D|^(p-1) * c
    best_z, best_err = zt.clone(), torch.full_like(zt, float("inf"))
    best_step = torch.zeros(zt.shape, dtype=torch.int32, device=W.device)
    err_init = best_err
    active = torch.ones(zt.shape, dtype=torch.bool, device=W.device)
    for i in range(iters + 1):
        D = U - (U + zt).round_().clamp_(0, qmax)
        D.add_(zt)
        A = D.abs()
        err = mean(A).mul_(st)  # mean |W - W_r|
        if i == 0:
            err_init = err
        better = active & (err < best_err)
        best_err = torch.where(better, err, best_err)
        best_z = torch.where(better, zt, best_z)
        best_step = torch.where(better, i, best_step)
        if early_stop:
            active = better
            if not bool(active.any()):  # one host sync per round, to stop when all have
                break
        if i == iters:
            break
        # |D|^(p-1) as exp((p-1) log|D|): same value, several times faster than pow on CPU
        T = c if lp_norm == 1.0 else A.log_().mul_(lp_norm - 1.0).exp_().mul_(c)
        z_new = zt - mean(torch.clamp(D, min=-T, max=T))
        zt = torch.where(active, z_new, zt) if early_stop else z_new
        c = c / kappa  # beta <- kappa * beta
    shape = (rows, G, 1)
    return (best_z.reshape(shape), best_err.reshape(shape), err_init.reshape(shape),
            best_step.reshape(shape))


@torch.no_grad()
def hqq_quantize(w: Tensor, bits: int, granularity: Granularity, *, lp_norm: float = 0.7,
                 beta: float = 10.0, kappa: float = 1.01, iters: int = 20,
                 early_stop: bool = False, max_elements: int = 1 << 26) -> HQQResult:
    """HQQ on a 2-D weight ``[out, in]``: min-max scales, half-quadratic zero points.

    Groups run along ``in`` (``PerGroup(g)``, any ``g``), or one per row (``PerChannel``),
    or one for the tensor (``PerTensor``). Rows are solved in chunks of at most
    ``max_elements`` weights (groups are independent, so chunking changes nothing).
    """
    Wg = group_view(w.detach().float(), granularity)
    mask = group_mask(w.shape[1], granularity, w.device)
    rows_per_chunk = max(1, max_elements // max(1, Wg.shape[1] * Wg.shape[2]))
    parts: dict[str, list[Tensor]] = {k: [] for k in ("q", "s", "z", "err", "err0", "step")}
    for start in range(0, Wg.shape[0], rows_per_chunk):
        W = Wg[start:start + rows_per_chunk]
        s, z = minmax_init(W, bits)
        z, err, err0, step = optimize_zero(W, s, z, bits, mask, lp_norm=lp_norm, beta=beta,
                                           kappa=kappa, iters=iters, early_stop=early_stop)
        parts["q"].append(quantize(W, s, z, bits))
        for key, value in (("s", s), ("z", z), ("err", err), ("err0", err0), ("step", step)):
            parts[key].append(value.squeeze(-1))
    cat = {k: torch.cat(v) for k, v in parts.items()}
    return HQQResult(q=ungroup(cat["q"], w.shape), scale=cat["s"], zero=cat["z"],
                     error=cat["err"], error_init=cat["err0"], step=cat["step"])
