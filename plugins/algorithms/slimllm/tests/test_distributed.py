"""SliM-LLM under data-parallel calibration (two gloo ranks on the CPU).

Each rank sees half the calibration batches; the Hessians (GPTQ's bank) and SBA's summed KL
divergences are all-reduced before anything depends on them, so both ranks choose the same
widths and build the same records, and they choose one process's widths (the reduced sums
differ from one process's by float rounding only). Asserted: identical KL curves, widths and
records on both ranks; one process's KL per token and widths; >= 99 % of one process's codes.
"""

from __future__ import annotations

from pathlib import Path

import torch

from llmcq.testing.gloo import run_ranks

WORKER = r'''
import torch
from llmcq.testing.gloo import join_ranks, leave_ranks, quantize_blocks

rank, world, out, (model_dir, calib_txt) = join_ranks()
quant = {"method": "slimllm", "quant_out": True, "special": {},
         "weight": {"bit": 2, "symmetric": False, "granularity": "per_group", "group_size": 8}}
g = torch.Generator().manual_seed(0)
batches = [torch.randint(0, 500, (2, 32), generator=g) for _ in range(4)]
ctx = quantize_blocks(quant, model_dir, calib_txt, batches, save=out + ".save")
algo = ctx.steps[0].algorithm
torch.save({"records": {k: (r.qweight, r.scale, r.zero, r.group_bits)
                        for k, r in ctx.records.items()},
            "allocation": algo.allocation, "kl": algo.kl_per_token,
            "summary": algo.summary()}, out)
leave_ranks()
'''


def test_two_gloo_ranks_choose_one_process_widths(tmp_path: Path, tiny_llama_dir: Path,
                                                  shared_data: Path) -> None:
    calib = str(shared_data / "wikitext2" / "valid.txt")
    (ref,) = run_ranks(WORKER, 1, tmp_path, str(tiny_llama_dir), calib, timeout=300)
    r0, r1 = run_ranks(WORKER, 2, tmp_path, str(tiny_llama_dir), calib, timeout=300)
    assert len(ref["records"]) == 14 and set(ref["records"]) == set(r0["records"])
    assert r0["allocation"] == r1["allocation"] == ref["allocation"]
    assert sum(ref["summary"]["k_per_linear"].values()) == 14
    # the KL sums were reduced: every rank holds the whole calibration set's (half the tokens
    # each); the first linears (identical inputs) to float rounding, later ones after their
    # inputs went through records where a few codes differ
    assert r0["kl"] == r1["kl"] and set(r0["kl"]) == set(ref["kl"])
    first = {f"model.layers.0.self_attn.{n}_proj" for n in "qkv"}
    for name, curve in ref["kl"].items():
        rel = 1e-5 if name in first else 1e-2
        for k, v in curve.items():
            assert abs(r0["kl"][name][k] - v) <= rel * v, (name, k, v, r0["kl"][name][k])
    for name, rec in r0["records"].items():
        for a, b in zip(rec, r1["records"][name], strict=True):
            assert torch.equal(a, b), name
    same = sum(int((rec[0] == ref["records"][n][0]).sum()) for n, rec in r0["records"].items())
    total = sum(rec[0].numel() for rec in ref["records"].values())
    assert same >= 0.99 * total, same / total
