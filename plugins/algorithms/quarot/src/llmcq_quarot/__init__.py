"""QuaRot (Ashkboos et al. 2024, arXiv:2404.00456): rotate the model so that no channel of
an activation is an outlier, then quantize (``quant.method: quarot``, llmc's ``Quarot``).

Model-wide, before the block loop: every norm's weight is fused into the linears it feeds,
tied embeddings are untied, the residual stream is rotated by an orthogonal ``Q`` (R1), the
values and the output projection's heads by a per-head Hadamard (R2), and with
``online_rotate`` a Hadamard is folded into ``down_proj`` and applied online to its input
(R4). Torch-free: this module is what ``llmcq validate`` imports.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from llmcq.api import AlgorithmSpec, StepSettings
from llmcq.capabilities import Feature
from llmcq.config.schema import SpecialConfig
from llmcq.errors import ConfigError

__all__ = ["SPEC", "QuarotSpecial", "QuarotSpec"]


class QuarotSpecial(SpecialConfig):
    """``quant.special`` of QuaRot (llmc's keys and defaults).

    ```yaml
    quant:
        method: [Quarot, GPTQ]
        weight: {bit: 4, symmetric: True, granularity: per_channel}
        act: {bit: 4, symmetric: True, granularity: per_token}
        special:
            Quarot: {rotate_mode: hadamard, fp32_had: True, online_rotate: True}
            GPTQ: {blocksize: 128, percdamp: 0.01, actorder: True, static_groups: True}
    ```
    """

    #: R1, the residual stream's rotation: a Hadamard matrix of the hidden size (random
    #: orthogonal, with a warning, for sizes without one), or a random orthogonal matrix
    #: seeded from base.seed
    rotate_mode: Literal["hadamard", "random"] = "hadamard"
    #: apply the online Hadamard in float32 and cast back (False: in the activations' dtype,
    #: llmc's half-precision path; the same for a float32 model)
    fp32_had: bool = True
    #: True: R4, a Hadamard on down_proj's input applied online (the record's
    #: input_transform); False: only the offline rotations R1 and R2 (function-preserving;
    #: the result is a plain checkpoint)
    online_rotate: bool = True


@dataclass(frozen=True, kw_only=True)
class QuarotSpec(AlgorithmSpec):
    """Declares the online transform of R4 so backends that cannot apply it refuse it."""

    def check(self, step: StepSettings) -> None:
        super().check(step)
        quant = step.quant
        if quant is not None and quant.bit_budget is not None:
            raise ConfigError("quant.bit_budget", None, show_value=False,
                              reason="the bit-budget search measures every linear before the "
                              f"recipe runs, on the unrotated weights, while {self.name} "
                              f"rotates them all first; use quant.mix_bits, or no {self.name}")

    def produces(self, step: StepSettings) -> list[Feature]:
        special = step.special
        assert isinstance(special, QuarotSpecial)
        if not special.online_rotate:
            return []
        return [Feature("input_transform", step.key("online_rotate"), True,
                        source=self.name, detail="hadamard",
                        hint="set online_rotate: False for R1/R2 only (offline rotations, "
                             "a plain checkpoint)")]

    def supports_weightless(self) -> bool:
        return False


SPEC = QuarotSpec(
    name="quarot",
    aliases=("Quarot",),
    summary="QuaRot: norm fusion, Hadamard rotations of the residual stream (R1) and heads "
            "(R2), online Hadamard on down_proj's input (R4); then the run's quantizer",
    impl="llmcq_quarot.algorithm:Quarot",
    paper="https://arxiv.org/abs/2404.00456",
    special=QuarotSpecial,
    needs_calibration=False,
    supports_act=True,
    layout_needs=("rotation_points",),
    weight_formats=("int", "float"),
    per_layer_specs=True,
)
