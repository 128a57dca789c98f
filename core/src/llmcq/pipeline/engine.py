"""The block loop: calibrate, transform and quantize one block at a time.

Per block (moved to the compute device alone):

1. for each recipe step in order: ``llmcq_calibrate`` then ``llmcq_transform``;
2. static activation ranges are observed on the transformed block (if ``act.static``);
3. ``llmcq_quantize`` for the quantizing step returns one record per linear;
4. the block's outputs become the next block's inputs: computed with the fake-quantized
   block when ``quant.quant_out`` is set, with the float (transformed) block otherwise;
5. the block goes back to host memory, its records are kept on the CPU.

Before all that, when a recipe step removes whole blocks (``Algorithm.remove_blocks``,
ShortGPT): every block of the unpruned model runs once on the calibration data, each step's
``observe_block(block, inputs, outputs)`` sees the block's inputs and outputs, the blocks
the steps name are deleted (:func:`llmcq.model.remove_blocks.remove_blocks`: config fields and
layer indices renumbered), per-linear settings are bound again to the smaller model, and the
rest of the run (model-wide transforms, the block loop) works on the smaller model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from llmcq import dist
from llmcq.errors import DataError, LlmcqError, PluginError
from llmcq.model.adapter import resolve_block
from llmcq.pipeline.blockwise import Block, BlockInputs, capture_block_inputs
from llmcq.pipeline.context import RunContext, Step
from llmcq.pipeline.transfer import upload_module
from llmcq.quant.fake import ActRangeObserver, fake_quantized, swap_in_fake_quant
from llmcq.quant.record import QuantizedLinear
from llmcq.quant.transform import online_transform_of

__all__ = ["quantize_model", "deploy_fake_quant", "call_stage"]


def call_stage(run: RunContext, stage: str, hook: Callable[..., Any], *, step: Step | None,
               where: str, pass_step: bool = True, **kwargs: Any) -> Any:
    """Call a stage hook; attribute any non-llmcq failure to the step's plugin."""
    try:
        if pass_step:
            kwargs["step"] = step
        return hook(run=run, **kwargs)
    except LlmcqError:
        raise
    except Exception as exc:
        plugin = step.label if step is not None else "llmcq core"
        raise PluginError(f"{type(exc).__name__}: {exc}", plugin=plugin, stage=stage,
                          where=where) from exc


def _check_records(run: RunContext, block: Block, records: Any,
                   step: Step | None) -> dict[str, QuantizedLinear]:
    plugin = step.label if step is not None else "llmcq core"
    if not isinstance(records, dict):
        raise PluginError(f"quantize returned {type(records).__name__}, expected a dict of "
                          "QuantizedLinear", plugin=plugin, stage="quantize", where=block.name)
    linears = block.linears()
    for name, rec in records.items():
        where = block.full_name(name)
        if name not in linears:
            raise PluginError(f"record for {name!r}, which is not a quantizable linear of the "
                              f"block ({', '.join(linears)})", plugin=plugin, stage="quantize",
                              where=block.name)
        if not isinstance(rec, QuantizedLinear):
            raise PluginError(f"record is a {type(rec).__name__}, not a QuantizedLinear",
                              plugin=plugin, stage="quantize", where=where)
        if tuple(rec.qweight.shape) != tuple(linears[name].weight.shape):
            raise PluginError(f"record shape {tuple(rec.qweight.shape)} != weight shape "
                              f"{tuple(linears[name].weight.shape)}", plugin=plugin,
                              stage="quantize", where=where)
        if not torch.isfinite(rec.scale).all() or (rec.zero is not None and
                                                   not torch.isfinite(rec.zero).all()):
            raise PluginError("NaN/Inf in scales or zero points", plugin=plugin,
                              stage="quantize", where=where)
        problems = rec.problems()
        if problems:
            raise PluginError("; ".join(problems), plugin=plugin, stage="quantize", where=where)
        if run.specs.per_layer:
            _check_layer_grid(run, rec, where, plugin)
        if not torch.isfinite(rec.dequantize()).all():
            raise PluginError("NaN/Inf in the quantized weight", plugin=plugin,
                              stage="quantize", where=where)
    return records


def _check_layer_grid(run: RunContext, rec: QuantizedLinear, where: str, plugin: str) -> None:
    """With per-linear settings, a record must be on its linear's own grid, and a linear
    kept in float must have none."""
    layer = run.specs.layer_for(where)
    if layer.weight is None:
        raise PluginError(f"this linear is kept in float ({layer.origin}) but the algorithm "
                          "returned a record for it (Algorithm.quantized_linears lists the "
                          "linears to quantize)", plugin=plugin, stage="quantize", where=where)
    if rec.weight != layer.weight:
        raise PluginError(f"the record is on {rec.weight.describe()}, but this linear's grid "
                          f"is {layer.weight.describe()} ({layer.origin}; "
                          "Algorithm.weight_of gives each linear's)", plugin=plugin,
                          stage="quantize", where=where)


def _check_masks(run: RunContext, block: Block, masks: Any, step: Step) -> dict[str, torch.Tensor]:
    """A sparse step's masks: bool, the weight's shape, the run's structure."""
    from llmcq.sparsity.masks import structure_violations

    plugin = step.label
    if not isinstance(masks, dict):
        raise PluginError(f"prune returned {type(masks).__name__}, expected a dict of bool "
                          "masks", plugin=plugin, stage="prune", where=block.name)
    linears = block.linears()
    structure = run.specs.sparsity.structure if run.specs.sparsity is not None else None
    for name, mask in masks.items():
        where = block.full_name(name)
        if name not in linears:
            raise PluginError(f"mask for {name!r}, which is not a linear of the block",
                              plugin=plugin, stage="prune", where=block.name)
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or \
                tuple(mask.shape) != tuple(linears[name].weight.shape):
            raise PluginError("a mask is a bool tensor of the weight's shape", plugin=plugin,
                              stage="prune", where=where)
        if structure is not None and structure_violations(mask, structure):
            raise PluginError(f"mask breaks the {structure} structure", plugin=plugin,
                              stage="prune", where=where)
    return masks


def _prune(run: RunContext, step: Step, block: Block, inputs: BlockInputs | None) -> Any:
    assert step.algorithm is not None
    return step.algorithm.prune(block, inputs)


def _apply_masks(block: Block, masks: dict[str, torch.Tensor]) -> None:
    """Zero the pruned weights in place and combine with earlier steps' masks."""
    linears = block.linears()
    for name, mask in masks.items():
        w = linears[name].weight
        mask = mask.to(w.device)
        prev = block.masks.get(name)
        mask = mask if prev is None else (mask & prev)
        w.data.mul_(mask.to(w.dtype))
        block.masks[name] = mask


def _mask_records(run: RunContext, block: Block, records: dict[str, QuantizedLinear],
                  step: Step | None) -> None:
    """Pruned weights stay pruned: every record of a masked linear carries its mask."""
    structure = run.specs.sparsity.structure if run.specs.sparsity is not None else None
    for name, mask in block.masks.items():
        rec = records.get(name)
        if rec is None:
            continue
        if rec.mask is not None and not torch.equal(rec.mask.to(mask.device), mask):
            raise PluginError("the record's mask differs from the pruning mask",
                              plugin=step.label if step else "llmcq core", stage="quantize",
                              where=block.full_name(name))
        rec.mask = mask
        rec.mask_structure = structure


def _attach_transforms(block: Block, records: dict[str, QuantizedLinear],
                       step: Step | None) -> None:
    """A linear given an online input transform before the block loop (QuaRot's R4,
    :func:`llmcq.quant.transform.attach_online_transform`) was quantized in the transformed
    basis: its record carries that transform, whichever step made the record."""
    linears = block.linears()
    for name, rec in records.items():
        t = online_transform_of(linears[name])
        if t is None:
            continue
        if rec.input_transform is not None and rec.input_transform is not t:
            raise PluginError("the record has an input transform of its own, but the linear "
                              f"already applies {t.describe()} online",
                              plugin=step.label if step else "llmcq core", stage="quantize",
                              where=block.full_name(name))
        rec.input_transform = t


def _attach_act(run: RunContext, block: Block, inputs: BlockInputs | None,
                records: dict[str, QuantizedLinear]) -> None:
    """Each record's activation settings (its linear's own, ``quant.act`` unless a
    ``quant.mix_bits`` setting says otherwise), with static ranges observed here."""
    acts = {n: run.specs.act_for(block.full_name(n)) for n in records}
    if not any(a is not None for a in acts.values()):
        return
    ranges: dict[str, ActRangeObserver] = {}
    static = {n for n, a in acts.items() if a is not None and a.static}
    if static:
        if inputs is None:
            raise PluginError("static activation quantization needs calibration inputs",
                              stage="quantize", where=block.name)
        targets = {n: m for n, m in block.linears().items() if n in static}
        ranges = {n: ActRangeObserver(run.device) for n in targets}
        inputs.observe(block.module, targets, lambda n, x, _y: ranges[n].update(x))
    for name, rec in records.items():
        act = acts[name]
        rec.act = act
        if act is not None and act.static:
            scale, zero = ranges[name].qparams(act, where=block.full_name(name))
            if not torch.isfinite(scale).all():
                raise DataError(f"non-finite activations (NaN/Inf) at the input of "
                                f"{block.full_name(name)} on calibration data")
            rec.act_scale, rec.act_zero = scale, zero


@torch.no_grad()
def quantize_model(run: RunContext, batches: list[torch.Tensor] | None) -> None:
    """Run the recipe over every block; fills ``run.records`` (and ``run.pruned``)."""
    from tqdm.auto import tqdm

    model, adapter = run.model, run.adapter
    assert adapter is not None
    hook = run.pm.hook
    removers = [s for s in run.steps
                if s.algorithm is not None and s.algorithm.implements("remove_blocks")]
    if removers:
        _remove_blocks(run, removers, batches)
    for step in run.steps:
        call_stage(run, "transform", hook.llmcq_transform, step=step, where="model",
                   block=None, inputs=None)
    if batches:  # data-parallel calibration: this rank's share (all of them on one rank)
        batches = dist.shard(batches)
    inputs = capture_block_inputs(model, adapter, batches, run.device) if batches else None
    blocks = adapter.blocks(model)
    quantizing = run.weight is not None
    sparse = run.specs.sparsity
    quant_out = run.specs.quant_out
    # the dense block's outputs feed the next block unless pruned outputs are asked for
    # (sparse.sparsity_out) or quantized ones (quant.quant_out)
    masking = any(s.spec.kind == "sparse" and s.algorithm is not None
                  and s.algorithm.implements("prune") for s in run.steps)
    dense_next = masking and sparse is not None and not sparse.sparsity_out and not (
        quantizing and quant_out)
    # a step that trains against the float block: keep the block's parameters from before the
    # first quant step changes anything (Algorithm.float_targets)
    quant_steps = [s for s in run.steps if s.spec.kind != "sparse"]
    keep_float = quant_steps[0] if any(s.algorithm is not None and s.algorithm.float_targets
                                       for s in quant_steps) else None
    for i in tqdm(range(len(blocks)), desc="blocks", disable=not run.progress):
        module: nn.Module = blocks[i]
        name = f"{adapter.layout.blocks}.{i}"
        resident = _upload(module, run.device)
        block = Block(i, name, module, resolve_block(module, adapter.block_layout(model, i),
                                                     where=name))
        last = i == len(blocks) - 1
        dense_out = inputs.forward(module) if dense_next and inputs is not None and \
            not last else None
        for step in run.steps:
            if step is keep_float:
                block.float_params = {n: p.detach().clone()
                                      for n, p in module.named_parameters()}
            call_stage(run, "calibrate", hook.llmcq_calibrate, step=step, where=name,
                       block=block, inputs=inputs)
            call_stage(run, "transform", hook.llmcq_transform, step=step, where=name,
                       block=block, inputs=inputs)
            if step.spec.kind == "sparse":
                assert step.algorithm is not None
                masks = call_stage(run, "prune", _prune, step=step, where=name,
                                   block=block, inputs=inputs)
                if masks:
                    _apply_masks(block, _check_masks(run, block, masks, step))
        records: dict[str, QuantizedLinear] = {}
        if quantizing:
            result = call_stage(run, "quantize", hook.llmcq_quantize, step=run.quantizer,
                                where=name, block=block, inputs=inputs)
            records = _check_records(run, block, result, run.quantizer)
            _mask_records(run, block, records, run.quantizer)
            _attach_transforms(block, records, run.quantizer)
            _attach_act(run, block, inputs, records)
        if inputs is not None and records and run.specs.calib_error:
            _record_errors(run, block, inputs, records)
        if inputs is not None and not last:
            if dense_out is not None:
                inputs.replace(dense_out)
            elif quant_out and records:
                with fake_quantized(module, records):
                    inputs.advance(module, check=name)
            else:
                inputs.advance(module, check=name)
        del dense_out
        for rel, mask in block.masks.items():
            run.pruned[block.full_name(rel)] = (int((~mask).sum()), int(mask.numel()))
        for rel, rec in records.items():
            run.records[block.full_name(rel)] = rec.to("cpu")
        block.masks.clear()
        block.float_params = None
        _offload(module, resident)
        run.drop_scratch(i)
        if run.device.type == "cuda":
            torch.cuda.empty_cache()


def _record_errors(run: RunContext, block: Block, inputs: BlockInputs,
                   records: dict[str, QuantizedLinear]) -> None:
    """Relative output errors of the block and its linears on the calibration inputs
    (:mod:`llmcq.quant.calib_error`), kept for results.json ``calibration_error``."""
    from llmcq.quant.calib_error import block_errors

    b_err, l_err = block_errors(block.module, inputs, records)
    errs = run.cache.setdefault("calibration_error", {"blocks": {}, "linears": {}})
    errs["blocks"][block.name] = b_err
    for rel, e in l_err.items():
        errs["linears"][block.full_name(rel)] = e


def _step_call(method: str) -> Callable[..., Any]:
    def call(run: RunContext, step: Step, **kwargs: Any) -> Any:
        assert step.algorithm is not None
        return getattr(step.algorithm, method)(**kwargs)
    return call


@torch.no_grad()
def _remove_blocks(run: RunContext, steps: list[Step], batches: list[torch.Tensor] | None
                   ) -> None:
    """Layer pruning before anything else runs (see the module docstring)."""
    from llmcq.model.remove_blocks import remove_blocks
    from llmcq.pipeline.layer_plan import bind_layers

    model, adapter = run.model, run.adapter
    assert adapter is not None
    blocks = adapter.blocks(model)
    if batches:
        inputs = capture_block_inputs(model, adapter, dist.shard(batches), run.device)
        for i in range(len(blocks)):
            module: nn.Module = blocks[i]
            name = f"{adapter.layout.blocks}.{i}"
            resident = _upload(module, run.device)
            block = Block(i, name, module, resolve_block(module, adapter.block_layout(model, i),
                                                         where=name))
            outputs = inputs.forward(module)
            for step in steps:
                call_stage(run, "observe_block", _step_call("observe_block"), step=step,
                           where=name, block=block, inputs=inputs, outputs=outputs)
            inputs.replace(outputs)
            del outputs
            _offload(module, resident)
        del inputs
    drop: set[int] = set()
    for step in steps:
        got = call_stage(run, "remove_blocks", _step_call("remove_blocks"), step=step,
                         where="model")
        if got is None or not all(isinstance(i, int) and 0 <= i < len(blocks) for i in got):
            raise PluginError(f"remove_blocks returned {got!r}, expected a list of block "
                              f"indices below {len(blocks)}", plugin=step.label,
                              stage="remove_blocks", where="model")
        drop |= set(got)
    if not drop:
        return
    remove_blocks(model, adapter.layout.blocks, sorted(drop))
    run.removed_blocks = sorted(drop)
    if run.resolved.specs.layers is not None:  # block ids now name the smaller model's
        run.specs = run.resolved.specs
        bind_layers(run)
        for step in run.steps:
            if step.algorithm is not None:
                step.algorithm.specs = run.specs


def _fingerprint(t: torch.Tensor) -> torch.Tensor:
    """Two wrap-around int64 sums of ``t``'s bit patterns (plain and position-weighted), on
    ``t``'s device without a host sync; equal fingerprints mean unchanged values (up to a
    negligible chance)."""
    flat = t.detach().reshape(-1)
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    if flat.dtype != torch.bool and flat.element_size() in ints:
        flat = flat.view(ints[flat.element_size()])
    out = torch.zeros(2, dtype=torch.int64, device=t.device)
    step = 1 << 24
    for start in range(0, flat.numel(), step):
        bits = flat[start:start + step].to(torch.int64)
        pos = torch.arange(start, start + bits.numel(), device=t.device, dtype=torch.int64)
        out[0] += bits.sum()
        out[1] += (bits * (pos * 2654435761 % 2147483647 + 1)).sum()
    return out


def _upload(module: nn.Module, device: torch.device) -> dict[str, Any] | None:
    """Move ``module`` to ``device``; keep its host tensors and a fingerprint of each so
    that :func:`_offload` copies back only what the block's processing changed (a device
    to host copy into fresh host memory is the slowest move there is)."""
    if device.type == "cpu":
        module.to(device)
        return None
    host = {n: t.data for n, t in list(module.named_parameters()) + list(module.named_buffers())
            if t.device.type == "cpu"}
    upload_module(module, device)
    prints = {}
    for n, t in list(module.named_parameters()) + list(module.named_buffers()):
        if n in host and t.device == device:
            prints[n] = _fingerprint(t)
    return {"host": host, "prints": prints}


def _offload(module: nn.Module, resident: dict[str, Any] | None) -> None:
    """Back to host memory: unchanged tensors get their host originals back (no copy)."""
    if resident is None:
        module.to("cpu")
        return
    host, prints = resident["host"], resident["prints"]
    named = dict(module.named_parameters())
    named.update(dict(module.named_buffers()))
    same: dict[str, bool] = {}
    checks = [(n, t) for n, t in named.items() if n in prints and t.device.type != "cpu"
              and t.shape == host[n].shape and t.dtype == host[n].dtype]
    if checks:
        flags = torch.stack([(_fingerprint(t) == prints[n]).all() for n, t in checks])
        same = dict(zip([n for n, _ in checks], flags.tolist(), strict=True))  # one host sync
    for n, t in named.items():
        if t.device.type == "cpu":
            continue
        new = host[n] if same.get(n, False) else t.data.to("cpu")
        owner_name, _, leaf = n.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        if leaf in owner._parameters:
            owner._parameters[leaf].data = new
        else:
            owner._buffers[leaf] = new


def deploy_fake_quant(model: nn.Module, records: dict[str, QuantizedLinear]) -> None:
    """Replace every recorded linear of ``model`` by its fake-quantized version, in place."""
    swap_in_fake_quant(model, records)
