"""Issue-18 table: pruning the bundled SmolLM2-135M with Magnitude, Wanda and SparseGPT
(unstructured 50 %, 2:4, 4:8, SparseGPT 50 % + W4 g64 joint), beside llm-compressor's
``SparseGPTModifier`` and ``WandaPruningModifier`` (unstructured and 2:4) on the same tokens.

Every row prunes from the same calibration token ids (wikitext2_gptq windows of
wikitext2/valid.txt, seed 0; ``--calib-n`` x ``--calib-len``, llm-compressor's default
512 x 2048 is far too much for the CPU) and is evaluated by one function, llmcq's
perplexity code on a dense folder (bench/learned_rounding.py's ``evaluate_folder``: the first
``--windows`` windows x 2048 of the wikitext2 test set): ours through ``llmcq run`` with
``save_trans`` (pruned only) or ``save_fake`` (pruned and quantized), the peers through
bench/peers/run_prune_peer.py in the peers' interpreter (.venv-peers), the dense row on the
float folder bench/peers/export_model.py writes from the same GGUF.

    .venv/bin/python bench/pruning.py                       # every row
    .venv/bin/python bench/pruning.py --rows wanda-50,peer:wanda-50
    .venv/bin/python bench/pruning.py --table-only

Rows are kept in bench/results/pruning.json (keyed by name; a row already there with the same
settings is not run again unless --force), so a run resumes. ``ratio`` is ours / the peer's
perplexity for rows with a peer (goal <= 1.00); ``-out`` rows feed each block the pruned
blocks' outputs (``sparsity_out: True``), as llm-compressor's sequential pipeline does.
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

import learned_rounding as LR
from _common import REPO, WIKI_VALID, markdown_table, write_json

RESULT = REPO / "bench" / "results" / "pruning.json"
W4G64 = {"bit": 4, "symmetric": False, "granularity": "per_group", "group_size": 64}
#: row -> (sparse section, quant section or None); "dense" and "peer:*" rows are special
OURS: dict[str, tuple[dict[str, Any], dict[str, Any] | None]] = {
    "magnitude-50": ({"method": "Magnitude", "weight": {"sparsity": 0.5}}, None),
    "wanda-50": ({"method": "Wanda", "weight": {"sparsity": 0.5}}, None),
    "sparsegpt-50": ({"method": "SparseGPT", "weight": {"sparsity": 0.5}}, None),
    "wanda-2:4": ({"method": "Wanda", "weight": {"mask_structure": "2:4"}}, None),
    "sparsegpt-2:4": ({"method": "SparseGPT", "weight": {"mask_structure": "2:4"}}, None),
    "wanda-4:8": ({"method": "Wanda", "weight": {"mask_structure": "4:8"}}, None),
    "sparsegpt-4:8": ({"method": "SparseGPT", "weight": {"mask_structure": "4:8"}}, None),
    "sparsegpt-50+w4g64": ({"method": "SparseGPT", "weight": {"sparsity": 0.5}},
                           {"method": "RTN", "weight": W4G64}),
    # sparsity_out: True, each block calibrated on the pruned blocks' outputs, as
    # llm-compressor's sequential pipeline does (the rows above: llmc's default, dense outputs)
    "sparsegpt-50-out": ({"method": "SparseGPT", "weight": {"sparsity": 0.5},
                          "sparsity_out": True}, None),
    "wanda-50-out": ({"method": "Wanda", "weight": {"sparsity": 0.5}, "sparsity_out": True},
                     None),
    "sparsegpt-2:4-out": ({"method": "SparseGPT", "weight": {"mask_structure": "2:4"},
                           "sparsity_out": True}, None),
    "wanda-2:4-out": ({"method": "Wanda", "weight": {"mask_structure": "2:4"},
                       "sparsity_out": True}, None),
}
#: peer row -> (run_prune_peer method, structure)
PEERS = {"peer:sparsegpt-50": ("sparsegpt", "unstructured"),
         "peer:wanda-50": ("wanda", "unstructured"),
         "peer:sparsegpt-2:4": ("sparsegpt", "2:4"),
         "peer:wanda-2:4": ("wanda", "2:4")}
ROWS = ("dense", *OURS, *PEERS)


def calib_section(n: int, seq_len: int) -> dict[str, Any]:
    return {"name": "wikitext2", "path": str(WIKI_VALID), "n_samples": n, "seq_len": seq_len,
            "bs": 1, "preproc": "wikitext2_gptq", "seed": 0}


def run_ours(name: str, calib: dict[str, Any], log_dir: Path) -> dict[str, Any]:
    sparse, quant = OURS[name]
    cfg: dict[str, Any] = {"base": {"seed": 0}, "model": {"type": "llama"}, "calib": calib,
                           "sparse": sparse}
    if quant is not None:
        cfg["quant"] = quant
    with tempfile.TemporaryDirectory(prefix="llmcq-prune-") as tmp:
        folder = "fake_quant_model" if quant else "transformed_model"
        cfg["save"] = {"save_fake" if quant else "save_trans": True,
                       "save_path": str(Path(tmp) / "out")}
        res = LR.run_config_keep(cfg, Path(tmp), label=f"pruning-{name}", log_dir=log_dir)
        t = res["timings_s"]
        comp = res["compression"]
        row = {"config": {"sparse": sparse, "quant": quant},
               "sparsity": comp.get("sparsity"), "mask_sparsity": comp.get("mask_sparsity"),
               "bits_per_param": comp.get("bits_per_param") if quant else None,
               "prune_s": t.get("calib_data", 0) + t.get("quantize", 0),
               "peak_cpu_bytes": res["peak_memory_bytes"]["cpu"],
               "recipe": res.get("recipe")}
        row.update(LR.evaluate_folder(Path(tmp) / "out" / folder))
    return row


def run_peer(name: str, calib: dict[str, Any], log_dir: Path) -> dict[str, Any]:
    method, structure = PEERS[name]
    peers = REPO / "bench" / "peers"
    py = Path(os.environ.get("LLMCQ_PEERS_PYTHON") or REPO / ".venv-peers" / "bin" / "python")
    with tempfile.TemporaryDirectory(prefix="llmcq-prune-peer-") as tmp:
        tokens = Path(tmp) / "calib.json"
        subprocess.run([sys.executable, str(peers / "make_calib.py"), "--out", str(tokens),
                        "--name", calib["name"], "--path", calib["path"],
                        "--n-samples", str(calib["n_samples"]),
                        "--seq-len", str(calib["seq_len"]), "--preproc", calib["preproc"],
                        "--seed", str(calib["seed"])], check=True, capture_output=True)
        out = Path(tmp) / "model"
        cmd = [str(py), str(peers / "run_prune_peer.py"), "--method", method,
               "--mask-structure", structure, "--calib", str(tokens), "--out", str(out)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        log_dir.mkdir(parents=True, exist_ok=True)
        (log_dir / f"pruning-{name.replace(':', '-')}.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            raise RuntimeError(f"{name} failed: {proc.stderr[-2000:]}")
        meta = json.loads((out / "peer_meta.json").read_text())
        row = {"peer": meta.get("peer"), "versions": meta.get("versions"),
               "settings": meta.get("settings"), "sparsity": meta.get("measured_sparsity"),
               "prune_s": (meta.get("wall_s") or {}).get("quantize"),
               "peak_cpu_bytes": meta.get("peak_rss_bytes"),
               "wall_s": time.perf_counter() - t0}
        row.update(LR.evaluate_folder(out))
    return row


def run_dense() -> dict[str, Any]:
    sys.path.insert(0, str(REPO / "bench" / "peers"))
    from export_model import ensure_exported

    return {"sparsity": 0.0, **LR.evaluate_folder(ensure_exported())}


def table(data: dict[str, Any]) -> str:
    rows = data.get("rows", {})
    out = []
    for name in ROWS:
        r = rows.get(name)
        if r is None:
            continue
        peer = rows.get(f"peer:{name.removesuffix('-out')}", {})
        ratio = r["ppl"] / peer["ppl"] if "ppl" in r and "ppl" in peer else "-"
        sp = r.get("sparsity")
        out.append([name, r.get("ppl", r.get("error", "-")), ratio,
                    "-" if sp is None else round(sp, 4),
                    r.get("bits_per_param") or "-",
                    "-" if r.get("prune_s") is None else round(r["prune_s"], 1),
                    "-" if not r.get("peak_cpu_bytes") else round(r["peak_cpu_bytes"] / 2**20),
                    r.get("device", "CPU")])
    return markdown_table(["row", f"ppl ({data.get('windows')} windows x 2048)",
                           "ours / peer", "zeros in the pruned linears", "bits/param",
                           "prune s", "peak CPU MiB", "ran on"], out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--calib-n", type=int, default=32)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULT)
    args = ap.parse_args()
    LR.WINDOWS = args.windows
    LR.FULL["on"] = False
    calib = calib_section(args.calib_n, args.calib_len)
    settings = {"calib": {**calib, "path": "wikitext2/valid.txt"}, "windows": args.windows,
                "model": "SmolLM2-135M-Instruct (bundled GGUF Q4_1), float32",
                "eval": f"llmcq perplexity on a dense folder, wikitext2 test, seq_len 2048, "
                        f"the first {args.windows} windows",
                "command": "bench/pruning.py"}
    data = json.loads(args.out.read_text()) if args.out.exists() else {}
    same = all(data.get(k) == v for k, v in settings.items() if k != "command")
    rows: dict[str, Any] = data.get("rows", {}) if same else {}
    log_dir = args.out.parent / "logs"
    dev = LR.device_name()
    for name in [] if args.table_only else [r for r in args.rows.split(",") if r in ROWS]:
        if name in rows and "ppl" in rows[name] and not args.force:
            continue
        try:
            if name == "dense":
                row = run_dense()
            elif name in PEERS:
                row = run_peer(name, calib, log_dir)
            else:
                row = run_ours(name, calib, log_dir)
        except RuntimeError as exc:
            row = {"error": str(exc)[-800:]}
        row["device"] = dev
        rows[name] = row
        print(f"{name}: {row.get('ppl', row.get('error'))}", flush=True)
        write_json(args.out, {**settings, "rows": rows})
    print(table({**settings, "rows": rows}))
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
