"""TesseraQ under data-parallel calibration: two gloo ranks on the CPU, each holding half of
the calibration batches, write identical records.

What has to agree: the v1 clip search (its token sample gathered from both ranks), the
hardening (a quantile of the rounding variables, which both ranks hold identically because
the harness averages every step's gradients) and the final codes. Each rank draws the same
sample positions within its own share (the same seed), so a step averages 2 x batch_size
samples; a rank that used its own tokens for the clip search, or skipped the gradient
averaging, would end with other codes than its peer. Both ranks also report the same block
losses (reduced over the ranks), and the training moved the rounding away from nearest.
"""

from __future__ import annotations

from pathlib import Path

import torch

from llmcq.testing.gloo import run_ranks

WORKER = r'''
import torch
from llmcq.testing.gloo import join_ranks, leave_ranks, quantize_blocks

rank, world, out, (model_dir, calib_txt) = join_ranks()
quant = {"method": "tesseraq", "quant_out": True,
         "special": {"iterations": 4, "batch_size": 1, "lr": 0.01, "scale_lr": 0.005,
                     "thresholds": [0.5, 0.1], "weight_clip": True, "clip_version": "v1"},
         "weight": {"bit": 2, "symmetric": False, "granularity": "per_group",
                    "group_size": 16}}
g = torch.Generator().manual_seed(0)
batches = [torch.randint(0, 500, (1, 32), generator=g) for _ in range(4)]
ctx = quantize_blocks(quant, model_dir, calib_txt, batches, save=out + ".save")
summary = ctx.steps[0].algorithm.summary()
torch.save({"records": {k: (r.qweight, r.scale, r.zero) for k, r in ctx.records.items()},
            "summary": summary}, out)
leave_ranks()
'''


def test_two_gloo_ranks_agree(tmp_path: Path, tiny_llama_dir: Path, shared_data: Path) -> None:
    calib = shared_data / "wikitext2" / "valid.txt"
    r0, r1 = run_ranks(WORKER, 2, tmp_path, str(tiny_llama_dir), str(calib), timeout=300)
    assert set(r0["records"]) == set(r1["records"]) and len(r0["records"]) == 14
    for name, (q, s, z) in r0["records"].items():
        q1, s1, z1 = r1["records"][name]
        assert torch.equal(q, q1) and torch.equal(s, s1) and torch.equal(z, z1), name
    assert r0["summary"] == r1["summary"]
    losses = r0["summary"]["block_loss"]
    assert len(losses) == 2 and all(after < before for before, after in losses), losses
    assert all(c > 0 for c in r0["summary"]["change_ratio"])
