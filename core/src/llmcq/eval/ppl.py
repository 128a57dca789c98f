"""Perplexity with the GPTQ protocol.

The evaluation text is tokenized once and cut into ``n = tokens // seq_len``
non-overlapping windows; each window's loss is the mean next-token cross-entropy over its
``seq_len - 1`` predictions, and ``PPL = exp(mean of window losses)`` (GPTQ multiplies each
loss by ``seq_len`` and divides the sum by ``n * seq_len``: the same number).

``eval.inference_per_block: True`` runs the windows block by block with only one block on the
device (for models larger than device memory); otherwise the whole model is moved there.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn import functional as F

from llmcq.errors import DataError

if TYPE_CHECKING:
    from llmcq.config.loader import ResolvedEval
    from llmcq.model.adapter import ModelAdapter
    from llmcq.pipeline.context import RunContext

__all__ = ["evaluate", "evaluation_ids", "perplexity", "window_losses", "cached_window_losses",
           "cache_kwarg"]


def window_losses(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of each window (``[b]``, float32)."""
    shift = logits[:, :-1, :].float()
    labels = ids[:, 1:]
    loss = F.cross_entropy(shift.reshape(-1, shift.shape[-1]), labels.reshape(-1),
                           reduction="none")
    return loss.view(ids.shape[0], -1).mean(dim=1)


def cache_kwarg(model: nn.Module) -> str:
    """The name the model's forward takes its KV cache under (``cache`` in recent
    transformers, ``past_key_values`` before)."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cached_window_losses(model: nn.Module, batch: torch.Tensor, new_cache: Callable[[], Any],
                         chunk: int) -> torch.Tensor:
    """:func:`window_losses` of ``batch`` (``[b, seq]``) fed through a fresh KV cache from
    ``new_cache`` in forwards of ``chunk`` tokens (1: token-by-token decoding), so attention
    reads every earlier token as the cache returns it."""
    cache = new_cache()
    key = cache_kwarg(model)
    seq = batch.shape[1]
    nll = torch.zeros(batch.shape[0], dtype=torch.float64, device=batch.device)
    for i in range(0, seq - 1, chunk):
        j = min(i + chunk, seq - 1)  # the last token predicts nothing
        logits = model(input_ids=batch[:, i:j], use_cache=True, **{key: cache}).logits
        labels = batch[:, i + 1:j + 1]
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                               reduction="none")
        nll += loss.view(batch.shape[0], -1).double().sum(dim=1)
        del logits
    return (nll / (seq - 1)).float()


def _windows(ids: list[int] | torch.Tensor, seq_len: int, max_windows: int | None) -> torch.Tensor:
    t = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    n = t.numel() // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise DataError(f"evaluation text has {t.numel()} tokens, fewer than one window of "
                        f"seq_len={seq_len}")
    return t[: n * seq_len].view(n, seq_len)


@torch.no_grad()
def perplexity(model: nn.Module, ids: list[int] | torch.Tensor, seq_len: int, *, bs: int = 1,
               device: torch.device | str = "cpu", max_windows: int | None = None,
               per_block: bool = False, adapter: ModelAdapter | None = None,
               desc: str = "ppl", progress: bool = True,
               kv_cache: Callable[[], Any] | None = None,
               chunk: int | None = None) -> tuple[float, int]:
    """``(perplexity, number of windows)`` of ``model`` on token ids ``ids``.

    ``kv_cache``: a factory of KV caches (:mod:`llmcq.quant.kvcache`); each window is then fed
    through a fresh cache in forwards of ``chunk`` tokens (None: the whole window at once), so
    attention reads the keys and values the cache returns."""
    from tqdm.auto import tqdm

    windows = _windows(ids, seq_len, max_windows)
    n = windows.shape[0]
    device = torch.device(device)
    batches = [windows[i:i + bs] for i in range(0, n, bs)]
    total = 0.0
    if per_block and kv_cache is not None:
        raise ValueError("a quantized KV cache is evaluated on the whole model "
                         "(eval.inference_per_block: False)")
    if per_block:
        if adapter is None:
            raise ValueError("per-block evaluation needs the model adapter")
        losses = _blockwise_losses(model, adapter, batches, device, desc, progress)
        total = float(torch.cat(losses).double().sum())
    else:
        home = next(model.parameters()).device
        model.to(device)
        try:
            for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
                if kv_cache is not None:
                    losses = cached_window_losses(model, batch.to(device), kv_cache,
                                                  chunk or batch.shape[1])
                    total += float(losses.double().sum())
                    continue
                logits = model(input_ids=batch.to(device), use_cache=False).logits
                total += float(window_losses(logits, batch.to(device)).double().sum())
                del logits
        finally:
            model.to(home)
    ppl = math.exp(total / n)
    if not math.isfinite(ppl):
        raise DataError(f"{desc}: perplexity is not finite (NaN/Inf logits)")
    return ppl, n


def _blockwise_losses(model: nn.Module, adapter: ModelAdapter, batches: list[torch.Tensor],
                      device: torch.device, desc: str, progress: bool) -> list[torch.Tensor]:
    from tqdm.auto import tqdm

    from llmcq.pipeline.blockwise import capture_block_inputs, on_device

    inputs = capture_block_inputs(model, adapter, batches, device)
    for block in tqdm(adapter.blocks(model), desc=f"{desc} (per block)", disable=not progress,
                      leave=False):
        with on_device([block], device):
            inputs.advance(block)
    head = [model.get_submodule(adapter.layout.lm_head)]
    if adapter.layout.final_norm:
        head.append(model.get_submodule(adapter.layout.final_norm))
    losses = []
    with on_device(head, device):
        for h, ids in zip(inputs.hidden, batches, strict=True):
            logits = adapter.head_logits(model, h)
            losses.append(window_losses(logits, ids.to(device)).cpu())
    return losses


def evaluation_ids(run: RunContext, dspec: Any, path: str | None, seq_len: int) -> Any:
    """The test token ids of one dataset, tokenized once per run and shared by every
    evaluator and position that reads them (kept in ``run.cache``)."""
    key = ("eval_ids", dspec.name, path, seq_len)
    ids = run.cache.get(key)
    if ids is None:
        ids = dspec.evaluation_ids(run.token_source(dspec), path, seq_len)
        run.cache[key] = ids
    return ids


def evaluate(run: RunContext, model: nn.Module, resolved_eval: ResolvedEval,
             position: str) -> list[dict[str, Any]]:
    """Perplexity of ``model`` on each dataset of one ``eval`` block (through the quantized
    KV cache of ``quant.kvcache`` at the fake-quant position, in forwards of
    ``eval.kv_chunk`` tokens)."""
    from llmcq.quant.kvcache import run_kv_cache

    cfg = run.config.eval[resolved_eval.index]
    kv = run_kv_cache(run, model, position)
    out = []
    for dspec, _info, path in resolved_eval.datasets:
        ids = evaluation_ids(run, dspec, path, cfg.seq_len)
        ppl, n = perplexity(model, ids, cfg.seq_len, bs=cfg.bs, device=run.device,
                            max_windows=cfg.num_samples, per_block=cfg.inference_per_block,
                            adapter=run.adapter, desc=f"ppl {dspec.name} @ {position}",
                            progress=run.progress, kv_cache=kv, chunk=cfg.kv_chunk)
        run.log.info("%s %s ppl = %.4f (%d windows of %d)%s", position, dspec.name, ppl, n,
                     cfg.seq_len, f" with the {run.specs.kv.describe()} cache"
                     if kv is not None and run.specs.kv is not None else "")
        out.append({"dataset": dspec.name, "metric": "ppl", "value": ppl,
                    "tokens": n * cfg.seq_len, "seq_len": cfg.seq_len, "windows": n,
                    **kv_entry(run, kv)})
    return out


def kv_entry(run: RunContext, kv: Any) -> dict[str, Any]:
    """What a metric records of the KV cache it was measured with."""
    if kv is None or run.specs.kv is None:
        return {}
    return {"kv_cache": run.specs.kv.describe()}
