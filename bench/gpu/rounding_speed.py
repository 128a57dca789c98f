"""Issue 14 on the GPU: seconds per block and peak GPU memory of TesseraQ (llmc's schedule)
and AutoRound (ours) against the auto-round package, in one process, on a Llama-2-7B-shaped
model with random bf16 weights (bench/gpu/common.py), 128 x 2048 random calibration tokens
in batches of 8, W2 g128 and W4 g128 asymmetric, lm_head kept in float.

    python bench/gpu/rounding_speed.py --out DIR [--layers 2] [--tq-layers 1] [--bits 2,4]

Each method runs on a fresh copy of the same model and tokens. Seconds are the whole block
loop (``quantize_model``: input capture, every block trained, quantized and advanced) divided
by the blocks; auto-round's are its ``quantize()`` call (its own capture and block loop).
Writes DIR/rounding_speed.json. ``--table PART.json ...`` merges part files (one per device
call) into bench/results/rounding_speed.json and prints the table with the package's ratios.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench as B  # noqa: E402
import common as C  # noqa: E402

#: llmc's tesseraq_w_only.yml schedule (the plugin's defaults): 10 stages x 250 Adam steps
TESSERAQ = {"weight_clip": False}
#: auto-round 0.15.1's defaults (the plugin's): 200 signed steps, batch 8, lr 1/200
AUTOROUND: dict[str, Any] = {}
#: the package's iters (its default 200)
PEER_ITERS = {"iters": 200}


def ours(model: Any, algo: str, calib: list[torch.Tensor], special: dict[str, Any]
         ) -> dict[str, Any]:
    B.SPECIAL[algo] = special
    r = B.run_ours(model, algo, calib)
    r.pop("_ctx")
    layers = model.config.num_hidden_layers
    return {"seconds": r["seconds"], "seconds_per_block": r["seconds"] / layers,
            "peak_gpu_bytes": r["peak_gpu_bytes"], "blocks": layers, "summary": r["summary"]}


def peer(model: Any, calib: list[torch.Tensor], bits: int) -> dict[str, Any]:
    """The auto-round package with its defaults on the same samples ([1, seqlen] each)."""
    from auto_round import AutoRound
    from auto_round.algorithms.quantization.sign_round.config import SignRoundConfig
    from auto_round.schemes import QuantizationScheme

    folder = B._model_folder(model)
    tok = B._peer_tokenizer(folder)
    samples = [row.unsqueeze(0) for b in calib for row in b]
    scheme = QuantizationScheme.from_dict({"bits": bits, "sym": False, "data_type": "int",
                                           "act_bits": 16, "group_size": 128})
    C.peak_reset()
    t0 = time.perf_counter()
    ar = AutoRound(model, tokenizer=tok, scheme=scheme, alg_configs=SignRoundConfig(iters=PEER_ITERS["iters"]),
                   dataset=samples, nsamples=len(samples), seqlen=int(samples[0].shape[1]),
                   batch_size=8, enable_torch_compile=False,
                   device_map="cuda" if torch.cuda.is_available() else "cpu")
    ar.quantize()
    C.sync()
    seconds = time.perf_counter() - t0
    layers = model.config.num_hidden_layers
    return {"seconds": seconds, "seconds_per_block": seconds / layers,
            "peak_gpu_bytes": C.peak_bytes(), "blocks": layers}


def guarded(fn: Any, *a: Any) -> dict[str, Any]:
    try:
        return fn(*a)
    except Exception as exc:  # noqa: BLE001
        return {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-3000:]}


def table(parts: list[Path], into: Path) -> None:
    """Merge part files; print seconds per block and peak GPU memory, the package / ours."""
    rows: list[dict[str, Any]] = []
    meta: dict[str, Any] = {}
    for p in parts:
        d = json.loads(p.read_text())
        meta = {k: d[k] for k in ("env", "shape", "tokens")}
        rows += [{**r, "part": str(p)} for r in d["rows"]]
    into.write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    peer = {r["bits"]: r for r in rows if r["method"].startswith("peer") and "error" not in r}
    print(f"{meta['shape']} shape, {meta['tokens']} tokens, {meta['env'].get('gpu')}")
    print("| method | bits | blocks | s per block | peak GPU GiB | package s / ours | "
          "ours GiB / package |")
    print("|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["bits"], r["method"])):
        if "error" in r:
            print(f"| {r['method']} | {r['bits']} | error: {r['error'][:80]} |")
            continue
        p = peer.get(r["bits"])
        ratio_s = ratio_m = "-"
        if p is not None and not r["method"].startswith("peer"):
            ratio_s = f"{p['seconds_per_block'] / r['seconds_per_block']:.2f}"
            ratio_m = f"{r['peak_gpu_bytes'] / p['peak_gpu_bytes']:.2f}"
        print(f"| {r['method']} | {r['bits']} | {r['blocks']} | {r['seconds_per_block']:.2f} | "
              f"{r['peak_gpu_bytes'] / 2**30:.1f} | {ratio_s} | {ratio_m} |")
    print(f"\nwritten: {into}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--table", type=Path, nargs="+", default=None)
    ap.add_argument("--into", type=Path,
                    default=Path(__file__).resolve().parents[1] / "results" / "rounding_speed.json")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--shape", default="7b")
    ap.add_argument("--layers", type=int, default=2, help="blocks for AutoRound and the peer")
    ap.add_argument("--tq-layers", type=int, default=1, help="blocks for TesseraQ")
    ap.add_argument("--bits", default="2,4")
    ap.add_argument("--n-samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--bs", type=int, default=8)
    ap.add_argument("--skip", default="", help="comma-separated: tesseraq,autoround,peer")
    ap.add_argument("--smoke", action="store_true", help="a few steps each (CPU check)")
    a = ap.parse_args()
    if a.table:
        table(a.table, a.into)
        return 0
    if a.out is None:
        ap.error("--out is needed to measure")
    if a.smoke:
        TESSERAQ.update(iterations=2, thresholds=[0.5, 0.1])
        AUTOROUND.update(iters=3)
        PEER_ITERS.update(iters=3)
    skip = set(a.skip.split(","))
    res: dict[str, Any] = {"env": C.env_info(), "shape": a.shape, "rows": []}
    base = C.build_model(a.shape, a.layers)
    calib = C.batches(C.random_tokens(a.n_samples, a.seq_len, base.config.vocab_size, seed=0),
                      a.bs)
    res["tokens"] = sum(int(b.numel()) for b in calib)
    def add(row: dict[str, Any]) -> None:  # written after every row: a cut call keeps them
        res["rows"].append(row)
        print(json.dumps(row, default=str)[:600], flush=True)
        C.write_json(a.out, "rounding_speed", res)

    for bits in [int(b) for b in a.bits.split(",")]:
        B.W4.update(bit=bits, symmetric=False, group_size=128)
        if "tesseraq" not in skip:
            m = C.build_model(a.shape, a.tq_layers)
            add({"method": "tesseraq", "bits": bits, **guarded(ours, m, "tesseraq", calib,
                                                                TESSERAQ)})
            del m
        if "autoround" not in skip:
            add({"method": "autoround", "bits": bits,
                 **guarded(ours, copy.deepcopy(base), "autoround", calib, AUTOROUND)})
        if "peer" not in skip:
            add({"method": "peer:auto-round", "bits": bits,
                 **guarded(peer, copy.deepcopy(base), calib, bits)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
