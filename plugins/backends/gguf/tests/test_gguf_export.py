"""GGUF exports verified with the real readers: the ``gguf`` package (read back and dequantize
with ``gguf.quants``) and ``transformers`` (``from_pretrained(folder, gguf_file=...)``).

Exactness: Q4_0/Q8_0 store ``d = fp16(scale)``, so ``gguf.quants.dequantize`` equals
``record.dequantize()`` bit for bit whenever the record's scales are fp16 values, and equals
the record with its scales rounded to fp16 bit for bit always. Q4_1 stores ``d`` and
``m = -zero * scale`` in fp16 and llama.cpp computes ``d * q + m``; the file equals that
formula bit for bit and ``record.dequantize()`` within fp16 rounding (|diff| <= 2^-10 of the
group's range). Loaded by transformers, the exported model's logits equal a float model built
from those fp16-rounded weights within 1e-4 (fp32 summation order), and llmcq's in-process
fake-quant model within 2% of max |logit| (the fp16 rounding, measured 0.2%).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import llmcq
import numpy as np
import pytest
import torch
from llmcq.config.loader import resolve_config
from llmcq.errors import ConfigError
from llmcq.model.loading import ModelSource, load_pretrained
from llmcq.pipeline.runner import run
from llmcq.quant.qparams import QParams, quantize_weight
from llmcq.quant.record import make_record
from llmcq.quant.spec import PerGroup, WeightQuantSpec
from llmcq_gguf.export import pack_record, rope_row_permutation

TYPES = {"Q8_0": (8, True), "Q4_0": (4, True), "Q4_1": (4, False)}


def gguf_weight(rec: Any) -> torch.Tensor:
    """What llama.cpp computes from the stored blocks, in torch: fp16 d (and m)."""
    s = rec.scale.half().float()[:, rec.column_groups()]
    q = rec.qweight.float()
    if rec.zero is None:
        return q * s
    m = (-rec.zero * rec.scale).half().float()[:, rec.column_groups()]
    return s * q + m


def dequantize_blocks(blocks: np.ndarray, gtype: str, shape: tuple[int, int]) -> torch.Tensor:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    return torch.from_numpy(dequantize(blocks, GGMLQuantizationType[gtype]).reshape(shape))


@pytest.mark.parametrize("gtype", list(TYPES))
def test_blocks_dequantize_bit_for_bit(gtype: str) -> None:
    bits, sym = TYPES[gtype]
    spec = WeightQuantSpec(bits=bits, symmetric=sym, granularity=PerGroup(32))
    w = torch.randn(24, 96, generator=torch.Generator().manual_seed(0))
    q, qp = quantize_weight(w, spec)
    rec = make_record(q, qp, spec)
    blocks, got_type = pack_record(rec)
    assert got_type == gtype and blocks.dtype == np.uint8
    assert blocks.shape == (24, 3 * {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}[gtype])
    deq = dequantize_blocks(blocks, gtype, (24, 96))
    assert torch.equal(deq, gguf_weight(rec))
    tol = (rec.scale.abs().max() * 2 ** (bits - 10)).item()
    assert (deq - rec.dequantize()).abs().max().item() <= tol
    if gtype != "Q4_1":  # fp16-exact scales: the record itself, bit for bit
        rec16 = make_record(q, QParams(qp.scale.half().float(), None), spec)
        assert torch.equal(dequantize_blocks(pack_record(rec16)[0], gtype, (24, 96)),
                           rec16.dequantize())


def test_rope_permutation_is_llama_cpp_order() -> None:
    # 2 heads of dim 4: HF halves [0 1 | 2 3] -> llama.cpp pairs [0 2 1 3]
    assert rope_row_permutation(8, 2).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


class _Records:
    def __init__(self) -> None:
        self.records: dict[str, Any] = {}

    @llmcq.hookimpl
    def llmcq_export(self, backend: str, records: dict) -> list:
        if backend == "gguf":
            self.records = {k: v.to("cpu") for k, v in records.items()}
        return []


def _config(model: Path, save: Path, bits: int, sym: bool, **extra: Any) -> dict[str, Any]:
    return {"base": {"seed": 0, "device": "cpu"}, "model": {"type": "llama", "path": str(model)},
            "quant": {"method": "rtn", "weight": {"bit": bits, "symmetric": sym,
                                                  "granularity": "per_group", "group_size": 32,
                                                  **extra}},
            "save": {"save_path": str(save), "save_gguf": True}}


@pytest.mark.parametrize("gtype", list(TYPES))
def test_tiny_export_reads_back_and_loads_in_transformers(gtype: str, tmp_path: Path,
                                                          tiny_llama_dir: Path) -> None:
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bits, sym = TYPES[gtype]
    model, tok = load_pretrained(ModelSource(tiny_llama_dir))
    float_model = copy.deepcopy(model)
    spy = _Records()
    run(resolve_config(_config(tiny_llama_dir, tmp_path / "out", bits, sym)), progress=False,
        model=model, tokenizer=tok, extra_plugins=[spy])
    folder = tmp_path / "out" / "gguf_quant_model"
    path = folder / f"model-{gtype}.gguf"
    assert sorted(p.name for p in folder.iterdir()) == [path.name]

    reader = GGUFReader(str(path))
    fields = reader.fields
    for key in ("llama.block_count", "llama.embedding_length", "llama.attention.head_count_kv",
                "tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                "general.file_type"):
        assert key in fields, key
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors  # tied head
    c = float_model.config
    for name, rec in spy.records.items():
        layer, _, proj = name.removeprefix("model.layers.").partition(".")
        gname = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                 "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down"}[proj]
        t = tensors[f"blk.{layer}.{gname}.weight"]
        assert t.tensor_type.name == gtype
        deq = dequantize_blocks(np.asarray(t.data), gtype, (rec.out_features, rec.in_features))
        if proj in ("self_attn.q_proj", "self_attn.k_proj"):  # undo llama.cpp's row order
            heads = c.num_attention_heads if "q_proj" in proj else c.num_key_value_heads
            deq = deq[torch.argsort(rope_row_permutation(rec.out_features, heads))]
        assert torch.equal(deq, gguf_weight(rec)), name

    loaded = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=path.name)
    expected = copy.deepcopy(float_model)
    for name, rec in spy.records.items():
        expected.get_submodule(name).weight.data = gguf_weight(rec)
    x = torch.randint(0, 500, (2, 32), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        got = loaded(input_ids=x).logits
        exp = expected(input_ids=x).logits
        ours = model(input_ids=x).logits  # llmcq's in-process fake-quant model
    assert (got - exp).abs().max().item() <= 1e-4
    assert (got - ours).abs().max().item() <= 0.02 * ours.abs().max().item()

    text = "The quick brown fox jumps over the lazy dog, said the tower in 1889."
    gtok = AutoTokenizer.from_pretrained(str(folder), gguf_file=path.name)
    assert gtok(text).input_ids[-8:] == tok(text).input_ids[-8:]


@pytest.mark.parametrize(("weight", "act", "field"), [
    ({"bit": 3, "symmetric": False, "granularity": "per_group", "group_size": 32}, None,
     "quant.weight.bit"),
    ({"bit": 8, "symmetric": False, "granularity": "per_group", "group_size": 32}, None,
     "quant.weight.symmetric"),
    ({"bit": 4, "symmetric": False, "granularity": "per_group", "group_size": 64}, None,
     "quant.weight.group_size"),
    ({"bit": 4, "symmetric": True, "granularity": "per_channel"}, None,
     "quant.weight.granularity"),
    ({"bit": 8, "symmetric": True, "granularity": "per_group", "group_size": 32},
     {"bit": 8, "symmetric": True, "granularity": "per_token"}, "quant.act"),
])
def test_unsupported_settings_fail_at_config_time(weight: dict, act: dict | None, field: str,
                                                  tmp_path: Path, tiny_llama_dir: Path) -> None:
    cfg = _config(tiny_llama_dir, tmp_path / "o", 4, True)
    cfg["quant"]["weight"] = weight
    if act:
        cfg["quant"]["act"] = act
    with pytest.raises(ConfigError) as err:
        resolve_config(cfg)
    assert err.value.path == field, str(err.value)


def test_gptq_act_order_needs_static_groups(tmp_path: Path, tiny_llama_dir: Path,
                                            shared_data: Path) -> None:
    cfg = _config(tiny_llama_dir, tmp_path / "o", 4, True)
    cfg["quant"]["method"] = "gptq"
    cfg["calib"] = {"name": "wikitext2", "path": str(shared_data / "wikitext2" / "valid.txt"),
                    "n_samples": 4, "seq_len": 64}
    with pytest.raises(ConfigError) as err:
        resolve_config(cfg)
    assert err.value.path == "quant.special.actorder"
    # core refuses GPTQ's declared g_idx with GPTQ's hint; the backend only declares accepts
    assert "static_groups: True" in str(err.value) and "g_idx" in str(err.value)
    cfg["quant"]["special"] = {"static_groups": True}
    resolve_config(cfg)
