"""Run llm-compressor's pruning modifiers on the bundled model; write a dense pruned HF folder.

Runs in the peers' venv (``bash bench/peers/setup.sh`` creates ``.venv-peers``), on the
calibration token ids ``make_calib.py`` writes, so a peer row prunes from exactly the tokens
llmcq's rows see. The folder is a plain float32 checkpoint whose decoder linears hold the
peer's pruned weights (zeros included); llmcq evaluates it like any checkpoint.

    .venv-peers/bin/python bench/peers/run_prune_peer.py --method sparsegpt \
        --mask-structure 2:4 --calib /tmp/calib.json --out /tmp/peer-sgpt-24

Methods: ``sparsegpt`` (``SparseGPTModifier``) and ``wanda`` (``WandaPruningModifier``), on
every ``Linear`` but ``lm_head``, with the peer's own defaults (block size 128, dampening
0.01) unless given. ``--mask-structure`` is ``unstructured`` (``--sparsity``) or ``N:M``
(llm-compressor's ``mask_structure`` names the pruned count first: our ``2:4`` keeps 2 of 4,
its ``2:4`` prunes 2 of 4, the same masks for 2:4 and 4:8; other N:M are translated).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from export_model import ensure_exported  # noqa: E402
from run_peer import (  # noqa: E402
    cpu_seconds,
    decoder_linears,
    load_calib,
    peak_rss_bytes,
    versions,
    write_dense,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", required=True, choices=("sparsegpt", "wanda"))
    ap.add_argument("--mask-structure", default="unstructured",
                    help="unstructured or N:M (N kept of every M, llmcq's convention)")
    ap.add_argument("--sparsity", type=float, default=0.5, help="unstructured sparsity")
    ap.add_argument("--calib", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS") or 2),
                    help="torch CPU threads (default: $OMP_NUM_THREADS, else 2)")
    ap.add_argument("--block-size", type=int, default=128, help="SparseGPT block size")
    ap.add_argument("--dampening-frac", type=float, default=0.01, help="SparseGPT damping")
    return ap.parse_args(argv)


def peer_structure(ours: str) -> tuple[str, float]:
    """llm-compressor's ``mask_structure`` and ``sparsity`` for our structure string."""
    if ours == "unstructured":
        return "0:0", -1.0
    n, m = (int(v) for v in ours.split(":"))
    return f"{m - n}:{m}", 1.0 - n / m


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(max(1, args.threads))
    torch.manual_seed(0)
    structure, sparsity = peer_structure(args.mask_structure)
    if sparsity < 0:
        sparsity = args.sparsity
    calib = load_calib(args.calib)
    model_dir = (args.model or ensure_exported()).resolve()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()

    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    common: dict[str, Any] = {"sparsity": sparsity, "mask_structure": structure,
                              "targets": ["Linear"], "ignore": ["re:.*lm_head"]}
    if args.method == "sparsegpt":
        mod = SparseGPTModifier(**common, block_size=args.block_size,
                                dampening_frac=args.dampening_frac)
    else:
        mod = WandaPruningModifier(**common)
    dataset = Dataset.from_dict({"input_ids": calib,
                                 "attention_mask": [[1] * len(s) for s in calib]})
    t0, c0 = time.perf_counter(), cpu_seconds()
    oneshot(model=model, processor=tok, recipe=[mod], dataset=dataset, output_dir=None,
            num_calibration_samples=len(calib), shuffle_calibration_samples=False,
            max_seq_length=max(len(s) for s in calib), batch_size=1)
    prune_s, prune_cpu_s = time.perf_counter() - t0, cpu_seconds() - c0

    lins = decoder_linears(model)
    updates = {n: p.detach().clone() for n, p in model.named_parameters()}
    zeros = sum(int((m.weight == 0).sum()) for m in lins.values())
    total = sum(m.weight.numel() for m in lins.values())
    out = args.out.resolve()
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    extra = write_dense(model_dir, tmp, updates, tok, sorted(lins))
    again = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=torch.float32).eval()
    ids = torch.tensor([calib[0][:128]])
    with torch.no_grad():
        diff = float((again(ids).logits - model(ids).logits).abs().max())
    if diff > 1e-3:
        raise RuntimeError(f"the dense folder does not reproduce the peer's forward ({diff})")
    meta = {"peer": "llm-compressor", "method": args.method, "versions": versions(),
            "settings": {"mask_structure_llmcq": args.mask_structure,
                         "mask_structure_peer": structure, "sparsity": sparsity,
                         "block_size": args.block_size, "dampening_frac": args.dampening_frac,
                         "threads": args.threads},
            "calib": {"file": str(args.calib.resolve()), "samples": len(calib),
                      "tokens": sum(map(len, calib))},
            "measured_sparsity": zeros / total, "max_logit_diff_vs_peer_forward": diff,
            "wall_s": {"quantize": round(prune_s, 2)}, "cpu_s": {"prune": round(prune_cpu_s, 2)},
            "peak_rss_bytes": peak_rss_bytes(), **extra, "status": "ok"}
    (tmp / "peer_meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    print(json.dumps({"out": str(out), "sparsity": meta["measured_sparsity"],
                      "wall_s": meta["wall_s"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
