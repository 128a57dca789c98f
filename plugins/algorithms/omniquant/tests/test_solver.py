"""OmniQuant's maths on tiny tensors, against closed forms and llmcq's round-to-nearest:
LWC at its largest factors is min-max RTN, LWC clipping is clamp-then-RTN, the straight-
through gradient reaches the clip factors with the value the chain rule gives, LET is
function-preserving (norm and GQA value/output sites, with shifts where biases absorb them),
and the training-time activation quantizer gives core's values."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llmcq.quant.clip import apply_clip, search_clip
from llmcq.quant.qparams import (
    fake_quantize_act,
    fake_quantize_weight,
    quantize_weight,
)
from llmcq.quant.spec import (
    ActQuantSpec,
    PerChannel,
    PerGroup,
    PerTensor,
    PerToken,
    WeightQuantSpec,
)
from llmcq.transforms.scaling import expand_kv_scale
from llmcq_omniquant import solver

GRANULARITIES = [PerGroup(16), PerGroup(24), PerChannel(), PerTensor()]  # 24: partial group


def _w(rows: int = 12, cols: int = 40, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    w[0, 3] = 6.0  # an outlier, so clipping matters
    return w


def _factors(spec: WeightQuantSpec, w: torch.Tensor, value: float
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    from llmcq.quant.qparams import group_view

    shape = group_view(w, spec.granularity).shape[:2]
    up = torch.full(shape, value)
    return up, (None if spec.symmetric else up.clone())


@pytest.mark.parametrize("gran", GRANULARITIES, ids=str)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("round_zp", [True, False])
def test_lwc_at_largest_factors_is_minmax_rtn(gran, symmetric, round_zp) -> None:
    spec = WeightQuantSpec(bits=3, symmetric=symmetric, granularity=gran, round_zp=round_zp)
    w = _w()
    up, low = _factors(spec, w, 30.0)  # sigmoid(30) == 1 in float32
    assert torch.equal(solver.lwc_fake_quant(w, spec, up, low), fake_quantize_weight(w, spec))
    q, qp = solver.lwc_quantize(w, spec, up, low)
    q_ref, qp_ref = quantize_weight(w, spec)
    assert torch.equal(q, q_ref) and torch.equal(qp.scale, qp_ref.scale)
    assert (qp.zero is None) == (qp_ref.zero is None)
    if qp.zero is not None:
        assert torch.equal(qp.zero, qp_ref.zero)
    # no factors at all: the same
    assert torch.equal(solver.lwc_fake_quant(w, spec, None, None), fake_quantize_weight(w, spec))


def _brute_lwc(w: torch.Tensor, spec: WeightQuantSpec, up: torch.Tensor,
               low: torch.Tensor | None) -> torch.Tensor:
    """Element by element, group by group, from the paper's formulas."""
    out = torch.empty_like(w)
    g = spec.group_size or w.shape[1]  # None: one group per row
    b = spec.bits
    for r in range(w.shape[0]):
        for gi, c0 in enumerate(range(0, w.shape[1], g)):
            grp = w[r, c0:c0 + g]
            gamma = torch.sigmoid(up[r, gi])
            if spec.symmetric:
                h = max(gamma * grp.abs().max(), 1e-8) / (2 ** (b - 1) - 1)
                q = torch.clamp(torch.round(grp / h), -(2 ** (b - 1)), 2 ** (b - 1) - 1)
                out[r, c0:c0 + g] = q * h
            else:
                beta = torch.sigmoid(low[r, gi])
                h = max((gamma * grp.max() - beta * grp.min()) / (2**b - 1), 1e-8)
                z = torch.clamp(torch.round(-beta * grp.min() / h), 0, 2**b - 1)
                q = torch.clamp(torch.round(grp / h + z), 0, 2**b - 1)
                out[r, c0:c0 + g] = (q - z) * h
    return out


@pytest.mark.parametrize("gran", [PerGroup(16), PerGroup(24), PerChannel()], ids=str)
@pytest.mark.parametrize("symmetric", [False, True])
def test_lwc_clipping_matches_brute_force(gran, symmetric) -> None:
    spec = WeightQuantSpec(bits=4, symmetric=symmetric, granularity=gran)
    w = _w(seed=1)
    g = torch.Generator().manual_seed(2)
    up = torch.randn(*_factors(spec, w, 0.0)[0].shape, generator=g) + 1.0
    low = None if symmetric else torch.randn(up.shape, generator=g) + 1.0
    wq = solver.lwc_fake_quant(w, spec, up, low)
    assert torch.allclose(wq, _brute_lwc(w, spec, up, low), atol=1e-6, rtol=1e-5)
    assert not torch.allclose(wq, fake_quantize_weight(w, spec), atol=1e-3)
    # lwc_clip clamps to the same range; on an asymmetric grid, LWC = clamp, then min-max RTN
    from llmcq.quant.qparams import group_view

    wg = group_view(w, gran if isinstance(gran, PerGroup) else PerGroup(w.shape[1]))
    if symmetric:
        hi = torch.sigmoid(up) * wg.abs().amax(-1)
        lo = -hi
    else:
        hi = torch.sigmoid(up) * wg.amax(-1)
        lo = torch.sigmoid(low) * wg.amin(-1)
        ref = fake_quantize_weight(apply_clip(w, lo, hi, spec), spec)
        assert torch.allclose(wq, ref, atol=1e-6, rtol=1e-5)
    assert torch.allclose(solver.lwc_clip(w, spec, up, low), apply_clip(w, lo, hi, spec))


def test_ste_gradient_reaches_clip_factors_with_the_chain_rule_value() -> None:
    """One asymmetric group: d W_hat_j / d h = q_j - z - w_j / h inside the grid, q_j - z
    where clamped (z is rounded, without gradient, as in the reference), and
    dh/du = max W sigmoid'(u) / (2^b - 1), dh/dl = -min W sigmoid'(l) / (2^b - 1)."""
    bits = 3
    spec = WeightQuantSpec(bits=bits, symmetric=False, granularity=PerChannel())
    w = torch.tensor([[-1.3, -0.2, 0.05, 0.4, 0.9, 2.0, -0.7, 1.1]])
    up = torch.tensor([[1.2]], requires_grad=True)
    low = torch.tensor([[0.8]], requires_grad=True)
    g_out = torch.linspace(-1, 1, 8).view(1, 8)
    (solver.lwc_fake_quant(w, spec, up, low) * g_out).sum().backward()

    qmax = 2**bits - 1
    su, sl = torch.sigmoid(up.detach()), torch.sigmoid(low.detach())
    hi, lo = su * w.max(), sl * w.min()
    h = (hi - lo) / qmax
    z = torch.round(-lo / h)
    u = w / h + z
    q = torch.clamp(torch.round(u), 0, qmax)
    inside = (torch.round(u) >= 0) & (torch.round(u) <= qmax)
    dwhat_dh = torch.where(inside, q - z - w / h, q - z)
    dl_dh = (g_out * dwhat_dh).sum()
    exp_up = dl_dh * w.max() * su * (1 - su) / qmax
    exp_low = dl_dh * (-w.min()) * sl * (1 - sl) / qmax
    assert torch.allclose(up.grad, exp_up.view(1, 1), rtol=1e-4, atol=1e-7)
    assert torch.allclose(low.grad, exp_low.view(1, 1), rtol=1e-4, atol=1e-7)
    assert float(up.grad.abs()) > 0 and float(low.grad.abs()) > 0


def test_ste_passes_weight_gradient_plain_rounding_does_not() -> None:
    spec = WeightQuantSpec(bits=3, symmetric=True, granularity=PerGroup(8))
    w = _w(4, 16).requires_grad_(True)
    up = torch.full((4, 2), solver.LWC_INIT, requires_grad=True)
    solver.lwc_fake_quant(w, spec, up, None, ste=True).pow(2).sum().backward()
    assert int((w.grad != 0).sum()) > 4 * 8 and torch.isfinite(up.grad).all()
    w.grad = None
    up.grad = None
    solver.lwc_fake_quant(w, spec, up, None, ste=False).pow(2).sum().backward()
    # round has no gradient: only each group's largest |w| (through the step size) gets one
    assert int((w.grad != 0).sum()) <= 4 * 2
    assert float(up.grad.abs().sum()) > 0  # the step size still learns


def test_clip_factors_reproduce_search_clip_bounds() -> None:
    w = _w(64, 48, seed=3)
    x = torch.randn(256, 48, generator=torch.Generator().manual_seed(4))
    for symmetric in (False, True):
        spec = WeightQuantSpec(bits=3, symmetric=symmetric, granularity=PerGroup(16))
        lo, hi = search_clip(w, x, spec, symmetric_clip=symmetric)
        up, low = solver.clip_factors(w, lo, hi, spec, symmetric_clip=symmetric)
        from llmcq.quant.qparams import group_view

        lo2, hi2 = solver.lwc_range(group_view(w, spec.granularity), up, low, symmetric)
        assert torch.allclose(hi2.squeeze(-1), hi, rtol=2e-4, atol=1e-6)
        assert torch.allclose(lo2.squeeze(-1), lo, rtol=2e-4, atol=1e-6)
        assert torch.isfinite(up).all() and (low is None or torch.isfinite(low).all())
        assert (hi < group_view(w, spec.granularity).abs().amax(-1) - 1e-6).any()  # it clipped


def test_let_init_scale_is_smoothquant() -> None:
    act = torch.tensor([4.0, 0.0, 9.0, 1.0])
    wmax = torch.tensor([1.0, 0.25, 0.0, 16.0])
    s = solver.let_init_scale(act, wmax, 0.5)
    expected = torch.tensor([2.0, 1e-5**0.5 / 0.5, 3.0 / 1e-5**0.5, 1.0 / 4.0])
    assert torch.allclose(s, expected, rtol=1e-5)
    assert torch.allclose(solver.let_init_scale(act, wmax, 1.0), act.clamp(min=1e-5))


def test_truncate_and_kv_reduce() -> None:
    s = torch.tensor([0.5, 0.001, -0.002, -3.0, 0.0])
    assert torch.equal(solver.truncate_scale(s), torch.tensor([0.5, 0.01, -0.01, -3.0, 0.01]))
    stat = torch.arange(24.0)  # 6 query heads of 4 channels, 2 kv heads
    red = solver.reduce_to_kv_max(stat, 6, 2)
    brute = torch.stack([torch.stack([stat[(kv * 3 + r) * 4 + d] for r in range(3)]).max()
                         for kv in range(2) for d in range(4)])
    assert torch.equal(red, brute)


def test_let_on_norm_producer_is_function_preserving_with_shift() -> None:
    torch.manual_seed(0)
    norm = nn.LayerNorm(8)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    fcs = [nn.Linear(8, 5), nn.Linear(8, 3)]
    x = torch.randn(6, 8)
    ref = [fc(norm(x)) for fc in fcs]
    s = torch.rand(8) + 0.2
    delta = torch.randn(8)
    nw, nb = solver.scale_producer(norm.weight, norm.bias, s, delta, linear=False)
    y = nn.functional.layer_norm(x, (8,), nw, nb)
    assert torch.allclose(y, (norm(x) - delta) / s, atol=1e-6)
    for fc, r in zip(fcs, ref, strict=True):
        w, b = solver.scale_consumer(fc.weight, fc.bias, s, delta)
        assert torch.allclose(nn.functional.linear(y, w, b), r, atol=1e-5)


def test_let_on_gqa_value_output_is_function_preserving() -> None:
    """v_proj (2 kv heads) -> attention mixing -> o_proj (6 query heads): one scale per value
    channel, repeated over the query heads sharing it; a shift passes through the softmax
    (its weights sum to 1) into o_proj's bias."""
    torch.manual_seed(1)
    heads, kv, hd, hidden, t = 6, 2, 4, 10, 5
    v = nn.Linear(hidden, kv * hd)
    o = nn.Linear(heads * hd, hidden)
    x = torch.randn(t, hidden)
    attn = torch.softmax(torch.randn(heads, t, t), dim=-1)

    def block(vw, vb, ow, ob):
        vals = nn.functional.linear(x, vw, vb).view(t, kv, hd)
        vals = vals.repeat_interleave(heads // kv, dim=1)  # query head j uses kv head j // 3
        mixed = torch.einsum("hts,shd->thd", attn, vals).reshape(t, heads * hd)
        return nn.functional.linear(mixed, ow, ob)

    ref = block(v.weight, v.bias, o.weight, o.bias)
    s = torch.rand(kv * hd) + 0.3
    delta = torch.randn(kv * hd)
    vw, vb = solver.scale_producer(v.weight, v.bias, s, delta, linear=True)
    ow, ob = solver.scale_consumer(o.weight, o.bias, expand_kv_scale(s, heads, kv),
                                   expand_kv_scale(delta, heads, kv))
    assert torch.allclose(block(vw, vb, ow, ob), ref, atol=1e-5)


@pytest.mark.parametrize("gran", [PerToken(), PerTensor(), PerGroup(16)], ids=str)
@pytest.mark.parametrize("symmetric", [False, True])
def test_training_act_quant_matches_core(gran, symmetric) -> None:
    spec = ActQuantSpec(bits=4, symmetric=symmetric, granularity=gran)
    x = torch.randn(2, 7, 40, generator=torch.Generator().manual_seed(5)) * 3
    x.requires_grad_(True)
    y = solver.act_fake_quant(x, spec)
    assert torch.equal(y.detach(), fake_quantize_act(x.detach(), spec))
    y.pow(2).sum().backward()
    assert float(x.grad.abs().sum()) > 0


@pytest.mark.parametrize("declared", ["rms_offset", "rms"])
def test_let_transform_keeps_a_gemma_block_with_offset_norms(declared: str) -> None:
    """LET's differentiable transform (what training sees) keeps the block's function on
    Gemma's 1 + w norms when the norm kind is declared rms_offset, and not otherwise."""
    import torch
    from torch.func import functional_call
    from transformers import AutoModelForCausalLM

    from llmcq.model.adapter import resolve_block
    from llmcq.model.layout import NormSite, prenorm_block
    from llmcq.pipeline.blockwise import Block
    from llmcq.testing.tiny_models import tiny_family_config
    from llmcq_omniquant.algorithm import let_sites, transformed_params

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_family_config("gemma2")).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * (0.08 if p.dim() >= 2 else 0.2))
    layout = prenorm_block(mlp_norm="pre_feedforward_layernorm", norm_kind=declared,
                           extra_norms=(NormSite("post_attention_layernorm", "rms_offset",
                                                 "attn_out"),
                                        NormSite("post_feedforward_layernorm", "rms_offset",
                                                 "mlp_out")))
    captured = {}

    def grab(_m, args, kwargs):
        captured["x"], captured["kw"] = args[0] if args else kwargs.pop("hidden_states"), kwargs

    h = model.model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        model(input_ids=torch.randint(0, 200, (1, 16)), use_cache=False)
    h.remove()
    module = model.model.layers[0]
    block = Block(0, "model.layers.0", module, resolve_block(module, layout, where="b0"))
    sites = [s for s in let_sites(block, (4, 4), up_down=False) if not s.linear]
    assert len(sites) == 2 and all(s.norm_kind == declared for s in sites)
    scales = {s.index: torch.rand(64, generator=torch.Generator().manual_seed(s.index)) * 1.5
              + 0.5 for s in sites}
    base = {n: p.detach().float() for n, p in module.named_parameters()}
    kw = {k: v for k, v in captured["kw"].items() if k not in ("past_key_values",)}
    with torch.no_grad():
        ref = module(captured["x"], **kw)
        out = functional_call(module, transformed_params(base, sites, scales, {}, (4, 4)),
                              (captured["x"],), kw)
    ref = ref[0] if isinstance(ref, tuple) else ref
    out = out[0] if isinstance(out, tuple) else out
    err = float((out - ref).abs().max())
    if declared == "rms_offset":
        assert err <= 1e-4 * float(ref.abs().max()) + 1e-5, err
    else:
        assert err > 1e-2 * float(ref.abs().max()), err
