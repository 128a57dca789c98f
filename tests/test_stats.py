"""llmcq.stats: every observer over 2 gloo ranks (each seeing half of the batches) equals one
process over all batches: sums to float rounding, max/min and gathered tokens exactly; a rank
that saw nothing still joins (no hang) and an all-empty range is a clear error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llmcq.testing.gloo import run_ranks
from llmcq.stats import (ChannelAbsMax, ChannelRange, HessianObserver, MeanObserver,
                         TokenSample)

WORKER = r'''
import sys
import torch
import torch.distributed as D
from llmcq import stats

rank, world, rdv, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
if world > 1:
    D.init_process_group("gloo", init_method=f"file://{rdv}", rank=rank, world_size=world)
g = torch.Generator().manual_seed(0)
batches = [torch.randn(2, 5, 8, generator=g) * (i + 1) for i in range(4)]
mine = batches[rank::world]
obs = {"absmax": stats.ChannelAbsMax(), "mean": stats.MeanObserver(),
       "range": stats.ChannelRange(), "hess": stats.HessianObserver(8),
       "tokens": stats.TokenSample(stride=3), "empty_here": stats.ChannelRange(per_tensor=True),
       "tokens_here": stats.TokenSample(stride=2, width=8)}
for x in mine:
    for k, o in obs.items():
        if k in ("empty_here", "tokens_here") and rank != 0:
            continue  # only rank 0 sees this "expert"
        o.update(x)
res = {}
for k, o in obs.items():
    o.reduce()
    res[k] = o.value
res["empty_here_empty"] = obs["empty_here"].empty
never = stats.ChannelRange(per_tensor=True)
never.reduce()
res["never_empty"] = never.empty
torch.save(res, out)
if world > 1:
    D.destroy_process_group()
'''


def _run(tmp: Path, world: int) -> list[dict]:
    return run_ranks(WORKER, world, tmp)


def test_two_ranks_reduce_to_one_process(tmp_path: Path) -> None:
    one = _run(tmp_path, 1)[0]
    two = _run(tmp_path, 2)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, 5, 8, generator=g) * (i + 1) for i in range(4)]
    seen0 = torch.cat([batches[0], batches[2]])  # rank 0's share: the only one that saw it
    for r in two:
        assert torch.equal(r["absmax"], one["absmax"])
        lo, hi = r["empty_here"]
        assert float(lo) == float(seen0.min()) and float(hi) == float(seen0.max())
        lo1, hi1 = one["range"]
        lo2, hi2 = r["range"]
        assert torch.equal(lo1, lo2) and torch.equal(hi1, hi2)
        torch.testing.assert_close(r["mean"], one["mean"], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(r["hess"], one["hess"], rtol=1e-5, atol=1e-5)
        # as many tokens as one process keeps, each a real row of a calibration batch
        assert r["tokens"].shape == one["tokens"].shape
        rows = torch.cat(batches).reshape(-1, 8)
        assert all(bool((rows == t).all(1).any()) for t in r["tokens"])
        assert not r["empty_here_empty"] and r["never_empty"]
        # rank 0's strided tokens only, gathered to every rank (rank 1 joined with none)
        assert r["tokens_here"].shape == (10, 8)
        assert torch.equal(r["tokens_here"], seen0.reshape(-1, 8)[::2])
    assert torch.equal(two[0]["tokens"], two[1]["tokens"])  # every rank holds the same sample


def test_single_process_values_and_misuse() -> None:
    x = torch.tensor([[1.0, -3.0], [2.0, 0.5]])
    m = MeanObserver()
    m.update(x)
    with pytest.raises(RuntimeError):
        _ = m.value  # reduce() first
    assert torch.equal(m.reduce().value, torch.tensor([1.5, -1.25]))
    a = ChannelAbsMax()
    a.update(x)
    assert torch.equal(a.reduce().value, torch.tensor([2.0, 3.0]))
    r = ChannelRange()
    r.update(x)
    lo, hi = r.reduce().value
    assert torch.equal(lo, torch.tensor([1.0, -3.0])) and torch.equal(hi, torch.tensor([2.0, 0.5]))
    h = HessianObserver(2)
    h.update(x)
    assert torch.allclose(h.reduce().value, 2 * x.T @ x / 2)
    t = TokenSample(stride=2)
    t.update(torch.arange(10.0).reshape(5, 2))
    t.update(torch.arange(10.0, 16.0).reshape(3, 2))
    # rows 0, 2, 4 of the first batch, then the stride continues: rows 6 (index 1 of batch 2)
    assert torch.equal(t.reduce().value[:, 0], torch.tensor([0.0, 4.0, 8.0, 12.0]))
