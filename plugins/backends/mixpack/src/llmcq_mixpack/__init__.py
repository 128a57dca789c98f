"""mixpack: llmcq's own packed format for per-group mixed-precision weights, and its loader.

No serving engine reads per-group bit widths (SliM-LLM), so this backend writes them in a
documented layout of our own (README "Format") and :func:`load_model` rebuilds a
transformers model that computes with exactly the fake-quant weights. Torch-free:
``llmcq validate`` imports this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llmcq.api import BackendSpec, ExportTarget
from llmcq.errors import ConfigError

from llmcq_mixpack.format import act_problem

__all__ = ["SPEC", "MixPackSpec", "load_model", "MixPackLinear"]


@dataclass(frozen=True, kw_only=True)
class MixPackSpec(BackendSpec):
    """mixpack's spec: ``act_quant`` is accepted for dynamic settings (``accepts_detail``),
    and :meth:`supports` refuses the dynamic ones ``MixPackLinear`` does not reproduce."""

    def supports(self, target: ExportTarget) -> None:
        super().supports(target)
        act = target.specs.act  # called once per quant.mix_bits setting too, with its act
        problem = None if act is None else act_problem(act)
        if problem:
            key, value, allowed = problem
            field = {"fmt": "quant.act.quant_type", "static": "quant.act.static",
                     "granularity": "quant.act.granularity"}[key]
            if key == "fmt":
                value, allowed = "float-quant", ("int-quant",)
            raise ConfigError(field, value, allowed=tuple(map(str, allowed)),
                              reason=f"backend {self.name} ({target.path}) writes dynamic "
                                     "per-token integer activation settings only (what "
                                     "MixPackLinear reproduces with llmcq's fake quant)")


SPEC = MixPackSpec(
    name="mixpack",
    aliases=("mix_pack",),
    summary="per-group mixed-precision codes packed as bit planes per width, with a bit map, "
            "scales and zeros; read back by llmcq_mixpack.load_model",
    impl="llmcq_mixpack.export:export",
    folder="mixpack_model",
    stage="quantized",
    # what a packed linear reproduces exactly (llmcq_mixpack.layout.ACCEPTED_FEATURES, kept
    # here literally so this module imports no torch; a test checks they agree), and the
    # run-level per-linear settings: every linear has its own entry (its own widths and
    # grid), a linear kept in float stays an nn.Linear with its float weight
    # act_quant: per linear, dynamic only (static ranges have no place in the format); the
    # granularity and element format are checked by MixPackSpec.supports
    accepts=frozenset({"group_bits", "g_idx", "float_columns", "fractional_zero",
                       "quantized_scales", "act_quant", "layer_grids", "float_linears"}),
    accepts_detail={"act_quant": ("dynamic",)},
    refusals={
        "act_quant": "writes dynamic activation settings only: MixPackLinear computes each "
                     "token's scale at run time and stores no calibrated range "
                     "(save_fake keeps static settings)",
        "float_format": "packs integer codes only, not FP8",
        "sparse_outliers": "has no place for scattered float outliers",
        "sparsity_mask": "stores dense codes and no mask",
        "input_transform": "MixPackLinear applies no online input transform",
        "kv_cache_quant": "has no KV-cache runtime",
    },
)


def load_model(folder: Any, **kwargs: Any) -> Any:
    """Load a mixpack folder (see :func:`llmcq_mixpack.loader.load_model`)."""
    from llmcq_mixpack.loader import load_model as _load

    return _load(folder, **kwargs)


def __getattr__(name: str) -> Any:
    if name == "MixPackLinear":  # imported on use: the spec module stays torch-free
        from llmcq_mixpack.module import MixPackLinear

        return MixPackLinear
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
