"""HQQ, Half-Quadratic Quantization (llmc's ``HQQ``): data-free fitting of the zero points.

This module is the plugin's spec and config; it imports no torch (``llmcq validate`` reads it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydantic import Field

from llmcq.api import AlgorithmSpec
from llmcq.config.schema import SpecialConfig
from llmcq.errors import ConfigError

if TYPE_CHECKING:
    from llmcq.api import StepSettings

__all__ = ["SPEC", "HQQSpecial", "HQQSpec", "AXIS0_MEASURED"]


class HQQSpecial(SpecialConfig):
    """``quant.special`` of HQQ: llmc's keys and defaults (llmc's ``hqq_w_only.yml``).

    ```yaml
    quant:
        method: HQQ
        weight: {bit: 3, symmetric: False, granularity: per_group, group_size: 64,
                 round_zp: False}
        special: {axis: 1, lp_norm: 0.7, beta: 10, kappa: 1.01, iters: 20}
    ```
    """

    #: 1: groups run along the input columns (the only layout a QuantizedLinear holds);
    #: llmc's example uses 0 (groups along output channels), which llmcq refuses with what
    #: it costs, measured (:data:`AXIS0_MEASURED`).
    axis: int = Field(1, ge=0, le=1)
    #: p of the sparsity-promoting error ||W - W_r||_p^p, in (0, 1]
    lp_norm: float = Field(0.7, gt=0.0, le=1.0)
    #: initial weight of the half-quadratic coupling term
    beta: float = Field(10.0, gt=0.0)
    #: beta grows by this factor every round
    kappa: float = Field(1.01, ge=1.0)
    #: rounds of (shrink, zero update)
    iters: int = Field(20, ge=1)
    #: llmcq extension (the reference package's ``early_stop``): True stops each group at its
    #: first round that does not lower its error; False (default) runs every round. Either
    #: way each group keeps its best round.
    early_stop: bool = False


#: Measured with ``plugins/algorithms/hqq/scripts/axis0.py`` (``bench/results/hqq_axis0.json``):
#: the bundled SmolLM2-135M, wikitext2 test, first 16 windows x 2048 tokens, ours with llmc's
#: defaults: (setting, axis 0 ppl, axis 1 ppl, RTN ppl with groups of input columns). A test
#: checks these against the JSON.
AXIS0_MEASURED = (("W4 g128 (llmc's hqq_w_only.yml)", 29.92, 31.32, 27.78),
                  ("W3 g64", 87.59, 160.15, 69.97))

AXIS0_REASON = (
    "axis 0 (llmc's example config) groups weights along output channels (group_size output "
    "channels of one input column), but the quantized-linear record that fake quantization "
    "and every exporter read holds scales and zeros per group of input columns only (as the "
    "packed formats do: GPTQ, AWQ, compressed-tensors, GGUF). Refusing it costs HQQ accuracy: "
    "on the bundled SmolLM2-135M axis 0 scored "
    + " and ".join(f"{a:.2f} against axis 1's {b:.2f} at {s}" for s, a, b, _ in AXIS0_MEASURED)
    + " (round-to-nearest with groups of input columns: "
    + " and ".join(f"{r:.2f}" for *_, r in AXIS0_MEASURED)
    + "; wikitext2 perplexity, plugins/algorithms/hqq/scripts/axis0.py, "
    "bench/results/hqq_axis0.json); set axis: 1")


@dataclass(frozen=True, kw_only=True)
class HQQSpec(AlgorithmSpec):
    """HQQ's spec: asymmetric min-max grids along the input columns, fractional zeros."""

    def check(self, step: StepSettings) -> None:
        super().check(step)
        special = step.special
        assert isinstance(special, HQQSpecial)
        assert step.quant is not None
        w = step.quant.weight
        assert w is not None
        if w.symmetric:
            raise ConfigError("quant.weight.symmetric", True, allowed="False",
                              reason="HQQ fits the zero point of an asymmetric grid; a "
                              "symmetric grid has none to fit")
        if w.round_zp:
            raise ConfigError("quant.weight.round_zp", True, allowed="False",
                              reason="HQQ fits fractional zero points (as hqq and llmc's HQQ "
                              "config, which sets round_zp: False); rounding them back to "
                              "integers undoes the optimisation")
        if special.axis != 1:
            raise ConfigError(step.key("axis"), special.axis, allowed="1", reason=AXIS0_REASON)


SPEC = HQQSpec(
    name="hqq",
    summary="Half-Quadratic Quantization: data-free fitting of fractional zero points "
            "(asymmetric weight grids)",
    impl="llmcq_hqq.algorithm:HQQ",
    special=HQQSpecial,
    paper="https://mobiusml.github.io/hqq_blog/",
    needs_calibration=False,
    supports_act=True,
    weight_calib_algos=("minmax",),
    per_layer_specs=True,
)
