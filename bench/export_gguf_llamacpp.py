"""Export the bundled SmolLM2-135M to GGUF with llmcq and check the file with real consumers.

    .venv/bin/python bench/export_gguf_llamacpp.py [--windows 8] [--seq-len 512]
        [--weight '{"bit": 4, "symmetric": false, "granularity": "per_group", "group_size": 32}']
        [--method tesseraq|autoround --quick [--special JSON] [--calib-n 8] [--calib-len 128]]

Steps: quantize with RTN (the weight grid given, default W4 g32 asym, i.e. Q4_1) and export
with the ``gguf`` backend (``--method tesseraq`` / ``autoround``: that learned-rounding
algorithm instead, with the schedule and calibration of bench/exports.py's options, recorded
in the JSON); wikitext2 perplexity (first N windows of the test set) of

* llmcq's in-process fake-quantized model,
* the GGUF loaded by ``transformers`` (``gguf_file=``), plus the max logit difference on the
  first window,
* the GGUF run by llama.cpp itself: ``--llama-perplexity BIN`` runs llama.cpp's
  ``llama-perplexity`` tool on the exported file and on the bundled source GGUF, over the same
  text, and this script scores our in-process fake-quantized and float models the way that
  tool does (each window of ``--seq-len`` tokens, only its second half predicted), so the
  numbers compare one to one. Build the tool from the llama.cpp that PyPI's
  ``llama-cpp-python`` sdist vendors (a few minutes on 2 cores, no GPU)::

      pip download --no-deps --no-binary=:all: llama-cpp-python==0.3.36 -d /tmp/lcp
      tar xzf /tmp/lcp/llama_cpp_python-0.3.36.tar.gz -C /tmp/lcp
      cd /tmp/lcp/llama_cpp_python-0.3.36/vendor/llama.cpp
      cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
          -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
          -DBUILD_SHARED_LIBS=OFF
      cmake --build build -j2 --target llama-perplexity

  Without it, the llama-cpp-python bindings are used if importable (full-window scoring).

Prints one JSON object and, with ``--out``, writes it there.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from exports import calib_section, method_quant
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


_PPL_LINE = re.compile(r"Final estimate: PPL = ([0-9.]+)")


def llama_perplexity_tool(binary: str, gguf: Path, text: Path, n_ctx: int, chunks: int
                          ) -> dict[str, Any]:
    """llama.cpp's own perplexity of ``gguf`` on ``text`` (its second-half scoring)."""
    t0 = time.perf_counter()
    proc = subprocess.run([binary, "-m", str(gguf), "-f", str(text), "-c", str(n_ctx),
                           "-b", str(n_ctx), "--chunks", str(chunks), "-t", "2"],
                          capture_output=True, text=True, timeout=1800)
    found = _PPL_LINE.search(proc.stdout + proc.stderr)
    if proc.returncode != 0 or found is None:
        raise RuntimeError(f"llama-perplexity failed ({proc.returncode}): "
                           f"{(proc.stdout + proc.stderr)[-2000:]}")
    return {"ppl": float(found.group(1)), "seconds": round(time.perf_counter() - t0, 1)}


@torch.no_grad()
def second_half_ppl(model: Any, ids: torch.Tensor) -> float:
    """Perplexity as llama-perplexity scores it: per window, the tokens after its middle
    (positions n/2 .. n-2 predict n/2+1 .. n-1); no BOS (the model's add_bos_token is off)."""
    n = ids.shape[1]
    first = n // 2
    total, count = 0.0, 0
    for window in ids:
        logits = model(input_ids=window[None]).logits[0].float()
        logp = torch.log_softmax(logits[first:n - 1], dim=-1)
        total -= float(logp.gather(1, window[first + 1:, None]).sum())
        count += n - 1 - first
    return math.exp(total / count)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--weight", default='{"bit": 4, "symmetric": false, '
                    '"granularity": "per_group", "group_size": 32}')
    ap.add_argument("--llama-perplexity", default=os.environ.get("LLAMA_PERPLEXITY"),
                    help="llama.cpp's llama-perplexity binary (see the module docstring)")
    ap.add_argument("--method", choices=["rtn", "tesseraq", "autoround"], default="rtn")
    ap.add_argument("--quick", action="store_true", help="short schedule (exports.QUICK)")
    ap.add_argument("--special", type=json.loads, default={},
                    help="quant.special overrides (JSON), on top of --quick's")
    ap.add_argument("--calib-n", type=int, default=8)
    ap.add_argument("--calib-len", type=int, default=128)
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args()
    weight = json.loads(args.weight)
    mq = method_quant(args.method, args.quick, args.special)
    calib = calib_section(args.calib_n, args.calib_len) if args.method != "rtn" else None
    src = bundled_model_path()
    assert src is not None, "bundled model missing"
    model, tok = load_pretrained(ModelSource(src.parent, src.name))
    text = (DATA / "wikitext2" / "test.txt").read_text()
    ids = tok(text[: 8 * args.windows * args.seq_len], return_tensors="pt").input_ids
    ids = ids[0, : args.windows * args.seq_len].view(-1, args.seq_len)
    out: dict[str, Any] = {"weight": weight, "windows": int(ids.shape[0]),
                           "seq_len": args.seq_len}
    if calib is not None:  # the learned run's schedule, so it can be reproduced
        out.update(method=args.method, quick=args.quick, special=mq["special"],
                   quant_out=True, calib={**calib, "path": "wikitext2/valid.txt"})
    with tempfile.TemporaryDirectory() as tmp:
        cfg: dict[str, Any] = {"model": {"type": "llama"}, "quant": {**mq, "weight": weight},
                               "save": {"save_path": tmp, "save_gguf": True}}
        if calib is not None:
            cfg["calib"] = calib
        fq = copy.deepcopy(model)
        t0 = time.perf_counter()
        run(resolve_config(cfg), progress=False, model=fq, tokenizer=tok)
        if calib is not None:
            out["quantize_s"] = round(time.perf_counter() - t0, 1)
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
        if calib is not None:
            out["ppl_ratio_transformers_gguf"] = out["ppl_transformers_gguf"] / out[
                "ppl_fake_quant"]
        if args.llama_perplexity:
            # the text whose tokens are ``ids`` (the prefix they came from), for the tool
            text_file = Path(tmp) / "wikitext2-test-prefix.txt"
            text_file.write_text(text[: 8 * args.windows * args.seq_len])
            lc = {"binary": args.llama_perplexity, "scoring": "second half of each window"}
            lc["export"] = llama_perplexity_tool(args.llama_perplexity, path, text_file,
                                                 args.seq_len, args.windows)
            lc["bundled_source_gguf"] = llama_perplexity_tool(args.llama_perplexity, src,
                                                             text_file, args.seq_len,
                                                             args.windows)
            lc["ours_fake_quant_same_scoring"] = second_half_ppl(fq, ids)
            lc["ours_float_same_scoring"] = second_half_ppl(model, ids)
            lc["export_over_ours"] = lc["export"]["ppl"] / lc["ours_fake_quant_same_scoring"]
            out["llama_cpp"] = lc
        else:
            ppl = llama_cpp_ppl(path, ids, args.seq_len)
            out["ppl_llama_cpp"] = ppl if ppl is not None else (
                "skipped: no --llama-perplexity and llama_cpp is not importable")
    print(json.dumps(out, indent=1))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
