"""Online input transforms put on float linears before the block loop
(``llmcq.quant.transform.attach_online_transform``): the float linear applies them, the
block's observers see the transformed input, and the engine gives the linear's record the
transform whichever step made the record."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from llmcq.errors import PluginError
from llmcq.pipeline.blockwise import Block, BlockInputs
from llmcq.pipeline.engine import _attach_transforms
from llmcq.quant.rtn import rtn_records
from llmcq.quant.spec import PerChannel, WeightQuantSpec
from llmcq.quant.transform import (MatrixTransform, attach_online_transform,
                                   detach_online_transform, online_transform_of)
from llmcq.transforms.hadamard import Hadamard

W8 = WeightQuantSpec(bits=8, symmetric=True, granularity=PerChannel())


def test_float_linear_applies_the_transform_and_observers_see_it() -> None:
    torch.manual_seed(0)
    lin = torch.nn.Linear(12, 5)
    x = torch.randn(3, 12)
    ref = lin(x)
    t = Hadamard(12)
    m = t.matrix()
    lin.weight.data = lin.weight.data @ m.T  # W -> W M^T: W_new T(x) = W x
    attach_online_transform(lin, t)
    assert online_transform_of(lin) is t
    torch.testing.assert_close(lin(x), ref, rtol=1e-5, atol=1e-5)
    seen = []
    block = torch.nn.Sequential(lin)
    BlockInputs([x[None]], [{}]).observe(block, {"lin": lin},
                                         lambda _n, inp, _o: seen.append(inp))
    torch.testing.assert_close(seen[0][0], t.apply(x))
    with pytest.raises(ValueError, match="already"):
        attach_online_transform(lin, t)
    assert detach_online_transform(lin) is t and online_transform_of(lin) is None
    assert not torch.allclose(lin(x), ref, atol=1e-3)  # the hook is gone
    with pytest.raises(ValueError, match="size 8"):
        attach_online_transform(lin, Hadamard(8))


def test_engine_gives_the_record_the_transform() -> None:
    lins = {"a": torch.nn.Linear(8, 4), "b": torch.nn.Linear(8, 4)}
    t = Hadamard(8)
    attach_online_transform(lins["a"], t)
    block = Block(0, "model.layers.0", torch.nn.ModuleDict(lins),
                  [SimpleNamespace(linears=lins, roles={})])
    records = rtn_records(lins, W8)
    _attach_transforms(block, records, None)
    assert records["a"].input_transform is t and records["b"].input_transform is None
    assert "input_transform" in records["a"].features()
    records["a"].input_transform = MatrixTransform(torch.eye(8))
    with pytest.raises(PluginError, match="already applies hadamard"):
        _attach_transforms(block, records, None)


def test_a_scale_cannot_move_through_an_online_transform() -> None:
    from llmcq.model.adapter import ResolvedGroup
    from llmcq.model.layout import LinearGroup
    from llmcq.transforms.scaling import fold_scale

    up, down = torch.nn.Linear(4, 8), torch.nn.Linear(8, 4)
    attach_online_transform(down, Hadamard(8))
    group = ResolvedGroup(LinearGroup(("down",), prev_op="up", prev_kind="linear",
                                      inspect="down"), {"down": down}, up, down)
    w = up.weight.detach().clone()
    with pytest.raises(ValueError, match="online input transform"):
        fold_scale(group, torch.full((8,), 2.0))
    assert torch.equal(up.weight, w)
