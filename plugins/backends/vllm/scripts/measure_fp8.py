"""FP8 (e4m3) on the bundled SmolLM2-135M: perplexity of float, of llmcq's fake-quantized
RTN W8A8-FP8 (and INT8 W8A8 for comparison), and of the vLLM (compressed-tensors
``float-quantized``) export loaded by transformers + compressed-tensors on the CPU, with
the max logit difference between the loaded export and the fake-quantized model.

    .venv/bin/python plugins/backends/vllm/scripts/measure_fp8.py --windows 16 --seq 512

Prints one JSON line per setting.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from llmcq.config.loader import resolve_config
from llmcq.eval.ppl import perplexity
from llmcq.model.loading import ModelSource, bundled_model_path, load_pretrained
from llmcq.pipeline.runner import run
from llmcq.testing.paths import shared_data_dir

FP8_W = {"quant_type": "float-quant", "bit": "e4m3", "symmetric": True,
         "granularity": "per_channel"}
FP8_A = {"quant_type": "float-quant", "bit": "e4m3", "symmetric": True,
         "granularity": "per_token"}
SETTINGS: dict[str, tuple[dict, dict | None]] = {
    "fp8_w_channel_a_token": (FP8_W, FP8_A),
    "fp8_w_tensor_a_static_tensor": ({**FP8_W, "granularity": "per_tensor"},
                                     {**FP8_A, "granularity": "per_tensor", "static": True}),
    "fp8_w_channel_weight_only": (FP8_W, None),
    "int8_w_channel_a_token_sym": ({"bit": 8, "symmetric": True, "granularity": "per_channel"},
                                   {"bit": 8, "symmetric": True, "granularity": "per_token"}),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--only", nargs="*", default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    data = shared_data_dir()
    assert data is not None
    gguf = bundled_model_path()
    model, tok = load_pretrained(ModelSource(gguf.parent, gguf.name))
    n_params = sum(p.numel() for p in model.parameters())
    text = (data / "wikitext2" / "test.txt").read_text()
    ids = tok(text, return_attention_mask=False)["input_ids"][: args.windows * args.seq]

    def ppl(m: Any) -> float:
        return perplexity(m, ids, args.seq, max_windows=args.windows, progress=False)[0]

    print(json.dumps({"setting": "float", "ppl": ppl(model)}), flush=True)
    probe = torch.tensor([ids[: args.seq]])
    for name, (weight, act) in SETTINGS.items():
        if args.only and name not in args.only:
            continue
        t0 = time.time()
        q: dict[str, Any] = {"method": "rtn", "weight": weight}
        if act is not None:
            q["act"] = act
        with tempfile.TemporaryDirectory() as tmp:
            cfg: dict[str, Any] = {"model": {"type": "llama"}, "quant": q,
                                   "save": {"save_path": tmp, "save_vllm": True}}
            if act is not None and act.get("static"):
                cfg["calib"] = {"name": "wikitext2",
                                "path": str(data / "wikitext2" / "valid.txt"),
                                "n_samples": 16, "seq_len": 512, "preproc": "wikitext2_gptq"}
            fq = copy.deepcopy(model)
            run(resolve_config(cfg), progress=False, model=fq, tokenizer=tok)
            from transformers import AutoModelForCausalLM

            folder = Path(tmp) / "vllm_quant_model"
            size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
            loaded = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
            with torch.no_grad():
                diff = (loaded(input_ids=probe).logits - fq(input_ids=probe).logits).abs().max()
            fmt = json.loads((folder / "config.json").read_text())["quantization_config"]
            print(json.dumps({"setting": name, "format": fmt["format"],
                              "ppl_fake_quant": ppl(fq), "ppl_loaded_export": ppl(loaded),
                              "max_logit_diff": float(diff),
                              "bytes_per_param": size / n_params,
                              "seconds": round(time.time() - t0, 1)}), flush=True)


if __name__ == "__main__":
    main()
