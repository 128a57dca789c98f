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
import sys
import torch
import torch.distributed as D

rank, world, rdv, out, model_dir, calib_txt = sys.argv[1:7]
rank, world = int(rank), int(world)
if world > 1:
    D.init_process_group("gloo", init_method=f"file://{rdv}", rank=rank, world_size=world)
torch.set_num_threads(1)
from llmcq.config.loader import resolve_config
from llmcq.model.adapter import ModelAdapter
from llmcq.model.layout import llama_like_layout
from llmcq.model.loading import ModelSource, load_pretrained
from llmcq.pipeline.builtin import Builtin
from llmcq.pipeline.context import RunContext
from llmcq.pipeline.engine import quantize_model
from llmcq.pipeline.runner import _build_steps
from llmcq.plugins.manager import make_plugin_manager


class Layout(ModelAdapter):  # core's Llama layout, roles declared (no family plugin needed)
    layout = llama_like_layout()


model, tok = load_pretrained(ModelSource(model_dir))
raw = {"base": {"seed": 0, "device": "cpu"}, "model": {"type": "llama", "path": model_dir},
       "quant": {"method": "awq",
                 "special": {"trans": True, "weight_clip": True, "clip_version": "v1",
                             "n_grid": 10, "do_gqa_trans": True},
                 "weight": {"bit": 3, "symmetric": False, "granularity": "per_group",
                            "group_size": 16}},
       "calib": {"name": "wikitext2", "path": calib_txt, "n_samples": 8, "seq_len": 32,
                 "bs": 2, "preproc": "wikitext2_gptq"},
       "save": {"save_path": out + ".save", "overwrite": True}}
resolved = resolve_config(raw, overwrite=True)
ctx = RunContext(resolved=resolved, device=torch.device("cpu"),
                 pm=make_plugin_manager(builtin=Builtin()), progress=False)
ctx.adapter = Layout(resolved.model[0], resolved.config.model)
ctx.model = model
_build_steps(ctx)
g = torch.Generator().manual_seed(0)
batches = [torch.randint(0, len(tok), (2, 32), generator=g) for _ in range(4)]
quantize_model(ctx, batches)
torch.save({"records": {k: (r.qweight, r.dequantize()) for k, r in ctx.records.items()},
            "clips": ctx.artefacts.get("clips"), "scales": ctx.artefacts.get("scales")}, out)
if world > 1:
    D.destroy_process_group()
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
