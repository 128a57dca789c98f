"""Dispatched torch ops per TesseraQ training step on the tiny Llama (CPU): the launch count
that bounds a step on a GPU. One stage of 20 steps on block 0, counted by phase (the
params callback that builds the weights, the block forward, the loss, the rest: backward,
optimizer, sampling) with a TorchDispatchMode.

    python bench/step_ops.py --out bench/results/step_ops.json [--label NAME]

Rows merge into --out by label (run it on two commits to compare)."""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
from pathlib import Path
from typing import Any

from _common import REPO, write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "step_ops.json")
    ap.add_argument("--label", default="current")
    args = ap.parse_args()

    import llmcq.recon as R
    import llmcq.recon.train as T
    from llmcq.config.loader import resolve_config
    from llmcq.pipeline.runner import run
    from llmcq.testing.pytest_plugin import shared_data_dir
    from llmcq.testing.tiny_models import save_tiny_model, tiny_llama_config, train_tokenizer
    from torch.utils._python_dispatch import TorchDispatchMode

    data = shared_data_dir()
    assert data is not None, "set LLMCQ_SHARED_DATA"
    tmp = Path(tempfile.mkdtemp(prefix="llmcq-ops-"))
    tok = train_tokenizer([(data / "wikitext2/valid.txt").read_text()[:100000]], vocab_size=512)
    folder = save_tiny_model(tmp / "tiny", tiny_llama_config(vocab_size=len(tok)), tok)
    cfg = {"base": {"seed": 0, "device": "cpu"}, "model": {"type": "llama", "path": str(folder)},
           "calib": {"name": "wikitext2", "path": str(data / "wikitext2/valid.txt"),
                     "n_samples": 4, "seq_len": 32, "preproc": "wikitext2_gptq", "bs": 1,
                     "seed": 1},
           "quant": {"method": "tesseraq", "quant_out": True,
                     "weight": {"bit": 2, "symmetric": False, "granularity": "per_group",
                                "group_size": 32},
                     "special": {"iterations": 20, "batch_size": 2, "thresholds": [0.5],
                                 "weight_clip": False}},
           "save": {"save_path": str(tmp / "out")}}
    phase = ["other"]
    count: collections.Counter[str] = collections.Counter()

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                               kwargs: Any = None) -> Any:
            count[phase[0]] += 1
            return func(*args, **(kwargs or {}))

    def phased(name: str, fn: Any) -> Any:
        def wrapped(*a: Any, **k: Any) -> Any:
            prev, phase[0] = phase[0], name
            try:
                return fn(*a, **k)
            finally:
                phase[0] = prev
        return wrapped

    original, steps = T.reconstruct, []

    def counted(*a: Any, **k: Any) -> Any:
        if steps:  # the first block's stage only
            return original(*a, **k)
        k["params"], k["loss"] = phased("params", k["params"]), phased("loss", k["loss"])
        forward, T.functional_call = T.functional_call, phased("forward", T.functional_call)
        try:
            with Count():
                result = original(*a, **k)
        finally:
            T.functional_call = forward
        steps.append(result.steps)
        return result

    T.reconstruct = R.reconstruct = counted
    run(resolve_config(cfg), progress=False)
    per_step = {k: round(v / steps[0], 1) for k, v in count.items()}
    row = {"ops_per_step": round(sum(count.values()) / steps[0], 1), "by_phase": per_step,
           "steps": steps[0]}
    old = json.loads(args.out.read_text()) if args.out.exists() else {"rows": {}}
    old["what"] = __doc__.splitlines()[0]
    old["rows"][args.label] = row
    write_json(args.out, old)
    print(args.label, row)


if __name__ == "__main__":
    main()
