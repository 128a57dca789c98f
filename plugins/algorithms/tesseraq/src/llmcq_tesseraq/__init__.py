"""TesseraQ (Li & Panda, 2024): progressive adaptive rounding and dequantization scale
tuning, trained block by block (llmc's ``TesseraQ``).

This module is imported by ``llmcq validate``: it holds the typed ``quant.special`` keys and
the config-time checks, and imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import Field, field_validator

from llmcq.api import AlgorithmSpec, StepSettings
from llmcq.capabilities import Need
from llmcq.config.schema import SpecialConfig
from llmcq.errors import ConfigError

__all__ = ["SPEC", "TesseraQSpecial", "TesseraQSpec", "SCHEDULES"]

#: the named hardening schedules (the share of rounding variables left soft after each
#: stage): ``llmc``, the 10 stages of llmc's
#: ``configs/quantization/methods/Tesseraq/tesseraq_w_only.yml``; ``upstream``, the 20
#: stages of the authors' configs (TesseraQ's README and its ``configs/quantization/*``)
SCHEDULES: dict[str, tuple[float, ...]] = {
    "llmc": (0.75, 0.5, 0.375, 0.25, 0.125, 0.09, 0.06, 0.04, 0.02, 0.005),
    "upstream": (0.8, 0.65, 0.5, 0.43, 0.38, 0.34, 0.3, 0.27, 0.24, 0.21, 0.18, 0.15, 0.12,
                 0.10, 0.08, 0.06, 0.04, 0.02, 0.01, 0.005),
}


class TesseraQSpecial(SpecialConfig):
    """``quant.special`` of TesseraQ: llmc's keys, with the defaults of llmc's
    ``configs/quantization/methods/Tesseraq/tesseraq_w_only.yml``, plus ``thresholds`` by
    name, ``clip_sym``, ``scale_wd`` and ``lr_schedule`` (llmcq)."""

    #: Adam learning rate of the rounding variables
    lr: float = Field(0.0005, gt=0)
    #: Adam steps per hardening stage, each on batch_size randomly drawn calibration samples
    iterations: int = Field(250, ge=0)
    #: weight decay of the rounding variables (llmc reads this key and does not use it)
    wd: float = Field(0.0, ge=0)
    #: samples per step, drawn at random (seeded) from the calibration samples
    batch_size: int = Field(2, ge=1)
    #: True: train in float32; False: bfloat16 autocast on CUDA (float32 on the CPU)
    deactive_amp: bool = False
    #: also the loss against the float block run on the (quantized) inputs, the two averaged
    aug_loss: bool = False
    #: learn a factor 2 * rectified_sigmoid(nu) per group on the dequantization scale
    optimize_scale: bool = True
    #: learning rate of the scale factors; null: lr (llmc)
    scale_lr: float | None = Field(0.0005, gt=0)
    #: llmcq: weight decay of the scale factors (llmc: 1e-4, fixed)
    scale_wd: float = Field(1e-4, ge=0)
    #: the hardening schedule: after stage i, the share thresholds[i] of each linear's
    #: rounding variables (the least decided ones) stays soft; a decreasing list in (0, 1),
    #: or ``llmc`` (10 stages, llmc's yml) or ``upstream`` (20 stages, the authors' configs)
    thresholds: Literal["llmc", "upstream"] | list[float] = "llmc"
    #: clip the weights before the grid is fixed (clip_version v1: AWQ's clip search on
    #: the fly; v2: given clip ranges)
    weight_clip: bool = True
    #: v1: search the clip ranges (AWQ's auto_clip; queries and keys keep min-max); v2: take
    #: those an earlier step of the recipe published (awq with clip_version v2, omniquant),
    #: or ``<clip_path>/clips.pth`` when clip_path is given
    clip_version: Literal["v1", "v2"] = "v1"
    #: llmcq (llmc's AWQ key): symmetric clip search; null: the weight grid's symmetry
    clip_sym: bool | None = None
    #: fold ``<scale_path>/scales.pth`` (saved by awq with save_scale) into each block
    #: first: llmc's two-step AWQ -> TesseraQ flow
    load_transform: bool = False
    #: accepted for llmc's configs; no effect here (the harness trains on float32 copies of
    #: the parameters and never converts the block, so there is nothing to convert back)
    reduce_memory: bool = True
    #: folder of saved scales (``scales.pth``), read with load_transform
    scale_path: str | None = None
    #: folder of saved clip ranges (``clips.pth``), read with weight_clip and clip_version v2
    clip_path: str | None = None
    #: QuaRot-initialized models: not supported (llmcq has no rotations yet); False only
    online_rotate: bool = False
    #: QuaRot's float32 Hadamard: not supported; False only
    fp32_had: bool = False
    #: llmcq: learning-rate schedule within each stage (llmc: constant)
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"

    @field_validator("thresholds")
    @classmethod
    def _thresholds(cls, v: str | list[float]) -> str | list[float]:
        if isinstance(v, str):
            return v
        if any(not 0 < t < 1 for t in v):
            raise ValueError(f"thresholds must lie strictly between 0 and 1 (got {v}); or "
                             f"name a schedule: {', '.join(SCHEDULES)}")
        if any(b >= a for a, b in zip(v, v[1:])):
            raise ValueError(f"thresholds must decrease (each stage hardens more): got {v}")
        return v

    @property
    def schedule(self) -> tuple[float, ...]:
        """The thresholds as numbers."""
        t = self.thresholds
        return SCHEDULES[t] if isinstance(t, str) else tuple(float(x) for x in t)


@dataclass(frozen=True, kw_only=True)
class TesseraQSpec(AlgorithmSpec):
    """Refuses at config time what the implementation cannot honour."""

    def check(self, step: StepSettings) -> None:
        super().check(step)
        special, quant = step.special, step.quant
        assert isinstance(special, TesseraQSpecial) and quant is not None
        sp, index = step.special_path, step.index
        weight = quant.weight
        assert weight is not None
        for key in ("online_rotate", "fp32_had"):
            if getattr(special, key):
                raise ConfigError(f"{sp}.{key}", True, allowed="False", reason="QuaRot-"
                                  "initialized TesseraQ needs online rotations, which llmcq "
                                  "does not have yet")
        if index != len(step.methods) - 1:
            raise ConfigError(step.method_path, step.methods[index], reason="TesseraQ's "
                              "result is its learned rounding (integer codes): it must be the "
                              "last step of quant.method")
        if not weight.round_zp and not weight.symmetric:
            raise ConfigError("quant.weight.round_zp", False, allowed="True", reason="TesseraQ's "
                              "codes are floor(W / s) + rounding + z: integral zero points only")
        if special.weight_clip and weight.granularity == "per_tensor":
            raise ConfigError(f"{sp}.weight_clip", True, allowed="False", reason="clip ranges "
                              "are per channel or per group, not with per_tensor weights")
        if special.weight_clip and special.clip_version == "v2" and index == 0 \
                and not special.clip_path:
            raise ConfigError(f"{sp}.clip_version", "v2", allowed="v1", reason="v2 takes given "
                              "clip ranges, and there are none: give clip_path (a folder with "
                              "clips.pth from awq with save_clip), or put a step that publishes "
                              "clips first (quant.method: [awq, tesseraq] with awq's "
                              "weight_clip: True, clip_version: v2; or [omniquant, tesseraq])")
        if special.load_transform:
            if not special.scale_path:
                raise ConfigError(f"{sp}.scale_path", None, show_value=False, reason="load_"
                                  "transform folds saved scales into every block: give "
                                  "scale_path, the folder awq wrote scales.pth to "
                                  "(save_scale: True)")
            if index > 0:
                raise ConfigError(f"{sp}.load_transform", True, reason="folds saved scales "
                                  "into the float model: a run of its own (llmc's second "
                                  "step); in a recipe the earlier step's scales are applied "
                                  "already")
        act = quant.act
        if act is not None and act.static:
            raise ConfigError("quant.act.static", True, allowed="False", reason="TesseraQ "
                              "trains with dynamic activation quantization")

    def needs(self, step: StepSettings) -> list[Need]:
        special = step.special
        assert isinstance(special, TesseraQSpecial)
        out = []
        if special.weight_clip:
            out.append(Need("roles", step.key("weight_clip"), True, source=self.name,
                            hint="queries and keys keep min-max, found by their roles; or "
                                 "set weight_clip: False"))
        if special.load_transform:
            out.append(Need("scaling_pairs", step.key("load_transform"), True,
                            source=self.name, hint="saved scales are folded through the "
                            "layout's scaling pairs"))
        return out

    def wants_calibration(self, step: StepSettings) -> bool:
        return True


SPEC = TesseraQSpec(
    name="tesseraq",
    summary="TesseraQ: progressive adaptive rounding + dequantization scale tuning, trained "
            "per block (weight-only W2-W4, W4A4)",
    impl="llmcq_tesseraq.algorithm:TesseraQ",
    paper="https://arxiv.org/abs/2410.19103",
    special=TesseraQSpecial,
    needs_calibration=True,
    supports_act=True,
    weight_calib_algos=("minmax", "learnable"),
    # rounding variables, scale factors, clip search and training forward on each linear's
    # own grids; linears kept in float are not trained
    per_layer_specs=True,
)
