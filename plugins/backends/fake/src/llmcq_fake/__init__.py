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
    weight_formats=("int", "float"),
)


def load_fake_quant(path, **kwargs):  # noqa: ANN001, ANN201 - thin lazy wrapper
    """Load a ``fake_quant_model`` folder with its activation quantization re-applied."""
    from llmcq_fake.export import load_fake_quant as _load

    return _load(path, **kwargs)
