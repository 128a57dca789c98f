"""FP8 (e4m3) exports in compressed-tensors' ``float-quantized`` format on the tiny Llama,
loaded back by transformers + the ``compressed-tensors`` library from PyPI on the CPU.

Checked per case: the config vLLM reads (``type: float``, ``num_bits: 8``, ``strategy``,
``dynamic``), the stored tensors (``weight`` float8_e4m3fn equal to the record's codes,
``weight_scale`` float32 equal to the record's scale), weights of the dequantized load equal
to ``record.dequantize()`` bit for bit, and the logits of the default load (the library's
own quantized forward: activations quantized to FP8 per token / per tensor, or with the
stored ``input_scale``) against llmcq's fake-quantized model.

Tolerance: the library computes a dynamic FP8 scale as ``absmax / ((448 - (-448)) / 2)`` =
``absmax / 448``, the same as llmcq, so the logits are asserted equal to 1e-5 (measured: 0.0,
see the README table).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from llmcq import hookimpl
from llmcq.config.loader import resolve_config
from llmcq.errors import ConfigError
from llmcq.model.loading import ModelSource, load_pretrained
from llmcq.pipeline.runner import run
from safetensors import safe_open

FP8_CH = {"quant_type": "float-quant", "bit": "e4m3", "symmetric": True,
          "granularity": "per_channel", "use_qtorch": True}
FP8_TENSOR = {**FP8_CH, "granularity": "per_tensor"}
A_TOKEN = {"quant_type": "float-quant", "bit": "e4m3", "symmetric": True,
           "granularity": "per_token", "use_qtorch": True}
A_TENSOR_DYN = {**A_TOKEN, "granularity": "per_tensor"}
A_STATIC = {**A_TOKEN, "granularity": "per_tensor", "static": True}

CASES = {  # name: (weight, act, input-activation config (strategy, dynamic) or None)
    "w8a8_fp8_channel_token": (FP8_CH, A_TOKEN, ("token", True)),
    "w8a8_fp8_tensor_static": (FP8_TENSOR, A_STATIC, ("tensor", False)),
    "w8a8_fp8_channel_tensor_dynamic": (FP8_CH, A_TENSOR_DYN, ("tensor", True)),
    "w8a16_fp8_channel": (FP8_CH, None, None),
}


def config(model: Path, data: Path, save: Path, weight: dict, act: dict | None,
           method: str = "rtn", **save_flags: Any) -> dict[str, Any]:
    q: dict[str, Any] = {"method": method, "weight": weight}
    if act is not None:
        q["act"] = act
    cfg: dict[str, Any] = {"base": {"seed": 0, "device": "cpu"},
                           "model": {"type": "llama", "path": str(model)}, "quant": q,
                           "save": {"save_path": str(save), "save_fake": True,
                                    **(save_flags or {"save_vllm": True})}}
    if (act is not None and act.get("static")) or method != "rtn":
        cfg["calib"] = {"name": "wikitext2", "path": str(data / "wikitext2" / "valid.txt"),
                        "n_samples": 4, "seq_len": 64, "preproc": "wikitext2_gptq", "bs": 2}
    return cfg


class KeepRecords:
    """Hook object keeping the run's records (as the exporters receive them)."""

    def __init__(self) -> None:
        self.records: dict[str, Any] = {}

    @hookimpl
    def llmcq_export(self, run: Any, backend: str, model: Any, records: dict,
                     out_dir: Path) -> list[Path]:
        self.records = records
        return []


def logits(model: Any, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x).logits.float()


@pytest.mark.parametrize("case", list(CASES))
def test_fp8_export_loads_with_our_codes_and_logits(case: str, tmp_path: Path,
                                                    tiny_llama_dir: Path,
                                                    shared_data: Path) -> None:
    from llmcq_fake import load_fake_quant
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    weight, act, inputs = CASES[case]
    model, tok = load_pretrained(ModelSource(tiny_llama_dir))
    out = tmp_path / "out"
    keep = KeepRecords()
    run(resolve_config(config(tiny_llama_dir, shared_data, out, weight, act)),
        progress=False, model=model, tokenizer=tok, extra_plugins=[keep])
    records = keep.records
    folder = out / "vllm_quant_model"
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "float-quantized"
    assert qc["ignore"] == ["lm_head"]
    group = qc["config_groups"]["group_0"]
    wq = group["weights"]
    assert (wq["type"], wq["num_bits"], wq["symmetric"], wq["dynamic"]) == ("float", 8, True,
                                                                           False)
    assert wq["strategy"] == ("tensor" if weight["granularity"] == "per_tensor" else "channel")
    ia = group["input_activations"]
    if inputs is None:
        assert ia is None
    else:
        assert (ia["type"], ia["num_bits"], ia["symmetric"]) == ("float", 8, True)
        assert (ia["strategy"], ia["dynamic"]) == inputs

    name = "model.layers.1.mlp.down_proj"
    rec = records[name]
    assert rec.qweight.dtype == torch.float8_e4m3fn and rec.zero is None
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        w = f.get_tensor(f"{name}.weight")
        s = f.get_tensor(f"{name}.weight_scale")
        assert w.dtype == torch.float8_e4m3fn and w.shape == (64, 160)
        assert torch.equal(w.view(torch.uint8), rec.qweight.view(torch.uint8))
        assert s.dtype == torch.float32 and torch.equal(s.reshape(-1), rec.scale.reshape(-1))
        assert s.shape == ((1,) if weight["granularity"] == "per_tensor" else (64, 1))
        assert (f"{name}.input_scale" in keys) == bool(act and act.get("static"))
        if act and act.get("static"):
            assert torch.equal(f.get_tensor(f"{name}.input_scale").reshape(()),
                               rec.act_scale.reshape(()))
    assert not any(k.endswith(("act_scale", "act_zero", "weight_zero_point")) for k in keys)

    x = torch.randint(0, 500, (2, 32), generator=torch.Generator().manual_seed(7))
    deq = AutoModelForCausalLM.from_pretrained(
        str(folder), quantization_config=CompressedTensorsConfig(dequantize=True))
    for lname, lin in deq.named_modules():
        if isinstance(lin, torch.nn.Linear) and lname != "lm_head":
            assert torch.equal(lin.weight, records[lname].dequantize()), lname
    ours = logits(load_fake_quant(out / "fake_quant_model"), x)
    theirs = logits(deq if act is None else AutoModelForCausalLM.from_pretrained(str(folder)),
                    x)
    assert (theirs - ours).abs().max().item() <= 1e-5, case
    # and FP8 is not a no-op: the float model differs
    float_model, _ = load_pretrained(ModelSource(tiny_llama_dir))
    assert (logits(float_model, x) - ours).abs().max().item() > 1e-4


def test_awq_fp8_exports_too(tmp_path: Path, tiny_llama_dir: Path, shared_data: Path) -> None:
    """AWQ's search and clip fake-quantize through the FP8 spec; its records export."""
    model, tok = load_pretrained(ModelSource(tiny_llama_dir))
    out = tmp_path / "out"
    cfg = config(tiny_llama_dir, shared_data, out, FP8_CH, A_TOKEN, method="awq")
    cfg["quant"]["special"] = {"trans": True, "trans_version": "v2", "weight_clip": True}
    keep = KeepRecords()
    run(resolve_config(cfg), progress=False, model=model, tokenizer=tok, extra_plugins=[keep])
    assert keep.records and all(r.qweight.dtype == torch.float8_e4m3fn
                                for r in keep.records.values())
    qc = json.loads((out / "vllm_quant_model" / "config.json").read_text())
    assert qc["quantization_config"]["format"] == "float-quantized"


@pytest.mark.parametrize(("flag", "act"), [
    ("save_lightllm", A_TOKEN), ("save_trtllm", A_TOKEN),  # they take quantized activations
    ("save_autoawq", None), ("save_autogptq", None), ("save_gguf", None), ("save_mlcllm", None),
])
def test_backends_without_fp8_refuse_it_at_config_time(flag: str, act: dict | None,
                                                       tmp_path: Path, tiny_llama_dir: Path,
                                                       shared_data: Path) -> None:
    """float_format is not in these backends' ``accepts``: core refuses it naming the key
    (weight-only FP8 for the weight-only formats, which refuse quant.act first)."""
    cfg = config(tiny_llama_dir, shared_data, tmp_path / "o", FP8_CH, act, **{flag: True})
    with pytest.raises(ConfigError) as err:
        resolve_config(cfg)
    assert err.value.path == "quant.weight.quant_type", str(err.value)
    assert "int-quant" in str(err.value) and "FP8" in str(err.value)


def test_sglang_takes_fp8(tmp_path: Path, tiny_llama_dir: Path, shared_data: Path) -> None:
    resolve_config(config(tiny_llama_dir, shared_data, tmp_path / "o", FP8_CH, A_TOKEN,
                          save_sgl=True))
