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
