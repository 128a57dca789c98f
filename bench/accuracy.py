"""RTN accuracy on the bundled SmolLM2-135M: float vs W8, W4 g64, W4 g128, W3 g64, W2 g64.

Full wikitext2 test set (../shared/data/wikitext2/test.txt) at seq_len 2048 by default
(148 windows; about 10 minutes of CPU per evaluation on 2 cores). Each setting runs in its own
`llmcq run` process, so the timings and peak memory are its own.

    .venv/bin/python bench/accuracy.py                 # full test set
    .venv/bin/python bench/accuracy.py --windows 8     # quick look

Prints a markdown table and writes bench/results/accuracy.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from _common import REPO, WIKI_TEST, markdown_table, run_config, write_json

SETTINGS: list[tuple[str, dict[str, Any] | None]] = [
    ("float", None),
    ("RTN W8 per-channel asym", {"bit": 8, "symmetric": False, "granularity": "per_channel",
                                 "group_size": -1}),
    ("RTN W4 g64 asym", {"bit": 4, "symmetric": False, "granularity": "per_group",
                         "group_size": 64}),
    ("RTN W4 g128 asym", {"bit": 4, "symmetric": False, "granularity": "per_group",
                          "group_size": 128}),
    ("RTN W3 g64 asym", {"bit": 3, "symmetric": False, "granularity": "per_group",
                         "group_size": 64}),
    ("RTN W2 g64 asym", {"bit": 2, "symmetric": False, "granularity": "per_group",
                         "group_size": 64}),
]


def config_for(weight: dict[str, Any] | None, seq_len: int, windows: int | None) -> dict[str, Any]:
    ev: dict[str, Any] = {"eval_pos": ["pretrain"] if weight is None else ["fake_quant"],
                          "name": "wikitext2", "path": str(WIKI_TEST), "seq_len": seq_len,
                          "bs": 1}
    if windows:
        ev["num_samples"] = windows
    cfg: dict[str, Any] = {"base": {"seed": 42}, "model": {"type": "llama"}, "eval": ev}
    if weight is not None:
        cfg["quant"] = {"method": "rtn", "weight": weight}
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=None, help="evaluate only N windows")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "accuracy.json")
    ap.add_argument("--fresh", action="store_true",
                    help="ignore rows already in --out (default: reuse rows measured with the "
                         "same setting, windows and seq_len, so an interrupted run resumes)")
    args = ap.parse_args()

    done: dict[str, dict[str, Any]] = {}
    if args.out.exists() and not args.fresh:
        for rec in json.loads(args.out.read_text()).get("results", []):
            done[rec["setting"]] = rec

    rows, records = [], []
    float_ppl = None
    for label, weight in SETTINGS:
        prev = done.get(label)
        if (prev and prev.get("weight") == weight and prev.get("seq_len") == args.seq_len
                and (args.windows is None or prev.get("windows") == args.windows)
                and (args.windows is not None or prev.get("windows", 0) >= 148)):
            print(f"{label}: reusing ppl {prev['ppl']:.3f} from {args.out}", flush=True)
            rec = prev
            if weight is None:
                float_ppl = rec["ppl"]
            records.append(rec)
            rows.append([label, rec["ppl"], rec["ppl"] / float_ppl if float_ppl else float("nan"),
                         rec["quantize_s"], rec["eval_s"], rec["total_s"],
                         round(rec["peak_cpu_bytes"] / 2**20)])
            continue
        t0 = time.perf_counter()
        res = run_config(config_for(weight, args.seq_len, args.windows), label=label,
                         log_dir=args.out.parent / "logs")
        pos = "pretrain" if weight is None else "fake_quant"
        entry = res["eval"][pos]["wikitext2"]
        ppl = entry["ppl"]
        if weight is None:
            float_ppl = ppl
        t = res["timings_s"]
        rec = {"setting": label, "weight": weight, "ppl": ppl, "windows": entry["windows"],
               "seq_len": entry["seq_len"], "tokens": entry["tokens"],
               "quantize_s": t.get("quantize", 0.0), "eval_s": t.get(f"eval_{pos}"),
               "total_s": t["total"], "wall_s": time.perf_counter() - t0,
               "peak_cpu_bytes": res["peak_memory_bytes"]["cpu"],
               "peak_cuda_bytes": res["peak_memory_bytes"]["cuda"],
               "versions": res["versions"]}
        records.append(rec)
        rows.append([label, ppl, ppl / float_ppl if float_ppl else float("nan"),
                     rec["quantize_s"], rec["eval_s"], rec["total_s"],
                     round(rec["peak_cpu_bytes"] / 2**20)])
        print(f"{label}: ppl {ppl:.3f}", flush=True)
        write_json(args.out, {"model": "SmolLM2-135M-Instruct (bundled GGUF Q4_1)",
                              "dataset": "wikitext2 test", "results": records})
    print()
    print(markdown_table(["setting", "ppl", "ppl / float", "quantize s", "eval s", "total s",
                          "peak CPU MiB"], rows))
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
