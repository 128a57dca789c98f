"""Pinned-buffer transfers give what ``Module.to`` / ``Tensor.to`` give (GPU only)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llmcq.pipeline.transfer import to_host, upload_module

pytestmark = pytest.mark.gpu


def _needs_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")


def test_upload_module_is_module_to() -> None:
    _needs_cuda()
    torch.manual_seed(0)
    m = nn.Sequential(nn.Embedding(50, 24), nn.LayerNorm(24), nn.Linear(24, 50, bias=False))
    m[2].weight = m[0].weight  # tied, as lm_head and embeddings often are
    m[1].register_buffer("odd", torch.arange(7, dtype=torch.int64))
    m = m.to(torch.bfloat16)
    ref = {k: v.clone() for k, v in m.state_dict().items()}
    params = [id(p) for p in m.parameters()]
    upload_module(m, torch.device("cuda"))
    assert [id(p) for p in m.parameters()] == params  # parameters keep their identity
    assert m[2].weight is m[0].weight
    for k, v in m.state_dict().items():
        assert v.is_cuda and v.dtype == ref[k].dtype and torch.equal(v.cpu(), ref[k])
    # a second, larger module reuses (and grows) the buffer
    big = nn.Linear(512, 1024)
    want = big.weight.detach().clone()
    upload_module(big, torch.device("cuda"))
    assert torch.equal(big.weight.cpu(), want)


def test_to_host_round_trip() -> None:
    _needs_cuda()
    for dt in (torch.int8, torch.uint8, torch.float32, torch.bfloat16, torch.int32):
        t = (torch.randn(37, 129, device="cuda") * 50).to(dt)
        h = to_host(t)
        assert h.device.type == "cpu" and h.dtype == dt and torch.equal(h, t.cpu())
        assert not h.is_pinned()  # a pageable copy: the pinned buffer is reused
    a = to_host(torch.ones(3, device="cuda"))
    to_host(torch.zeros(3, device="cuda"))
    assert torch.equal(a, torch.ones(3))  # earlier results are not overwritten
