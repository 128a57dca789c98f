"""SliM-LLM's maths against brute force on tiny tensors: salience, allocations (mean exactly
the budget), the incremental KL curve, binarization, SQC's salient mask and range search."""

from __future__ import annotations

import itertools
from dataclasses import replace
from fractions import Fraction

import pytest
import torch

from llmcq.quant.qparams import minmax_qparams, quantize_grouped
from llmcq.quant.spec import PerGroup, WeightQuantSpec
from llmcq_gptq.solver import inverse_cholesky
from llmcq_slimllm.solver import (
    allocate,
    binarize_qparams,
    cholesky_diagonal,
    fake_quant_groups,
    group_salience,
    kl_curve,
    kl_plan,
    mean_bits,
    plain_qparams,
    salient_mask,
    search_ks,
    sqc_candidates,
    sqc_qparams,
    weight_salience,
)

ASYM = WeightQuantSpec(bits=3, symmetric=False, granularity=PerGroup(4))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_group_salience_is_the_sum_of_w2_over_u_jj_squared() -> None:
    x = torch.randn(64, 10, generator=gen(0), dtype=torch.float64)
    H = 2 * x.T @ x / 64
    H[3, :] = H[:, 3] = 0  # a dead input
    W = torch.randn(5, 10, generator=gen(1), dtype=torch.float64)
    d = cholesky_diagonal(H, 0.01, 0)
    Hd = H.clone()
    Hd[3, 3] = 1
    U, _ = inverse_cholesky(Hd, 0.01, 0)
    torch.testing.assert_close(d, U.diagonal())
    s = group_salience(W, d, 4)  # groups 0-3, 4-7, 8-9 (partial)
    for gi, cols in enumerate((range(0, 4), range(4, 8), range(8, 10))):
        ref = sum(float(W[r, j] ** 2 / d[j] ** 2) for r in range(5) for j in cols)
        assert float(s[gi]) == pytest.approx(ref, rel=1e-12)


def test_search_range_is_the_references() -> None:
    # run.py: range(1, G // 2); at least k = 1 when two groups exist
    assert search_ks(9) == [1, 2, 3] and search_ks(24) == list(range(1, 12))
    assert search_ks(2) == [1] and search_ks(3) == [1] and search_ks(4) == [1]
    assert search_ks(1) == [0] and search_ks(0) == [0]


@pytest.mark.parametrize(("C", "g"), [(64, 8), (576, 64), (1536, 64), (70, 8), (13, 5)])
def test_every_allocation_keeps_the_mean_exactly(C: int, g: int) -> None:
    G, n_full = -(-C // g), C // g
    sal = torch.rand(G, generator=gen(C))
    for bits in range(2, 8):
        for k in range(n_full // 2 + 1):
            w = allocate(sal, k, bits, n_full)
            cols = [min(g, C - g * i) for i in range(G)]
            pairs = zip(w.tolist(), cols, strict=True)
            assert Fraction(sum(int(b) * c for b, c in pairs), C) == bits
            assert mean_bits(w, C, g) == bits
            assert int((w == bits + 1).sum()) == k == int((w == bits - 1).sum())
            if C % g:
                assert int(w[-1]) == bits  # the partial group is never moved
            order = torch.argsort(sal[:n_full]).tolist()
            assert all(int(w[i]) == bits + 1 for i in order[n_full - k:])
            assert all(int(w[i]) == bits - 1 for i in order[:k])
    with pytest.raises(ValueError):
        allocate(sal, n_full // 2 + 1, 3, n_full)


def brute_kl(x: torch.Tensor, W: torch.Tensor, Wk: torch.Tensor, bias: torch.Tensor) -> float:
    """sum over tokens of sum_o P_k log(P_k / P), P the float output's softmax."""
    p = torch.softmax(x.double() @ W.double().T + bias.double(), -1)
    pk = torch.softmax(x.double() @ Wk.double().T + bias.double(), -1)
    return float((pk * (pk.log() - p.log())).sum())


@pytest.mark.parametrize("bits", [2, 3])
def test_kl_curve_equals_brute_force_per_k(bits: int) -> None:
    spec = replace(ASYM, bits=bits, granularity=PerGroup(8))
    W = torch.randn(12, 64, generator=gen(2))
    bias = torch.randn(12, generator=gen(3))
    x = torch.randn(3, 20, 64, generator=gen(4))
    sal = torch.rand(8, generator=gen(5))
    by_width = {b: fake_quant_groups(W, 8, b, spec) for b in (bits - 1, bits, bits + 1)}
    ks = search_ks(8)
    y = x @ W.T + bias
    got = kl_curve(x, y, bias, kl_plan(by_width, bits, sal, 8, 8, max(ks)), ks)
    for i, k in enumerate(ks):
        widths = allocate(sal, k, bits, 8)
        Wk = torch.cat([by_width[int(b)][:, 8 * gi:8 * gi + 8]
                        for gi, b in enumerate(widths.tolist())], dim=1)
        ref = brute_kl(x.reshape(-1, 64), W, Wk, bias)
        assert float(got[i]) == pytest.approx(ref, rel=2e-4, abs=1e-6)
    assert bool((got > 0).all())
    same = kl_curve(x, x @ by_width[bits].T + bias, bias, kl_plan(by_width, bits, sal, 8, 8, 0),
                    [0])
    assert abs(float(same[0])) < 1e-5  # allocation 0 reproduces an all-N output exactly


def test_fake_quant_groups_is_per_group_rtn_and_binarizes_one_bit() -> None:
    W = torch.randn(6, 24, generator=gen(6))
    for b in (2, 3, 5):
        ref = torch.cat([(lambda s, z, c: (quantize_grouped(c, s, z, b, False) - z) * s)(
            *minmax_qparams(W[:, i:i + 8].unsqueeze(1), b, False), W[:, i:i + 8].unsqueeze(1)
        ).squeeze(1) for i in (0, 8, 16)], dim=1)
        torch.testing.assert_close(fake_quant_groups(W, 8, b, ASYM), ref)
    one = fake_quant_groups(W, 8, 1, ASYM)
    for i in (0, 8, 16):
        cols, got = W[:, i:i + 8], one[:, i:i + 8]
        m = cols.mean(1, keepdim=True)
        a = (cols - m).abs().mean(1, keepdim=True)
        torch.testing.assert_close(got, torch.where(cols > m, m + a, m - a))


def test_binarization_is_a_one_bit_grid_with_fractional_zero() -> None:
    w = torch.tensor([[-1.0, -0.5, 0.25, 2.0], [3.0, 3.0, 3.0, 3.0]])
    s, z = binarize_qparams(w)
    q = (w / s + z).round().clamp(0, 1)
    deq = (q - z) * s
    m, a = 0.1875, (1.1875 + 0.6875 + 0.0625 + 1.8125) / 4
    torch.testing.assert_close(deq[0], torch.tensor([m - a, m - a, m + a, m + a]))
    torch.testing.assert_close(deq[1], torch.full((4,), 3.0), rtol=0, atol=1e-5)
    assert not bool(torch.equal(z[0], z[0].round()))


def test_salient_mask_follows_the_z_score_rule() -> None:
    delta = torch.ones(4, 16)
    delta[1, 3], delta[2, 7] = 40.0, 25.0
    mask = salient_mask(delta)
    assert mask.sum() == 2 and mask[1, 3] and mask[2, 7]
    assert not salient_mask(torch.ones(3, 5)).any()     # no spread: nothing salient
    flat = torch.arange(20.0).reshape(4, 5)              # uniform: no |z| > 2
    assert not salient_mask(flat).any()


def brute_sqc(w: torch.Tensor, bits: int, weight: torch.Tensor, spec: WeightQuantSpec
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Row by row, candidate by candidate, the first p of least weighted 2.4-error."""
    scales, zeros = [], []
    for r in range(w.shape[0]):
        best = None
        for p in sqc_candidates().tolist():
            s, z = minmax_qparams(w[r:r + 1, None, :], bits, spec.symmetric, shrink=p)
            q = quantize_grouped(w[r:r + 1, None, :], s, z, bits, spec.symmetric)
            deq = q * s if z is None else (q - z) * s
            err = float(((deq[0, 0] - w[r]).abs().pow(2.4) * weight[r]).sum())
            if best is None or err < best[0]:
                best = (err, s.reshape(()), None if z is None else z.reshape(()))
        scales.append(best[1])
        zeros.append(best[2])
    return torch.stack(scales), None if zeros[0] is None else torch.stack(zeros)


@pytest.mark.parametrize(("symmetric", "lam"), [(False, 1.0), (False, 5.0), (True, 1.0),
                                                (True, 3.0)])
def test_sqc_range_search_equals_brute_force(symmetric: bool, lam: float) -> None:
    spec = replace(ASYM, symmetric=symmetric)
    w = torch.randn(9, 16, generator=gen(7), dtype=torch.float64)
    w[2, 5] = 4.0  # an outlier weight
    d = torch.rand(16, generator=gen(8), dtype=torch.float64) + 0.2
    bits = torch.tensor([3, 3, 3, 2, 2, 4, 4, 3, 2])
    s, z = sqc_qparams(w, bits, d, spec, lam=lam)
    weight = torch.ones_like(w)
    if lam != 1.0:
        weight[salient_mask(weight_salience(w, d))] = lam
    for b in (2, 3, 4):
        rows = bits == b
        rs, rz = brute_sqc(w[rows], b, weight[rows], spec)
        torch.testing.assert_close(s[rows], rs, check_dtype=False)
        if not symmetric:
            torch.testing.assert_close(z[rows], rz, check_dtype=False)
    assert (z is None) == symmetric


def test_sqc_never_worse_than_min_max_and_weights_the_salient_weights() -> None:
    spec = replace(ASYM, bits=2)
    w = torch.randn(64, 32, generator=gen(9), dtype=torch.float64)
    d = torch.rand(32, generator=gen(10), dtype=torch.float64) + 0.1
    bits = torch.full((64,), 2)

    def err(s: torch.Tensor, z: torch.Tensor | None, mask: torch.Tensor | None = None) -> float:
        q = (w / s[:, None] + z[:, None]).round().clamp(0, 3)
        e = ((q - z[:, None]) * s[:, None] - w).abs().pow(2.4)
        return float(e[mask].sum() if mask is not None else e.sum())

    s0, z0 = plain_qparams(w, bits, spec)  # min-max
    s1, z1 = sqc_qparams(w, bits, d, spec, lam=1.0)
    assert err(s1, z1) <= err(s0, z0) and err(s1, z1) < 0.99 * err(s0, z0)
    sal = salient_mask(weight_salience(w, d))
    assert 0 < int(sal.sum()) < w.numel() // 10
    s8, z8 = sqc_qparams(w, bits, d, spec, lam=8.0)
    # a larger weight on the salient weights lowers their error (and not the total's)
    assert err(s8, z8, sal) < err(s1, z1, sal)
    assert err(s8, z8) >= err(s1, z1)


def test_sqc_binarizes_one_bit_rows() -> None:
    w = torch.randn(4, 8, generator=gen(11))
    s, z = sqc_qparams(w, torch.tensor([1, 1, 2, 2]), torch.ones(8), ASYM, lam=4.0)
    bs, bz = binarize_qparams(w[:2])
    torch.testing.assert_close(s[:2], bs[:, 0])
    torch.testing.assert_close(z[:2], bz[:, 0])


def test_candidates_are_the_references() -> None:
    p = sqc_candidates()
    assert p.numel() == 101 and float(p[0]) == 1.0
    assert float(p[1:51].min()) > 1.0 and float(p[50]) == pytest.approx(1.1)
    assert float(p[51:].max()) < 1.0 and float(p[100]) == pytest.approx(0.9)
    assert all(a < b for a, b in itertools.pairwise(p[1:51].tolist()))
