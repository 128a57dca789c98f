"""Why llm-compressor's SmoothQuant beats ours at W4A8 (40.67 vs 44.73 in the side-by-side
table): rerun our rows of bench/algorithms.py (same calibration and evaluation) with
llm-compressor's symmetric grid, absmax / ((2^b - 1) / 2), instead of llmc's
absmax / (2^(b-1) - 1), patched into llmcq's grid function; ``--quant-out`` also feeds each
block the quantized outputs of the previous one (llm-compressor's sequential pipeline
propagates through quantized layers).

    .venv/bin/python bench/peers/grid_experiment.py rtn smoothquant [--quant-out]

Measured (16 windows x 2048, calibration 32 x 512): RTN 49.577 (the peer's RTN: 49.577,
identical), SmoothQuant 41.816, with --quant-out 41.266 (peer 40.665).
"""
import json, sys, importlib
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
import torch
import algorithms as A
import llmcq.quant.qparams as Q
from llmcq.config.loader import resolve_config
from llmcq.pipeline.runner import run

orig = Q.minmax_qparams
def peer_grid(wg, bits, symmetric, *, round_zp=True, shrink=1.0):
    if not symmetric:
        return orig(wg, bits, symmetric, round_zp=round_zp, shrink=shrink)
    absmax = wg.float().abs().amax(dim=-1, keepdim=True) * shrink
    return (absmax / ((2 ** bits - 1) / 2)).clamp(min=Q.SCALE_EPS), None
Q.minmax_qparams = peer_grid
for modname in ["llmcq.quant.fake", "llmcq.quant.clip", "llmcq.quant.rtn"]:
    try:
        m = importlib.import_module(modname)
        if hasattr(m, "minmax_qparams"):
            m.minmax_qparams = peer_grid
    except ImportError:
        pass
calib = A.calib_section(32, 512)
out = {}
for method in [a for a in sys.argv[1:] if not a.startswith("--")]:
    cfg = A.row_config(method, "w4a8", calib, 16)
    cfg["save"] = {"save_path": f"/tmp/gridexp-{method}"}
    if "--quant-out" in sys.argv: cfg["quant"]["quant_out"] = True
    res = run(resolve_config(cfg, overwrite=True), progress=False)
    out[method] = res["eval"]["fake_quant"]["wikitext2"]["ppl"]
    print(method, out[method], flush=True)
print(json.dumps(out))
