"""Refuse scaling-based algorithms on what ``model.type: auto`` could not verify.

Registered in ``llmcq.hooks``: the model-level ``transform`` stage (once per recipe step,
before the first block) traces the model if it has not been traced and raises a
:class:`~llmcq.errors.ConfigError` naming the ambiguous block parts when the recipe holds
anything but RTN, GPTQ or HQQ. Runs with another adapter are not touched.
"""

from __future__ import annotations

from typing import Any

import llmcq

__all__ = ["llmcq_transform"]


@llmcq.hookimpl
def llmcq_transform(run: Any, step: Any, block: Any, inputs: Any) -> None:
    from llmcq_auto.adapter import AutoAdapter

    if block is not None or not isinstance(run.adapter, AutoAdapter):
        return
    if step is not run.steps[0]:
        return
    run.adapter.check_recipe(run.model, [s.spec.name for s in run.steps])
