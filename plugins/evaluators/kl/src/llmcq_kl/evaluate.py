"""Run plumbing of ``eval.type: kl``.

At ``pretrain`` (the float model; the config check makes it part of ``eval_pos``) each
window's next-token log-probs are written, float16, to a memory-mapped file in a temporary
folder (``[windows, seq_len, vocab]``: ``windows × seq_len × vocab × 2`` bytes, 12.6 MB per
window of 128 tokens at SmolLM2's 49,152 vocabulary); at every later position the model's
log-probs for one batch of windows are computed and compared with the stored ones read back
for that batch only. The per-token KLs (one float32 per token) are kept to give the median
and 99th percentile; no position holds more than one batch of logits. The folder is removed
when the run's cache goes (end of run) or at interpreter exit.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from llmcq.errors import DataError
from llmcq.eval.ppl import evaluation_ids

from llmcq_kl.solver import histogram, stored_log_probs, summarize, token_kl, token_top1

if TYPE_CHECKING:
    from llmcq.config.loader import ResolvedEval
    from llmcq.pipeline.context import RunContext
    from torch import nn

__all__ = ["evaluate", "FloatReference", "windows"]


def windows(ids: Any, seq_len: int, max_windows: int) -> torch.Tensor:
    """The first ``max_windows`` non-overlapping windows of ``seq_len`` tokens (``[n, seq]``),
    the same windows ``eval.type: ppl`` scores."""
    t = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    n = min(t.numel() // seq_len, max_windows)
    if n == 0:
        raise DataError(f"evaluation text has {t.numel()} tokens, fewer than one window of "
                        f"seq_len={seq_len}")
    return t[: n * seq_len].view(n, seq_len)


class FloatReference:
    """The float model's stored log-probs for a set of windows, on disk."""

    def __init__(self, n: int, seq_len: int, vocab: int) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="llmcq-kl-"))
        self.shape = (n, seq_len, vocab)
        self.data = np.lib.format.open_memmap(self.dir / "ref.npy", mode="w+",
                                              dtype=np.float16, shape=self.shape)
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.dir), True)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * 2

    def write(self, start: int, stored: torch.Tensor) -> None:
        self.data[start:start + stored.shape[0]] = stored.cpu().numpy()

    def read(self, start: int, stop: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.data[start:stop]))

    def close(self) -> None:
        del self.data
        self._cleanup()


@torch.no_grad()
def compare(model: nn.Module, wins: torch.Tensor, ref: FloatReference | None, *,
            bs: int, device: torch.device, record: bool = False
            ) -> tuple[np.ndarray, np.ndarray, FloatReference]:
    """Per-token KL and top-1 of ``model`` on ``wins`` against ``ref``; with ``record``,
    ``ref`` is created from this model first (the float model at pretrain)."""
    n, seq = wins.shape
    kls: list[np.ndarray] = []
    tops: list[np.ndarray] = []
    home = next(model.parameters()).device
    model.to(device)
    try:
        for i in range(0, n, bs):
            batch = wins[i:i + bs].to(device)
            logits = model(input_ids=batch, use_cache=False).logits
            stored = stored_log_probs(logits)
            del logits
            if record:
                if ref is None:
                    ref = FloatReference(n, seq, stored.shape[-1])
                ref.write(i, stored)
            assert ref is not None
            if stored.shape[-1] != ref.shape[-1]:
                raise DataError(f"kl: the model's vocabulary ({stored.shape[-1]}) differs from "
                                f"the float model's ({ref.shape[-1]})")
            base = ref.read(i, i + batch.shape[0]).to(device)
            kls.append(token_kl(base, stored).reshape(-1).cpu().numpy())
            tops.append(token_top1(base, stored).reshape(-1).cpu().numpy())
            del base, stored
    finally:
        model.to(home)
    assert ref is not None
    return np.concatenate(kls), np.concatenate(tops), ref


def evaluate(run: RunContext, model: nn.Module, resolved_eval: ResolvedEval,
             position: str) -> list[dict[str, Any]]:
    """KL and top-1 of ``model`` against the float model on each dataset of one eval block."""
    cfg = run.config.eval[resolved_eval.index]
    assert cfg.num_samples is not None  # KLSpec.check
    if position != "pretrain" and run.specs.kv is not None:
        run.log.warning("kl: measured without the quantized KV cache (quant.kvcache)")
    out: list[dict[str, Any]] = []
    for dspec, _info, path in resolved_eval.datasets:
        ids = evaluation_ids(run, dspec, path, cfg.seq_len)
        wins = windows(ids, cfg.seq_len, cfg.num_samples)
        ref_key = ("kl_reference", resolved_eval.index, dspec.name, path, cfg.seq_len)
        ref = run.cache.get(ref_key)
        if position == "pretrain":
            if ref is not None:
                ref.close()
            kl, top1, ref = compare(model, wins, None, bs=cfg.bs, device=run.device,
                                    record=True)
            run.cache[ref_key] = ref
            run.log.info("kl: float log-probs of %d windows cached on disk (%.1f MB, %s)",
                         wins.shape[0], ref.nbytes / 1e6, ref.dir)
        else:
            if ref is None:
                raise DataError("kl: no float reference (the pretrain evaluation did not run)")
            kl, top1, _ = compare(model, wins, ref, bs=cfg.bs, device=run.device)
        if not np.isfinite(kl).all():
            raise DataError(f"kl {dspec.name} @ {position}: KL is not finite (NaN/Inf logits)")
        stats = summarize(kl, top1)
        run.log.info("%s %s kl mean %.5f median %.5f p99 %.5f, top-1 %.4f (%d tokens)",
                     position, dspec.name, stats["kl_mean"], stats["kl_median"],
                     stats["kl_p99"], stats["top1"], kl.size)
        common = {"dataset": dspec.name, "tokens": int(kl.size), "seq_len": cfg.seq_len,
                  "windows": int(wins.shape[0])}
        out += [{**common, "metric": k, "value": v} for k, v in stats.items()]
        out.append({**common, "metric": "kl_hist", "value": histogram(kl)})
    return out
