"""``llmcq run``: load, evaluate, calibrate/transform/quantize, evaluate, export.

Order (llmc's): load the model; evaluate ``pretrain``; build calibration data; model-wide
transforms; the block loop; evaluate ``transformed``; export backends of the transformed
model (``trans``); swap in fake-quantized linears; evaluate ``fake_quant``; export the
quantized backends; write ``results.json``. Each stage's wall time and peak memory are
recorded. Outputs are written atomically; ``results.json`` is written last.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import logging
import random
import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmcq import dist
from llmcq.config.loader import RESULTS_FILE, ResolvedConfig
from llmcq.data.datasets import DatasetSpec
from llmcq.capabilities import check_layout, check_records
from llmcq.errors import ConfigError, DataError, PluginError
from llmcq.io.atomic import atomic_dir, atomic_write_text
from llmcq.model.adapter import ModelAdapter
from llmcq.pipeline.builtin import Builtin
from llmcq.pipeline.context import RunContext, Step
from llmcq.pipeline.engine import call_stage, deploy_fake_quant, quantize_model
from llmcq.pipeline.layer_plan import bind_layers
from llmcq.plugins.manager import make_plugin_manager
from llmcq.quant.compression import compression_summary, linear_summary

__all__ = ["run", "search_budget", "pick_device", "calibration_batches"]

log = logging.getLogger("llmcq")


def pick_device(name: str) -> torch.device:
    if dist.active() and name in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device(f"cuda:{dist.local_rank()}")  # one GPU per rank
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError("base.device", name, reason="CUDA is not available here",
                              allowed="auto, cpu")
        idx = int(name.split(":")[1]) if ":" in name else 0
        if idx >= torch.cuda.device_count():
            raise ConfigError("base.device", name, reason=f"only {torch.cuda.device_count()} "
                              "CUDA device(s) present")
    return torch.device(name)


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _cpu_peak_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


class _Stages:
    """Wall time and peak CUDA memory per stage."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}
        self.cuda_peak: dict[str, int] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            if cuda:
                torch.cuda.synchronize(self.device)
                self.cuda_peak[name] = int(torch.cuda.max_memory_allocated(self.device))
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def calibration_batches(samples: list[list[int]], bs: int) -> list[torch.Tensor]:
    """Group token-id samples into batches by llmc's ``calib.bs`` (-1: one batch)."""
    size = len(samples) if bs == -1 else bs
    batches = []
    for i in range(0, len(samples), size):
        chunk = samples[i:i + size]
        lengths = {len(s) for s in chunk}
        if len(lengths) > 1:
            raise DataError(f"calib.bs={bs}: samples of different lengths {sorted(lengths)} "
                            "cannot share a batch; set calib.bs: 1")
        batches.append(torch.tensor(chunk, dtype=torch.long))
    return batches


def _versions(resolved: ResolvedConfig) -> dict[str, str]:
    names = {"llmcq", "llmcq-cli", "torch", "transformers", "accelerate", "safetensors", "gguf",
             "pluggy", "stevedore"}
    names |= {p["distribution"] for p in resolved.plugins_used() if p["distribution"]}
    out = {}
    for n in sorted(names):
        try:
            out[n] = md.version(n)
        except md.PackageNotFoundError:
            continue
    out["python"] = sys.version.split()[0]
    return out


def _build_steps(run: RunContext) -> None:
    steps = []
    for i, rs in enumerate(run.resolved.steps):
        step = Step(i, rs.name, rs.spec, rs.info, rs.special)
        cls = rs.spec.load_impl()
        step.algorithm = cls(run=run, step=step)
        steps.append(step)
    run.steps = steps
    quant_steps = [s for s in steps if s.spec.kind == "quant"]
    run.quantizer = next((s for s in reversed(quant_steps)
                          if s.algorithm is not None and s.algorithm.implements("quantize")), None)


def _evaluate(run: RunContext, stages: _Stages, position: str,
              results: dict[str, Any]) -> None:
    if not dist.is_main():
        return  # data-parallel calibration: rank 0 evaluates
    if not any(position in run.config.eval[e.index].eval_pos for e in run.resolved.evals):
        return
    with stages(f"eval_{position}"):
        lists = call_stage(run, "evaluate", run.pm.hook.llmcq_evaluate, step=None,
                           pass_step=False, where=position, model=run.model, position=position)
    table = results["eval"].setdefault(position, {})
    for metrics in lists or []:
        for m in metrics if isinstance(metrics, list) else [metrics]:
            key = m["dataset"]
            if key in table and table[key].get("seq_len") != m.get("seq_len"):
                key = f"{key}@{m.get('seq_len')}"
            entry = table.setdefault(key, {})
            entry[m.get("metric", "value")] = m["value"]
            for extra in ("tokens", "seq_len", "windows", "kv_cache"):
                if extra in m:
                    entry[extra] = m[extra]


def _calibration(run: RunContext, stages: _Stages, results: dict[str, Any]
                 ) -> list[torch.Tensor]:
    """The calibration batches (``calib``), recorded in ``results["calibration"]``."""
    cfg = run.config
    with stages("calib_data"):
        assert run.resolved.calib is not None and cfg.calib is not None
        dspec: DatasetSpec = run.resolved.calib[0]
        samples = dspec.calibration_ids(run.token_source(dspec), cfg.calib)
        batches = calibration_batches(samples, cfg.calib.bs)
    results["calibration"] = {"samples": sum(int(b.shape[0]) for b in batches),
                              "tokens": sum(int(b.numel()) for b in batches),
                              "batches": len(batches)}
    return batches


def _report_budget(summary: dict[str, Any]) -> None:
    """The achieved averages against the target; a difference from the plan (an algorithm
    storing more than round-to-nearest records, e.g. float columns) is a warning."""
    achieved, planned = summary["achieved"], summary["planned"]
    log.info("bit budget: achieved weight_bits_mean %s, bits_per_param %s (target %s %s)",
             achieved["weight_bits_mean"], achieved["bits_per_param"], summary["target"],
             summary["measure"])
    measure = summary["measure"]
    got = achieved.get(measure)
    if got is not None and got > planned[measure]:
        over = " and the target" if got > summary["target"] else ""
        log.warning("bit budget: the records average %s %s, above the plan (%s)%s: the "
                    "algorithm stores more per weight than the search priced (float columns, "
                    "outliers)", got, measure, planned[measure], over)


def check_adapter(run: RunContext) -> None:
    """The loaded layout against what the recipe needs (every adapter, hand-written ones
    too): layout facts (:func:`llmcq.capabilities.check_layout`), and, when an evaluation
    runs block by block, that the adapter's block-wise logits reproduce the model's own."""
    adapter = run.adapter
    assert adapter is not None
    provides, reasons = adapter.layout_facts(run.model)
    check_layout(run.resolved.model[0].name, provides, run.resolved.needs, reasons=reasons)
    if any(run.config.eval[e.index].inference_per_block for e in run.resolved.evals):
        problem = adapter.check_head(run.model)
        if problem:
            raise PluginError(f"model adapter {run.resolved.model[0].name!r}: {problem}; "
                              "per-block evaluation would report wrong perplexities (fix "
                              "the adapter's head_logits, or set eval.inference_per_block: "
                              "False)", stage="load")


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _export(run: RunContext, stages: _Stages, stage: str, written: dict[str, str],
            sizes: dict[str, int]) -> None:
    if not dist.is_main():
        return  # every rank holds the same records; rank 0 writes them
    for b in run.resolved.backends:
        if b.spec.stage != stage:
            continue
        final = run.resolved.save_dir / b.folder
        records = run.records if stage == "quantized" else {}
        check_records(b.name, b.spec.accepts, records,
                      plugin=run.quantizer.label if run.quantizer else "llmcq core",
                      accepts_detail=b.spec.accepts_detail)
        with stages(f"export_{b.name}"):
            with atomic_dir(final, overwrite=run.resolved.overwrite) as tmp:
                run.pm.hook.llmcq_export(run=run, backend=b.name, model=run.model,
                                         records=records, out_dir=Path(tmp))
        written[b.name] = str(final)
        sizes[b.name] = _folder_bytes(final)
        log.info("exported %s to %s (%d bytes)", b.name, final, sizes[b.name])


def _load(ctx: RunContext, stages: _Stages, model: Any, tokenizer: Any) -> None:
    """Load the model (or take the one given), check the adapter, bind per-linear rules."""
    resolved = ctx.resolved
    with stages("load"):
        mspec = resolved.model[0]
        adapter_cls = mspec.load_impl()
        adapter: ModelAdapter = adapter_cls(mspec, resolved.config.model)
        adapter.require_tokenizer = resolved.needs_tokenizer
        ctx.adapter = adapter
        if model is not None:
            ctx.model, ctx.tokenizer = model, tokenizer
        else:
            ctx.model, ctx.tokenizer = adapter.load(resolved.source)
    log.info("loaded %s with adapter %s", resolved.source.display, mspec.name)
    if ctx.tokenizer is None:
        log.info("the checkpoint has no tokenizer and no step needs one; exports are saved "
                 "without tokenizer files")
    check_adapter(ctx)
    bind_layers(ctx)


def search_budget(resolved: ResolvedConfig, *, progress: bool = True, model: Any = None,
                  tokenizer: Any = None) -> dict[str, Any]:
    """``llmcq budget``: only the ``quant.bit_budget`` search (load, calibration samples,
    sensitivities, allocation, the ``save_path`` snippet); nothing is quantized, evaluated
    or exported. Returns results.json's ``bit_budget`` block (without ``achieved``)."""
    cfg = resolved.config
    if cfg.quant is None or cfg.quant.bit_budget is None:
        raise ConfigError("quant.bit_budget", None, show_value=False,
                          reason="llmcq budget runs the bit-budget search; the config has "
                          "no quant.bit_budget section")
    from llmcq.budget.plan import refuse_existing_snippet, search

    refuse_existing_snippet(resolved)  # before anything is loaded
    _seed(cfg.base.seed)
    device = pick_device(cfg.base.device)
    stages = _Stages(device)
    ctx = RunContext(resolved=resolved, device=device,
                     pm=make_plugin_manager(builtin=Builtin()), progress=progress)
    _load(ctx, stages, model, tokenizer)

    batches = _calibration(ctx, stages, {})
    with stages("bit_budget"):
        outcome = search(ctx, batches)
    return outcome.summary()


def run(resolved: ResolvedConfig, *, progress: bool = True,
        extra_plugins: list[Any] | None = None, model: Any = None,
        tokenizer: Any = None) -> dict[str, Any]:
    """Execute a resolved config; returns the results dict also written to results.json.

    ``model``/``tokenizer``: use these (already loaded, on the CPU) instead of loading
    ``model.path``; the run changes the model in place (notebooks, tests, sweeps).
    ``extra_plugins``: objects with ``@llmcq.hookimpl`` methods to register for this run.
    """
    cfg = resolved.config
    _seed(cfg.base.seed)
    device = pick_device(cfg.base.device)
    stages = _Stages(device)
    pm = make_plugin_manager(builtin=Builtin(), extra=extra_plugins)
    ctx = RunContext(resolved=resolved, device=device, pm=pm, progress=progress)
    results: dict[str, Any] = {"eval": {}}
    total_start = time.perf_counter()

    _load(ctx, stages, model, tokenizer)
    batches = None
    budget = None
    if cfg.quant is not None and cfg.quant.bit_budget is not None:
        from llmcq.budget.plan import search

        batches = _calibration(ctx, stages, results)
        with stages("bit_budget"):  # before the steps are built: they read run.specs
            budget = search(ctx, batches)
    _build_steps(ctx)

    _evaluate(ctx, stages, "pretrain", results)

    if ctx.steps:
        if resolved.needs_calibration and batches is None:
            batches = _calibration(ctx, stages, results)
        with stages("quantize"):
            quantize_model(ctx, batches)

    _evaluate(ctx, stages, "transformed", results)
    written: dict[str, str] = {}
    sizes: dict[str, int] = {}
    _export(ctx, stages, "transformed", written, sizes)
    if ctx.records:
        with stages("deploy"):
            deploy_fake_quant(ctx.model, ctx.records)
    _evaluate(ctx, stages, "fake_quant", results)
    _evaluate(ctx, stages, "fake_quant_wo_kv", results)  # llmc's: without quant.kvcache
    _export(ctx, stages, "quantized", written, sizes)

    stages.seconds["total"] = time.perf_counter() - total_start
    cuda_peak = max(stages.cuda_peak.values()) if stages.cuda_peak else None
    raw_json = json.dumps(resolved.raw, sort_keys=True, default=str)
    results.update({
        "timings_s": {k: round(v, 3) for k, v in stages.seconds.items()},
        "peak_memory_bytes": {"cpu": _cpu_peak_bytes(), "cuda": cuda_peak,
                              "cuda_by_stage": stages.cuda_peak or None},
        "config": cfg.model_dump(mode="json"),
        "config_sha256": hashlib.sha256(raw_json.encode()).hexdigest(),
        "versions": _versions(resolved),
        "plugins": resolved.plugins_used(),
        "recipe": [{"method": s.spec.name, "quantizes": s is ctx.quantizer,
                    **(s.algorithm.summary() if s.algorithm else {})} for s in ctx.steps],
        "quantized_linears": len(ctx.records),
        **({"layers": ctx.specs.plan.summary()} if ctx.specs.plan is not None else {}),
        "compression": {**compression_summary(ctx.model, ctx.records, ctx.pruned),
                        "export_bytes": sizes},
        "linears": linear_summary(ctx.records, ctx.pruned),
        **({"calibration_error": ctx.cache["calibration_error"]}
           if "calibration_error" in ctx.cache else {}),
        "device": str(device),
        "outputs": written,
        "model_source": resolved.source.display,
    })
    if budget is not None:
        results["bit_budget"] = budget.summary(results["compression"])
        _report_budget(results["bit_budget"])
    results["ranks"] = dist.world_size()
    if dist.is_main():
        atomic_write_text(resolved.save_dir / RESULTS_FILE,
                          json.dumps(results, indent=2) + "\n", overwrite=True)
    return results
