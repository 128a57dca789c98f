"""SpinQuant (Liu et al. 2024, arXiv:2405.16406): QuaRot's rotations, with the residual
rotation R1 and one head rotation R2 per block learned by Cayley SGD on the orthogonal
group against the quantized network's loss (``quant.method: spinquant``).

Model-wide, before the block loop: the norms are fused and the head untied as in QuaRot,
R4's online Hadamard is folded into ``down_proj``, R1 starts from QuaRot's Hadamard and each
R2 from the head_dim Hadamard, and ``steps`` Cayley SGD steps lower the cross-entropy of the
model computing with fake-quantized rotated weights (and activations, with ``quant.act``);
the learned rotations are then written into the weights and the run's quantizer (RTN, GPTQ)
quantizes them. Torch-free: this module is what ``llmcq validate`` imports.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from llmcq.api import StepSettings
from llmcq.errors import ConfigError
from llmcq_quarot import QuarotSpec, QuarotSpecial
from pydantic import Field

__all__ = ["SPEC", "SpinQuantSpecial", "SpinQuantSpec"]


class SpinQuantSpecial(QuarotSpecial):
    """``quant.special`` of SpinQuant: QuaRot's rotation keys (``rotate_mode`` is R1's
    starting point; R4 is present while the rotations are learned) and the paper's training
    defaults.

    ```yaml
    quant:
        method: [SpinQuant, GPTQ]
        weight: {bit: 4, symmetric: True, granularity: per_channel}
        act: {bit: 4, symmetric: True, granularity: per_token}
        special:
            SpinQuant: {lr: 1.5, steps: 100, nsamples: 800, batch_size: 8}
            GPTQ: {blocksize: 128, percdamp: 0.01, actorder: True, static_groups: True}
    ```
    """

    #: Cayley SGD learning rate (the paper's 1.5); each step is also bounded by
    #: 1 / ||W||_1 of its skew-symmetric direction (Li et al.), as the reference optimizer
    lr: float = Field(1.5, gt=0)
    #: Cayley SGD steps (the paper's 100); 0: no training, QuaRot's rotations with one R2 per
    #: block (no calibration data needed)
    steps: int = Field(100, ge=0)
    #: calibration samples of calib.seq_len tokens the rotations are trained on, drawn from
    #: the calib dataset with calib.preproc and calib.seed (the paper's 800); null: the calib
    #: section's n_samples. The quantizer after SpinQuant uses calib.n_samples as usual
    nsamples: int | None = Field(800, ge=1)
    #: samples per step (the paper's 8 GPUs x 1); 100 steps x 8 = one pass over 800 samples
    batch_size: int = Field(8, ge=1)
    #: samples per forward pass; the gradients of a step's batch_size samples accumulate
    #: (raise it when memory allows)
    micro_batch: int = Field(1, ge=1)
    #: learning-rate schedule over the steps (the reference trains with cosine)
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    #: Cayley SGD momentum (0 in the paper)
    momentum: float = Field(0.0, ge=0, lt=1)
    #: the weights while the rotations are learned: rtn (fake-quantized min-max on their
    #: grids), none (float; only activations quantized), or auto: none when the run's
    #: quantizer is GPTQ and activations are quantized (the reference's practice: its
    #: rotations for GPTQ are learned on W16A4), rtn otherwise
    train_weight_quant: Literal["auto", "rtn", "none"] = "auto"


@dataclass(frozen=True, kw_only=True)
class SpinQuantSpec(QuarotSpec):
    """QuaRot's declarations (R4's online transform, no bit-budget search); refuses what the
    training cannot honour."""

    def check(self, step: StepSettings) -> None:
        super().check(step)
        special = step.special
        assert isinstance(special, SpinQuantSpecial)
        if special.steps > 0 and special.train_weight_quant == "none" and \
                step.specs.act is None:
            raise ConfigError(step.key("train_weight_quant"), "none", allowed=("auto", "rtn"),
                              reason="without quant.act nothing would be quantized while "
                              "learning, and the float model's loss does not depend on "
                              "the rotations")
        if special.steps > 0 and special.micro_batch > special.batch_size:
            raise ConfigError(step.key("micro_batch"), special.micro_batch,
                              allowed=f"<= batch_size ({special.batch_size})")

    def wants_calibration(self, step: StepSettings) -> bool:
        special = step.special
        assert isinstance(special, SpinQuantSpecial)
        return special.steps > 0

SPEC = SpinQuantSpec(
    name="spinquant",
    aliases=("SpinQuant",),
    summary="SpinQuant: QuaRot's fusion and rotations with R1 and per-block R2 learned by "
            "Cayley SGD against the quantized model's loss; then the run's quantizer",
    impl="llmcq_spinquant.algorithm:SpinQuant",
    paper="https://arxiv.org/abs/2405.16406",
    special=SpinQuantSpecial,
    needs_calibration=True,
    supports_act=True,
    layout_needs=("rotation_points",),
    weight_formats=("int",),
    weight_calib_algos=("minmax", "mse"),
    per_layer_specs=True,
)
