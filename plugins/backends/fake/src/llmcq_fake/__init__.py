"""Fake-quantized Hugging Face checkpoints (llmc's ``save_fake``)."""

from llmcq.api import BackendSpec

__all__ = ["SPEC", "load_fake_quant"]

SPEC = BackendSpec(
    name="fake",
    aliases=("fake_quant",),
    summary="dequantized weights as a plain HF folder; activation settings in llmcq_quant.json",
    impl="llmcq_fake.export:export",
    folder="fake_quant_model",
    stage="quantized",
    # the dequantized weight holds every grid feature exactly (zeros of pruned weights
    # included), each linear on its own grid (float linears as they are); activation
    # settings go to llmcq_quant.json, per linear. An online input transform
    # would need code at load time, and a quantized KV cache a runtime: both refused.
    accepts=frozenset({"g_idx", "group_bits", "float_columns", "sparse_outliers",
                       "sparsity_mask", "act_quant", "float_format", "fractional_zero",
                       "quantized_scales", "layer_grids", "float_linears", "grid_levels"}),
    refusals={"input_transform": "writes dequantized weights only; an online input "
                                 "transform would have to run at load time",
              "kv_cache_quant": "has no KV-cache runtime"},
)


def load_fake_quant(path, **kwargs):  # noqa: ANN001, ANN201 - thin lazy wrapper
    """Load a ``fake_quant_model`` folder with its activation quantization re-applied."""
    from llmcq_fake.export import load_fake_quant as _load

    return _load(path, **kwargs)
