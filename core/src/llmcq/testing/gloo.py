"""Run a worker script as several gloo ranks on the CPU (data-parallel tests).

The worker is called as ``python worker.py RANK WORLD RENDEZVOUS OUT [ARGS...]``; it joins
``torch.distributed`` with ``init_method=f"file://{RENDEZVOUS}"`` when ``WORLD > 1`` and
``torch.save``s its result to ``OUT``. :func:`run_ranks` returns every rank's result."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

__all__ = ["run_ranks"]


def run_ranks(worker: str, world: int, tmp: Path, *args: str, timeout: float = 120,
              name: str = "worker") -> list[Any]:
    """Start ``world`` processes of the worker source ``worker``, wait, load their results.
    Single-threaded (``OMP_NUM_THREADS=1``) so sums run in the same order in every run."""
    import torch

    script = tmp / f"{name}.py"
    script.write_text(worker)
    outs = [tmp / f"{name}-w{world}-r{r}.pt" for r in range(world)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(world),
                               str(tmp / f"{name}-rdv{world}"), str(outs[r]), *args], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    try:
        for p in procs:
            log, _ = p.communicate(timeout=timeout)
            if p.returncode != 0:
                raise AssertionError(f"rank failed (exit {p.returncode}):\n{log[-3000:]}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [torch.load(o, weights_only=False) for o in outs]


def join_ranks() -> tuple[int, int, str, list[str]]:
    """In a worker: parse ``RANK WORLD RENDEZVOUS OUT [ARGS...]``, join the gloo group when
    ``WORLD > 1``, use one thread; returns ``(rank, world, out, args)``."""
    import torch
    import torch.distributed as dist

    rank, world, rdv, out, *args = sys.argv[1:]
    if int(world) > 1:
        dist.init_process_group("gloo", init_method=f"file://{rdv}", rank=int(rank),
                                world_size=int(world))
    torch.set_num_threads(1)
    return int(rank), int(world), out, args


def leave_ranks() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def quantize_blocks(quant: dict[str, Any], model_dir: str, calib_txt: str,
                    batches: list[Any], *, save: str) -> Any:
    """Run the block engine in process on a Llama-shaped checkpoint with ``quant`` (llmc
    keys) and ``batches`` (token ids; each rank passes all of them, the engine takes its
    share), through core's Llama layout (no family plugin); returns the ``RunContext``
    (``records``, ``artefacts``, ``steps``)."""
    import torch

    from llmcq.config.loader import resolve_config
    from llmcq.model.adapter import ModelAdapter
    from llmcq.model.layout import llama_like_layout
    from llmcq.model.loading import ModelSource, load_pretrained
    from llmcq.pipeline.builtin import Builtin
    from llmcq.pipeline.context import RunContext
    from llmcq.pipeline.engine import quantize_model
    from llmcq.pipeline.runner import _build_steps
    from llmcq.plugins.manager import make_plugin_manager

    class Layout(ModelAdapter):
        layout = llama_like_layout()

    model, _tok = load_pretrained(ModelSource(model_dir))
    raw = {"base": {"seed": 0, "device": "cpu"}, "model": {"type": "llama", "path": model_dir},
           "quant": quant,
           "calib": {"name": "wikitext2", "path": calib_txt, "n_samples": 8, "seq_len": 32,
                     "bs": 2, "preproc": "wikitext2_gptq"},
           "save": {"save_path": save, "overwrite": True}}
    resolved = resolve_config(raw, overwrite=True)
    ctx = RunContext(resolved=resolved, device=torch.device("cpu"),
                     pm=make_plugin_manager(builtin=Builtin()), progress=False)
    ctx.adapter = Layout(resolved.model[0], resolved.config.model)
    ctx.model = model
    _build_steps(ctx)
    quantize_model(ctx, batches)
    return ctx
