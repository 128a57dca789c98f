"""KV-cache quantization on the bundled SmolLM2-135M (issue 17): llmc's ``decode_ppl`` (every
window decoded token by token, each prediction reading all earlier keys and values back from
the cache) with the float weights, so only the cache is quantized; llmcq's cache
(``quant.kvcache``: Naive, Kivi) side by side with transformers' own ``QuantizedCache``
(backends that install on this CPU: ``hqq`` and ``fp8``; ``quanto`` needs optimum-quanto,
not installed here).

    OMP_NUM_THREADS=1 .venv/bin/python bench/kvcache.py [--windows 2] [--seq-len 512] [--only ROWS]

``--only`` (comma-separated row names) reruns those rows and keeps the others of the same
protocol in the JSON.

Rows (wikitext2 test, the first ``--windows`` windows of ``--seq-len`` tokens; static ranges on
4 x 512 tokens of wikitext2 valid):

* ``float``: transformers' ``DynamicCache``; ``ppl (parallel)``: the same windows in one
  forward each (``eval.type: ppl``), which ``float`` must equal;
* ``ours naive ...``: every token quantized as it enters (per_token: over all heads; per_head:
  per token and head; per_tensor static: one calibrated range per layer);
* ``ours kivi ...``: keys per channel in groups of G tokens, values per token, the last R tokens
  in float (the KIVI paper; R = 128, G = 32);
* ``hf hqq ...``: ``QuantizedCache("hqq", nbits, axis_key=1, axis_value=1, q_group_size=G,
  residual_length=128)``: HQQ's optimized asymmetric grid over groups of G contiguous channels
  of each token's head, keys and values alike, the prompt's first token quantized at once, the
  float residual re-quantized together with the dequantized cache every 128 tokens
  (transformers' scheme). G = 64 (one range per token and head, llmcq's ``per_head``) fails on
  SmolLM2's 3 KV heads: HQQ packs 2 (4-bit) or 4 (2-bit) group rows per byte and 3 heads x an
  odd token count is not a multiple (the error is recorded in the row); G = 16 runs (4 ranges
  per token and head, finer than any llmcq row);
* ``ours fp8 ...`` / ``hf fp8``: E4M3 per tensor; transformers fixes the scale on the first
  update (here: the first token) and appends later tokens on that scale.

Writes bench/results/kvcache.json.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from typing import Any

from _common import REPO, WIKI_TEST, WIKI_VALID, write_json

OUT = REPO / "bench" / "results" / "kvcache.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--only", default=None, help="comma-separated row names")
    args = ap.parse_args()

    import torch
    from transformers import DynamicCache, QuantizedCache

    from llmcq.data.datasets import WIKITEXT2 as dspec
    from llmcq.eval.decode import decode_perplexity
    from llmcq.eval.ppl import perplexity
    from llmcq.model.loading import ModelSource, bundled_model_path, load_pretrained
    from llmcq.quant.kvcache import calibrate_static, kv_cache_factory
    from llmcq.quant.spec import KVQuantSpec, PerChannel, PerHead, PerTensor, PerToken

    torch.manual_seed(0)
    path = bundled_model_path()
    model, tok = load_pretrained(ModelSource(path.parent, path.name))
    model.eval()
    ids = dspec.evaluation_ids(tok, str(WIKI_TEST), args.seq_len)
    n_layers = model.config.num_hidden_layers

    def naive(bits: int, gran: Any, symmetric: bool = False, static: bool = False,
              fmt: str = "int") -> KVQuantSpec:
        return KVQuantSpec(bits=bits, symmetric=symmetric, key_granularity=gran,
                           value_granularity=gran, static=static, fmt=fmt)

    def kivi(bits: int) -> KVQuantSpec:
        return KVQuantSpec(bits=bits, symmetric=False, method="kivi",
                           key_granularity=PerChannel(), value_granularity=PerToken(),
                           residual=128, key_group=32)

    calib_ids = torch.tensor(dspec.evaluation_ids(tok, str(WIKI_VALID), 512)[:4 * 512])
    calib = [calib_ids.view(4, 512)[i:i + 1] for i in range(4)]

    def ours(spec: KVQuantSpec) -> Any:
        static = calibrate_static(model, spec, calib) if spec.static else None
        return kv_cache_factory(model, spec, static)

    def hf(backend: str, **kw: Any) -> Any:
        return lambda: QuantizedCache(backend, model.config, **kw)

    head_dim = getattr(model.config, "head_dim", None) or 64
    hqq = dict(axis_key=1, axis_value=1, q_group_size=head_dim, residual_length=128)
    hqq16 = {**hqq, "q_group_size": 16}
    rows: dict[str, Any] = {
        "float": lambda: (lambda: DynamicCache(config=model.config)),
        "ours naive int4 per_token": lambda: ours(naive(4, PerToken())),
        "ours naive int4 per_head": lambda: ours(naive(4, PerHead())),
        "ours naive int4 per_tensor static": lambda: ours(naive(4, PerTensor(), static=True)),
        "ours kivi int4 (R128 G32)": lambda: ours(kivi(4)),
        "hf hqq int4 (axis 1 g64 R128)": lambda: hf("hqq", nbits=4, **hqq),
        "ours naive int2 per_head": lambda: ours(naive(2, PerHead())),
        "ours kivi int2 (R128 G32)": lambda: ours(kivi(2)),
        "hf hqq int2 (axis 1 g64 R128)": lambda: hf("hqq", nbits=2, **hqq),
        "hf hqq int4 (axis 1 g16 R128)": lambda: hf("hqq", nbits=4, **hqq16),
        "hf hqq int2 (axis 1 g16 R128)": lambda: hf("hqq", nbits=2, **hqq16),
        "ours fp8 per_tensor static": lambda: ours(naive(8, PerTensor(), symmetric=True,
                                                         static=True, fmt="e4m3")),
        "ours fp8 per_token": lambda: ours(naive(8, PerToken(), symmetric=True, fmt="e4m3")),
        "hf fp8 (per tensor; scale of the first update)": lambda: hf("fp8"),
    }
    only = set(args.only.split(",")) if args.only else None
    command = f"bench/kvcache.py --windows {args.windows} --seq-len {args.seq_len}"
    kept: dict[str, Any] = {}
    if only is not None and OUT.exists():  # --only: update those rows of the same protocol
        old = json.loads(OUT.read_text())
        if old.get("command") == command:
            kept = old.get("rows", {})
    out: dict[str, Any] = {
        "model": "SmolLM2-135M-Instruct (bundled GGUF, float32 weights)",
        "protocol": f"decode_ppl: wikitext2 test, {args.windows} windows x {args.seq_len} "
                    "tokens, each decoded token by token through the cache",
        "command": command,
        "layers": n_layers, "torch_threads": torch.get_num_threads(), "done": False,
        "rows": kept}
    with torch.no_grad():
        ppl, n = perplexity(model, ids, args.seq_len, max_windows=args.windows, progress=False)
    out["rows"]["ppl (parallel, no cache)"] = {"ppl": ppl, "windows": n}
    print(f"ppl (parallel): {ppl:.4f}", flush=True)
    for name, make in rows.items():
        if only is not None and name not in only:
            continue
        t0 = time.perf_counter()
        try:
            value, n = decode_perplexity(model, ids, args.seq_len, make(),
                                         num_samples=args.windows, progress=False)
            row: dict[str, Any] = {"decode_ppl": value, "windows": n}
        except Exception as exc:  # a backend producing NaN/Inf, or failing on this CPU
            row = {"decode_ppl": None, "error": f"{type(exc).__name__}: {exc}"[:300]}
        row["seconds"] = round(time.perf_counter() - t0, 1)
        f = out["rows"].get("float", {}).get("decode_ppl")
        if f is not None and row["decode_ppl"] is not None and math.isfinite(row["decode_ppl"]):
            row["ratio_to_float"] = round(row["decode_ppl"] / f, 4)
        out["rows"][name] = row
        shown = row["decode_ppl"]
        print(f"{name}: {shown if shown is None else round(shown, 4)} ({row['seconds']} s)",
              flush=True)
        write_json(OUT, out)
    out["done"] = True
    write_json(OUT, out)


if __name__ == "__main__":
    main()
