"""The GPTQ solver against brute force and closed forms on tiny tensors."""

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
    quantize_weight,
)
from llmcq.quant.record import make_record
from llmcq.quant.spec import PerChannel, PerGroup, PerTensor, WeightQuantSpec
from llmcq_gptq.solver import (
    accumulate_hessian,
    gptq_quantize,
    inverse_cholesky,
    owq_count,
    owq_weak_columns,
)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def correlated_inputs(n: int, d: int, seed: int = 0, dtype: torch.dtype = torch.float64
                      ) -> torch.Tensor:
    """Inputs with strongly correlated features and a few large-scale ones."""
    g = gen(seed)
    mix = torch.randn(d, d, generator=g, dtype=dtype) / d**0.5 + torch.eye(d, dtype=dtype)
    x = torch.randn(n, d, generator=g, dtype=dtype) @ mix
    x[:, :3] *= 4.0
    return x


def hessian(x: torch.Tensor) -> torch.Tensor:
    return 2.0 * x.T @ x / x.shape[0]


def naive_gptq(W: torch.Tensor, H: torch.Tensor, spec: WeightQuantSpec, *, percdamp: float,
               actorder: bool) -> torch.Tensor:
    """Optimal Brain Quantization with a fixed order, written out with the full inverse
    Hessian and Gaussian elimination of each quantized column (GPTQ Eq. 2-4), no Cholesky,
    no lazy batches. Returns the dequantized weight."""
    W = W.double().clone()
    H = H.double().clone()
    R, C = W.shape
    d0 = H.diagonal().clone()
    dead = d0 == 0
    H.diagonal()[dead] = 1
    W[:, dead] = 0
    H.diagonal().add_(percdamp * H.diagonal().mean())
    Hinv = torch.linalg.inv(H)
    order = (torch.argsort(d0, descending=True, stable=True) if actorder
             else torch.arange(C)).tolist()
    col_spec = replace(spec, granularity=PerChannel())
    gran = spec.granularity
    g = gran.size if isinstance(gran, PerGroup) else C
    if not isinstance(gran, PerGroup):
        fixed = fit_weight_qparams(W, spec)
    out = torch.zeros_like(W)
    for step, j in enumerate(order):
        if isinstance(gran, PerGroup):
            if step % g == 0:  # a new group: these sweep positions, current weights
                members = order[step:step + g] if actorder else list(range(j, min(C, j + g)))
                qp = fit_weight_qparams(W[:, members], col_spec)
            scale, zero = qp.scale, qp.zero
        else:
            scale, zero = fixed.scale, fixed.zero
            if isinstance(gran, PerTensor):
                scale = scale.expand(R, 1)
                zero = None if zero is None else zero.expand(R, 1)
        w = W[:, j:j + 1]
        q = quantize_grouped(w, scale.double(), None if zero is None else zero.double(),
                             spec.bits, spec.symmetric)
        wq = dequantize_grouped(q, scale.double(), None if zero is None else zero.double())
        out[:, j] = wq[:, 0]
        err = (w[:, 0] - wq[:, 0]) / Hinv[j, j]
        rest = order[step + 1:]
        W[:, rest] -= torch.outer(err, Hinv[j, rest])
        Hinv = Hinv - torch.outer(Hinv[:, j], Hinv[j, :]) / Hinv[j, j]
    return out


SPECS = {
    "g4_asym": WeightQuantSpec(bits=3, symmetric=False, granularity=PerGroup(4)),
    "g5_sym_partial": WeightQuantSpec(bits=3, symmetric=True, granularity=PerGroup(5)),
    "channel_asym": WeightQuantSpec(bits=3, symmetric=False, granularity=PerChannel()),
    "tensor_sym": WeightQuantSpec(bits=4, symmetric=True, granularity=PerTensor()),
    "g4_mse": WeightQuantSpec(bits=2, symmetric=False, granularity=PerGroup(4),
                              calib_algo="mse"),
}


def test_accumulated_hessian_is_the_running_mean_of_2xxT() -> None:
    g = gen(1)
    batches = [torch.randn(2, 5, 6, generator=g), torch.randn(1, 3, 6, generator=g),
               torch.randn(4, 6, generator=g).to(torch.bfloat16)]
    for chunks in (1, 2):
        H, n = torch.zeros(6, 6), 0
        for b in batches:
            n = accumulate_hessian(H, n, b, chunks=chunks)
        x = torch.cat([b.reshape(-1, 6).float() for b in batches])
        assert n == 17
        torch.testing.assert_close(H, 2 * x.T @ x / 17, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("actorder", [False, True])
def test_identity_hessian_gives_round_to_nearest(name: str, actorder: bool) -> None:
    spec = SPECS[name]
    W = torch.randn(7, 13, generator=gen(2))
    res = gptq_quantize(W, torch.eye(13), spec, blocksize=4, actorder=actorder,
                        return_dequant=True)
    q, qp = quantize_weight(W, spec)
    assert torch.equal(res.q, q)
    assert torch.equal(res.scale, qp.scale)
    if actorder and isinstance(spec.granularity, PerGroup):  # equal H_jj: natural order
        assert torch.equal(res.g_idx.long(), torch.arange(13) // spec.granularity.size)
    else:
        assert res.g_idx is None
    torch.testing.assert_close(res.w_hat.float(), fake_quantize_weight(W, spec), rtol=0,
                               atol=1e-6)
    assert res.retries == 0 and not res.fallback


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("actorder", [False, True])
def test_matches_brute_force_obq(name: str, actorder: bool) -> None:
    spec = SPECS[name]
    x = correlated_inputs(64, 13, seed=3)
    H = hessian(x)
    W = torch.randn(6, 13, generator=gen(4), dtype=torch.float64)
    ref = naive_gptq(W, H, spec, percdamp=0.01, actorder=actorder)
    for blocksize in (1, 3, 128):
        res = gptq_quantize(W, H, spec, blocksize=blocksize, percdamp=0.01, actorder=actorder,
                            return_dequant=True)
        torch.testing.assert_close(res.w_hat, ref, rtol=0, atol=1e-9)


def test_error_below_round_to_nearest_on_correlated_inputs() -> None:
    spec = WeightQuantSpec(bits=3, symmetric=False, granularity=PerGroup(16))
    x = correlated_inputs(512, 72, seed=5, dtype=torch.float32)
    W = torch.randn(48, 72, generator=gen(6))
    H, n = torch.zeros(72, 72), 0
    for part in x.split(100):
        n = accumulate_hessian(H, n, part)

    def err(w_hat: torch.Tensor) -> float:
        return float((x @ W.T - x @ w_hat.T).square().sum())

    rtn = err(fake_quantize_weight(W, spec))
    for actorder in (False, True):
        res = gptq_quantize(W, H, spec, actorder=actorder, return_dequant=True)
        assert err(res.w_hat) < 0.6 * rtn, (actorder, err(res.w_hat), rtn)
        # the loss GPTQ reports is the layer error it predicts: sum (w - q)^2 / (2 [H^-1]_jj)
        assert float(res.loss) > 0


@pytest.mark.parametrize("static_groups", [False, True])
def test_actorder_group_index_and_record_dequantize(static_groups: bool) -> None:
    spec = WeightQuantSpec(bits=3, symmetric=False, granularity=PerGroup(8))
    x = correlated_inputs(128, 36, seed=7, dtype=torch.float32)
    x[:, 30] *= 10  # a late column with a large diagonal: act-order moves it first
    W = torch.randn(10, 36, generator=gen(8))
    res = gptq_quantize(W, hessian(x), spec, actorder=True, static_groups=static_groups,
                        blocksize=5, return_dequant=True)
    rec = make_record(res.q, QParams(res.scale, res.zero), spec, g_idx=res.g_idx)
    assert torch.equal(rec.dequantize(), res.w_hat.float())
    assert res.scale.shape == (10, 5)
    if static_groups:
        assert res.g_idx is None  # groups stay contiguous in the export
        qp = fit_weight_qparams(W, spec)
        assert torch.equal(res.scale, qp.scale) and torch.equal(res.zero, qp.zero)
    else:
        g_idx = res.g_idx.long()
        assert g_idx[30] == 0 and not torch.equal(g_idx, torch.arange(36) // 8)
        assert torch.bincount(g_idx).tolist() == [8, 8, 8, 8, 4]
    # every column uses at most 2^bits levels of its group's grid
    for gi in range(5):
        cols = rec.column_groups() == gi
        assert rec.qweight[:, cols].max() <= 7


def test_partial_last_group_576_g128() -> None:
    spec = WeightQuantSpec(bits=4, symmetric=False, granularity=PerGroup(128))
    x = correlated_inputs(700, 576, seed=9, dtype=torch.float32)
    W = torch.randn(8, 576, generator=gen(10))
    res = gptq_quantize(W, hessian(x), spec, actorder=False, return_dequant=True)
    assert res.scale.shape == (8, 5) and res.g_idx is None
    rec = make_record(res.q, QParams(res.scale, res.zero), spec)
    assert torch.equal(rec.dequantize(), res.w_hat.float())
    assert torch.isfinite(res.w_hat).all()


def test_dead_columns() -> None:
    spec = WeightQuantSpec(bits=4, symmetric=False, granularity=PerGroup(4))
    x = correlated_inputs(64, 12, seed=11, dtype=torch.float32)
    x[:, [2, 7]] = 0
    W = torch.randn(5, 12, generator=gen(12))
    res = gptq_quantize(W, hessian(x), spec, actorder=True, return_dequant=True)
    assert torch.isfinite(res.w_hat).all()
    assert torch.equal(res.w_hat[:, [2, 7]], torch.zeros(5, 2))


def test_singular_hessian_retries_with_more_damping() -> None:
    spec = WeightQuantSpec(bits=3, symmetric=False, granularity=PerGroup(4))
    W = torch.randn(5, 8, generator=gen(13))
    H = torch.ones(8, 8)  # rank one: Cholesky fails without damping
    res = gptq_quantize(W, H, spec, percdamp=0.0, return_dequant=True)
    assert res.retries >= 1 and not res.fallback
    assert torch.isfinite(res.w_hat).all() and torch.isfinite(res.scale).all()
    # indefinite (numerically broken) Hessian: damping must grow until it is positive
    H2 = torch.diag(torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, -2.0]))
    U, used = inverse_cholesky(H2, 0.01, 4)
    assert U is not None and used == 3 and torch.isfinite(U).all()


def test_unfactorizable_hessian_falls_back_to_rtn() -> None:
    spec = WeightQuantSpec(bits=3, symmetric=True, granularity=PerChannel())
    W = torch.randn(5, 8, generator=gen(14))
    H = torch.full((8, 8), float("nan"))
    res = gptq_quantize(W, H, spec, retries=2, return_dequant=True)
    assert res.fallback and res.retries == 2
    assert torch.equal(res.q, quantize_weight(W, spec)[0])


@pytest.mark.parametrize("gran", [PerGroup(8), PerChannel()])
@pytest.mark.parametrize("actorder", [False, True])
def test_owq_keeps_weak_columns_in_float(gran: object, actorder: bool) -> None:
    spec = WeightQuantSpec(bits=3, symmetric=False, granularity=gran)  # type: ignore[arg-type]
    x = correlated_inputs(256, 32, seed=15, dtype=torch.float32)
    H = hessian(x)
    W = torch.randn(12, 32, generator=gen(16))
    weak = owq_weak_columns(W, H, spec, 4)
    # the weak columns are the largest H_jj * ||W_j - RTN(W)_j||^2
    score = H.diagonal() * (W - fake_quantize_weight(W, spec)).square().sum(0)
    assert set(weak.tolist()) == set(torch.topk(score, 4).indices.tolist())
    assert set(owq_weak_columns(W, H, spec, 4, metric="hessian").tolist()) == \
        set(torch.topk(H.diagonal(), 4).indices.tolist())

    res = gptq_quantize(W, H, spec, actorder=actorder, weak=weak, return_dequant=True)
    idx, values = res.float_columns
    assert torch.equal(idx, weak)
    rec = make_record(res.q, QParams(res.scale, res.zero), spec, g_idx=res.g_idx,
                      float_columns=res.float_columns)
    w_hat = rec.dequantize()
    assert torch.equal(w_hat, res.w_hat)
    assert torch.equal(w_hat[:, weak], values)
    # the float columns absorbed the error of the quantized ones (they were updated)
    assert not torch.allclose(values, W[:, weak])
    if isinstance(gran, PerGroup):
        assert res.scale.shape == (12, 4)
        assert (res.g_idx is None) == (not actorder)

    def err(w: torch.Tensor) -> float:
        return float((x @ W.T - x @ w.T).square().sum())

    plain = gptq_quantize(W, H, spec, actorder=actorder, return_dequant=True)
    assert err(w_hat) < err(plain.w_hat)


def test_owq_with_static_groups_fits_groups_without_the_float_columns() -> None:
    spec = WeightQuantSpec(bits=3, symmetric=True, granularity=PerGroup(8))
    x = correlated_inputs(128, 24, seed=17, dtype=torch.float32)
    W = torch.randn(6, 24, generator=gen(18))
    W[:, 3] *= 20  # an outlier column that dominates group 0's range
    weak = torch.tensor([3])
    res = gptq_quantize(W, hessian(x), spec, actorder=True, static_groups=True, weak=weak,
                        return_dequant=True)
    assert res.g_idx is None
    others = [j for j in range(8) if j != 3]
    expect = fit_weight_qparams(W[:, others], replace(spec, granularity=PerChannel()))
    assert torch.equal(res.scale[:, 0], expect.scale[:, 0])
    assert torch.equal(res.w_hat[:, 3], res.float_columns[1][:, 0])


def test_owq_count() -> None:
    assert owq_count(576, 0.01) == 6
    assert owq_count(4, 0.99) == 3


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("actorder", [False, True])
def test_fused_gpu_style_loop_gives_the_same_result(name: str, actorder: bool) -> None:
    """The GPU-style loop (one fake-quant kernel per column, whole-block updates) is the
    same algorithm: float64 (whole-block updates only) matches brute force, float32 matches
    the CPU-style loop's codes."""
    spec = SPECS[name]
    x = correlated_inputs(64, 13, seed=3)
    H = hessian(x)
    W = torch.randn(6, 13, generator=gen(4), dtype=torch.float64)
    ref = naive_gptq(W, H, spec, percdamp=0.01, actorder=actorder)
    res = gptq_quantize(W, H, spec, blocksize=5, actorder=actorder, return_dequant=True,
                        fused=True)
    torch.testing.assert_close(res.w_hat, ref, rtol=0, atol=1e-9)
    weak = torch.tensor([4, 9])
    a, b = (gptq_quantize(W.float(), H.float(), spec, blocksize=5, actorder=actorder,
                          weak=weak, return_dequant=True, fused=f) for f in (False, True))
    assert torch.equal(a.q, b.q) and torch.equal(a.scale, b.scale)
    torch.testing.assert_close(b.w_hat, a.w_hat, rtol=0, atol=1e-6)
    rec = make_record(b.q, QParams(b.scale, b.zero), spec, g_idx=b.g_idx,
                      float_columns=b.float_columns)
    assert torch.equal(rec.dequantize(), b.w_hat)
