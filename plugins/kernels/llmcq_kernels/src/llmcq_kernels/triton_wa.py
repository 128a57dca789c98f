"""WxAy matmul on int8 tensor cores (Triton): per-token activation quantization fused into
the prologue, weights unpacked from the :class:`~llmcq_kernels.wa_layout.WAPack` layout in
registers, ``tl.dot`` int8 x int8 -> int32, float32 epilogue (``wa_layout``'s module doc
gives the arithmetic).

Two launches per call:

1. ``_row_scale``: one program per token, ``s_x[m] = max(max_k |x[m, k]| / D, 1e-8)``
   (float32, IEEE division: :func:`llmcq.quant.qparams.minmax_qparams`'s value);
2. ``_wa_mm``: a program owns ``BLOCK_M`` tokens x ``BLOCK_N`` output rows and walks its
   share of the ``KS`` weight bytes per row in steps of ``BLOCK_K``; per step it loads the
   ``[BLOCK_N, BLOCK_K]`` byte tile once and, for each of the ``P`` fields of a byte, loads
   the matching bf16/fp16/fp32 ``x`` slice ``[BLOCK_M, BLOCK_K]``, quantizes it
   (``x / s_x`` with round-to-nearest division, clamp, round half to even, int8), extracts the
   field (``(byte >> i C) & mask) - 2^(C-1)``, int8) and accumulates ``tl.dot(x_q, w_q^T)``
   in int32 (``M < 16``: a broadcast-multiply-reduce in int32 instead, the same integers);
   asymmetric weights also sum ``x_q`` per token. Epilogue: ``((acc - r z_n) s_x) s_w``
   (+ bias) in float32, stored in the activation dtype; split-K programs add their float32
   partial results with atomics instead (bias and cast then follow in torch).

Compiled with ``enable_fp_fusion=False``: Triton would otherwise contract ``acc - r z`` (and
``+ bias``) into fused multiply-adds, which rounds differently from the reference (torch's
separate multiply and subtract) and, where the zero-point term cancels most of ``acc``,
by more than a unit in the last place of the result. The epilogue runs once per output.

Config ``PREQ=1`` (a tuning option, off by default): the first pass also writes the int8
codes ``[M, K]`` and the matmul loads them instead of quantizing in its prologue, which every
``N`` tile of a token tile otherwise repeats (the same codes, so the same result); whether
that pays at large ``M`` is the GPU session's measurement.

Activations of 2..8 bits all take the same int8 operands (W4A4: ``x_q`` in ``[-8, 7]``).
Rounding: ``libdevice.rint`` compiled; under Triton's interpreter (no libdevice on the CPU)
the same half-to-even rounding from ``floor`` (exact for these magnitudes).
"""

from __future__ import annotations

import torch
from llmcq.quant.qparams import SCALE_EPS, sym_divisor
from llmcq.quant.spec import ActQuantSpec

from llmcq_kernels.triton_mm import _interpreted, _pow2  # shared with the W-only kernel
from llmcq_kernels.wa_layout import WAPack

__all__ = ["available", "wa_linear", "row_scales", "choose_config"]

try:  # pragma: no cover - the bodies run under the interpreter or on CUDA
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    @triton.jit
    def _quant(x, sx, QMIN: tl.constexpr, QMAX: tl.constexpr, INTERP: tl.constexpr):
        v = tl.math.div_rn(x.to(tl.float32), sx[:, None])
        v = tl.minimum(tl.maximum(v, QMIN), QMAX)  # integer bounds: clamp, then round
        if INTERP:
            f = tl.floor(v)
            d = v - f
            odd = f - 2.0 * tl.floor(f * 0.5)
            r = tl.where(d > 0.5, f + 1.0, tl.where(d < 0.5, f, f + odd))
        else:
            r = libdevice.rint(v)
        return r.to(tl.int8)

    @triton.jit
    def _row_scale(X, SX, XQ, K, sxm, sxk, DIV: tl.constexpr, EPS: tl.constexpr,
                   QMIN: tl.constexpr, QMAX: tl.constexpr, WRITE_Q: tl.constexpr,
                   INTERP: tl.constexpr, BLOCK: tl.constexpr):
        m = tl.program_id(0)
        top = tl.zeros((BLOCK,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            rk = k0 + tl.arange(0, BLOCK)
            x = tl.load(X + m * sxm + rk * sxk, mask=rk < K, other=0.0).to(tl.float32)
            top = tl.maximum(top, tl.abs(x))
        s = tl.maximum(tl.math.div_rn(tl.max(top, axis=0), DIV), EPS)
        tl.store(SX + m, s)
        if WRITE_Q:  # the quantize as a pass of its own (PREQ): int8 codes [M, K]
            sv = tl.zeros((1,), dtype=tl.float32) + s
            for k0 in range(0, K, BLOCK):
                rk = k0 + tl.arange(0, BLOCK)
                x = tl.load(X + m * sxm + rk * sxk, mask=rk < K, other=0.0)
                q = _quant(x[None, :], sv, QMIN, QMAX, INTERP)
                tl.store(XQ + m * K + rk[None, :], q, mask=(rk < K)[None, :])

    @triton.jit
    def _wa_mm(X, W, SX, SW, ZW, BIAS, Y, M, N, K, KS, K_PER_SPLIT, sxm, sxk, swn,
               P: tl.constexpr, C: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr,
               ASYM: tl.constexpr, USE_DOT: tl.constexpr, ATOMIC: tl.constexpr,
               HAS_BIAS: tl.constexpr, INTERP: tl.constexpr, PREQ: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mmask = rm < M
        nmask = rn < N
        sx = tl.load(SX + rm, mask=mmask, other=1.0)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        rs = tl.zeros((BLOCK_M,), dtype=tl.int32)
        j_lo = pid_k * K_PER_SPLIT
        j_hi = tl.minimum(j_lo + K_PER_SPLIT, KS)
        for j0 in range(j_lo, j_hi, BLOCK_K):
            rj = j0 + tl.arange(0, BLOCK_K)
            jmask = rj < j_hi
            wb = tl.load(W + rn[:, None] * swn + rj[None, :],
                         mask=nmask[:, None] & jmask[None, :], other=0)  # [BLOCK_N, BLOCK_K]
            for i in tl.static_range(P):
                rk = i * KS + rj
                kmask = jmask & (rk < K)
                if PREQ:  # X holds the int8 codes of the separate pass
                    xq = tl.load(X + rm[:, None] * sxm + rk[None, :] * sxk,
                                 mask=mmask[:, None] & kmask[None, :], other=0)
                else:
                    x = tl.load(X + rm[:, None] * sxm + rk[None, :] * sxk,
                                mask=mmask[:, None] & kmask[None, :], other=0.0)
                    xq = _quant(x, sx, QMIN, QMAX, INTERP)
                if P == 1:
                    wq = wb
                else:
                    wq = (((wb.to(tl.int32) >> (i * C)) & ((1 << C) - 1))
                          - (1 << (C - 1))).to(tl.int8)
                if USE_DOT:
                    acc = tl.dot(xq, tl.trans(wq), acc, out_dtype=tl.int32)
                else:
                    acc += tl.sum(xq.to(tl.int32)[:, None, :] * wq.to(tl.int32)[None, :, :],
                                  axis=2)
                if ASYM:
                    rs += tl.sum(xq.to(tl.int32), axis=1)
        y = acc.to(tl.float32)
        if ASYM:
            zw = tl.load(ZW + rn, mask=nmask, other=0.0)
            y = y - rs.to(tl.float32)[:, None] * zw[None, :]
        sw = tl.load(SW + rn, mask=nmask, other=0.0)
        y = y * sx[:, None]
        y = y * sw[None, :]
        yp = Y + rm[:, None] * N + rn[None, :]
        ymask = mmask[:, None] & nmask[None, :]
        if ATOMIC:
            tl.atomic_add(yp, y, mask=ymask)
        else:
            if HAS_BIAS:
                y += tl.load(BIAS + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
            tl.store(yp, y.to(Y.dtype.element_ty), mask=ymask)

    _AVAILABLE = True
except Exception:  # noqa: BLE001 - no triton, or one that cannot build kernels here
    _AVAILABLE = False


def available(x: torch.Tensor) -> bool:
    """Whether the kernels can run on ``x`` (a CUDA tensor, triton importable)."""
    return _AVAILABLE and x.is_cuda


def choose_config(m: int, n: int, ks: int, *, sms: int = 132) -> dict[str, int]:
    """Tiles and split-K for ``M`` tokens and ``KS`` weight bytes per row. Starting points,
    not tuned (``bench/gpu/kernels_speed.py --tune`` times alternatives)."""
    if m < 16:  # int32 multiply-reduce: BLOCK_M * BLOCK_N * BLOCK_K near 8k
        bm, bn, use_dot = _pow2(m), 64, False
        bk = max(32, 128 // bm)
    else:
        bm = 16 if m <= 16 else (32 if m <= 32 else 64)
        bn, bk, use_dot = 64, 64, True
    tiles = -(-m // bm) * -(-n // bn)
    split = 1
    while tiles * split < sms and ks // (split * 2) >= 4 * bk:
        split *= 2
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split,
            "USE_DOT": int(use_dot)}


def row_scales(x2: torch.Tensor, act: ActQuantSpec, codes: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """float32 ``[M]``: the per-token scales of ``x2`` ``[M, K]`` (launch 1); with
    ``codes``, also the int8 codes ``[M, K]`` (the quantize as a pass of its own)."""
    m, k = x2.shape
    sx = torch.empty(m, dtype=torch.float32, device=x2.device)
    xq = torch.empty(m, k, dtype=torch.int8, device=x2.device) if codes else None
    half = 1 << (act.bits - 1)
    _row_scale[(m,)](x2, sx, xq if xq is not None else sx, k, x2.stride(0), x2.stride(1),
                     DIV=float(sym_divisor(act.bits, act.full_range)), EPS=SCALE_EPS,
                     QMIN=float(-half), QMAX=float(half - 1), WRITE_Q=codes,
                     INTERP=_interpreted(), BLOCK=min(1024, _pow2(k)),
                     enable_fp_fusion=False)
    return sx, xq


def wa_linear(x: torch.Tensor, wp: WAPack, act: ActQuantSpec,
              bias: torch.Tensor | None = None,
              config: dict[str, int] | None = None) -> torch.Tensor:
    """``Q_a(x) @ W_hat^T + bias`` for ``x`` ``[..., in]`` (float16, bfloat16, float32)."""
    if not _AVAILABLE:
        raise RuntimeError("triton is not available")
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    m, k = x2.shape
    n, ks = wp.out_features, wp.k_split
    cfg = dict(config or choose_config(m, n, ks))
    split = cfg.pop("SPLIT_K")
    use_dot = bool(cfg.pop("USE_DOT"))
    preq = bool(cfg.pop("PREQ", 0))
    bk = cfg["BLOCK_K"]
    per_split = -(-ks // split)
    k_per_split = -(-per_split // bk) * bk
    split = -(-ks // k_per_split)
    sx, xq = row_scales(x2, act, codes=preq)
    xin = xq if xq is not None else x2
    if split > 1:
        y = torch.zeros(m, n, dtype=torch.float32, device=x.device)
    else:
        y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (-(-m // cfg["BLOCK_M"]), -(-n // cfg["BLOCK_N"]), split)
    half = 1 << (act.bits - 1)
    _wa_mm[grid](
        xin, wp.qweight, sx, wp.scale, wp.zero if wp.zero is not None else wp.scale,
        bias if bias is not None else wp.scale, y,
        m, n, k, ks, k_per_split, xin.stride(0), xin.stride(1), wp.qweight.stride(0),
        P=wp.per_byte, C=wp.container, QMIN=float(-half), QMAX=float(half - 1),
        ASYM=wp.zero is not None, USE_DOT=use_dot, ATOMIC=split > 1,
        HAS_BIAS=bias is not None and split == 1, INTERP=_interpreted(), PREQ=preq,
        enable_fp_fusion=False, **cfg)
    if split > 1:
        if bias is not None:
            y += bias.float()
        y = y.to(x.dtype)
    return y.reshape(*shape[:-1], n)
