"""FlatRounding computes LinearRounding.weight for every linear (mixed grids in one block,
soft and hardened variables, symmetric and asymmetric, per group with a partial last group,
per channel, with and without scale tuning) up to a float32 ulp (a CPU's vectorized sigmoid
and its scalar tail can differ in the last bit), its gradients reach the flat variables as
the per-linear ones would, and the linears' variables become views of the flat ones."""

from __future__ import annotations

import torch

from llmcq.quant.spec import PerChannel, PerGroup, WeightQuantSpec
from llmcq_tesseraq import solver
from llmcq_tesseraq.algorithm import init_linear
from llmcq_tesseraq.flat import FlatRounding


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to a float32 ulp or two (a broken gather or grid is off by whole steps)."""
    return torch.allclose(a, b, rtol=4e-7, atol=1e-7)

GRIDS = {
    "q": WeightQuantSpec(bits=2, symmetric=False, granularity=PerGroup(24)),   # 40 cols: partial
    "o": WeightQuantSpec(bits=3, symmetric=True, granularity=PerChannel()),
    "down": WeightQuantSpec(bits=4, symmetric=False, granularity=PerGroup(16)),
}
SHAPES = {"q": (12, 40), "o": (8, 40), "down": (10, 48)}


def _state(optimize_scale: bool, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for n, spec in GRIDS.items():
        t = init_linear(torch.randn(SHAPES[n], generator=g), spec,
                        optimize_scale=optimize_scale)
        with torch.no_grad():
            t.r.add_(torch.randn(t.r.shape, generator=g))
            if t.nu is not None:
                t.nu.add_(0.3 * torch.randn(t.nu.shape, generator=g))
        t.state = solver.harden(t.r, t.state, 0.5)  # half hard, half soft
        state[n] = t
    return state


def test_flat_weights_equal_the_per_linear_ones_and_their_gradients() -> None:
    for optimize_scale in (True, False):
        state = _state(optimize_scale, seed=int(optimize_scale))
        ref = {n: t.weight(GRIDS[n]) for n, t in state.items()}
        coef = {n: torch.randn(w.shape) for n, w in ref.items()}
        sum(float(0) + (ref[n] * coef[n]).sum() for n in ref).backward()
        ref_grad_r = {n: t.r.grad.clone() for n, t in state.items()}
        ref_grad_nu = {n: t.nu.grad.clone() for n, t in state.items() if t.nu is not None}

        flat = FlatRounding(state, GRIDS)
        got = flat.weights()
        assert set(got) == set(ref)
        for n in ref:
            assert _same(got[n].detach(), ref[n].detach()), n
        sum((got[n] * coef[n]).sum() for n in got).backward()
        for n, t in state.items():
            assert t.r.untyped_storage().data_ptr() == flat.r.untyped_storage().data_ptr()
            at = sum(flat._sizes[:flat.names.index(n)])
            g = flat.r.grad[at:at + t.r.numel()].view(t.r.shape)
            assert _same(g, ref_grad_r[n]), n
        assert (flat.nu is None) == (not optimize_scale)
        if flat.nu is not None:
            got_nu = torch.cat([ref_grad_nu[n].reshape(-1) for n in flat.names])
            assert _same(flat.nu.grad, got_nu)


def test_hardening_through_the_views_changes_the_flat_weights() -> None:
    state = _state(True, seed=3)
    flat = FlatRounding(state, GRIDS)
    before = {n: w.detach().clone() for n, w in flat.weights().items()}
    for t in state.values():
        t.state = solver.harden(t.r, t.state, 0.0)  # everything hard now
    after = flat.weights()
    assert any(not _same(before[n], after[n].detach()) for n in before)
    for n, t in state.items():
        assert _same(after[n].detach(), t.weight(GRIDS[n]).detach())
