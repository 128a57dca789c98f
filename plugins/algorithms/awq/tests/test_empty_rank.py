"""Under torchrun an MoE expert may receive no token of one rank's share: that rank still
joins the scale search's reductions (no hang, no mismatched collectives), every rank ends
with the scale one process computes on the tokens that exist."""

from __future__ import annotations

from pathlib import Path

import torch

from llmcq.testing.gloo import run_ranks

WORKER = r'''
import sys
import torch
import torch.distributed as D
from torch import nn
from llmcq.model.adapter import ResolvedGroup
from llmcq.model.layout import LinearGroup
from llmcq.quant.spec import PerGroup, WeightQuantSpec
from llmcq_awq.algorithm import search_group_scale

rank, world, rdv, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
if world > 1:
    D.init_process_group("gloo", init_method=f"file://{rdv}", rank=rank, world_size=world)
torch.manual_seed(0)
up = nn.Linear(32, 32, bias=False)
down = nn.Linear(32, 16, bias=False)
group = ResolvedGroup(LinearGroup(("down",), prev_op="up", prev_kind="linear",
                                  inspect="down"), {"down": down}, up, down)
g = torch.Generator().manual_seed(1)
xs = [torch.randn(1, 7, 32, generator=g) * torch.linspace(0.2, 3, 32) for _ in range(3)]
mine = xs if rank == 0 else []          # rank 1's share routed nothing to this expert
res = search_group_scale(group, mine, [{}] * len(mine),
                         WeightQuantSpec(bits=3, symmetric=False, granularity=PerGroup(8)),
                         None, n_grid=10)
torch.save({"scale": res.scale, "alpha": res.alpha}, out)
if world > 1:
    D.destroy_process_group()
'''


def _run(tmp: Path, world: int) -> list[dict]:
    return run_ranks(WORKER, world, tmp)


def test_a_rank_without_tokens_joins_the_scale_search(tmp_path: Path) -> None:
    one = _run(tmp_path, 1)[0]
    two = _run(tmp_path, 2)
    for r in two:
        assert r["alpha"] == one["alpha"]
        torch.testing.assert_close(r["scale"], one["scale"], rtol=1e-6, atol=1e-7)
