"""Core's own implementations of the five stage hooks (all ``trylast``).

They dispatch to the drivers the config chose: the recipe step's algorithm, the evaluators
of each ``eval`` block, the backend's exporter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmcq.hookspecs import hookimpl
from llmcq.pipeline.blockwise import Block, BlockInputs
from llmcq.pipeline.context import RunContext, Step
from llmcq.quant.record import QuantizedLinear
from llmcq.quant.rtn import rtn_records

__all__ = ["Builtin"]


class Builtin:
    """Registered as ``llmcq.builtin`` in every run's plugin manager."""

    @hookimpl(trylast=True)
    def llmcq_calibrate(self, run: RunContext, step: Step, block: Block,
                        inputs: BlockInputs | None) -> None:
        assert step.algorithm is not None
        step.algorithm.calibrate(block, inputs)

    @hookimpl(trylast=True)
    def llmcq_transform(self, run: RunContext, step: Step, block: Block | None,
                        inputs: BlockInputs | None) -> None:
        assert step.algorithm is not None
        if block is None:
            step.algorithm.transform_model(run.model)
        else:
            step.algorithm.transform(block, inputs)

    @hookimpl(trylast=True)
    def llmcq_quantize(self, run: RunContext, step: Step | None, block: Block,
                       inputs: BlockInputs | None) -> dict[str, QuantizedLinear] | None:
        if step is None or step.algorithm is None:
            assert run.weight is not None
            return rtn_records(block.linears(), {n: run.specs.weight_for(block.full_name(n))
                                                 for n in block.linears()})
        return step.algorithm.quantize(block, inputs)

    @hookimpl(trylast=True)
    def llmcq_evaluate(self, run: RunContext, model: Any, position: str) -> list[dict[str, Any]]:
        metrics: list[dict[str, Any]] = []
        for ev in run.resolved.evals:
            if position not in run.config.eval[ev.index].eval_pos:
                continue
            evaluate = run.cache.setdefault(("evaluator", ev.evaluator.name),
                                            ev.evaluator.load_impl())
            metrics += evaluate(run, model, ev, position)
        return metrics

    @hookimpl(trylast=True)
    def llmcq_export(self, run: RunContext, backend: str, model: Any,
                     records: dict[str, QuantizedLinear], out_dir: Path) -> list[Path]:
        resolved = next(b for b in run.resolved.backends if b.name == backend)
        exporter = resolved.spec.load_impl()
        return list(exporter(run, model, records, out_dir))
