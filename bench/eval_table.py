"""Issue 19's closing table: zero-shot tasks, KL / top-1 and perplexity of the bundled
SmolLM2-135M-Instruct, float and quantized, in one table.

Rows: the float model; RTN W8 / W4 / W3 and GPTQ W3 / AWQ W3, asymmetric groups of 64. GPTQ
and AWQ calibrate on 32 x 512 wikitext2_gptq windows of wikitext2 valid (seed 0) with the
first-wave specials of bench/algorithms.py (its ``gptq`` and ``awq`` methods: GPTQ actorder,
static groups, true-sequential, quant_out; AWQ v2 scale search and asymmetric clip search).

Each row is ONE ``llmcq run`` with three eval blocks, at ``fake_quant`` (float row:
``pretrain``): ``type: tasks`` (PIQA validation, LAMBADA OpenAI test; full splits unless
--limit), ``type: ppl`` (wikitext2 test, every 2048-token window) and ``type: kl`` (the first
--kl-windows windows of --kl-seq-len tokens of wikitext2 test, against the float model's
log-probs, which the kl evaluator records at ``pretrain`` in the same run). Its results.json
gives the row.

Rows already in the output JSON (same settings) are not rerun, so an interrupted run resumes.

    OMP_NUM_THREADS=1 .venv/bin/python bench/eval_table.py              # every row
    .venv/bin/python bench/eval_table.py --rows float rtn-w3g64 --limit 100  # a check
    .venv/bin/python bench/eval_table.py --table-only --readme             # table + README

On the GPU machine (the ``device`` tool; the table's rows there ran as three row groups side by
side, merged here with --merge): the bundled GGUF travels in two halves (bench/gpu/README.md),
lm-eval 0.4.13 as a wheel, with our own and those of what the image lacks (datasets, dill,
multiprocess, pydantic, stevedore, gguf; sacrebleu & co. went too, the image has them), the data
(wikitext2 test/valid, piqa, lambada) as a tarball; then, with ``LLMCQ_SHARED_DATA`` and
``LLMCQ_BIN`` set, per group ``python3 bench/eval_table.py --bs 64 --rows ... --out G.json``
and ``.venv/bin/python bench/eval_table.py --merge a.json b.json c.json --readme`` here.

Writes bench/results/eval_table.json (with --limit N: eval_table_limit<N>.json) and prints a
markdown table; --readme puts that table into plugins/evaluators/tasks/README.md between its
``eval_table`` markers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, LLMCQ, REPO, WIKI_TEST, markdown_table, write_json  # noqa: E402
from algorithms import METHODS, WEIGHT_ONLY, calib_section, row_config  # noqa: E402

README = REPO / "plugins" / "evaluators" / "tasks" / "README.md"
MARK_START = "<!-- eval_table:start (bench/eval_table.py --table-only --readme) -->"
MARK_END = "<!-- eval_table:end -->"
TASKS = ["piqa", "lambada_openai"]
G64 = {"symmetric": False, "granularity": "per_group", "group_size": 64}
#: label -> (bench/algorithms.py method, setting) or a literal quant section (None: float)
ROWS: dict[str, Any] = {
    "float": None,
    "rtn-w8g64": {"method": "rtn", "weight": {**G64, "bit": 8}},
    "rtn-w4g64": ("rtn", "w4g64"),
    "rtn-w3g64": ("rtn", "w3g64"),
    "gptq-w3g64": ("gptq", "w3g64"),
    "awq-w3g64": ("awq", "w3g64"),
}
CALIB = {"n_samples": 32, "seq_len": 512, "seed": 0}


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """What every row shares; a JSON written under other settings is not resumed."""
    return {"tasks": TASKS, "limit": args.limit, "tasks_bs": args.bs,
            "ppl": {"dataset": "wikitext2 test", "seq_len": 2048,
                    "windows": args.ppl_windows or "all"},
            "kl": {"dataset": "wikitext2 test", "seq_len": args.kl_seq_len,
                   "windows": args.kl_windows},
            "calib": {"dataset": "wikitext2 valid", "preproc": "wikitext2_gptq", **CALIB,
                      "rows": ["gptq-w3g64", "awq-w3g64"]}}


def quant_section(label: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(quant, calib) of a row: bench/algorithms.py's config for its method and setting."""
    row = ROWS[label]
    if row is None or isinstance(row, dict):
        return row, None
    method, setting = row
    assert setting in WEIGHT_ONLY and method in METHODS
    cfg = row_config(method, setting, calib_section(CALIB["n_samples"], CALIB["seq_len"],
                                                    CALIB["seed"]), None)
    return cfg["quant"], (cfg["calib"] if method != "rtn" else None)


def config(label: str, args: argparse.Namespace, save: Path) -> dict[str, Any]:
    quant, calib = quant_section(label)
    pos = ["pretrain"] if quant is None else ["fake_quant"]
    tasks: dict[str, Any] = {"type": "tasks", "tasks": list(TASKS), "path": str(DATA),
                             "bs": args.bs, "eval_pos": pos}
    if args.limit is not None:
        tasks["limit"] = args.limit
    wiki = {"name": "wikitext2", "path": str(WIKI_TEST)}
    ev = [tasks,
          {"type": "ppl", **wiki, "seq_len": 2048, "bs": 1, "eval_pos": pos,
           **({"num_samples": args.ppl_windows} if args.ppl_windows else {})},
          # the float reference is recorded at pretrain in the same run
          {"type": "kl", **wiki, "seq_len": args.kl_seq_len, "num_samples": args.kl_windows,
           "bs": 1, "eval_pos": ["pretrain", *pos] if quant is not None else pos}]
    cfg: dict[str, Any] = {"base": {"seed": 0}, "model": {"type": "llama"}, "eval": ev,
                           "save": {"save_path": str(save)}}
    if quant is not None:
        cfg["quant"] = quant
    if calib is not None:
        cfg["calib"] = calib
    return cfg


def portable(obj: Any) -> Any:
    """The config as recorded: the machine's data root written as ``<data>``."""
    return json.loads(json.dumps(obj).replace(str(DATA), "<data>"))


def parse(res: dict[str, Any], label: str, args: argparse.Namespace) -> dict[str, Any]:
    pos = "pretrain" if ROWS[label] is None else "fake_quant"
    ev = res["eval"][pos]
    piqa, lam = ev["piqa"], ev["lambada_openai"]
    # the two wikitext2 entries: "wikitext2" and "wikitext2@<seq_len>" (the runner's keys
    # when a dataset comes twice with different seq_len)
    wiki = [v for k, v in ev.items() if k.split("@")[0] == "wikitext2"]
    ppl = next(v for v in wiki if "ppl" in v and v["seq_len"] == 2048)
    kl = next(v for v in wiki if "kl_mean" in v)
    return {"position": pos,
            "piqa": {k: piqa[k] for k in ("acc", "acc_norm", "n", "stderr", "acc_norm_stderr")},
            "lambada_openai": {k: lam[k] for k in ("acc", "ppl", "n", "stderr", "ppl_stderr")},
            "wikitext2_ppl": ppl["ppl"], "wikitext2_windows": ppl["windows"],
            "kl": {k: kl[k] for k in ("kl_mean", "kl_median", "kl_p99", "top1", "tokens",
                                      "windows", "seq_len")},
            "bits_per_param": (res.get("compression") or {}).get("bits_per_param"),
            "timings_s": {k: round(v, 1) for k, v in res["timings_s"].items()}}


def run_row(label: str, args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"llmcq-evaltable-{label}-") as tmp:
        save = Path(tmp) / "run"
        cfg = config(label, args, save)
        path = Path(tmp) / "config.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        cmd = [LLMCQ, "run", str(path), "--no-progress"]
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
        wall = time.perf_counter() - t
        log_dir.mkdir(parents=True, exist_ok=True)
        (log_dir / f"eval_table-{label}.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            raise RuntimeError(f"{label} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        res = json.loads((save / "results.json").read_text())
    return {"command": "llmcq run config.yaml --no-progress", "config": portable(cfg),
            **parse(res, label, args), "wall_s": round(wall, 1)}


def device() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return f"CPU ({platform.processor() or platform.machine()}), " \
           f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}"


def table(data: dict[str, Any]) -> str:
    s = data["settings"]
    head = ["row", "bits/param", "PIQA acc", "PIQA acc_norm", "LAMBADA acc", "LAMBADA ppl",
            f"KL mean ({s['kl']['windows']} x {s['kl']['seq_len']})", "KL p99", "top-1",
            "wikitext2 ppl (2048)"]
    rows = []
    for label in ROWS:
        r = data["rows"].get(label)
        if r is None:
            continue
        rows.append([label, r["bits_per_param"] or "16 (float)", f"{r['piqa']['acc']:.4f}",
                     f"{r['piqa']['acc_norm']:.4f}", f"{r['lambada_openai']['acc']:.4f}",
                     f"{r['lambada_openai']['ppl']:.2f}", f"{r['kl']['kl_mean']:.4g}",
                     f"{r['kl']['kl_p99']:.4g}", f"{r['kl']['top1']:.4f}",
                     f"{r['wikitext2_ppl']:.2f}"])
    n = {t: next((r[t]["n"] for r in data["rows"].values()), None) for t in TASKS}
    split = "full splits" if s["limit"] is None else f"limit {s['limit']} (first documents)"
    caption = (f"Bundled SmolLM2-135M-Instruct, {split}: PIQA n = {n['piqa']}, LAMBADA n = "
               f"{n['lambada_openai']}; device: {data['device']}.")
    return caption + "\n\n" + markdown_table(head, rows)


def write_readme(text: str) -> None:
    doc = README.read_text()
    if MARK_START not in doc:
        raise SystemExit(f"{README} has no {MARK_START!r} marker")
    pre, rest = doc.split(MARK_START, 1)
    _, post = rest.split(MARK_END, 1)
    README.write_text(f"{pre}{MARK_START}\n{text}\n{MARK_END}{post}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--limit", type=int, default=None, help="first N documents of each task")
    ap.add_argument("--bs", type=int, default=16, help="lm-eval batch size")
    ap.add_argument("--ppl-windows", type=int, default=None,
                    help="first N windows of 2048 (default: the whole test set)")
    ap.add_argument("--kl-windows", type=int, default=64)
    ap.add_argument("--kl-seq-len", type=int, default=512)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--table-only", action="store_true", help="print the table of the JSON")
    ap.add_argument("--merge", nargs="+", type=Path, default=None,
                    help="JSON files of other runs of this script (same settings, e.g. row "
                         "groups run side by side): their rows join --out")
    ap.add_argument("--readme", action="store_true",
                    help=f"write the table into {README.relative_to(REPO)}")
    args = ap.parse_args()
    out = args.out or REPO / "bench" / "results" / (
        "eval_table.json" if args.limit is None else f"eval_table_limit{args.limit}.json")
    want = settings(args)
    data: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    if args.merge:
        for part in args.merge:
            other = json.loads(part.read_text())
            if other["settings"] != want:
                raise SystemExit(f"{part} was written with other settings "
                                 f"({other['settings']})")
            data = data or {**other, "rows": {}}
            data.setdefault("parts", []).append(
                {"command": other["command"], "rows": list(other["rows"])})
            data["rows"].update(other["rows"])
        data["rows"] = {k: data["rows"][k] for k in ROWS if k in data["rows"]}
        write_json(out, data)
    elif args.table_only:
        if not data:
            raise SystemExit(f"{out} does not exist")
    else:
        if data and data["settings"] != want:
            raise SystemExit(f"{out} was written with other settings ({data['settings']}); "
                             "pass --out for a new file")
        data = data or {"command": None, "model": "bundled SmolLM2-135M-Instruct (GGUF Q4_1, "
                        "dequantized to float32)", "settings": want, "device": device(),
                        "rows": {}}
        data["command"] = "bench/eval_table.py " + " ".join(sys.argv[1:])
        for label in args.rows:
            if label in data["rows"]:
                print(f"{label}: in {out.name}, not rerun", flush=True)
                continue
            row = run_row(label, args, REPO / "bench" / "results" / "logs")
            row["device"] = device()
            data["rows"][label] = row
            write_json(out, data)
            print(f"{label}: {row['wall_s']:.0f} s, PIQA {row['piqa']['acc']:.4f}, LAMBADA "
                  f"{row['lambada_openai']['acc']:.4f} / {row['lambada_openai']['ppl']:.2f}, "
                  f"KL {row['kl']['kl_mean']:.4g}, ppl {row['wikitext2_ppl']:.2f}", flush=True)
    text = table(data)
    print(text)
    if args.readme:
        write_readme(text)


if __name__ == "__main__":
    main()
