"""SignRound's maths (llmcq_autoround.solver): the starting point is round-to-nearest bit for
bit, the record's codes are what the training evaluated, the offsets move codes by at most
one step, gradients reach offsets and factors, and the update and projection are exact."""

from __future__ import annotations

import pytest
import torch

from llmcq.quant.qparams import fake_quantize_weight, group_view, quantize_weight
from llmcq.quant.record import make_record
from llmcq.quant.spec import PerChannel, PerGroup, PerTensor, WeightQuantSpec
from llmcq.recon.optim import SignSGD
from llmcq_autoround import solver

SPECS = [
    WeightQuantSpec(bits=3, symmetric=False, granularity=PerGroup(32)),
    WeightQuantSpec(bits=3, symmetric=False, granularity=PerGroup(48)),  # 80 = 48 + 32
    WeightQuantSpec(bits=2, symmetric=False, granularity=PerGroup(16)),
    WeightQuantSpec(bits=4, symmetric=True, granularity=PerGroup(32)),
    WeightQuantSpec(bits=4, symmetric=True, granularity=PerGroup(32), sym_range="full"),
    WeightQuantSpec(bits=8, symmetric=False, granularity=PerChannel()),
    WeightQuantSpec(bits=6, symmetric=True, granularity=PerTensor()),
]


def _w(rows: int = 24, cols: int = 80, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[:, 5] += 0.3  # an outlier column, so groups differ in range
    w[3] = w[3].abs()  # an all-positive row (the symmetric range comes from max alone)
    return w


def _learned(w: torch.Tensor, spec: WeightQuantSpec, seed: int = 1
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    v = torch.rand(w.shape, generator=g) - 0.5
    shape = solver.factor_shape(*w.shape, spec)
    fmin = 0.6 + 0.4 * torch.rand(shape, generator=g)
    fmax = 0.6 + 0.4 * torch.rand(shape, generator=g)
    return v, fmin, fmax


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_zero_offsets_unit_factors_are_rtn_bit_for_bit(spec: WeightQuantSpec) -> None:
    w = _w()
    ones = torch.ones(solver.factor_shape(*w.shape, spec))
    want_q, want_qp = quantize_weight(w, spec)
    for v, f in ((None, None), (torch.zeros_like(w), ones)):
        assert torch.equal(solver.fake_quant(w, spec, v, f, f), fake_quantize_weight(w, spec))
        q, qp = solver.quantize(w, spec, v, f, f)
        assert torch.equal(q, want_q)
        assert torch.equal(qp.scale, want_qp.scale)
        assert (qp.zero is None) == (want_qp.zero is None)
        if qp.zero is not None:
            assert torch.equal(qp.zero, want_qp.zero)


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_record_is_exactly_the_trained_fake_quant(spec: WeightQuantSpec) -> None:
    w = _w(seed=2)
    v, fmin, fmax = _learned(w, spec)
    q, qp = solver.quantize(w, spec, v, fmin, fmax)
    rec = make_record(q, qp, spec)
    assert rec.problems() == []
    fake = solver.fake_quant(w, spec, v, fmin, fmax)
    assert torch.equal(rec.dequantize(), fake)
    # the learned tensors did change the result (else the equality above proves little)
    assert not torch.equal(fake, fake_quantize_weight(w, spec))
    if qp.zero is not None:
        assert torch.equal(qp.zero, qp.zero.round())


def test_offsets_move_codes_by_at_most_one_step() -> None:
    spec = WeightQuantSpec(bits=8, symmetric=False, granularity=PerGroup(16))
    w = _w()
    q0, _ = solver.quantize(w, spec, None, None, None)
    for v in (torch.full_like(w, 0.5), torch.full_like(w, -0.5), torch.rand_like(w) - 0.5):
        q, _ = solver.quantize(w, spec, v, None, None)
        diff = q - q0
        assert diff.abs().max() <= 1
        assert ((diff * v.sign()) >= 0).all()  # up for positive offsets, down for negative
    # +0.5 rounds up every weight that was rounded down (frac in (0, 0.5)) and is not clamped
    wg = group_view(w, spec.granularity)
    scale, zero = solver.grid(wg, spec, None, None)
    x = (wg / scale + zero).reshape(w.shape[0], -1)[:, : w.shape[1]]
    frac = x - x.floor()
    q_up, _ = solver.quantize(w, spec, torch.full_like(w, 0.5), None, None)
    moved = (q_up - q0) == 1
    inside = (q0 < 255) & (frac > 0.01) & (frac < 0.49)
    assert moved[inside].all() and inside.sum() > 100


def test_factors_shrink_the_range() -> None:
    spec = WeightQuantSpec(bits=3, symmetric=False, granularity=PerGroup(16))
    w = _w()
    shape = solver.factor_shape(*w.shape, spec)
    wg = group_view(w, spec.granularity)
    half, ones = torch.full(shape, 0.5), torch.ones(shape)
    s1, _ = solver.grid(wg, spec, ones, ones)
    s2, _ = solver.grid(wg, spec, ones, half)
    hi, lo = wg.amax(-1, keepdim=True), wg.amin(-1, keepdim=True)
    assert torch.allclose(s1, (hi - lo) / 7) and torch.allclose(s2, (0.5 * hi - lo) / 7)
    sym = WeightQuantSpec(bits=4, symmetric=True, granularity=PerGroup(16))
    s3, _ = solver.grid(wg, sym, half, half)
    assert torch.allclose(s3, 0.5 * torch.maximum(-lo, hi) / 7)


def test_gradients_reach_offsets_straight_through_and_factors() -> None:
    spec = WeightQuantSpec(bits=3, symmetric=False, granularity=PerGroup(16))
    w = _w()
    v, fmin, fmax = (t.clone().requires_grad_(True) for t in _learned(w, spec))
    g = torch.randn(w.shape, generator=torch.Generator().manual_seed(3))
    (solver.fake_quant(w, spec, v, fmin, fmax) * g).sum().backward()
    wg = group_view(w, spec.granularity)
    scale, zero = solver.grid(wg, spec, fmin.detach(), fmax.detach())
    q = ((wg / scale + zero + group_view(v.detach(), spec.granularity)).round())
    inside = ((q >= 0) & (q <= 7)).reshape(w.shape[0], -1)[:, : w.shape[1]]
    h = scale.expand_as(wg).reshape(w.shape[0], -1)[:, : w.shape[1]]
    # d W_hat / d V = h where the code is not clamped, 0 where it is
    assert torch.allclose(v.grad, torch.where(inside, g * h, torch.zeros_like(g)), atol=1e-7)
    assert fmin.grad is not None and fmin.grad.abs().sum() > 0
    assert fmax.grad is not None and fmax.grad.abs().sum() > 0


def test_signed_step_moves_by_exactly_the_rate() -> None:
    p = torch.nn.Parameter(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    grad = torch.tensor([2e-9, -5.0, 0.0, 1e3])
    want = solver.sign_step(p.detach(), grad, 0.01)
    assert torch.allclose(want, torch.tensor([0.09, -0.19, 0.3, -0.01]))
    opt = SignSGD([{"params": [p], "lr": 0.01}])
    p.grad = grad.clone()
    opt.step()
    assert torch.equal(p.detach(), want)  # the harness's optimizer is this update


def test_clamp_projects_offsets_and_factors() -> None:
    v = torch.tensor([-0.7, -0.5, 0.2, 0.51])
    f = torch.tensor([-0.1, 0.0, 0.4, 1.3])
    solver.clamp_([v], [f])
    assert v.tolist() == pytest.approx([-0.5, -0.5, 0.2, 0.5])
    assert f.tolist() == pytest.approx([0.0, 0.0, 0.4, 1.0])
