"""Bind the config's per-linear settings to the loaded model, before any block runs.

``quant.mix_bits`` and ``ignored_layers`` name linears by text; only the loaded model says
which linears exist. :func:`bind_layers` resolves every block's layout once
(:func:`model_linears`), matches the rules against its quantizable linears
(:meth:`llmcq.specs.RunSpecs.bind`: an entry that names nothing is a config error) and gives
every backend that exports records the chance to refuse the plan (:func:`check_plan`,
:meth:`llmcq.api.BackendSpec.check_layers`: linears an engine fuses into one kernel given
different grids). A plan made by a program (``quant.bit_budget``) goes through the same
backend checks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from llmcq.api import LayerTarget
from llmcq.layers import LayerPlan
from llmcq.model.adapter import resolve_block
from llmcq.pipeline.context import RunContext

__all__ = ["bind_layers", "model_linears", "check_plan", "ModelLinears"]

log = logging.getLogger("llmcq")


@dataclass(frozen=True)
class ModelLinears:
    """The loaded model's quantizable linears: blocks ``{prefix}.{i}`` hold ``names[i]``
    (relative names); ``shared``: each group of linears reading one input, ``experts``:
    each block's MoE expert linears (full names)."""

    prefix: str
    names: list[list[str]]
    shared: tuple[tuple[str, ...], ...]
    experts: tuple[tuple[str, ...], ...]


def model_linears(run: RunContext) -> ModelLinears:
    """Every block's layout resolved once (see :class:`ModelLinears`)."""
    adapter, model = run.adapter, run.model
    assert adapter is not None
    prefix = adapter.layout.blocks
    names: list[list[str]] = []
    shared: list[tuple[str, ...]] = []
    experts: list[tuple[str, ...]] = []
    for i, module in enumerate(adapter.blocks(model)):
        where = f"{prefix}.{i}"
        groups = resolve_block(module, adapter.block_layout(model, i), where=where)
        names.append([n for g in groups for n in g.linears])
        shared += [tuple(f"{where}.{n}" for n in g.linears) for g in groups
                   if len(g.linears) > 1]
        moe = [f"{where}.{n}" for g in groups for n, r in g.roles.items()
               if r.kind.startswith("expert_")]
        if len(moe) > 1:
            experts.append(tuple(moe))
    return ModelLinears(prefix, names, tuple(shared), tuple(experts))


def check_plan(run: RunContext, plan: LayerPlan, linears: ModelLinears) -> None:
    """Every backend that exports records may refuse ``plan`` (a ConfigError)."""
    for b in run.resolved.backends:
        if b.spec.stage == "quantized":
            b.spec.check_layers(LayerTarget(plan, b.field, linears.shared, linears.experts))


def bind_layers(run: RunContext) -> None:
    """Set ``run.specs`` to the specs bound to ``run.model`` (no-op without per-linear
    settings)."""
    specs = run.specs
    if specs.layers is None:
        return
    linears = model_linears(run)
    run.specs = specs.bind(linears.prefix, linears.names)
    plan = run.specs.plan
    assert plan is not None
    check_plan(run, plan, linears)
    for origin, entry in plan.summary().items():
        log.info("layers: %d linear(s) by %s: %s", entry["linears"], origin, entry["grid"])
