"""AutoRound / SignRound (Cheng et al., 2023): signed gradient descent on per-weight rounding
offsets and per-group min/max scale factors, trained block by block (intel/auto-round).

This module is imported by ``llmcq validate``: it holds the typed ``quant.special`` keys
(named and defaulted as auto-round's arguments) and the config-time checks, and imports no
torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmcq.api import AlgorithmSpec, StepSettings
from llmcq.config.schema import SpecialConfig
from llmcq.errors import ConfigError
from pydantic import Field

__all__ = ["SPEC", "AutoRoundSpecial", "AutoRoundSpec", "default_lr"]


def default_lr(iters: int, bits: int) -> float:
    """auto-round 0.15.1's learning rate when ``lr`` is not given
    (``SignRoundConfig._lr_for_bits``): ``1 / iters``, or ``2 / iters`` for 3 bits or fewer
    when ``iters >= 1000``."""
    if iters <= 0:
        return 0.0
    return (2.0 if iters >= 1000 and bits <= 3 else 1.0) / iters


class AutoRoundSpecial(SpecialConfig):
    """``quant.special`` of AutoRound: auto-round's argument names and defaults
    (``AutoRound(...)`` and ``SignRoundConfig``, auto-round 0.15.1). Its ``nsamples`` and
    ``seqlen`` are llmcq's ``calib.n_samples`` / ``calib.seq_len``."""

    #: signed-gradient steps per block (each on ``batch_size`` sampled calibration samples)
    iters: int = Field(200, ge=0)
    #: step size of the rounding offsets; absent: 1 / iters (2 / iters for <= 3 bits when
    #: iters >= 1000), decayed linearly to 0 over the iterations
    lr: float | None = Field(None, gt=0)
    #: step size of the min/max scale factors; absent: lr
    minmax_lr: float | None = Field(None, gt=0)
    #: calibration samples per step
    batch_size: int = Field(8, ge=1)
    #: auto-round's gradient accumulation: a step then sees batch_size x this many samples
    #: (the sign of a summed or averaged gradient is the same)
    gradient_accumulate_steps: int = Field(1, ge=1)
    #: also learn per-group factors in [0, 1] of the weight min and max
    enable_minmax_tuning: bool = True
    #: False (auto-round's default): end with the offsets and factors of the iteration with
    #: the lowest loss; True: with those of the last iteration
    not_use_best_mse: bool = False
    #: feed each block the quantized blocks' outputs (with float targets); llmcq's key for
    #: that is quant.quant_out, which must agree
    enable_quanted_input: bool = True
    #: bfloat16 autocast while training on CUDA; float32 on the CPU whatever it says
    amp: bool = True
    #: seed of the sample drawing
    seed: int = 42
    #: auto-round's calibration sample count: llmcq reads calib.n_samples (may repeat it)
    nsamples: int | None = Field(None, ge=1)
    #: auto-round's calibration sequence length: llmcq reads calib.seq_len (may repeat it)
    seqlen: int | None = Field(None, ge=1)

    def rates(self, bits: int) -> tuple[float, float]:
        """``(lr, minmax_lr)`` as auto-round resolves them for ``bits``-bit weights."""
        lr = self.lr if self.lr is not None else default_lr(self.iters, bits)
        return lr, (self.minmax_lr if self.minmax_lr is not None else lr)


@dataclass(frozen=True, kw_only=True)
class AutoRoundSpec(AlgorithmSpec):
    """Refuses at config time what the implementation cannot honour."""

    def check(self, step: StepSettings) -> None:
        super().check(step)
        special, quant = step.special, step.quant
        assert isinstance(special, AutoRoundSpecial) and quant is not None
        weight = quant.weight
        assert weight is not None
        if not weight.round_zp:
            raise ConfigError("quant.weight.round_zp", False, allowed="True",
                              reason="AutoRound rounds its zero points to integers")
        quant_out = bool(quant.quant_out)
        if special.enable_quanted_input != quant_out:
            mine = special.enable_quanted_input
            raise ConfigError(step.key("enable_quanted_input"), mine, allowed=str(quant_out),
                              reason=f"auto-round's enable_quanted_input is llmcq's "
                              f"quant.quant_out, which is {quant_out}: set quant.quant_out: "
                              f"{mine} (auto-round's default, True, trains each block on the "
                              f"quantized blocks' outputs), or enable_quanted_input: {quant_out}")
        calib = step.config.calib
        for key, ours in (("nsamples", "n_samples"), ("seqlen", "seq_len")):
            given = getattr(special, key)
            if given is None:
                continue
            if calib is None:
                raise ConfigError(step.key(key), given, reason=f"llmcq reads auto-round's "
                                  f"{key} from calib.{ours}, and there is no calib section")
            have = getattr(calib, ours)
            if given != have:
                raise ConfigError(step.key(key), given, allowed=str(have),
                                  reason=f"llmcq's calibration size is calib.{ours} "
                                  f"({have}); set that instead (or drop {key})")

    def wants_calibration(self, step: StepSettings) -> bool:
        special = step.special
        assert isinstance(special, AutoRoundSpecial)
        return special.iters > 0  # iters 0 is round-to-nearest: no data


SPEC = AutoRoundSpec(
    name="autoround",
    summary="AutoRound (SignRound): signed gradient descent on rounding offsets and min/max "
            "scale factors, trained per block (weight-only W2-W8)",
    impl="llmcq_autoround.algorithm:AutoRound",
    aliases=("signround",),
    paper="https://arxiv.org/abs/2309.05516",
    special=AutoRoundSpecial,
    needs_calibration=True,
    weight_calib_algos=("minmax",),
    # offsets, min/max factors and the training forward on each linear's own grid
    per_layer_specs=True,
)
