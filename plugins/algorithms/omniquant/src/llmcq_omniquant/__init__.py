"""OmniQuant (Shao et al., 2023): learnable weight clipping and learnable equivalent
transformation, trained block by block (llmc's ``OmniQuant``).

This module is imported by ``llmcq validate``: it holds the typed ``quant.special`` keys and
the config-time checks, and imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmcq.api import AlgorithmSpec, StepSettings
from llmcq.capabilities import Need
from llmcq.config.schema import SpecialConfig
from llmcq.errors import ConfigError
from pydantic import Field

__all__ = ["SPEC", "OmniQuantSpecial", "OmniQuantSpec"]


class OmniQuantSpecial(SpecialConfig):
    """``quant.special`` of OmniQuant: llmc's keys, with the defaults of llmc's
    ``configs/quantization/methods/OmniQuant/omniq_w_only.yml``."""

    #: learnable weight clipping: per-group sigmoid-parameterized clip factors
    lwc: bool = True
    #: learnable equivalent transformation: per-channel scales between producer and linears
    let: bool = False
    lwc_lr: float = Field(0.01, gt=0)
    let_lr: float = Field(0.005, gt=0)
    #: per-channel shifts besides the scales (needs biases to absorb them: OPT-style models)
    use_shift: bool = False
    #: SmoothQuant migration strength of the LET initialization
    alpha: float = Field(0.5, ge=0, le=1)
    #: True: train in float32; False: bfloat16 autocast on CUDA (float32 on the CPU)
    deactive_amp: bool = True
    epochs: int = Field(20, ge=0)
    #: AdamW weight decay
    wd: float = Field(0.0, ge=0)
    #: add the loss against the float block run on the (quantized) inputs
    aug_loss: bool = False
    #: initialize LWC from an AWQ-style input-aware clip search (q/k keep min-max, as llmc)
    search_clip_init: bool = False
    #: symmetric clip search for search_clip_init; absent: the weight grid's symmetry (llmc)
    clip_sym: bool | None = None
    #: LET also between up_proj and down_proj (llmc's smooth_up_down)
    smooth_up_down: bool = False
    #: start LET from the scales an earlier recipe step (AWQ) already applied (scales of 1)
    search_scale_init: bool = False
    #: with search_clip_init: start LWC from the clip ranges an earlier step (awq with
    #: clip_version v2) left for the block, instead of searching again
    load_clip: bool = False
    #: llmc's hand-over of AWQ clips/scales through files: use quant.method [awq, omniquant]
    clip_path: str | None = None
    scale_path: str | None = None


@dataclass(frozen=True, kw_only=True)
class OmniQuantSpec(AlgorithmSpec):
    """Refuses at config time what the implementation cannot honour."""

    def check(self, step: StepSettings) -> None:
        super().check(step)
        special, quant = step.special, step.quant
        assert isinstance(special, OmniQuantSpecial) and quant is not None
        index = step.index
        sp = step.special_path
        weight = quant.weight
        assert weight is not None
        if special.lwc and weight.calib_algo != "learnable":
            raise ConfigError("quant.weight.calib_algo", weight.calib_algo, allowed="learnable",
                              reason="OmniQuant with lwc: True trains the clipping range")
        if special.epochs > 0 and not (special.lwc or special.let):
            raise ConfigError(f"{sp}.epochs", special.epochs, reason="nothing to train: set "
                              "lwc: True and/or let: True, or epochs: 0")
        if special.search_clip_init and not special.lwc:
            raise ConfigError(f"{sp}.search_clip_init", True, reason="the clip search "
                              "initializes learnable weight clipping; it needs lwc: True")
        if special.search_clip_init and weight.granularity == "per_tensor":
            raise ConfigError(f"{sp}.search_clip_init", True, reason="the clip search works per "
                              "channel or per group, not with per_tensor weights")
        if special.smooth_up_down and not special.let:
            raise ConfigError(f"{sp}.smooth_up_down", True, reason="needs let: True")
        if special.use_shift and not special.let:
            raise ConfigError(f"{sp}.use_shift", True, reason="needs let: True")
        if special.search_scale_init and not special.let:
            raise ConfigError(f"{sp}.search_scale_init", True, reason="needs let: True")
        if special.search_scale_init and index == 0:
            raise ConfigError(f"{sp}.search_scale_init", True, reason="LET then starts from the "
                              "scales an earlier step applied, and there is none: put a scaling "
                              "method before OmniQuant (quant.method: [awq, omniquant])")
        if special.load_clip and not (special.search_clip_init and index > 0):
            raise ConfigError(f"{sp}.load_clip", True, reason="takes the clip ranges an earlier "
                              "step of the recipe left (awq with weight_clip: True and "
                              "clip_version: v2) as the LWC initialization: it needs "
                              "search_clip_init: True and a step before OmniQuant")
        for key in ("clip_path", "scale_path"):
            value = getattr(special, key)
            if value:
                raise ConfigError(f"{sp}.{key}", value, reason="llmc's file hand-over of AWQ "
                                  "clips/scales is not supported: run both in one recipe, "
                                  "quant.method: [awq, omniquant], with search_clip_init: True "
                                  "(and search_scale_init: True for LET)")
        act = quant.act
        if act is not None and act.static:
            raise ConfigError("quant.act.static", True, allowed="False", reason="OmniQuant "
                              "trains with dynamic activation quantization")

    def needs(self, step: StepSettings) -> list[Need]:
        special = step.special
        assert isinstance(special, OmniQuantSpecial)
        out = []
        if special.let:
            out.append(Need("scaling_pairs", step.key("let"), True, source=self.name,
                            hint="set let: False (learnable clipping alone needs no pairs)"))
            out.append(Need("roles", step.key("let"), True, source=self.name,
                            hint="LET's value -> output pair is found by the linears' roles"))
        if special.lwc and special.search_clip_init:
            out.append(Need("roles", step.key("search_clip_init"), True, source=self.name,
                            hint="queries and keys keep min-max, found by their roles"))
        return out

    def wants_calibration(self, step: StepSettings) -> bool:
        return True


SPEC = OmniQuantSpec(
    name="omniquant",
    summary="OmniQuant: learnable weight clipping + learnable equivalent transformation, "
            "trained per block (weight-only and W4A4/W6A6/W8A8)",
    impl="llmcq_omniquant.algorithm:OmniQuant",
    paper="https://arxiv.org/abs/2308.13137",
    special=OmniQuantSpecial,
    needs_calibration=True,
    supports_act=True,
    weight_calib_algos=("learnable", "minmax"),
)
