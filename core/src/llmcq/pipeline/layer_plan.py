"""Bind the config's per-linear settings to the loaded model, before any block runs.

``quant.mix_bits`` and ``ignored_layers`` name linears by text; only the loaded model says
which linears exist. :func:`bind_layers` resolves every block's layout once, matches the
rules against its quantizable linears (:meth:`llmcq.specs.RunSpecs.bind`: an entry that
names nothing is a config error) and gives every backend that exports records the chance to
refuse the plan (:meth:`llmcq.api.BackendSpec.check_layers`: linears an engine fuses into one
kernel given different grids).
"""

from __future__ import annotations

import logging

from llmcq.api import LayerTarget
from llmcq.model.adapter import resolve_block
from llmcq.pipeline.context import RunContext

__all__ = ["bind_layers"]

log = logging.getLogger("llmcq")


def bind_layers(run: RunContext) -> None:
    """Set ``run.specs`` to the specs bound to ``run.model`` (no-op without per-linear
    settings)."""
    specs = run.specs
    if specs.layers is None:
        return
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
    run.specs = specs.bind(prefix, names)
    plan = run.specs.plan
    assert plan is not None
    for b in run.resolved.backends:
        if b.spec.stage == "quantized":
            b.spec.check_layers(LayerTarget(plan, b.field, tuple(shared), tuple(experts)))
    for origin, entry in plan.summary().items():
        log.info("layers: %d linear(s) by %s: %s", entry["linears"], origin, entry["grid"])
