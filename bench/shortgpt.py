"""ShortGPT rows of the pruning table on the bundled SmolLM2-135M (30 blocks).

Rows: the dense model; ShortGPT removing 3, 6 and 9 blocks; GPTQ W4 g64 (asymmetric,
act-order with static groups) alone and after ShortGPT removing 3, 6 and 9 blocks. Every row
calibrates on the same tokens (wikitext2_gptq windows of ../shared/data/wikitext2/valid.txt,
seed 0; --calib-samples x --calib-len) and is evaluated on wikitext2 test at seq_len 2048
(the first --windows windows, all of them when 0). One `llmcq run` process per row, so
timings and peak memory are the row's own.

    OMP_NUM_THREADS=1 .venv/bin/python bench/shortgpt.py --windows 8   # a CPU smoke run
    .venv/bin/python bench/shortgpt.py --windows 0                     # the whole test set

Writes bench/results/shortgpt.json (or --out) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from _common import REPO, WIKI_TEST, WIKI_VALID, markdown_table, run_config, write_json

W4G64 = {"bit": 4, "symmetric": False, "granularity": "per_group", "group_size": 64}
GPTQ = {"method": "gptq", "weight": W4G64,
        "special": {"actorder": True, "static_groups": True, "percdamp": 0.01,
                    "blocksize": 128, "true_sequential": True}}


def rows() -> list[tuple[str, int, bool]]:
    """(label, blocks removed, GPTQ after)."""
    out = [("dense", 0, False)]
    out += [(f"shortgpt-{n}", n, False) for n in (3, 6, 9)]
    out += [("gptq-w4g64", 0, True)]
    out += [(f"shortgpt-{n}+gptq-w4g64", n, True) for n in (3, 6, 9)]
    return out


def config(n: int, gptq: bool, calib: dict[str, Any], windows: int) -> dict[str, Any]:
    pos = "fake_quant" if gptq else ("transformed" if n else "pretrain")
    ev: dict[str, Any] = {"eval_pos": [pos], "name": "wikitext2", "path": str(WIKI_TEST),
                          "seq_len": 2048, "bs": 1}
    if windows:
        ev["num_samples"] = windows
    cfg: dict[str, Any] = {"base": {"seed": 0}, "model": {"type": "llama"}, "eval": ev}
    if n or gptq:
        cfg["calib"] = calib
    if n:
        cfg["sparse"] = {"method": "ShortGPT", "weight": {"n_prune_layers": n}}
    if gptq:
        cfg["quant"] = GPTQ
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=8, help="eval windows of 2048 (0: all)")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--only", default="", help="comma-separated row labels")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "shortgpt.json")
    args = ap.parse_args()
    calib = {"name": "wikitext2", "path": str(WIKI_VALID), "n_samples": args.calib_samples,
             "seq_len": args.calib_len, "preproc": "wikitext2_gptq", "bs": 1, "seed": 0}
    wanted = set(filter(None, args.only.split(",")))
    results: list[dict[str, Any]] = []
    for label, n, gptq in rows():
        if wanted and label not in wanted:
            continue
        start = time.perf_counter()
        res = run_config(config(n, gptq, calib, args.windows), label=label,
                         log_dir=REPO / "bench" / "results" / "logs" / "shortgpt")
        pos = next(iter(res["eval"]))
        ev = res["eval"][pos]["wikitext2"]
        recipe = res.get("recipe") or []
        removed = next((s.get("removed_blocks") for s in recipe if s["method"] == "shortgpt"),
                       [])
        results.append({"row": label, "blocks_removed": n, "gptq_w4g64": gptq,
                        "removed_blocks": removed, "ppl": ev["ppl"], "tokens": ev["tokens"],
                        "windows": ev["windows"], "params_total":
                        res["compression"]["params_total"],
                        "wall_s": round(time.perf_counter() - start, 1),
                        "timings_s": res["timings_s"]})
        print(f"{label}: ppl {ev['ppl']:.3f} (removed {removed})", flush=True)
        write_json(args.out, {"model": "SmolLM2-135M-Instruct (bundled GGUF), 30 blocks",
                              "calibration": {k: calib[k] for k in ("n_samples", "seq_len",
                                                                    "preproc", "seed")},
                              "eval": {"dataset": "wikitext2 test", "seq_len": 2048,
                                       "windows": args.windows or "all"},
                              "command": "bench/shortgpt.py " + " ".join(
                                  f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                                  if k not in ("out",) and v not in ("", None)),
                              "rows": results})
    dense = next((r["ppl"] for r in results if r["row"] == "dense"), None)
    print(markdown_table(["row", "removed", "ppl", "vs dense", "params"],
                         [[r["row"], r["removed_blocks"], r["ppl"],
                           r["ppl"] / dense if dense else "", r["params_total"]]
                          for r in results]))


if __name__ == "__main__":
    main()
