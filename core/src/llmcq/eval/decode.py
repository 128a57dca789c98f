"""llmc's ``eval.type: decode_ppl``: perplexity of token-by-token decoding through the KV cache.

Each of the first ``eval.num_samples`` windows of ``seq_len`` tokens (the GPTQ windows of
:mod:`llmcq.eval.ppl`; llmc decodes whole documents instead) is decoded one token per forward
with a fresh cache: every prediction reads all earlier tokens' keys and values back from the
cache, the quantized cache of ``quant.kvcache`` at the fake-quant position, a float
``DynamicCache`` elsewhere. ``PPL = exp(mean next-token NLL)`` over the ``seq_len - 1``
predictions of every window: with a float cache it is :func:`llmcq.eval.ppl.perplexity`'s
number, the same model decoded instead of run in parallel.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from llmcq.errors import DataError
from llmcq.eval.ppl import _windows, cached_window_losses, evaluation_ids, kv_entry

if TYPE_CHECKING:
    from collections.abc import Callable

    from torch import nn

    from llmcq.config.loader import ResolvedEval
    from llmcq.pipeline.context import RunContext

__all__ = ["decode_perplexity", "evaluate", "DEFAULT_SAMPLES"]

#: windows decoded when ``eval.num_samples`` is absent (llmc decodes one sample by default)
DEFAULT_SAMPLES = 1


@torch.no_grad()
def decode_perplexity(model: nn.Module, ids: list[int] | torch.Tensor, seq_len: int,
                      new_cache: Callable[[], Any], *, num_samples: int = DEFAULT_SAMPLES,
                      bs: int = 1, device: torch.device | str = "cpu", desc: str = "decode_ppl",
                      progress: bool = True) -> tuple[float, int]:
    """``(perplexity, windows)`` of token-by-token decoding through caches from ``new_cache``."""
    from tqdm.auto import tqdm

    windows = _windows(ids, seq_len, num_samples)
    device = torch.device(device)
    home = next(model.parameters()).device
    model.to(device)
    total = 0.0
    try:
        for i in tqdm(range(0, windows.shape[0], bs), desc=desc, disable=not progress,
                      leave=False):
            batch = windows[i:i + bs].to(device)
            total += float(cached_window_losses(model, batch, new_cache, 1).double().sum())
    finally:
        model.to(home)
    ppl = math.exp(total / windows.shape[0])
    if not math.isfinite(ppl):
        raise DataError(f"{desc}: perplexity is not finite (NaN/Inf logits)")
    return ppl, int(windows.shape[0])


def evaluate(run: RunContext, model: nn.Module, resolved_eval: ResolvedEval,
             position: str) -> list[dict[str, Any]]:
    """Decode perplexity of ``model`` on each dataset of one ``eval`` block."""
    from llmcq.quant.kvcache import kv_cache_factory, run_kv_cache

    cfg = run.config.eval[resolved_eval.index]
    kv = run_kv_cache(run, model, position)
    new_cache = kv if kv is not None else kv_cache_factory(model, None)
    out = []
    for dspec, _info, path in resolved_eval.datasets:
        ids = evaluation_ids(run, dspec, path, cfg.seq_len)
        ppl, n = decode_perplexity(model, ids, cfg.seq_len, new_cache,
                                   num_samples=cfg.num_samples or DEFAULT_SAMPLES, bs=cfg.bs,
                                   device=run.device, progress=run.progress,
                                   desc=f"decode_ppl {dspec.name} @ {position}")
        run.log.info("%s %s decode_ppl = %.4f (%d windows of %d decoded token by token)",
                     position, dspec.name, ppl, n, cfg.seq_len)
        out.append({"dataset": dspec.name, "metric": "decode_ppl", "value": ppl,
                    "tokens": n * cfg.seq_len, "seq_len": cfg.seq_len, "windows": n,
                    **kv_entry(run, kv)})
    return out
