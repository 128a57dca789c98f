"""Export the bundled SmolLM2-135M to GGUF with llmcq and check the file with real consumers.

    .venv/bin/python bench/export_gguf_llamacpp.py [--windows 8] [--seq-len 512]
        [--weight '{"bit": 4, "symmetric": false, "granularity": "per_group", "group_size": 32}']

Steps: quantize with RTN (the weight grid given, default W4 g32 asym, i.e. Q4_1) and export
with the ``gguf`` backend; wikitext2 perplexity (first N windows of the test set) of

* llmcq's in-process fake-quantized model,
* the GGUF loaded by ``transformers`` (``gguf_file=``), plus the max logit difference on the
  first window,
* the GGUF run by llama.cpp through ``llama-cpp-python`` -- only if ``llama_cpp`` is importable.
  It is not built here (too heavy for the shared CPUs); install it where a compiler and time
  are available (``pip install llama-cpp-python``) and rerun. The script says when it skips.

Prints one JSON object; nothing is written to bench/results.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from llmcq.config.loader import resolve_config
from llmcq.eval.ppl import perplexity
from llmcq.model.loading import ModelSource, bundled_model_path, load_pretrained
from llmcq.pipeline.runner import run

DATA = (Path(__file__).resolve().parent.parent / ".." / "shared" / "data").resolve()


def llama_cpp_ppl(path: Path, ids: torch.Tensor, seq_len: int) -> float | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=str(path), n_ctx=seq_len, logits_all=True, verbose=False)
    total, count = 0.0, 0
    for window in ids:
        toks = window.tolist()
        llm.reset()
        llm.eval(toks)
        logits = torch.tensor(llm.scores[: len(toks)], dtype=torch.float32)
        logp = torch.log_softmax(logits[:-1], dim=-1)
        total -= float(logp.gather(1, torch.tensor(toks[1:]).unsqueeze(1)).sum())
        count += len(toks) - 1
    return math.exp(total / count)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--weight", default='{"bit": 4, "symmetric": false, '
                    '"granularity": "per_group", "group_size": 32}')
    args = ap.parse_args()
    weight = json.loads(args.weight)
    src = bundled_model_path()
    assert src is not None, "bundled model missing"
    model, tok = load_pretrained(ModelSource(src.parent, src.name))
    text = (DATA / "wikitext2" / "test.txt").read_text()
    ids = tok(text[: 8 * args.windows * args.seq_len], return_tensors="pt").input_ids
    ids = ids[0, : args.windows * args.seq_len].view(-1, args.seq_len)
    out: dict[str, Any] = {"weight": weight, "windows": int(ids.shape[0]),
                           "seq_len": args.seq_len}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = {"model": {"type": "llama"}, "quant": {"method": "rtn", "weight": weight},
               "save": {"save_path": tmp, "save_gguf": True}}
        fq = copy.deepcopy(model)
        run(resolve_config(cfg), progress=False, model=fq, tokenizer=tok)
        path = next((Path(tmp) / "gguf_quant_model").glob("*.gguf"))
        n_params = sum(p.numel() for p in model.parameters())  # a tied head counts once
        out["file"] = path.name
        out["bytes_per_param"] = path.stat().st_size / n_params
        out["ppl_fake_quant"] = perplexity(fq, ids.reshape(-1), args.seq_len, progress=False)[0]
        from transformers import AutoModelForCausalLM

        t0 = time.perf_counter()
        loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
        out["transformers_load_s"] = time.perf_counter() - t0
        with torch.no_grad():
            diff = (loaded(input_ids=ids[:1]).logits - fq(input_ids=ids[:1]).logits).abs().max()
        out["max_logit_diff_transformers_vs_fake_quant"] = float(diff)
        out["ppl_transformers_gguf"] = perplexity(loaded, ids.reshape(-1), args.seq_len,
                                                  progress=False)[0]
        ppl = llama_cpp_ppl(path, ids, args.seq_len)
        out["ppl_llama_cpp"] = ppl if ppl is not None else (
            "skipped: llama_cpp (llama-cpp-python) is not importable here")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
