"""AWQ under data-parallel calibration: two gloo ranks on the CPU search their clip ranges on
the same tokens (a strided sample gathered from every rank, :class:`llmcq.stats.TokenSample`)
and their scales on all-reduced statistics, so both ranks publish identical scales and clips
and produce identical records; against one process they agree within float tolerance (the
gathered tokens come in rank order, so the search's sums run in another order: a code may
flip at a tie)."""

from __future__ import annotations

from pathlib import Path

import torch

from llmcq.testing.gloo import run_ranks

WORKER = r'''
import torch
from llmcq.testing.gloo import join_ranks, leave_ranks, quantize_blocks

rank, world, out, (model_dir, calib_txt) = join_ranks()
quant = {"method": "awq",
         "special": {"trans": True, "weight_clip": True, "clip_version": "v1", "n_grid": 10,
                     "do_gqa_trans": True},
         "weight": {"bit": 3, "symmetric": False, "granularity": "per_group", "group_size": 16}}
g = torch.Generator().manual_seed(0)
batches = [torch.randint(0, 500, (2, 32), generator=g) for _ in range(4)]
ctx = quantize_blocks(quant, model_dir, calib_txt, batches, save=out + ".save")
torch.save({"records": {k: (r.qweight, r.dequantize()) for k, r in ctx.records.items()},
            "clips": ctx.artefacts.get("clips"), "scales": ctx.artefacts.get("scales")}, out)
leave_ranks()
'''


def _launch(tmp: Path, world: int, model_dir: Path, calib: Path) -> list[dict]:
    return run_ranks(WORKER, world, tmp, str(model_dir), str(calib), timeout=300)


def test_two_gloo_ranks_clip_on_the_same_tokens(tmp_path: Path, tiny_llama_dir: Path,
                                               shared_data: Path) -> None:
    calib = shared_data / "wikitext2" / "valid.txt"
    (ref,) = _launch(tmp_path, 1, tiny_llama_dir, calib)
    r0, r1 = _launch(tmp_path, 2, tiny_llama_dir, calib)
    assert len(ref["clips"]) == 2 * 5 and len(ref["scales"]) == 14  # q/k never clipped
    for kind in ("scales", "clips"):
        assert set(r0[kind]) == set(r1[kind]) == set(ref[kind])
        for name, v in r0[kind].items():
            pairs = (zip(v, r1[kind][name], ref[kind][name], strict=True) if kind == "clips"
                     else [(v, r1[kind][name], ref[kind][name])])
            for a, b, c in pairs:
                assert torch.equal(a, b), name  # the ranks agree bit for bit
                assert torch.allclose(a, c, rtol=1e-4, atol=1e-5), name  # one process
    for name, (q, w) in ref["records"].items():
        q0, w0 = r0["records"][name]
        assert torch.equal(q0, r1["records"][name][0]), name
        assert torch.equal(w0, r1["records"][name][1]), name
        assert (q0 == q).float().mean() > 0.99, name
        assert torch.allclose(w0, w, rtol=1e-3, atol=1e-3 * float(w.abs().max())), name
