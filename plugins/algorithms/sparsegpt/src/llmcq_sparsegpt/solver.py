"""SparseGPT's maths (Frantar & Alistarh 2023, arXiv:2301.00774, Algorithm 1). Tensors in,
tensors out; no modules.

A linear ``W`` (``[d_row, d_col]``) with inputs ``X`` and Hessian ``H = 2 X X^T / n``. Columns
are swept left to right with ``H^-1 = U^T U`` (``U`` upper Cholesky factor of the damped
inverse). Removing (or rounding) weight ``w_ij`` costs ``(w_ij - q_ij)^2 / U_jj^2`` (the OBS
saliency) and the optimal update of the row's later weights is

    E_j = (W_:j - Q_:j) / U_jj,        W_:k <- W_:k - E_j U_jk   for k > j,

where ``Q_:j`` is ``0`` for pruned weights and the (rounded) weight for kept ones: pruning
and quantization are the same step with different targets, so one sweep does both (the
paper's joint mode). Updates beyond the current lazy block of ``blocksize`` columns are
applied once per block (one matrix product).

Adaptive mask selection: the mask is chosen on the weights as updated so far, by the
saliency ``w^2 / U_jj^2``: for unstructured sparsity, within each lazy block, the lowest
``round(p * end) - round(p * start)`` of every row (so every row ends with exactly
``round(p * d_col)`` zeros; the reference code thresholds the whole block, which lets rows
differ); for N:M, the ``m - n`` lowest of each ``m`` columns when the sweep reaches them.

Joint quantization uses llmcq's grids as GPTQ does (:mod:`llmcq.quant.qparams`): per-tensor
and per-channel grids are fitted on the original weight; a group's grid when the sweep reaches
its first column, on the updated weights with those already known to be pruned at zero (an
unstructured block's; N:M chunks are still chosen as the sweep reaches them: choosing a whole
group's chunks up front to fit its grid on the kept weights only was measured worse, as the
chunks then see stale weights). Lazy blocks are cut at group boundaries; with no pruning the
sweep is GPTQ's, code for code.

Damping and dead inputs as in :mod:`llmcq_gptq.solver` (whose helpers are reused): when every
factorization fails, ``U = I`` and the sweep degrades to magnitude pruning, never NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from llmcq.quant.qparams import fit_weight_qparams, n_groups
from llmcq.quant.spec import PerChannel, PerGroup, WeightQuantSpec
from llmcq.sparsity import NM, MaskStructure
from llmcq.sparsity.masks import nm_mask
from llmcq_gptq.solver import inverse_cholesky

__all__ = ["SparseGPTResult", "sparsegpt_prune", "block_prune_count"]


@dataclass
class SparseGPTResult:
    """``w``: the pruned, updated weight (dequantized when a grid was given), ``W``'s shape,
    float32 (float64 for a float64 ``W``); ``mask``: bool keep-mask; with a grid, ``q`` codes
    (float dtype) and ``scale``/``zero`` (``[d_row, G]``, ``[d_row, 1]`` or ``[1, 1]``; zero
    None when symmetric); ``loss``: ``sum E^2 / 2``; ``retries`` / ``fallback`` as GPTQ's."""

    w: torch.Tensor
    mask: torch.Tensor
    loss: torch.Tensor
    retries: int
    fallback: bool
    q: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    zero: torch.Tensor | None = None


def block_prune_count(sparsity: float, start: int, end: int) -> int:
    """Weights of a row pruned among columns ``[start, end)``: the block's share of
    ``round(p * d_col)``, so that the blocks of a row add up to exactly that."""
    return int(round(sparsity * end)) - int(round(sparsity * start))


def _saliency(cols: torch.Tensor, d: torch.Tensor, forced: torch.Tensor | None
              ) -> torch.Tensor:
    """``w^2 / U_jj^2`` of columns ``cols`` (``[k, d_row]``, sweep layout) as ``[d_row, k]``;
    weights an earlier step pruned score ``-inf`` (pruned first)."""
    s = (cols.square() / d[:, None].square()).T
    if forced is not None:
        s = s.masked_fill(forced.T, float("-inf"))
    return s


@torch.no_grad()
def sparsegpt_prune(W: torch.Tensor, H: torch.Tensor, structure: MaskStructure,
                    sparsity: float, *, blocksize: int = 128, percdamp: float = 0.01,
                    retries: int = 4, keep: torch.Tensor | None = None,
                    spec: WeightQuantSpec | None = None) -> SparseGPTResult:
    """Prune ``W`` to ``structure`` (``sparsity`` for unstructured) with OBS updates of the
    kept weights; with ``spec``, round the kept weights onto its grid in the same sweep.

    ``keep``: an earlier step's keep-mask; those weights are pruned first and stay pruned
    (the result's mask is a subset of ``keep``). The lazy block is rounded up to a multiple
    of ``m`` (N:M) and of the group size (per-group grid).
    """
    dt = torch.float64 if W.dtype == torch.float64 else torch.float32
    dev = W.device
    R, C = W.shape
    nm = structure if isinstance(structure, NM) else None
    W = W.to(dt).clone()
    H = H.to(device=dev, dtype=dt)
    dead = H.diagonal() == 0
    if bool(dead.any()):
        H = H.clone()
        H.diagonal()[dead] = 1.0
        W[:, dead] = 0.0
    U, used = inverse_cholesky(H, percdamp, retries)
    del H
    fallback = U is None
    if U is None:
        U = torch.eye(C, dtype=dt, device=dev)
    dU = U.diagonal().clone()
    Ubar = U.div_(dU[:, None])  # row j: U_jk / U_jj, the update per unit of error
    del U

    # ---- grids: fixed up front, or per group when the sweep reaches it
    g = None
    S = Z = scale_tab = zero_tab = None
    if spec is not None:
        if spec.is_float:
            raise ValueError("joint quantization needs an integer grid")
        if isinstance(spec.granularity, PerGroup):
            g = spec.granularity.size
            G = n_groups(C, spec.granularity)
            scale_tab = torch.ones(R, G, dtype=dt, device=dev)
            zero_tab = None if spec.symmetric else torch.zeros(R, G, dtype=dt, device=dev)
        else:
            qp = fit_weight_qparams(W, spec)  # [R, 1] or [1, 1]
            scale_tab = qp.scale.to(dt)
            zero_tab = None if qp.zero is None else qp.zero.to(dt)
            S = scale_tab[:, 0].expand(R)
            Z = None if zero_tab is None else zero_tab[:, 0].expand(R)
    col_spec = None if spec is None else replace(spec, granularity=PerChannel())

    step = blocksize
    unit = math.lcm(g or 1, nm.m if nm is not None else 1)
    step = max(unit, -(-step // unit) * unit) if unit > 1 else step

    WT = W.T.contiguous()  # [C, R]: column j of W is row j here
    del W
    KT = torch.ones(C, R, dtype=torch.bool, device=dev)  # keep-mask, transposed
    FT = None if keep is None else ~keep.to(dev).T  # forced (already pruned)
    QT = torch.empty(C, R, dtype=dt, device=dev) if spec is not None else None
    loss = torch.zeros((), dtype=dt, device=dev)

    def choose_nm(j0: int, j1: int) -> None:
        sal = _saliency(WT[j0:j1], dU[j0:j1], None if FT is None else FT[j0:j1])
        KT[j0:j1] = nm_mask(sal, nm.n, nm.m).T  # type: ignore[union-attr]

    for b0 in range(0, C, step):
        b1 = min(b0 + step, C)
        W1 = WT[b0:b1]  # a view: updated in place, finally the values kept
        D1 = torch.empty_like(W1)
        U1 = Ubar[b0:b1, b0:b1]
        if nm is None:
            k = block_prune_count(sparsity, b0, b1)
            if k:
                sal = _saliency(W1, dU[b0:b1], None if FT is None else FT[b0:b1])
                idx = torch.topk(sal, k, dim=1, largest=False).indices  # [R, k]
                blk = torch.ones(R, b1 - b0, dtype=torch.bool, device=dev)
                blk.scatter_(1, idx, False)
                KT[b0:b1] = blk.T
        for i in range(b1 - b0):
            j = b0 + i
            if g is not None and j % g == 0:
                j1 = min(j + g, C)
                # the group's updated weights, those already known pruned at zero (an
                # unstructured block's; N:M chunks are chosen later, as reached)
                cols = WT[j:j1] * KT[j:j1]
                if FT is not None:
                    cols = cols * ~FT[j:j1]
                s, z = _fit(cols, col_spec)
                scale_tab[:, j // g] = s  # type: ignore[index]
                if z is not None:
                    zero_tab[:, j // g] = z  # type: ignore[index]
                S, Z = s, z
            if nm is not None and j % nm.m == 0:
                choose_nm(j, min(j + nm.m, C))
            w = W1[i]
            kept = KT[j].to(dt)
            if FT is not None:
                kept = kept * (~FT[j]).to(dt)
            target = w * kept
            if spec is not None:
                assert S is not None and QT is not None
                if Z is None:
                    code = torch.div(target, S).round_().clamp_(spec.qmin, spec.qmax)
                    target = code * S * kept
                else:
                    code = torch.addcdiv(Z, target, S).round_().clamp_(spec.qmin, spec.qmax)
                    target = (code - Z) * S * kept
                QT[j] = code
            torch.sub(w, target, out=D1[i])
            if i + 1 < b1 - b0:
                W1[i + 1:].addr_(U1[i, i + 1:], D1[i], alpha=-1.0)
            w.copy_(target)
        loss += (D1 / dU[b0:b1, None]).square().sum() / 2
        if b1 < C:
            WT[b1:].addmm_(Ubar[b0:b1, b1:].T, D1, alpha=-1.0)

    mask = KT.T.contiguous()
    if FT is not None:
        mask &= ~FT.T
    return SparseGPTResult(w=WT.T.contiguous(), mask=mask, loss=loss, retries=used,
                           fallback=fallback, q=None if QT is None else QT.T.contiguous(),
                           scale=scale_tab, zero=zero_tab)


def _fit(cols: torch.Tensor, spec: WeightQuantSpec | None
         ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One grid per row over columns ``cols`` (``[k, d_row]``, sweep layout): scale, zero
    ``[d_row]`` (GPTQ's fit of a group reached in the sweep)."""
    assert spec is not None
    qp = fit_weight_qparams(cols.T, spec)
    return qp.scale[:, 0].to(cols.dtype), None if qp.zero is None else \
        qp.zero[:, 0].to(cols.dtype)
