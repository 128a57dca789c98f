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

Settings: ``w2g64``, ``w3g64``, ``w4g64`` (asymmetric groups of 64, one width everywhere, or
SliM-LLM's per-group widths around it), and the bit budgets ``b2.5g64`` / ``b3.25g64``:
``quant.bit_budget`` (core's search, docs/mixed_precision.md) picks each linear's width among
2, 3, 4 so that bits per parameter *including* the 16-bit scales and the zero points stay
within 2.5 / 3.25, from the KL of each linear rounded alone on the first 8 calibration
samples; the row's algorithm then quantizes each linear at its width (SliM-LLM spreads it
over the groups). ``--bits-table`` prints perplexity against bits per parameter for GPTQ
(uniform, then searched) and SliM-LLM (uniform average, then searched).

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
import os
from pathlib import Path
from typing import Any

from _common import REPO, WIKI_TEST, markdown_table, write_json
from algorithms import GPTQ_SPECIAL, LEARNABLE, OMNI_EPOCHS, WEIGHT_ONLY, calib_section

SETTINGS = ("w2g64", "w3g64", "w4g64", "b2.5g64", "b3.25g64")
#: budget settings: bits per parameter including scales and zero points
BUDGETS = {"b2.5g64": 2.5, "b3.25g64": 3.25}
BUDGET_WIDTHS = [2, 3, 4]
#: rows that run at budget settings (the others need one width everywhere)
BUDGET_METHODS = ("gptq", "gptq-noact", "slimllm", "slimllm-act")
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
    budget = BUDGETS.get(setting)
    weight = WEIGHT_ONLY["w3g64" if budget is not None else setting]
    ev: dict[str, Any] = {"eval_pos": ["fake_quant"], "name": "wikitext2", "path": str(WIKI_TEST),
                          "seq_len": 2048, "bs": 1}
    if windows:
        ev["num_samples"] = windows
    quant: dict[str, Any] = {"method": name,
                             "weight": {**weight, **WEIGHT_EXTRA.get(method, {})},
                             "special": dict(special), "quant_out": True}
    if budget is not None:
        quant["bit_budget"] = {"target": budget, "count_overhead": True,
                               "widths": list(BUDGET_WIDTHS),
                               "n_samples": min(8, int(calib["n_samples"]))}
    return {"base": {"seed": 0}, "model": {"type": "llama"}, "calib": calib, "eval": ev,
            "quant": quant}


def runs_at(method: str, setting: str) -> bool:
    return setting not in BUDGETS or method in BUDGET_METHODS


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
    ap.add_argument("--full", action="store_true",
                    help="also evaluate each row on the whole test set (ppl_full)")
    ap.add_argument("--merge", type=Path, nargs="+", default=None,
                    help="merge part files into --out and print the tables")
    ap.add_argument("--bits-table", action="store_true",
                    help="print perplexity against bits per parameter and exit")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "slimllm.json")
    args = ap.parse_args()
    if args.merge:
        merge_parts(args.merge, args.out)
        args.table_only = True

    calib = calib_section(args.calib_n, args.calib_len, 0)
    meta = {"model": "SmolLM2-135M-Instruct (bundled GGUF Q4_1)",
            "eval": "wikitext2 test, seq_len 2048", "calib": calib, "windows": args.windows,
            "command": "bench/slimllm.py"}
    methods = [m for m in args.methods.split(",") if m in METHODS]
    settings = [s for s in args.only.split(",") if s in SETTINGS]
    log_dir = args.out.parent / "logs"
    for setting in [] if args.table_only or args.bits_table else settings:
        for method in methods:
            if not runs_at(method, setting):
                continue
            cfg = row_config(method, setting, calib, args.windows)
            k = key(cfg)
            rows = json.loads(args.out.read_text()).get("rows", {}) if args.out.exists() else {}
            if k in rows and not args.force:
                continue
            try:
                row = run_row(method, setting, cfg, log_dir, full=args.full)
            except RuntimeError as exc:
                row = {"method": method, "setting": setting, "error": str(exc)[-500:]}
            merge_row(args.out, k, row, meta)
            print(f"{setting} {method}: {row.get('ppl', row.get('error'))}", flush=True)

    rows = json.loads(args.out.read_text()).get("rows", {}) if args.out.exists() else {}
    if args.bits_table:
        print(bits_table(rows, calib, args.windows))
        return
    table = []
    for setting in settings:
        for method in methods:
            if not runs_at(method, setting):
                continue
            r = rows.get(key(row_config(method, setting, calib, args.windows)))
            if r is None:
                continue
            ks = (r.get("recipe") or [{}])[0].get("k_per_linear", {})
            table.append([setting, method, r.get("ppl", r.get("error", "-")), r.get("ppl_full", "-"),
                          r.get("weight_bits_mean", "-"), r.get("bits_per_param", "-"),
                          " ".join(f"{k}:{n}" for k, n in ks.items()) or "-",
                          r.get("calib_s", "-"), r.get("device", "CPU")])
    print(markdown_table(["setting", "method", "ppl (16 windows)", "ppl (whole test)", "weight bits", "bits/param (16-bit "
                          "scales)", "k per linear (k:count)", "calib s", "ran on"], table))
    print(f"\nwritten: {args.out}")


def run_row(method: str, setting: str, cfg: dict[str, Any], log_dir: Path, *, full: bool
            ) -> dict[str, Any]:
    """One ``llmcq run``; with ``full`` its fake-quant folder is also evaluated on the whole
    test set (``ppl_full``) by the same code as bench/learned_rounding.py."""
    import tempfile

    import learned_rounding as LR

    with tempfile.TemporaryDirectory(prefix="llmcq-slim-") as tmp:
        run_cfg = {**cfg, "save": {"save_fake": full, "save_path": str(Path(tmp) / "out")}}
        res = LR.run_config_keep(run_cfg, Path(tmp), label=f"slimllm-{method}-{setting}",
                                 log_dir=log_dir)
        t = res["timings_s"]
        row = {"method": method, "setting": setting,
               "ppl": res["eval"]["fake_quant"]["wikitext2"]["ppl"],
               "weight_bits_mean": res["compression"]["weight_bits_mean"],
               "bits_per_param": res["compression"]["bits_per_param"],
               "calib_s": t.get("calib_data", 0) + t.get("quantize", 0),
               "peak_cpu_bytes": res["peak_memory_bytes"]["cpu"],
               "peak_cuda_bytes": res["peak_memory_bytes"].get("cuda"),
               "recipe": res.get("recipe"), "bit_budget": _budget(res),
               "device": LR.device_name(), "config": cfg}
        if full:
            LR.FULL["on"] = True
            ev = LR.evaluate_folder(Path(tmp) / "out" / "fake_quant_model")
            row.update(ppl_folder=ev["ppl"], ppl_full=ev.get("ppl_full"),
                       windows_full=ev.get("windows_full"))
    if os.environ.get("LLMCQ_BENCH_COMMIT"):  # the tree a device call ran
        row["commit"] = os.environ["LLMCQ_BENCH_COMMIT"]
    return row


def merge_parts(parts: list[Path], into: Path) -> None:
    """Rows of part files (one per device job) into ``into``, replacing rows of the same
    config."""
    for p in parts:
        d = json.loads(p.read_text())
        meta = {k: v for k, v in d.items() if k != "rows"}
        for k, row in d["rows"].items():
            merge_row(into, k, row, meta)
    print(f"merged {len(parts)} part files into {into}")


def _budget(res: dict[str, Any]) -> dict[str, Any] | None:
    """The search's summary from results.json (the allocation table and errors are left in
    the run's log): planned and achieved averages, lambda, cost."""
    b = res.get("bit_budget")
    if not b:
        return None
    return {k: b.get(k) for k in ("target", "planned", "achieved", "predicted_kl", "lambda",
                                  "samples", "tokens", "block_forwards", "seconds")
            if k in b} | {"widths_count": _count(b.get("allocation", {}))}


def _count(allocation: dict[str, Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in allocation.values():
        out[str(v)] = out.get(str(v), 0) + 1
    return dict(sorted(out.items()))


def bits_table(rows: dict[str, Any], calib: dict[str, Any], windows: int) -> str:
    """Perplexity against bits per parameter: one-width rows and searched rows side by side."""
    series = {"gptq": ("GPTQ", ("w2g64", "b2.5g64", "w3g64", "b3.25g64", "w4g64")),
              "slimllm": ("SliM-LLM", ("w2g64", "b2.5g64", "w3g64", "b3.25g64", "w4g64"))}
    out = []
    for method, (label, settings) in series.items():
        for setting in settings:
            r = rows.get(key(row_config(method, setting, calib, windows)))
            if r is None or "ppl" not in r:
                continue
            how = (f"searched, target {BUDGETS[setting]}" if setting in BUDGETS
                   else "one width" if method == "gptq" else "per-group widths, one average")
            out.append([label, how, r["bits_per_param"], r["weight_bits_mean"], r["ppl"],
                        r.get("ppl_full", "-"), r.get("device", "CPU")])
    return markdown_table(["method", "widths", "bits/param", "weight bits", "ppl (16 windows)",
                           "ppl (whole test)", "ran on"], out)


if __name__ == "__main__":
    main()
