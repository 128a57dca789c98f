"""Bytes per parameter of the TensorRT-LLM export of the bundled SmolLM2-135M (RTN, one run
per quant_algo, tp 1). Writes under the folder given as the first argument (default
/tmp/llmcq_trtllm_sizes).

    .venv/bin/python plugins/backends/trtllm/scripts/measure_sizes.py [OUT]
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
from llmcq.config.loader import resolve_config
from llmcq.model.loading import ModelSource, bundled_model_path, load_pretrained
from llmcq.pipeline.runner import run
from safetensors import safe_open

W4 = {"bit": 4, "symmetric": True, "granularity": "per_group", "group_size": 64}
W8 = {"bit": 8, "symmetric": True, "granularity": "per_channel"}
A8 = {"bit": 8, "symmetric": True, "granularity": "per_token"}
SETTINGS = [("W4A16_AWQ g64 sym", W4, None), ("W4A16_AWQ g64 asym", {**W4, "symmetric": False},
                                               None),
            ("W8A16", W8, None), ("W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN", W8, A8)]


def main() -> None:
    out_root = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/llmcq_trtllm_sizes")
    path = bundled_model_path()
    assert path is not None, "bundled model missing"
    model, tok = load_pretrained(ModelSource(path.parent, path.name))
    n_params = sum(p.numel() for p in model.parameters())
    n_linear = sum(m.weight.numel() for n, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and ".layers." in n)
    print(f"parameters {n_params:,}, decoder linear parameters {n_linear:,}")
    print("| quant_algo | bytes | bytes/param | bytes/linear param |")
    for i, (name, weight, act) in enumerate(SETTINGS):
        quant = {"method": "rtn", "weight": weight, **({"act": act} if act else {})}
        cfg = {"base": {"seed": 0, "device": "cpu"}, "model": {"type": "llama"},
               "quant": quant, "save": {"save_path": str(out_root / str(i)),
                                        "save_trtllm": True, "overwrite": True}}
        run(resolve_config(cfg), progress=False, model=copy.deepcopy(model), tokenizer=tok)
        folder = out_root / str(i) / "trtllm_checkpoint"
        size = sum(f.stat().st_size for f in folder.glob("rank*.safetensors"))
        lin = 0
        with safe_open(str(folder / "rank0.safetensors"), "pt") as f:
            for k in f.keys():
                if ".layers." in k and "layernorm" not in k:
                    t = f.get_tensor(k)
                    lin += t.numel() * t.element_size()
        print(f"| {name} | {size:,} | {size / n_params:.4f} | {lin / n_linear:.4f} |")


if __name__ == "__main__":
    main()
