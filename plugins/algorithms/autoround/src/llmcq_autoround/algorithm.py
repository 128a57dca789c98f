"""AutoRound's driver: per block, learn rounding offsets and min/max factors by signed
gradient descent so the fake-quantized block reproduces the float block, then write the
learned rounding into the records.

Per block (all in ``quantize``; the float weights are never changed):

1. targets from core's block-reconstruction harness (:mod:`llmcq.recon`): the float block's
   outputs; under ``quant_out`` (auto-round's ``enable_quanted_input``) the float chain's,
   while the inputs are the quantized chain's (:class:`llmcq.recon.FloatChain`);
2. ``iters`` steps of signed gradient descent (``optimizer="signsgd"``,
   ``lr_schedule="linear"``), each on ``batch_size`` samples drawn at random (seeded by
   ``seed``) from the calibration set, on ``MSE(block_q(X), target)`` where ``block_q`` runs
   with :func:`llmcq_autoround.solver.fake_quant` weights; after each step the offsets are
   clamped to [-0.5, 0.5] and the factors to [0, 1]; unless ``not_use_best_mse``, the
   tensors of the step with the lowest loss are kept (``keep_best``);
3. one record per linear from the same grid and codes (:func:`solver.quantize`).

Data-parallel (``torchrun``): every step averages the gradients over the ranks (the harness),
so every rank takes the same step and ends with the same records. Each rank draws
``batch_size / world`` samples of its own share per step, so a step still sees
``batch_size`` samples; a ``batch_size`` the world size does not divide is refused. The draw
differs from one process's (stratified over the ranks' shares instead of over all samples).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from llmcq import dist, recon
from llmcq.algorithm import Algorithm
from llmcq.errors import ConfigError, DataError
from llmcq.pipeline.blockwise import Block, BlockInputs
from llmcq.quant.record import QuantizedLinear, make_record
from llmcq_autoround import AutoRoundSpecial, solver

__all__ = ["AutoRound", "Learnables", "init_learnables", "rank_batch_size"]

log = logging.getLogger("llmcq.autoround")
#: the training loss is averaged (and checked for NaN/Inf) over this many windows per block
LOG_WINDOWS = 10

#: per linear: offsets ``[out, in]``, min factors and max factors ``[out, G]`` (None when
#: minmax tuning is off)
Learnables = dict[str, tuple[nn.Parameter, nn.Parameter | None, nn.Parameter | None]]


def init_learnables(linears: dict[str, nn.Module], spec: Any, *, minmax: bool) -> Learnables:
    """Offsets 0 and factors 1 (round-to-nearest), float32, on each linear's device."""
    out: Learnables = {}
    for name, lin in linears.items():
        w = lin.weight
        v = nn.Parameter(torch.zeros(w.shape, dtype=torch.float32, device=w.device))
        fmin = fmax = None
        if minmax:
            shape = solver.factor_shape(int(w.shape[0]), int(w.shape[1]), spec)
            fmin = nn.Parameter(torch.ones(shape, dtype=torch.float32, device=w.device))
            fmax = nn.Parameter(torch.ones(shape, dtype=torch.float32, device=w.device))
        out[name] = (v, fmin, fmax)
    return out


def rank_batch_size(total: int, world: int) -> int:
    """Samples each rank draws per step so a step sees ``total`` (refused unless divisible)."""
    if total % world:
        raise ConfigError("quant.special.batch_size", total, allowed=f"a multiple of {world}",
                          reason=f"under torchrun with {world} ranks each rank draws "
                          f"batch_size / {world} samples of its share per step (times "
                          "gradient_accumulate_steps)")
    return total // world


class AutoRound(Algorithm):
    """AutoRound / SignRound (Cheng et al., 2023, arXiv:2309.05516), auto-round's defaults.

    ```yaml
    quant:
        method: AutoRound
        weight: {bit: 3, symmetric: False, granularity: per_group, group_size: 64}
        special: {iters: 200, batch_size: 8, enable_minmax_tuning: True}
        quant_out: True     # auto-round's enable_quanted_input
    ```
    """

    #: targets are the float block's, also after an earlier step clipped in place
    float_targets = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        sp = self.special
        assert isinstance(sp, AutoRoundSpecial)
        self.sp: AutoRoundSpecial = sp
        self._lr, self._minmax_lr = sp.rates(self.weight.bits)
        self._quant_out = bool(self.specs.quant_out)
        self._chain = recon.FloatChain()
        self._batch: int | None = None
        self._amp = False
        self._losses: list[dict[str, Any]] = []
        self._nonfinite: list[int] = []

    # ------------------------------------------------------------------ stages

    def calibrate(self, block: Block, inputs: BlockInputs | None) -> None:
        """Only checks, before the first block trains: AutoRound's result is its records."""
        if block.index == 0 and self.run.quantizer is not self.step:
            raise ConfigError(self.step_path(), "autoround", reason="AutoRound's result is "
                              "its learned rounding, written into the records: it must be "
                              "the recipe's last quantizing step")
        if self._batch is None:
            world = dist.world_size() if dist.active() else 1
            self._batch = rank_batch_size(self.sp.batch_size * self.sp.gradient_accumulate_steps,
                                          world)

    def quantize(self, block: Block, inputs: BlockInputs | None) -> dict[str, QuantizedLinear]:
        # each linear on its own grid; linears kept in float learn nothing and get no record
        linears = self.quantized_linears(block)
        grids = {n: self.weight_of(block, n) for n in linears}
        learn: Learnables = {}
        if self.sp.iters > 0:
            if inputs is None:
                raise DataError("AutoRound needs calibration inputs with iters > 0 (add a calib "
                                "section, or set iters: 0 for round-to-nearest)")
            for name, lin in linears.items():
                learn.update(init_learnables({name: lin}, grids[name],
                                             minmax=self.sp.enable_minmax_tuning))
            targets = self._chain.targets(block, inputs, quant_out=self._quant_out,
                                          aug_loss=False)
            with torch.enable_grad():
                self._train(block, inputs, learn, targets, grids)
            del targets
        out = {}
        for name, lin in linears.items():
            v, fmin, fmax = learn.get(name, (None, None, None))
            q, qp = solver.quantize(lin.weight.data, grids[name], v, fmin, fmax)
            out[name] = make_record(q, qp, grids[name], bias=lin.bias)
        return out

    def summary(self) -> dict[str, Any]:
        return {
            "iters": self.sp.iters, "lr": self._lr, "minmax_lr": self._minmax_lr,
            "batch_size": self.sp.batch_size * self.sp.gradient_accumulate_steps,
            "enable_minmax_tuning": self.sp.enable_minmax_tuning,
            "keep_best": not self.sp.not_use_best_mse,
            "train_dtype": "bfloat16 autocast" if self._amp else "float32",
            # per block: mean loss of the first and last tenth of the steps; with keep_best
            # the lowest step loss and its step (whose starting tensors were kept)
            "block_loss": self._losses,
            "nonfinite_loss_blocks": self._nonfinite,
        }

    # ------------------------------------------------------------------ pieces

    def step_path(self) -> str:
        methods = self.run.config.quant.methods if self.run.config.quant else ["autoround"]
        return "quant.method" + (f"[{self.step.index}]" if len(methods) > 1 else "")

    def _train(self, block: Block, inputs: BlockInputs, learn: Learnables,
               targets: recon.Targets, grids: dict[str, Any]) -> None:
        """Signed gradient descent on core's harness; the block runs with the fake-quantized
        weights of :func:`solver.fake_quant` (straight-through rounding), each linear on its
        grid in ``grids``. The learning rates are the global grid's (auto-round sets them
        once per model, its per-layer configs included)."""
        offsets = [v for v, _, _ in learn.values()]
        factors = [f for _, lo, hi in learn.values() for f in (lo, hi) if f is not None]

        def params(base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            eff = dict(base)
            for name, (v, fmin, fmax) in learn.items():
                key = f"{name}.weight"
                eff[key] = solver.fake_quant(base[key], grids[name], v, fmin, fmax)
            return eff

        assert self._batch is not None
        keep_best = not self.sp.not_use_best_mse
        result = recon.reconstruct(
            block, inputs, targets,
            [recon.ParamGroup(offsets, lr=self._lr, name="v"),
             recon.ParamGroup(factors, lr=self._minmax_lr, name="minmax")],
            settings=recon.ReconSettings(iterations=self.sp.iters, batch_size=self._batch,
                                         amp=self.sp.amp, optimizer="signsgd",
                                         lr_schedule="linear", keep_best=keep_best,
                                         sampler="cycle",
                                         seed=self.sp.seed,
                                         log_every=max(1, self.sp.iters // LOG_WINDOWS)),
            params=params, loss=recon.TargetLoss(recon.mse),
            after_step=lambda: solver.clamp_(offsets, factors),
            progress=self.run.progress and dist.is_main(), desc=f"autoround {block.name}")
        self._amp = result.amp
        if result.rolled_back:
            self._nonfinite.append(block.index)
        row: dict[str, Any] = {"block": block.index,
                               "window_loss": [_g(result.first), _g(result.last)]}
        if keep_best and result.best_loss is not None:
            row.update(best=_g(result.best_loss), best_step=result.best_step)
        self._losses.append(row)
        log.info("%s: AutoRound loss %s", block.name, row)


def _g(x: float) -> float:
    return float(f"{x:.4g}")
