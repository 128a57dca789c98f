"""gptq_quantize with a width per group (``group_bits``) and a custom group fit (``fit_group``),
the sweep SliM-LLM runs: the default path is unchanged, mixed widths match brute force."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from llmcq.quant.qparams import (
    QParams,
    dequantize_grouped,
    fake_quantize_weight,
    fit_weight_qparams,
    quantize_grouped,
)
from llmcq.quant.record import make_record
from llmcq.quant.spec import PerChannel, PerGroup, WeightQuantSpec
from llmcq_gptq.solver import code_bounds, gptq_quantize, inverse_cholesky

SPECS = {
    "g4_asym": WeightQuantSpec(bits=3, symmetric=False, granularity=PerGroup(4)),
    "g5_sym_partial": WeightQuantSpec(bits=3, symmetric=True, granularity=PerGroup(5)),
    "g4_mse": WeightQuantSpec(bits=2, symmetric=False, granularity=PerGroup(4),
                              calib_algo="mse"),
}


def problem(seed: int, rows: int = 6, cols: int = 13, dtype: torch.dtype = torch.float64
            ) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g, dtype=dtype) / cols**0.5 + torch.eye(cols,
                                                                                  dtype=dtype)
    x = torch.randn(96, cols, generator=g, dtype=dtype) @ mix
    W = torch.randn(rows, cols, generator=g, dtype=dtype)
    return W, 2.0 * x.T @ x / x.shape[0]


def mixed_bits(rows: int, groups: int, seed: int, lo: int = 1, hi: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi + 1, (rows, groups), generator=g)


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize(("actorder", "static_groups"), [(False, False), (True, False),
                                                         (True, True), (False, True)])
def test_uniform_group_bits_are_the_default_path_bit_for_bit(name: str, actorder: bool,
                                                              static_groups: bool) -> None:
    spec = SPECS[name]
    for dtype in (torch.float32, torch.float64):
        W, H = problem(1, dtype=dtype)
        G = -(-W.shape[1] // spec.granularity.size)
        for blocksize in (3, 128):
            kw = dict(blocksize=blocksize, actorder=actorder, static_groups=static_groups,
                      return_dequant=True)
            ref = gptq_quantize(W, H, spec, **kw)
            got = gptq_quantize(W, H, spec, group_bits=torch.full((6, G), spec.bits), **kw)
            for field in ("q", "scale", "zero", "g_idx", "w_hat", "loss"):
                a, b = getattr(ref, field), getattr(got, field)
                assert (a is None) == (b is None), field
                if a is not None:
                    assert torch.equal(a, b), field


def naive_mixed_gptq(W: torch.Tensor, H: torch.Tensor, spec: WeightQuantSpec,
                     bits: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Optimal Brain Quantization in the natural order with the full inverse Hessian and
    Gaussian elimination (GPTQ Eq. 2-4); each group's grid is fitted, at each row's own width,
    on the weights as updated when the sweep reaches it. Returns the dequantized weight."""
    W, H = W.double().clone(), H.double().clone()
    R, C = W.shape
    g = spec.granularity.size
    H.diagonal().add_(percdamp * H.diagonal().mean())
    Hinv = torch.linalg.inv(H)
    out = torch.zeros_like(W)
    for j in range(C):
        gi = j // g
        if j % g == 0:
            cols = W[:, j:min(C, j + g)]
            fits = {b: fit_weight_qparams(cols, replace(spec, bits=b,
                                                        granularity=PerChannel()))
                    for b in torch.unique(bits[:, gi]).tolist()}
        for r in range(R):
            b = int(bits[r, gi])
            qp = fits[b]
            s = qp.scale[r:r + 1].double()
            z = None if qp.zero is None else qp.zero[r:r + 1].double()
            q = quantize_grouped(W[r:r + 1, j:j + 1], s, z, b, spec.symmetric)
            out[r, j] = dequantize_grouped(q, s, z)[0, 0]
        err = (W[:, j] - out[:, j]) / Hinv[j, j]
        W[:, j + 1:] -= torch.outer(err, Hinv[j, j + 1:])
        Hinv = Hinv - torch.outer(Hinv[:, j], Hinv[j, :]) / Hinv[j, j]
    return out


@pytest.mark.parametrize("name", list(SPECS))
def test_mixed_widths_match_brute_force_obq(name: str) -> None:
    spec = SPECS[name]
    W, H = problem(3)
    G = -(-W.shape[1] // spec.granularity.size)
    lo = 2 if spec.symmetric else 1  # a symmetric 1-bit grid has no positive code
    bits = mixed_bits(6, G, seed=4, lo=lo, hi=5)
    ref = naive_mixed_gptq(W, H, spec, bits, percdamp=0.01)
    for blocksize in (1, 3, 128):
        res = gptq_quantize(W, H, spec, blocksize=blocksize, percdamp=0.01, group_bits=bits,
                            return_dequant=True)
        torch.testing.assert_close(res.w_hat, ref, rtol=0, atol=1e-9)
        rec = make_record(res.q, QParams(res.scale, res.zero), spec, group_bits=bits)
        assert rec.problems() == [] and rec.features() == ["group_bits"]
        torch.testing.assert_close(rec.dequantize(torch.float64), res.w_hat, rtol=0,
                                   atol=1e-6)


def test_identity_hessian_rounds_each_group_at_its_width() -> None:
    spec = WeightQuantSpec(bits=3, symmetric=False, granularity=PerGroup(4))
    W = torch.randn(7, 16, generator=torch.Generator().manual_seed(5))
    bits = torch.tensor([2, 4, 3, 1]).expand(7, 4)
    res = gptq_quantize(W, torch.eye(16), spec, blocksize=5, percdamp=0.0, group_bits=bits,
                        return_dequant=True)
    for gi, b in enumerate((2, 4, 3, 1)):
        cols = slice(4 * gi, 4 * gi + 4)
        torch.testing.assert_close(res.w_hat[:, cols],
                                   fake_quantize_weight(W[:, cols], replace(spec, bits=b)),
                                   rtol=0, atol=1e-6)
        lo, hi = code_bounds(torch.tensor(b), False)
        assert int(res.q[:, cols].min()) >= int(lo) and int(res.q[:, cols].max()) <= int(hi)
    assert int(res.q[:, 12:].max()) == 1  # the 1-bit group uses both of its codes


def test_fit_group_sees_updated_columns_widths_and_u_diagonal() -> None:
    spec = WeightQuantSpec(bits=3, symmetric=False, granularity=PerGroup(4))
    W, H = problem(6, cols=12)
    bits = torch.tensor([3, 2, 4]).expand(6, 3)
    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    col_spec = replace(spec, granularity=PerChannel())

    def minmax(w: torch.Tensor, b: torch.Tensor, d: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        seen.append((w.clone(), b.clone(), d.clone()))
        qp = fit_weight_qparams(w, replace(col_spec, bits=int(b[0])))
        return qp.scale[:, 0], qp.zero[:, 0]

    ref = gptq_quantize(W, H, spec, blocksize=5, group_bits=bits, return_dequant=True)
    got = gptq_quantize(W, H, spec, blocksize=5, group_bits=bits, fit_group=minmax,
                        return_dequant=True)
    assert torch.equal(ref.w_hat, got.w_hat) and torch.equal(ref.scale, got.scale)
    U, _ = inverse_cholesky(H, 0.01, 0)
    assert [tuple(w.shape) for w, _, _ in seen] == [(6, 4)] * 3
    assert [int(b[0]) for _, b, _ in seen] == [3, 2, 4]
    for gi, (_, _, d) in enumerate(seen):
        torch.testing.assert_close(d, U.diagonal()[4 * gi:4 * gi + 4])
    assert torch.equal(seen[0][0], W[:, :4])           # the first group: original weights
    assert not torch.allclose(seen[1][0], W[:, 4:8])   # later groups: updated by the sweep

    def shrunk(w: torch.Tensor, b: torch.Tensor, d: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        s, z = minmax(w, b, d)
        return s * 0.5, z  # a fit of its own: the result must use it
    half = gptq_quantize(W, H, spec, group_bits=bits, fit_group=shrunk)
    torch.testing.assert_close(half.scale[:, 0], ref.scale[:, 0] * 0.5)


def test_refusals() -> None:
    W, H = problem(7, cols=12)
    g4 = WeightQuantSpec(bits=3, symmetric=False, granularity=PerGroup(4))
    with pytest.raises(ValueError, match="per-group"):
        gptq_quantize(W, H, replace(g4, granularity=PerChannel()),
                      group_bits=torch.full((6, 1), 3))
    with pytest.raises(ValueError, match=r"\[6, 3\]"):
        gptq_quantize(W, H, g4, group_bits=torch.full((6, 4), 3))
    with pytest.raises(ValueError, match="OWQ"):
        gptq_quantize(W, H, g4, weak=torch.tensor([1]), group_bits=torch.full((6, 3), 3))
    with pytest.raises(ValueError, match="zero point"):
        gptq_quantize(W, H, g4, fit_group=lambda w, b, d: (w.abs().amax(1), None))


@pytest.mark.parametrize("symmetric", [False, True])
def test_static_groups_fit_the_original_columns_with_their_sweep_u_diagonal(symmetric: bool
                                                                            ) -> None:
    spec = WeightQuantSpec(bits=3, symmetric=symmetric, granularity=PerGroup(4))
    W, H = problem(8, rows=5, cols=14)
    D = torch.linspace(0.5, 2.0, 14, dtype=H.dtype)
    H = D[:, None] * H * D[None, :]  # inputs of different scales: a real act-order
    bits = mixed_bits(5, 4, seed=9, lo=2, hi=4)
    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def minmax(w: torch.Tensor, b: torch.Tensor, d: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        seen.append((w.clone(), b.clone(), d.clone()))
        s = torch.empty(w.shape[0], dtype=w.dtype)
        z = None if symmetric else torch.empty_like(s)
        for width in torch.unique(b).tolist():
            rows = b == width
            qp = fit_weight_qparams(w[rows], replace(spec, bits=width, granularity=PerChannel()))
            s[rows] = qp.scale[:, 0].to(s.dtype)
            if z is not None:
                z[rows] = qp.zero[:, 0].to(z.dtype)
        return s, z

    kw = dict(actorder=True, static_groups=True, group_bits=bits, return_dequant=True,
              blocksize=3)
    ref = gptq_quantize(W, H, spec, **kw)
    got = gptq_quantize(W, H, spec, fit_group=minmax, **kw)
    assert torch.equal(ref.w_hat, got.w_hat) and torch.equal(ref.scale, got.scale)
    perm = torch.argsort(H.diagonal(), descending=True, stable=True)
    U, _ = inverse_cholesky(H[perm][:, perm], 0.01, 0)
    pos = torch.empty(14, dtype=torch.long)
    pos[perm] = torch.arange(14)
    assert len(seen) == 4 and not torch.equal(perm, torch.arange(14))
    for gi, (w, b, d) in enumerate(seen):  # the original columns, before the sweep
        cols = slice(4 * gi, min(14, 4 * gi + 4))
        assert torch.equal(w, W[:, cols]) and torch.equal(b, bits[:, gi])
        torch.testing.assert_close(d, U.diagonal()[pos[cols]])
