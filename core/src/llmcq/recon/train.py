"""The training loop of :func:`reconstruct` (plumbing; the maths is the caller's
``params`` callback and loss)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch.func import functional_call

from llmcq import dist
from llmcq.pipeline.blockwise import Block, BlockInputs, block_output
from llmcq.recon.dp import average_gradients, steps_per_epoch
from llmcq.recon.losses import TargetLoss
from llmcq.recon.optim import SignSGD, lr_factor
from llmcq.recon.quant import act_quant_hooks
from llmcq.recon.settings import (ActQuant, Batch, BatchLoss, ParamGroup, ParamsFn,
                                  ReconResult, ReconSettings)
from llmcq.recon.targets import Targets

__all__ = ["reconstruct", "float_kwargs"]

log = logging.getLogger("llmcq.recon")


def float_kwargs(v: Any, dtype: torch.dtype = torch.float32) -> Any:
    """The block's keyword inputs with floating tensors cast to ``dtype`` (masks, rotary
    embeddings), everything else as it is."""
    if isinstance(v, torch.Tensor):
        return v.to(dtype) if v.is_floating_point() else v
    if isinstance(v, tuple):
        return tuple(float_kwargs(x, dtype) for x in v)
    if isinstance(v, list):
        return [float_kwargs(x, dtype) for x in v]
    if isinstance(v, dict):
        return {k: float_kwargs(x, dtype) for k, x in v.items()}
    return v


def _optimizer(groups: list[dict[str, Any]], s: ReconSettings) -> torch.optim.Optimizer:
    if callable(s.optimizer):
        return s.optimizer(groups)
    if s.optimizer == "signsgd":
        return SignSGD(groups)
    cls = torch.optim.AdamW if s.optimizer == "adamw" else torch.optim.Adam
    return cls(groups, weight_decay=s.weight_decay)


def _finite(x: float) -> bool:
    return not (math.isnan(x) or math.isinf(x))


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def _batch_free(v: Any) -> bool:
    """Every tensor of ``v`` has a leading dimension of 1 (or none): it broadcasts over
    any number of samples."""
    if isinstance(v, torch.Tensor):
        return v.dim() == 0 or v.shape[0] == 1
    if isinstance(v, (tuple, list)):
        return all(_batch_free(x) for x in v)
    if isinstance(v, dict):
        return all(_batch_free(x) for x in v.values())
    return True


class _Pool:
    """Every sample of this rank, for sampled iterations: a batch gathers its rows from the
    calibration batches in place. No concatenated copy is made: the inputs stay the
    engine's and the targets become the float chain's next inputs, so a copy would hold
    both twice (4 GiB more at 128 x 2048 tokens of a 7B model)."""

    def __init__(self, inputs: BlockInputs, targets: Targets, kwargs: list[dict[str, Any]]
                 ) -> None:
        if any(not _same(kw, kwargs[0]) for kw in kwargs[1:]) or not _batch_free(kwargs[0]):
            raise ValueError("sampled iterations mix samples of different calibration "
                             "batches: the block's keyword inputs must be the same for every "
                             "batch, without a batch dimension (use calib.bs: 1, or epochs)")
        self.hidden = list(inputs.hidden)
        self.target = list(targets.target)
        self.aug = None if targets.aug is None else list(targets.aug)
        self.float_hidden = (None if targets.float_hidden is None
                             else list(targets.float_hidden))
        shapes = {tuple(t.shape[1:]) for t in self.hidden}
        if len(shapes) > 1:
            raise ValueError("sampled iterations need calibration batches of one sequence "
                             f"length: got sample shapes {sorted(shapes)}")
        #: (batch, row) of every sample, in the order the batches hold them
        self.where = [(b, r) for b, t in enumerate(self.hidden) for r in range(t.shape[0])]
        self.kwargs = kwargs[0]

    def __len__(self) -> int:
        return len(self.where)

    def _gather(self, parts: list[torch.Tensor] | None, idx: list[int]
                ) -> torch.Tensor | None:
        if parts is None:
            return None
        return torch.stack([parts[b][r] for b, r in (self.where[i] for i in idx)])

    def batch(self, idx: torch.Tensor) -> Batch:
        pick = idx.tolist()
        hidden, target = self._gather(self.hidden, pick), self._gather(self.target, pick)
        assert hidden is not None and target is not None
        return Batch(hidden, self.kwargs, target, self._gather(self.aug, pick),
                     self._gather(self.float_hidden, pick), idx)


def _sampler(n: int, s: ReconSettings) -> Callable[[], torch.Tensor]:
    """The sample indices of each sampled iteration (seeded by ``s.seed``)."""
    gen = torch.Generator().manual_seed(s.seed)
    if s.sampler == "random":
        return lambda: torch.randperm(n, generator=gen)[: s.batch_size]
    state = {"order": torch.randperm(n, generator=gen), "at": 0}

    def cycle() -> torch.Tensor:
        if state["at"] + s.batch_size > n:  # too few left: reshuffle (AutoRound)
            state["order"], state["at"] = torch.randperm(n, generator=gen), 0
        at = int(state["at"])
        state["at"] = at + s.batch_size
        return state["order"][at:at + s.batch_size]

    return cycle


def reconstruct(block: Block, inputs: BlockInputs, targets: Targets,
                groups: Sequence[ParamGroup], *, settings: ReconSettings,
                params: ParamsFn | None = None, loss: BatchLoss | None = None,
                act: ActQuant | None = None, before_step: Callable[[], None] | None = None,
                after_step: Callable[[], None] | None = None, progress: bool = False,
                desc: str = "") -> ReconResult:
    """Train ``groups``' tensors so ``block`` (run with ``params(base)``) reproduces
    ``targets`` on ``inputs``; see :mod:`llmcq.recon`. The block's own parameters are never
    changed (they are frozen while training and their ``requires_grad`` restored after);
    the learnable tensors are left with ``requires_grad=False``."""
    s = settings
    module = block.module
    first_param = next(module.parameters(), None)
    dev = first_param.device if first_param is not None else torch.device("cpu")
    amp = s.amp and dev.type == "cuda"
    result = ReconResult(amp=amp)
    opt_groups = []
    for g in groups:
        if not g.params:
            continue
        d: dict[str, Any] = {"params": list(g.params), "lr": g.lr}
        if g.weight_decay is not None:
            d["weight_decay"] = g.weight_decay
        opt_groups.append(d)
    learnable = [p for d in opt_groups for p in d["params"]]
    if not s.trains or not learnable:
        return result
    if len(targets.target) != len(inputs):
        raise ValueError(f"{len(targets.target)} targets for {len(inputs)} calibration batches")
    loss_fn = loss if loss is not None else TargetLoss()
    cast = (torch.autocast(device_type="cuda", dtype=torch.bfloat16) if amp else nullcontext())
    for p in learnable:
        p.requires_grad_(True)
    optimizer = _optimizer(opt_groups, s)
    base = {n: p.detach().float() for n, p in module.named_parameters()}
    kwargs = [float_kwargs(kw, torch.float32) for kw in inputs.kwargs]
    flags = {p: p.requires_grad for p in module.parameters()}
    for p in flags:
        p.requires_grad_(False)
    parallel = dist.active()
    base_lr = [g["lr"] for g in optimizer.param_groups]
    total_steps = (s.epochs * steps_per_epoch(len(inputs), device=dev) if s.epochs
                   else s.iterations)
    best: list[torch.Tensor] | None = None

    def track_best(value: torch.Tensor | None) -> None:
        """Keep the tensors that produced the lowest step loss so far (before the update)."""
        nonlocal best
        if parallel:  # the step's loss over every rank's batch, the same on every rank
            both = torch.stack([torch.zeros((), dtype=torch.float64, device=dev)
                                if value is None else value.double(),
                                torch.tensor(0.0 if value is None else 1.0,
                                             dtype=torch.float64, device=dev)])
            dist.all_reduce_sum(both)
            if float(both[1]) == 0:
                return
            loss = float(both[0]) / float(both[1])
        elif value is None:
            return
        else:
            loss = float(value)
        if _finite(loss) and (result.best_loss is None or loss < result.best_loss):
            result.best_loss, result.best_step = loss, result.steps
            best = [p.detach().clone() for p in learnable]

    def step(batch: Batch | None) -> torch.Tensor | None:
        """One optimizer step on ``batch`` (None: this rank only joins the reduction)."""
        if before_step is not None:
            with torch.no_grad():
                before_step()
        value = None
        if batch is not None:
            with cast:
                eff = params(base) if params is not None else dict(base)
                out = block_output(functional_call(module, eff, (batch.hidden.float(),),
                                                   batch.kwargs)).float()
                value = loss_fn(out, batch)
            optimizer.zero_grad(set_to_none=True)
            value.backward()
        else:
            optimizer.zero_grad(set_to_none=True)
        if parallel:
            average_gradients(learnable, contributed=batch is not None)
        if s.keep_best:
            track_best(None if value is None else value.detach())
        if s.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(learnable, s.max_grad_norm)
        optimizer.step()
        if s.lr_schedule != "constant":  # the rate of the next step
            f = lr_factor(s.lr_schedule, result.steps + 1, total_steps)
            for g, lr in zip(optimizer.param_groups, base_lr, strict=True):
                g["lr"] = lr * f
        if after_step is not None:
            with torch.no_grad():
                after_step()
        result.steps += 1
        return None if value is None else value.detach()

    def windows() -> Iterator[Iterator[Batch | None]]:
        """One iterator of batches per logged window (epoch, or log_every iterations)."""
        if s.epochs:
            n = len(inputs)
            steps = steps_per_epoch(n, device=dev)

            def epoch() -> Iterator[Batch | None]:
                for i in range(steps):
                    if i >= n:
                        yield None
                        continue
                    yield Batch(inputs.hidden[i], kwargs[i], targets.target[i],
                                None if targets.aug is None else targets.aug[i],
                                None if targets.float_hidden is None
                                else targets.float_hidden[i], i)

            for _ in range(s.epochs):
                yield epoch()
            return
        pool = _Pool(inputs, targets, kwargs)
        draw = _sampler(len(pool), s)
        every = s.log_every or s.iterations
        done = 0
        while done < s.iterations:
            count = min(every, s.iterations - done)
            done += count

            def chunk(count: int = count) -> Iterator[Batch]:
                for _ in range(count):
                    yield pool.batch(draw())

            yield chunk()

    from tqdm.auto import tqdm

    total_windows = s.epochs or -(-s.iterations // (s.log_every or s.iterations))
    snapshot = [p.detach().clone() for p in learnable]
    try:
        with act_quant_hooks(act, block.linears()):
            for w, batches in enumerate(tqdm(windows(), total=total_windows, desc=desc,
                                             leave=False, disable=not progress)):
                total = torch.zeros((), device=dev)
                count = 0
                for batch in batches:
                    value = step(batch)
                    if value is not None:
                        total += value
                        count += 1
                if parallel:  # the mean over every rank's batches, the same on every rank
                    both = torch.stack([total.double(), torch.tensor(float(count),
                                                                     dtype=torch.float64,
                                                                     device=dev)])
                    dist.all_reduce_sum(both)
                    mean = float(both[0]) / max(float(both[1]), 1.0)
                else:
                    mean = float(total) / max(count, 1)  # one host sync per window
                result.losses.append(mean)
                if not _finite(mean) and s.rollback_nonfinite:
                    with torch.no_grad():
                        for p, saved in zip(learnable, snapshot, strict=True):
                            p.copy_(saved)
                    result.rolled_back = True
                    log.warning("%s: non-finite reconstruction loss in %s %d; keeping the "
                                "tensors of the %s before", desc or block.name,
                                "epoch" if s.epochs else "window", w,
                                "epoch" if s.epochs else "window")
                    break
                snapshot = [p.detach().clone() for p in learnable]
        if best is not None:
            with torch.no_grad():
                for p, saved in zip(learnable, best, strict=True):
                    p.copy_(saved)
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        for p in learnable:
            p.requires_grad_(False)
            p.grad = None
        del optimizer, base, kwargs
    return result
