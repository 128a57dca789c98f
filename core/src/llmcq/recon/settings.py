"""The harness's typed inputs and outputs: what to train, how long, and what happened."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

    from llmcq.quant.spec import ActQuantSpec

__all__ = ["ReconSettings", "ParamGroup", "ActQuant", "Batch", "ReconResult", "ParamsFn",
           "BatchLoss", "OPTIMIZERS", "LR_SCHEDULES", "SAMPLERS"]

#: optimizers the settings can name (anything else: pass a factory); ``signsgd`` is signed
#: gradient descent, ``p <- p - lr * sign(grad)`` (AutoRound / SignRound)
OPTIMIZERS = ("adamw", "adam", "signsgd")
#: learning-rate schedules over the steps of one :func:`~llmcq.recon.reconstruct` call
LR_SCHEDULES = ("constant", "cosine", "linear")
#: how sampled iterations draw their samples
SAMPLERS = ("random", "cycle")

#: maps the block's float parameters (name -> tensor) to the parameters the training forward
#: uses (e.g. ``Q(LET(W))``: fake-quantized, differentiable in the learnable tensors)
ParamsFn = Callable[[dict[str, "torch.Tensor"]], dict[str, "torch.Tensor"]]


@dataclass(frozen=True)
class ReconSettings:
    """How one block is trained.

    Schedule: ``epochs`` passes over the calibration batches in order, one optimizer step
    per batch (OmniQuant); or ``iterations`` steps, each on ``batch_size`` samples drawn at
    random (seeded by ``seed``) from all of this rank's samples (TesseraQ, AutoRound). Both
    0: nothing is trained.

    ``amp``: bfloat16 autocast on CUDA (llmc's ``deactive_amp: False``); float32 on the CPU
    whatever it says. ``optimizer``: ``"adamw"`` or ``"adam"`` with ``weight_decay`` as the
    default of every :class:`ParamGroup`, or a factory ``f(param_groups) -> Optimizer``.
    ``max_grad_norm``: clip the (rank-averaged) gradient norm before each step.
    ``lr_schedule``: every group's learning rate over the ``T`` steps of one call
    (``t`` = steps taken): ``constant``; ``cosine``, ``lr (1 + cos(pi t / T)) / 2`` (torch's
    ``CosineAnnealingLR`` with ``eta_min`` 0: TesseraQ, per hardening stage); ``linear``,
    ``lr (1 - t / T)`` (AutoRound).
    ``sampler`` (sampled iterations): ``random``, each step ``batch_size`` samples drawn
    afresh (TesseraQ, llmc's ``randperm(n)[:bs]``); ``cycle``, walk a shuffled order of all
    samples and reshuffle when fewer than ``batch_size`` are left (AutoRound's index sampler:
    every sample is seen equally often, which matters on small calibration sets).
    ``keep_best``: track every step's loss (the mean over the ranks' batches under
    ``torchrun``) and end with the learnable tensors that produced the lowest one (as they
    were before that step's update; AutoRound keeps its best iteration this way).
    ``log_every``: in iterations mode, the mean loss is logged (and checked for NaN/Inf)
    every ``log_every`` iterations (default: once, at the end); in epochs mode every epoch.
    ``rollback_nonfinite``: a non-finite logged loss restores the learnable tensors to the
    last logged point and stops training the block.
    """

    epochs: int = 0
    iterations: int = 0
    batch_size: int = 1
    amp: bool = False
    optimizer: str | Callable[[list[dict[str, Any]]], torch.optim.Optimizer] = "adamw"
    weight_decay: float = 0.0
    lr_schedule: str = "constant"
    sampler: str = "random"
    keep_best: bool = False
    max_grad_norm: float | None = None
    seed: int = 0
    log_every: int | None = None
    rollback_nonfinite: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.iterations < 0:
            raise ValueError("epochs and iterations are counts (>= 0)")
        if self.epochs and self.iterations:
            raise ValueError("give epochs (passes over the batches) or iterations (sampled "
                             "steps), not both")
        if self.batch_size < 1:
            raise ValueError("batch_size is at least 1")
        if isinstance(self.optimizer, str) and self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer {self.optimizer!r}; allowed: {', '.join(OPTIMIZERS)} "
                             "or a factory")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule {self.lr_schedule!r}; allowed: "
                             f"{', '.join(LR_SCHEDULES)}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler {self.sampler!r}; allowed: {', '.join(SAMPLERS)}")
        if self.log_every is not None and self.log_every < 1:
            raise ValueError("log_every is at least 1")

    @property
    def trains(self) -> bool:
        return self.epochs > 0 or self.iterations > 0


@dataclass
class ParamGroup:
    """Learnable tensors sharing a learning rate (an optimizer param group). ``weight_decay``
    None: the settings' default. ``name`` only labels the group in logs."""

    params: Sequence[torch.Tensor]
    lr: float
    weight_decay: float | None = None
    name: str = ""


@dataclass
class ActQuant:
    """Activation fake quantization while training: each linear's input is quantized
    (dynamically, per token or group of ``spec``) with straight-through rounding when
    ``ste``. ``spec`` may map linear names to their own specs (per-linear settings,
    ``Algorithm.acts_of(block)``; a linear mapped to None or absent is left alone).
    ``linears``: which modules (default: every linear of the block). ``fn``: a
    replacement quantizer ``fn(x) -> x_hat`` (e.g. with learnable ranges)."""

    spec: ActQuantSpec | Mapping[str, ActQuantSpec | None] | None
    ste: bool = True
    linears: Mapping[str, nn.Module] | None = None
    fn: Callable[[torch.Tensor], torch.Tensor] | None = None


@dataclass
class Batch:
    """What a loss sees for one training step besides the block's output.

    ``hidden``: the block's input (the quantized chain's under ``quant_out``), float32;
    ``kwargs``: the block's keyword inputs; ``target``: the float block's output (the float
    chain's under ``quant_out``); ``aug``: the float block's output on ``hidden``
    (``aug_loss``), or None; ``float_hidden``: the float chain's input to this block when the
    targets were built with ``keep_inputs=True`` (losses that rerun float internals, such as
    attention maps), else None; ``index``: the batch index (epochs) or the sample indices
    (iterations)."""

    hidden: torch.Tensor
    kwargs: dict[str, Any]
    target: torch.Tensor
    aug: torch.Tensor | None = None
    float_hidden: torch.Tensor | None = None
    index: Any = None


#: ``loss(out, batch) -> scalar``: ``out`` is the block's float32 output on ``batch.hidden``
BatchLoss = Callable[["torch.Tensor", Batch], "torch.Tensor"]


@dataclass
class ReconResult:
    """What one call of :func:`llmcq.recon.reconstruct` did.

    ``losses``: the mean training loss per epoch (or per ``log_every`` iterations), over
    every rank's batches; ``first``/``last``: the first and the last of them (NaN when
    nothing was trained); ``steps``: optimizer steps taken; ``rolled_back``: a non-finite
    loss restored the tensors of the previous logged point (``losses[-1]`` is that loss);
    ``amp``: whether bfloat16 autocast was on; with ``keep_best``: ``best_loss``, the lowest
    step loss, and ``best_step``, the step (0-based) whose starting tensors were kept (None
    without ``keep_best``)."""

    losses: list[float] = field(default_factory=list)
    steps: int = 0
    rolled_back: bool = False
    amp: bool = False
    best_loss: float | None = None
    best_step: int | None = None

    @property
    def first(self) -> float:
        return self.losses[0] if self.losses else float("nan")

    @property
    def last(self) -> float:
        return self.losses[-1] if self.losses else float("nan")
