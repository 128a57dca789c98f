"""Issue-3 accuracy table: every algorithm side by side on the bundled SmolLM2-135M.

Same calibration tokens for every row (wikitext2_gptq windows of ../shared/data/wikitext2/
valid.txt, seed 0), the full wikitext2 test set at seq_len 2048, one `llmcq run` process per
row (so timings and peak memory are the row's own). Peer implementations (llm-compressor,
the hqq package; see bench/peers/) quantize from the same tokens and are evaluated by the same
llmcq perplexity code; the table reports ours / peer.

Rows are cached in the JSON file (keyed by method, setting and calibration), so an
interrupted run resumes; --force recomputes.

    .venv/bin/python bench/algorithms.py                       # everything (hours on 2 CPU cores)
    .venv/bin/python bench/algorithms.py --only w3g64          # one setting
    .venv/bin/python bench/algorithms.py --methods rtn,gptq --windows 8 --out /tmp/quick.json

Prints a markdown table and writes bench/results/algorithms.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any

from _common import REPO, WIKI_TEST, WIKI_VALID, markdown_table, run_config, write_json

WEIGHT_ONLY = {
    "w4g64": {"bit": 4, "symmetric": False, "granularity": "per_group", "group_size": 64},
    "w3g64": {"bit": 3, "symmetric": False, "granularity": "per_group", "group_size": 64},
    "w2g64": {"bit": 2, "symmetric": False, "granularity": "per_group", "group_size": 64},
    "w3pc": {"bit": 3, "symmetric": False, "granularity": "per_channel"},
    # W4A16 per channel (issue 17's rotation rows); asymmetric like w3pc, as every
    # weight-only row of this table
    "w4pc": {"bit": 4, "symmetric": False, "granularity": "per_channel"},
}
# weight-activation rows: per-channel symmetric weights, per-token dynamic symmetric
# activations (llmc's W-A configs)
WEIGHT_ACT = {
    f"w{w}a{a}": ({"bit": w, "symmetric": True, "granularity": "per_channel"},
                  {"bit": a, "symmetric": True, "granularity": "per_token"})
    for w, a in ((8, 8), (6, 6), (4, 8), (4, 4))
}
#: W-A settings with a quantized KV cache (issue 17): (the W-A setting, quant.kvcache).
#: KV4 as QuaRot's W4A4KV4: every key and value on a 4-bit asymmetric grid per token and
#: head (one range per head_dim = 64 values; QuaRot's KV groups are the head dimension),
#: dynamic, the whole window through the quantized cache. No R3 (keys are not rotated).
KV_SETTINGS = {
    "w4a4kv4": ("w4a4", {"method": "naive", "bit": 4, "symmetric": False,
                         "granularity": "per_head"}),
}

AWQ_SPECIAL = {"trans": True, "trans_version": "v2", "weight_clip": True, "clip_sym": False}
GPTQ_SPECIAL = {"actorder": True, "static_groups": False, "percdamp": 0.01, "blocksize": 128,
                "true_sequential": True}
LEARNABLE = {"calib_algo": "learnable", "ste": True}
#: llm-compressor's symmetric grid (compressed-tensors: absmax / (2^(b-1) - 1/2)), for the
#: "-full" rows that compare with it like for like
FULL_RANGE = {"sym_range": "full"}
#: QuaRot as configs/quarot: Hadamard R1 (576) and R2 (64), online Hadamard R4 on down_proj
QUAROT = {"rotate_mode": "hadamard", "fp32_had": True, "online_rotate": True}
#: the offline rotations only (R1 + R2, fused into the weights): what llm-compressor's
#: SpinQuantModifier(rotations=["R1", "R2"]) does
QUAROT_R12 = {**QUAROT, "online_rotate": False}
#: SpinQuant with a CPU-sized schedule: the paper's lr 1.5 (cosine) and batch 8 per step,
#: but SPIN_STEPS steps of 4 windows: one pass over the 32 calibration windows of 512 tokens
#: (the paper: 100 steps of 8 = 800 samples of 2048); weights in float while learning (GPTQ
#: quantizes them after), activations fake-quantized
SPIN_STEPS = 8
SPINQUANT = {**QUAROT, "lr": 1.5, "lr_schedule": "cosine", "steps": SPIN_STEPS,
             "nsamples": None, "batch_size": 4, "micro_batch": 1,
             "train_weight_quant": "auto"}
#: the paper's schedule (100 Cayley steps of 8 samples, 800 samples of calib.seq_len), for
#: the GPU machine
SPINQUANT_PAPER = {**SPINQUANT, "steps": 100, "nsamples": 800, "batch_size": 8}


@dataclass(frozen=True)
class Method:
    """One row family of the table: llmc-style quant settings for our run, and the peer."""

    quant_method: Any
    settings: tuple[str, ...]
    peer: str | None = None
    special: dict[str, Any] = field(default_factory=dict)
    #: special for weight-activation rows, when it differs
    special_act: dict[str, Any] | None = None
    weight_extra: dict[str, Any] = field(default_factory=dict)
    act_extra: dict[str, Any] = field(default_factory=dict)
    quant_out: bool = False


#: OmniQuant trains each block for OMNI_EPOCHS epochs (the paper: 20) -- on 2 CPU cores the
#: paper's schedule would take hours per row; the README says so next to the numbers.
OMNI_EPOCHS = 2

METHODS: dict[str, Method] = {
    "rtn": Method("rtn", (*WEIGHT_ONLY, *WEIGHT_ACT), peer="rtn"),
    # llm-compressor's GPTQ fits every group's grid on the original weights before the sweep
    # (its default actorder "static"): our static_groups, so the peer row compares like with
    # like. llmc's configs leave static_groups off: the "gptq-dyn" row.
    "gptq": Method("gptq", tuple(WEIGHT_ONLY), peer="gptq",
                   special={**GPTQ_SPECIAL, "static_groups": True}, quant_out=True),
    "gptq-dyn": Method("gptq", ("w3g64",), special=GPTQ_SPECIAL, quant_out=True),
    "awq": Method("awq", tuple(WEIGHT_ONLY), peer="awq", special=AWQ_SPECIAL),
    "awq+gptq": Method(["awq", "gptq"], tuple(WEIGHT_ONLY),
                       special={"awq": AWQ_SPECIAL, "gptq": GPTQ_SPECIAL}, quant_out=True),
    "hqq": Method("hqq", tuple(WEIGHT_ONLY), peer="hqq",
                  special={"lp_norm": 0.7, "beta": 10, "kappa": 1.01, "iters": 20},
                  weight_extra={"round_zp": False}),
    "omniquant": Method("omniquant", (*WEIGHT_ONLY, *WEIGHT_ACT),
                        special={"lwc": True, "let": False, "epochs": OMNI_EPOCHS},
                        special_act={"lwc": True, "let": True, "alpha": 0.75, "let_lr": 0.001,
                                     "epochs": OMNI_EPOCHS},
                        weight_extra=LEARNABLE, quant_out=True),
    "smoothquant": Method("smoothquant", tuple(WEIGHT_ACT), peer="smoothquant",
                          special={"alpha": 0.5}),
    "osplus": Method("osplus", tuple(WEIGHT_ACT)),
    # like for like with the peers: their symmetric grid (weights and activations), and for
    # SmoothQuant their sequential pipeline's propagation through the quantized blocks
    "rtn-full": Method("rtn", tuple(WEIGHT_ACT), peer="rtn", weight_extra=FULL_RANGE,
                       act_extra=FULL_RANGE),
    "smoothquant-full": Method("smoothquant", tuple(WEIGHT_ACT), peer="smoothquant",
                               special={"alpha": 0.5}, weight_extra=FULL_RANGE,
                               act_extra=FULL_RANGE, quant_out=True),
    # OmniQuant at W4A8 with LET starting from SmoothQuant's alpha 0.5 instead of 0.75: with
    # 4-bit weights the larger alpha pushes too much activation range into the weights
    "omniquant-a50": Method("omniquant", ("w4a8",),
                            special_act={"lwc": True, "let": True, "alpha": 0.5,
                                         "let_lr": 0.001, "epochs": OMNI_EPOCHS},
                            weight_extra=LEARNABLE, quant_out=True),
    # learned rounding (issue 14), each with its reference's own schedule: TesseraQ llmc's
    # tesseraq_w_only.yml (10 hardening stages x 250 Adam steps, batch 2), started from AWQ's
    # scales and clips in one recipe, or alone (its own AWQ clip search on the fly, v1);
    # AutoRound auto-round 0.15.1's defaults (200 signed steps, batch 8, lr 1/200, best step
    # kept), quantized-chain inputs, against the auto-round package on the same tokens
    "tesseraq": Method(["awq", "tesseraq"], tuple(WEIGHT_ONLY),
                       special={"awq": AWQ_SPECIAL, "tesseraq": {"weight_clip": False}},
                       quant_out=True),
    "tesseraq-noawq": Method("tesseraq", tuple(WEIGHT_ONLY),
                             special={"weight_clip": True, "clip_version": "v1"},
                             quant_out=True),
    "autoround": Method("autoround", tuple(WEIGHT_ONLY), peer="autoround", quant_out=True),
    # GPTQ without llmc's true_sequential, which llm-compressor does not have
    "gptq-nots": Method("gptq", tuple(WEIGHT_ONLY), peer="gptq",
                        special={**GPTQ_SPECIAL, "static_groups": True,
                                 "true_sequential": False}, quant_out=True),
    # rotations (issue 17): QuaRot before the block loop, then RTN or GPTQ (GPTQ with the
    # gptq row's special); the r12 rows keep only the offline R1 + R2 (no online R4), like
    # for like with llm-compressor's SpinQuantModifier(R1, R2) + GPTQModifier ("-full": on
    # its symmetric grid too)
    "quarot-rtn": Method(["quarot", "rtn"], ("w4pc", "w8a8", "w4a8", "w4a4"),
                         special={"quarot": QUAROT, "rtn": {}}),
    "quarot-gptq": Method(["quarot", "gptq"], ("w4pc", "w8a8", "w4a8", "w4a4", "w4a4kv4"),
                          special={"quarot": QUAROT,
                                   "gptq": {**GPTQ_SPECIAL, "static_groups": True}},
                          quant_out=True),
    "quarot-gptq-r12": Method(["quarot", "gptq"], ("w4pc", "w8a8", "w4a8", "w4a4"),
                              peer="spinquant-gptq",
                              special={"quarot": QUAROT_R12,
                                       "gptq": {**GPTQ_SPECIAL, "static_groups": True}},
                              quant_out=True),
    "quarot-gptq-r12-full": Method(["quarot", "gptq"], ("w8a8", "w4a8", "w4a4"),
                                   peer="spinquant-gptq",
                                   special={"quarot": QUAROT_R12,
                                            "gptq": {**GPTQ_SPECIAL, "static_groups": True}},
                                   weight_extra=FULL_RANGE, act_extra=FULL_RANGE,
                                   quant_out=True),
    "spinquant-gptq": Method(["spinquant", "gptq"], ("w4pc", "w8a8", "w4a8", "w4a4"),
                             special={"spinquant": SPINQUANT,
                                      "gptq": {**GPTQ_SPECIAL, "static_groups": True}},
                             quant_out=True),
    "spinquant-gptq-100": Method(["spinquant", "gptq"], ("w4a4",),
                                 special={"spinquant": SPINQUANT_PAPER,
                                          "gptq": {**GPTQ_SPECIAL, "static_groups": True}},
                                 quant_out=True),
}


def calib_section(n: int, seq_len: int, seed: int = 0) -> dict[str, Any]:
    return {"name": "wikitext2", "path": str(WIKI_VALID), "n_samples": n, "seq_len": seq_len,
            "bs": 1, "preproc": "wikitext2_gptq", "seed": seed}


def row_config(method: str, setting: str, calib: dict[str, Any],
               windows: int | None) -> dict[str, Any]:
    m = METHODS[method]
    kv = None
    if setting in KV_SETTINGS:
        setting, kv = KV_SETTINGS[setting]
    if setting in WEIGHT_ONLY:
        weight, act = WEIGHT_ONLY[setting], None
    else:
        weight, act = WEIGHT_ACT[setting]
    quant: dict[str, Any] = {"method": m.quant_method, "weight": {**weight, **m.weight_extra}}
    special = m.special_act if (act is not None and m.special_act is not None) else m.special
    if act is not None:
        quant["act"] = {**act, **m.act_extra}
    if special:
        quant["special"] = special
    if m.quant_out:
        quant["quant_out"] = True
    if kv is not None:
        quant["kvcache"] = kv
    ev: dict[str, Any] = {"eval_pos": ["fake_quant"], "name": "wikitext2",
                          "path": str(WIKI_TEST), "seq_len": 2048, "bs": 1}
    if windows:
        ev["num_samples"] = windows
    return {"base": {"seed": 0}, "model": {"type": "llama"}, "calib": calib, "eval": ev,
            "quant": quant}


def key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def run_peer(peer: str, setting: str, calib: dict[str, Any], windows: int | None,
             log_dir: Path) -> dict[str, Any]:
    """Quantize with the peer in its own venv (bench/peers/run_peer.py), then evaluate its
    dense folder with llmcq's perplexity code (bench/peers/check_folder.py), applying the
    peer's own activation fake-quant semantics for W-A rows."""
    peers = REPO / "bench" / "peers"
    # the peers' interpreter: their venv here; $LLMCQ_PEERS_PYTHON on the GPU machine, where
    # the peer's wheels are carried onto python3's path (bench/gpu/README.md)
    py = Path(os.environ.get("LLMCQ_PEERS_PYTHON") or REPO / ".venv-peers" / "bin" / "python")
    if not py.exists():
        raise RuntimeError("peer venv missing: bash bench/peers/setup.sh")
    with tempfile.TemporaryDirectory(prefix="llmcq-peer-") as tmp:
        tokens = Path(tmp) / "calib.json"
        subprocess.run([sys.executable, str(peers / "make_calib.py"), "--out", str(tokens),
                        "--name", calib["name"], "--path", calib["path"],
                        "--n-samples", str(calib["n_samples"]),
                        "--seq-len", str(calib["seq_len"]), "--preproc", calib["preproc"],
                        "--seed", str(calib["seed"])], check=True, capture_output=True)
        if setting in KV_SETTINGS:
            raise RuntimeError(f"peer {peer}: no KV-cache quantization in the peer path")
        weight, act = (WEIGHT_ONLY[setting], None) if setting in WEIGHT_ONLY \
            else WEIGHT_ACT[setting]
        out = Path(tmp) / "model"
        cmd = [str(py), str(peers / "run_peer.py"), "--method", peer, "--bits",
               str(weight["bit"]), "--group-size", str(weight.get("group_size", -1)),
               "--sym" if weight["symmetric"] else "--asym", "--calib", str(tokens),
               "--out", str(out), "--threads", "1"]
        if act is not None:
            cmd += ["--act-bits", str(act["bit"]),
                    "--act-sym" if act["symmetric"] else "--act-asym"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        (log_dir / f"peer-{peer}-{setting}.log").write_text(proc.stdout + proc.stderr)
        meta_path = out / "peer_meta.json"
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        if proc.returncode in (2, 3):
            return {"error": f"{meta.get('status')}: {meta.get('reason')}"}
        if proc.returncode != 0:
            raise RuntimeError(f"peer {peer} {setting} failed: {proc.stderr[-2000:]}")
        ev = subprocess.run([sys.executable, str(peers / "check_folder.py"), str(out),
                             "--seq-len", "2048", "--windows", str(windows or 10**6),
                             "--threads", "1"],
                            capture_output=True, text=True)
        if ev.returncode != 0:
            raise RuntimeError(f"evaluating peer {peer} {setting} failed: {ev.stderr[-2000:]}")
        ppl = json.loads(ev.stdout.strip().splitlines()[-1])["ppl"]
        return {"ppl": ppl, "peer": meta.get("peer"), "versions": meta.get("versions"),
                "quantize_s": (meta.get("wall_s") or {}).get("quantize"),
                "peak_cpu_bytes": meta.get("peak_rss_bytes"),
                "wall_s": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--only", default=None, help="comma-separated settings")
    ap.add_argument("--windows", type=int, default=None)
    ap.add_argument("--calib-n", type=int, default=32)
    ap.add_argument("--calib-len", type=int, default=2048)
    ap.add_argument("--calib-seed", type=int, default=0,
                    help="which calibration windows are drawn (the table uses 0; other seeds "
                    "show how much a row moves with the calibration sample)")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--peers", default=None,
                    help="comma-separated peers to run (default: every method's peer)")
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--table-only", action="store_true",
                    help="print the table from the JSON; run nothing")
    ap.add_argument("--retry-errors", action="store_true",
                    help="rerun our rows that hold an error (e.g. killed for memory)")
    ap.add_argument("--peers-only", action="store_true",
                    help="run the selected methods' peer rows only (ours: not computed)")
    ap.add_argument("--measured-only", action="store_true",
                    help="the table leaves out rows not run yet")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "algorithms.json")
    args = ap.parse_args()

    calib = calib_section(args.calib_n, args.calib_len, args.calib_seed)
    data: dict[str, Any] = json.loads(args.out.read_text()) if args.out.exists() else {}
    rows: dict[str, Any] = data.get("rows", {})
    log_dir = args.out.parent / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    settings = [*WEIGHT_ONLY, *WEIGHT_ACT, *KV_SETTINGS]
    if args.only:
        settings = [s for s in settings if s in args.only.split(",")]
    methods = [m for m in args.methods.split(",") if m]

    measured: set[str] = set()

    def save() -> None:
        # merge into the file as it is now: runs with other --only/--methods may be writing
        # their rows to it at the same time
        on_disk = json.loads(args.out.read_text()).get("rows", {}) if args.out.exists() else {}
        merged = {**on_disk, **{k: rows[k] for k in measured if k in rows}}
        rows.clear()
        rows.update(merged)
        write_json(args.out, {"model": "SmolLM2-135M-Instruct (bundled GGUF Q4_1)",
                              "eval": "wikitext2 test, seq_len 2048",
                              "calib": calib, "windows": args.windows, "rows": rows})

    fkey = key("float", args.windows)
    if args.table_only:
        methods = [m for m in methods if m in METHODS]
    elif fkey not in rows or args.force:
        res = run_config({"model": {"type": "llama"},
                          "eval": {"eval_pos": ["pretrain"], "name": "wikitext2",
                                   "path": str(WIKI_TEST), "seq_len": 2048,
                                   **({"num_samples": args.windows} if args.windows else {})}},
                         label="float", log_dir=log_dir)
        measured.add(fkey)
        rows[fkey] = {"method": "float", "setting": "-",
                      "ppl": res["eval"]["pretrain"]["wikitext2"]["ppl"]}
        save()
    float_ppl = rows[fkey]["ppl"]
    print(f"float: {float_ppl:.3f}", flush=True)

    for setting in [] if args.table_only else settings:
        for method in methods:
            if setting not in METHODS[method].settings:
                continue
            rk = key(method, setting, calib, args.windows, row_config(method, setting, calib, args.windows))
            retry = args.retry_errors and "error" in rows.get(rk, {})
            if (rk not in rows or args.force or retry) and not args.peers_only:
                measured.add(rk)
                try:
                    res = run_config(row_config(method, setting, calib, args.windows),
                                     label=f"{method}-{setting}", log_dir=log_dir)
                    t = res["timings_s"]
                    rows[rk] = {"method": method, "setting": setting,
                                "ppl": res["eval"]["fake_quant"]["wikitext2"]["ppl"],
                                "calib_s": t.get("calib_data", 0) + t.get("quantize", 0),
                                "peak_cpu_bytes": res["peak_memory_bytes"]["cpu"],
                                "peak_cuda_bytes": res["peak_memory_bytes"]["cuda"],
                                "recipe": res.get("recipe")}
                except RuntimeError as exc:
                    rows[rk] = {"method": method, "setting": setting, "error": str(exc)[-500:]}
                save()
            peer = METHODS[method].peer
            pk = key("peer", peer, setting, calib, args.windows)
            wanted = args.peers is None or (peer in args.peers.split(","))
            if peer and wanted and not args.no_peers and (pk not in rows or args.force):
                measured.add(pk)
                try:
                    rows[pk] = {"method": f"peer:{peer}", "setting": setting,
                                **run_peer(peer, setting, calib, args.windows, log_dir)}
                except RuntimeError as exc:
                    rows[pk] = {"method": f"peer:{peer}", "setting": setting,
                                "error": str(exc)[-500:]}
                save()
            r = rows.get(rk, {})
            print(f"{setting} {method}: {r.get('ppl', r.get('error'))}", flush=True)

    table = []
    for setting in settings:
        for method in methods:
            if setting not in METHODS[method].settings:
                continue
            r = rows.get(key(method, setting, calib, args.windows, row_config(method, setting, calib, args.windows)), {})
            peer = METHODS[method].peer
            p = rows.get(key("peer", peer, setting, calib, args.windows), {}) if peer else {}
            ratio = r["ppl"] / p["ppl"] if "ppl" in r and "ppl" in p else None
            if args.measured_only and not r:
                continue
            err = "error: " + r["error"].strip().splitlines()[0][:60] if "error" in r else "-"
            table.append([setting, method, r.get("ppl", err),
                          p.get("ppl", (p.get("error") or "-")[:40] if p else "-"),
                          ratio if ratio is not None else "-",
                          r.get("calib_s", "-"), round(r["peak_cpu_bytes"] / 2**20)
                          if r.get("peak_cpu_bytes") else "-",
                          r["device"].split()[0] if r.get("device") else ("CPU" if r else "-")])
    print(f"\nfloat ppl {float_ppl:.3f}\n")
    print(markdown_table(["setting", "method", "ppl", "peer ppl", "ours/peer", "calib s",
                          "peak CPU MiB", "ran on"], table))
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
