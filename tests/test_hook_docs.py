"""docs/hooks.md is generated from llmcq.hookspecs, and a real run calls the hooks as the
specs say: the documented order, the arguments, ``firstresult`` for quantize, merged
evaluation results and extra export files."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import llmcq
from llmcq import hookspecs
from llmcq.config.loader import resolve_config
from llmcq.pipeline.runner import run
from llmcq.quant.rtn import rtn_records
from llmcq.quant.spec import PerChannel, WeightQuantSpec

DOC = Path(__file__).resolve().parent.parent / "docs" / "hooks.md"


def test_hook_page_is_generated_from_the_specs() -> None:
    assert DOC.read_text() == hookspecs.markdown(), \
        "docs/hooks.md is stale: run python scripts/gen_hook_docs.py"


def test_every_hook_is_a_hookspec_with_a_docstring() -> None:
    for name in hookspecs.HOOK_NAMES:
        fn = getattr(hookspecs, name)
        assert getattr(fn, "llmcq_spec", None) is not None, name
        assert fn.__doc__ and len(fn.__doc__) > 100, name
        assert f"## {name}({', '.join(inspect.signature(fn).parameters)})" in DOC.read_text()
    defined = {n for n in dir(hookspecs) if n.startswith("llmcq_")}
    assert defined == set(hookspecs.HOOK_NAMES)


class Spy:
    """Records every hook call; takes over block 0's quantization (8-bit per channel) and
    adds a metric and an export file, as the specs allow."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    @llmcq.hookimpl
    def llmcq_calibrate(self, step: Any, block: Any, inputs: Any) -> None:
        self.calls.append(("calibrate", step.spec.name, block.index))

    @llmcq.hookimpl
    def llmcq_transform(self, step: Any, block: Any) -> None:
        self.calls.append(("transform", step.spec.name, None if block is None else block.index))

    @llmcq.hookimpl
    def llmcq_quantize(self, step: Any, block: Any) -> Any:
        self.calls.append(("quantize", step.spec.name, block.index))
        if block.index == 0:
            return rtn_records(block.linears(), WeightQuantSpec(bits=8, symmetric=True,
                                                                granularity=PerChannel()))
        return None

    @llmcq.hookimpl
    def llmcq_evaluate(self, position: str) -> list[dict[str, Any]]:
        self.calls.append(("evaluate", position))
        return [{"dataset": "spy", "metric": "calls", "value": float(len(self.calls))}]

    @llmcq.hookimpl
    def llmcq_export(self, backend: str, out_dir: Path) -> list[Path]:
        self.calls.append(("export", backend))
        (out_dir / "SPY.txt").write_text(backend)
        return [out_dir / "SPY.txt"]


def test_a_run_calls_the_hooks_as_documented(tiny_llama_dir: Path, shared_data: Path,
                                             tmp_path: Path) -> None:
    cfg = {"base": {"seed": 0, "device": "cpu"},
           "model": {"type": "llama", "path": str(tiny_llama_dir)},
           "eval": {"eval_pos": ["pretrain", "transformed", "fake_quant"], "name": "wikitext2",
                    "path": str(shared_data / "wikitext2" / "test.txt"), "seq_len": 32,
                    "num_samples": 2},
           "sparse": {"method": "magnitude", "weight": {"sparsity": 0.25}},
           "quant": {"method": "rtn", "weight": {"bit": 3, "symmetric": True,
                                                 "granularity": "per_channel"}},
           "save": {"save_path": str(tmp_path / "o"), "save_trans": True, "save_fake": True}}
    spy = Spy()
    out = run(resolve_config(cfg), progress=False, extra_plugins=[spy])
    expected: list[tuple[Any, ...]] = [("evaluate", "pretrain")]
    expected += [("transform", "magnitude", None), ("transform", "rtn", None)]
    for i in range(2):
        for step in ("magnitude", "rtn"):
            expected += [("calibrate", step, i), ("transform", step, i)]
        expected.append(("quantize", "rtn", i))
    expected += [("evaluate", "transformed"), ("export", "trans"), ("evaluate", "fake_quant"),
                 ("export", "fake")]
    assert spy.calls == expected
    # every evaluate implementation's metrics are merged; every export's files are kept
    assert out["eval"]["fake_quant"]["spy"]["calls"] > 0
    assert (tmp_path / "o" / "fake_quant_model" / "SPY.txt").read_text() == "fake"
    assert (tmp_path / "o" / "transformed_model" / "SPY.txt").read_text() == "trans"
    # firstresult: block 0 was quantized by the spy (8 bits), block 1 by core's RTN (3 bits)
    meta = json.loads((tmp_path / "o" / "fake_quant_model" / "llmcq_quant.json").read_text())
    bits = {name.split(".")[2]: layer["weight"]["bits"] for name, layer in meta["layers"].items()}
    assert bits == {"0": 8, "1": 3}
    # core masks every record, the spy's included: the pruned quarter stays zero
    assert out["compression"]["mask_sparsity"] == 0.25
    assert out["compression"]["sparsity"] >= 0.25
