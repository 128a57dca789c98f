"""ABQ-LLM's maths (llmcq_abq.solver) against direct computation."""

from __future__ import annotations

import math

import pytest
import torch

from llmcq_abq import solver
from llmcq_abq.algorithm import compensation_blocks


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _direct_map(q: torch.Tensor, k: torch.Tensor, heads: int, kv: int,
                cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Head-averaged causal attention by loops over batch, heads, queries and keys."""
    b, length, width = q.shape
    d = width // heads
    out = torch.zeros(b, length, length, dtype=torch.float64)
    half = d // 2

    def rope(v: torch.Tensor, t: int, s: int) -> torch.Tensor:  # v [d] at position t
        c, n = cos[s if cos.shape[0] > 1 else 0, t].double(), sin[s if sin.shape[0] > 1
                                                                     else 0, t].double()
        rot = torch.cat([-v[half:], v[:half]])
        return v * c + rot * n

    for s in range(b):
        for h in range(heads):
            g = h // (heads // kv)
            for t in range(length):
                qv = rope(q[s, t, h * d:(h + 1) * d].double(), t, s)
                logits = []
                for u in range(t + 1):
                    kvv = rope(k[s, u, g * d:(g + 1) * d].double(), u, s)
                    logits.append(float(qv @ kvv) / math.sqrt(d))
                p = torch.softmax(torch.tensor(logits, dtype=torch.float64), 0)
                out[s, t, : t + 1] += p / heads
    return out


def test_attention_map_equals_direct_computation_with_gqa_and_rotary() -> None:
    b, length, heads, kv, d = 2, 5, 4, 2, 6
    q = torch.randn(b, length, heads * d, generator=_gen(1))
    k = torch.randn(b, length, kv * d, generator=_gen(2))
    angles = torch.arange(length)[:, None] * torch.linspace(0.1, 1.0, d // 2)[None]
    emb = torch.cat([angles, angles], -1)[None]  # [1, L, d]
    cos, sin = emb.cos(), emb.sin()
    got = solver.attention_map(q, k, heads, kv, cos=cos, sin=sin)
    want = _direct_map(q, k, heads, kv, cos, sin)
    assert got.shape == (b, length, length)
    assert torch.allclose(got.double(), want, atol=1e-5)
    assert torch.allclose(got.sum(-1), torch.ones(b, length), atol=1e-6)  # probabilities
    assert torch.all(got.triu(1) == 0)  # causal


def test_kl_both_ways_zero_for_identical_maps_positive_otherwise_and_differentiable() -> None:
    heads, kv, d = 4, 2, 8
    q = torch.randn(1, 6, heads * d, generator=_gen(3))
    k = torch.randn(1, 6, kv * d, generator=_gen(4))
    p = solver.attention_map(q, k, heads, kv)
    assert float(solver.kl_both_ways(p, p)) == pytest.approx(0.0, abs=1e-7)
    q2 = (q + 0.3 * torch.randn(q.shape, generator=_gen(5))).requires_grad_(True)
    kl = solver.kl_both_ways(p, solver.attention_map(q2, k, heads, kv))
    assert float(kl.detach()) > 1e-4
    kl.backward()
    assert q2.grad is not None and float(q2.grad.abs().sum()) > 0
    # direct: rows' sum of p log(p/q) + q log(q/p), averaged over the rows
    a, c = p.double(), solver.attention_map(q2, k, heads, kv).detach().double()
    eps = 1e-10
    direct = ((a * ((a + eps).log() - (c + eps).log())).sum(-1).mean()
              + (c * ((c + eps).log() - (a + eps).log())).sum(-1).mean())
    assert float(kl.detach()) == pytest.approx(float(direct), rel=1e-4)


def test_cosine_term_and_target_loss() -> None:
    out = torch.randn(2, 7, 16, generator=_gen(6))
    target = out + 0.5 * torch.randn(out.shape, generator=_gen(7))
    cos = [float(torch.dot(out[b, t], target[b, t]) / (out[b, t].norm() * target[b, t].norm()))
           for b in range(2) for t in range(7)]
    want = -math.log(abs(sum(cos) / len(cos)))
    assert float(solver.neg_log_mean_cosine(out, target)) == pytest.approx(want, rel=1e-5)
    assert float(solver.neg_log_mean_cosine(out, out)) == pytest.approx(0.0, abs=1e-6)
    mse = float(((out - target) ** 2).mean())
    assert float(solver.target_loss(out, target)) == pytest.approx(mse + want, rel=1e-5)


def test_compensation_is_a_rank_one_update_starting_at_zero() -> None:
    w = torch.randn(5, 3, generator=_gen(8))
    a, b = torch.zeros(5, 1), torch.ones(1, 3)
    assert torch.equal(solver.compensated(w, a, b), w)
    a = torch.randn(5, 1, generator=_gen(9))
    b = torch.randn(1, 3, generator=_gen(10))
    assert torch.allclose(solver.compensated(w, a, b), w + torch.outer(a[:, 0], b[0]))
    assert torch.linalg.matrix_rank(solver.compensated(w, a, b) - w) == 1


def test_compensation_blocks_are_the_first_three_and_last_four_by_default() -> None:
    assert compensation_blocks(30, 3, 4) == [0, 1, 2, 26, 27, 28, 29]
    assert compensation_blocks(2, 3, 4) == [0, 1]
    assert compensation_blocks(10, 0, 0) == []
    assert compensation_blocks(10, 1, 0) == [0]


def test_bit_balance_grid_has_five_levels_on_range_over_four() -> None:
    from llmcq.quant.spec import PerChannel, WeightQuantSpec
    from llmcq_omniquant import solver as omni

    spec = WeightQuantSpec(bits=2, symmetric=False, granularity=PerChannel())
    w = torch.randn(6, 40, generator=_gen(11))
    q, qp = omni.lwc_quantize(w, spec, None, None, levels=5)
    lo, hi = w.amin(1), w.amax(1)
    h = (hi - lo) / 4
    z = torch.round(-lo / h)
    codes = torch.clamp(torch.round(w / h[:, None] + z[:, None]), 0, 4)
    assert torch.equal(q, codes) and torch.allclose(qp.scale[:, 0], h)
    assert torch.equal(qp.zero[:, 0], z)
    assert int(q.max()) == 4 and int(q.min()) == 0
    fake = omni.lwc_fake_quant(w, spec, None, None, levels=5)
    assert torch.allclose(fake, (codes - z[:, None]) * h[:, None], atol=1e-6)
    assert all(len(torch.unique(r)) <= 5 for r in fake)
    assert max(len(torch.unique(r)) for r in fake) == 5
    # without levels: the ordinary 4-level grid
    assert int(omni.lwc_quantize(w, spec, None, None)[0].max()) == 3
