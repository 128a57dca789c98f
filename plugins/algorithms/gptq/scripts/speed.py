"""GPTQ speed on a Llama-shaped model with random weights (no data, no download needed).

Runs the same per-block steps as core's engine (GPTQ ``calibrate`` + ``quantize``, then the
block's outputs with the quantized weights feed the next block, as llmc's ``quant_out``) and
prints seconds per block split into solver time and block forwards, and the projection to
the full depth. Llama-2-7B shape on one GPU:

    python plugins/algorithms/gptq/scripts/speed.py --layers 4 --device cuda

Needs llmcq and llmcq-gptq importable (no model-family plugin: the script describes the
Llama-shaped model it builds with core's ``llama_like_layout``, so the algorithm package never
imports a family's adapter). A quick check on the CPU:

    python plugins/algorithms/gptq/scripts/speed.py --layers 2 --hidden 128 --inter 256 \
        --heads 4 --kv-heads 4 --samples 4 --seq 64 --bs 2 --group 64 --dtype float32
"""

from __future__ import annotations

import argparse
import json
import time
from types import SimpleNamespace

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4, help="blocks to build and quantize")
    ap.add_argument("--depth", type=int, default=32, help="blocks of the full model")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--inter", type=int, default=11008)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=32)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--bs", type=int, default=8)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--special", default="{}", help="quant.special as JSON")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()

    from transformers import LlamaConfig, LlamaForCausalLM

    from llmcq.model.adapter import ModelAdapter, resolve_block
    from llmcq.model.layout import llama_like_layout
    from llmcq.pipeline.blockwise import Block, capture_block_inputs
    from llmcq.quant.fake import fake_quantized
    from llmcq.quant.spec import PerChannel, PerGroup, WeightQuantSpec
    from llmcq_gptq import GPTQSpecial
    from llmcq_gptq.algorithm import GPTQ

    class LlamaShaped(ModelAdapter):
        """The model built below: transformers' LlamaForCausalLM module names."""

        layout = llama_like_layout()

    dev = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.inter,
                      num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                      num_hidden_layers=args.layers, vocab_size=32000,
                      max_position_embeddings=max(4096, args.seq))
    torch.manual_seed(0)
    with dev:
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    adapter = LlamaShaped()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 32000, (args.bs, args.seq), generator=g)
               for _ in range(args.samples // args.bs)]
    inputs = capture_block_inputs(model, adapter, batches, dev)
    gran = PerGroup(args.group) if args.group > 0 else PerChannel()
    spec = WeightQuantSpec(bits=args.bits, symmetric=True, granularity=gran)
    algo = GPTQ(run=SimpleNamespace(weight=spec, act=None),  # type: ignore[arg-type]
                step=SimpleNamespace(special=GPTQSpecial(**json.loads(args.special))))

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    rows = []
    for i, module in enumerate(adapter.blocks(model)):
        block = Block(i, f"model.layers.{i}", module,
                      resolve_block(module, adapter.block_layout(model, i), where=str(i)))
        sync()
        t0 = time.perf_counter()
        algo.calibrate(block, inputs)
        sync()
        t1 = time.perf_counter()
        records = algo.quantize(block, inputs)
        sync()
        t2 = time.perf_counter()
        with fake_quantized(module, records):
            inputs.advance(module)
        sync()
        t3 = time.perf_counter()
        bad = sum(int(not torch.isfinite(r.dequantize()).all()) for r in records.values())
        rows.append({"block": i, "calibrate_s": t1 - t0, "quantize_s": t2 - t1,
                     "advance_s": t3 - t2, "nonfinite_records": bad})
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v
                          for k, v in rows[-1].items()}), flush=True)
    steady = rows[1:] or rows
    per_block = sum(r["calibrate_s"] + r["quantize_s"] + r["advance_s"] for r in steady) \
        / len(steady)
    out = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
           "shape": vars(args), "seconds_per_block": round(per_block, 3),
           "projected_full_depth_s": round(per_block * args.depth, 1),
           "peak_cuda_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
           if dev.type == "cuda" else None, "summary": algo.summary()}
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
