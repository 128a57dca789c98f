"""The weight-activation path in torch: the WxA layout holds mixpack's codes, the per-token
quantizer is llmcq's, and the reference op equals llmcq's fake-quant of the same setting
up to float rounding (bounded by the float32 summation bound ``2 K u sum_k |x_hat| |w_hat|``
computed in the test, ``u = 2^-24``); unsupported settings are refused by name."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from llmcq.quant.fake import FakeQuantLinear
from llmcq.quant.qparams import fake_quantize_act
from llmcq.quant.rtn import rtn_record
from llmcq.quant.spec import ActQuantSpec, PerChannel, PerGroup, PerTensor, WeightQuantSpec
from llmcq_kernels.synthetic import random_packed
from llmcq_kernels.wa_layout import (
    act_spec,
    check_act,
    pack_wa,
    quantize_tokens,
    unpack_wa,
    wa_reference,
)
from llmcq_mixpack import testing as MB
from llmcq_mixpack.dequant import dequantize
from llmcq_mixpack.layout import pack_record
from torch.nn import functional as F

#: (bits, symmetric, granularity, col_perm): per channel only (per-group is refused)
WEIGHTS = [(8, True, "ch", False), (8, False, "ch", False), (4, True, "ch", True),
           (4, False, "ch", False), (3, False, "ch", False), (2, True, "ch", False),
           (1, False, "ch", False), ((2, 5, 8), True, "ch", False), (6, True, "ch", False)]
ACTS = [ActQuantSpec(8, True), ActQuantSpec(4, True), ActQuantSpec(6, True),
        ActQuantSpec(8, True, sym_range="full")]


def _packed(i: int, bits, sym: bool, perm: bool, out: int = 40, n_in: int = 100):  # noqa: ANN001, ANN202
    return random_packed(out, n_in, bits, None, symmetric=sym, col_perm=perm, seed=10 + i)


def _bound(xh: torch.Tensor, wh: torch.Tensor) -> torch.Tensor:
    """Elementwise float32 summation bound of ``xh @ wh^T`` (both sides' rounding)."""
    return 2 * xh.shape[-1] * 2.0**-24 * (xh.abs().double() @ wh.abs().double().t()).float() \
        + 1e-30


@pytest.mark.parametrize("i", range(len(WEIGHTS)))
def test_layout_holds_mixpacks_codes(i: int) -> None:
    bits, sym, _, perm = WEIGHTS[i]
    p = _packed(i, bits, sym, perm)
    wp = pack_wa(p)
    assert wp.qweight.shape == (40, -(-100 // wp.per_byte))
    q = unpack_wa(wp).float()
    w = (q if wp.zero is None else q - wp.zero[:, None]) * wp.scale[:, None]
    assert torch.equal(w, dequantize(p))  # integral zeros: every step exact


def test_per_tensor_and_mixpack_record_kinds() -> None:
    gen = torch.Generator().manual_seed(0)
    for kind in ("per_tensor", "per_channel_mixed"):
        p = pack_record(MB.hand_record(kind, torch.randn(24, 70, generator=gen), None, gen))
        wp = pack_wa(p)
        assert torch.equal(unpack_wa(wp).float() * wp.scale[:, None], dequantize(p)), kind


def test_token_quantizer_is_llmcqs() -> None:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(7, 96, generator=gen) * torch.rand(96, generator=gen) * 4
    x[3] = 0  # an all-zero token: the 1e-8 scale floor
    for act in ACTS:
        q, s = quantize_tokens(x, act)
        assert torch.equal(q, q.round()) and int(q.min()) >= act.qmin and q.max() <= act.qmax
        assert torch.equal(q * s[:, None], fake_quantize_act(x, act)), act


def _outliers(m: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """Real-shaped activations: a few channels 30x larger (the LLM outlier pattern)."""
    x = torch.randn(m, k, generator=gen)
    x[:, torch.randperm(k, generator=gen)[:4]] *= 30
    return x


@pytest.mark.parametrize("i", range(len(WEIGHTS)))
def test_reference_equals_fake_quant(i: int) -> None:
    bits, sym, _, perm = WEIGHTS[i]
    p = _packed(i, bits, sym, perm)
    wp = pack_wa(p)
    gen = torch.Generator().manual_seed(i)
    w_hat = dequantize(p)
    bias = torch.randn(40, generator=gen)
    for act in ACTS:
        for m in (1, 5):
            x = _outliers(m, 100, gen)
            x_hat = fake_quantize_act(x, act)
            want = F.linear(x_hat, w_hat, bias)
            got = wa_reference(x, wp, act, bias)
            assert got.dtype == torch.float32 and got.shape == want.shape
            assert ((got - want).abs() <= _bound(x_hat, w_hat) + 2.0**-23 * bias.abs()).all()


def test_reference_equals_fake_quant_linear_on_real_shapes() -> None:
    """SmolLM2's q/gate shapes (576 -> 576, 576 -> 1536), RTN records from llmcq itself,
    fake-quant through ``FakeQuantLinear`` with the record's ``act``: W8A8, W4A8, W4A4."""
    gen = torch.Generator().manual_seed(3)
    for n, bits, sym, a in ((576, 8, True, 8), (1536, 4, False, 8), (576, 4, True, 4)):
        lin = torch.nn.Linear(576, n).requires_grad_(False)
        lin.weight.copy_(torch.randn(n, 576, generator=gen) * 0.05)
        rec = rtn_record(lin, WeightQuantSpec(bits=bits, symmetric=sym,
                                              granularity=PerChannel()))
        act = ActQuantSpec(a, True)
        fake = FakeQuantLinear.from_record(replace(rec, act=act), dtype=torch.float32)
        wp = pack_wa(pack_record(rec))
        x = _outliers(16, 576, gen)
        with torch.no_grad():
            want = fake(x)
        got = wa_reference(x, wp, act, lin.bias)
        bound = _bound(fake_quantize_act(x, act), fake.weight) + 2.0**-23 * lin.bias.abs()
        assert ((got - want).abs() <= bound).all(), (bits, sym, a)
        # the quantization itself is far larger than this rounding
        assert float((want - F.linear(x, lin.weight, lin.bias)).abs().max()) \
            > 100 * float((got - want).abs().max())


def test_half_precision_reference() -> None:
    """bfloat16/float16 activations: the float32 result rounded once (the fake-quant model in
    bf16 rounds x_hat, W_hat and the matmul instead)."""
    p = _packed(0, 4, False, False)
    wp = pack_wa(p)
    x = torch.randn(3, 100, generator=torch.Generator().manual_seed(4))
    act = ActQuantSpec(8, True)
    for dt in (torch.bfloat16, torch.float16):
        xd = x.to(dt)
        got = wa_reference(xd, wp, act)
        assert got.dtype == dt
        assert torch.equal(got, wa_reference(xd.float(), wp, act).to(dt))


def test_refusals_name_the_field() -> None:
    for act, field in ((ActQuantSpec(8, False), "act.symmetric"),
                       (ActQuantSpec(8, True, static=True), "act.static"),
                       (ActQuantSpec(8, True, granularity=PerTensor()), "act.granularity"),
                       (ActQuantSpec(8, True, fmt="e4m3"), "act.fmt"),
                       (ActQuantSpec(16, True), "act.bits")):
        with pytest.raises(ValueError, match=field):
            check_act(act)
    with pytest.raises(ValueError, match="act.bits"):
        act_spec(1)
    assert act_spec(4) == ActQuantSpec(4, True) and act_spec({"bits": 8, "symmetric": True,
                                                              "granularity": "per_token",
                                                              "static": False}).bits == 8
    with pytest.raises(ValueError, match="granularity 'per_group'"):
        pack_wa(random_packed(16, 64, 4, 32))
    lin = torch.nn.Linear(64, 16)
    rec = rtn_record(lin, WeightQuantSpec(bits=4, symmetric=True, granularity=PerChannel()))
    cols = torch.tensor([0, 33])
    rec.float_columns = (cols, lin.weight.data[:, cols].clone())
    with pytest.raises(ValueError, match="float_columns"):
        pack_wa(pack_record(rec))
    rec = rtn_record(lin, WeightQuantSpec(bits=4, symmetric=True, granularity=PerGroup(32)))
    with pytest.raises(ValueError, match="per_channel, per_tensor"):
        pack_wa(pack_record(rec))
