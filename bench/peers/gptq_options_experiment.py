"""GPTQ at W3 per-channel with one option changed (true_sequential off; act-order off), same
calibration and evaluation as bench/algorithms.py: which llmc option makes ours differ from
llm-compressor there. Measured: 88.45 without true_sequential, 111.78 without act-order
(bench row with both: 94.32; llm-compressor 85.18).

    .venv/bin/python bench/peers/gptq_options_experiment.py
"""
import json, sys
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
import algorithms as A
from llmcq.config.loader import resolve_config
from llmcq.pipeline.runner import run
calib = A.calib_section(32, 512)
for label, change in [("no_true_seq", {"true_sequential": False}), ("no_actorder", {"actorder": False})]:
    cfg = A.row_config("gptq", "w3pc", calib, 16)
    cfg["quant"]["special"] = {**cfg["quant"]["special"], **change}
    cfg["save"] = {"save_path": f"/tmp/gptqexp-{label}"}
    res = run(resolve_config(cfg, overwrite=True), progress=False)
    print(label, res["eval"]["fake_quant"]["wikitext2"]["ppl"], flush=True)
