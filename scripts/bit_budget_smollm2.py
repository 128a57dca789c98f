"""quant.bit_budget on the bundled SmolLM2-135M: does the searched allocation beat the same
widths placed without the measured sensitivities, and where does it sit between the uniform
widths? Writes one JSON (``--out``); docs/mixed_precision.md quotes it.

1. ``llmcq budget configs/mix_bits/gptq_budget_2p5.yaml`` with a short calibration
   (``--samples`` x ``--seq-len`` wikitext2 valid tokens, all used by the search): the
   allocation at ``--target`` bits_per_param, widths 2/3/4 on the W* g64 asymmetric grid;
2. wikitext2 test perplexity (``--windows`` windows of 2048 tokens) of round-to-nearest
   models: the float model, uniform W2 and W3, the searched allocation (its quant.mix_bits
   snippet through ``llmcq run``), and the same per-linear widths permuted within each linear
   kind (q_proj, ..., down_proj: the same bits) in reverse order of sensitivity and at random.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bit_budget_smollm2.py --out /tmp/bb.json
    # one CPU thread: 150-220 s of search (128 tokens) and 30-50 s per perplexity row
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "mix_bits" / "gptq_budget_2p5.yaml"
G64 = {"symmetric": False, "granularity": "per_group", "group_size": 64}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--target", type=float, default=2.5)
    ap.add_argument("--samples", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    import torch

    from llmcq.config.loader import load_config, resolve_config
    from llmcq.model.loading import ModelSource, bundled_model_path, load_pretrained
    from llmcq.pipeline.runner import run, search_budget
    from llmcq.quant.rtn import rtn_record
    from llmcq.quant.spec import PerGroup, WeightQuantSpec
    from llmcq.testing.paths import shared_data_dir

    data = shared_data_dir()
    assert data is not None, "set LLMCQ_SHARED_DATA"
    path = bundled_model_path()
    assert path is not None
    model0, tok0 = load_pretrained(ModelSource(path.parent, path.name))
    out: dict[str, Any] = {"config": str(CONFIG.relative_to(REPO)), "args": vars(args),
                           "rows": []}

    with tempfile.TemporaryDirectory() as tmp:
        snippet = Path(tmp) / "alloc.yaml"
        sets = [f"base.device={args.device}", f"calib.path={data}/wikitext2/valid.txt",
                f"calib.n_samples={args.samples}", f"calib.seq_len={args.seq_len}",
                f"quant.bit_budget.n_samples={args.samples}",
                f"quant.bit_budget.target={args.target}",
                f"quant.bit_budget.save_path={snippet}", f"save.save_path={tmp}/unused"]
        resolved = load_config(CONFIG, sets, overwrite=True)
        bb = search_budget(resolved, progress=False, model=copy.deepcopy(model0),
                           tokenizer=copy.deepcopy(tok0))
        mix = yaml.safe_load(snippet.read_text())["quant"]["mix_bits"]
    out["search"] = {k: bb[k] for k in ("planned", "seconds", "block_forwards", "tokens",
                                        "predicted_kl", "table")}
    print("\n".join(bb["table"]), flush=True)
    alloc, errors, params = bb["allocation"], bb["errors"], bb["params"]

    # the same widths within each linear kind, reversed by sensitivity and shuffled
    kinds: dict[str, list[str]] = {}
    for n in alloc:
        kinds.setdefault(n.rsplit(".", 1)[-1], []).append(n)
    reverse, shuffled = {}, {}
    rng = random.Random(0)
    for names in kinds.values():
        widths = sorted(alloc[n] for n in names)
        for n, b in zip(sorted(names, key=lambda n: -errors[n]["2"]), widths, strict=True):
            reverse[n] = b
        rng.shuffle(widths)
        shuffled.update(zip(names, widths, strict=True))

    ev = {"name": "wikitext2", "path": str(data / "wikitext2" / "test.txt"), "seq_len": 2048,
          "bs": 1, "num_samples": args.windows}
    ignored = resolved.config.ignored_layers
    ign = None if ignored is None else ignored.model_dump(mode="json", exclude_unset=True)

    def row(label: str, quant: dict[str, Any] | None = None,
            widths: dict[str, int] | None = None) -> None:
        model = copy.deepcopy(model0)
        if widths is not None:  # rounded here, evaluated as the float model
            with torch.no_grad():
                for n, b in widths.items():
                    lin = model.get_submodule(n)
                    spec = WeightQuantSpec(bits=b, symmetric=False, granularity=PerGroup(64))
                    lin.weight.data = rtn_record(lin, spec).dequantize(lin.weight.dtype)
        pos = "fake_quant" if quant else "pretrain"
        with tempfile.TemporaryDirectory() as tmp:
            cfg: dict[str, Any] = {"base": {"device": args.device}, "model": {"type": "llama"},
                                   "eval": {**ev, "eval_pos": [pos]},
                                   "save": {"save_path": tmp}}
            if quant:
                cfg["quant"] = quant
                if "mix_bits" in quant and ign:
                    cfg["ignored_layers"] = ign
            start = time.perf_counter()
            res = run(resolve_config(cfg), progress=False, model=model,
                      tokenizer=copy.deepcopy(tok0))
        r: dict[str, Any] = {"label": label, "ppl": res["eval"][pos]["wikitext2"]["ppl"],
                             "seconds": round(time.perf_counter() - start, 1)}
        if quant:
            r.update({k: res["compression"][k] for k in ("weight_bits_mean",
                                                          "bits_per_param")})
        if widths is not None:
            r["same_bits_as_search"] = sum(params[n] * b for n, b in widths.items()) == \
                sum(params[n] * b for n, b in alloc.items())
        print(r, flush=True)
        out["rows"].append(r)
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")

    row("float")
    row("rtn W2 g64", {"method": "rtn", "weight": {"bit": 2, **G64}})
    row(f"rtn searched {args.target} bits_per_param",
        {"method": "rtn", "weight": {"bit": 3, **G64}, "mix_bits": mix})
    row("rtn W3 g64", {"method": "rtn", "weight": {"bit": 3, **G64}})
    row("rtn, the searched widths in reverse order of sensitivity", widths=reverse)
    row("rtn, the searched widths shuffled", widths=shuffled)


if __name__ == "__main__":
    main()
