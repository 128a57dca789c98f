"""SmoothQuant's maths against the closed form of Eq. 4 and its balancing property."""

from __future__ import annotations

import pytest
import torch
from llmcq_smoothquant.solver import CLAMP, ChannelAbsMax, smooth_scales, weight_absmax


def _data(seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 50, 16, generator=g)
    x[..., 5] *= 40.0  # an outlier channel, as in LLM activations
    ws = [torch.randn(o, 16, generator=g) * 0.05 for o in (16, 8, 8)]
    return x, ws


def test_running_absmax_equals_absmax_of_all_batches() -> None:
    x, _ = _data()
    acc = ChannelAbsMax()
    for batch in x.split(1):  # three batches of [1, 50, 16]
        acc.update(batch)
    acc.update(torch.zeros(7, 16))  # 2-D batches (OPT's fc1 input) work too
    with pytest.raises(RuntimeError, match="before reduce"):
        acc.value  # noqa: B018 - a forgotten reduction fails loudly
    assert torch.equal(acc.reduce().value, x.reshape(-1, 16).abs().amax(0))
    assert acc.count == 4  # batches seen


def test_weight_absmax_is_over_rows_of_every_linear() -> None:
    _, ws = _data()
    brute = torch.tensor([max(float(w[:, j].abs().max()) for w in ws) for j in range(16)])
    assert torch.allclose(weight_absmax(ws), brute)
    zero = weight_absmax([torch.zeros(4, 16)])
    assert torch.equal(zero, torch.full((16,), CLAMP))
    with pytest.raises(ValueError, match="widths"):
        weight_absmax([torch.zeros(4, 16), torch.zeros(4, 8)])


@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.5, 0.8, 1.0])
def test_scales_equal_eq4(alpha: float) -> None:
    x, ws = _data()
    xm = x.reshape(-1, 16).abs().amax(0)
    wm = weight_absmax(ws)
    s = smooth_scales(xm, wm, alpha)
    for j in range(16):  # the formula, written out channel by channel
        expect = max(float(xm[j]) ** alpha / float(wm[j]) ** (1 - alpha), CLAMP)
        assert float(s[j]) == pytest.approx(expect, rel=1e-5)


@pytest.mark.parametrize("alpha", [0.3, 0.5, 0.75])
def test_smoothed_ranges_balance_as_alpha_predicts(alpha: float) -> None:
    """max|X_j / s_j| = (max|X_j| max|W_j|)^(1-alpha), max|W_j s_j| = (max|X_j| max|W_j|)^alpha;
    so at alpha = 0.5 the two ranges are equal channel by channel, and the product of the
    linear is unchanged."""
    x, ws = _data()
    x2 = x.reshape(-1, 16)
    xm, wm = x2.abs().amax(0), weight_absmax(ws)
    s = smooth_scales(xm, wm, alpha)
    x_s = (x2 / s).abs().amax(0)
    w_s = torch.stack([(w * s).abs().amax(0) for w in ws]).amax(0)
    assert torch.allclose(x_s, (xm * wm) ** (1 - alpha), rtol=1e-5)
    assert torch.allclose(w_s, (xm * wm) ** alpha, rtol=1e-5)
    if alpha == 0.5:
        assert torch.allclose(x_s, w_s, rtol=1e-5)
    # the outlier channel's activation range shrinks by its scale
    assert float(x_s[5]) < float(xm[5]) / 2
    for w in ws:
        assert torch.allclose((x2 / s) @ (w * s).T, x2 @ w.T, atol=1e-4)


def test_scale_clamped_where_a_channel_never_fires() -> None:
    xm = torch.tensor([0.0, 1.0, 2.0])
    wm = torch.tensor([0.5, 0.5, 0.5])
    s = smooth_scales(xm, wm, 0.5)
    assert float(s[0]) == pytest.approx(CLAMP) and torch.isfinite(s).all()
    with pytest.raises(ValueError, match="alpha"):
        smooth_scales(xm, wm, 1.5)
