"""SpinQuant's driver: everything happens in ``transform_model``, before the block loop.

1. plan, fuse the norms and untie the head exactly as QuaRot (:mod:`llmcq_quarot`), and
   with ``online_rotate`` fold R4's Hadamard into every ``down_proj`` and attach it online;
2. start R1 (hidden x hidden) from QuaRot's Hadamard (or random orthogonal) and one R2
   (head_dim x head_dim) per block from the head_dim Hadamard;
3. train them with Cayley SGD (:func:`~llmcq_spinquant.solver.cayley_step`) on the
   cross-entropy of the whole model on calibration text, every block linear computing with
   its rotated weight fake-quantized on its grid (min-max RTN, straight-through) and, with
   ``quant.act``, its input fake-quantized (after R4's online Hadamard on ``down_proj``);
   the model's own parameters are frozen, only R1 and the R2s get gradients;
4. write the learned R1 and R2s into the weights (QuaRot's in-place maps, float64).

The run's quantizer (RTN, GPTQ, ...) then quantizes the rotated weights block by block,
exactly as after QuaRot.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch
from llmcq import dist
from llmcq.algorithm import Algorithm
from llmcq.errors import PluginError
from llmcq.recon.optim import lr_factor
from llmcq.recon.quant import act_quant_hooks
from llmcq.recon.settings import ActQuant
from llmcq_quarot.algorithm import (
    RotationPlan,
    attach_down_transforms,
    fuse_and_untie,
    orthogonal,
    plan_rotation,
    rotate_residual,
    rotate_value_heads,
    run_device,
    run_seed,
)
from torch import nn

from llmcq_spinquant import solver

__all__ = ["SpinQuant", "RotatedForward", "calibration_samples"]

log = logging.getLogger("llmcq.spinquant")


def calibration_samples(run: Any, n: int | None) -> list[torch.Tensor]:
    """``n`` token-id samples (``None``: ``calib.n_samples``) of ``calib.seq_len`` from the
    run's calibration dataset, preprocessed as the block loop's (``calib.preproc``,
    ``calib.seed``), each ``[1, L]``."""
    cfg = run.config
    if cfg.calib is None or not run.resolved.calib:
        raise PluginError("spinquant trains its rotations on calibration text: the config "
                          "needs a calib section", stage="transform_model")
    dspec = run.resolved.calib[0]
    calib = cfg.calib if n is None else cfg.calib.model_copy(update={"n_samples": int(n)})
    samples = dspec.calibration_ids(run.token_source(dspec), calib)
    return [torch.tensor(s, dtype=torch.long).view(1, -1) for s in samples if len(s) > 1]


class RotatedForward:
    """The model with rotations ``R1`` and per-block ``R2`` applied on the fly: block
    linears through ``torch.func.functional_call`` with rotated, fake-quantized weights;
    the embeddings' output times ``R1`` and the head's input times ``R1^T`` (neither is
    quantized, so this equals rotating their matrices, for ``tokens x hidden^2`` work instead
    of ``vocab x hidden^2``). ``weight_of(full name)`` / ``act_of(full name)``: each
    linear's grids (None: float)."""

    def __init__(self, model: nn.Module, plan: RotationPlan, weight_of: Any, act_of: Any,
                 compute_dtype: torch.dtype) -> None:
        self.model, self.plan, self.dtype = model, plan, compute_dtype
        names = {id(m): n for n, m in model.named_modules()}
        facts = plan.facts
        self.heads, self.kv_heads = facts.heads, facts.kv_heads
        #: per linear: (full name, module, kind, block index); kind reader/writer
        self.linears: list[tuple[str, nn.Module, str, int]] = []
        self.vo: dict[int, tuple[int, int]] = {}  # id(v) -> block, id(o) -> block
        for b, bp in enumerate(plan.blocks):
            for lin in bp["readers"]:
                self.linears.append((names[id(lin)], lin, "reader", b))
            for lin in bp["writers"]:
                self.linears.append((names[id(lin)], lin, "writer", b))
            for v, o in bp["vo"]:
                self.vo[id(v)] = (b, 0)
                self.vo[id(o)] = (b, 1)
        self.weights = {n: weight_of(n) for n, *_ in self.linears}
        acts = {n: act_of(n) for n, *_ in self.linears}
        # training uses dynamic ranges of the same grid (static ranges are fitted later)
        self.acts = {n: (replace(a, static=False) if a is not None and a.static else a)
                     for n, a in acts.items()}

    def params(self, r1: torch.Tensor, r2: list[torch.Tensor | None]) -> dict[str, Any]:
        """``{parameter name: rotated (fake-quantized) tensor}`` for every block linear."""
        out: dict[str, Any] = {}
        for name, lin, kind, _block in self.linears:
            w = lin.weight.to(self.dtype)
            bias = None if lin.bias is None else lin.bias.to(self.dtype)
            if kind == "reader":
                w = solver.reader(w, r1)
            else:
                w = solver.writer(w, r1)
                bias = None if bias is None else solver.writer(bias, r1)
            where = self.vo.get(id(lin))
            if where is not None and r2[where[0]] is not None:
                r = r2[where[0]]
                if where[1] == 0:
                    w = solver.value_rows(w, r, self.kv_heads)
                    bias = None if bias is None else solver.value_rows(bias, r, self.kv_heads)
                else:
                    w = solver.output_columns(w, r, self.heads)
            spec = self.weights[name]
            if spec is not None:
                w = solver.weight_fake_quant(w, spec)
            out[f"{name}.weight"] = w.to(lin.weight.dtype)
            if bias is not None:
                out[f"{name}.bias"] = bias.to(lin.bias.dtype)
        return out

    @contextmanager
    def hooks(self, r1: torch.Tensor) -> Iterator[None]:
        """R1 on the embeddings' output and ``R1^T`` on the head's input; activation fake
        quantization (straight-through) on the block linears' inputs, registered after R4's
        online Hadamard so it sees the transformed input."""
        handles = []

        def emb_out(_m: nn.Module, _a: Any, y: torch.Tensor) -> torch.Tensor:
            return (y.to(self.dtype) @ r1).to(y.dtype)

        def head_in(_m: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            x = args[0]
            return ((x.to(self.dtype) @ r1.T).to(x.dtype), *args[1:])

        for e in self.plan.embeddings:
            handles.append(e.register_forward_hook(emb_out))
        handles.append(self.plan.head.register_forward_pre_hook(head_in))
        linears = {n: lin for n, lin, *_ in self.linears}
        try:
            with act_quant_hooks(ActQuant(self.acts, ste=True), linears):
                yield
        finally:
            for h in handles:
                h.remove()

    def loss(self, params: dict[str, Any], ids: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy of the batch ``ids`` ``[b, L]`` (float32)."""
        out = torch.func.functional_call(self.model, params, args=(),
                                         kwargs={"input_ids": ids, "use_cache": False})
        logits = out.logits if hasattr(out, "logits") else out[0]
        return nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


class SpinQuant(Algorithm):
    """Learned rotations before the block loop; quantizes nothing itself."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.facts: dict[str, Any] = {}

    def _weight_of(self, name: str) -> Any:
        specs = self.specs
        return specs.weight_for(name) if hasattr(specs, "weight_for") else self.weight

    def _act_of(self, name: str) -> Any:
        specs = self.specs
        return specs.act_for(name) if hasattr(specs, "act_for") else self.act

    def transform_model(self, model: nn.Module) -> None:
        sp = self.special
        seed = run_seed(self.run)
        device = run_device(self.run)
        plan = plan_rotation(model, self.run.adapter, who="spinquant")
        facts = plan.facts
        with torch.no_grad():
            untied = fuse_and_untie(model, plan, device, who="spinquant")
            r4 = attach_down_transforms(plan, seed, sp.fp32_had, device) \
                if sp.online_rotate else {}
        q, r1_desc = orthogonal(facts.hidden_size, sp.rotate_mode, seed, "hidden size")
        has_vo = [bool(bp["vo"]) for bp in plan.blocks]
        r2_desc = None
        r2: list[torch.Tensor | None] = [None] * len(plan.blocks)
        if any(has_vo):
            r, r2_desc = orthogonal(facts.head_dim, "hadamard", seed + 1, "head_dim")
            r2 = [r.clone() if v else None for v in has_vo]
        skipped = [bp["where"] for bp in plan.blocks if not bp["vo"]]
        if skipped:
            log.info("spinquant: R2 skipped in %s (no separate v_proj / o_proj)",
                     ", ".join(skipped))
        train: dict[str, Any] = {"steps": 0}
        if sp.steps > 0:
            with torch.enable_grad():  # the block loop runs under no_grad
                q, r2, train = self._train(model, plan, q, r2, seed, device)
        with torch.no_grad():
            rotate_residual(plan, q.to(device))
            if any(has_vo):
                rotate_value_heads(plan, [r.to(device) if r is not None else
                                          torch.eye(facts.head_dim, dtype=torch.float64,
                                                    device=device) for r in r2])
        errs = [solver.orthogonality_error(q)] + [solver.orthogonality_error(r)
                                                  for r in r2 if r is not None]
        self.facts = {
            "r1_init": r1_desc, "r2_init": r2_desc, "r2_per_block": sum(has_vo),
            "norms_fused": sum(len(bp["norms"]) for bp in plan.blocks)
            + (plan.final is not None), "untied_embeddings": untied, "online": r4,
            "rotate_mode": sp.rotate_mode, "orthogonality_error": max(errs), **train,
        }
        log.info("spinquant: R1 from %s and %d R2 from %s learned in %d Cayley SGD steps; "
                 "R4 %s; max |R^T R - I| = %.2e", r1_desc, sum(has_vo), r2_desc,
                 train["steps"], ", ".join(r4) or "off", max(errs))
        self.r1, self.r2 = q, r2  # float64, for inspection

    # ------------------------------------------------------------------ training

    def _train_weights(self) -> str:
        """``rtn`` or ``none``: ``train_weight_quant``, with ``auto`` resolved against the
        run's quantizer (GPTQ with quantized activations: none)."""
        mode = self.special.train_weight_quant
        if mode != "auto":
            return mode
        quantizer = getattr(self.run, "quantizer", None)
        gptq = quantizer is not None and quantizer.spec.name == "gptq"
        return "none" if gptq and self.act is not None else "rtn"

    def _train(self, model: nn.Module, plan: RotationPlan, q: torch.Tensor,
               r2: list[torch.Tensor | None], seed: int, device: torch.device
               ) -> tuple[torch.Tensor, list[torch.Tensor | None], dict[str, Any]]:
        sp = self.special
        samples = calibration_samples(self.run, sp.nsamples)
        if not samples:
            raise PluginError("spinquant: no calibration sample of 2 tokens or more",
                              stage="transform_model")
        start = time.perf_counter()
        home = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        compute = torch.promote_types(dtype, torch.float32)
        frozen = {p: p.requires_grad for p in model.parameters()}
        was_training = model.training
        wq = self._train_weights()
        fwd = RotatedForward(model, plan, self._weight_of if wq == "rtn" else lambda _n: None,
                             self._act_of, compute)
        order = torch.Generator().manual_seed(seed)
        perm: list[int] = []
        r1 = q.to(device, torch.float64)
        rs = [None if r is None else r.to(device, torch.float64) for r in r2]
        bufs: list[torch.Tensor | None] = [None] * (1 + len(rs))
        losses: list[float] = []
        alphas: list[float] = []
        try:
            for p in model.parameters():
                p.requires_grad_(False)
            model.eval()
            if home != device:
                model.to(device)
            for t in range(sp.steps):
                idx = []
                for _ in range(sp.batch_size):  # a shuffled pass over the samples, repeated
                    if not perm:
                        perm = torch.randperm(len(samples), generator=order).tolist()
                    idx.append(perm.pop())
                mine = idx[dist.rank()::dist.world_size()] if dist.active() else idx
                leaves = [r1.detach().to(compute).clone().requires_grad_()] + [
                    None if r is None else r.detach().to(compute).clone().requires_grad_()
                    for r in rs]
                params = fwd.params(leaves[0], leaves[1:])
                total = torch.zeros((), dtype=torch.float64, device=device)
                with fwd.hooks(leaves[0]):
                    for k in range(0, len(mine), sp.micro_batch):
                        chunk = [samples[i] for i in mine[k:k + sp.micro_batch]]
                        for ids in _same_length(chunk):
                            ids = ids.to(device)
                            loss = fwd.loss(params, ids) * (ids.shape[0] / len(idx))
                            loss.backward(retain_graph=True)
                            total += loss.detach().double()
                del params
                learn = [x for x in leaves if x is not None]
                grads = [torch.zeros_like(x) if x.grad is None else x.grad for x in learn]
                if dist.active():  # every rank's share of the step's samples
                    for g in grads:
                        dist.all_reduce_sum(g)
                    dist.all_reduce_sum(total)
                if not math.isfinite(float(total)) or not all(
                        bool(torch.isfinite(g).all()) for g in grads):
                    raise PluginError(f"spinquant: non-finite loss or gradient at step {t}",
                                      stage="transform_model")
                lr = sp.lr * lr_factor(sp.lr_schedule, t, sp.steps)
                gi = iter(grads)
                r1, bufs[0], a = solver.cayley_step(r1, next(gi), lr, momentum=sp.momentum,
                                                    buf=bufs[0])
                alphas.append(a)
                for j, r in enumerate(rs):
                    if r is not None:
                        rs[j], bufs[j + 1], _ = solver.cayley_step(
                            r, next(gi), lr, momentum=sp.momentum, buf=bufs[j + 1])
                losses.append(float(total))
                if t == 0 or (t + 1) % 10 == 0 or t + 1 == sp.steps:
                    log.info("spinquant: step %d/%d quantized loss %.4f (R1 step %.3g)",
                             t + 1, sp.steps, losses[-1], a)
        finally:
            if home != device:
                model.to(home)
            for p, flag in frozen.items():
                p.requires_grad_(flag)
            model.train(was_training)
        train = {"steps": sp.steps, "train_weights": wq, "samples": len(samples),
                 "batch_size": sp.batch_size,
                 "seq_len": int(samples[0].shape[1]), "loss_first": losses[0],
                 "loss_last": losses[-1], "r1_step_last": alphas[-1],
                 "seconds": round(time.perf_counter() - start, 2)}
        return r1.cpu(), [None if r is None else r.cpu() for r in rs], train

    def summary(self) -> dict[str, Any]:
        return dict(self.facts)


def _same_length(chunk: list[torch.Tensor]) -> list[torch.Tensor]:
    """Samples ``[1, L]`` stacked into batches of equal length."""
    by_len: dict[int, list[torch.Tensor]] = {}
    for s in chunk:
        by_len.setdefault(int(s.shape[1]), []).append(s)
    return [torch.cat(v, dim=0) for v in by_len.values()]
