"""GPTQ's maths: Frantar et al. 2022 (arXiv:2210.17323), Algorithm 1, and OWQ's weak columns
(Lee et al. 2023, arXiv:2306.02272, Eq. 5). Tensors in, tensors out; no modules.

Notation of the paper. A linear layer ``W`` (``[d_row, d_col]``) sees inputs ``X``; the
layer-wise objective ``||W X - Q X||^2`` has the Hessian ``H = 2 X X^T / n`` (``[d_col,
d_col]``). Columns are quantized one at a time in a fixed order ``F``. With ``H^-1 = U^T U``
(``U`` the upper Cholesky factor of the inverse, restricted to the columns not yet
quantized, row ``j`` of ``U`` is what the OBS update needs), quantizing column ``j`` gives

    E_j = (W_:j - Q_:j) / U_jj,        W_:k <- W_:k - E_j U_jk    for every later k,

and the layer error grows by ``E_j^2 / 2`` (Eq. 2-3). Lazy batches (Section 3, Step 2): the
update of columns beyond the current block of ``B`` columns is applied once per block as one
matrix product ``W_:,>B <- W_:,>B - E_B U_B,>B``.

Damping (Step 3): ``H + lambda I`` with ``lambda = percdamp * mean(diag H)``. When the
Cholesky factorization still fails, it is retried with 10x the damping, a bounded number of
times; after that the layer is quantized with ``U = I`` (round-to-nearest, never NaN).

Dead inputs (``H_jj = 0``: the column never sees a non-zero input) get ``H_jj = 1`` and
``W_:j = 0``, as in the reference code.

Grids are llmcq's (:mod:`llmcq.quant.qparams`): a group's scale/zero are fitted when the
sweep reaches its first column, on the weights as updated so far (min-max or the ``mse``
clip search). ``static_groups`` fits every group on the original weights instead; with
act-order and no static groups, groups are consecutive columns *of the sweep order* and the
result carries ``g_idx``. Lazy blocks are cut at group boundaries so that a group's grid is
always fitted on fully updated weights (the reference code reads stale columns when the
group size is smaller than the block size).

Mixed precision (SliM-LLM, Huang et al. 2024): ``group_bits`` gives every group (per row) its
own width; each column is then rounded and clamped on its group's grid and the OBS update is
unchanged. ``fit_group`` replaces the grid fit of a group reached in the sweep (SliM-LLM's
salience-weighted calibration); it receives the group's updated columns, the rows' widths and
the ``U_jj`` of those columns. Neither is supported by the Triton kernel (the torch loop runs).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from llmcq.quant.qparams import fake_quantize_weight, fit_weight_qparams, n_groups
from llmcq.quant.spec import PerChannel, PerGroup, PerTensor, WeightQuantSpec

from llmcq_gptq import triton_sweep

__all__ = ["accumulate_hessian", "inverse_cholesky", "owq_weak_columns", "owq_count",
           "gptq_quantize", "GPTQResult", "GroupFit", "code_bounds"]

#: a group's grid fit in the sweep: ``fit(w [d_row, k] the group's columns as updated so far,
#: bits [d_row] (long), d [k] the U_jj of those columns) -> (scale [d_row], zero [d_row] or
#: None)``; the zero may be fractional
GroupFit = Callable[[torch.Tensor, torch.Tensor, torch.Tensor],
                    tuple[torch.Tensor, "torch.Tensor | None"]]


@torch.no_grad()
def accumulate_hessian(H: torch.Tensor, n: int, x: torch.Tensor, *, chunks: int = 1) -> int:
    """Fold a batch of inputs ``x`` (``[..., d_col]``) into the running mean ``H = 2/n sum
    x x^T`` over rows, in place; returns the new row count. One matrix product per chunk
    (``addmm_`` into the float32 buffer; 16-bit CUDA inputs use a float32-output product)."""
    x = x.reshape(-1, x.shape[-1])
    t = int(x.shape[0])
    if t == 0:
        return n
    total = n + t
    beta, alpha = n / total, 2.0 / total
    for part in (x.chunk(chunks, dim=0) if chunks > 1 else (x,)):
        if part.is_cuda and part.dtype in (torch.float16, torch.bfloat16):
            # 16-bit activations: tensor-core product with float32 accumulation and output
            # (as exact as upcasting first, at 16-bit speed); plain path if unsupported
            try:
                prod = torch.mm(part.T, part, out_dtype=H.dtype)
            except (RuntimeError, TypeError, NotImplementedError):
                prod = None
            if prod is not None:
                H.mul_(beta).add_(prod, alpha=alpha)
                beta = 1.0
                continue
        part = part.to(H.dtype)
        H.addmm_(part.T, part, beta=beta, alpha=alpha)
        beta = 1.0
    return total


@torch.no_grad()
def inverse_cholesky(H: torch.Tensor, percdamp: float, retries: int
                     ) -> tuple[torch.Tensor | None, int]:
    """``U`` with ``U^T U = (H + lambda I)^-1``, upper triangular, and the number of retries.

    ``lambda = percdamp * mean(diag H)``; each retry multiplies it by 10 (starting from
    ``max(percdamp, 1e-3)`` so that ``percdamp: 0`` can still recover). ``None`` when every
    attempt failed. Two host synchronizations per attempt (never per column).
    """
    mean_diag = H.diagonal().mean()
    for attempt in range(retries + 1):
        frac = percdamp if attempt == 0 else max(percdamp, 1e-3) * 10.0**attempt
        # at most two d_col x d_col temporaries alive at a time (70B's down_proj: 3.3 GB each)
        L = H.clone()
        L.diagonal().add_(frac * mean_diag)
        L, info = torch.linalg.cholesky_ex(L)
        if bool(info != 0):
            del L
            continue
        try:
            Hinv = torch.cholesky_inverse(L)
        except RuntimeError:  # a zero pivot (CPU raises; CUDA returns inf, caught below)
            continue
        finally:
            del L
        U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
        del Hinv
        if not bool((info != 0) | ~torch.isfinite(U).all()):
            return U, attempt
        del U
    return None, retries


@torch.no_grad()
def owq_weak_columns(W: torch.Tensor, H: torch.Tensor, spec: WeightQuantSpec, n_out: int, *,
                     metric: str = "sensitivity") -> torch.Tensor:
    """Indices of the ``n_out`` weakest input columns (OWQ Eq. 5), most sensitive first.

    ``sensitivity_j = H_jj * ||W_:j - RTN(W)_:j||^2`` (the paper, on the run's grid);
    ``metric="hessian"`` ranks by ``H_jj`` alone (llmc).
    """
    score = H.diagonal().float().clone()
    if metric == "sensitivity":
        Wf = W.float()
        err = (Wf - fake_quantize_weight(Wf, spec)).square().sum(dim=0)
        score = score * err
    elif metric != "hessian":
        raise ValueError(f"metric {metric!r}: allowed sensitivity, hessian")
    return torch.topk(score, n_out, sorted=True).indices


@dataclass
class GPTQResult:
    """Codes and grid of one quantized weight, in the original column order.

    ``q``: integer codes ``[d_row, d_col]`` (float dtype); ``scale``/``zero``: ``[d_row, G]``
    (``[1, 1]`` per tensor; ``zero`` None if symmetric); ``g_idx``: group of every column
    (int32) or None when it is ``j // group_size``; ``float_columns``: ``(indices, values
    [d_row, k])`` kept in float (OWQ); ``loss``: ``sum E^2 / 2`` (0-dim, on the device);
    ``retries``: Cholesky retries; ``fallback``: every factorization failed, round-to-nearest
    was used; ``w_hat``: the dequantized weight the sweep used (only if asked).
    """

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    g_idx: torch.Tensor | None
    float_columns: tuple[torch.Tensor, torch.Tensor] | None
    loss: torch.Tensor
    retries: int
    fallback: bool
    w_hat: torch.Tensor | None = None


def _fit_columns(Wcols: torch.Tensor, spec: WeightQuantSpec
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One grid per row over the given columns (``[d_row, k]``) -> scale, zero ``[d_row]``."""
    qp = fit_weight_qparams(Wcols, spec)
    return qp.scale[:, 0], None if qp.zero is None else qp.zero[:, 0]


def code_bounds(bits: torch.Tensor, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lo, hi)`` integer code range of grids of the given widths (llmcq's conventions:
    signed ``[-2^(b-1), 2^(b-1)-1]`` when symmetric, unsigned ``[0, 2^b-1]`` otherwise)."""
    one = torch.ones_like(bits)
    if symmetric:
        return -(one << (bits - 1)), (one << (bits - 1)) - 1
    return torch.zeros_like(bits), (one << bits) - 1


def _fit_columns_bits(Wcols: torch.Tensor, spec: WeightQuantSpec, bits: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`_fit_columns` with a width per row (``bits [d_row]``): one fit per width."""
    scale = zero = None
    for b in torch.unique(bits).tolist():
        s, z = _fit_columns(Wcols, replace(spec, bits=int(b)))
        rows = (bits == b).to(s.device)
        scale = s if scale is None else torch.where(rows, s, scale)
        if z is not None:
            zero = z if zero is None else torch.where(rows, z, zero)
    assert scale is not None
    return scale, zero


def _quantize_column(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, q: torch.Tensor,
                     d: torch.Tensor, qmin: int | torch.Tensor, qmax: int | torch.Tensor,
                     keep: torch.Tensor | None = None) -> None:
    """Codes of one column into ``q`` and ``w - Q(w)`` into ``d`` (llmcq's grid formulas).
    ``keep``: the column's pruning mask; a pruned weight's target is exactly 0, so its whole
    (updated) value is the error passed on to the columns after it (SparseGPT's joint
    pruning and quantization)."""
    if z is None:
        torch.div(w, s, out=q)
        q.round_().clamp_(qmin, qmax)
        torch.mul(q, s, out=d)
    else:
        torch.addcdiv(z, w, s, out=q)
        q.round_().clamp_(qmin, qmax)
        torch.sub(q, z, out=d).mul_(s)
    if keep is not None:
        d.mul_(keep)
    torch.sub(w, d, out=d)


@torch.no_grad()
def gptq_quantize(W: torch.Tensor, H: torch.Tensor, spec: WeightQuantSpec, *,
                  blocksize: int = 128, percdamp: float = 0.01, actorder: bool = False,
                  static_groups: bool = False, weak: torch.Tensor | None = None,
                  float_dtype: torch.dtype | None = None, retries: int = 4,
                  return_dequant: bool = False, fused: bool | None = None,
                  kernel: bool | None = None, mask: torch.Tensor | None = None,
                  group_bits: torch.Tensor | None = None,
                  fit_group: GroupFit | None = None) -> GPTQResult:
    """Quantize ``W`` (``[d_row, d_col]``) column by column, compensating with ``H``.

    ``mask`` (bool ``[d_row, d_col]``, True = kept): weights an earlier sparse step pruned
    stay exactly zero; their error (the whole updated value) is compensated by the columns
    swept after them, and grids are fitted with them at zero. The Triton kernel does not
    take a mask: masked sweeps use the torch loop.

    ``weak``: OWQ columns kept in float; they are swept last, so they absorb the error of
    every quantized column, and are returned in ``float_columns`` (cast to ``float_dtype``).
    The computation runs in float32 (float64 if ``W`` is float64) on ``W``'s device.
    ``fused=True`` quantizes each column with torch's fake-quantization kernel instead of
    four elementwise ones (same values; float32 and integral zero points only), which
    synchronizes with the host on every column; the default (``None``) uses the elementwise
    kernels (no host sync in the column loop) and, on GPUs, updates the whole lazy block per
    column instead of slicing it: fewer kernel launches, which is what bounds the column loop
    on a GPU. ``kernel``: sweep each lazy block with the Triton kernel of
    :mod:`llmcq_gptq.triton_sweep` (one launch per block instead of six per column); the
    default (``None``) uses it whenever it can (float32 on CUDA with triton installed),
    ``False`` never, ``True`` insists.

    ``group_bits`` (int ``[d_row, G]``, per-group granularity, integer grids, no weak
    columns): the width of every group's grid (groups of the sweep order with act-order and
    no static groups); ``None`` is ``spec.bits`` everywhere. ``fit_group`` (:data:`GroupFit`)
    fits each group's grid instead of ``spec``'s min-max / mse fit: on the updated columns
    when the sweep reaches the group, or with ``static_groups`` on the original columns
    before the sweep (with the ``U_jj`` of their sweep positions). With either, the torch
    loop runs.
    """
    dt = torch.float64 if W.dtype == torch.float64 else torch.float32
    dev = W.device
    R, C = W.shape
    gran = spec.granularity
    if group_bits is not None or fit_group is not None:
        if not isinstance(gran, PerGroup) or spec.is_float:
            raise ValueError("group_bits / fit_group need per-group integer grids")
        if weak is not None and weak.numel():
            raise ValueError("group_bits / fit_group do not combine with weak (OWQ) columns")
        if group_bits is not None and tuple(group_bits.shape) != (R, n_groups(C, gran)):
            raise ValueError(f"group_bits must be [{R}, {n_groups(C, gran)}], got "
                             f"{tuple(group_bits.shape)}")
    W = W.to(dt).clone()
    H = H.to(device=dev, dtype=dt)  # the caller's H is only read (no d_col^2 copy)
    diag0 = H.diagonal().clone()

    dead = diag0 == 0
    if bool(dead.any()):
        H = H.clone()
        H.diagonal()[dead] = 1.0
        W[:, dead] = 0.0

    # ---- sweep order F: the quantized columns (act-order or natural), then the weak ones
    cols = torch.arange(C, device=dev)
    if weak is not None and weak.numel():
        weak = weak.to(dev).long()
        keep_mask = torch.ones(C, dtype=torch.bool, device=dev)
        keep_mask[weak] = False
        keep = cols[keep_mask]
    else:
        weak = cols[:0]
        keep_mask = None
        keep = cols
    if actorder:
        keep = keep[torch.argsort(diag0[keep], descending=True, stable=True)]
    perm = torch.cat([keep, weak])
    n_q, k = int(keep.numel()), int(weak.numel())
    if n_q == 0:
        raise ValueError("every column is a float column; nothing to quantize")

    # ---- groups: which columns share a grid, and when each grid is fitted
    col_spec = replace(spec, granularity=PerChannel())
    dynamic = isinstance(gran, PerGroup) and not static_groups
    if isinstance(gran, PerGroup):
        g = gran.size
        G = n_groups(C, gran)
    else:
        g, G = C, 1
    runs: list[tuple[int, int, int]] = []  # (start, end, group) in sweep positions
    if isinstance(gran, PerTensor):
        qp = fit_weight_qparams(W if keep_mask is None else W[:, keep_mask], spec)
        scale_tab, zero_tab = qp.scale, qp.zero  # [1, 1]
        group_of = torch.zeros(C, dtype=torch.long, device=dev)
    elif not isinstance(gran, PerGroup):
        s, z = _fit_columns(W if keep_mask is None else W[:, keep_mask], col_spec)
        scale_tab, zero_tab = s[:, None], None if z is None else z[:, None]
        group_of = torch.zeros(C, dtype=torch.long, device=dev)
    else:
        scale_tab = torch.ones(R, G, dtype=dt, device=dev)
        zero_tab = None if spec.symmetric else torch.zeros(R, G, dtype=dt, device=dev)
        group_of = cols // g
        if not dynamic:  # static groups, on the original column order
            if fit_group is not None:
                pass  # fitted once the sweep's U_jj are known (below)
            elif keep_mask is None and group_bits is not None:
                for b in torch.unique(group_bits).tolist():
                    qp = fit_weight_qparams(W, replace(spec, bits=int(b)))
                    sel = (group_bits == b).to(dev)
                    scale_tab = torch.where(sel, qp.scale.to(dt), scale_tab)
                    if zero_tab is not None:
                        zero_tab = torch.where(sel, qp.zero.to(dt), zero_tab)
            elif keep_mask is None:
                qp = fit_weight_qparams(W, spec)
                scale_tab = qp.scale.to(dt)
                zero_tab = None if qp.zero is None else qp.zero.to(dt)
            else:
                kept = keep_mask.tolist()
                for gi in range(G):
                    members = [j for j in range(gi * g, min(C, (gi + 1) * g)) if kept[j]]
                    if members:
                        s, z = _fit_columns(W[:, members], col_spec)
                        scale_tab[:, gi] = s
                        if z is not None:
                            zero_tab[:, gi] = z  # type: ignore[index]
        elif actorder:  # groups of consecutive sweep positions
            group_of = torch.empty(C, dtype=torch.long, device=dev)
            group_of[keep] = torch.arange(n_q, device=dev) // g
            if k:
                group_of[weak] = (n_q - 1) // g
            runs = [(p, min(p + g, n_q), p // g) for p in range(0, n_q, g)]
        else:  # natural order: group gi is its kept columns, contiguous in the sweep
            if k:
                counts = torch.bincount(keep // g, minlength=G).tolist()
            else:
                counts = [min(g, C - gi * g) for gi in range(G)]
            p = 0
            for gi, cnt in enumerate(counts):
                if cnt:
                    runs.append((p, p + cnt, gi))
                    p += cnt

    # ---- per-sweep-column grids S, Z ([n_q, d_row]: the grid of every weight)
    if dynamic:
        S = torch.ones(n_q, R, dtype=dt, device=dev)
        Z = None if spec.symmetric else torch.zeros(n_q, R, dtype=dt, device=dev)
    elif fit_group is None:
        gsel = group_of[keep]
        S = scale_tab.to(dt)[:, gsel].T.expand(n_q, R).contiguous()
        Z = None if zero_tab is None else zero_tab.to(dt)[:, gsel].T.expand(n_q, R).contiguous()

    # ---- mixed widths: the code range of every weight ([n_q, d_row], like S)
    bits_rows = QLO = QHI = None
    if group_bits is not None:
        bits_rows = group_bits.to(device=dev, dtype=torch.long)
        lo, hi = code_bounds(bits_rows[:, group_of[keep]].T, spec.symmetric)
        QLO, QHI = lo.to(dt).contiguous(), hi.to(dt).contiguous()

    # ---- lazy blocks, cut at group boundaries when grids are fitted during the sweep
    blocks: list[tuple[int, int, dict[int, tuple[int, int]]]] = []
    if dynamic:
        cur: list[tuple[int, int, int]] = []
        for run in runs:
            if cur and run[1] - cur[0][0] > blocksize:
                blocks.append((cur[0][0], cur[-1][1], {r[0] - cur[0][0]: (r[1] - r[0], r[2])
                                                        for r in cur}))
                cur = []
            cur.append(run)
        if cur:
            blocks.append((cur[0][0], cur[-1][1], {r[0] - cur[0][0]: (r[1] - r[0], r[2])
                                                    for r in cur}))
    else:
        blocks = [(b0, min(b0 + blocksize, n_q), {}) for b0 in range(0, n_q, blocksize)]

    # ---- H^-1 = U^T U on the sweep order; U / diag(U) row-wise folds 1/U_jj into the update
    Hp = H[perm]
    del H
    Hp = Hp[:, perm]
    U, used = inverse_cholesky(Hp, percdamp, retries)
    del Hp
    fallback = U is None
    if U is None:
        U = torch.eye(C, dtype=dt, device=dev)
    dU = U.diagonal().clone()
    Ubar = U.div_(dU[:, None])  # in place: U itself is not needed any more
    del U
    if fit_group is not None and not dynamic:  # static groups through fit_group
        pos = torch.empty(C, dtype=torch.long, device=dev)
        pos[perm] = torch.arange(C, device=dev)  # sweep position of every column
        for gi in range(G):
            cols = slice(gi * g, min(C, (gi + 1) * g))
            rows_b = bits_rows[:, gi] if bits_rows is not None else torch.full(
                (R,), spec.bits, dtype=torch.long, device=dev)
            Wg = W[:, cols] if mask is None else W[:, cols] * mask[:, cols].to(dev, dt)
            s_new, z_new = fit_group(Wg, rows_b, dU[pos[cols]])
            if (z_new is None) != (zero_tab is None):
                raise ValueError("fit_group must return a zero point exactly when the grid "
                                 "is asymmetric")
            scale_tab[:, gi] = s_new.to(dt)
            if z_new is not None:
                zero_tab[:, gi] = z_new.to(dt)  # type: ignore[index]
        gsel = group_of[keep]
        S = scale_tab[:, gsel].T.contiguous()
        Z = None if zero_tab is None else zero_tab[:, gsel].T.contiguous()

    WT = W.T[perm].contiguous()  # [d_col, d_row]: column j of W is row j here
    del W
    KT = None if mask is None else mask.to(dev).T[perm].to(dt).contiguous()  # 1 = kept
    Qc = torch.empty(n_q, R, dtype=dt, device=dev)
    loss = torch.zeros((), dtype=dt, device=dev)
    gpu_style = dev.type != "cpu" if fused is None else fused
    # torch's per-channel fake-quantization checks its zero points on the host (a device
    # sync per column, measured at ~67 us a column on an H100): only when asked for
    fused = bool(fused) and dt == torch.float32 and (spec.symmetric or spec.round_zp) \
        and QLO is None
    zero_row = torch.zeros(R, dtype=dt, device=dev) if Z is None else None
    qlo, qhi = spec.qmin, spec.qmax

    use_kernel = kernel is not False and not fused and KT is None and QLO is None and \
        fit_group is None and triton_sweep.available(WT)
    if kernel is True and not use_kernel:
        raise RuntimeError("kernel=True needs triton, a float32 CUDA weight, fused off, "
                           "no mask, no group_bits and no fit_group")

    def fit_sweep_group(W1: torch.Tensor, b0: int, i: int, length: int, gi: int) -> None:
        """A group begins at block column ``i``: fit its grid on the updated weights."""
        cols_w = W1[i:i + length]
        if KT is not None:
            cols_w = cols_w * KT[b0 + i:b0 + i + length]
        if fit_group is not None:
            rows_b = bits_rows[:, gi] if bits_rows is not None else torch.full(
                (R,), spec.bits, dtype=torch.long, device=dev)
            s_new, z_new = fit_group(cols_w.T, rows_b, dU[b0 + i:b0 + i + length])
            s_new = s_new.to(dt)
            z_new = None if z_new is None else z_new.to(dt)
            if (z_new is None) != (Z is None):
                raise ValueError("fit_group must return a zero point exactly when the grid "
                                 "is asymmetric")
        elif bits_rows is not None:
            s_new, z_new = _fit_columns_bits(cols_w.T, col_spec, bits_rows[:, gi])
        else:
            s_new, z_new = _fit_columns(cols_w.T, col_spec)
        S[b0 + i:b0 + i + length] = s_new
        scale_tab[:, gi] = s_new
        if z_new is not None:
            Z[b0 + i:b0 + i + length] = z_new  # type: ignore[index]
            zero_tab[:, gi] = z_new  # type: ignore[index]

    for b0, b1, starts in blocks:
        n = b1 - b0
        W1 = WT[b0:b1]             # a view: updated in place
        D1 = torch.empty_like(W1)  # W_:j - Q_:j of each column of the block
        U1 = Ubar[b0:b1, b0:b1]
        if use_kernel:
            # the whole sweep of a piece in one launch; pieces end where a grid must be
            # fitted on updated weights, and the columns after a piece get its update as
            # one matrix product (lazy batching within the block)
            cuts = sorted({0, n, *starts, *range(0, n, triton_sweep.MAX_COLUMNS)})
            for p0, p1 in itertools.pairwise(cuts):
                if p0 in starts:
                    fit_sweep_group(W1, b0, p0, *starts[p0])
                triton_sweep.sweep_block(
                    W1[p0:p1], U1[p0:p1, p0:p1], S[b0 + p0:b0 + p1],
                    None if Z is None else Z[b0 + p0:b0 + p1], Qc[b0 + p0:b0 + p1],
                    D1[p0:p1], qlo, qhi)
                if p1 < n:
                    W1[p1:].addmm_(U1[p0:p1, p1:].T, D1[p0:p1], alpha=-1.0)
            if b1 < C:
                WT[b1:].addmm_(Ubar[b0:b1, b1:].T, D1, alpha=-1.0)
            loss += (D1 / dU[b0:b1, None]).square().sum() / 2
            continue
        rows_w, rows_d = W1.unbind(0), D1.unbind(0)
        rows_s = S[b0:b1].unbind(0)
        rows_z = Z[b0:b1].unbind(0) if Z is not None else None
        rows_k = KT[b0:b1].unbind(0) if KT is not None else None
        rows_lo = QLO[b0:b1].unbind(0) if QLO is not None else None
        rows_hi = QHI[b0:b1].unbind(0) if QHI is not None else None
        # on a GPU, one update of the whole block with a strictly upper row of U (zeros up to
        # the diagonal) costs fewer launches than slicing; on a CPU slicing costs less work
        rows_u = U1.triu(1).unbind(0) if gpu_style else None
        deq: list[torch.Tensor] = []
        for i in range(n):
            if i in starts:
                fit_sweep_group(W1, b0, i, *starts[i])
            w, d = rows_w[i], rows_d[i]
            if fused:  # Q_:j in one kernel: (clamp(round(w / s + z)) - z) * s
                q = torch.fake_quantize_per_channel_affine(
                    w, rows_s[i], zero_row if rows_z is None else rows_z[i], 0, qlo, qhi)
                deq.append(q)
                torch.sub(w, q if rows_k is None else q * rows_k[i], out=d)
            else:
                _quantize_column(w, rows_s[i], None if rows_z is None else rows_z[i],
                                 Qc[b0 + i], d, qlo if rows_lo is None else rows_lo[i],
                                 qhi if rows_hi is None else rows_hi[i],
                                 None if rows_k is None else rows_k[i])
            if rows_u is not None:
                W1.addr_(rows_u[i], d, alpha=-1.0)
            elif i + 1 < n:
                W1[i + 1:].addr_(U1[i, i + 1:], d, alpha=-1.0)
        if fused:  # the codes behind the dequantized values, recovered in bulk
            t = torch.stack(deq) / S[b0:b1]
            if Z is not None:
                t += Z[b0:b1]
            torch.clamp(t.round_(), qlo, qhi, out=Qc[b0:b1])
        if b1 < C:
            WT[b1:].addmm_(Ubar[b0:b1, b1:].T, D1, alpha=-1.0)
        loss += (D1 / dU[b0:b1, None]).square().sum() / 2

    # ---- back to the original column order
    q_full = torch.empty(R, C, dtype=dt, device=dev)
    q_full[:, keep] = Qc.T
    float_columns = None
    w_hat = None
    if return_dequant:
        deq = Qc * S if Z is None else (Qc - Z) * S
        if KT is not None:
            deq = deq * KT[:n_q]
        w_hat = torch.empty(R, C, dtype=dt, device=dev)
        w_hat[:, keep] = deq.T
    if k:
        values = WT[n_q:].T
        if KT is not None:
            values = values * KT[n_q:].T
        if float_dtype is not None:
            values = values.to(float_dtype)
        s_w = scale_tab[:, group_of[weak]]
        t = values.to(dt) / s_w
        if zero_tab is not None:
            t = t + zero_tab[:, group_of[weak]]
        q_full[:, weak] = t.round().clamp(qlo, qhi)
        float_columns = (weak.clone(), values.contiguous())
        if w_hat is not None:
            w_hat[:, weak] = values.to(dt)
    g_idx = None
    if dynamic and actorder:
        g_idx = group_of.to(torch.int32)
    return GPTQResult(q=q_full, scale=scale_tab, zero=zero_tab, g_idx=g_idx,
                      float_columns=float_columns, loss=loss, retries=used, fallback=fallback,
                      w_hat=w_hat)


def owq_count(in_features: int, ratio: float) -> int:
    """Float columns for ``ratio`` of ``in_features`` (at least one quantized column left)."""
    return max(0, min(in_features - 1, int(math.floor(ratio * in_features + 0.5))))
