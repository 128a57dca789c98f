"""mixpack exports of the bundled SmolLM2-135M: bytes on disk against the fake-quant folder
(the dense float32 model) and the reloaded model against llmcq's in-process fake-quant model.

    .venv/bin/python bench/mixpack_size.py [--windows 4] [--seq-len 512] [--threads N]

One run per setting (in process, ``save_fake`` + ``backends: [mixpack]``): RTN W4 g128
asymmetric and W3 g64 symmetric (uniform records), and ``mixed_rtn`` (the test-only
mixed-precision quantizer of llmcq_mixpack.testing (plugins/backends/mixpack): per linear, the
quarter of groups with the largest RTN error at N bits get N+1, the quarter with the
smallest N-1; mean exactly N) at 3 bits g64 asymmetric and 4 bits g128 symmetric, until
SliM-LLM lands. For each: the bytes of both folders' safetensors, the packed linears' bytes
by kind (codes, scales, zeros, bit maps) as bits per quantized weight, results.json's
compression fields, ``load_model``'s time, the max |logit difference| of the reloaded model
against the fake-quant model over the evaluated windows, both perplexities on the first
``--windows`` windows of wikitext2 test, and one forward's time for each model. Prints a
table and writes bench/results/mixpack.json.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import REPO, WIKI_TEST, markdown_table, write_json
from llmcq.config.loader import resolve_config
from llmcq.eval.ppl import window_losses
from llmcq.model.loading import ModelSource, bundled_model_path, load_pretrained
from llmcq.pipeline.runner import run
from llmcq.plugins import registry
from llmcq_mixpack import load_model
from llmcq_mixpack import testing as MB
from safetensors.torch import load_file

SETTINGS = {
    "rtn_w4_g128_asym": ("rtn", {"bit": 4, "symmetric": False, "granularity": "per_group",
                                 "group_size": 128}),
    "rtn_w3_g64_sym": ("rtn", {"bit": 3, "symmetric": True, "granularity": "per_group",
                               "group_size": 64}),
    "mixed_w3_g64_asym": ("mixed_rtn", {"bit": 3, "symmetric": False,
                                        "granularity": "per_group", "group_size": 64}),
    "mixed_w4_g128_sym": ("mixed_rtn", {"bit": 4, "symmetric": True,
                                        "granularity": "per_group", "group_size": 128}),
}
#: packed tensors by the suffix of their key
KINDS = {"codes": ".codes_b", "scales": ".scale", "zeros": ".zero", "bit_maps": ".group_bits",
         "col_perms": ".col_perm", "float_columns": ".float_"}


def _stored_bytes(folder: Path, modules: set[str]) -> dict[str, int]:
    """Bytes of the tensors in a folder's safetensors, packed ones by kind, the rest float."""
    out = dict.fromkeys([*KINDS, "biases", "float_tensors"], 0)
    for path in folder.glob("*.safetensors"):
        for key, t in load_file(str(path)).items():
            size = t.numel() * t.element_size()
            owner, _, _ = key.rpartition(".")
            if owner not in modules:
                out["float_tensors"] += size
            elif key.endswith(".bias"):
                out["biases"] += size
            else:
                out[next(k for k, s in KINDS.items() if s in key)] += size
    return out


def _folder_bytes(folder: Path) -> tuple[int, int]:
    files = [p for p in folder.rglob("*") if p.is_file()]
    return (sum(p.stat().st_size for p in files),
            sum(p.stat().st_size for p in files if p.suffix == ".safetensors"))


def _commit() -> str | None:
    """HEAD when the run starts, marked ``+changes`` when the plugin or this script differ
    from it (then the numbers are not that commit's)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, text=True, capture_output=True,
                              check=True).stdout.strip()

    try:
        dirty = git("status", "--porcelain", "--", "plugins/backends/mixpack",
                    "bench/mixpack_size.py")
        return git("rev-parse", "--short", "HEAD") + ("+changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def _timed_forward(model: Any, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    t0 = time.perf_counter()
    with torch.no_grad():
        logits = model(input_ids=x).logits
    return logits, time.perf_counter() - t0


def measure(setting: str, method: str, weight: dict[str, Any], model: Any, tok: Any,
            windows: torch.Tensor) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="llmcq-mixpack-") as tmp:
        cfg = {"base": {"seed": 0, "device": "cpu"}, "model": {"type": "llama"},
               "quant": {"method": method, "weight": weight},
               "save": {"save_path": tmp, "save_fake": True, "backends": ["mixpack"]}}
        fq = copy.deepcopy(model)
        t0 = time.perf_counter()
        res = run(resolve_config(cfg), progress=False, model=fq, tokenizer=tok)
        run_s = time.perf_counter() - t0
        mp_folder, fake_folder = Path(tmp) / "mixpack_model", Path(tmp) / "fake_quant_model"
        t0 = time.perf_counter()
        back = load_model(mp_folder)
        load_s = time.perf_counter() - t0
        comp = res["compression"]
        modules = {n for n, m in back.named_modules() if type(m).__name__ == "MixPackLinear"}
        stored = _stored_bytes(mp_folder, modules)
        n_q = comp["params_quantized"]
        mp_total, mp_st = _folder_bytes(mp_folder)
        fake_total, fake_st = _folder_bytes(fake_folder)
        losses_mp, losses_fq, diff, t_mp, t_fq = [], [], 0.0, [], []
        for w in windows:  # one window at a time, as llmcq's evaluation (bs 1)
            x = w[None]
            logits_mp, s_mp = _timed_forward(back, x)
            logits_fq, s_fq = _timed_forward(fq, x)
            t_mp.append(s_mp)
            t_fq.append(s_fq)
            diff = max(diff, float((logits_mp - logits_fq).abs().max()))
            losses_mp.append(float(window_losses(logits_mp, x)[0]))
            losses_fq.append(float(window_losses(logits_fq, x)[0]))
        return {
            "setting": setting, "method": method, "weight": weight,
            "weight_bits_mean": comp["weight_bits_mean"],
            "results_bits_per_param": comp["bits_per_param"],
            "params_total": comp["params_total"], "params_quantized": n_q,
            "mixpack_folder_bytes": mp_total, "mixpack_safetensors_bytes": mp_st,
            "fake_folder_bytes": fake_total, "fake_safetensors_bytes": fake_st,
            "size_ratio": mp_st / fake_st,
            "mixpack_bytes_by_kind": stored,
            "stored_bits_per_quantized_weight": {
                k: 8 * stored[k] / n_q for k in ("codes", "scales", "zeros", "bit_maps")},
            "packed_bits_per_quantized_weight": 8 * sum(
                stored[k] for k in KINDS) / n_q,
            "load_model_s": round(load_s, 2), "run_s": round(run_s, 1),
            "forward_s_mixpack": round(min(t_mp), 3), "forward_s_fake": round(min(t_fq), 3),
            "max_logit_diff": diff,
            "ppl_mixpack": math.exp(sum(losses_mp) / len(losses_mp)),
            "ppl_fake_quant": math.exp(sum(losses_fq) / len(losses_fq)),
        }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--only", nargs="*", choices=sorted(SETTINGS), default=None)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "mixpack.json")
    args = p.parse_args()
    commit = _commit()
    if args.threads:
        torch.set_num_threads(args.threads)
    registry.register("llmcq.algorithms", MB.SPEC)
    src = bundled_model_path()
    assert src is not None, "bundled model missing"
    model, tok = load_pretrained(ModelSource(src.parent, src.name))
    model = model.float().eval()
    text = WIKI_TEST.read_text()
    ids = tok(text[: 8 * args.windows * args.seq_len], return_tensors="pt").input_ids[0]
    windows = ids[: args.windows * args.seq_len].view(args.windows, args.seq_len)
    rows = []
    for setting, (method, weight) in SETTINGS.items():
        if args.only and setting not in args.only:
            continue
        rows.append(measure(setting, method, weight, model, tok, windows))
        print({k: rows[-1][k] for k in ("setting", "size_ratio", "max_logit_diff",
                                        "ppl_mixpack", "ppl_fake_quant")}, flush=True)
    write_json(args.out, {
        "model": "SmolLM2-135M-Instruct (bundled GGUF, float32)",
        "eval": f"wikitext2 test, first {args.windows} x {args.seq_len} tokens, one window "
                "per forward",
        "command": " ".join(["bench/mixpack_size.py", *sys.argv[1:]]),
        "commit": commit, "torch_threads": torch.get_num_threads(),
        "load_average_at_end": [round(v, 2) for v in os.getloadavg()],
        "rows": rows})
    print(markdown_table(
        ["setting", "bits mean", "mixpack MB", "fake MB", "ratio", "packed bits/w",
         "max logit diff", "ppl mixpack", "ppl fake-quant"],
        [[r["setting"], r["weight_bits_mean"], r["mixpack_safetensors_bytes"] / 1e6,
          r["fake_safetensors_bytes"] / 1e6, r["size_ratio"],
          r["packed_bits_per_quantized_weight"], r["max_logit_diff"], r["ppl_mixpack"],
          r["ppl_fake_quant"]] for r in rows]))


if __name__ == "__main__":
    main()
