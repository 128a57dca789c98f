"""Merge rows that bench/algorithms.py wrote on the GPU machine (bench/gpu/issue3_gpu_rows.sh)
into a JSON table here: the row keys hash the row's config, which holds the data paths of the
machine that ran it, so each row is re-keyed with this checkout's paths and marked H100.

    .venv/bin/python bench/merge_gpu_rows.py GPU_JSON [--into bench/results/algorithms.json]

A missing ``--into`` file is started from GPU_JSON's header (for tables only the GPU ran, such
as the whole-test-set rows in bench/results/algorithms_fulltest_h100.json).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import algorithms as A
from _common import write_json

DEVICE = "H100 (GPU machine; same options and data as the CPU rows)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gpu_json", type=Path)
    ap.add_argument("--into", type=Path, default=A.REPO / "bench" / "results" / "algorithms.json")
    args = ap.parse_args()
    src = json.loads(args.gpu_json.read_text())
    dst = json.loads(args.into.read_text()) if args.into.exists() else {
        **src, "rows": {}, "calib": {**src["calib"], "path": str(A.WIKI_VALID)}}
    calib, windows = src["calib"], src["windows"]
    same = {k: v for k, v in calib.items() if k != "path"}
    if (same, windows) != ({k: v for k, v in dst["calib"].items() if k != "path"},
                           dst["windows"]):
        raise SystemExit(f"calibration/windows differ: {calib, windows} vs "
                         f"{dst['calib'], dst['windows']}")
    for r in src["rows"].values():
        if r["method"] == "float":
            fkey = A.key("float", windows)  # an existing float row (CPU) stays: the same value
            dst["rows"].setdefault(fkey, {**r, "device": DEVICE})
            continue
        cfg = A.row_config(r["method"], r["setting"], A.calib_section(
            calib["n_samples"], calib["seq_len"], calib["seed"]), windows)
        dst["rows"][A.key(r["method"], r["setting"], cfg["calib"], windows, cfg)] = {
            **r, "device": DEVICE}
        print(f"merged {r['setting']} {r['method']}: {r.get('ppl')}")
    write_json(args.into, dst)


if __name__ == "__main__":
    main()
