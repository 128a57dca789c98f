"""AWQ: activation-aware weight quantization (Lin et al. 2023, arXiv 2306.00978).

The spec and the ``quant.special`` config live here and import no torch (``llmcq validate``
reads them). The maths is in :mod:`llmcq_awq.solver`, the block plumbing in
:mod:`llmcq_awq.algorithm`.

Example (llmc's keys and spelling)::

    quant:
        method: Awq
        weight: {bit: 3, symmetric: False, granularity: per_group, group_size: 64}
        special:
            trans: True
            trans_version: v2
            weight_clip: True
            clip_sym: False
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field

from llmcq.api import AlgorithmSpec, StepSettings
from llmcq.artefacts import KINDS
from llmcq.capabilities import Need
from llmcq.config.schema import SpecialConfig
from llmcq.errors import ConfigError

__all__ = ["SPEC", "AwqSpecial", "AwqSpec", "SCALES_FILE", "CLIPS_FILE"]

#: file names inside ``scale_path`` / ``clip_path`` (llmc's names; core's artefact files,
#: :mod:`llmcq.artefacts`)
SCALES_FILE = KINDS["scales"].file
CLIPS_FILE = KINDS["clips"].file


class AwqSpecial(SpecialConfig):
    """``quant.special`` of AWQ: llmc's keys with llmc's defaults, plus three extensions.

    llmc keys: ``trans``, ``trans_version``, ``weight_clip``, ``clip_version``, ``clip_sym``,
    ``save_scale``/``scale_path``, ``save_clip``/``clip_path``, ``load_clip`` (llmc's
    OmniQuant key), ``do_gqa_trans``, ``awq_bs``, ``save_mem``. llmcq extensions:
    ``load_scale`` (apply saved scales instead of searching) and ``n_grid``.
    """

    #: search and fold per-channel scales (AWQ's auto_scale)
    trans: bool = True
    #: v1: s = x^r / w^(1-r) (activation and weight salience); v2: s = x^r
    trans_version: Literal["v1", "v2"] = "v2"
    #: search per-group clipping ranges of the weights (AWQ's auto_clip)
    weight_clip: bool = False
    #: v1: clamp the float weights to the searched range; v2: leave the weights alone and
    #: hand the ranges on: to a later learnable step of the recipe (OmniQuant's LWC) through
    #: the run's artefacts, or to a later run through ``<clip_path>/clips.pth``
    clip_version: Literal["v1", "v2"] = "v1"
    #: clip symmetrically ([-a, a]) or each bound on its own; absent: quant.weight.symmetric
    clip_sym: bool | None = None
    #: write the scales (per full linear name) to ``<scale_path>/scales.pth``
    save_scale: bool = False
    scale_path: str | None = None
    #: write the clip ranges (per full linear name) to ``<clip_path>/clips.pth``
    save_clip: bool = False
    clip_path: str | None = None
    #: llmcq: apply ``<scale_path>/scales.pth`` instead of searching
    load_scale: bool = False
    #: apply ``<clip_path>/clips.pth`` instead of searching
    load_clip: bool = False
    #: scale v_proj -> o_proj also under grouped-query attention (the scale is searched per
    #: kv channel and repeated over the query heads sharing it); llmc's default is False
    do_gqa_trans: bool = False
    #: llmc: samples per forward inside the search. Not supported (calib.bs sets it here).
    awq_bs: int | None = None
    #: llmc memory switch; llmcq always frees the search's tensors, so it changes nothing
    save_mem: bool = True
    #: llmcq: number of ratios r = i / n_grid searched (llmc and the paper: 20)
    n_grid: int = Field(20, ge=1, le=1000)


@dataclass(frozen=True, kw_only=True)
class AwqSpec(AlgorithmSpec):
    """AWQ's spec: refuses unsupported combinations before any model is loaded."""

    def check(self, step: StepSettings) -> None:
        super().check(step)
        special, quant = step.special, step.quant
        assert isinstance(special, AwqSpecial) and quant is not None
        sp = step.special_path
        s = special
        if s.awq_bs is not None:
            raise ConfigError(f"{sp}.awq_bs", s.awq_bs, reason="not supported: the scale "
                              "search runs one calibration batch at a time; set calib.bs "
                              "to bound memory", allowed="null (absent)")
        w = quant.weight
        assert w is not None
        if w.calib_algo == "learnable" and len(quant.methods) < 2:
            raise ConfigError("quant.weight.calib_algo", "learnable", reason="awq alone learns "
                              "no ranges; follow it with a learnable step (e.g. "
                              "[awq, omniquant])", allowed=("minmax", "mse"))
        if s.clip_version == "v2" and s.weight_clip:
            alone = len(quant.methods) < 2
            if not s.save_clip and alone:
                raise ConfigError(f"{sp}.clip_version", "v2", reason="v2 leaves the weights "
                                  "unclipped and only hands the ranges on: set save_clip "
                                  "(with clip_path) or follow awq with a learnable step",
                                  allowed="v1")
            # in a recipe the ranges go to the next step's learnable quantizer (as in llmc);
            # alone with save_clip they go to a file for a later run (llmc's two-step flow:
            # this run's own records are round-to-nearest of the unclipped weights)
            if not alone and w.calib_algo != "learnable":
                raise ConfigError("quant.weight.calib_algo", w.calib_algo, reason="clip_version "
                                  "v2 hands clip ranges to a learnable quantizer (as in llmc)",
                                  allowed="learnable")
        for kind, on, flag in (("scale", s.trans, "trans"), ("clip", s.weight_clip,
                                                              "weight_clip")):
            save, load = getattr(s, f"save_{kind}"), getattr(s, f"load_{kind}")
            where = getattr(s, f"{kind}_path")
            fname = SCALES_FILE if kind == "scale" else CLIPS_FILE
            if (save or load) and not on:
                key = "save" if save else "load"
                raise ConfigError(f"{sp}.{key}_{kind}", True, reason=f"needs {flag}: True "
                                  f"(no {kind}s are {'searched' if save else 'applied'} "
                                  "otherwise)")
            if save and load:
                raise ConfigError(f"{sp}.save_{kind}", True, reason=f"load_{kind} is also "
                                  f"set: the loaded {kind}s would be written back unchanged")
            if (save or load) and not where:
                key = "save" if save else "load"
                raise ConfigError(f"{sp}.{kind}_path", None, reason=f"{key}_{kind} needs "
                                  f"{kind}_path: a folder for {fname}", show_value=False)
            if save and where and Path(where).expanduser().exists() and \
                    not Path(where).expanduser().is_dir():
                raise ConfigError(f"{sp}.{kind}_path", where, reason="exists and is not a "
                                  f"folder; {fname} is written inside it")
            if load and where and not (Path(where).expanduser() / fname).is_file():
                raise ConfigError(f"{sp}.{kind}_path", where, reason=f"no {fname} in this "
                                  f"folder (write one with save_{kind}: True)")

    def needs(self, step: StepSettings) -> list[Need]:
        special = step.special
        assert isinstance(special, AwqSpecial)
        out = []
        if special.trans:
            out.append(Need("scaling_pairs", step.key("trans"), True, source=self.name,
                            hint="set trans: False, or use an adapter that declares them"))
        if special.weight_clip:
            out.append(Need("roles", step.key("weight_clip"), True, source=self.name,
                            hint="queries and keys are left unclipped, found by their roles"))
        return out

    def wants_calibration(self, step: StepSettings) -> bool:
        special = step.special
        assert isinstance(special, AwqSpecial)
        return (special.trans and not special.load_scale) or \
            (special.weight_clip and not special.load_clip)


SPEC = AwqSpec(
    name="awq",
    summary="activation-aware per-channel scaling and weight clipping (AWQ), before "
            "round-to-nearest or another quantizing step",
    impl="llmcq_awq.algorithm:Awq",
    special=AwqSpecial,
    paper="https://arxiv.org/abs/2306.00978",
    needs_calibration=True,
    supports_act=True,
    weight_calib_algos=("minmax", "mse", "learnable"),
    # the search and the clip go through core's spec-aware fake quantizers: FP8 works too
    weight_formats=("int", "float"),
    # every linear's own grid in the scale search's loss and its clip search
    per_layer_specs=True,
)
