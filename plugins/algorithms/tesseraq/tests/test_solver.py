"""TesseraQ's maths as pure functions: the rectified sigmoid and its inverse start the soft
weight at the float weight, hardening by quantile fixes exactly the requested share (the
most decided variables, to the side they lean to), the final codes are
``clamp(floor(W / s) + h + z)`` and dequantize to the training forward's weight, and the
scale tuning starts at the identity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmcq.quant.qparams import QParams, quantize_weight
from llmcq.quant.record import make_record
from llmcq.quant.spec import PerChannel, PerGroup, PerTensor, WeightQuantSpec
from llmcq_tesseraq import SCHEDULES, solver


def _w(rows: int = 12, cols: int = 40, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


SPECS = [WeightQuantSpec(bits=2, symmetric=False, granularity=PerGroup(16)),  # partial group
         WeightQuantSpec(bits=3, symmetric=True, granularity=PerChannel()),
         WeightQuantSpec(bits=4, symmetric=False, granularity=PerTensor())]


def test_rectified_sigmoid_inverse_and_ends() -> None:
    h = torch.linspace(0, 1, 101, dtype=torch.float64)
    r = solver.rectified_sigmoid_inverse(h)
    assert torch.isfinite(r).all()  # finite at 0 and 1: the stretch beyond [0, 1]
    assert torch.allclose(solver.rectified_sigmoid(r), h, atol=1e-12)
    assert solver.rectified_sigmoid(torch.tensor([-20.0, 20.0])).tolist() == [0.0, 1.0]
    assert float(solver.rectified_sigmoid(torch.tensor(0.0))) == 0.5


@pytest.mark.parametrize("spec", SPECS, ids=["w2g16", "w3sym-pc", "w4-tensor"])
def test_init_reproduces_the_fractional_part_and_the_weight(spec: WeightQuantSpec) -> None:
    w = _w()
    scale, zero = solver.grid_qparams(w, spec)
    base, r = solver.init_rounding(w, scale, spec)
    x = w / solver.per_column(scale, spec, w.shape[1])
    assert torch.equal(base, torch.floor(x))
    h = solver.rounding(r, torch.full(r.shape, solver.SOFT, dtype=torch.int8))
    assert torch.allclose(h, x - base, atol=2e-6)
    # the soft weight starts at W wherever W is inside the grid (a rounded zero point may
    # leave a sliver at one end of an asymmetric group outside)
    soft = solver.fake_quant(base, h, scale, zero, torch.zeros_like(scale), spec)
    z = 0 if zero is None else solver.per_column(zero, spec, w.shape[1])
    inside = (x + z >= spec.qmin) & (x + z <= spec.qmax)
    assert float(inside.float().mean()) > 0.8
    assert torch.allclose(soft[inside], w[inside], atol=1e-5)
    # deciding every variable at its initial value is round to nearest on the same grid
    hard = solver.final_rounding(r, torch.full(r.shape, solver.SOFT, dtype=torch.int8))
    q, qp = quantize_weight(w, spec)
    assert torch.equal(solver.codes(base, hard, zero, spec), q)
    assert torch.equal(scale, qp.scale)


def test_quantile_is_numpys() -> None:
    x = torch.rand(1001, generator=torch.Generator().manual_seed(3))
    for q in (0.0, 0.005, 0.25, 0.5, 0.777, 1.0):
        assert float(solver.quantile(x, q)) == pytest.approx(float(np.quantile(x.numpy(), q)),
                                                             abs=1e-7)


def test_hardening_fixes_the_requested_share_of_the_most_decided() -> None:
    r = torch.randn(20, 50, generator=torch.Generator().manual_seed(1))
    n = r.numel()
    state = torch.full(r.shape, solver.SOFT, dtype=torch.int8)
    h = solver.rectified_sigmoid(r)
    previous = state
    for t in (0.75, 0.5, 0.125):
        state = solver.harden(r, previous, t)
        hard = state != solver.SOFT
        # llmc's rule: above the t-quantile of the confidences (hardened ones count as 1/2)
        assert int(hard.sum()) == n - 1 - int(np.floor(t * (n - 1)))
        assert abs(solver.hard_share(state) - (1 - t)) <= 1 / n
        # hardened stay hardened, each to the side its variable leans to
        assert bool(hard[previous != solver.SOFT].all())
        assert torch.equal(state[hard].float(), (h[hard] > 0.5).float())
        # every hard variable is at least as decided as every soft one
        conf = (h - 0.5).abs()
        assert float(conf[hard].min()) >= float(conf[~hard].max())
        previous = state
    # the final decision: every variable 0 or 1, hard ones unchanged, soft ones by r > 0
    final = solver.final_rounding(r, state)
    assert set(final.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(final[state != solver.SOFT], state[state != solver.SOFT].float())
    assert torch.equal(final[state == solver.SOFT], (r[state == solver.SOFT] > 0).float())


def test_hardening_ignores_the_hard_ones_values_in_r() -> None:
    """A hardened variable keeps its value whatever the optimizer does to its r."""
    r = torch.randn(8, 8, generator=torch.Generator().manual_seed(2))
    state = solver.harden(r, torch.full(r.shape, solver.SOFT, dtype=torch.int8), 0.5)
    moved = torch.where(state == solver.SOFT, r, -r)  # push every hard r to the other side
    h = solver.rounding(moved, state)
    assert torch.equal(h[state != solver.SOFT], state[state != solver.SOFT].float())
    assert torch.equal(solver.final_rounding(moved, state)[state != solver.SOFT],
                       state[state != solver.SOFT].float())


@pytest.mark.parametrize("spec", SPECS, ids=["w2g16", "w3sym-pc", "w4-tensor"])
def test_codes_are_floor_plus_rounding_plus_zero_clamped(spec: WeightQuantSpec) -> None:
    w = _w(seed=4)
    scale, zero = solver.grid_qparams(w, spec)
    base, r = solver.init_rounding(w, scale, spec)
    g = torch.Generator().manual_seed(5)
    h = (torch.rand(w.shape, generator=g) > 0.5).float()
    q = solver.codes(base, h, zero, spec)
    want = base + h
    if zero is not None:
        want = want + solver.per_column(zero, spec, w.shape[1])
    want = want.clamp(spec.qmin, spec.qmax)
    assert torch.equal(q, want)
    assert q.min() >= spec.qmin and q.max() <= spec.qmax
    # at the grid's ends rounding up is clamped away
    assert bool((q == spec.qmax).any())
    # a record of these codes and the tuned scales dequantizes to the training forward's
    # weight, bit for bit
    nu = torch.randn(scale.shape, generator=g) * 0.3
    rec = make_record(q, QParams(solver.effective_scale(scale, nu), zero), spec)
    assert rec.problems() == []
    assert torch.equal(rec.dequantize(), solver.fake_quant(base, h, scale, zero, nu, spec))


def test_scale_tuning_starts_at_the_identity_and_stays_in_0_2() -> None:
    scale = torch.rand(5, 3) + 0.1
    assert torch.equal(solver.effective_scale(scale, torch.zeros_like(scale)), scale)
    assert torch.equal(solver.scale_factor(torch.zeros(4)), torch.ones(4))
    f = solver.scale_factor(torch.linspace(-30, 30, 61))
    assert float(f.min()) == 0.0 and float(f.max()) == 2.0
    # the effective scale never collapses to zero
    assert bool((solver.effective_scale(scale, torch.full_like(scale, -30.0)) > 0).all())


def test_fake_quant_is_differentiable_in_rounding_and_scale() -> None:
    spec = SPECS[0]
    w = _w(seed=6)
    scale, zero = solver.grid_qparams(w, spec)
    base, r0 = solver.init_rounding(w, scale, spec)
    r = r0.clone().requires_grad_(True)
    nu = torch.zeros_like(scale, requires_grad=True)
    state = torch.full(r.shape, solver.SOFT, dtype=torch.int8)
    state[:, :3] = 1  # hardened: no gradient there
    out = solver.fake_quant(base, solver.rounding(r, state), scale, zero, nu, spec)
    out.pow(2).sum().backward()
    assert r.grad is not None and nu.grad is not None
    assert bool((r.grad[:, :3] == 0).all()) and float(r.grad[:, 3:].abs().sum()) > 0
    assert float(nu.grad.abs().sum()) > 0


def test_l2_loss_is_llmcs() -> None:
    a, b = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    assert torch.allclose(solver.l2_loss(a, b), ((a - b) ** 2).sum(-1).mean())


def test_named_schedules() -> None:
    assert len(SCHEDULES["llmc"]) == 10 and len(SCHEDULES["upstream"]) == 20
    for s in SCHEDULES.values():
        assert all(b < a for a, b in zip(s, s[1:])) and s[-1] == 0.005
