"""SpinQuant's pure maths: Cayley SGD stays on the orthogonal group and converges to a
target rotation, the differentiable rotated weights equal QuaRot's in-place maps, and the
straight-through weight quantizer gives core's round-to-nearest values."""

from __future__ import annotations

import pytest
import torch
from llmcq.quant.qparams import fake_quantize_weight
from llmcq.quant.spec import PerChannel, PerGroup, WeightQuantSpec
from llmcq.transforms.hadamard import hadamard_matrix, random_orthogonal
from llmcq_quarot.rotation import rotate_heads, rotate_reader, rotate_writer
from llmcq_spinquant import solver


def test_cayley_steps_stay_orthogonal_with_large_steps_and_momentum() -> None:
    g = torch.Generator().manual_seed(0)
    r = hadamard_matrix(64, torch.float64)
    buf = None
    for _ in range(300):
        grad = torch.randn(64, 64, generator=g, dtype=torch.float64) * 10.0
        r, buf, alpha = solver.cayley_step(r, grad, 1.5, momentum=0.9, buf=buf)
        assert 0.0 < alpha <= 1.5
    assert solver.orthogonality_error(r) < 1e-12
    assert float((r - hadamard_matrix(64, torch.float64)).abs().max()) > 0.1  # it moved
    # the float32 path returns float32 and is orthogonal to float32 rounding
    r32, _, _ = solver.cayley_step(r.float(), torch.randn(64, 64, generator=g), 1.5)
    assert r32.dtype == torch.float32 and solver.orthogonality_error(r32) < 1e-5


def test_cayley_sgd_reaches_a_target_rotation() -> None:
    """Minimize ||R - A||^2 over the orthogonal group from R0, with A = R0 expm(S) (same
    connected component): plain Cayley SGD converges to A; a Euclidean step would leave
    the group."""
    g = torch.Generator().manual_seed(1)
    r0 = random_orthogonal(24, seed=3, dtype=torch.float64)
    s = torch.randn(24, 24, generator=g, dtype=torch.float64) * 0.3
    a = r0 @ torch.linalg.matrix_exp(s - s.T)
    r = r0.clone()
    start = float((r - a).norm())
    for _ in range(400):
        r, _, _ = solver.cayley_step(r, 2.0 * (r - a), 0.5)
    assert float((r - a).norm()) < 1e-4 * start, (float((r - a).norm()), start)
    assert solver.orthogonality_error(r) < 1e-12


def test_a_small_cayley_step_descends_as_its_first_order_formula() -> None:
    """f(R) = <C, R>: after one step of size a, f changes by -a/2 (||G||^2 - tr((G^T R)^2))
    to first order (the docstring's descent statement)."""
    g = torch.Generator().manual_seed(2)
    r = random_orthogonal(16, seed=5, dtype=torch.float64)
    c = torch.randn(16, 16, generator=g, dtype=torch.float64)
    new, _, a = solver.cayley_step(r, c, 1e-4)
    predicted = -a / 2 * (float(c.pow(2).sum()) - float(torch.trace((c.T @ r) @ (c.T @ r))))
    assert predicted < 0
    assert float((c * new).sum() - (c * r).sum()) == pytest.approx(predicted, rel=1e-3)


def test_rotated_weights_equal_quarots_in_place_maps() -> None:
    r1 = random_orthogonal(32, seed=1, dtype=torch.float64)
    r2 = random_orthogonal(8, seed=2, dtype=torch.float64)
    lin = torch.nn.Linear(32, 24).double()
    w = lin.weight.detach().clone()
    rotate_reader(lin, r1)
    torch.testing.assert_close(solver.reader(w, r1), lin.weight.detach(), rtol=0, atol=1e-12)
    out = torch.nn.Linear(24, 32).double()
    w, b = out.weight.detach().clone(), out.bias.detach().clone()
    rotate_writer(out, r1)
    torch.testing.assert_close(solver.writer(w, r1), out.weight.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(solver.writer(b, r1), out.bias.detach(), rtol=0, atol=1e-12)
    # GQA: 2 kv heads of 8 read by 4 query heads
    v, o = torch.nn.Linear(32, 16).double(), torch.nn.Linear(32, 32).double()
    wv, bv, wo = v.weight.detach().clone(), v.bias.detach().clone(), o.weight.detach().clone()
    rotate_heads(v, o, r2, heads=4, kv_heads=2)
    torch.testing.assert_close(solver.value_rows(wv, r2, 2), v.weight.detach(), rtol=0,
                               atol=1e-12)
    torch.testing.assert_close(solver.value_rows(bv, r2, 2), v.bias.detach(), rtol=0,
                               atol=1e-12)
    torch.testing.assert_close(solver.output_columns(wo, r2, 4), o.weight.detach(), rtol=0,
                               atol=1e-12)


@pytest.mark.parametrize("spec", [
    WeightQuantSpec(bits=4, symmetric=True, granularity=PerChannel()),
    WeightQuantSpec(bits=4, symmetric=False, granularity=PerChannel()),
    WeightQuantSpec(bits=3, symmetric=False, granularity=PerGroup(16)),
    WeightQuantSpec(bits=4, symmetric=True, granularity=PerGroup(8), sym_range="full"),
])
def test_weight_fake_quant_is_rtn_with_a_straight_through_gradient(
        spec: WeightQuantSpec) -> None:
    w = torch.randn(12, 40, generator=torch.Generator().manual_seed(4)).requires_grad_()
    out = solver.weight_fake_quant(w, spec)
    torch.testing.assert_close(out.detach(), fake_quantize_weight(w.detach(), spec),
                               rtol=0, atol=1e-6)
    out.pow(2).sum().backward()
    assert w.grad is not None and float(w.grad.abs().sum()) > 0
