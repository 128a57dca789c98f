"""The inner column loop of GPTQ's lazy block as one Triton kernel (CUDA only).

Why: inside a lazy block of ``n`` columns, GPTQ quantizes one column and pushes its error
into the block's later columns, ``n`` times in sequence. Written with torch ops that is six
small kernels per column: on a 7B model about 1.1 million columns, and the launches (not the
arithmetic) set the time -- half of an end-to-end GPTQ run on an H100.

Every row of ``W`` is swept independently (its grid and its update involve only itself and
the shared ``U``), so the sweep parallelizes over rows: a program owns a tile of rows and all
``n`` columns of the block, keeps the tile in registers and runs the ``n`` steps alone:

    w = W[:, i];  q = clamp(round(w / s_i + z_i));  d = w - (q - z_i) s_i
    W[:, k] -= d * Ubar[i, k]        for k > i          (Ubar = U / diag(U), row-wise)

Layouts are the solver's transposed ones: ``WT`` is ``[n, rows]`` (block column ``i`` is row
``i``), ``S``/``Z`` likewise, ``Ubar`` is the block's ``[n, n]`` upper-triangular slice.
The kernel writes the codes ``Q`` and the residuals ``D = W - Q(W)``; the update of columns
beyond the block stays one matrix product in the solver. Results match the torch loop up to
float32 rounding order (an FMA here and there): codes can differ where a value sits on a
rounding tie.
"""

from __future__ import annotations

import torch

__all__ = ["available", "sweep_block", "MAX_COLUMNS"]

#: block columns one kernel launch takes (the tile lives in registers); longer ranges are
#: swept in pieces by :func:`sweep_block`'s caller
MAX_COLUMNS = 128

try:  # pragma: no cover - exercised on GPU machines only
    import triton
    import triton.language as tl

    @triton.jit
    def _round_half_even(x):
        # torch.round's rounding (ties to even) without libdevice, so that triton's CPU
        # interpreter runs the same code: adding 1.5 * 2^23 leaves no fraction bits and the
        # float32 add rounds to nearest even; exact for |x| < 2^22, and larger values are
        # clamped to the grid's ends anyway (the sign survives)
        return (x + 12582912.0) - 12582912.0

    @triton.jit
    def _sweep_kernel(W, U, S, Z, Q, D, n, rows, stride_w, stride_ui, stride_uk, qmin, qmax,
                      HAS_ZERO: tl.constexpr, N_POW2: tl.constexpr, BLOCK_R: tl.constexpr):
        pid = tl.program_id(0)
        r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = r < rows
        k = tl.arange(0, N_POW2)
        kmask = k < n
        tile = tl.load(W + k[:, None] * stride_w + r[None, :],
                       mask=kmask[:, None] & rmask[None, :], other=0.0)
        for i in range(n):
            w = tl.sum(tl.where((k == i)[:, None], tile, 0.0), axis=0)
            s = tl.load(S + i * stride_w + r, mask=rmask, other=1.0)
            if HAS_ZERO:
                z = tl.load(Z + i * stride_w + r, mask=rmask, other=0.0)
                q = _round_half_even(tl.div_rn(w, s) + z)
                q = tl.minimum(tl.maximum(q, qmin), qmax)
                d = w - (q - z) * s
            else:
                q = _round_half_even(tl.div_rn(w, s))
                q = tl.minimum(tl.maximum(q, qmin), qmax)
                d = w - q * s
            tl.store(Q + i * stride_w + r, q, mask=rmask)
            tl.store(D + i * stride_w + r, d, mask=rmask)
            u = tl.load(U + i * stride_ui + k * stride_uk, mask=kmask & (k > i), other=0.0)
            tile = tile - u[:, None] * d[None, :]

    _AVAILABLE = True
except Exception:  # noqa: BLE001 - no triton, or one that cannot build kernels here
    _AVAILABLE = False


def available(t: torch.Tensor) -> bool:
    """Whether the kernel can sweep ``t`` (float32 on a CUDA device, triton importable)."""
    return _AVAILABLE and t.is_cuda and t.dtype == torch.float32


#: (rows per program, warps per program): the sweep is latency-bound (n dependent steps),
#: so many small programs in flight per SM beat a few wide ones; chosen on an H100 with
#: ``bench/gpu/bench.py sweep`` (bench/results/gpu/sweep.json)
LAUNCH = (16, 4)


def sweep_block(WT: torch.Tensor, Ubar: torch.Tensor, S: torch.Tensor, Z: torch.Tensor | None,
                Q: torch.Tensor, D: torch.Tensor, qmin: int, qmax: int, *,
                launch: tuple[int, int] | None = None) -> None:
    """Sweep ``n = WT.shape[0]`` (at most :data:`MAX_COLUMNS`) columns in place.

    ``WT``, ``S``, ``Z``, ``Q``, ``D``: ``[n, rows]`` float32 with unit column stride and one
    shared row stride; ``Ubar``: ``[n, n]``, any strides. ``WT`` is read, never
    written: the caller applies the block's update to what follows it.
    """
    n, rows = WT.shape
    if n > MAX_COLUMNS:
        raise ValueError(f"sweep_block takes at most {MAX_COLUMNS} columns, got {n}")
    for t in (S, Q, D) + ((Z,) if Z is not None else ()):
        if t.shape != WT.shape or t.stride() != WT.stride():
            raise ValueError("WT, S, Z, Q and D must share shape and strides")
    if WT.stride(1) != 1:
        raise ValueError("the kernel needs a unit column stride")
    n_pow2 = max(16, triton.next_power_of_2(n))
    block_r, warps = launch or LAUNCH
    grid = (triton.cdiv(rows, block_r),)
    _sweep_kernel[grid](WT, Ubar, S, Z if Z is not None else S, Q, D, n, rows, WT.stride(0),
                        Ubar.stride(0), Ubar.stride(1), float(qmin), float(qmax),
                        HAS_ZERO=Z is not None, N_POW2=n_pow2, BLOCK_R=block_r,
                        num_warps=warps)
