"""The run plumbing: lm-evaluation-harness scores the in-process model (an ``HFLM`` around the
model object and the run's tokenizer) on task configs that read local files, offline."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmcq.errors import DataError

from llmcq_tasks.data import materialize
from llmcq_tasks.solver import local_task_config, metric_entries

if TYPE_CHECKING:
    from llmcq.config.loader import ResolvedEval
    from llmcq.pipeline.context import RunContext

__all__ = ["evaluate", "task_manager", "task_configs", "run_tasks", "offline"]

#: bootstrap resamples for the stderr of non-mean aggregates (LAMBADA's perplexity); the
#: stderr of a mean (acc, acc_norm) is lm-eval's closed form whatever this is
BOOTSTRAP_ITERS = 1000

_OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "DISABLE_MULTIPROC": "1"}


@contextmanager
def offline() -> Iterator[None]:
    """Nothing reaches a hub: the offline switches of ``datasets`` and ``huggingface_hub``
    (environment and, when already imported, their module constants), and lm-eval's bootstrap
    in this process (no worker pool forked beside a model in memory)."""
    import datasets.config as dcfg
    import huggingface_hub.constants as hcfg

    old_env = {k: os.environ.get(k) for k in _OFFLINE}
    old = (dcfg.HF_DATASETS_OFFLINE, hcfg.HF_HUB_OFFLINE)
    os.environ.update(_OFFLINE)
    dcfg.HF_DATASETS_OFFLINE = True
    hcfg.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        dcfg.HF_DATASETS_OFFLINE, hcfg.HF_HUB_OFFLINE = old
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def task_manager(run: RunContext | None = None) -> Any:
    """lm-eval's task index (built once per run: scanning its YAML takes seconds)."""
    from lm_eval.tasks import TaskManager

    if run is None:
        return TaskManager()
    key = ("lm_eval", "task_manager")
    if key not in run.cache:
        run.cache[key] = TaskManager()
    return run.cache[key]


def task_configs(tm: Any, tasks: list[str], root: str | Path, workdir: Path) -> list[dict]:
    """Each task's lm-eval config reading its local file (joined into ``workdir`` where the
    source splits it, as PIQA's labels)."""
    from lm_eval.tasks._index import Kind
    from lm_eval.tasks._yaml_loader import load_yaml

    out = []
    for task in tasks:
        entry = tm.task_index.get(task)
        if entry is None:
            raise DataError(f"eval.tasks: {task} is not an lm-evaluation-harness task (its data "
                            f"is under {root}, but lm-eval {_version()} knows no such task)")
        if entry.kind is not Kind.TASK:
            raise DataError(f"eval.tasks: {task} is an lm-evaluation-harness "
                            f"{entry.kind.name.lower()}; name its tasks one by one")
        cfg = load_yaml(entry.yaml_path, resolve_func=True) if entry.yaml_path else \
            dict(entry.cfg)
        data = materialize(task, root, workdir)
        out.append(local_task_config(cfg, str(data), str(workdir / "hf-cache")))
    return out


def _version() -> str:
    from importlib.metadata import version

    return version("lm-eval")


def run_tasks(lm: Any, tm: Any, tasks: list[str], root: str | Path, *,
              limit: int | None = None) -> dict[str, Any]:
    """lm-eval's ``evaluate`` of ``lm`` on ``tasks`` read under ``root``, offline; its full
    results dict."""
    from lm_eval import evaluator

    with offline(), tempfile.TemporaryDirectory(prefix="llmcq-tasks-") as tmp:
        configs = task_configs(tm, tasks, root, Path(tmp))
        task_dict = tm.load(configs)
        res = evaluator.evaluate(lm=lm, task_dict=task_dict, limit=limit,
                                 bootstrap_iters=BOOTSTRAP_ITERS, log_samples=False)
    if res is None:
        raise DataError("lm-evaluation-harness returned no results")
    return res


def evaluate(run: RunContext, model: Any, resolved_eval: ResolvedEval,
             position: str) -> list[dict[str, Any]]:
    """Task metrics of ``model`` at ``position``: one entry per metric and task."""
    from lm_eval.models.huggingface import HFLM

    cfg = run.config.eval[resolved_eval.index]
    assert cfg.tasks and isinstance(cfg.path, str)
    if position == "fake_quant" and getattr(run.specs, "kv", None) is not None:
        run.log.warning("eval.type tasks scores the model without the quantized KV cache of "
                        "quant.kvcache (lm-evaluation-harness runs whole sequences, no cache)")
    tm = task_manager(run)
    home = next(model.parameters()).device
    was_training = model.training
    model.to(run.device).eval()
    try:
        lm = HFLM(pretrained=model, tokenizer=run.tokenizer, batch_size=cfg.bs)
        res = run_tasks(lm, tm, list(cfg.tasks), cfg.path, limit=cfg.limit)
    finally:
        model.to(home).train(was_training)
    out = []
    for task in cfg.tasks:
        n = res["n-samples"][task]["effective"]
        entries = metric_entries(task, res["results"][task], n)
        run.log.info("%s %s: %s (%d documents)", position, task,
                     ", ".join(f"{e['metric']} {e['value']:.4f}" for e in entries
                               if e["metric"] in ("acc", "acc_norm", "ppl")), n)
        out += entries
    return out
