"""OmniQuant (Shao et al., 2023): learnable weight clipping and learnable equivalent
transformation, trained block by block (llmc's ``OmniQuant``).

This module is imported by ``llmcq validate``: it holds the typed ``quant.special`` keys and
the config-time checks, and imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llmcq.api import AlgorithmSpec, StepSettings
from llmcq.artefacts import KINDS
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
    #: start LET from 1 on a block whose scales were applied already, by an earlier recipe
    #: step (AWQ) or by load_transform
    search_scale_init: bool = False
    #: with search_clip_init: start LWC from given clip ranges instead of searching: those an
    #: earlier step of the recipe published for the block (awq with clip_version v2), or
    #: ``<clip_path>/clips.pth`` when clip_path is given (llmc's key)
    load_clip: bool = False
    #: llmc's two-step flow (TesseraQ's key): fold ``<scale_path>/scales.pth`` (saved by awq
    #: with save_scale) into each block before anything else, and with clip_path start LWC
    #: from ``<clip_path>/clips.pth`` (saved by awq with clip_version v2 and save_clip);
    #: queries and keys keep min-max, as with search_clip_init
    load_transform: bool = False
    #: folder of the saved clips (``clips.pth``): read with load_clip or load_transform
    clip_path: str | None = None
    #: folder of the saved scales (``scales.pth``): read with load_transform
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
        clip_init = special.search_clip_init or bool(special.load_transform and
                                                     special.clip_path)
        if clip_init and weight.granularity == "per_tensor":
            key = "search_clip_init" if special.search_clip_init else "clip_path"
            raise ConfigError(f"{sp}.{key}", getattr(special, key), reason="clip ranges "
                              "initialize LWC per channel or per group, not with per_tensor "
                              "weights")
        if special.smooth_up_down and not special.let:
            raise ConfigError(f"{sp}.smooth_up_down", True, reason="needs let: True")
        if special.use_shift and not special.let:
            raise ConfigError(f"{sp}.use_shift", True, reason="needs let: True")
        if special.search_scale_init and not special.let:
            raise ConfigError(f"{sp}.search_scale_init", True, reason="needs let: True")
        if special.search_scale_init and index == 0 and not special.load_transform:
            raise ConfigError(f"{sp}.search_scale_init", True, reason="LET then starts from the "
                              "scales an earlier step applied, and there is none: put a scaling "
                              "method before OmniQuant (quant.method: [awq, omniquant]), or "
                              "apply saved ones with load_transform: True and scale_path")
        if special.load_clip and not special.search_clip_init:
            raise ConfigError(f"{sp}.load_clip", True, reason="takes given clip ranges as the "
                              "LWC initialization: it needs search_clip_init: True")
        if special.load_clip and index == 0 and not special.clip_path:
            raise ConfigError(f"{sp}.load_clip", True, reason="takes the clip ranges an earlier "
                              "step of the recipe left (awq with weight_clip: True and "
                              "clip_version: v2), and there is no step before OmniQuant: "
                              "put awq first, or give clip_path (a folder with clips.pth)")
        self._check_files(step)
        act = quant.act
        if act is not None and act.static:
            raise ConfigError("quant.act.static", True, allowed="False", reason="OmniQuant "
                              "trains with dynamic activation quantization")

    def _check_files(self, step: StepSettings) -> None:
        """llmc's two-step flow: ``load_transform`` with ``scale_path`` (and ``clip_path``)
        reads what awq saved in an earlier run."""
        special = step.special
        assert isinstance(special, OmniQuantSpecial)
        sp, index = step.special_path, step.index
        if special.load_transform:
            if not special.scale_path:
                raise ConfigError(f"{sp}.scale_path", None, show_value=False, reason="load_"
                                  "transform folds saved scales into every block: give "
                                  "scale_path, the folder awq wrote scales.pth to "
                                  "(save_scale: True)")
            if index > 0:
                raise ConfigError(f"{sp}.load_transform", True, reason="folds saved scales "
                                  "into the float model: a run of its own (llmc's second step); "
                                  "in a recipe the earlier step's scales are applied already "
                                  "(use search_scale_init / load_clip instead)")
        elif special.scale_path:
            raise ConfigError(f"{sp}.scale_path", special.scale_path, reason="saved scales are "
                              "read only with load_transform: True, which folds them into each "
                              "block (llmc's search_scale_init reading scales.pth as LET "
                              "statistics is not supported; with load_transform, "
                              "search_scale_init: True starts LET from 1 on the scaled block)")
        if special.clip_path:
            if not (special.load_clip or special.load_transform):
                raise ConfigError(f"{sp}.clip_path", special.clip_path, reason="saved clips "
                                  "are read only with load_clip: True (and search_clip_init: "
                                  "True) or load_transform: True")
            if not special.lwc:
                raise ConfigError(f"{sp}.clip_path", special.clip_path, reason="saved clips "
                                  "initialize learnable weight clipping: it needs lwc: True")
        for on, kind, where in ((special.load_transform, "scales", special.scale_path),
                                (bool(special.clip_path), "clips", special.clip_path)):
            if on and where and not (Path(where).expanduser() / KINDS[kind].file).is_file():
                key = "scale_path" if kind == "scales" else "clip_path"
                raise ConfigError(f"{sp}.{key}", where, reason=f"no {KINDS[kind].file} in "
                                  f"this folder (awq writes it with save_{kind[:-1]}: True)")

    def needs(self, step: StepSettings) -> list[Need]:
        special = step.special
        assert isinstance(special, OmniQuantSpecial)
        out = []
        if special.let:
            out.append(Need("scaling_pairs", step.key("let"), True, source=self.name,
                            hint="set let: False (learnable clipping alone needs no pairs)"))
            out.append(Need("roles", step.key("let"), True, source=self.name,
                            hint="LET's value -> output pair is found by the linears' roles"))
        if special.lwc and (special.search_clip_init or
                            (special.load_transform and special.clip_path)):
            key = "search_clip_init" if special.search_clip_init else "clip_path"
            out.append(Need("roles", step.key(key), True, source=self.name,
                            hint="queries and keys keep min-max, found by their roles"))
        if special.load_transform:
            out.append(Need("scaling_pairs", step.key("load_transform"), True,
                            source=self.name, hint="saved scales are folded through the "
                            "layout's scaling pairs"))
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
    # clip factors, their initial search and the training forward use each linear's own
    # grids; linears kept in float learn no clipping (LET still transforms them)
    per_layer_specs=True,
)
