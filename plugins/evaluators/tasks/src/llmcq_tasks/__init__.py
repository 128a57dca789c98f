"""``eval.type: tasks``: zero-shot tasks (PIQA, LAMBADA, any lm-evaluation-harness task whose
data is on disk) scored by lm-evaluation-harness on the in-process model.

Torch-free: the spec and its config-time checks (task names against the data under
``eval.path``). The lm-eval plumbing is in :mod:`llmcq_tasks.evaluate`, the reading of
lm-eval's results in :mod:`llmcq_tasks.solver`, the data layouts in :mod:`llmcq_tasks.data`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmcq.api import EvaluatorSpec
from llmcq.errors import ConfigError

from llmcq_tasks.data import available, task_files

__all__ = ["SPEC", "TasksSpec"]

#: eval keys that belong to the perplexity evaluators; type tasks refuses them when given
_NOT_HERE = ("name", "seq_len", "num_samples", "kv_chunk", "download")


class TasksSpec(EvaluatorSpec):
    def check(self, section: Any, prefix: str) -> None:
        given = section.model_fields_set
        for key in _NOT_HERE:
            if key in given:
                raise ConfigError(f"{prefix}.{key}", getattr(section, key), reason="type tasks "
                                  "takes its tasks from eval.tasks and their data from eval.path",
                                  allowed="absent")
        if section.inference_per_block:
            raise ConfigError(f"{prefix}.inference_per_block", True, reason="type tasks runs "
                              "the whole model through lm-evaluation-harness", allowed="False")
        if not isinstance(section.path, str):
            raise ConfigError(f"{prefix}.path", section.path, reason="type tasks reads every "
                              "task under one data root", allowed="a folder path")
        root = Path(section.path).expanduser()
        if not root.is_dir():
            raise ConfigError(f"{prefix}.path", section.path, reason="no such folder")
        tasks = section.tasks
        if not tasks:
            raise ConfigError(f"{prefix}.tasks", tasks, reason="type tasks needs the task names",
                              allowed=available(root) or "none: no task data under "
                              f"{section.path}")
        if len(set(tasks)) != len(tasks):
            raise ConfigError(f"{prefix}.tasks", tasks, reason="a task is named twice")
        for j, task in enumerate(tasks):
            files, missing = task_files(task, root)
            if not missing:
                continue
            from llmcq_tasks.data import LAYOUTS

            where = (" and ".join(map(str, missing)) if task in LAYOUTS
                     else " or ".join(map(str, missing)))
            raise ConfigError(f"{prefix}.tasks[{j}]", task, reason=f"its data is missing: "
                              f"{where}", allowed=available(root) or "none: no task data under "
                              f"{section.path}")


SPEC = TasksSpec(name="tasks",
                 summary="zero-shot task accuracy (piqa, lambada_openai, any lm-eval task "
                         "with local data) scored by lm-evaluation-harness",
                 aliases=("lm_eval", "harness"), impl="llmcq_tasks.evaluate:evaluate",
                 reads_tasks=True)
