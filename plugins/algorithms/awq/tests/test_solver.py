"""AWQ's maths against closed forms and brute force on tiny tensors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from llmcq.errors import PluginError
from llmcq.model.adapter import ResolvedGroup, resolve_block
from llmcq.model.layout import LinearGroup, prenorm_block
from llmcq.pipeline.blockwise import Block
from llmcq.quant.qparams import fake_quantize_act, fake_quantize_weight
from llmcq.quant.spec import ActQuantSpec, PerChannel, PerGroup, PerToken, WeightQuantSpec
from llmcq.transforms.scaling import expand_kv_scale, fold_scale
from llmcq_awq.algorithm import clip_skipped, search_group_scale
from llmcq_awq.solver import (
    ChannelAbsMean,
    candidate_scale,
    grid,
    scaled_linear_error,
    search_scale,
    weight_salience,
)

W3G16 = WeightQuantSpec(bits=3, symmetric=False, granularity=PerGroup(16))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_channel_abs_mean_over_batches_is_the_mean_over_all_tokens() -> None:
    xs = [torch.randn(2, 5, 6, generator=gen(i)) for i in range(3)]
    xs.append(torch.randn(1, 7, 6, generator=gen(9)))  # a batch of another size
    acc = ChannelAbsMean()
    for x in xs:
        acc.update(x)
    flat = torch.cat([x.reshape(-1, 6) for x in xs])
    assert torch.allclose(acc.mean(), flat.abs().mean(0), atol=1e-6)
    assert acc.count == flat.shape[0]


def test_weight_salience_brute_force_with_a_partial_group() -> None:
    ws = [torch.randn(4, 10, generator=gen(1)), torch.randn(3, 10, generator=gen(2))]
    got = weight_salience(ws, PerGroup(4))  # groups [0:4], [4:8], [8:10]
    want = torch.zeros(10)
    for w in ws:
        rel = torch.empty_like(w)
        for r in range(w.shape[0]):
            for lo, hi in ((0, 4), (4, 8), (8, 10)):
                seg = w[r, lo:hi].abs()
                rel[r, lo:hi] = seg / seg.max()
        want += rel.mean(0)
    assert torch.allclose(got, want / 2, atol=1e-6)
    per_row = weight_salience(ws[:1], PerChannel())
    assert torch.allclose(per_row, (ws[0].abs() / ws[0].abs().amax(1, keepdim=True)).mean(0))


def test_candidate_scale_closed_forms() -> None:
    s_x = torch.tensor([0.5, 2.0, 8.0, 1e-9])
    s_w = torch.tensor([0.25, 0.5, 1.0, 0.5])
    assert torch.equal(candidate_scale(s_x, 0.0, "v2"), torch.ones(4))
    for a in (0.3, 0.75):
        v2 = s_x.pow(a).clamp(min=1e-4)
        assert torch.allclose(candidate_scale(s_x, a, "v2"), v2 / (v2.max() * v2.min()).sqrt())
        v1 = (s_x.pow(a) / s_w.pow(1 - a)).clamp(min=1e-4)
        assert torch.allclose(candidate_scale(s_x, a, "v1", s_w),
                              v1 / (v1.max() * v1.min()).sqrt())
        s = candidate_scale(s_x, a, "v2")
        assert torch.allclose(s.max() * s.min(), torch.tensor(1.0))  # centred around 1
    assert grid(4) == [0.0, 0.25, 0.5, 0.75]
    with pytest.raises(ValueError, match="v1"):
        candidate_scale(s_x, 0.5, "v1")


def test_uniform_activations_pick_ratio_zero() -> None:
    """Every channel has the same mean |x|: every candidate is s = 1, the first one wins."""
    w = torch.randn(24, 48, generator=gen(3))
    signs = torch.randint(0, 2, (200, 48), generator=gen(4)).float() * 2 - 1
    x = 0.7 * signs
    acc = ChannelAbsMean()
    acc.update(x)
    res = search_scale(acc.mean(), lambda s: scaled_linear_error(w, x, s, W3G16))
    assert res.alpha == 0.0 and res.index == 0
    assert torch.allclose(res.scale, torch.ones(48))


def test_outlier_channel_scale_lowers_the_quantized_output_error() -> None:
    """The paper's premise: protect the salient (large-activation) channel by scaling."""
    w = torch.randn(32, 64, generator=gen(5)) * 0.1
    x = torch.randn(512, 64, generator=gen(6))
    x[:, 3] *= 40.0
    x[:, 50] *= 15.0
    acc = ChannelAbsMean()
    acc.update(x)
    res = search_scale(acc.mean(), lambda s: scaled_linear_error(w, x, s, W3G16))
    identity = scaled_linear_error(w, x, torch.ones(64), W3G16)
    assert res.alpha > 0
    assert float(res.losses[res.index]) < 0.8 * float(identity)
    assert float(res.losses[0]) == pytest.approx(float(identity), rel=1e-6)  # a = 0: s = 1
    assert res.scale[3] > res.scale[10] and res.scale[50] > res.scale[10]
    # every loss is the brute-force error of its candidate
    for i, a in enumerate(grid(20)):
        s = candidate_scale(acc.mean(), a, "v2")
        assert float(res.losses[i]) == pytest.approx(
            float(scaled_linear_error(w, x, s, W3G16)), rel=1e-5)


def test_non_finite_losses_never_win() -> None:
    s_x = torch.rand(8, generator=gen(7)) + 0.5
    values = iter([float("nan"), 3.0, float("inf"), 2.0, 5.0])
    res = search_scale(s_x, lambda s: torch.tensor(next(values)), n_grid=5)
    assert res.index == 3 and res.alpha == pytest.approx(0.6)
    res = search_scale(s_x, lambda s: torch.tensor(float("nan")), n_grid=3)
    assert res.index == -1 and torch.equal(res.scale, torch.ones(8))


class Norm(nn.Module):
    """A norm-like producer (per-channel weight), as fold_scale expects."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(n, generator=gen(11)) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.norm = Norm(32)
        self.fc1 = nn.Linear(32, 24, bias=False)
        self.fc2 = nn.Linear(32, 16, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return self.fc1(h).relu().sum(-1, keepdim=True) + self.fc2(h)


def _toy_group(m: Toy) -> ResolvedGroup:
    spec = LinearGroup(("fc1", "fc2"), prev_op="norm", inspect="fc2")
    return ResolvedGroup(spec, {"fc1": m.fc1, "fc2": m.fc2}, m.norm, m.fc2)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_group_search_chooses_on_the_total_over_all_batches(version: str) -> None:
    """Brute force over the concatenated batches (a port choosing inside the per-batch loop,
    on partial sums, fails this); the weights come back bit-exact; the fold preserves the
    float function."""
    m = Toy()
    group = _toy_group(m)
    xs = [torch.randn(2, 9, 32, generator=gen(20 + i)) for i in range(3)]
    for x in xs:
        x[..., 5] *= 30.0
        x[..., 17] *= 8.0
    hs = [m.norm(x).detach() for x in xs]
    exact = {n: lin.weight.detach().clone() for n, lin in group.linears.items()}
    res = search_group_scale(group, hs, [{}] * 3, W3G16, None, version=version)
    for n, lin in group.linears.items():
        assert torch.equal(lin.weight, exact[n])

    h_all = torch.cat([h.reshape(-1, 32) for h in hs])
    s_x = h_all.abs().mean(0)
    s_w = weight_salience([exact["fc1"], exact["fc2"]], W3G16.granularity)
    bias = m.fc2.bias.detach()
    ref = h_all @ exact["fc2"].t() + bias
    brute = []
    for a in grid(20):
        s = candidate_scale(s_x, a, version, s_w)
        q = fake_quantize_weight(exact["fc2"] * s, W3G16)
        brute.append(float(((h_all / s) @ q.t() + bias - ref).pow(2).mean()))
    assert res.losses.tolist() == pytest.approx(brute, rel=1e-4)
    assert res.index == min(range(20), key=brute.__getitem__)
    assert res.index > 0

    x_test = torch.randn(3, 32, generator=gen(40))
    with torch.no_grad():
        before = m(x_test)
        fold_scale(group, res.scale)
        assert torch.allclose(m(x_test), before, atol=1e-5, rtol=1e-5)
    assert not torch.equal(m.fc1.weight, exact["fc1"])


def test_group_search_with_activation_quantization_and_gqa() -> None:
    """v_proj (2 kv heads x 4) -> o_proj (4 heads x 4): the scale lives on the 8 kv channels;
    the loss is measured on the 16 expanded columns with quantized inputs."""
    torch.manual_seed(1)
    v = nn.Linear(12, 8, bias=False)
    o = nn.Linear(16, 12, bias=False)
    spec = LinearGroup(("o",), prev_op="v", prev_kind="linear", inspect="o")
    group = ResolvedGroup(spec, {"o": o}, v, o)
    x = torch.randn(1, 40, 16, generator=gen(50))
    x[..., 2] *= 20.0
    act = ActQuantSpec(bits=8, symmetric=True, granularity=PerToken())
    res = search_group_scale(group, [x], [{}], W3G16, act, heads=(4, 2))
    assert res.scale.shape == (8,)
    s_x = x.reshape(-1, 16).abs().mean(0).view(2, 2, 4).mean(1).reshape(-1)
    assert torch.allclose(res.scale, candidate_scale(s_x, res.alpha, "v2"))
    full = expand_kv_scale(res.scale, 4, 2)
    w = o.weight.detach()
    want = ((fake_quantize_act(x / full, act) @ fake_quantize_weight(w * full, W3G16).t()
             - x @ w.t()).pow(2).mean())
    assert float(res.losses[res.index]) == pytest.approx(float(want), rel=1e-4)
    v_before, o_before = copy.deepcopy(v), copy.deepcopy(o)
    fold_scale(group, res.scale, n_heads=4, n_kv_heads=2)
    assert torch.allclose(v.weight, v_before.weight / res.scale.view(-1, 1))
    assert torch.allclose(o.weight, o_before.weight * full.view(1, -1))


def _llama_block(roles: tuple[str, ...] | None = ("q", "k", "v")) -> Block:
    """A tiny Llama decoder layer bound to core's pre-norm layout, with the attention
    projections' roles as given (None: no roles declared anywhere)."""
    from dataclasses import replace

    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=4)
    layer = LlamaDecoderLayer(cfg, 0)
    layout = prenorm_block()
    groups = tuple(replace(g, roles=(roles if i == 0 else g.roles) if roles else ())
                   for i, g in enumerate(layout.groups))
    layout = replace(layout, groups=groups)
    return Block(0, "model.layers.0", layer, resolve_block(layer, layout, where="layer"))


def test_clip_skips_query_and_key_by_declared_role() -> None:
    block = _llama_block()
    assert clip_skipped(block, "self_attn.q_proj") and clip_skipped(block, "self_attn.k_proj")
    for name in ("self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                 "mlp.down_proj"):
        assert not clip_skipped(block, name)
    # the role decides, never the name
    odd = _llama_block(("v", "qkv", "q"))
    assert not clip_skipped(odd, "self_attn.q_proj")
    assert clip_skipped(odd, "self_attn.k_proj") and clip_skipped(odd, "self_attn.v_proj")
    with pytest.raises(PluginError, match="no declared role"):
        clip_skipped(_llama_block(None), "self_attn.q_proj")
