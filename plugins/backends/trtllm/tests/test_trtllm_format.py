"""TensorRT-LLM checkpoint export, checked against the published TensorRT-LLM source.

TensorRT-LLM does not install here (no GPU, CUDA-only wheels), so nothing here runs
trtllm-build; the layout is checked against vectors and readers written from these files
(NVIDIA/TensorRT-LLM unless named otherwise; the commit is the stored snapshot read):

* ``tensorrt_llm/models/llama/convert.py`` @ 04a2cacbfd3b9ac76191bd8498ad871607b63a04:
  names (``attention.qkv`` = cat(q, k, v), ``mlp.fc`` = gate_proj, ``mlp.gate`` = up_proj,
  ``mlp.proj`` = down_proj, ``input_layernorm``/``post_layernorm``, ``transformer.ln_f``,
  ``lm_head`` padded to a multiple of tp), tensor-parallel splits (q/k/v by heads with kv heads
  duplicated below tp, dense/proj by input columns, fc/gate by rows), SmoothQuant tensors
  (int8 ``weight`` [out, in], ``per_channel_scale`` [1, out], per-token: ``scale_to_int`` = 1 on
  the norms, ``smoother`` [1, in] on dense/proj), and ``load_weights_from_gptq`` whose
  ``zero = (8 - z) * scale`` is added after scaling.
* ``tensorrt_llm/models/modeling_utils.py`` @ 01ea6d79d454bb3ab10c7510a6f706ba039090c2:
  ``QuantConfig`` fields, ``PretrainedConfig.__init__``/``from_dict``, ``preprocess_weights``
  (W4A16_AWQ: int8 ``weight`` transposed and interleaved by ``preprocess_weights_for_mixed_gemm``
  at build time, ``weights_scaling_factor`` transposed; ``zero`` untouched), ``load`` (every
  required parameter must be provided).
* ``tensorrt_llm/quantization/layers.py`` @ 2340c776201e4dba9aa625b8615e3e6ca9d7a7f6: parameter
  shapes (groupwise ``zero`` [in/g, out]; ``WeightOnlyQuantLinear.weight`` int8 [in, out];
  widths padded unless multiples of max(64, g) * tp), ``SmoothQuantRowLinear.smoother``.
* ``tensorrt_llm/quantization/functional.py`` @ 2a9abd9536aa62ad3e4b9314be9286b1b1be523b
  (``weight_only_quant_matmul`` without the plugin: ``dequantize(weights, scales, 1)`` then
  ``matmul``) and ``tensorrt_llm/builder.py`` @ 14e801da3632eb71367b847e335c4f2b09098651
  (``disable_weight_only_quant_plugin`` keeps that plugin off).
* ``tensorrt_llm/quantization/mode.py`` @ d879430b040ea30c65220c9171a8a70607398748 (QuantAlgo
  names); ``tensorrt_llm/models/__init__.py`` @ 02267d3d4fd886c3ad036f6580beb0847eac6e4b
  (MODEL_MAP: Llama/Mistral -> LLaMAForCausalLM, Qwen2 -> QWenForCausalLM);
  ``tensorrt_llm/models/qwen/config.py`` @ 0428c18828880e7c60c13cc5cc0794bbbc05c0a3.
* NVIDIA/TensorRT-Model-Optimizer ``modelopt/torch/export/quant_utils.py`` @
  f5a1489c28cde41a66788715e6588bbb2988ec8a, ``to_quantized_weight`` for int4 AWQ: signed codes
  clamped to -8..7, pairs along the output axis, ``(t[..., 0] & 0x0F) | (t[..., 1] << 4)``,
  returned as ``[out/2, in]``.

Tolerances: dequantized weights equal ``record.dequantize()`` up to the fp16 rounding of
scales and zero terms (1e-3 relative); logits of a HF model rebuilt from the rank files match
llmcq's in-process fake-quant model within 2% of max |logit| (W4A16, W8A16) and 3% (W8A8, the
reader's per-token activation rounding differs from llmcq's in ties).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from llmcq.config.loader import resolve_config
from llmcq.errors import ConfigError
from llmcq.model.loading import ModelSource, load_pretrained
from llmcq.pipeline.runner import run
from llmcq_trtllm.export import pack_int4_pairs
from safetensors.torch import load_file


def _load_reader() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "llmcq_trtllm_test_reader", Path(__file__).with_name("trtllm_reader.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_reader = _load_reader()
RecordSpy, dequant, reader_model = _reader.RecordSpy, _reader.dequant, _reader.reader_model
to_hf_state, unpack_int4_pairs = _reader.to_hf_state, _reader.unpack_int4_pairs

W4G64 = {"bit": 4, "symmetric": False, "granularity": "per_group", "group_size": 64}
W4G64_SYM = {"bit": 4, "symmetric": True, "granularity": "per_group", "group_size": 64}
W8 = {"bit": 8, "symmetric": True, "granularity": "per_channel"}
A8 = {"bit": 8, "symmetric": True, "granularity": "per_token"}


def _config(model: Path, save: Path, weight: dict, *, act: dict | None = None,
            method: str = "rtn", trt: dict | None = None, data: Path | None = None,
            model_type: str | None = None, special: dict | None = None) -> dict[str, Any]:
    quant: dict[str, Any] = {"method": method, "weight": weight, "special": special or {}}
    if act is not None:
        quant["act"] = act
    cfg: dict[str, Any] = {
        "base": {"seed": 0, "device": "cpu"}, "model": {"path": str(model)},
        "quant": quant, "save": {"save_path": str(save), "save_trtllm": True,
                                 "trtllm_cfg": trt or {}}}
    if model_type:
        cfg["model"]["type"] = model_type
    if data is not None:
        cfg["calib"] = {"name": "wikitext2", "path": str(data / "wikitext2" / "valid.txt"),
                        "n_samples": 4, "seq_len": 64, "preproc": "wikitext2_gptq", "bs": 2}
    return cfg


def _export(folder: Path, out: Path, **kw: Any) -> tuple[Any, RecordSpy, Path]:
    model, tok = load_pretrained(ModelSource(folder))
    spy = RecordSpy()
    run(resolve_config(_config(folder, out, **kw)), progress=False, model=model, tokenizer=tok,
        extra_plugins=[spy])
    return model, spy, out / "trtllm_checkpoint"


# --------------------------------------------------------------------------- packing vectors

def test_int4_packing_matches_hand_computed_bytes() -> None:
    """A 2 x 8 weight: row 0 codes -8..-1 (nibbles 0x8..0xF), row 1 codes 0..7. ModelOpt packs
    output rows in pairs, byte i = (row0[i] & 0xF) | (row1[i] << 4) = (8 + i) | (i << 4):
    0x08, 0x19, 0x2A, 0x3B, 0x4C, 0x5D, 0x6E, 0x7F."""
    codes = torch.tensor([list(range(-8, 0)), list(range(0, 8))])
    got = pack_int4_pairs(codes)
    assert got.dtype == torch.int8 and got.shape == (1, 8)
    assert got.tolist() == [[0x08, 0x19, 0x2A, 0x3B, 0x4C, 0x5D, 0x6E, 0x7F]]
    # high nibble negative: row 1 = -1 (0xF) -> 0xF0 | low -> negative int8
    codes = torch.tensor([[0, 1, 7, -8], [-1, -1, -8, 7]])
    assert pack_int4_pairs(codes).tolist() == [[-16, -15, -121, 120]]
    # 0xF0 = -16, 0xF1 = -15, 0x87 = -121, 0x78 = 120
    assert torch.equal(unpack_int4_pairs(pack_int4_pairs(codes)), codes.to(torch.int16))


# --------------------------------------------------------------------------- config.json

#: QuantConfig's dataclass fields (modeling_utils.py): from_dict is ``cls(**config)``
QUANT_CONFIG_FIELDS = {"quant_algo", "kv_cache_quant_algo", "group_size", "smoothquant_val",
                       "clamp_val", "use_meta_recipe", "has_zero_point", "pre_quant_scale",
                       "exclude_modules"}
QUANT_ALGOS = {"W8A16", "W4A16", "W4A16_AWQ", "W4A8_AWQ", "W8A16_GPTQ", "W4A16_GPTQ",
               "W8A8_SQ_PER_CHANNEL", "W8A8_SQ_PER_TENSOR_PLUGIN",
               "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN", "W8A8_SQ_PER_CHANNEL_PER_TENSOR_PLUGIN",
               "W8A8_SQ_PER_TENSOR_PER_TOKEN_PLUGIN", "FP8", "NVFP4"}
#: PretrainedConfig.__init__ keyword arguments (the rest become attributes via **kwargs)
PRETRAINED_REQUIRED = {"architecture", "dtype", "hidden_size", "num_hidden_layers",
                       "num_attention_heads"}
LLAMA_CONFIG_KW = {"mlp_bias", "attn_bias", "rotary_base", "rotary_scaling", "residual_mlp",
                   "disable_weight_only_quant_plugin", "moe", "remove_duplicated_kv_heads"}
MAPPING_KW = {"world_size", "rank", "gpus_per_node", "cp_size", "tp_size", "pp_size",
              "moe_tp_size", "moe_ep_size", "auto_parallel"}


def _check_config(cfg: dict[str, Any]) -> None:
    QuantConfig = dataclasses.make_dataclass(  # noqa: N806 - mirrors the published class
        "QuantConfig", [(f, Any, dataclasses.field(default=None)) for f in QUANT_CONFIG_FIELDS])
    QuantConfig(**cfg["quantization"])  # unknown keys raise TypeError, as from_dict would
    assert PRETRAINED_REQUIRED <= set(cfg)
    assert cfg["quantization"]["quant_algo"] in QUANT_ALGOS
    assert set(cfg["mapping"]) <= MAPPING_KW
    m = cfg["mapping"]
    assert m["world_size"] == m["tp_size"] * m["pp_size"]
    assert cfg["position_embedding_type"] == "rope_gpt_neox"
    assert cfg["architecture"] in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
    assert cfg["dtype"] in ("float16", "bfloat16")
    json.dumps(cfg)  # plain JSON


@pytest.mark.parametrize(("weight", "act", "algo"), [
    (W4G64, None, "W4A16_AWQ"), (W4G64_SYM, None, "W4A16_AWQ"), (W8, None, "W8A16"),
    (W8, A8, "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN")], ids=["w4a16_asym", "w4a16_sym",
                                                            "w8a16", "w8a8_sq"])
def test_tiny_llama_export_reads_back_to_the_fake_quant_model(
        weight: dict, act: dict | None, algo: str, tmp_path: Path, tiny_llama_w4: Path) -> None:
    model, spy, folder = _export(tiny_llama_w4, tmp_path / "out", weight=weight, act=act)
    cfg = json.loads((folder / "config.json").read_text())
    _check_config(cfg)
    q = cfg["quantization"]
    assert q["quant_algo"] == algo and cfg["architecture"] == "LlamaForCausalLM"
    assert q["has_zero_point"] == (not weight["symmetric"]) and q["pre_quant_scale"] is False
    assert cfg["disable_weight_only_quant_plugin"] == (algo == "W8A16")
    assert sorted(p.name for p in folder.glob("rank*.safetensors")) == ["rank0.safetensors"]
    t = load_file(str(folder / "rank0.safetensors"))
    # no HF names, no llmcq buffers: every tensor has a TensorRT-LLM name
    assert all(k.startswith(("transformer.", "lm_head.")) for k in t), sorted(t)[:5]
    assert t["transformer.layers.0.attention.qkv.weight"].dtype == torch.int8
    if algo == "W4A16_AWQ":
        assert t["transformer.layers.0.mlp.fc.weight"].shape == (128, 128)  # [out/2, in]
        assert t["transformer.layers.0.mlp.fc.weights_scaling_factor"].shape == (256, 2)
        if q["has_zero_point"]:
            assert t["transformer.layers.0.mlp.fc.zero"].shape == (2, 256)  # [in/g, out]
    elif algo == "W8A16":
        assert t["transformer.layers.0.mlp.proj.weight"].shape == (256, 128)  # [in, out]
    else:
        assert t["transformer.layers.0.attention.dense.smoother"].shape == (1, 128)
        assert torch.equal(t["transformer.layers.1.post_layernorm.scale_to_int"],
                           torch.ones(1))
    # every quantized weight reads back to its record (HF fc = gate_proj, gate = up_proj)
    group = q["group_size"]
    pairs = {"attention.dense": "self_attn.o_proj", "mlp.fc": "mlp.gate_proj",
             "mlp.gate": "mlp.up_proj", "mlp.proj": "mlp.down_proj"}
    for i in range(2):
        for trt_name, hf in pairs.items():
            rec = spy.records[f"model.layers.{i}.{hf}"]
            got = dequant(t, f"transformer.layers.{i}.{trt_name}", algo, group)
            ref = rec.dequantize()
            assert torch.allclose(got, ref, rtol=1e-3, atol=1e-3 * ref.abs().max().item()), hf
    sd = to_hf_state(t, cfg)
    ref_model = reader_model(model, sd, act_int8=act is not None)
    x = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = ref_model(input_ids=x).logits, model(input_ids=x).logits
    tol = 0.03 if act is not None else 0.02
    assert (a - b).abs().max().item() <= tol * b.abs().max().item()


def test_qwen2_keeps_qkv_bias_and_architecture(tmp_path: Path, tiny_qwen2_w4: Path) -> None:
    model, spy, folder = _export(tiny_qwen2_w4, tmp_path / "out", weight=W4G64)
    cfg = json.loads((folder / "config.json").read_text())
    _check_config(cfg)
    assert cfg["architecture"] == "Qwen2ForCausalLM" and cfg["qwen_type"] == "qwen2"
    assert cfg["attn_bias"] is True
    t = load_file(str(folder / "rank0.safetensors"))
    assert "transformer.layers.0.attention.qkv.bias" in t
    assert "transformer.layers.0.attention.dense.bias" not in t  # QWen: dense_bias=False
    ref = reader_model(model, to_hf_state(t, cfg))
    x = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a, b = ref(input_ids=x).logits, model(input_ids=x).logits
    assert (a - b).abs().max().item() <= 0.02 * b.abs().max().item()


# --------------------------------------------------------------------------- tensor parallel

def _split_axes(name: str, algo: str) -> int | None:
    """Axis along which TensorRT-LLM's converter splits a tensor across tp ranks (None:
    replicated). Column-parallel: qkv, fc, gate; row-parallel: dense, proj."""
    column = any(f".{m}." in name for m in ("qkv", "fc", "gate"))
    row = any(f".{m}." in name for m in ("dense", "proj"))
    leaf = name.rsplit(".", 1)[1]
    if name == "lm_head.weight":
        return 0
    if not (column or row) or leaf == "scale_to_int":
        return None
    out_axis = {("W4A16_AWQ", "weight"): 0, ("W4A16_AWQ", "weights_scaling_factor"): 0,
                ("W4A16_AWQ", "zero"): 1, ("W8A16", "weight"): 1,
                ("W8A16", "per_channel_scale"): 0, ("SQ", "weight"): 0,
                ("SQ", "per_channel_scale"): 1, ("W4A16_AWQ", "bias"): 0,
                ("W8A16", "bias"): 0, ("SQ", "bias"): 0}
    key = ("SQ" if algo.startswith("W8A8") else algo, leaf)
    if column:
        return out_axis[key]
    in_axis = {("W4A16_AWQ", "weight"): 1, ("W4A16_AWQ", "weights_scaling_factor"): 1,
               ("W4A16_AWQ", "zero"): 0, ("W8A16", "weight"): 0, ("SQ", "weight"): 1,
               ("SQ", "smoother"): 1}
    return in_axis.get(key)  # per-output-channel scales and biases: replicated


@pytest.mark.parametrize(("weight", "act"), [(W4G64, None), (W8, A8)], ids=["w4a16", "w8a8"])
def test_tp2_ranks_concatenate_back_to_tp1(weight: dict, act: dict | None, tmp_path: Path,
                                            tiny_llama_w4: Path) -> None:
    _, _, one = _export(tiny_llama_w4, tmp_path / "tp1", weight=weight, act=act)
    _, _, two = _export(tiny_llama_w4, tmp_path / "tp2", weight=weight, act=act,
                        trt={"tp_size": 2})
    cfg = json.loads((two / "config.json").read_text())
    assert cfg["mapping"] == {"world_size": 2, "tp_size": 2, "pp_size": 1}
    algo = cfg["quantization"]["quant_algo"]
    full = load_file(str(one / "rank0.safetensors"))
    ranks = [load_file(str(two / f"rank{r}.safetensors")) for r in range(2)]
    assert set(ranks[0]) == set(ranks[1]) == set(full)
    h, kv, hd = 4, 2, 32
    for name, ref in full.items():
        axis = _split_axes(name, algo)
        parts = [r[name] for r in ranks]
        if axis is None:
            assert all(torch.equal(p, ref) for p in parts), name
            continue
        if ".qkv." in name:  # each rank holds [q_r, k_r, v_r] along the output axis
            unit = 2 if (algo == "W4A16_AWQ" and name.endswith(".weight")) else 1
            sizes = [h // 2 * hd // unit, kv // 2 * hd // unit, kv // 2 * hd // unit]
            split = [torch.split(p, sizes, dim=axis) for p in parts]
            parts = [split[r][j] for j in range(3) for r in range(2)]
        assert torch.equal(torch.cat(parts, dim=axis), ref), name


def test_pipeline_parallel_splits_layers(tmp_path: Path, tiny_llama_w4: Path) -> None:
    _, _, one = _export(tiny_llama_w4, tmp_path / "pp1", weight=W8, act=A8)
    _, _, two = _export(tiny_llama_w4, tmp_path / "pp2", weight=W8, act=A8,
                        trt={"pp_size": 2})
    full = load_file(str(one / "rank0.safetensors"))
    r0, r1 = (load_file(str(two / f"rank{r}.safetensors")) for r in range(2))
    assert "transformer.vocab_embedding.weight" in r0 and "lm_head.weight" not in r0
    assert "lm_head.weight" in r1 and "transformer.ln_f.weight" in r1
    for name, value in r1.items():  # stage 1's layer 0 is the model's layer 1
        src = name.replace("transformer.layers.0.", "transformer.layers.1.")
        assert torch.equal(value, full[src]), name


# --------------------------------------------------------------------------- refusals

@pytest.mark.parametrize(("weight", "act", "trt", "field"), [
    ({"bit": 3, "symmetric": False, "granularity": "per_group", "group_size": 64}, None, None,
     "quant.weight.bit"),
    ({"bit": 4, "symmetric": False, "granularity": "per_group", "group_size": 32}, None, None,
     "quant.weight.group_size"),
    ({"bit": 4, "symmetric": False, "granularity": "per_group", "group_size": 128}, None,
     {"tp_size": 2}, "quant.weight.group_size"),  # 128 per rank: partial groups
    ({"bit": 4, "symmetric": False, "granularity": "per_channel"}, None, None,
     "quant.weight.granularity"),
    ({"bit": 8, "symmetric": False, "granularity": "per_channel"}, None, None,
     "quant.weight.symmetric"),
    (W8, {"bit": 8, "symmetric": True, "granularity": "per_tensor", "static": True}, None,
     "quant.act"),
    (W8, {"bit": 8, "symmetric": True, "granularity": "per_token", "sym_range": "full"}, None,
     "quant.act.sym_range"),
    (W4G64, None, {"quant_algo": "FP8"}, "save.trtllm_cfg.quant_algo"),
    (W4G64, None, {"kv_cache_quant_algo": "FP8"}, "save.trtllm_cfg.kv_cache_quant_algo"),
    (W4G64, None, {"quant_algo": "W4A16_GPTQ"}, "save.trtllm_cfg.quant_algo"),
    (W4G64, None, {"tp_size": 3}, "save.trtllm_cfg.tp_size"),
    (W4G64, None, {"pp": 2}, "save.trtllm_cfg.pp"),
], ids=["w3", "g32", "g128_tp2_partial", "w4_per_channel", "w8_asym", "static_act", "act_full_range", "fp8",
        "fp8_kv", "gptq_algo", "tp3_heads", "unknown_option"])
def test_unsupported_settings_fail_at_config_time(weight: dict, act: dict | None,
                                                  trt: dict | None, field: str, tmp_path: Path,
                                                  tiny_llama_w4: Path,
                                                  shared_data: Path) -> None:
    with pytest.raises(ConfigError) as err:
        resolve_config(_config(tiny_llama_w4, tmp_path / "o", weight, act=act, trt=trt,
                               data=shared_data))
    assert err.value.path == field, str(err.value)


def test_fp8_weights_are_refused_before_any_backend(tmp_path: Path,
                                                    tiny_llama_w4: Path) -> None:
    cfg = _config(tiny_llama_w4, tmp_path / "o", {**W8, "quant_type": "float-quant",
                                                  "bit": "e4m3"})
    with pytest.raises(ConfigError) as err:
        resolve_config(cfg)
    assert err.value.path == "quant.weight.quant_type"


def test_non_llama_family_is_refused(tmp_path: Path, tiny_opt_dir: Path) -> None:
    with pytest.raises(ConfigError) as err:
        resolve_config(_config(tiny_opt_dir, tmp_path / "o", W8))
    assert err.value.path == "model.type"
    assert "llama" in str(err.value) and "qwen2" in str(err.value)


def test_gptq_act_order_with_dynamic_groups_is_refused(tmp_path: Path, tiny_llama_w4: Path,
                                                       shared_data: Path) -> None:
    with pytest.raises(ConfigError) as err:
        resolve_config(_config(tiny_llama_w4, tmp_path / "o", W4G64, method="gptq",
                               special={"actorder": True, "static_groups": False},
                               data=shared_data))
    assert err.value.path == "quant.special.actorder"
    # core refuses GPTQ's declared g_idx with GPTQ's hint; the backend only declares accepts
    assert "static_groups: True" in str(err.value) and "g_idx" in str(err.value)


def test_existing_output_is_not_overwritten(tmp_path: Path, tiny_llama_w4: Path) -> None:
    _export(tiny_llama_w4, tmp_path / "out", weight=W8)
    with pytest.raises(Exception, match="already exist"):
        resolve_config(_config(tiny_llama_w4, tmp_path / "out", W8))


# --------------------------------------------------------------------------- any algorithm

@pytest.mark.parametrize(("method", "weight", "act", "special"), [
    ("gptq", W4G64, None, {"actorder": True, "static_groups": True}),
    ("awq", W4G64, None, {"trans": True, "trans_version": "v2", "weight_clip": True}),
    ("smoothquant", W8, A8, {"alpha": 0.8}),
], ids=["gptq_static_groups_w4", "awq_w4", "smoothquant_w8a8"])
def test_calibrated_algorithms_export_and_read_back(method: str, weight: dict, act: dict | None,
                                                    special: dict, tmp_path: Path,
                                                    tiny_llama_w4: Path,
                                                    shared_data: Path) -> None:
    model, spy, folder = _export(tiny_llama_w4, tmp_path / "out", weight=weight, act=act,
                                 method=method, special=special, data=shared_data)
    cfg = json.loads((folder / "config.json").read_text())
    _check_config(cfg)
    t = load_file(str(folder / "rank0.safetensors"))
    algo, group = cfg["quantization"]["quant_algo"], cfg["quantization"]["group_size"]
    for name, rec in spy.records.items():  # HF name -> TensorRT-LLM module, by hand
        i, rest = name.split(".")[2], name.split(".", 3)[3]
        trt = {"self_attn.o_proj": "attention.dense", "mlp.gate_proj": "mlp.fc",
               "mlp.up_proj": "mlp.gate", "mlp.down_proj": "mlp.proj"}.get(rest)
        if trt is None:
            continue
        got = dequant(t, f"transformer.layers.{i}.{trt}", algo, group)
        ref = rec.dequantize()
        assert torch.allclose(got, ref, rtol=1e-3, atol=1e-3 * ref.abs().max().item()), name
    back = reader_model(model, to_hf_state(t, cfg), act_int8=act is not None)
    x = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        a, b = back(input_ids=x).logits, model(input_ids=x).logits
    assert (a - b).abs().max().item() <= 0.03 * b.abs().max().item()


def test_fewer_kv_heads_than_ranks_are_repeated(tmp_path: Path, tiny_llama_w4: Path) -> None:
    """tp 4 with 2 key/value heads: rank r holds query heads r and kv head r * 2 // 4, as
    TensorRT-LLM's dup_kv_weight does."""
    _, _, one = _export(tiny_llama_w4, tmp_path / "tp1", weight=W8, act=A8)
    _, _, four = _export(tiny_llama_w4, tmp_path / "tp4", weight=W8, act=A8,
                         trt={"tp_size": 4})
    name = "transformer.layers.0.attention.qkv.weight"
    full = load_file(str(one / "rank0.safetensors"))[name]
    q, k, v = torch.split(full, [128, 64, 64])
    for r in range(4):
        w = load_file(str(four / f"rank{r}.safetensors"))[name]
        kv = r * 2 // 4
        assert w.shape == (96, 128)
        assert torch.equal(w[:32], q[32 * r:32 * (r + 1)])
        assert torch.equal(w[32:64], k[32 * kv:32 * (kv + 1)])
        assert torch.equal(w[64:], v[32 * kv:32 * (kv + 1)])


def test_cli_run_writes_the_checkpoint(tmp_path: Path, tiny_llama_w4: Path, llmcq_cli: Any) -> None:
    import yaml

    cfg = _config(tiny_llama_w4, tmp_path / "save", W4G64_SYM, model_type="Llama")
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = llmcq_cli("run", str(path))
    assert res.returncode == 0, res
    folder = tmp_path / "save" / "trtllm_checkpoint"
    assert {p.name for p in folder.iterdir()} >= {"config.json", "rank0.safetensors",
                                                  "llmcq_export.json", "tokenizer"}
    assert json.loads((folder / "config.json").read_text())["quantization"]["quant_algo"] == \
        "W4A16_AWQ"
    res = llmcq_cli("run", str(path))  # the output exists: refused, nothing replaced
    assert res.returncode != 0 and "exist" in res.output


def test_mistral_w8a8_in_bfloat16(tmp_path: Path, tiny_mistral_dir: Path) -> None:
    model, _, folder = _export(tiny_mistral_dir, tmp_path / "out", weight=W8, act=A8,
                               trt={"dtype": "bfloat16"})
    cfg = json.loads((folder / "config.json").read_text())
    _check_config(cfg)
    assert cfg["architecture"] == "MistralForCausalLM" and cfg["dtype"] == "bfloat16"
    assert cfg["tie_word_embeddings"] is False
    t = load_file(str(folder / "rank0.safetensors"))
    assert t["lm_head.weight"].dtype == torch.bfloat16
    assert not torch.equal(t["lm_head.weight"], t["transformer.vocab_embedding.weight"])
    back = reader_model(model, to_hf_state(t, cfg), act_int8=True)
    x = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        a, b = back(input_ids=x).logits, model(input_ids=x).logits
    assert (a - b).abs().max().item() <= 0.05 * b.abs().max().item()  # bf16 norms and head


def test_weight_only_widths_that_would_be_padded_are_refused(tmp_path: Path,
                                                             tiny_mistral_dir: Path) -> None:
    with pytest.raises(ConfigError) as err:
        resolve_config(_config(tiny_mistral_dir, tmp_path / "o", W8))
    assert err.value.path == "save.save_trtllm" and "mlp=96" in str(err.value)
