"""SliM-LLM against GPTQ at 2-bit and 3-bit g64 budgets on the bundled SmolLM2-135M.

Every row quantizes from the same calibration tokens as the first-wave table
(bench/algorithms.py: 32 x 512 wikitext2_gptq windows of ../shared/data/wikitext2/valid.txt,
seed 0) and is evaluated by llmcq's perplexity code on the first 16 windows x 2048 of the test
set (the whole set with --windows 0). One `llmcq run` process per row. Rows:

* gptq        GPTQ as the first-wave table runs it (act-order, static groups, true-sequential)
* gptq-noact  GPTQ with SliM-LLM's sweep (no act-order, true-sequential): the like-for-like
* slimllm     SliM-LLM with the reference's defaults (lambda_salience 1)
* slimllm-lN  SliM-LLM with lambda_salience N (SQC's weight on the salient weights)
* slimllm-k0  SQC alone: every group at the budget (salient_block: 0)
* slimllm-nosqc  SBA alone: mixed widths, min-max grids per group (sqc: False)
* slimllm-act    SliM-LLM on GPTQ's act-order sweep with static groups (llmcq's extension;
                 the reference has no act-order), like the gptq row's sweep
* omniquant      OmniQuant, learnable weight clipping only, 2 epochs (the first-wave rows)
* slimllm-plus   SliM-LLM+: the same clipping with SliM-LLM's per-group widths, 2 epochs

    .venv/bin/python bench/slimllm.py                          # every row (hours on 2 CPU cores)
    .venv/bin/python bench/slimllm.py --only w2g64 --methods gptq-noact,slimllm
    .venv/bin/python bench/slimllm.py --table-only

Rows are cached in bench/results/slimllm.json (keyed by the row's whole config), so runs
resume and several processes may fill one file (writes are merged under a lock).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
from pathlib import Path
from typing import Any

from _common import REPO, WIKI_TEST, markdown_table, run_config, write_json
from algorithms import GPTQ_SPECIAL, LEARNABLE, OMNI_EPOCHS, WEIGHT_ONLY, calib_section

SETTINGS = ("w2g64", "w3g64")
#: row name -> (quant.method, quant.special)
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "gptq": ("gptq", {**GPTQ_SPECIAL, "static_groups": True}),
    "gptq-noact": ("gptq", {**GPTQ_SPECIAL, "actorder": False}),
    "slimllm": ("slimllm", {}),
    "slimllm-l2": ("slimllm", {"lambda_salience": 2}),
    "slimllm-l4": ("slimllm", {"lambda_salience": 4}),
    "slimllm-l8": ("slimllm", {"lambda_salience": 8}),
    "slimllm-k0": ("slimllm", {"salient_block": 0, "nonsalient_block": 0}),
    "slimllm-nosqc": ("slimllm", {"sqc": False}),
    "slimllm-act": ("slimllm", {"actorder": True, "static_groups": True}),
    # SliM-LLM+ against OmniQuant (LWC only), both OMNI_EPOCHS epochs as the first-wave
    # table's OmniQuant rows; SliM-LLM+ runs SBA on each float block
    "omniquant": ("omniquant", {"lwc": True, "let": False, "epochs": OMNI_EPOCHS}),
    "slimllm-plus": ("slimllm_plus", {"epochs": OMNI_EPOCHS}),
}
#: extra quant.weight keys of a row (OmniQuant's llmc config: learnable grid, STE)
WEIGHT_EXTRA = {"omniquant": LEARNABLE}


def row_config(method: str, setting: str, calib: dict[str, Any], windows: int
               ) -> dict[str, Any]:
    name, special = METHODS[method]
    ev: dict[str, Any] = {"eval_pos": ["fake_quant"], "name": "wikitext2", "path": str(WIKI_TEST),
                          "seq_len": 2048, "bs": 1}
    if windows:
        ev["num_samples"] = windows
    return {"base": {"seed": 0}, "model": {"type": "llama"}, "calib": calib, "eval": ev,
            "quant": {"method": name,
                      "weight": {**WEIGHT_ONLY[setting], **WEIGHT_EXTRA.get(method, {})},
                      "special": dict(special), "quant_out": True}}


def key(cfg: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]


def merge_row(out: Path, k: str, row: dict[str, Any], meta: dict[str, Any]) -> None:
    """Add one row to the JSON file as it is now, under an exclusive lock."""
    (out.parent / "logs").mkdir(parents=True, exist_ok=True)
    with open(out.parent / "logs" / f"{out.stem}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = json.loads(out.read_text()) if out.exists() else {}
        rows = data.get("rows", {})
        rows[k] = row
        write_json(out, {**meta, "rows": rows})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--only", default=",".join(SETTINGS), help="comma-separated settings")
    ap.add_argument("--windows", type=int, default=16, help="0: the whole test set")
    ap.add_argument("--calib-n", type=int, default=32)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "slimllm.json")
    args = ap.parse_args()

    calib = calib_section(args.calib_n, args.calib_len, 0)
    meta = {"model": "SmolLM2-135M-Instruct (bundled GGUF Q4_1)",
            "eval": "wikitext2 test, seq_len 2048", "calib": calib, "windows": args.windows,
            "command": "bench/slimllm.py"}
    methods = [m for m in args.methods.split(",") if m in METHODS]
    settings = [s for s in args.only.split(",") if s in SETTINGS]
    log_dir = args.out.parent / "logs"
    for setting in [] if args.table_only else settings:
        for method in methods:
            cfg = row_config(method, setting, calib, args.windows)
            k = key(cfg)
            rows = json.loads(args.out.read_text()).get("rows", {}) if args.out.exists() else {}
            if k in rows and not args.force:
                continue
            try:
                res = run_config(cfg, label=f"slimllm-{method}-{setting}", log_dir=log_dir)
                t = res["timings_s"]
                row = {"method": method, "setting": setting,
                       "ppl": res["eval"]["fake_quant"]["wikitext2"]["ppl"],
                       "weight_bits_mean": res["compression"]["weight_bits_mean"],
                       "bits_per_param": res["compression"]["bits_per_param"],
                       "calib_s": t.get("calib_data", 0) + t.get("quantize", 0),
                       "peak_cpu_bytes": res["peak_memory_bytes"]["cpu"],
                       "recipe": res.get("recipe"), "config": cfg}
            except RuntimeError as exc:
                row = {"method": method, "setting": setting, "error": str(exc)[-500:]}
            merge_row(args.out, k, row, meta)
            print(f"{setting} {method}: {row.get('ppl', row.get('error'))}", flush=True)

    rows = json.loads(args.out.read_text()).get("rows", {}) if args.out.exists() else {}
    table = []
    for setting in settings:
        for method in methods:
            r = rows.get(key(row_config(method, setting, calib, args.windows)))
            if r is None:
                continue
            ks = (r.get("recipe") or [{}])[0].get("k_per_linear", {})
            table.append([setting, method, r.get("ppl", r.get("error", "-")),
                          r.get("weight_bits_mean", "-"), r.get("bits_per_param", "-"),
                          " ".join(f"{k}:{n}" for k, n in ks.items()) or "-",
                          r.get("calib_s", "-")])
    print(markdown_table(["setting", "method", "ppl", "weight bits", "bits/param (16-bit "
                          "scales)", "k per linear (k:count)", "calib s"], table))
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
