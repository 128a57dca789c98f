"""Where TesseraQ starts from AWQ (issue 14): the three ways to compose them, on the bundled
SmolLM2-135M at W2 g64 (asymmetric), with a short CPU schedule (4 x 128 calibration tokens of
wikitext2/valid.txt, 2 hardening stages of ITERATIONS Adam steps, batch 2; AWQ's scale grid
of 5 points), perplexity on 4 windows x 512 of wikitext2 test:

* ``awq_v1_inplace+tq``: ``[awq, tesseraq]``, AWQ clips the weights in place (clip_version
  v1) and TesseraQ takes the clipped weights' min-max grid (weight_clip False);
* ``awq_v2+tq_v2``: AWQ publishes its clip ranges without touching the weights (v2) and
  TesseraQ bounds its grid with them (weight_clip True, clip_version v2);
* ``tq_alone_v1``: TesseraQ alone with its own clip search (weight_clip True, v1).

    .venv/bin/python bench/recipe_targets.py [--iterations 8] [--label after]

Appends the row set under ``--label`` to bench/results/recipe_targets.json (the labels say
which code ran: "before" = 3940dfa, reconstruction targets taken from the block as earlier
steps left it; "after" = the float block kept by the engine, Algorithm.float_targets).
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
from pathlib import Path
from typing import Any

from _common import DATA, REPO, write_json

OUT = REPO / "bench" / "results" / "recipe_targets.json"
W2 = {"bit": 2, "symmetric": False, "granularity": "per_group", "group_size": 64}
AWQ = {"trans": True, "trans_version": "v2", "n_grid": 5, "weight_clip": True,
       "clip_sym": False}


def variants(iterations: int) -> dict[str, tuple[Any, dict[str, Any], dict[str, Any]]]:
    tq = {"iterations": iterations, "batch_size": 2, "lr": 0.005, "scale_lr": 0.002,
          "thresholds": [0.5, 0.1]}
    learn = {**W2, "calib_algo": "learnable"}
    return {
        "awq_v1_inplace+tq": (["awq", "tesseraq"], W2, {
            "awq": {**AWQ, "clip_version": "v1"}, "tesseraq": {**tq, "weight_clip": False}}),
        "awq_v2+tq_v2": (["awq", "tesseraq"], learn, {
            "awq": {**AWQ, "clip_version": "v2"},
            "tesseraq": {**tq, "weight_clip": True, "clip_version": "v2"}}),
        "tq_alone_v1": ("tesseraq", W2, {**tq, "weight_clip": True, "clip_version": "v1"}),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=8)
    ap.add_argument("--label", default="after")
    ap.add_argument("--only", default=None, help="comma-separated variant names")
    args = ap.parse_args()
    from llmcq.config.loader import resolve_config
    from llmcq.model.loading import ModelSource, bundled_model_path, load_pretrained
    from llmcq.pipeline.runner import run

    path = bundled_model_path()
    model, tok = load_pretrained(ModelSource(path.parent, path.name))
    rows: dict[str, float] = {}
    for name, (method, weight, special) in variants(args.iterations).items():
        if args.only and name not in args.only.split(","):
            continue
        cfg = {"base": {"seed": 42, "device": "cpu"}, "model": {"type": "llama"},
               "calib": {"name": "wikitext2", "path": str(DATA / "wikitext2" / "valid.txt"),
                         "n_samples": 4, "seq_len": 128, "preproc": "wikitext2_gptq", "bs": 1,
                         "seed": 42},
               "eval": {"eval_pos": ["fake_quant"], "name": "wikitext2",
                        "path": str(DATA / "wikitext2" / "test.txt"), "seq_len": 512,
                        "num_samples": 4},
               "quant": {"method": method, "weight": weight, "special": special,
                         "quant_out": True},
               "save": {"save_path": f"/tmp/recipe_targets/{name}"}}
        res = run(resolve_config(cfg, overwrite=True), progress=False,
                  model=copy.deepcopy(model), tokenizer=tok)
        rows[name] = res["eval"]["fake_quant"]["wikitext2"]["ppl"]
        print(f"{args.label} {name}: {rows[name]:.4f}", flush=True)
    data = json.loads(OUT.read_text()) if OUT.exists() else {"runs": {}}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=REPO).stdout.strip()
    data["runs"].setdefault(args.label, {"iterations": args.iterations, "rows": {}})
    data["runs"][args.label]["rows"].update(rows)
    data["runs"][args.label]["head"] = commit
    data["protocol"] = __doc__.split("\n\n")[0]
    write_json(OUT, data)


if __name__ == "__main__":
    main()
