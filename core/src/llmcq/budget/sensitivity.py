"""Measure ``e(l, b)``: the model's next-token KL divergence when only linear ``l`` is
rounded to width ``b`` (everything else float), on a few calibration samples.

``e(l, b) = mean over tokens of KL(p_float || p_quant)`` where ``p`` is the softmax of the
logits. Summing ``e`` over linears is the first-order (additive) approximation the search
optimises.

How it is computed (block-wise, nothing recomputed twice):

1. one float pass keeps the input of every block (``L`` block forwards) and the last
   block's float output; on the way, each linear's record at each width is built by
   core's round-to-nearest (:func:`llmcq.quant.rtn.rtn_record`) and priced by
   :func:`llmcq.quant.compression.record_bits` (the figure results.json reports);
2. for block ``i``, every (linear, width) variant runs block ``i`` from its cached input with
   that one linear fake-quantized (the record's dequantized weight), then all variants go
   together through blocks ``i+1 .. L-1`` (each uploaded once per source block) and the
   head; the float logits are computed once per source block and batch.

Cost: ``sum_i V_i * (L - i)`` block forwards (``V_i`` = linears x widths of block ``i``),
about ``7 * W * L / 2`` full-model forwards of the ``n_samples`` samples for a Llama
block of 7 linears and ``W`` widths, plus ``V + L`` head evaluations per sample. Memory:
the ``L`` cached block inputs plus ``V_i`` hidden-state copies, on the compute device
(at most 4 GiB of copies at once: a block with more variants, many MoE experts, sends them
through the later blocks in several rounds).
Measured on one CPU thread: the tiny 2-block test Llama (4 x 32 tokens, 3 widths) 0.15 s;
the bundled SmolLM2-135M (30 blocks, 1 x 128 tokens, 3 widths) 150-220 s for 9,705 block
forwards (docs/mixed_precision.md, "Bit-budget search").
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from llmcq.model.adapter import ModelAdapter, resolve_block
from llmcq.pipeline.blockwise import block_output, capture_block_inputs, on_device
from llmcq.quant.compression import record_bits
from llmcq.quant.rtn import rtn_record
from llmcq.quant.spec import WeightQuantSpec

__all__ = ["FloatPass", "float_pass", "measure_errors", "Targets"]

#: per block index: relative linear name -> {width: that linear's grid at the width}
Targets = Mapping[int, Mapping[str, Mapping[int, WeightQuantSpec]]]

#: logits computed at once per chunk of tokens: tokens x vocabulary <= this
_LOGIT_ELEMS = 1 << 24
#: hidden-state copies of one source block's variants kept at once (bytes): more variants
#: (a block of many MoE experts) go through the later blocks in several rounds
_VARIANT_BYTES = 4 << 30


@dataclass
class FloatPass:
    """What the float model gives once: every block's input per batch, the last block's
    output, the per-batch block keyword inputs, and ``record_bits`` of every target at
    every width (by full name)."""

    inputs: list[list[torch.Tensor]]
    final: list[torch.Tensor]
    kwargs: list[dict[str, Any]]
    bits: dict[str, dict[int, dict[str, float]]] = field(default_factory=dict)
    tokens: int = 0
    block_forwards: int = 0


def _linears(model: nn.Module, adapter: ModelAdapter, i: int, module: nn.Module
             ) -> dict[str, nn.Linear]:
    where = f"{adapter.layout.blocks}.{i}"
    groups = resolve_block(module, adapter.block_layout(model, i), where=where)
    return {n: lin for g in groups for n, lin in g.linears.items()}


@torch.no_grad()
def float_pass(model: nn.Module, adapter: ModelAdapter, batches: Sequence[torch.Tensor],
               device: torch.device, targets: Targets, *,
               fractional: Collection[int] = (), progress: bool = False) -> FloatPass:
    """Step 1 of the module docstring. At the widths in ``fractional`` zero points are
    priced as fractional (16 bits), for algorithms whose records store them so."""
    from tqdm.auto import tqdm

    inputs = capture_block_inputs(model, adapter, batches, device)
    blocks = adapter.blocks(model)
    cached: list[list[torch.Tensor]] = []
    bits: dict[str, dict[int, dict[str, float]]] = {}
    prefix = adapter.layout.blocks
    for i in tqdm(range(len(blocks)), desc="bit budget: float pass", disable=not progress,
                  leave=False):
        module = blocks[i]
        with on_device([module], device):
            cached.append(list(inputs.hidden))
            linears = _linears(model, adapter, i, module)
            for rel, by_width in targets.get(i, {}).items():
                bits[f"{prefix}.{i}.{rel}"] = {
                    b: record_bits(rtn_record(linears[rel], spec),
                                   zero_integral=False if b in fractional else None)
                    for b, spec in by_width.items()}
            inputs.advance(module, check=f"{prefix}.{i}")
    return FloatPass(cached, list(inputs.hidden), list(inputs.kwargs), bits,
                     tokens=sum(int(b.numel()) for b in batches), block_forwards=len(blocks))


def _head_modules(model: nn.Module, adapter: ModelAdapter) -> list[nn.Module]:
    head = [model.get_submodule(adapter.layout.lm_head)]
    if adapter.layout.final_norm:
        head.append(model.get_submodule(adapter.layout.final_norm))
    return head


@torch.no_grad()
def _kl_sums(model: nn.Module, adapter: ModelAdapter, final: torch.Tensor,
             variants: Sequence[torch.Tensor]) -> list[float]:
    """``sum over tokens KL(p_float || p_variant)`` for one batch, each variant's last
    hidden state against ``final`` (the float one), in chunks of tokens."""
    hidden = final.shape[-1]
    flat_f = final.reshape(-1, hidden)
    flat_v = [v.reshape(-1, hidden) for v in variants]
    vocab = int(adapter.head_logits(model, flat_f[:1]).shape[-1])
    step = max(1, _LOGIT_ELEMS // vocab)
    sums = [0.0] * len(variants)
    for start in range(0, flat_f.shape[0], step):
        logp_f = F.log_softmax(adapter.head_logits(model, flat_f[start:start + step]).float(),
                               dim=-1)
        p_f = logp_f.exp()
        for k, v in enumerate(flat_v):
            logp_q = F.log_softmax(adapter.head_logits(model, v[start:start + step]).float(),
                                   dim=-1)
            sums[k] += float((p_f * (logp_f - logp_q)).sum(dtype=torch.float64))
    return sums


@torch.no_grad()
def measure_errors(model: nn.Module, adapter: ModelAdapter, fp: FloatPass,
                   device: torch.device, targets: Targets, *,
                   progress: bool = False) -> dict[str, dict[int, float]]:
    """Step 2 of the module docstring: ``{full name: {width: mean KL per token}}``; adds the
    block forwards it runs to ``fp.block_forwards``."""
    from tqdm.auto import tqdm

    blocks = adapter.blocks(model)
    head = _head_modules(model, adapter)
    out: dict[str, dict[int, float]] = {}
    n_tokens = sum(int(f.shape[0] * f.shape[1]) for f in fp.final)
    todo = [i for i in range(len(blocks)) if targets.get(i)]
    for i in tqdm(todo, desc="bit budget: sensitivity", disable=not progress, leave=False):
        variants = [(rel, b, spec) for rel, by_width in targets[i].items()
                    for b, spec in by_width.items()]
        size = sum(h.numel() * h.element_size() for h in fp.inputs[i])
        step = max(1, _VARIANT_BYTES // max(size, 1))
        for start in range(0, len(variants), step):
            _round(model, adapter, fp, device, i, variants[start:start + step], head,
                   n_tokens, out)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def _round(model: nn.Module, adapter: ModelAdapter, fp: FloatPass, device: torch.device,
           i: int, variants: Sequence[tuple[str, int, WeightQuantSpec]],
           head: list[nn.Module], n_tokens: int, out: dict[str, dict[int, float]]) -> None:
    """The errors of some variants of block ``i``'s linears, into ``out``."""
    blocks = adapter.blocks(model)
    prefix = adapter.layout.blocks
    module = blocks[i]
    keys: list[tuple[str, int]] = []
    hidden: list[list[torch.Tensor]] = []
    with on_device([module], device):
        linears = _linears(model, adapter, i, module)
        for rel, b, spec in variants:
            lin = linears[rel]
            original = lin.weight.data
            lin.weight.data = rtn_record(lin, spec).dequantize(original.dtype)
            try:
                hidden.append([block_output(module(h, **kw))
                               for h, kw in zip(fp.inputs[i], fp.kwargs, strict=True)])
            finally:
                lin.weight.data = original
            keys.append((rel, b))
    fp.block_forwards += len(keys)
    for j in range(i + 1, len(blocks)):
        with on_device([blocks[j]], device):
            for v in hidden:
                for k, (h, kw) in enumerate(zip(v, fp.kwargs, strict=True)):
                    v[k] = block_output(blocks[j](h, **kw))
        fp.block_forwards += len(keys)
    sums = [0.0] * len(keys)
    with on_device(head, device):
        for k, final in enumerate(fp.final):
            for n, s in enumerate(_kl_sums(model, adapter, final,
                                           [v[k] for v in hidden])):
                sums[n] += s
    for (rel, b), s in zip(keys, sums, strict=True):
        out.setdefault(f"{prefix}.{i}.{rel}", {})[b] = s / n_tokens

