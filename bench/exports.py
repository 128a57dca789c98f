"""Issue-4 table: every export of the bundled SmolLM2-135M, loaded back by a real consumer or
by a reader written from the consumer's published source, against llmcq's in-process
fake-quantized model.

    .venv/bin/python bench/exports.py [--windows 4] [--seq-len 512]
    .venv/bin/python bench/exports.py --method tesseraq --quick   # or autoround
        [--special '{"iterations": 20}'] [--calib-n 8] [--calib-len 128]

One RTN run per setting writes every backend that takes it:

* W4 g64 asymmetric: ``vllm`` (compressed-tensors pack-quantized, loaded by transformers +
  compressed-tensors), ``gptq`` (GPTQModel/AutoGPTQ layout) and ``autoawq`` (GEMM layout),
  rebuilt with the reference dequantizers of their tests (restated from AutoGPTQ's and
  AutoAWQ's published packing code), ``trtllm`` (W4A16_AWQ checkpoint, read with the reader
  of its tests, written from TensorRT-LLM's published source);
* W8 per-channel symmetric with dynamic per-token int8 activations: ``vllm``
  (int-quantized) and ``trtllm`` (W8A8 SmoothQuant layout; the reader quantizes each linear's
  input per token, as the engine does).

``--method tesseraq`` / ``autoround`` runs that learned-rounding algorithm instead (calibrated
on ``--calib-n`` x ``--calib-len`` tokens of wikitext2 valid; ``--quick`` is a short schedule,
QUICK below, that takes minutes on 2 CPU cores; ``--special`` overrides keys on top of it) on
W4 g64 asymmetric (the same four backends) and W8 per-channel symmetric *weight-only*
(``vllm`` pack-quantized, ``gptq``, ``trtllm``: AutoRound refuses ``quant.act``, AWQ's GEMM
layout packs 4 bits only), and writes bench/results/exports_<method>.json with the schedule
and calibration used.

GGUF has its own script (groups of 32, llama.cpp itself): bench/export_gguf_llamacpp.py.
For each export: bytes on disk per parameter, how it was read, max |logit difference| on
the first window against the fake-quantized model, and both perplexities on the first
``--windows`` windows of wikitext2 test. Prints a table and writes
bench/results/exports.json.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import REPO, WIKI_TEST, WIKI_VALID, markdown_table, write_json
from llmcq.config.loader import resolve_config
from llmcq.eval.ppl import perplexity
from llmcq.model.loading import ModelSource, bundled_model_path, load_pretrained
from llmcq.pipeline.runner import run
from safetensors.torch import load_file

SETTINGS = {
    "w4g64": ({"bit": 4, "symmetric": False, "granularity": "per_group", "group_size": 64},
              None, ["vllm", "gptq", "autoawq", "trtllm"]),
    "w8a8": ({"bit": 8, "symmetric": True, "granularity": "per_channel"},
             {"bit": 8, "symmetric": True, "granularity": "per_token"}, ["vllm", "trtllm"]),
}
#: the learned methods' settings: W8 weight-only (AutoRound refuses quant.act)
LEARNED_SETTINGS = {
    "w4g64": SETTINGS["w4g64"],
    "w8a16": ({"bit": 8, "symmetric": True, "granularity": "per_channel"}, None,
              ["vllm", "gptq", "trtllm"]),
}
#: ``--quick``: short training schedules (minutes for SmolLM2-135M on 2 CPU cores), for
#: export parity, not accuracy. TesseraQ: 3 PAR stages of 8 Adam steps, no clip search;
#: AutoRound: 10 signed steps (lr 1 / iters, its default) on batches of 4.
QUICK = {
    "tesseraq": {"iterations": 8, "batch_size": 2, "lr": 0.001, "scale_lr": 0.001,
                 "thresholds": [0.5, 0.2, 0.05], "weight_clip": False},
    "autoround": {"iters": 10, "batch_size": 4},
}


def method_quant(method: str, quick: bool, special: dict[str, Any]) -> dict[str, Any]:
    """The ``quant`` keys (besides the grid) of ``method``: its special keys (``QUICK`` when
    ``quick``, then ``special`` on top) and ``quant_out: True`` (auto-round's
    enable_quanted_input default, which AutoRound requires to match)."""
    if method == "rtn":
        assert not special, "rtn takes no special keys"
        return {"method": "rtn"}
    return {"method": method, "quant_out": True,
            "special": {**(QUICK[method] if quick else {}), **special}}


def calib_section(n: int, seq_len: int) -> dict[str, Any]:
    return {"name": "wikitext2", "path": str(WIKI_VALID), "n_samples": n, "seq_len": seq_len,
            "bs": 1, "preproc": "wikitext2_gptq", "seed": 0}


FOLDERS = {"vllm": "vllm_quant_model", "gptq": "gptq_quant_model",
           "autoawq": "autoawq_quant_model", "trtllm": "trtllm_checkpoint"}


def _module(path: Path, name: str) -> Any:
    sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _linears(model: Any) -> list[str]:
    return [n for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and ".layers." in n]


def _rebuilt(template: Any, sd: dict[str, torch.Tensor], weight_of: Any) -> Any:
    model = copy.deepcopy(template)
    state = model.state_dict()
    for k, v in sd.items():  # norms and embeddings as exported
        if k in state and state[k].shape == v.shape:
            state[k].copy_(v)
    for name in _linears(model):
        model.get_submodule(name).weight.data = weight_of(name).to(torch.float32)
    return model


def load_export(backend: str, folder: Path, float_model: Any, bits: int,
                act: bool) -> tuple[Any, str]:
    """The exported model as its consumer would compute it, and how it was read."""
    plugins = REPO / "plugins" / "backends"
    if backend == "vllm":
        from transformers import AutoModelForCausalLM
        from transformers.utils.quantization_config import CompressedTensorsConfig

        if act:  # compressed linears quantize their inputs at run time, as vLLM does
            m = AutoModelForCausalLM.from_pretrained(str(folder))
            return m.eval(), "transformers + compressed-tensors (run compressed)"
        m = AutoModelForCausalLM.from_pretrained(
            str(folder), quantization_config=CompressedTensorsConfig(dequantize=True))
        return m.float().eval(), "transformers + compressed-tensors (decompressed)"
    if backend == "gptq":
        ref = _module(plugins / "gptqformat" / "tests" / "test_gptq_format.py", "gptq_ref")
        qc = json.loads((folder / "quantize_config.json").read_text())
        sd = load_file(str(folder / "model.safetensors"))
        v1 = qc["checkpoint_format"] == "gptq"
        return _rebuilt(float_model, sd, lambda n: ref.ref_dequant(
            {k: sd[f"{n}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}, bits,
            v1=v1)), "AutoGPTQ's published pack/dequant, restated (its test)"
    if backend == "autoawq":
        ref = _module(plugins / "autoawq" / "tests" / "test_awq_format.py", "awq_ref")
        qc = json.loads((folder / "config.json").read_text())["quantization_config"]
        sd = load_file(str(folder / "model.safetensors"))
        return _rebuilt(float_model, sd, lambda n: ref.ref_dequant(
            sd[f"{n}.qweight"], sd[f"{n}.qzeros"], sd[f"{n}.scales"],
            qc["group_size"]).T.contiguous()), "AutoAWQ's published GEMM unpacking, restated"
    if backend == "trtllm":
        reader = _module(plugins / "trtllm" / "tests" / "trtllm_reader.py", "trt_reader")
        cfg = json.loads((folder / "config.json").read_text())
        t = load_file(str(folder / "rank0.safetensors"))
        act = cfg["quantization"]["quant_algo"].startswith("W8A8")
        return (reader.reader_model(float_model, reader.to_hf_state(t, cfg), act_int8=act),
                "reader from TensorRT-LLM's published source (its test)")
    raise ValueError(backend)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--method", choices=["rtn", "tesseraq", "autoround"], default="rtn")
    ap.add_argument("--quick", action="store_true", help="short training schedule (QUICK)")
    ap.add_argument("--special", type=json.loads, default={},
                    help="quant.special overrides (JSON), on top of --quick's")
    ap.add_argument("--calib-n", type=int, default=8)
    ap.add_argument("--calib-len", type=int, default=128)
    ap.add_argument("--out", type=Path, default=None,
                    help="default bench/results/exports.json (rtn), exports_<method>.json")
    args = ap.parse_args()
    learned = args.method != "rtn"
    out = args.out or REPO / "bench" / "results" / (
        f"exports_{args.method}.json" if learned else "exports.json")
    mq = method_quant(args.method, args.quick, args.special)
    calib = calib_section(args.calib_n, args.calib_len) if learned else None
    src = bundled_model_path()
    assert src is not None, "bundled model missing"
    model, tok = load_pretrained(ModelSource(src.parent, src.name))
    model = model.float().eval()
    n_params = sum(p.numel() for p in model.parameters())
    text = WIKI_TEST.read_text()
    ids = tok(text[: 8 * args.windows * args.seq_len], return_tensors="pt").input_ids[0]
    ids = ids[: args.windows * args.seq_len]
    rows: list[dict[str, Any]] = []
    for setting, (weight, act, backends) in (LEARNED_SETTINGS if learned else SETTINGS).items():
        quant: dict[str, Any] = {**mq, "weight": weight}
        if act is not None:
            quant["act"] = act
        with tempfile.TemporaryDirectory(prefix="llmcq-exports-") as tmp:
            cfg: dict[str, Any] = {"base": {"seed": 0, "device": "cpu"},
                                   "model": {"type": "llama"}, "quant": quant,
                                   "save": {"save_path": tmp, "backends": backends}}
            if calib is not None:
                cfg["calib"] = calib
            fq = copy.deepcopy(model)
            t0 = time.perf_counter()
            run(resolve_config(cfg), progress=False, model=fq, tokenizer=tok)
            quantize_s = round(time.perf_counter() - t0, 1)
            ppl_fq = perplexity(fq, ids, args.seq_len, progress=False)[0]
            with torch.no_grad():
                ref_logits = fq(input_ids=ids[None, : args.seq_len]).logits
            for backend in backends:
                folder = Path(tmp) / FOLDERS[backend]
                size = sum(f.stat().st_size for f in folder.rglob("*.safetensors"))
                loaded, how = load_export(backend, folder, model, weight["bit"],
                                          act is not None)
                with torch.no_grad():
                    logits = loaded(input_ids=ids[None, : args.seq_len]).logits
                row = {"setting": setting, "backend": backend, "read_by": how,
                       "bytes_per_param": round(size / n_params, 3),
                       "max_logit_diff": float((logits.float() - ref_logits).abs().max()),
                       "max_abs_logit": float(ref_logits.abs().max()),
                       "ppl_export": perplexity(loaded, ids, args.seq_len, progress=False)[0],
                       "ppl_fake_quant": ppl_fq}
                if learned:  # (the RTN rows keep their committed fields)
                    row.update(ppl_ratio=row["ppl_export"] / ppl_fq, quantize_s=quantize_s)
                rows.append(row)
                print(json.dumps(row), flush=True)
                del loaded
    result: dict[str, Any] = {"model": "SmolLM2-135M-Instruct (bundled GGUF, float32)",
                              "eval": f"wikitext2 test, first {args.windows} x {args.seq_len} "
                                      "tokens", "rows": rows}
    if learned:  # what was trained, so the numbers can be reproduced
        result = {"method": args.method, "quick": args.quick, "special": mq["special"],
                  "quant_out": True, "calib": {**calib, "path": "wikitext2/valid.txt"},
                  "command": " ".join(["bench/exports.py", *sys.argv[1:]]), **result}
    write_json(out, result)
    headers = ["setting", "backend", "bytes/param", "read by", "max logit diff",
               "ppl export", "ppl fake-quant"]
    print(markdown_table(headers + (["ratio"] if learned else []),
                         [[r["setting"], r["backend"], r["bytes_per_param"], r["read_by"],
                           r["max_logit_diff"], r["ppl_export"], r["ppl_fake_quant"],
                           *([r["ppl_ratio"]] if learned else [])] for r in rows]))


if __name__ == "__main__":
    main()
