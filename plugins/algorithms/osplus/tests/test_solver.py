"""OS+'s maths: channel statistics, shift and scale against their closed forms, llmc's
threshold grid, the search against brute force, and exact absorption into norm and linear."""

from __future__ import annotations

import pytest
import torch
from llmcq.quant.qparams import fake_quantize_act, fake_quantize_weight
from llmcq.quant.spec import ActQuantSpec, PerChannel, WeightQuantSpec
from llmcq_osplus.solver import (
    FLOOR,
    ChannelRange,
    batch_totals,
    candidate_thresholds,
    channel_shift,
    migration_scale,
    output_error,
    search_threshold,
)
from torch import nn


def _acts(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 32, 12, generator=g)
    x[..., 3] = x[..., 3] * 30 + 50  # a shifted outlier channel
    x[..., 7] = x[..., 7] * 8 - 20
    return x


def test_running_range_equals_range_of_all_batches() -> None:
    x = _acts()
    r = ChannelRange()
    for batch in x.split(1):
        r.update(batch)
    flat = x.reshape(-1, 12)
    lo, hi = r.reduce().value
    assert torch.equal(lo, flat.amin(0)) and torch.equal(hi, flat.amax(0))
    assert r.count == 4  # batches seen


def test_shift_centres_every_channel() -> None:
    flat = _acts().reshape(-1, 12)
    z = channel_shift(flat.amin(0), flat.amax(0))
    assert torch.allclose(z, (flat.amax(0) + flat.amin(0)) / 2)
    shifted = flat - z
    assert torch.allclose(shifted.amax(0), -shifted.amin(0), atol=1e-4)


@pytest.mark.parametrize("t", [1.0, 5.0, 17.5])
def test_scale_brings_outside_channels_exactly_to_the_threshold(t: float) -> None:
    flat = _acts().reshape(-1, 12)
    lo, hi = flat.amin(0), flat.amax(0)
    s = migration_scale(lo, hi, t)
    reach = torch.maximum(hi, -lo)
    for j in range(12):  # llmc's two-sided rule, channel by channel
        mx = float(hi[j]) / t if float(hi[j]) > t else 1.0
        mn = float(lo[j]) / -t if float(lo[j]) < -t else 1.0
        assert float(s[j]) == pytest.approx(max(mx, mn), rel=1e-6)
    scaled = (flat / s).abs().amax(0)
    inside = reach <= t
    assert torch.equal(s[inside], torch.ones_like(s[inside]))
    assert torch.allclose(scaled[~inside], torch.full_like(scaled[~inside], t), rtol=1e-5)
    assert (scaled <= t * (1 + 1e-6)).all()


def test_llmc_grid() -> None:
    lo, hi = torch.tensor([-3.0, -80.0]), torch.tensor([130.0, 2.0])
    c = candidate_thresholds(lo, hi)
    assert c.numel() == max(100, int(130 / 0.5)) + 1 == 261
    assert float(c[0]) == 130.0 and float(c[-1]) == pytest.approx(FLOOR)
    assert (c[1:] < c[:-1]).all()
    # |min| larger than max: the grid starts at |min|, its step count still follows max X
    c = candidate_thresholds(torch.tensor([-60.0]), torch.tensor([10.0]))
    assert float(c[0]) == 60.0 and c.numel() == 101
    assert candidate_thresholds(lo, hi, steps=7).numel() == 8
    assert candidate_thresholds(torch.tensor([-0.5]), torch.tensor([0.9])).numel() == 0


def test_search_picks_the_brute_force_minimum() -> None:
    flat = _acts().reshape(-1, 12)
    lo, hi = flat.amin(0), flat.amax(0)
    loss = lambda s: (s.max() - 3.3).abs() + 0.01 * s.sum()  # noqa: E731
    mig = search_threshold(lo, hi, loss, steps=50)
    brute = min(candidate_thresholds(lo, hi, 50).tolist(),
                key=lambda t: float(loss(migration_scale(lo, hi, t))))
    assert mig.threshold == pytest.approx(brute)
    assert torch.equal(mig.scale, migration_scale(lo, hi, brute))
    assert mig.losses.numel() == 51 and mig.loss == pytest.approx(float(mig.losses.min()))
    # nothing to scale: identity, no loss evaluated
    calls = []
    none = search_threshold(torch.tensor([-0.2]), torch.tensor([0.3]),
                            lambda s: calls.append(s) or s.sum())
    assert torch.equal(none.scale, torch.ones(1)) and not calls and none.loss_ratio == 1.0


def test_per_batch_losses_are_added_in_batch_order() -> None:
    """A loss may return one value per scored batch; the default total adds them one at a
    time in column order (the order a torchrun gather restores), and a custom ``total``
    replaces it (the algorithm's cross-rank sum)."""
    flat = _acts().reshape(-1, 12)
    lo, hi = flat.amin(0), flat.amax(0)
    parts = lambda s: torch.stack([(s.max() - 3.3).abs(), 0.01 * s.sum(), s[3]])  # noqa: E731
    mig = search_threshold(lo, hi, parts, steps=20)
    m = torch.stack([parts(migration_scale(lo, hi, float(t))) for t in
                     candidate_thresholds(lo, hi, 20)])
    assert torch.equal(batch_totals(m), (m[:, 0] + m[:, 1]) + m[:, 2])
    assert torch.equal(mig.losses, batch_totals(m))
    seen = []
    custom = search_threshold(lo, hi, parts, steps=20,
                              total=lambda per: seen.append(per.shape) or -per[:, 2])
    assert seen == [(21, 3)] and custom.threshold == float(candidate_thresholds(lo, hi, 20)[-1])
    empty = search_threshold(lo, hi, lambda s: torch.zeros(0), steps=5,
                             total=lambda per: per.sum(1) + torch.arange(6.0))
    assert empty.threshold == float(candidate_thresholds(lo, hi, 5)[0])  # a rank with no batch


def test_search_reduces_quantized_output_error_of_a_linear() -> None:
    """W8 per-channel weights, A4 per-token activations: an outlier channel ruins every
    token's scale; the searched threshold scales it into the weights and lowers the error
    well below no scaling (the first candidate)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 12, generator=g)
    x[:, 3] *= 40
    w = torch.randn(16, 12, generator=g) * 0.1
    ref = x @ w.T
    wspec = WeightQuantSpec(bits=8, symmetric=True, granularity=PerChannel())
    aspec = ActQuantSpec(bits=4, symmetric=True)

    def loss(s: torch.Tensor) -> torch.Tensor:
        return output_error(ref, fake_quantize_act(x / s, aspec) @ fake_quantize_weight(
            w * s, wspec).T)

    lo, hi = x.amin(0), x.amax(0)
    mig = search_threshold(lo, hi, loss)
    assert mig.threshold < 0.5 * float(hi.max())
    assert mig.loss < 0.5 * float(mig.losses[0]) and mig.loss_ratio < 0.5
    assert float(mig.scale[3]) > 2.0


def test_shift_and_scale_absorb_exactly_into_layernorm_and_linears() -> None:
    from llmcq.model.adapter import ResolvedGroup
    from llmcq.model.layout import LinearGroup
    from llmcq.transforms.scaling import fold_scale
    from llmcq_osplus.algorithm import absorb_shift, shift_blocker

    torch.manual_seed(0)
    norm = nn.LayerNorm(12)
    nn.init.normal_(norm.weight, 1.0, 0.5)
    nn.init.normal_(norm.bias, 0.0, 3.0)
    a, b = nn.Linear(12, 8), nn.Linear(12, 5)
    group = ResolvedGroup(LinearGroup(("a", "b"), prev_op="norm", inspect="a"),
                          {"a": a, "b": b}, norm, a)
    x = torch.randn(64, 12) * 4
    before = [a(norm(x)), b(norm(x))]
    h = norm(x).detach()
    z = channel_shift(h.amin(0), h.amax(0))
    s = migration_scale(h.amin(0) - z, h.amax(0) - z, 0.5)
    assert shift_blocker(group) is None
    with torch.no_grad():
        absorb_shift(group, z)
        fold_scale(group, s)
    h2 = norm(x)
    assert torch.allclose(h2, (h - z) / s, atol=1e-5)  # the norm now emits shifted, scaled
    assert torch.allclose(a(h2), before[0], atol=1e-5)
    assert torch.allclose(b(h2), before[1], atol=1e-5)
    nobias = ResolvedGroup(group.spec, {"a": a, "c": nn.Linear(12, 3, bias=False)}, norm, a)
    assert shift_blocker(nobias) == "c has no bias"
    rms = ResolvedGroup(group.spec, {"a": a}, nn.RMSNorm(12), a)
    assert "norm has no bias" in str(shift_blocker(rms))
