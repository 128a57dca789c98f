"""Pure functions: an lm-eval task config pointed at a local JSON Lines file, and lm-eval's
results read into llmcq's metric entries."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["local_task_config", "metric_entries", "RENAME"]

#: lm-eval metric names -> the keys of ``results.json["eval"][position][task]``
RENAME = {"acc_stderr": "stderr", "perplexity": "ppl", "perplexity_stderr": "ppl_stderr"}

#: keys of a task config that build groups or tags, not the task
_STRUCTURAL = ("tag", "group", "task_list")


def local_task_config(cfg: dict[str, Any], data_file: str, cache_dir: str) -> dict[str, Any]:
    """lm-eval's own config of a task (``cfg``, as its YAML loads) with its data read from
    ``data_file`` by the ``json`` builder of ``datasets``, served as the split the task scores
    (its ``test_split``, else its ``validation_split``); no training or few-shot split (zero
    shot), so no other split is ever asked for. Everything else (prompt, choices, target,
    metrics, filters) is lm-eval's."""
    out = {k: v for k, v in cfg.items() if k not in _STRUCTURAL}
    split = out.get("test_split") or out.get("validation_split")
    if not split:
        raise ValueError(f"lm-eval task {out.get('task')} names neither a test nor a "
                         "validation split")
    out.update(dataset_path="json", dataset_name=None,
               dataset_kwargs={"data_files": {split: data_file}, "cache_dir": cache_dir},
               training_split=None, fewshot_split=None)
    if out.get("test_split"):
        out["validation_split"] = None
    if out.get("num_fewshot"):
        raise ValueError(f"lm-eval task {out.get('task')} is few-shot "
                         f"(num_fewshot {out['num_fewshot']}); type tasks scores zero-shot")
    return out


def metric_entries(task: str, result: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """llmcq metric entries (``{"dataset", "metric", "value"}``) of one task's lm-eval result
    (``results["results"][task]``: ``"acc,none"``, ``"acc_stderr,none"``, ...): acc, stderr (of
    acc), acc_norm, acc_norm_stderr, ppl (LAMBADA's target perplexity), ppl_stderr, any other
    metric under its lm-eval name (``metric_filter`` when its filter is not ``none``), and
    ``n``, the documents scored. Non-numeric entries (lm-eval's ``"N/A"`` stderr) are left
    out."""
    out = [{"dataset": task, "metric": "n", "value": int(n)}]
    for key, value in result.items():
        if "," not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        metric, filt = key.split(",", 1)
        name = RENAME.get(metric, metric) + ("" if filt == "none" else f"_{filt}")
        if not math.isfinite(float(value)):
            continue
        out.append({"dataset": task, "metric": name, "value": float(value)})
    return out
