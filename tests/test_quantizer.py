"""Quantizer primitives: grids, round trips, error bounds, partial groups, activations."""

from __future__ import annotations

import pytest
import torch

from llmcq.quant.fake import ActRangeObserver, FakeQuantLinear
from llmcq.quant.qparams import (
    fake_quantize_act,
    fake_quantize_weight,
    fit_weight_qparams,
    group_view,
    quantize_weight,
    ungroup,
)
from llmcq.quant.record import make_record
from llmcq.quant.spec import ActQuantSpec, PerChannel, PerGroup, PerTensor, PerToken, WeightQuantSpec

GRANULARITIES = [PerTensor(), PerChannel(), PerGroup(32), PerGroup(128), PerGroup(50)]


def _w(rows: int = 24, cols: int = 576, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g) * 2


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("gran", GRANULARITIES, ids=str)
def test_codes_on_grid_and_round_trip(bits: int, symmetric: bool, gran) -> None:
    w = _w()
    spec = WeightQuantSpec(bits=bits, symmetric=symmetric, granularity=gran)
    q, qp = quantize_weight(w, spec)
    assert torch.equal(q, q.round())
    assert q.min() >= spec.qmin and q.max() <= spec.qmax
    rec = make_record(q, qp, spec)
    w_hat = rec.dequantize()
    assert torch.allclose(w_hat, fake_quantize_weight(w, spec), atol=1e-6)
    # quantizing the dequantized weight with the same grid gives the same codes
    q2, _ = quantize_weight(w_hat, spec, qp)
    assert torch.equal(q2, q)


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("gran", GRANULARITIES, ids=str)
def test_error_at_most_half_a_step(bits: int, gran) -> None:
    """Min-max ranges cover every weight, so no weight moves more than half a step."""
    w = _w(seed=1)
    for symmetric in (True, False):
        spec = WeightQuantSpec(bits=bits, symmetric=symmetric, granularity=gran,
                               round_zp=False)
        qp = fit_weight_qparams(w, spec)
        err = (fake_quantize_weight(w, spec, qp) - w).abs()
        step = ungroup(qp.scale.unsqueeze(-1).expand_as(group_view(w, gran)), w.shape)
        assert (err <= step / 2 + 1e-6).all()


@pytest.mark.parametrize("gran", [PerGroup(32), PerGroup(64), PerGroup(128)], ids=str)
def test_at_most_2_pow_bits_values_per_group(gran: PerGroup) -> None:
    w = _w(cols=576)
    for bits in (2, 3, 4):
        spec = WeightQuantSpec(bits=bits, symmetric=False, granularity=gran)
        w_hat = fake_quantize_weight(w, spec)
        for start in range(0, 576, gran.size):
            block = w_hat[:, start:start + gran.size]
            for row in block:
                assert row.unique().numel() <= 2**bits


def test_partial_last_group_uses_only_its_own_columns() -> None:
    """576 = 4 x 128 + 64: the 64-column tail group gets its own range."""
    w = torch.zeros(2, 576)
    w[:, :512] = torch.linspace(-10, 10, 512)
    w[:, 512:] = torch.linspace(-0.01, 0.01, 64)
    spec = WeightQuantSpec(bits=4, symmetric=True, granularity=PerGroup(128))
    qp = fit_weight_qparams(w, spec)
    assert qp.scale.shape == (2, 5)
    assert qp.scale[0, 4] == pytest.approx(0.01 / 7, rel=1e-5)
    tail_err = (fake_quantize_weight(w, spec) - w)[:, 512:].abs().max()
    assert tail_err <= 0.01 / 7 / 2 + 1e-7


def test_more_bits_less_error_and_groups_help() -> None:
    w = _w(seed=3)

    def err(bits: int, gran) -> float:
        spec = WeightQuantSpec(bits=bits, symmetric=False, granularity=gran)
        return float((fake_quantize_weight(w, spec) - w).pow(2).mean())

    assert err(8, PerChannel()) < err(4, PerChannel()) < err(3, PerChannel()) < err(2, PerChannel())
    assert err(3, PerGroup(32)) < err(3, PerGroup(128)) < err(3, PerChannel()) < err(3, PerTensor())


def test_mse_range_never_worse_than_minmax() -> None:
    w = _w(seed=4)
    w[:, 7] *= 30  # outlier column: clipping pays off
    for bits in (2, 3, 4):
        base = WeightQuantSpec(bits=bits, symmetric=False, granularity=PerGroup(64))
        mse = WeightQuantSpec(bits=bits, symmetric=False, granularity=PerGroup(64),
                              calib_algo="mse")
        e_base = (fake_quantize_weight(w, base) - w).abs().pow(2.4).sum()
        e_mse = (fake_quantize_weight(w, mse) - w).abs().pow(2.4).sum()
        assert e_mse <= e_base * (1 + 1e-6)
    assert e_mse < e_base * 0.99


def test_symmetric_grid_is_signed_and_zero_exact() -> None:
    w = _w(seed=5)
    w[:, :3] = 0.0
    spec = WeightQuantSpec(bits=4, symmetric=True, granularity=PerGroup(64))
    q, qp = quantize_weight(w, spec)
    assert qp.zero is None and q.min() >= -8 and q.max() <= 7
    assert torch.all(fake_quantize_weight(w, spec)[:, :3] == 0)
    rec = make_record(q, qp, spec)
    assert rec.qweight.dtype == torch.int8


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_full_sym_range_scale_and_codes(bits: int) -> None:
    """sym_range full: s = absmax / (2^(b-1) - 1/2) (compressed-tensors), code -2^(b-1) used;
    the default keeps llmc's absmax / (2^(b-1) - 1)."""
    w = _w(seed=6)
    half = 2 ** (bits - 1)
    # row 0: scale exactly 1, its negative absmax lands on -2^(b-1) (round half to even)
    w[0] = w[0].clamp(-(half - 1), half - 1)
    w[0, 0] = -(half - 0.5)
    full = WeightQuantSpec(bits=bits, symmetric=True, granularity=PerChannel(), sym_range="full")
    restricted = WeightQuantSpec(bits=bits, symmetric=True, granularity=PerChannel())
    q, qp = quantize_weight(w, full)
    absmax = w.abs().amax(1)
    assert torch.allclose(qp.scale.squeeze(-1), absmax / (half - 0.5))
    assert q[0, 0] == -half and q.min() >= -half and q.max() <= half - 1
    _, qr = quantize_weight(w, restricted)
    assert torch.allclose(qr.scale.squeeze(-1), absmax / (half - 1))
    # every value within half a step, except a positive absmax, clipped by half a step
    err = (fake_quantize_weight(w, full) - w).abs()
    assert (err <= qp.scale * 1.0 + 1e-6).all()
    assert "full-range" in full.describe()
    with pytest.raises(ValueError, match="sym_range"):
        WeightQuantSpec(bits=4, symmetric=False, sym_range="full")
    a = ActQuantSpec(bits=8, symmetric=True, granularity=PerToken(), sym_range="full")
    assert ActQuantSpec.from_dict(a.to_dict()) == a
    x = torch.randn(3, 64)
    y = fake_quantize_act(x, a)
    s = x.abs().amax(-1, keepdim=True) / 127.5
    assert torch.allclose(y, torch.clamp(torch.round(x / s), -128, 127) * s, atol=1e-6)


def test_asymmetric_record_is_uint8_with_integral_zero() -> None:
    spec = WeightQuantSpec(bits=8, symmetric=False, granularity=PerChannel())
    q, qp = quantize_weight(_w(), spec)
    rec = make_record(q, qp, spec)
    assert rec.qweight.dtype == torch.uint8 and rec.zero_is_integral
    assert rec.qweight.max() <= 255


def test_constant_and_zero_groups_do_not_divide_by_zero() -> None:
    w = torch.zeros(3, 64)
    w[1] = 0.5
    for symmetric in (True, False):
        spec = WeightQuantSpec(bits=4, symmetric=symmetric, granularity=PerGroup(32))
        out = fake_quantize_weight(w, spec)
        assert torch.isfinite(out).all()
        assert torch.allclose(out[0], torch.zeros(64))


def test_float_columns_and_g_idx_in_dequantize() -> None:
    w = _w(rows=4, cols=64)
    spec = WeightQuantSpec(bits=4, symmetric=False, granularity=PerGroup(16))
    q, qp = quantize_weight(w, spec)
    rec = make_record(q, qp, spec)
    # an explicit g_idx equal to the default changes nothing
    rec2 = make_record(q, qp, spec, g_idx=torch.arange(64, dtype=torch.int32) // 16)
    assert torch.equal(rec.dequantize(), rec2.dequantize())
    cols = torch.tensor([3, 40])
    rec3 = make_record(q, qp, spec, float_columns=(cols, w[:, cols]))
    assert torch.equal(rec3.dequantize()[:, cols], w[:, cols])


@pytest.mark.parametrize("symmetric", [True, False])
def test_act_per_token_dynamic(symmetric: bool) -> None:
    x = torch.randn(2, 5, 64) * torch.arange(1, 11).reshape(2, 5, 1)
    spec = ActQuantSpec(bits=8, symmetric=symmetric, granularity=PerToken())
    y = fake_quantize_act(x, spec)
    assert y.shape == x.shape
    # each token has its own scale: the error is relative to that token's range
    rng = x.amax(-1) - x.amin(-1)
    assert ((y - x).abs().amax(-1) <= rng / 255 + 1e-5).all()
    assert all(y[i, j].unique().numel() <= 256 for i in range(2) for j in range(5))


def test_act_static_per_tensor_uses_calibrated_range() -> None:
    spec = ActQuantSpec(bits=8, symmetric=True, granularity=PerTensor(), static=True)
    obs = ActRangeObserver()
    obs.update(torch.tensor([[-2.0, 1.0]]))
    obs.update(torch.tensor([[0.5, 4.0]]))
    scale, zero = obs.qparams(spec)
    assert zero is None and float(scale) == pytest.approx(4.0 / 127)
    x = torch.tensor([[8.0, -8.0, 0.0]])  # beyond the calibrated range: clipped
    y = fake_quantize_act(x, spec, scale)
    assert float(y[0, 0]) == pytest.approx(4.0, rel=1e-5)
    assert float(y[0, 1]) == pytest.approx(-128 * 4.0 / 127, rel=1e-5)


def test_fake_quant_linear_matches_manual() -> None:
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 16)
    spec = WeightQuantSpec(bits=4, symmetric=False, granularity=PerGroup(32))
    q, qp = quantize_weight(lin.weight.data, spec)
    act = ActQuantSpec(bits=8, symmetric=True, granularity=PerToken())
    rec = make_record(q, qp, spec, bias=lin.bias, act=act)
    fq = FakeQuantLinear.from_record(rec, dtype=torch.float32)
    x = torch.randn(3, 64)
    expected = torch.nn.functional.linear(fake_quantize_act(x, act), rec.dequantize(), lin.bias)
    assert torch.allclose(fq(x), expected, atol=1e-6)
    assert "w4 g32 asym" in repr(fq)


def test_clip_search_lowers_output_error_and_never_raises_it() -> None:
    from llmcq.quant.clip import apply_clip, search_clip

    torch.manual_seed(0)
    w = torch.randn(32, 100)
    w[:, 5] *= 12  # one heavy column: clipping it trades its error for everyone's resolution
    x = torch.randn(300, 100)
    for bits, gran in ((3, PerGroup(32)), (4, PerChannel())):
        spec = WeightQuantSpec(bits=bits, symmetric=False, granularity=gran)
        for sym_clip in (True, False):
            lo, hi = search_clip(w, x, spec, symmetric_clip=sym_clip)
            clipped = apply_clip(w, lo, hi, spec)
            assert clipped.shape == w.shape and (clipped.abs() <= w.abs() + 1e-6).all()

            def out_err(v: torch.Tensor) -> float:
                return float((x @ fake_quantize_weight(v, spec).T - x @ w.T).pow(2).mean())

            assert out_err(clipped) <= out_err(w) * (1 + 1e-6)
    assert out_err(clipped) < out_err(w)
