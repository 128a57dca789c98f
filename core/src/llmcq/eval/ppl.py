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
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn import functional as F

from llmcq.errors import DataError

if TYPE_CHECKING:
    from llmcq.config.loader import ResolvedEval
    from llmcq.model.adapter import ModelAdapter
    from llmcq.pipeline.context import RunContext

__all__ = ["evaluate", "perplexity", "window_losses"]

def window_losses(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of each window (``[b]``, float32)."""
    shift = logits[:, :-1, :].float()
    labels = ids[:, 1:]
    loss = F.cross_entropy(shift.reshape(-1, shift.shape[-1]), labels.reshape(-1),
                           reduction="none")
    return loss.view(ids.shape[0], -1).mean(dim=1)


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
               desc: str = "ppl", progress: bool = True) -> tuple[float, int]:
    """``(perplexity, number of windows)`` of ``model`` on token ids ``ids``."""
    from tqdm.auto import tqdm

    windows = _windows(ids, seq_len, max_windows)
    n = windows.shape[0]
    device = torch.device(device)
    batches = [windows[i:i + bs] for i in range(0, n, bs)]
    total = 0.0
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
        for h, ids in zip(inputs.hidden, batches):
            logits = adapter.head_logits(model, h)
            losses.append(window_losses(logits, ids.to(device)).cpu())
    return losses


def evaluate(run: RunContext, model: nn.Module, resolved_eval: ResolvedEval,
             position: str) -> list[dict[str, Any]]:
    """Perplexity of ``model`` on each dataset of one ``eval`` block."""
    cfg = run.config.eval[resolved_eval.index]
    out = []
    for dspec, _info, path in resolved_eval.datasets:
        key = ("eval_ids", dspec.name, path, cfg.seq_len)
        ids = run.cache.get(key)
        if ids is None:
            ids = dspec.evaluation_ids(run.token_source(dspec), path, cfg.seq_len)
            run.cache[key] = ids
        ppl, n = perplexity(model, ids, cfg.seq_len, bs=cfg.bs, device=run.device,
                            max_windows=cfg.num_samples, per_block=cfg.inference_per_block,
                            adapter=run.adapter, desc=f"ppl {dspec.name} @ {position}",
                            progress=run.progress)
        run.log.info("%s %s ppl = %.4f (%d windows of %d)", position, dspec.name, ppl, n,
                     cfg.seq_len)
        out.append({"dataset": dspec.name, "metric": "ppl", "value": ppl,
                    "tokens": n * cfg.seq_len, "seq_len": cfg.seq_len, "windows": n})
    return out
