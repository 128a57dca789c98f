"""ABQ-LLM (Zeng et al., 2024): OmniQuant-style block training (learnable weight clipping and
learnable equivalent transformation) with a distribution-correcting loss and a rank-1
compensation of ``down_proj`` in the first and last blocks (``quant.method: abq``, also
``ABQLLM`` and ``abq_llm``).

This module is imported by ``llmcq validate``: it holds the typed ``quant.special`` keys and
the config-time checks, and imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmcq.api import AlgorithmSpec, StepSettings
from llmcq.capabilities import Feature, Need
from llmcq.config.schema import SpecialConfig
from llmcq.errors import ConfigError
from llmcq.quant.spec import PerToken
from pydantic import Field

__all__ = ["SPEC", "AbqSpecial", "AbqSpec", "WEIGHT_BITS", "ACT_BITS"]

#: weight widths the plugin trains and records (integer grids)
WEIGHT_BITS = range(2, 9)
#: activation widths (dynamic, per token; A16 is a config without quant.act)
ACT_BITS = range(4, 9)


class AbqSpecial(SpecialConfig):
    """``quant.special`` of ABQ-LLM: the keys of the reference's ``main.py`` (numbers at its
    defaults; ``lwc``/``let`` on, as every script of the reference passes them)."""

    #: learnable weight clipping (per row or group, factors start at 4: sigmoid 0.982)
    lwc: bool = True
    #: learnable equivalent transformation: qkv, gate/up, v -> o and up -> down scales
    let: bool = True
    lwc_lr: float = Field(0.01, gt=0)
    let_lr: float = Field(0.005, gt=0)
    #: SmoothQuant migration strength of the LET initialization
    alpha: float = Field(0.5, ge=0, le=1)
    #: passes over the calibration batches per block
    epochs: int = Field(10, ge=0)
    #: AdamW weight decay (every group)
    wd: float = Field(0.0, ge=0)
    #: also train against the float block on the quantized inputs (the reference always does)
    aug_loss: bool = True
    #: True: train in float32; False: bfloat16 autocast on CUDA (the reference forces True)
    deactive_amp: bool = True
    #: rank-1 compensation ``W + a b^T`` of down_proj in the first and the last blocks:
    #: ``[first, last]`` counts (``[0, 0]``: none)
    compensation_layers: tuple[int, int] = (3, 4)
    #: AdamW learning rate of the compensation vectors (fixed at 1e-2 in the reference)
    compensation_lr: float = Field(0.01, gt=0)
    #: LET also between up_proj and down_proj (the reference does it in every Llama block)
    smooth_up_down: bool = True
    #: 2-bit asymmetric weights on 5 levels (codes 0..4, step range / 4; the reference's
    #: W2* rows): results.json counts log2(5) bits per weight; only backends that write
    #: dequantized weights (fake, trans) accept it
    bit_balance: bool = False
    #: the bidirectional KL of the head-averaged attention maps in the loss (needs roles q
    #: and k and rotary position embeddings in the block's inputs: Llama-style attention)
    attn_loss: bool = True


@dataclass(frozen=True, kw_only=True)
class AbqSpec(AlgorithmSpec):
    """Refuses at config time what the implementation cannot honour."""

    def check(self, step: StepSettings) -> None:
        super().check(step)
        special = step.special
        assert isinstance(special, AbqSpecial)
        sp = step.special_path
        weight, act = step.specs.weight, step.specs.act
        if weight is None:
            raise ConfigError("quant.weight", None, show_value=False,
                              reason="ABQ-LLM quantizes weights: give quant.weight")
        if weight.is_float:
            raise ConfigError("quant.weight.quant_type", weight.fmt, allowed="int-quant",
                              reason="ABQ-LLM trains integer grids")
        if weight.bits not in WEIGHT_BITS:
            raise ConfigError("quant.weight.bit", weight.bits, allowed="an integer from 2 to 8")
        quant = step.quant
        assert quant is not None and quant.weight is not None
        if special.lwc and quant.weight.calib_algo != "learnable":
            raise ConfigError("quant.weight.calib_algo", quant.weight.calib_algo,
                              allowed="learnable",
                              reason="ABQ-LLM with lwc: True trains the clipping range")
        if special.epochs > 0 and not (special.lwc or special.let
                                       or any(special.compensation_layers)):
            raise ConfigError(f"{sp}.epochs", special.epochs, reason="nothing to train: set "
                              "lwc, let or compensation_layers, or epochs: 0")
        first, last = special.compensation_layers
        if first < 0 or last < 0:
            raise ConfigError(f"{sp}.compensation_layers", list(special.compensation_layers),
                              allowed="[first, last]: two counts >= 0")
        if special.smooth_up_down and not special.let:
            raise ConfigError(f"{sp}.smooth_up_down", True, reason="needs let: True")
        if special.bit_balance and (weight.bits != 2 or weight.symmetric):
            raise ConfigError(f"{sp}.bit_balance", True, allowed="False",
                              reason="the 5-level grid is for 2-bit asymmetric weights "
                              f"(got {weight.describe()})")
        if act is not None:
            if act.is_float:
                raise ConfigError("quant.act.quant_type", act.fmt, allowed="int-quant",
                                  reason="ABQ-LLM trains integer activation grids")
            if act.bits not in ACT_BITS:
                raise ConfigError("quant.act.bit", act.bits, allowed="an integer from 4 to 8 "
                                  "(A16, weight-only: leave quant.act out)")
            if not isinstance(act.granularity, PerToken):
                raise ConfigError("quant.act.granularity", str(act.granularity),
                                  allowed="per_token",
                                  reason="ABQ-LLM quantizes activations per token")
            if act.static:
                raise ConfigError("quant.act.static", True, allowed="False",
                                  reason="ABQ-LLM trains with dynamic activation quantization")

    def produces(self, step: StepSettings) -> list[Feature]:
        special = step.special
        assert isinstance(special, AbqSpecial)
        if not special.bit_balance:
            return []
        return [Feature("grid_levels", step.key("bit_balance"), True, source=self.name,
                        hint="set bit_balance: False (an ordinary 4-level 2-bit grid)")]

    def needs(self, step: StepSettings) -> list[Need]:
        special = step.special
        assert isinstance(special, AbqSpecial)
        out = []
        if special.let:
            out.append(Need("scaling_pairs", step.key("let"), True, source=self.name,
                            hint="set let: False (learnable clipping alone needs no pairs)"))
        if special.let or special.attn_loss or any(special.compensation_layers):
            key = "let" if special.let else ("attn_loss" if special.attn_loss
                                             else "compensation_layers")
            out.append(Need("roles", step.key(key), True, source=self.name,
                            hint="the LET pairs, the attention's queries/keys and down_proj "
                                 "are found by the linears' roles"))
        return out

    def wants_calibration(self, step: StepSettings) -> bool:
        return True


SPEC = AbqSpec(
    name="abq",
    aliases=("ABQLLM", "abq_llm"),
    summary="ABQ-LLM: OmniQuant-style LWC + LET trained per block with a distribution-"
            "correcting loss (MSE, -log cos, attention-map KL) and rank-1 down_proj "
            "compensation (any W2-8 with A4-8 or A16)",
    impl="llmcq_abq.algorithm:ABQ",
    paper="https://arxiv.org/abs/2408.08554",
    special=AbqSpecial,
    needs_calibration=True,
    supports_act=True,
    weight_calib_algos=("learnable", "minmax"),
    per_layer_specs=True,
)
