"""Weight-only matmul ``y = x @ W_hat^T`` reading mixpack's bit planes directly (Triton).

One program owns a tile of ``BLOCK_M`` tokens x ``BLOCK_N`` output rows and walks ``K`` in
steps of ``BLOCK_K`` (a ``SPLIT_K`` share of it). Per weight element of the tile it finds
the group ``g = k // gw``, the group's width ``b`` (constexpr when uniform, else the bit
map), the code's stream position (analytic when uniform, else ``group_pos``), gathers the
``b`` plane words, assembles the unsigned code in registers, dequantizes in float32
(``(u - c) * scale``, ``c`` the zero point or ``2^(b-1)``: mixpack's arithmetic, the same
float32 values) and casts to the activation dtype. Accumulation is float32: ``tl.dot`` when
the token tile is at least 16 (M >= 16), else a broadcast-multiply-reduce (GEMV-style,
M < 16). Without split-K the epilogue adds the bias in float32 and stores in the
activation dtype; split-K programs add their partial sums with float32 atomics, and bias
and cast follow in torch.

Act-order (``col_perm``): the activations are permuted once per call (``x[:, col_perm]``,
stored column order), so the weight walk stays sequential. Float columns (OWQ) are not
handled by the kernel: such linears take the reference path.

On a CPU the same kernel runs under Triton's interpreter (``TRITON_INTERPRET=1`` before
triton is imported), which is how the tests check it; speed is the GPU's.
"""

from __future__ import annotations

import torch

from llmcq_kernels.layout import KernelPack

__all__ = ["available", "kernel_linear", "supports", "choose_config", "word_path"]

try:  # pragma: no cover - the body is exercised under the interpreter or on CUDA
    import triton
    import triton.language as tl

    @triton.jit
    def _mixpack_mm(X, PL, SB, SW, BITS, GPOS, SC, ZR, BIAS, Y,
                    M, N, K, GW, FULL, REM, K_PER_SPLIT,
                    sxm, sxk, s_row, s_map,
                    UNIFORM_B: tl.constexpr, MAX_B: tl.constexpr, SYM: tl.constexpr,
                    USE_DOT: tl.constexpr, IEEE: tl.constexpr, ATOMIC: tl.constexpr,
                    WORDS: tl.constexpr, HAS_BIAS: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mmask = rm < M
        nmask = rn < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        k_lo = pid_k * K_PER_SPLIT
        k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            kmask = rk < k_hi
            x = tl.load(X + rm[:, None] * sxm + rk[None, :] * sxk,
                        mask=mmask[:, None] & kmask[None, :], other=0.0)
            if WORDS:
                # every row of the tile lies in one group, its codes word-aligned and
                # contiguous in the stream: load whole words, one per plane per 32 codes
                g = k0 // GW
                gi_r = rn * s_row + g
                if UNIFORM_B > 0:
                    b_r = tl.zeros((BLOCK_N,), dtype=tl.int32) + UNIFORM_B
                    pos_r = rn * K + k0
                else:
                    b_r = tl.load(BITS + rn * s_map + g, mask=nmask, other=1).to(tl.int32)
                    pos_r = tl.load(GPOS + rn * s_map + g, mask=nmask, other=0) + (k0 - g * GW)
                base_r = tl.load(SB + b_r, mask=nmask, other=0) + (pos_r >> 5)
                stride_r = tl.load(SW + b_r, mask=nmask, other=0)
                wk = tl.arange(0, BLOCK_K // 32)
                lane = tl.arange(0, 32)
                u3 = tl.zeros((BLOCK_N, BLOCK_K // 32, 32), dtype=tl.int32)
                for p in tl.static_range(MAX_B):
                    on = nmask & (b_r > p)
                    wd = tl.load(PL + (base_r + p * stride_r)[:, None] + wk[None, :],
                                 mask=on[:, None], other=0)
                    u3 = u3 | (((wd[:, :, None] >> lane[None, None, :]) & 1) << p)
                u = tl.reshape(u3, (BLOCK_N, BLOCK_K))
                s_r = tl.load(SC + gi_r, mask=nmask, other=0.0)
                if SYM:
                    c_r = (tl.full((BLOCK_N,), 1, tl.int32) << (b_r - 1)).to(tl.float32)
                else:
                    c_r = tl.load(ZR + gi_r, mask=nmask, other=0.0)
                w_nk = ((u.to(tl.float32) - c_r[:, None]) * s_r[:, None]).to(
                    X.dtype.element_ty)
                if USE_DOT:
                    if IEEE:
                        acc += tl.dot(x.to(tl.float32), tl.trans(w_nk.to(tl.float32)),
                                      input_precision="ieee")
                    else:
                        acc += tl.dot(x, tl.trans(w_nk))
                else:
                    acc += tl.sum(x.to(tl.float32)[:, None, :]
                                  * w_nk.to(tl.float32)[None, :, :], axis=2)
            else:
                # the weight tile, transposed: [BLOCK_K, BLOCK_N]
                wmask = kmask[:, None] & nmask[None, :]
                g = rk // GW
                j = rk - g * GW
                gi = rn[None, :] * s_row + g[:, None]  # into scale / zero ([R, G], R = N or 1)
                if UNIFORM_B > 0:
                    b = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.int32) + UNIFORM_B
                    pos = tl.where(g[:, None] < FULL, rn[None, :] * (FULL * GW) + rk[:, None],
                                   N * FULL * GW + rn[None, :] * REM + j[:, None])
                else:
                    mi = rn[None, :] * s_map + g[:, None]  # into bits / group_pos ([N, G])
                    b = tl.load(BITS + mi, mask=wmask, other=1).to(tl.int32)
                    pos = tl.load(GPOS + mi, mask=wmask, other=0) + j[:, None]
                base = tl.load(SB + b, mask=wmask, other=0)
                stride = tl.load(SW + b, mask=wmask, other=0)
                word = base + (pos >> 5)
                shift = pos & 31
                u = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.int32)
                for p in tl.static_range(MAX_B):
                    bit_on = wmask & (b > p)
                    wd = tl.load(PL + word + p * stride, mask=bit_on, other=0)
                    u = u | (((wd >> shift) & 1) << p)
                s = tl.load(SC + gi, mask=wmask, other=0.0)
                if SYM:
                    c = (tl.full((BLOCK_K, BLOCK_N), 1, tl.int32) << (b - 1)).to(tl.float32)
                else:
                    c = tl.load(ZR + gi, mask=wmask, other=0.0)
                w = ((u.to(tl.float32) - c) * s).to(X.dtype.element_ty)
                if USE_DOT:
                    if IEEE:  # float32 activations, or the interpreter (see _interpreted)
                        acc += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
                    else:
                        acc += tl.dot(x, w)
                else:
                    acc += tl.sum(x.to(tl.float32)[:, :, None] * w.to(tl.float32)[None, :, :],
                                  axis=1)
        yp = Y + rm[:, None] * N + rn[None, :]
        ymask = mmask[:, None] & nmask[None, :]
        if ATOMIC:  # float32 partial sums; bias and cast follow in torch
            tl.atomic_add(yp, acc, mask=ymask)
        else:  # fused epilogue: bias in float32, one rounding to the output dtype
            if HAS_BIAS:
                acc += tl.load(BIAS + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
            tl.store(yp, acc.to(Y.dtype.element_ty), mask=ymask)

    _AVAILABLE = True
except Exception:  # noqa: BLE001 - no triton, or one that cannot build kernels here
    _AVAILABLE = False


def _interpreted() -> bool:
    """Under Triton's interpreter ``tl.dot`` on bfloat16/float16 operands returns garbage
    (triton 3.6/3.9, numpy has no bfloat16): there the operands are widened to float32
    first, which is exact (a 16-bit float times a 16-bit float is exact in float32), so the
    interpreted kernel computes what the compiled one does up to the summation order."""
    import os

    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available(x: torch.Tensor) -> bool:
    """Whether the kernel can run on ``x`` (a CUDA tensor, triton importable)."""
    return _AVAILABLE and x.is_cuda


def supports(kp: KernelPack) -> bool:
    """Whether the kernel computes this linear (float columns take the reference path)."""
    return kp.float_cols is None


def word_path(kp: KernelPack) -> bool:
    """Whether the whole-word path applies: no partial group and groups a multiple of 32
    codes (so every group starts word-aligned in its stream; 7B shapes at g128 do)."""
    return kp.rem == 0 and kp.group_width % 32 == 0


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def choose_config(m: int, n: int, k: int, *, sms: int = 132) -> dict[str, int]:
    """Tile sizes and split-K for ``M`` tokens. Starting points, not tuned: the GPU session
    tunes them (``bench/gpu/kernels_speed.py``)."""
    if m < 16:  # GEMV-style: BLOCK_M * BLOCK_K * BLOCK_N product kept near 8k
        bm = _pow2(m)
        bn = 64
        bk = max(16, 128 // bm)
        use_dot = False
    else:
        bm = 16 if m <= 16 else (32 if m <= 32 else 64)
        bn, bk = 64, 64
        use_dot = True
    tiles = -(-m // bm) * -(-n // bn)
    split = 1
    while tiles * split < sms and k // (split * 2) >= 4 * bk:
        split *= 2
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split,
            "USE_DOT": int(use_dot)}


def kernel_linear(x: torch.Tensor, kp: KernelPack, bias: torch.Tensor | None = None,
                  config: dict[str, int] | None = None) -> torch.Tensor:
    """``x @ W_hat^T + bias`` for ``x`` ``[..., in]`` through the Triton kernel."""
    if not _AVAILABLE:
        raise RuntimeError("triton is not available")
    if not supports(kp):
        raise ValueError("the kernel does not handle float columns (use the reference path)")
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if kp.col_perm is not None:  # stored column k holds model column col_perm[k]
        x2 = x2.index_select(1, kp.col_perm)
    m, k = x2.shape
    n = kp.out_features
    cfg = dict(config or choose_config(m, n, k))
    split = cfg.pop("SPLIT_K")
    use_dot = bool(cfg.pop("USE_DOT"))
    words = bool(cfg.pop("WORDS", True)) and word_path(kp)
    if words:  # a power of two >= 32 dividing the group width: one group per tile row
        while kp.group_width % cfg["BLOCK_K"]:
            cfg["BLOCK_K"] //= 2
    bk = cfg["BLOCK_K"]
    per_split = -(-k // split)  # ceil(k / split)
    k_per_split = -(-per_split // bk) * bk  # rounded up to a multiple of BLOCK_K
    split = -(-k // k_per_split)
    if split > 1:
        y = torch.zeros(m, n, dtype=torch.float32, device=x.device)
    else:
        y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (-(-m // cfg["BLOCK_M"]), -(-n // cfg["BLOCK_N"]), split)
    dummy = kp.planes
    s_row = 0 if kp.scale.shape[0] == 1 else kp.scale.shape[1]
    _mixpack_mm[grid](
        x2, kp.planes, kp.stream_base, kp.stream_words,
        kp.bits if kp.bits is not None else dummy,
        kp.group_pos if kp.group_pos is not None else dummy,
        kp.scale, kp.zero if kp.zero is not None else kp.scale,
        bias if bias is not None else kp.scale, y,
        m, n, k, kp.group_width, kp.full_groups, kp.rem, k_per_split,
        x2.stride(0), x2.stride(1), s_row, kp.n_groups,
        UNIFORM_B=kp.uniform_bits, MAX_B=kp.max_bits, SYM=kp.symmetric,
        USE_DOT=use_dot, IEEE=x.dtype == torch.float32 or _interpreted(), ATOMIC=split > 1,
        WORDS=words, HAS_BIAS=bias is not None and split == 1, **cfg)
    if split > 1:
        if bias is not None:
            y += bias.float()
        y = y.to(x.dtype)
    return y.reshape(*shape[:-1], n)
