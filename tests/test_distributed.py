"""Data-parallel calibration (llmcq.dist): 2 CPU processes with gloo give the records of
one process within float tolerance (GPTQ's Hessians and AWQ's statistics all-reduced)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = r'''
import sys
import torch
import torch.distributed as D

rank, world, rdv, model_dir, calib_txt, out = sys.argv[1:7]
rank, world = int(rank), int(world)
if world > 1:
    D.init_process_group("gloo", init_method=f"file://{rdv}", rank=rank, world_size=world)
torch.set_num_threads(1)
from llmcq.config.loader import resolve_config
from llmcq.model.loading import ModelSource, load_pretrained
from llmcq.pipeline.builtin import Builtin
from llmcq.pipeline.context import RunContext
from llmcq.pipeline.engine import quantize_model
from llmcq.pipeline.runner import _build_steps
from llmcq.plugins.manager import make_plugin_manager
from llmcq.quant.spec import WeightQuantSpec

results = {}
for algo in ("gptq", "awq"):
  model, tok = load_pretrained(ModelSource(model_dir))
  special = {"gptq": {"actorder": True, "static_groups": False, "true_sequential": True},
             "awq": {"trans": True, "weight_clip": False}}[algo]
  raw = {"base": {"seed": 0, "device": "cpu"}, "model": {"type": "llama", "path": model_dir},
         "quant": {"method": algo, "special": special,
                   "weight": {"bit": 3, "symmetric": False, "granularity": "per_group",
                              "group_size": 32}},
         "calib": {"name": "wikitext2", "path": calib_txt, "n_samples": 8, "seq_len": 32,
                   "bs": 2, "preproc": "wikitext2_gptq"},
         "save": {"save_path": out + ".save", "overwrite": True}}
  resolved = resolve_config(raw, overwrite=True)
  ctx = RunContext(resolved=resolved, device=torch.device("cpu"),
                   pm=make_plugin_manager(builtin=Builtin()), progress=False)
  ctx.weight = WeightQuantSpec.from_section(resolved.config.quant.weight)
  mspec = resolved.model[0]
  ctx.adapter = mspec.load_impl()(mspec, resolved.config.model)
  ctx.model = model
  _build_steps(ctx)
  g = torch.Generator().manual_seed(0)
  batches = [torch.randint(0, len(tok), (2, 32), generator=g) for _ in range(4)]
  quantize_model(ctx, batches)
  results[algo] = {k: (r.qweight, r.dequantize()) for k, r in ctx.records.items()}
torch.save(results, out)
if world > 1:
    D.destroy_process_group()
'''


def _launch(tmp: Path, world: int, model_dir: Path, calib: Path) -> list[Path]:
    script = tmp / "worker.py"
    script.write_text(WORKER)
    rdv = tmp / f"rdv-{world}"
    outs = [tmp / f"w{world}-r{r}.pt" for r in range(world)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(world), str(rdv),
                               str(model_dir), str(calib), str(outs[r])], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    for p in procs:
        log, _ = p.communicate(timeout=120)
        assert p.returncode == 0, log[-3000:]
    return outs


def test_two_gloo_ranks_match_one_process(tmp_path: Path, tiny_llama_dir: Path,
                                          shared_data: Path) -> None:
    calib = shared_data / "wikitext2" / "valid.txt"
    (single,) = _launch(tmp_path, 1, tiny_llama_dir, calib)
    ranks = _launch(tmp_path, 2, tiny_llama_dir, calib)
    for algo in ("gptq", "awq"):
        _compare(torch.load(single)[algo], torch.load(ranks[0])[algo],
                 torch.load(ranks[1])[algo])


def _compare(ref: dict, r0: dict, r1: dict) -> None:
    assert set(ref) == set(r0) == set(r1) and len(ref) == 14
    for name, (q, w) in ref.items():
        # both ranks solved the same (all-reduced) problem: identical records
        assert torch.equal(r0[name][0], r1[name][0]) and torch.equal(r0[name][1], r1[name][1])
        # and the one-process records within float tolerance (a code may flip at a tie)
        assert (r0[name][0] == q).float().mean() > 0.99, name
        assert torch.allclose(r0[name][1], w, rtol=1e-3, atol=1e-3 * float(w.abs().max())), name


def test_torchrun_llmcq_run_two_ranks(tmp_path: Path, tiny_llama_dir: Path,
                                      shared_data: Path) -> None:
    """``torchrun --nproc-per-node 2 --no-python llmcq run`` (gloo on CPUs): rank 0 alone
    evaluates and writes, each rank calibrates on half the batches, and GPTQ's all-reduced
    Hessians land where one process lands."""
    import json
    import shutil

    import yaml

    def config(save: Path) -> Path:
        cfg = {"base": {"seed": 0, "device": "cpu"},
               "model": {"type": "llama", "path": str(tiny_llama_dir)},
               "calib": {"name": "wikitext2", "path": str(shared_data / "wikitext2" / "valid.txt"),
                         "n_samples": 8, "seq_len": 64, "bs": 2, "preproc": "wikitext2_gptq",
                         "seed": 1},
               "eval": {"eval_pos": ["fake_quant"], "name": "wikitext2",
                        "path": str(shared_data / "wikitext2" / "test.txt"), "seq_len": 64,
                        "num_samples": 6},
               "quant": {"method": "gptq", "special": {"actorder": True},
                         "weight": {"bit": 3, "symmetric": False, "granularity": "per_group",
                                    "group_size": 32}},
               "save": {"save_path": str(save), "save_fake": True}}
        path = save.parent / (save.name + ".yaml")
        path.write_text(yaml.safe_dump(cfg))
        return path

    llmcq = shutil.which("llmcq", path=str(Path(sys.executable).parent))
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert llmcq and torchrun
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([llmcq, "run", str(config(tmp_path / "one")), "--no-progress"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", "--no-python",
                          llmcq, "run", str(config(tmp_path / "two")), "--no-progress"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, (two.stdout + two.stderr)[-3000:]
    assert two.stdout.count("results:") == 1  # rank 0 reports
    res1 = json.loads((tmp_path / "one" / "results.json").read_text())
    res2 = json.loads((tmp_path / "two" / "results.json").read_text())
    assert res2["ranks"] == 2 and res1["ranks"] == 1
    assert (tmp_path / "two" / "fake_quant_model").is_dir()
    p1 = res1["eval"]["fake_quant"]["wikitext2"]["ppl"]
    p2 = res2["eval"]["fake_quant"]["wikitext2"]["ppl"]
    assert p2 == pytest.approx(p1, rel=5e-3), (p1, p2)
