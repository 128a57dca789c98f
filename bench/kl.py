"""KL divergence and top-1 agreement (``eval.type: kl``) beside perplexity on the bundled
SmolLM2-135M: the float model, round-to-nearest W8 / W4 / W3 (asymmetric groups of 64) and
GPTQ W3 g64 (32 x 512 wikitext2_gptq calibration windows of wikitext2 valid, seed 0).

Every row is one `llmcq run` with two eval blocks on the same windows (the first --windows
windows x --seq-len tokens of wikitext2 test, default 8 x 512): ``type: ppl`` and
``type: kl`` at pretrain and fake_quant. The kl evaluator caches the float log-probs at
pretrain on disk (windows x seq_len x 49,152 x 2 bytes: 403 MB at the defaults). Writes
bench/results/kl.json and prints the table; ``--report DIR`` also keeps the run folders
under DIR and writes ``llmcq report`` of all of them there.

    .venv/bin/python bench/kl.py                  # about 5 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import LLMCQ, REPO, WIKI_TEST, WIKI_VALID, markdown_table, write_json  # noqa: E402

OUT = REPO / "bench" / "results" / "kl.json"
G64 = {"symmetric": False, "granularity": "per_group", "group_size": 64}
ROWS: dict[str, dict[str, Any] | None] = {
    "float": None,
    "rtn-w8g64": {"method": "rtn", "weight": {**G64, "bit": 8}},
    "rtn-w4g64": {"method": "rtn", "weight": {**G64, "bit": 4}},
    "rtn-w3g64": {"method": "rtn", "weight": {**G64, "bit": 3}},
    "gptq-w3g64": {"method": "gptq", "weight": {**G64, "bit": 3}},
}


def config(quant: dict[str, Any] | None, windows: int, seq_len: int, save: Path
           ) -> dict[str, Any]:
    pos = ["pretrain"] if quant is None else ["pretrain", "fake_quant"]
    ev = {"name": "wikitext2", "path": str(WIKI_TEST), "seq_len": seq_len,
          "num_samples": windows, "eval_pos": pos}
    cfg: dict[str, Any] = {"base": {"seed": 0}, "model": {"type": "llama"},
                           "eval": [{**ev, "type": "ppl"}, {**ev, "type": "kl"}],
                           "save": {"save_path": str(save)}}
    if quant is not None:
        cfg["quant"] = quant
        if quant["method"] == "gptq":
            cfg["calib"] = {"name": "wikitext2", "path": str(WIKI_VALID), "n_samples": 32,
                            "seq_len": 512, "preproc": "wikitext2_gptq", "bs": 1, "seed": 0}
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--report", type=Path, default=None)
    args = ap.parse_args()
    root = args.report or Path("/tmp/llmcq-bench-kl")
    rows: dict[str, Any] = {}
    for label, quant in ROWS.items():
        save = root / label
        cfg = config(quant, args.windows, args.seq_len, save)
        path = root / f"{label}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        proc = subprocess.run([LLMCQ, "run", str(path), "--no-progress", "--overwrite"],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{label} failed:\n{proc.stderr[-3000:]}")
        res = json.loads((save / "results.json").read_text())
        pos = "pretrain" if quant is None else "fake_quant"
        e = res["eval"][pos]["wikitext2"]
        rows[label] = {"config": cfg["quant"] if quant else None, "position": pos,
                       **{k: e[k] for k in ("ppl", "kl_mean", "kl_median", "kl_p99", "top1",
                                            "tokens", "windows", "seq_len")},
                       "bits_per_param": res["compression"]["bits_per_param"],
                       "eval_s": {k: v for k, v in res["timings_s"].items()
                                  if k.startswith("eval_")}}
        print(label, {k: rows[label][k] for k in ("ppl", "kl_mean", "top1")}, flush=True)
    write_json(OUT, {"command": "bench/kl.py " + " ".join(sys.argv[1:]), "model":
                     "bundled SmolLM2-135M-Instruct (GGUF)", "rows": rows})
    print(markdown_table(["row", "bits/param", "wikitext2 ppl", "KL mean", "KL median",
                          "KL p99", "top-1"],
                         [[k, r["bits_per_param"] or 16, r["ppl"], r["kl_mean"],
                           r["kl_median"], r["kl_p99"], r["top1"]] for k, r in rows.items()]))
    if args.report is not None:
        subprocess.run([LLMCQ, "report", *(str(root / k) for k in ROWS), "--out",
                        str(root / "report.html")], check=True)


if __name__ == "__main__":
    main()
