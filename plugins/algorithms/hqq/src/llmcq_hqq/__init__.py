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
    from llmcq.config.schema import QuantSection

__all__ = ["SPEC", "HQQSpecial", "HQQSpec"]


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
    #: llmc's example uses 0 (groups along output channels), which llmcq refuses.
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


@dataclass(frozen=True, kw_only=True)
class HQQSpec(AlgorithmSpec):
    """HQQ's spec: asymmetric min-max grids along the input columns, fractional zeros."""

    def check(self, quant: QuantSection, special: SpecialConfig, *, path: str) -> None:
        super().check(quant, special, path=path)
        assert isinstance(special, HQQSpecial)
        w = quant.weight
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
            where = "quant.special" + (f".{self.name}" if path.endswith("]") else "")
            raise ConfigError(f"{where}.axis", special.axis, allowed="1",
                              reason="axis 0 groups weights along output channels, which a "
                              "quantized-linear record (groups along input columns) cannot "
                              "hold; use axis 1")


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
)
