"""Issue-14 table: learned rounding (TesseraQ, AutoRound) beside every weight-only method and
the auto-round package, on the bundled SmolLM2-135M.

Every row quantizes from the same calibration token ids as the first-wave table
(bench/algorithms.py: 32 x 512 wikitext2_gptq windows of wikitext2/valid.txt, seed 0) and is
evaluated by llmcq's perplexity code twice: on the first 16 windows x 2048 of the wikitext2
test set (the wide table, the first-wave protocol) and on the whole test set (the headline
W2/W3 g64 rows). Ours: `llmcq run` with `save_fake`, whose dense folder is then evaluated;
the peer: bench/peers/run_peer.py in the peers' interpreter, whose dense folder is evaluated
the same way. One row per process (`--methods/--only` pick them), so jobs run side by side
on one GPU and are merged afterwards:

    python bench/learned_rounding.py --methods tesseraq --only w2g64 --out /tmp/p/tq-w2.json
    python bench/learned_rounding.py --merge /tmp/p/*.json          # -> bench/results/learned_rounding.json
    python bench/learned_rounding.py --table                        # print the table

Methods are bench/algorithms.py's (METHODS: rtn, gptq, awq, awq+gptq, omniquant, tesseraq,
tesseraq-noawq, autoround with its peer). Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import algorithms as A
from _common import LLMCQ, REPO, WIKI_TEST, markdown_table, write_json

RESULT = REPO / "bench" / "results" / "learned_rounding.json"
WINDOWS = 16
#: evaluate the whole test set too (off for a quick check on 2 CPU cores: --no-full)
FULL = {"on": True}
#: keys merged into our rows' quant.special (a diagnostic run at another schedule: --ours-special)
OURS_SPECIAL: dict[str, Any] = {}
ORDER = ("rtn", "gptq", "awq", "awq+gptq", "omniquant", "autoround", "peer:autoround",
         "tesseraq", "tesseraq-noawq")


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"


def evaluate_folder(folder: Path) -> dict[str, Any]:
    """Perplexity of a dense folder on the first WINDOWS windows and on the whole test set,
    with llmcq's loader and evaluator (on the GPU when there is one)."""
    import torch

    from llmcq.eval.ppl import perplexity
    from llmcq.model.loading import ModelSource, load_pretrained

    model, tok = load_pretrained(ModelSource(folder), torch_dtype="float32")
    ids = tok(WIKI_TEST.read_text(), return_attention_mask=False)["input_ids"]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    head, n16 = perplexity(model, ids, 2048, device=dev, max_windows=WINDOWS, progress=False)
    out: dict[str, Any] = {"ppl": head, "windows": n16}
    if FULL["on"]:
        full, n = perplexity(model, ids, 2048, device=dev, progress=False)
        out.update(ppl_full=full, windows_full=n)
    return out


def run_ours(method: str, setting: str, calib: dict[str, Any], log_dir: Path) -> dict[str, Any]:
    cfg = A.row_config(method, setting, calib, WINDOWS)
    if OURS_SPECIAL:
        cfg["quant"]["special"] = {**cfg["quant"].get("special", {}), **OURS_SPECIAL}
    with tempfile.TemporaryDirectory(prefix="llmcq-lr-") as tmp:
        cfg["save"] = {"save_fake": True, "save_path": str(Path(tmp) / "out")}
        res = run_config_keep(cfg, Path(tmp), label=f"{method}-{setting}", log_dir=log_dir)
        t = res["timings_s"]
        row = {"method": method, "setting": setting,
               "ppl_run": res["eval"]["fake_quant"]["wikitext2"]["ppl"],
               "calib_s": t.get("calib_data", 0) + t.get("quantize", 0),
               "peak_cpu_bytes": res["peak_memory_bytes"]["cpu"],
               "peak_cuda_bytes": res["peak_memory_bytes"]["cuda"],
               "recipe": res.get("recipe"), "summary": res.get("algorithms")}
        row.update(evaluate_folder(Path(tmp) / "out" / "fake_quant_model"))
    return row


def run_config_keep(cfg: dict[str, Any], tmp: Path, *, label: str, log_dir: Path
                    ) -> dict[str, Any]:
    """`llmcq run` on ``cfg`` whose save_path is inside ``tmp`` (kept for evaluation)."""
    import yaml

    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    proc = subprocess.run([LLMCQ, "run", str(path), "--no-progress"], capture_output=True,
                          text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    log_dir.mkdir(parents=True, exist_ok=True)
    (log_dir / f"{label}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{label} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads((Path(cfg["save"]["save_path"]) / "results.json").read_text())


def run_peer(peer: str, setting: str, calib: dict[str, Any], log_dir: Path,
             extra: list[str]) -> dict[str, Any]:
    peers = REPO / "bench" / "peers"
    py = Path(os.environ.get("LLMCQ_PEERS_PYTHON") or REPO / ".venv-peers" / "bin" / "python")
    weight = A.WEIGHT_ONLY[setting]
    with tempfile.TemporaryDirectory(prefix="llmcq-lr-peer-") as tmp:
        tokens = Path(tmp) / "calib.json"
        subprocess.run([sys.executable, str(peers / "make_calib.py"), "--out", str(tokens),
                        "--name", calib["name"], "--path", calib["path"],
                        "--n-samples", str(calib["n_samples"]),
                        "--seq-len", str(calib["seq_len"]), "--preproc", calib["preproc"],
                        "--seed", str(calib["seed"])], check=True, capture_output=True)
        out = Path(tmp) / "model"
        cmd = [str(py), str(peers / "run_peer.py"), "--method", peer, "--bits",
               str(weight["bit"]), "--group-size", str(weight.get("group_size", -1)),
               "--sym" if weight["symmetric"] else "--asym", "--calib", str(tokens),
               "--out", str(out), *extra]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        (log_dir / f"peer-{peer}-{setting}.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            raise RuntimeError(f"peer {peer} {setting} failed: {proc.stderr[-2000:]}")
        meta = json.loads((out / "peer_meta.json").read_text())
        row = {"method": f"peer:{peer}", "setting": setting, "peer": meta.get("peer"),
               "versions": meta.get("versions"), "settings": meta.get("settings"),
               "calib_s": (meta.get("wall_s") or {}).get("quantize"),
               "peak_cpu_bytes": meta.get("peak_rss_bytes"),
               "wall_s": time.perf_counter() - t0}
        row.update(evaluate_folder(out))
    return row


def measure(args: argparse.Namespace) -> None:
    calib = A.calib_section(args.calib_n, args.calib_len)
    log_dir = args.out.parent / "logs"
    rows: dict[str, Any] = {}
    dev = device_name()
    settings = [s for s in A.WEIGHT_ONLY if not args.only or s in args.only.split(",")]
    for setting in settings:
        for method in [m for m in args.methods.split(",") if m]:
            if method.startswith("peer:"):
                peer = method.split(":", 1)[1]
                try:
                    row = run_peer(peer, setting, calib, log_dir, args.peer_args.split())
                except RuntimeError as exc:
                    row = {"method": method, "setting": setting, "error": str(exc)[-800:]}
            else:
                try:
                    row = run_ours(method, setting, calib, log_dir)
                except RuntimeError as exc:
                    row = {"method": method, "setting": setting, "error": str(exc)[-800:]}
            row["device"] = dev
            if os.environ.get("LLMCQ_BENCH_COMMIT"):  # the tree a device call ran
                row["commit"] = os.environ["LLMCQ_BENCH_COMMIT"]
            rows[f"{method}|{setting}"] = row
            print(f"{setting} {method}: {row.get('ppl', row.get('error'))} "
                  f"full {row.get('ppl_full')}", flush=True)
            write_json(args.out, {"calib": calib, "windows": WINDOWS, "rows": rows})


def merge(paths: list[Path], into: Path) -> None:
    data = json.loads(into.read_text()) if into.exists() else {"rows": {}}
    for p in paths:
        part = json.loads(p.read_text())
        data["calib"] = {**part["calib"], "path": "wikitext2/valid.txt"}
        data["windows"] = part["windows"]
        data["rows"].update(part["rows"])
    data["model"] = "SmolLM2-135M-Instruct (bundled GGUF Q4_1), float32"
    data["eval"] = (f"llmcq perplexity, wikitext2 test, seq_len 2048: the first {WINDOWS} "
                    "windows (ppl) and the whole test set (ppl_full)")
    write_json(into, data)


def table(path: Path) -> None:
    """The table: both evaluations, ours / the package on each (AutoRound rows), calibration
    seconds, peak GPU and CPU memory."""
    data = json.loads(path.read_text())
    rows = data["rows"]
    out = []

    def mib(v: Any) -> Any:
        return round(v / 2**20) if v else "-"

    for setting in A.WEIGHT_ONLY:
        peer = rows.get(f"peer:autoround|{setting}", {})
        for method in ORDER:
            r = rows.get(f"{method}|{setting}")
            if r is None:
                continue
            ratios = ["-", "-"]
            if method == "autoround":
                for i, k in enumerate(("ppl", "ppl_full")):
                    if k in r and k in peer:
                        ratios[i] = r[k] / peer[k]
            out.append([setting, method, r.get("ppl", (r.get("error") or "-")[:40]),
                        r.get("ppl_full", "-"), *ratios, r.get("calib_s", "-"),
                        mib(r.get("peak_cuda_bytes")), mib(r.get("peak_cpu_bytes")),
                        r.get("device", "-")])
    print(markdown_table(["setting", "method", f"ppl ({WINDOWS} windows)", "ppl (whole test)",
                          f"ours/auto-round ({WINDOWS})", "ours/auto-round (whole)",
                          "calib s", "peak GPU MiB", "peak CPU MiB", "ran on"], out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="tesseraq")
    ap.add_argument("--only", default=None, help="comma-separated settings")
    ap.add_argument("--calib-n", type=int, default=32)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--peer-args", default="", help="extra bench/peers/run_peer.py flags")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--merge", type=Path, nargs="*", default=None)
    ap.add_argument("--into", type=Path, default=RESULT)
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--no-full", action="store_true", help="skip the whole-test evaluation")
    ap.add_argument("--ours-special", type=json.loads, default={},
                    help='JSON merged into our rows\' quant.special, e.g. \'{"iters": 20}\'')
    args = ap.parse_args()
    FULL["on"] = not args.no_full
    OURS_SPECIAL.update(args.ours_special)
    if args.merge is not None:
        merge(args.merge, args.into)
        table(args.into)
        return
    if args.table:
        table(args.into)
        return
    if args.out is None:
        ap.error("--out is needed to measure (one part file per job; --merge them)")
    measure(args)


if __name__ == "__main__":
    main()
