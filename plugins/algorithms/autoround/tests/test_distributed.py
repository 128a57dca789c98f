"""AutoRound under data-parallel calibration (two gloo ranks on the CPU).

Each rank draws ``batch_size / world`` samples of its own share per step and the harness
averages the gradients (and the step losses keep_best compares), so every rank takes the same
signed step and ends with the same records. Here every draw is a rank's whole share (4
samples each, batch_size 8), so each step is one process's step on all 8 samples (batch_size
8): the same up to float rounding. Asserted: identical records on both ranks; against one
process >= 99 % of the codes equal (a sign can flip where a gradient is ~0).
"""

from __future__ import annotations

from pathlib import Path

import torch

from llmcq.testing.gloo import run_ranks

WORKER = r'''
import torch
from llmcq.testing.gloo import join_ranks, leave_ranks, quantize_blocks

rank, world, out, (model_dir, calib_txt) = join_ranks()
quant = {"method": "autoround", "quant_out": True,
         "special": {"iters": 15, "lr": 0.03, "batch_size": 8},
         "weight": {"bit": 3, "symmetric": False, "granularity": "per_group", "group_size": 16}}
g = torch.Generator().manual_seed(0)
batches = [torch.randint(0, 500, (2, 32), generator=g) for _ in range(4)]
ctx = quantize_blocks(quant, model_dir, calib_txt, batches, save=out + ".save")
rows = ctx.steps[0].algorithm.summary()["block_loss"]
torch.save({"records": {k: r.qweight for k, r in ctx.records.items()}, "rows": rows}, out)
leave_ranks()
'''


def test_two_gloo_ranks_take_one_process_steps(tmp_path: Path, tiny_llama_dir: Path,
                                               shared_data: Path) -> None:
    calib = str(shared_data / "wikitext2" / "valid.txt")
    (ref,) = run_ranks(WORKER, 1, tmp_path, str(tiny_llama_dir), calib, timeout=300)
    r0, r1 = run_ranks(WORKER, 2, tmp_path, str(tiny_llama_dir), calib, timeout=300)
    assert len(ref["records"]) == 14 and set(ref["records"]) == set(r0["records"])
    assert r0["rows"] == r1["rows"]
    for name, q in r0["records"].items():
        assert torch.equal(q, r1["records"][name]), name
    same = sum(int((q == ref["records"][n]).sum()) for n, q in r0["records"].items())
    total = sum(q.numel() for q in ref["records"].values())
    assert same >= 0.99 * total, same / total
    for a, b in zip(ref["rows"], r0["rows"], strict=True):
        assert abs(a["best"] - b["best"]) <= 1e-3 * a["best"], (ref["rows"], r0["rows"])


def test_batch_size_must_split_over_the_ranks() -> None:
    import pytest

    from llmcq.errors import ConfigError
    from llmcq_autoround.algorithm import rank_batch_size

    assert rank_batch_size(8, 2) == 4 and rank_batch_size(8, 1) == 8
    with pytest.raises(ConfigError) as err:
        rank_batch_size(8, 3)
    assert err.value.path == "quant.special.batch_size" and "multiple of 3" in str(err.value)
