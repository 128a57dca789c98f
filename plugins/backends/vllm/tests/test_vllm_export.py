"""compressed-tensors exports on the tiny Llama, loaded back by the real consumer stack:
``transformers`` + the ``compressed-tensors`` library from PyPI (decompressing on the CPU).

Two loads per export: ``CompressedTensorsConfig(dequantize=True)`` gives plain linears whose
weights must equal ``record.dequantize()`` bit for bit (and, weight-only, the logits of llmcq's
fake-quantized model); with activation quantization the default load keeps the library's
quantized forward (inputs quantized with the stored ``input_scale`` / ``input_zero_point``, or
dynamically), whose logits must equal llmcq's fake-quantized model.

Tolerance: exact (max |diff| <= 1e-5, in practice 0.0) for weight-only, static activations and
dynamic asymmetric per-token activations. Dynamic *symmetric* per-token activations differ by
design: compressed-tensors' Python reference uses ``scale = absmax / 127.5`` while vLLM's int8
kernel and llmcq use ``absmax / 127``, so there the logits agree to int8 rounding noise
(asserted: max |diff| < 8% of max |logit|, measured 3-4.5%), the stored weights are exact, and
with the library's formula put into llmcq's reference the logits match exactly (<= 1e-5).
With ``sym_range: full`` (llmcq's switch to that convention) the export matches exactly as is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import llmcq.quant.fake
import pytest
import torch
from llmcq.config.loader import resolve_config
from llmcq.errors import ConfigError, OutputExistsError
from llmcq.model.loading import ModelSource, load_pretrained
from llmcq.pipeline.runner import run
from safetensors import safe_open

W4G32A = {"bit": 4, "symmetric": False, "granularity": "per_group", "group_size": 32}
W4G32S = {"bit": 4, "symmetric": True, "granularity": "per_group", "group_size": 32}
W4CHS = {"bit": 4, "symmetric": True, "granularity": "per_channel"}
W4CHA = {"bit": 4, "symmetric": False, "granularity": "per_channel"}
W8CHS = {"bit": 8, "symmetric": True, "granularity": "per_channel"}
W8CHA = {"bit": 8, "symmetric": False, "granularity": "per_channel"}
A8_TOK_S = {"bit": 8, "symmetric": True, "granularity": "per_token"}
A8_TOK_A = {"bit": 8, "symmetric": False, "granularity": "per_token"}
A8_STAT_A = {"bit": 8, "symmetric": False, "granularity": "per_tensor", "static": True}
A8_STAT_S = {"bit": 8, "symmetric": True, "granularity": "per_tensor", "static": True}

CASES = {  # name: (weight, act, format, exact logits)
    "w4a16_g32_asym": (W4G32A, None, "pack-quantized", True),
    "w4a16_g32_sym": (W4G32S, None, "pack-quantized", True),
    "w4a16_channel_sym": (W4CHS, None, "pack-quantized", True),
    "w4a16_channel_asym": (W4CHA, None, "pack-quantized", True),
    "w8a16_channel_sym": (W8CHS, None, "pack-quantized", True),
    "w8a16_channel_asym": (W8CHA, None, "pack-quantized", True),
    "w8a8_static_asym": (W8CHS, A8_STAT_A, "int-quantized", True),
    "w8a8_static_sym": (W8CHS, A8_STAT_S, "int-quantized", True),
    "w8a8_dynamic_token_asym": (W8CHS, A8_TOK_A, "int-quantized", True),
    "w8a8_dynamic_token_sym": (W8CHS, A8_TOK_S, "int-quantized", False),
    "w4a8_g32_dynamic_token": (W4G32S, A8_TOK_S, "int-quantized", False),
    # sym_range full: compressed-tensors' own symmetric convention, so exact
    "w4a16_g32_sym_full": ({**W4G32S, "sym_range": "full"}, None, "pack-quantized", True),
    "w8a8_dynamic_token_sym_full": ({**W8CHS, "sym_range": "full"},
                                    {**A8_TOK_S, "sym_range": "full"}, "int-quantized", True),
}


def config(model: Path, data: Path, save: Path, weight: dict, act: dict | None = None,
           **save_flags: Any) -> dict[str, Any]:
    q: dict[str, Any] = {"method": "rtn", "weight": weight}
    if act is not None:
        q["act"] = act
    cfg: dict[str, Any] = {"base": {"seed": 0, "device": "cpu"},
                           "model": {"type": "llama", "path": str(model)}, "quant": q,
                           "save": {"save_path": str(save), "save_fake": True,
                                    **(save_flags or {"save_vllm": True})}}
    if act is not None and act.get("static"):
        cfg["calib"] = {"name": "wikitext2", "path": str(data / "wikitext2" / "valid.txt"),
                        "n_samples": 4, "seq_len": 64, "preproc": "wikitext2_gptq", "bs": 2}
    return cfg


def ids() -> torch.Tensor:
    return torch.randint(0, 500, (2, 32), generator=torch.Generator().manual_seed(7))


def logits(model: Any, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x).logits.float()


@pytest.mark.parametrize("case", list(CASES))
def test_export_loads_in_transformers_with_our_weights_and_logits(
        case: str, tmp_path: Path, tiny_llama_dir: Path, shared_data: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from llmcq_fake import load_fake_quant
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    weight, act, fmt, exact = CASES[case]
    model, tok = load_pretrained(ModelSource(tiny_llama_dir))
    out = tmp_path / "out"
    run(resolve_config(config(tiny_llama_dir, shared_data, out, weight, act)), progress=False,
        model=model, tokenizer=tok)
    folder = out / "vllm_quant_model"
    cfg = json.loads((folder / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert "compression_config" not in cfg
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == fmt
    assert qc["quantization_status"] == "compressed" and qc["ignore"] == ["lm_head"]
    group = qc["config_groups"]["group_0"]
    assert group["weights"]["num_bits"] == weight["bit"]
    assert group["weights"]["symmetric"] == weight["symmetric"]
    assert (group["input_activations"] is None) == (act is None)
    assert (folder / "tokenizer.json").is_file()
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        packed_key = "model.layers.0.mlp.down_proj.weight_packed"
        if fmt == "pack-quantized":
            assert packed_key in keys and f.get_tensor(packed_key).dtype == torch.int32
        else:
            assert f.get_tensor("model.layers.0.mlp.down_proj.weight").dtype == torch.int8
    assert not any(k.endswith(("act_scale", "act_zero", "g_idx")) for k in keys)
    assert "model.layers.0.self_attn.q_proj.weight" not in keys or fmt != "pack-quantized"

    x = ids()
    fake_plain = AutoModelForCausalLM.from_pretrained(str(out / "fake_quant_model"))
    deq = AutoModelForCausalLM.from_pretrained(
        str(folder), quantization_config=CompressedTensorsConfig(dequantize=True))
    for name, lin in deq.named_modules():
        if isinstance(lin, torch.nn.Linear) and name != "lm_head":
            assert torch.equal(lin.weight, fake_plain.get_submodule(name).weight), name

    ours = logits(load_fake_quant(out / "fake_quant_model"), x)
    # weight-only: the dequantized load is the whole model. With activations, the default
    # load keeps compressed-tensors' quantized forward. (transformers' default load of a
    # *packed asymmetric* checkpoint re-initialises the packed zero points on this version,
    # so weight-only cases are compared through the dequantized load.)
    theirs = logits(deq if act is None else AutoModelForCausalLM.from_pretrained(str(folder)),
                    x)
    diff = (theirs - ours).abs().max().item()
    if exact:
        assert diff <= 1e-5, (case, diff)
        return
    # dynamic symmetric per-token: the scale formulas differ (see the module docstring), so
    # logits differ by int8 rounding noise; with the library's formula in our reference the
    # export matches exactly, which shows the checkpoint itself is right.
    assert 0 < diff < 0.08 * ours.abs().max().item(), (case, diff)
    monkeypatch.setattr(llmcq.quant.fake, "fake_quantize_act", _ct_dynamic_sym_token)
    ours_ct = logits(load_fake_quant(out / "fake_quant_model"), x)
    assert (theirs - ours_ct).abs().max().item() <= 1e-5, case


def _ct_dynamic_sym_token(x: torch.Tensor, spec: Any, scale: Any = None,
                          zero: Any = None) -> torch.Tensor:
    """compressed-tensors' dynamic symmetric per-token int8: ``s = absmax / 127.5``."""
    assert spec.symmetric and not spec.static
    x2 = x.float()
    s = (x2.abs().amax(dim=-1, keepdim=True) / 127.5).clamp(min=torch.finfo(torch.float32).eps)
    return (torch.clamp(torch.round(x2 / s), -128, 127) * s).to(x.dtype)


def test_sgl_flag_writes_its_own_folder_and_overwrite_is_refused(
        tmp_path: Path, tiny_llama_dir: Path, shared_data: Path) -> None:
    model, tok = load_pretrained(ModelSource(tiny_llama_dir))
    cfg = config(tiny_llama_dir, shared_data, tmp_path / "out", W4G32S, None,
                 save_vllm=True, save_sgl=True)
    run(resolve_config(cfg), progress=False, model=model, tokenizer=tok)
    a = (tmp_path / "out" / "vllm_quant_model" / "model.safetensors").read_bytes()
    b = (tmp_path / "out" / "sgl_quant_model" / "model.safetensors").read_bytes()
    assert a == b
    with pytest.raises(OutputExistsError):
        resolve_config(cfg)


@pytest.mark.parametrize(("weight", "act", "special", "field"), [
    ({**W4G32A, "bit": 3}, None, {}, "quant.weight.bit"),
    ({**W4G32A, "bit": 2}, None, {}, "quant.weight.bit"),
    ({**W4G32A, "group_size": 64}, None, {}, "quant.weight.group_size"),  # 160 % 64
    ({**W4G32A, "group_size": 16}, None, {}, "quant.weight.group_size"),  # no kernel
    ({**W4G32A, "granularity": "per_tensor", "group_size": -1}, None, {},
     "quant.weight.granularity"),
    ({**W4G32A, "round_zp": False}, None, {}, "quant.weight.round_zp"),
    (W8CHA, A8_TOK_S, {}, "quant.weight.symmetric"),
    (W4CHS, A8_STAT_S, {}, "quant.act"),
    (W8CHS, {"bit": 4, "symmetric": True, "granularity": "per_token"}, {}, "quant.act.bit"),
    ({**W8CHS, "granularity": "per_group", "group_size": 32}, A8_TOK_S, {},
     "quant.weight.granularity"),
])
def test_unsupported_settings_fail_at_config_time(weight: dict, act: dict | None,
                                                  special: dict, field: str, tmp_path: Path,
                                                  tiny_llama_dir: Path,
                                                  shared_data: Path) -> None:
    cfg = config(tiny_llama_dir, shared_data, tmp_path / "out", weight, act)
    with pytest.raises(ConfigError) as err:
        resolve_config(cfg)
    assert err.value.path == field, str(err.value)


def test_gptq_act_order_with_dynamic_groups_is_refused(tmp_path: Path, tiny_llama_dir: Path,
                                                       shared_data: Path) -> None:
    cfg = config(tiny_llama_dir, shared_data, tmp_path / "out", W4G32S)
    cfg["quant"]["method"] = "gptq"
    cfg["calib"] = {"name": "wikitext2", "path": str(shared_data / "wikitext2" / "valid.txt"),
                    "n_samples": 4, "seq_len": 64}
    with pytest.raises(ConfigError) as err:
        resolve_config(cfg)
    assert err.value.path == "quant.special.actorder"
    # core refuses GPTQ's declared g_idx with GPTQ's hint; the backend only declares accepts
    assert "static_groups: True" in str(err.value) and "g_idx" in str(err.value)
    cfg["quant"]["special"] = {"actorder": True, "static_groups": True}
    resolve_config(cfg)  # act-order with static groups keeps groups contiguous: accepted


def test_partial_groups_of_the_bundled_model_are_refused(tmp_path: Path,
                                                         smollm2_path: Path) -> None:
    cfg = {"model": {"type": "llama", "path": str(smollm2_path)},
           "quant": {"method": "rtn", "weight": {**W4G32A, "group_size": 128}},
           "save": {"save_path": str(tmp_path / "o"), "save_sgl": True}}
    with pytest.raises(ConfigError) as err:
        resolve_config(cfg)
    assert err.value.path == "quant.weight.group_size" and "576" in str(err.value)


@pytest.mark.parametrize("act", [A8_TOK_S, A8_STAT_S], ids=["dynamic_token", "static_tensor"])
def test_lightllm_w8a8_export(act: dict, tmp_path: Path, tiny_llama_dir: Path,
                             shared_data: Path) -> None:
    """LightLLM (quant_type vllm-w8a8) reads int8 ``weight``, fp32 ``weight_scale`` per output
    channel and, with ``activation_scheme: static``, ``input_scale``; LightLLM needs CUDA, so the
    files are checked by name/dtype and loaded with transformers + compressed-tensors."""
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    model, tok = load_pretrained(ModelSource(tiny_llama_dir))
    out = tmp_path / "out"
    run(resolve_config(config(tiny_llama_dir, shared_data, out, W8CHS, act, save_lightllm=True)),
        progress=False, model=model, tokenizer=tok)
    folder = out / "lightllm_quant_model"
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["activation_scheme"] == ("static" if act.get("static") else "dynamic")
    assert cfg["quantization_config"]["format"] == "int-quantized"
    name = "model.layers.1.mlp.down_proj"
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        w = f.get_tensor(f"{name}.weight")
        s = f.get_tensor(f"{name}.weight_scale")
        assert w.dtype == torch.int8 and w.shape == (64, 160)
        assert s.dtype == torch.float32 and s.shape == (64, 1)
        assert (f"{name}.input_scale" in f.keys()) == bool(act.get("static"))
    deq = AutoModelForCausalLM.from_pretrained(
        str(folder), quantization_config=CompressedTensorsConfig(dequantize=True))
    fake = AutoModelForCausalLM.from_pretrained(str(out / "fake_quant_model"))
    assert torch.equal(deq.get_submodule(name).weight, fake.get_submodule(name).weight)


@pytest.mark.parametrize(("weight", "act", "field"), [
    (W4G32S, None, "quant.act"),
    (W8CHS, A8_TOK_A, "quant.act.symmetric"),
    (W8CHS, {**A8_TOK_S, "sym_range": "full"}, "quant.act.sym_range"),
])
def test_lightllm_refuses_what_vllm_w8a8_cannot_read(weight: dict, act: dict | None, field: str,
                                                    tmp_path: Path, tiny_llama_dir: Path,
                                                    shared_data: Path) -> None:
    cfg = config(tiny_llama_dir, shared_data, tmp_path / "o", weight, act, save_lightllm=True)
    with pytest.raises(ConfigError) as err:
        resolve_config(cfg)
    assert err.value.path == field, str(err.value)


@pytest.mark.parametrize(("method", "weight", "act"), [
    ("awq", W4G32A, None),
    ("smoothquant", W8CHS, A8_TOK_A),
    ("gptq", W4G32S, None),
], ids=["awq_w4a16", "smoothquant_w8a8", "gptq_static_groups_w4a16"])
def test_transforming_algorithms_export_their_folded_model(
        method: str, weight: dict, act: dict | None, tmp_path: Path, tiny_llama_dir: Path,
        shared_data: Path) -> None:
    """AWQ/SmoothQuant fold scales into norms: the export must carry the transformed norms
    (logits exact vs llmcq's fake-quant model); GPTQ act-order with static groups exports."""
    from llmcq_fake import load_fake_quant
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    model, tok = load_pretrained(ModelSource(tiny_llama_dir))
    cfg = config(tiny_llama_dir, shared_data, tmp_path / "out", weight, act)
    cfg["quant"]["method"] = method
    if method == "gptq":
        cfg["quant"]["special"] = {"actorder": True, "static_groups": True}
    cfg["calib"] = {"name": "wikitext2", "path": str(shared_data / "wikitext2" / "valid.txt"),
                    "n_samples": 4, "seq_len": 64, "preproc": "wikitext2_gptq", "bs": 2}
    run(resolve_config(cfg), progress=False, model=model, tokenizer=tok)
    folder = tmp_path / "out" / "vllm_quant_model"
    kwargs = {} if act else {"quantization_config": CompressedTensorsConfig(dequantize=True)}
    x = ids()
    theirs = logits(AutoModelForCausalLM.from_pretrained(str(folder), **kwargs), x)
    ours = logits(load_fake_quant(tmp_path / "out" / "fake_quant_model"), x)
    assert (theirs - ours).abs().max().item() <= 1e-5


def test_moe_export_uses_checkpoint_names_and_ignores_the_router(
        tmp_path: Path, tiny_tokenizer: Any, shared_data: Path) -> None:
    """Mixtral: transformers 5 renames ``block_sparse_moe`` to ``mlp`` on load and back on save;
    the config's ``ignore`` must name the router as the checkpoint does, or vLLM would expect
    it quantized. transformers 5.23 cannot load per-expert compressed tensors into its fused
    experts (loader limitation), so each expert is decompressed with the compressed-tensors
    compressor itself and compared with the fake-quant export."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from llmcq.testing.tiny_models import save_tiny_model, tiny_family_config

    src = save_tiny_model(tmp_path / "mixtral", tiny_family_config("mixtral", len(tiny_tokenizer)),
                          tiny_tokenizer)
    model, tok = load_pretrained(ModelSource(src))
    cfg = config(src, shared_data, tmp_path / "out", W4G32A)
    del cfg["model"]["type"]
    run(resolve_config(cfg), progress=False, model=model, tokenizer=tok)
    folder = tmp_path / "out" / "vllm_quant_model"
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qc["ignore"] == ["lm_head", "model.layers.0.block_sparse_moe.gate",
                            "model.layers.1.block_sparse_moe.gate"]
    scheme = QuantizationScheme(**qc["config_groups"]["group_0"])
    compressor = BaseCompressor.get_value_from_registry(qc["format"])
    with safe_open(str(folder / "model.safetensors"), "pt") as f, \
            safe_open(str(tmp_path / "out" / "fake_quant_model" / "model.safetensors"), "pt") as g:
        keys = set(f.keys())
        for ignored in qc["ignore"]:
            assert f"{ignored}.weight" in keys
        expert = "model.layers.1.block_sparse_moe.experts.3.w2"
        local = {k.removeprefix(expert + "."): f.get_tensor(k) for k in keys
                 if k.startswith(expert + ".")}
        assert set(local) == {"weight_packed", "weight_scale", "weight_shape", "weight_zero_point"}
        weight = compressor.decompress(local, scheme)["weight"]
        assert torch.equal(weight, g.get_tensor(expert + ".weight"))
