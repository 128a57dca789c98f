"""Export parity of AutoRound on the tiny Llama (2 blocks, hidden 64, intermediate 160): a short
run written with ``save_vllm`` (compressed-tensors pack-quantized: W4 g32 asymmetric, W8
per-channel symmetric) and ``save_fake``. The packed checkpoint decodes exactly to the
records' codes, scales and zero points (test_plumbing.py checks that the records are the
trained fake-quantized weights); reloaded by the real consumer stack (transformers +
compressed-tensors, dequantized on the CPU) it has the records' dequantized weights bit for
bit and the logits of llmcq's fake-quantized model, in-process and reloaded from save_fake,
within 1e-5 (the bound plugins/backends/vllm/tests/test_vllm_export.py sets for weight-only
RTN exports)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import llmcq
from llmcq.config.loader import resolve_config
from llmcq.model.loading import ModelSource, load_pretrained
from llmcq.pipeline.runner import run

W4G32 = {"bit": 4, "symmetric": False, "granularity": "per_group", "group_size": 32}
W8CH = {"bit": 8, "symmetric": True, "granularity": "per_channel"}
SHORT = {"iters": 8, "lr": 0.05, "batch_size": 2}


class _Spy:
    @llmcq.hookimpl
    def llmcq_evaluate(self, run: Any) -> list:
        self.records = dict(run.records)
        return []


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _logits(model: Any, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x).logits.float()


@pytest.mark.parametrize("weight", [W4G32, W8CH], ids=["w4g32-asym", "w8-channel-sym"])
def test_vllm_export_decodes_to_the_records_and_gives_the_fake_quant_logits(
        weight: dict[str, Any], tmp_path: Path, tiny_llama_dir: Path,
        shared_data: Path) -> None:
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from llmcq_fake import load_fake_quant
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    out = tmp_path / "out"
    cfg = {"base": {"seed": 0, "device": "cpu"},
           "model": {"type": "llama", "path": str(tiny_llama_dir)},
           "calib": {"name": "wikitext2", "path": str(shared_data / "wikitext2" / "valid.txt"),
                     "n_samples": 4, "seq_len": 32, "preproc": "wikitext2_gptq", "bs": 1,
                     "seed": 1},
           "eval": {"eval_pos": ["fake_quant"], "name": "wikitext2",
                    "path": str(shared_data / "wikitext2" / "test.txt"), "seq_len": 32,
                    "num_samples": 1},
           "quant": {"method": "autoround", "weight": weight, "special": SHORT,
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
    for ours in (_logits(model, x), _logits(load_fake_quant(out / "fake_quant_model"), x)):
        assert (theirs - ours).abs().max().item() <= 1e-5
