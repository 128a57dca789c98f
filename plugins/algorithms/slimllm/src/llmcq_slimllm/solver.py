"""SliM-LLM's maths (Huang et al. 2024, arXiv:2405.14917). Tensors in, tensors out.

Notation. A linear ``W`` (``[d_row, d_col]``) with Hessian ``H = 2 X X^T / n``; ``U`` is the
upper Cholesky factor of the damped ``H^-1`` (``U^T U = (H + lambda I)^-1``), whose diagonal
GPTQ's paper writes ``[H^-1]_jj`` after it overwrites ``H^-1`` with the factor (Algorithm 1),
and so do SliM-LLM's equations and code. Groups are ``g`` consecutive input columns spanning
every output row; ``N`` is the average width.

Salience-Determined Bit Allocation (SBA, Section 3.2). Weight salience
``delta_ij = W_ij^2 / [H^-1]_jj^2`` (Eq. 3); a group's salience is its sum. With the ``k``
most salient groups at ``N+1`` bits and the ``k`` least salient at ``N-1`` (the rest at
``N``, so the mean is exactly ``N``), ``k`` minimises the output KL divergence
``KL(softmax(X W_k^T) || softmax(X W^T))`` over the calibration tokens, where ``W_k`` is the
round-to-nearest weight under allocation ``k`` (Eq. 6). Only full groups take part: a partial
last group stays at ``N``, so the mean is exact whatever the group size.

Salience-Weighted Quantizer Calibration (SQC, Section 3.3). Inside the GPTQ sweep, each
group's grid is searched over ``p * [min, max]`` for ``p`` in ``[1 - tau, 1 + tau]``
(``tau = 0.1``) per row, minimising ``sum_ns |w - Q(w)|^2.4 + lambda sum_s |w - Q(w)|^2.4``,
where the salient weights ``s`` are the outliers of ``delta`` within the group (z-score above
2); ``lambda = 1`` makes the weighting a no-op (the range search stays).

One-bit groups (``N = 2``) are binarized as in the reference code: levels ``m +- a`` per row
(``m`` the mean, ``a = mean |w - m|``), written as a 1-bit grid with scale ``2a`` and the
fractional zero point ``(a - m) / 2a``; an integral zero point would put one of the two levels
at 0.

SliM-LLM+ (Section 4): OmniQuant's learnable weight clipping with those widths, each group's
range ``[sigmoid(low) min w, sigmoid(up) max w]`` on its own width's grid, and 1-bit groups'
spread ``a (sigmoid(up) + 1/2)`` learned (the reference's parametrization).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from llmcq.quant.qparams import SCALE_EPS, group_view, minmax_qparams, quantize_grouped, ungroup
from llmcq.quant.spec import PerGroup, WeightQuantSpec

from llmcq_gptq.solver import inverse_cholesky

__all__ = ["cholesky_diagonal", "weight_salience", "group_salience", "search_ks", "allocate",
           "binarize_qparams", "group_qparams", "fake_quant_groups", "KLPlan", "kl_plan",
           "kl_curve", "salient_mask", "sqc_candidates", "sqc_qparams", "plain_qparams",
           "mean_bits", "mixed_lwc_qparams", "mixed_lwc_fake_quant", "mixed_lwc_quantize"]

#: SQC's range search: ``p`` in ``[1 - TAU, 1 + TAU]``, ``STEPS`` values each side of 1
TAU, STEPS = 0.1, 50
#: SQC's error norm (the reference quantizer's ``norm``)
NORM = 2.4
#: z-score above which a weight is salient (the reference's ``saliency_mask``)
Z_SALIENT = 2.0
#: the log-probability below which the KL search rounds a probability up (float32's normal
#: range ends at e^-87.3)
LOG_TINY = -87.0


# ---------------------------------------------------------------------- SBA


@torch.no_grad()
def cholesky_diagonal(H: torch.Tensor, percdamp: float, retries: int) -> torch.Tensor:
    """``U_jj`` in the natural column order, damped and with dead inputs handled as GPTQ's
    sweep does (so the ranking matches the sweep's ``[H^-1]_jj``); ones when every
    factorization failed (the sweep then rounds to nearest)."""
    H = H.float() if H.dtype not in (torch.float32, torch.float64) else H
    dead = H.diagonal() == 0
    if bool(dead.any()):
        H = H.clone()
        H.diagonal()[dead] = 1.0
    U, _ = inverse_cholesky(H, percdamp, retries)
    if U is None:
        return torch.ones(H.shape[0], dtype=H.dtype, device=H.device)
    return U.diagonal().clone()


def weight_salience(W: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``delta = W^2 / d^2`` with ``d`` the ``[H^-1]_jj`` of each column (Eq. 3)."""
    return W.double().square() / d.double().square()[None, :]


def group_salience(W: torch.Tensor, d: torch.Tensor, group_size: int) -> torch.Tensor:
    """Each group's summed salience ``[G]`` (float64); a partial last group included."""
    delta = weight_salience(W, d)
    C = W.shape[1]
    G = -(-C // group_size)
    out = torch.zeros(G, dtype=torch.float64, device=W.device)
    out.index_add_(0, torch.arange(C, device=W.device) // group_size, delta.sum(0))
    return out


def search_ks(n_full: int) -> list[int]:
    """The ``k`` SBA tries for ``n_full`` full groups: ``1 .. n_full // 2 - 1`` as the
    reference code, at least ``k = 1`` when two groups exist, ``[0]`` for fewer."""
    if n_full < 2:
        return [0]
    return list(range(1, max(2, n_full // 2)))


def allocate(salience: torch.Tensor, k: int, bits: int, n_full: int) -> torch.Tensor:
    """Widths ``[G]`` (long): the ``k`` most salient of the first ``n_full`` groups at
    ``bits + 1``, the ``k`` least salient at ``bits - 1``, the rest at ``bits``."""
    G = int(salience.numel())
    if not 0 <= 2 * k <= n_full <= G:
        raise ValueError(f"k={k} needs 2k <= {n_full} full groups (of {G})")
    out = torch.full((G,), bits, dtype=torch.long)
    if k:
        order = torch.argsort(salience[:n_full].double().cpu(), stable=True)
        out[order[:k]] = bits - 1
        out[order[n_full - k:]] = bits + 1
    return out


def mean_bits(widths: torch.Tensor, in_features: int, group_size: int) -> float:
    """Mean width over the columns (a partial last group weighted by its size)."""
    G = int(widths.numel())
    cols = torch.full((G,), group_size, dtype=torch.float64)
    cols[-1] = in_features - group_size * (G - 1)
    return float((widths.double().cpu() * cols).sum() / in_features)


# ---------------------------------------------------------------------- grids per width


def binarize_qparams(wg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Levels ``m +- a`` of each group of ``wg`` (``[..., g]``) as a 1-bit grid: scale
    ``2a``, fractional zero ``(a - m) / 2a``, both ``[..., 1]``."""
    m = wg.mean(dim=-1, keepdim=True)
    a = (wg - m).abs().mean(dim=-1, keepdim=True).clamp(min=SCALE_EPS / 2)
    return 2 * a, (a - m) / (2 * a)


def group_qparams(wg: torch.Tensor, bits: int, spec: WeightQuantSpec,
                  shrink: torch.Tensor | float = 1.0
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Min-max grid of width ``bits`` (``spec``'s conventions, ``shrink`` times the range)
    for each group of ``wg`` (``[..., g]``) -> ``[..., 1]``; binarized at one bit."""
    if bits == 1 and not spec.symmetric:
        return binarize_qparams(wg)
    return minmax_qparams(wg, bits, spec.symmetric, round_zp=spec.round_zp, shrink=shrink,
                          full_range=spec.full_range)


def _dequant(wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
             symmetric: bool) -> torch.Tensor:
    q = quantize_grouped(wg, scale, zero, bits, symmetric)
    return q * scale if zero is None else (q - zero) * scale


def fake_quant_groups(W: torch.Tensor, group_size: int, bits: int, spec: WeightQuantSpec
                      ) -> torch.Tensor:
    """Round-to-nearest of every group of ``W`` at width ``bits`` (SBA's proxy quantizer)."""
    wg = group_view(W.float(), PerGroup(group_size))
    scale, zero = group_qparams(wg, bits, spec)
    return ungroup(_dequant(wg, scale, zero, bits, spec.symmetric), W.shape)


@dataclass
class KLPlan:
    """What :func:`kl_curve` needs of one linear, prepared once: the all-``N`` weight
    transposed, and for each step ``k -> k + 1`` the two groups that move, with the change of
    their weights (``[g, d_row]``, contiguous)."""

    base_T: torch.Tensor
    n_full: int
    group_size: int
    steps: list[tuple[int, torch.Tensor, int, torch.Tensor]]


def kl_plan(by_width: dict[int, torch.Tensor], bits: int, salience: torch.Tensor,
            n_full: int, group_size: int, k_max: int) -> KLPlan:
    """The nested allocations of :func:`allocate` as increments: step ``i`` moves the
    ``i``-th least salient group to ``bits - 1`` and the ``i``-th most salient to
    ``bits + 1``."""
    Wn = by_width[bits].float()
    g = group_size
    order = torch.argsort(salience[:n_full].double().cpu(), stable=True).tolist()
    steps = []
    for i in range(k_max):
        lo, hi = order[i], order[n_full - 1 - i]
        steps.append((lo, (by_width[bits - 1][:, lo * g:(lo + 1) * g].float()
                           - Wn[:, lo * g:(lo + 1) * g]).T.contiguous(),
                      hi, (by_width[bits + 1][:, hi * g:(hi + 1) * g].float()
                           - Wn[:, hi * g:(hi + 1) * g]).T.contiguous()))
    return KLPlan(Wn.T.contiguous(), n_full, g, steps)


@torch.no_grad()
def kl_curve(x: torch.Tensor, y: torch.Tensor, bias: torch.Tensor | None, plan: KLPlan,
             ks: list[int]) -> torch.Tensor:
    """Summed over the tokens of ``x`` (``[..., d_col]``): ``KL(P_k || P)`` for each ``k`` of
    ``ks`` (ascending, at most ``len(plan.steps)``), ``P = softmax(y)`` the float output,
    ``P_k`` the output with the round-to-nearest weights under allocation ``k``
    (float64 ``[len(ks)]``).

    The allocations are nested (``k + 1`` moves one more group each way), so the quantized
    output is built incrementally: one full product, then two ``g``-column products per step.
    """
    x = x.reshape(-1, x.shape[-1]).float()
    T, g = x.shape[0], plan.group_size
    log_p = torch.log_softmax(y.reshape(T, -1).float(), dim=-1)
    yq = x @ plan.base_T
    if bias is not None:
        yq += bias.float()
    # the full groups' columns, one contiguous [T, g] block each (strided slices multiply
    # two orders of magnitude slower on a CPU)
    xg = x[:, :plan.n_full * g].reshape(T, plan.n_full, g).transpose(0, 1).contiguous()
    out = torch.zeros(len(ks), dtype=torch.float64)
    done = 0
    for i, k in enumerate(ks):
        while done < k:
            lo, dl, hi, dh = plan.steps[done]
            yq.addmm_(xg[lo], dl).addmm_(xg[hi], dh)
            done += 1
        log_q = torch.log_softmax(yq, dim=-1)
        # q below e^-87 is left at e^-87 (float32's smallest normal is e^-87.3): exp of
        # subnormal results runs ~30x slower on a CPU, and such terms add < 1e-35 a token
        q = log_q.clamp(min=LOG_TINY).exp_()
        out[i] = float(torch.dot(q.view(-1), (log_q - log_p).view(-1)))
    return out


# ---------------------------------------------------------------------- SQC


def salient_mask(delta: torch.Tensor, z: float = Z_SALIENT) -> torch.Tensor:
    """The salient weights of a group: every ``delta`` at least as large as the smallest one
    whose z-score (over the group) exceeds ``z`` in magnitude; none when no weight does."""
    flat = delta.reshape(-1)
    if flat.numel() < 2:
        return torch.zeros_like(delta, dtype=torch.bool)
    std = flat.std()
    if not bool(std > 0):
        return torch.zeros_like(delta, dtype=torch.bool)
    out = ((flat - flat.mean()) / std).abs() > z
    if not bool(out.any()):
        return torch.zeros_like(delta, dtype=torch.bool)
    return delta >= flat[out].min()


#: candidates per pass of the range search (a [CHUNK, d_row, g] working set stays in cache)
CHUNK = 8


def _range_errors(wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
                  symmetric: bool, norm: float, weight: torch.Tensor | None) -> torch.Tensor:
    """``sum |(weighted) w - Q_p(w)|^norm`` per candidate grid and row -> ``[P, r]``
    (``wg`` ``[r, 1, k]``, grids ``[P, r, 1, 1]``); the grid formulas of
    :func:`llmcq.quant.qparams.quantize_grouped`, in place, a few candidates at a time."""
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    P = scale.shape[0]
    err = torch.empty(P, wg.shape[0], dtype=torch.float32, device=wg.device)
    for c0 in range(0, P, CHUNK):
        s = scale[c0:c0 + CHUNK]
        q = wg / s
        if zero is not None:
            z = zero[c0:c0 + CHUNK]
            q += z
            q.round_().clamp_(lo, hi).sub_(z)
        else:
            q.round_().clamp_(lo, hi)
        q.mul_(s).sub_(wg).abs_().pow_(norm)
        if weight is not None:
            q.mul_(weight)
        err[c0:c0 + CHUNK] = q.sum(dim=(-1, -2))
    return err


def sqc_candidates(tau: float = TAU, steps: int = STEPS) -> torch.Tensor:
    """The range factors SQC tries, in the reference's order: 1, then up to ``1 + tau``,
    then down to ``1 - tau`` (a tie keeps the earlier one)."""
    one = torch.ones(1, dtype=torch.float64)
    return torch.cat([one, torch.linspace(1.0, 1.0 + tau, steps + 1, dtype=torch.float64)[1:],
                      torch.linspace(1.0, 1.0 - tau, steps + 1, dtype=torch.float64)[1:]])


@torch.no_grad()
def sqc_qparams(w: torch.Tensor, bits: torch.Tensor, d: torch.Tensor, spec: WeightQuantSpec,
                *, lam: float, norm: float = NORM, candidates: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """SQC's grid of one group: ``w`` ``[d_row, k]`` (the group's columns as the sweep has
    updated them), ``bits`` ``[d_row]`` (each row's width), ``d`` ``[k]`` (their
    ``[H^-1]_jj``) -> ``scale``, ``zero`` ``[d_row]`` (zero None when symmetric).

    Rows at one bit are binarized (no search, as the reference). ``lam`` weights the error of
    the salient weights; the chosen ``p`` minimises the weighted ``norm``-error per row.
    """
    # float32 like the grids (minmax_qparams computes in float32)
    p = (sqc_candidates() if candidates is None else candidates).to(w.device, torch.float32)
    weight = torch.ones_like(w)
    if lam != 1.0:
        weight[salient_mask(weight_salience(w, d))] = lam
    scale = torch.empty(w.shape[0], dtype=w.dtype, device=w.device)
    zero = None if spec.symmetric else torch.empty_like(scale)
    for b in torch.unique(bits).tolist():
        rows = (bits == b).to(w.device)
        wg = w[rows][:, None, :]                  # [r, 1, k]
        if b == 1 and not spec.symmetric:
            s, z = binarize_qparams(wg)
        else:
            shrink = p[:, None, None, None]       # [P, 1, 1, 1] -> grids [P, r, 1, 1]
            s_all, z_all = group_qparams(wg, int(b), spec, shrink=shrink)
            wt = weight[rows][:, None, :].float() if lam != 1.0 else None
            err = _range_errors(wg.float(), s_all, z_all, int(b), spec.symmetric, norm, wt)
            best = err.argmin(dim=0)                                      # first minimum
            pick = torch.arange(best.numel(), device=w.device)
            s = s_all[best, pick]
            z = None if z_all is None else z_all[best, pick]
        scale[rows] = s.reshape(-1).to(w.dtype)
        if zero is not None:
            assert z is not None
            zero[rows] = z.reshape(-1).to(w.dtype)
    return scale, zero


def plain_qparams(w: torch.Tensor, bits: torch.Tensor, spec: WeightQuantSpec
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Without SQC: each row's min-max grid at its width (binarized at one bit)."""
    scale = torch.empty(w.shape[0], dtype=w.dtype, device=w.device)
    zero = None if spec.symmetric else torch.empty_like(scale)
    for b in torch.unique(bits).tolist():
        rows = (bits == b).to(w.device)
        s, z = group_qparams(w[rows][:, None, :], int(b), spec)
        scale[rows] = s.reshape(-1).to(w.dtype)
        if zero is not None:
            assert z is not None
            zero[rows] = z.reshape(-1).to(w.dtype)
    return scale, zero



# ---------------------------------------------------------------------- SliM-LLM+ (LWC)


def mixed_lwc_qparams(wg: torch.Tensor, widths: torch.Tensor, up: torch.Tensor,
                      low: torch.Tensor | None, spec: WeightQuantSpec
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """OmniQuant's learnable clipping (:func:`llmcq_omniquant.solver.lwc_qparams`) with each
    group on its own width: ``wg`` ``[rows, G, g]``, ``widths`` ``[G]``, factors ``up``,
    ``low`` ``[rows, G]`` -> ``scale``, ``zero`` ``[rows, G, 1]``, differentiable in the
    factors. One-bit groups (asymmetric) are binarized with a learnable spread, as the
    reference's SliM-LLM+: levels ``m +- a (sigmoid(up) + 1/2)``, ``a = mean |w - m|``
    (``up = 0`` starts at SliM-LLM's binarization)."""
    from llmcq_omniquant.solver import lwc_qparams

    scale = torch.empty(wg.shape[:-1] + (1,), dtype=torch.float32, device=wg.device)
    zero = None if spec.symmetric else torch.empty_like(scale)
    for b in torch.unique(widths).tolist():
        sel = (widths == b).to(wg.device)
        part = wg[:, sel].float()
        if b == 1 and not spec.symmetric:
            m = part.mean(dim=-1, keepdim=True)
            a = (part - m).abs().mean(dim=-1, keepdim=True) * \
                (torch.sigmoid(up[:, sel]) + 0.5).unsqueeze(-1)
            a = a.clamp(min=SCALE_EPS / 2)
            s, z = 2 * a, (a - m) / (2 * a)
        else:
            s, z = lwc_qparams(part, up[:, sel], None if low is None else low[:, sel], int(b),
                               spec.symmetric, round_zp=spec.round_zp,
                               full_range=spec.full_range)
        scale[:, sel] = s
        if zero is not None:
            assert z is not None
            zero[:, sel] = z
    return scale, zero


def mixed_lwc_fake_quant(w: torch.Tensor, widths: torch.Tensor, spec: WeightQuantSpec,
                         up: torch.Tensor, low: torch.Tensor | None, *, ste: bool = True
                         ) -> torch.Tensor:
    """``W_hat`` ``[out, in]`` of :func:`mixed_lwc_qparams`'s grids, each group clamped to
    its own width's codes (straight-through rounding when ``ste``)."""
    from llmcq.recon.quant import fake_quant_grouped

    g = spec.group_size
    assert g is not None
    wg = group_view(w, PerGroup(g))
    scale, zero = mixed_lwc_qparams(wg, widths, up, low, spec)
    out = torch.empty_like(wg, dtype=torch.float32)
    for b in torch.unique(widths).tolist():
        sel = (widths == b).to(w.device)
        out[:, sel] = fake_quant_grouped(wg[:, sel].float(), scale[:, sel],
                                         None if zero is None else zero[:, sel], int(b),
                                         spec.symmetric, ste)
    return ungroup(out, w.shape)


@torch.no_grad()
def mixed_lwc_quantize(w: torch.Tensor, widths: torch.Tensor, spec: WeightQuantSpec,
                       up: torch.Tensor, low: torch.Tensor | None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Codes ``[out, in]`` and ``scale``, ``zero`` ``[out, G]`` of the trained grids (what a
    record holds; its ``dequantize`` is :func:`mixed_lwc_fake_quant`'s weight)."""
    g = spec.group_size
    assert g is not None
    wg = group_view(w.float(), PerGroup(g))
    scale, zero = mixed_lwc_qparams(wg, widths, up.float(), None if low is None
                                    else low.float(), spec)
    q = torch.empty_like(wg)
    for b in torch.unique(widths).tolist():
        sel = (widths == b).to(w.device)
        q[:, sel] = quantize_grouped(wg[:, sel], scale[:, sel],
                                     None if zero is None else zero[:, sel], int(b),
                                     spec.symmetric)
    return (ungroup(q, w.shape), scale.squeeze(-1),
            None if zero is None else zero.squeeze(-1))
