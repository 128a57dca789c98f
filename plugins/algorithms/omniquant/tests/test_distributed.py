"""OmniQuant under data-parallel calibration: two gloo ranks on the CPU produce identical
records on both ranks (LET statistics max-reduced, the clip search's tokens gathered, the
gradients averaged every step), and one process's records up to float rounding.

Averaging the gradients of one batch per rank makes each step the step one process takes on
the union of those batches (the loss is a mean over equal-sized batches): 2 ranks with
batches of 2 samples take the steps of one process with batches of 4 (its batch i = global
batches 2i and 2i + 1, which the engine's sharding gives ranks 0 and 1 as their batch i), so
that is the one-process run compared. What differs is float rounding (other matmul shapes;
the clip search's gathered tokens come in rank order): measured all codes equal, dequantized
weights within 8e-7 of the largest, block losses equal to 4 digits; asserted: >= 99 % codes,
dequantized weights within 1e-4 of the largest, losses within 1e-3. Against one process with batches of 2 (the
same batches, twice the steps) 90-99 % of the codes agree: the test tells the two apart.
"""

from __future__ import annotations

from pathlib import Path

import torch

from llmcq.testing.gloo import run_ranks

WORKER = r'''
import torch
from llmcq.testing.gloo import join_ranks, leave_ranks, quantize_blocks

rank, world, out, (model_dir, calib_txt) = join_ranks()
quant = {"method": "omniquant", "quant_out": True,
         "special": {"epochs": 2, "lwc": True, "lwc_lr": 0.05, "let": True, "let_lr": 0.01,
                     "search_clip_init": True},
         "weight": {"bit": 3, "symmetric": False, "granularity": "per_group", "group_size": 16,
                    "calib_algo": "learnable", "ste": True}}
g = torch.Generator().manual_seed(0)
batches = [torch.randint(0, 500, (2, 32), generator=g) for _ in range(4)]
if world == 1:  # one process: batches of 4 = what ranks 0 and 1 hold as their batch i
    batches = [torch.cat(batches[i:i + 2]) for i in (0, 2)]
ctx = quantize_blocks(quant, model_dir, calib_txt, batches, save=out + ".save")
summary = ctx.steps[0].algorithm.summary()
torch.save({"records": {k: (r.qweight, r.dequantize()) for k, r in ctx.records.items()},
            "block_loss": summary["block_loss"]}, out)
leave_ranks()
'''


def _launch(tmp: Path, world: int, model_dir: Path, calib: Path) -> list[dict]:
    return run_ranks(WORKER, world, tmp, str(model_dir), str(calib), timeout=300)


def test_two_gloo_ranks_agree(tmp_path: Path, tiny_llama_dir: Path, shared_data: Path) -> None:
    calib = shared_data / "wikitext2" / "valid.txt"
    (ref,) = _launch(tmp_path, 1, tiny_llama_dir, calib)
    r0, r1 = _launch(tmp_path, 2, tiny_llama_dir, calib)
    assert set(ref["records"]) == set(r0["records"]) == set(r1["records"])
    assert len(ref["records"]) == 14
    # every rank took the same steps: identical records and losses
    assert r0["block_loss"] == r1["block_loss"]
    for name, (q, w) in r0["records"].items():
        assert torch.equal(q, r1["records"][name][0]), name
        assert torch.equal(w, r1["records"][name][1]), name
    # one process with batches of 4: the same steps, up to float rounding
    for name, (q, w) in ref["records"].items():
        q2, w2 = r0["records"][name]
        assert (q2 == q).float().mean() >= 0.99, name
        assert torch.allclose(w2, w, rtol=0, atol=1e-4 * float(w.abs().max())), name
    for (a1, b1), (a2, b2) in zip(ref["block_loss"], r0["block_loss"], strict=True):
        assert abs(a2 - a1) <= 1e-3 * a1 and abs(b2 - b1) <= 1e-3 * b1, (ref["block_loss"],
                                                                        r0["block_loss"])
