"""GPTQ-format packing checked against vectors computed from the published AutoGPTQ source:
``auto_gptq/nn_modules/qlinear/qlinear_cuda.py`` of AutoGPTQ/AutoGPTQ at commit
7c691ed3ec00fb83f75e35bd1b1d9c09114d818f -- ``QuantLinear.pack`` (row-wise OR of
``code << bits * j`` into uint32 words, ``zeros -= 1`` before packing qzeros) and the CPU
branch of ``QuantLinear.forward`` (unpack with shifts and masks, ``zeros + 1``,
``scales[g_idx] * (weight - zeros[g_idx])``). The reference functions below restate those
steps loop by loop; the exporter is vectorised differently, so agreement is a real check.
GPTQModel (which reads v1 by adding 0x11111111-style words back, see its
``convert_gptq_v1_to_v2_format_module``) is not installable CPU-only here (source-only sdist
with kernels), and transformers 5 loads GPTQ only through it, so no library load is run.

Tolerance: the file's weights equal ``record.dequantize()`` with fp16-rounded scales bit for
bit; logits of a model built from them equal llmcq's fake-quant model within 1% of max |logit|
(fp16 scale rounding only).
"""

from __future__ import annotations

import copy
import json
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
from llmcq.quant.qparams import quantize_weight
from llmcq.quant.record import make_record
from llmcq.quant.spec import PerChannel, PerGroup, WeightQuantSpec
from llmcq_gptqformat.export import pack_record
from safetensors.torch import load_file


def _ref_pack_rows(iw: np.ndarray, bits: int, n_out: int) -> np.ndarray:
    """The row loop of AutoGPTQ's ``pack`` (used for qweight rows; qzeros use it transposed)."""
    out = np.zeros((n_out, iw.shape[1]), dtype=np.uint32)
    i = row = 0
    while row < n_out:
        if bits in (2, 4, 8):
            for j in range(i, i + 32 // bits):
                out[row] |= iw[j] << np.uint32(bits * (j - i))
            i += 32 // bits
            row += 1
        else:  # 3 bits: 32 codes in 3 words, codes 10 and 21 split across words
            for j in range(i, i + 10):
                out[row] |= iw[j] << np.uint32(3 * (j - i))
            i += 10
            out[row] |= iw[i] << np.uint32(30)
            row += 1
            out[row] |= (iw[i] >> np.uint32(2)) & np.uint32(1)
            i += 1
            for j in range(i, i + 10):
                out[row] |= iw[j] << np.uint32(3 * (j - i) + 1)
            i += 10
            out[row] |= iw[i] << np.uint32(31)
            row += 1
            out[row] |= (iw[i] >> np.uint32(1)) & np.uint32(3)
            i += 1
            for j in range(i, i + 10):
                out[row] |= iw[j] << np.uint32(3 * (j - i) + 2)
            i += 10
            row += 1
    return out


def ref_pack(intweight_t: np.ndarray, zeros_g: np.ndarray, bits: int) -> tuple[np.ndarray,
                                                                                np.ndarray]:
    """AutoGPTQ's ``pack``: ``intweight_t`` [in, out] unsigned codes, ``zeros_g`` [G, out]."""
    iw = intweight_t.astype(np.uint32)
    qweight = _ref_pack_rows(iw, bits, iw.shape[0] // 32 * bits)
    z = (zeros_g.astype(np.int64) - 1).astype(np.uint32)  # zeros -= 1, then uint32
    qzeros = _ref_pack_rows(z.T.copy(), bits, z.shape[1] // 32 * bits).T
    return qweight.astype(np.int32), np.ascontiguousarray(qzeros).astype(np.int32)


_WF3 = torch.tensor([[0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 0],
                     [0, 1, 4, 7, 10, 13, 16, 19, 22, 25, 28, 31],
                     [0, 2, 5, 8, 11, 14, 17, 20, 23, 26, 29, 0]], dtype=torch.int32)


def _ref_unpack3(words: torch.Tensor) -> torch.Tensor:
    """The 3-bit branch of AutoGPTQ's forward: ``[3n, cols]`` words -> ``[32n, cols]`` codes."""
    w = words.reshape(words.shape[0] // 3, 3, 1, words.shape[1]).expand(-1, -1, 12, -1)
    w = w >> _WF3.view(1, 3, 12, 1)
    w[:, 0, 10] = (w[:, 0, 10] & 0x3) | ((w[:, 1, 0] << 2) & 0x4)
    w[:, 1, 11] = (w[:, 1, 11] & 0x1) | ((w[:, 2, 0] << 1) & 0x6)
    w = w & 0x7
    w = torch.cat([w[:, 0, :11], w[:, 1, 1:12], w[:, 2, 1:11]], dim=1)
    return w.reshape(-1, words.shape[1])


def ref_dequant(t: dict[str, torch.Tensor], bits: int, v1: bool = True) -> torch.Tensor:
    """AutoGPTQ's CPU forward weight: returns ``W`` [out, in] in float32."""
    if bits == 3:
        zeros = _ref_unpack3(t["qzeros"].T.contiguous()).T.reshape(t["scales"].shape)
        weight = _ref_unpack3(t["qweight"])
    else:
        per = 32 // bits
        wf = torch.arange(0, 32, bits, dtype=torch.int32)
        mask = 2**bits - 1
        zeros = torch.bitwise_right_shift(t["qzeros"].unsqueeze(2).expand(-1, -1, per),
                                          wf.view(1, 1, -1)) & mask
        zeros = zeros.reshape(t["scales"].shape)
        weight = torch.bitwise_right_shift(t["qweight"].unsqueeze(1).expand(-1, per, -1),
                                           wf.view(1, -1, 1)) & mask
        weight = weight.reshape(-1, weight.shape[-1])  # [in, out]
    zeros = zeros + (1 if v1 else 0)
    g = t["g_idx"].long()
    w = t["scales"].float()[g] * (weight.float() - zeros.float()[g])
    return w.T.contiguous()


def fp16_scale_dequant(rec: Any) -> torch.Tensor:
    s = rec.scale.half().float()[:, rec.column_groups()]
    z = 0.0 if rec.zero is None else rec.zero[:, rec.column_groups()]
    return (rec.qweight.float() - z) * s


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("gran", [PerGroup(32), PerGroup(40), PerChannel()])  # 40: partial
def test_packing_matches_published_autogptq_pack_and_forward(bits: int, sym: bool,
                                                             gran: Any) -> None:
    spec = WeightQuantSpec(bits=bits, symmetric=sym, granularity=gran)
    w = torch.randn(32, 96, generator=torch.Generator().manual_seed(bits))
    q, qp = quantize_weight(w, spec)
    rec = make_record(q, qp, spec)
    if rec.zero is not None:  # v1 cannot hold a zero of 0; keep these vectors in v1's domain
        rec.zero.clamp_(min=1)
    t, has_zero_zero = pack_record(rec)
    assert not has_zero_zero
    off = 2 ** (bits - 1) if sym else 0
    zeros = (np.full(tuple(rec.scale.shape), off) if rec.zero is None
             else rec.zero.round().long().numpy())
    qweight, qzeros = ref_pack((rec.qweight.long() + off).numpy().T, zeros.T, bits)
    assert np.array_equal(t["qweight"].numpy(), qweight)
    assert np.array_equal(t["qzeros"].numpy(), qzeros)
    assert t["scales"].dtype == torch.float16 and t["scales"].shape == (rec.scale.shape[1], 32)
    assert torch.equal(ref_dequant(t, bits), fp16_scale_dequant(rec))


def test_zero_point_of_zero_is_written_as_v2() -> None:
    spec = WeightQuantSpec(bits=4, symmetric=False, granularity=PerGroup(32))
    w = torch.rand(32, 64, generator=torch.Generator().manual_seed(1))  # all >= 0: zero 0
    q, qp = quantize_weight(w, spec)
    rec = make_record(q, qp, spec)
    assert bool((rec.zero == 0).any())
    t, has_zero_zero = pack_record(rec, v1=False)
    assert has_zero_zero
    assert torch.equal(ref_dequant(t, 4, v1=False), fp16_scale_dequant(rec))


class _Records:
    def __init__(self) -> None:
        self.records: dict[str, Any] = {}

    @llmcq.hookimpl
    def llmcq_export(self, backend: str, records: dict) -> list:
        if backend == "gptq":
            self.records = {k: v.to("cpu") for k, v in records.items()}
        return []


def _config(model: Path, save: Path, weight: dict, method: str = "rtn",
            data: Path | None = None, special: dict | None = None) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "base": {"seed": 0, "device": "cpu"}, "model": {"type": "llama", "path": str(model)},
        "quant": {"method": method, "weight": weight, "special": special or {}},
        "save": {"save_path": str(save), "save_autogptq": True}}
    if data is not None:
        cfg["calib"] = {"name": "wikitext2", "path": str(data / "wikitext2" / "valid.txt"),
                        "n_samples": 4, "seq_len": 64, "preproc": "wikitext2_gptq", "bs": 2}
    return cfg


@pytest.mark.parametrize(("method", "weight", "special"), [
    ("rtn", {"bit": 4, "symmetric": True, "granularity": "per_group", "group_size": 32}, {}),
    ("rtn", {"bit": 8, "symmetric": False, "granularity": "per_channel"}, {}),
    ("gptq", {"bit": 4, "symmetric": False, "granularity": "per_group", "group_size": 32},
     {"actorder": True, "static_groups": False}),
    ("gptq", {"bit": 3, "symmetric": False, "granularity": "per_group", "group_size": 32},
     {"actorder": True, "static_groups": False}),
], ids=["rtn_w4g32_sym", "rtn_w8_channel_asym", "gptq_w4g32_actorder", "gptq_w3g32_actorder"])
def test_tiny_export_dequantizes_to_the_records(method: str, weight: dict, special: dict,
                                               tmp_path: Path, tiny_llama_dir: Path,
                                               shared_data: Path) -> None:
    model, tok = load_pretrained(ModelSource(tiny_llama_dir))
    spy = _Records()
    cfg = _config(tiny_llama_dir, tmp_path / "out", weight, method,
                  shared_data if method == "gptq" else None, special)
    run(resolve_config(cfg), progress=False, model=model, tokenizer=tok, extra_plugins=[spy])
    folder = tmp_path / "out" / "gptq_quant_model"
    qc = json.loads((folder / "quantize_config.json").read_text())
    assert json.loads((folder / "config.json").read_text())["quantization_config"] == qc
    assert qc["bits"] == weight["bit"] and qc["sym"] == weight["symmetric"]
    assert qc["group_size"] == weight.get("group_size", -1)
    assert qc["desc_act"] == (method == "gptq")
    assert (folder / "tokenizer.json").is_file()
    v1 = qc["checkpoint_format"] == "gptq"
    sd = load_file(str(folder / "model.safetensors"))
    assert not any(k.endswith((".weight",)) and ".layers." in k and "proj" in k for k in sd)
    ref_state = model.state_dict()
    for key, value in sd.items():  # embeddings, (transformed) norms: the model's own
        if key in ref_state:
            assert torch.equal(value, ref_state[key]), key
    expected = copy.deepcopy(model)  # transformed norms; linears replaced below
    for name, rec in spy.records.items():
        t = {k: sd[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}
        w = ref_dequant(t, weight["bit"], v1=v1)
        assert torch.equal(w, fp16_scale_dequant(rec)), name
        expected.get_submodule(name).weight.data = w
    if method == "gptq":
        g = sd["model.layers.0.mlp.down_proj.g_idx"]
        assert not torch.equal(g, torch.arange(g.numel(), dtype=torch.int32) // 32)
    x = torch.randint(0, 500, (2, 32), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        a, b = expected(input_ids=x).logits, model(input_ids=x).logits
    assert (a - b).abs().max().item() <= 0.01 * b.abs().max().item()


@pytest.mark.parametrize(("weight", "field"), [
    ({"bit": 5, "symmetric": True, "granularity": "per_group", "group_size": 32},
     "quant.weight.bit"),
    ({"bit": 4, "symmetric": True, "granularity": "per_tensor"}, "quant.weight.granularity"),
    ({"bit": 4, "symmetric": False, "granularity": "per_group", "group_size": 32,
      "round_zp": False}, "quant.weight.round_zp"),
])
def test_unsupported_settings_fail_at_config_time(weight: dict, field: str, tmp_path: Path,
                                                  tiny_llama_dir: Path) -> None:
    with pytest.raises(ConfigError) as err:
        resolve_config(_config(tiny_llama_dir, tmp_path / "o", weight))
    assert err.value.path == field, str(err.value)
