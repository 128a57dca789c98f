"""Export parity of a quantizing algorithm on the tiny Llama, for plugins' tests: a short
run written with ``save_vllm`` (compressed-tensors pack-quantized) and ``save_fake``; the packed
checkpoint must decode exactly to the records' codes, scales and zero points, and reloaded by
transformers + compressed-tensors (dequantized on the CPU) hold the records' dequantized
weights bit for bit and give the logits of llmcq's fake-quantized model, in-process and
reloaded from save_fake, within 1e-5 (the bound of the vLLM backend's weight-only tests).
Needs the ``vllm`` and ``fake`` backends and compressed-tensors installed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

import llmcq

__all__ = ["check_vllm_export"]


class _Spy:
    @llmcq.hookimpl
    def llmcq_evaluate(self, run: Any) -> list:
        self.records = dict(run.records)
        return []


def _logits(model: Any, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x).logits.float()


def check_vllm_export(method: str, special: dict[str, Any], weight: dict[str, Any],
                      tmp: Path, tiny_llama_dir: Path, shared_data: Path) -> None:
    """Run ``method`` with ``special`` at ``weight`` on the tiny Llama and check its vLLM
    export against the records and the fake-quant model (assertions)."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    from llmcq.config.loader import resolve_config
    from llmcq.model.loading import ModelSource, load_pretrained
    from llmcq.pipeline.runner import run

    out = tmp / "out"
    cfg = {"base": {"seed": 0, "device": "cpu"},
           "model": {"type": "llama", "path": str(tiny_llama_dir)},
           "calib": {"name": "wikitext2", "path": str(shared_data / "wikitext2" / "valid.txt"),
                     "n_samples": 4, "seq_len": 32, "preproc": "wikitext2_gptq", "bs": 1,
                     "seed": 1},
           "eval": {"eval_pos": ["fake_quant"], "name": "wikitext2",
                    "path": str(shared_data / "wikitext2" / "test.txt"), "seq_len": 32,
                    "num_samples": 1},
           "quant": {"method": method, "weight": weight, "special": special,
                     "quant_out": True},
           "save": {"save_path": str(out), "save_vllm": True, "save_fake": True}}
    model, tok = load_pretrained(ModelSource(tiny_llama_dir))
    spy = _Spy()
    run(resolve_config(cfg), progress=False, model=model, tokenizer=tok, extra_plugins=[spy])
    records = spy.records
    assert len(records) == 14

    # the packed checkpoint holds the records' codes, scales and zero points
    sd = load_file(str(out / "vllm_quant_model" / "model.safetensors"))
    bits, offset = weight["bit"], 0 if weight["symmetric"] else 2 ** (weight["bit"] - 1)
    for name, rec in records.items():
        shape = torch.Size(sd[f"{name}.weight_shape"].tolist())
        codes = unpack_from_int32(sd[f"{name}.weight_packed"], bits, shape)
        assert torch.equal(codes.to(torch.int16), rec.qweight.to(torch.int16) - offset), name
        scale = sd[f"{name}.weight_scale"]
        assert torch.equal(scale, rec.scale.to(scale.dtype).reshape(scale.shape)), name
        if weight["symmetric"]:
            assert f"{name}.weight_zero_point" not in sd and rec.zero is None, name
            continue
        zp = unpack_from_int32(sd[f"{name}.weight_zero_point"], bits, scale.shape, packed_dim=0)
        assert torch.equal(zp.to(torch.int16),
                           rec.zero.round().to(torch.int16).reshape(scale.shape) - offset), name

    # reloaded by transformers + compressed-tensors: the records' weights and our logits
    deq = AutoModelForCausalLM.from_pretrained(
        str(out / "vllm_quant_model"),
        quantization_config=CompressedTensorsConfig(dequantize=True)).float().eval()
    for name, rec in records.items():
        assert torch.equal(deq.get_submodule(name).weight, rec.dequantize()), name
    x = torch.randint(0, 500, (2, 32), generator=torch.Generator().manual_seed(7))
    theirs = _logits(deq, x)
    fake = AutoModelForCausalLM.from_pretrained(str(out / "fake_quant_model")).float().eval()
    for ours in (_logits(model, x), _logits(fake, x)):
        assert (theirs - ours).abs().max().item() <= 1e-5
