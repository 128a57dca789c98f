"""No-regression check for a core change: rerun rows of the first-wave table with today's code
and compare them with the committed ones (bench/results/algorithms.json).

Same script, options and calibration as the table (bench/algorithms.py), written to a
separate JSON, then joined row by row (the same key: method, setting, calibration, windows
and the row's whole config) and printed with the difference.

    .venv/bin/python bench/regression.py --run      # reruns the rows (about 45 min on 2 cores)
    .venv/bin/python bench/regression.py            # compares what is there

Writes bench/results/regression_issue13.json (the rows' after values and the comparison).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from _common import REPO, markdown_table, write_json

BEFORE = REPO / "bench" / "results" / "algorithms.json"
AFTER = REPO / "bench" / "results" / "regression_issue13_rows.json"
OUT = REPO / "bench" / "results" / "regression_issue13.json"
#: the issue's rows: RTN, GPTQ, AWQ, SmoothQuant and OmniQuant at W3 g64 and W6A6
METHODS = "rtn,gptq,awq,smoothquant,omniquant"
SETTINGS = "w3g64,w6a6"
TABLE_ARGS = ["--windows", "16", "--calib-n", "32", "--calib-len", "512"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", action="store_true", help="rerun the rows first")
    args = ap.parse_args()
    if args.run:
        subprocess.run([sys.executable, str(REPO / "bench" / "algorithms.py"), *TABLE_ARGS,
                        "--methods", METHODS, "--only", SETTINGS, "--no-peers",
                        "--out", str(AFTER)], check=True)
    before = json.loads(BEFORE.read_text())["rows"]
    after = json.loads(AFTER.read_text())["rows"]
    rows, table = [], []
    for k, a in after.items():
        b = before.get(k)
        if b is None or "ppl" not in a:
            continue
        diff = a["ppl"] - b["ppl"]
        rows.append({"key": k, "method": a["method"], "setting": a["setting"],
                     "ppl_before": b["ppl"], "ppl_after": a["ppl"], "diff": diff,
                     "rel_diff": diff / b["ppl"]})
        table.append([a["setting"], a["method"], b["ppl"], a["ppl"], diff,
                      f"{diff / b['ppl']:+.2e}"])
    table.sort(key=lambda r: (r[0], r[1]))
    missing = sorted({(v["method"], v["setting"]) for k, v in after.items()
                      if k not in before})
    print(markdown_table(["setting", "method", "ppl before", "ppl after", "diff", "rel"],
                         table))
    if missing:
        print(f"rows without a committed counterpart (config changed?): {missing}")
    write_json(OUT, {"before": str(BEFORE.relative_to(REPO)),
                     "after": str(AFTER.relative_to(REPO)), "args": TABLE_ARGS,
                     "methods": METHODS, "settings": SETTINGS, "rows": rows,
                     "unmatched": [list(m) for m in missing]})


if __name__ == "__main__":
    main()
