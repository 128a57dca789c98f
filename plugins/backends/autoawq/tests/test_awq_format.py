"""AutoAWQ GEMM packing checked against vectors computed from the published AutoAWQ source:
``awq/modules/linear/gemm.py`` (casper-hansen/AutoAWQ commit
d9dc8e564fed1527be2a9d8d5c74daf3823c3203, ``WQLinear_GEMM.from_linear``: for each word
``col``, ``qweight[:, col] |= intweight[:, col * 8 + order_map[i]] << (4 * i)`` with
``order_map = [0, 2, 4, 6, 1, 3, 5, 7]``, zeros packed the same way) and
``awq/utils/packing_utils.py`` (commit 958d6048b7be87e21d54717c0420349b5f2eaf2d,
``dequantize_gemm``: unpack with shifts, reorder with ``AWQ_REVERSE_ORDER``, mask,
``(iweight - izeros) * scales`` repeated over each group). The reference functions below
restate those loops; the exporter is vectorised differently. AutoAWQ itself (CUDA kernels,
archived) and transformers' AWQ path (needs it or GPTQModel) do not install CPU-only here, so
no library load is run; MLC-LLM reads the same files (llmc's ``save_mlcllm`` is this layout).

Tolerance: file weights equal ``record.dequantize()`` with fp16 scales bit for bit; logits of
a model built from them equal llmcq's fake-quant model within 1% of max |logit|.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import llmcq
import pytest
import torch
from llmcq.config.loader import resolve_config
from llmcq.errors import ConfigError
from llmcq.model.loading import ModelSource, load_pretrained
from llmcq.pipeline.runner import run
from llmcq.quant.qparams import quantize_weight
from llmcq.quant.record import make_record
from llmcq.quant.spec import PerChannel, PerGroup, WeightQuantSpec
from llmcq_autoawq.export import pack_record
from safetensors.torch import load_file

ORDER_MAP = [0, 2, 4, 6, 1, 3, 5, 7]
REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]


def ref_pack(intweight: torch.Tensor) -> torch.Tensor:
    """from_linear's loop: ``intweight`` [rows, cols] unsigned 4-bit -> int32 [rows, cols/8]."""
    iw = intweight.to(torch.int32)
    out = torch.zeros((iw.shape[0], iw.shape[1] // 8), dtype=torch.int32)
    for col in range(iw.shape[1] // 8):
        for i in range(8):
            out[:, col] |= iw[:, col * 8 + ORDER_MAP[i]] << (i * 4)
    return out


def ref_dequant(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                group: int) -> torch.Tensor:
    """dequantize_gemm: returns ``W^T`` [in, out] in float32."""
    shifts = torch.arange(0, 32, 4)
    iw = torch.bitwise_right_shift(qweight[:, :, None], shifts[None, None, :]).to(torch.int8)
    iw = iw.view(iw.shape[0], -1)
    iz = torch.bitwise_right_shift(qzeros[:, :, None], shifts[None, None, :]).to(torch.int8)
    iz = iz.view(iz.shape[0], -1)
    order = torch.arange(iw.shape[-1]).view(-1, 8)[:, REVERSE_ORDER].view(-1)
    iw, iz = iw[:, order] & 15, iz[:, order] & 15
    s = scales.float().repeat_interleave(group, dim=0)
    return (iw.float() - iz.float().repeat_interleave(group, dim=0)) * s


def fp16_scale_dequant(rec: Any) -> torch.Tensor:
    s = rec.scale.half().float()[:, rec.column_groups()]
    z = 0.0 if rec.zero is None else rec.zero[:, rec.column_groups()]
    return (rec.qweight.float() - z) * s


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("gran", [PerGroup(32), PerChannel()])
def test_packing_matches_published_autoawq(sym: bool, gran: Any) -> None:
    spec = WeightQuantSpec(bits=4, symmetric=sym, granularity=gran)
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(3))
    q, qp = quantize_weight(w, spec)
    rec = make_record(q, qp, spec)
    t = pack_record(rec)
    off = 8 if sym else 0
    zeros = (torch.full(tuple(rec.scale.shape), off) if rec.zero is None
             else rec.zero.round().long())
    assert torch.equal(t["qweight"], ref_pack((rec.qweight.long() + off).T))
    assert torch.equal(t["qzeros"], ref_pack(zeros.T))
    assert t["qweight"].shape == (64, 6) and t["scales"].dtype == torch.float16
    group = gran.size if isinstance(gran, PerGroup) else 64
    got = ref_dequant(t["qweight"], t["qzeros"], t["scales"], group)
    assert torch.equal(got.T, fp16_scale_dequant(rec))


class _Records:
    def __init__(self) -> None:
        self.records: dict[str, Any] = {}

    @llmcq.hookimpl
    def llmcq_export(self, backend: str, records: dict) -> list:
        if backend == "autoawq":
            self.records = {k: v.to("cpu") for k, v in records.items()}
        return []


def _config(model: Path, save: Path, weight: dict, method: str = "rtn",
            data: Path | None = None) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "base": {"seed": 0, "device": "cpu"}, "model": {"type": "llama", "path": str(model)},
        "quant": {"method": method, "weight": weight},
        "save": {"save_path": str(save), "save_autoawq": True, "save_mlcllm": True}}
    if data is not None:
        cfg["calib"] = {"name": "wikitext2", "path": str(data / "wikitext2" / "valid.txt"),
                        "n_samples": 4, "seq_len": 64, "preproc": "wikitext2_gptq", "bs": 2}
    return cfg


@pytest.mark.parametrize(("method", "weight"), [
    ("rtn", {"bit": 4, "symmetric": True, "granularity": "per_group", "group_size": 32}),
    ("awq", {"bit": 4, "symmetric": False, "granularity": "per_group", "group_size": 32}),
], ids=["rtn_w4g32_sym", "awq_w4g32_asym"])
def test_tiny_export_dequantizes_to_the_records(method: str, weight: dict, tmp_path: Path,
                                               tiny_llama_dir: Path,
                                               shared_data: Path) -> None:
    model, tok = load_pretrained(ModelSource(tiny_llama_dir))
    spy = _Records()
    cfg = _config(tiny_llama_dir, tmp_path / "out", weight, method,
                  shared_data if method == "awq" else None)
    run(resolve_config(cfg), progress=False, model=model, tokenizer=tok, extra_plugins=[spy])
    folder = tmp_path / "out" / "autoawq_quant_model"
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "awq" and qc["version"] == "gemm" and qc["bits"] == 4
    assert qc["group_size"] == 32 and qc["zero_point"] is True
    mlc = tmp_path / "out" / "mlcllm_quant_model"
    assert (mlc / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()
    sd = load_file(str(folder / "model.safetensors"))
    ref_state = model.state_dict()
    for key, value in sd.items():  # embeddings, (transformed) norms: the model's own
        if key in ref_state:
            assert torch.equal(value, ref_state[key]), key
    expected = copy.deepcopy(model)  # transformed norms; linears replaced below
    for name, rec in spy.records.items():
        w = ref_dequant(sd[f"{name}.qweight"], sd[f"{name}.qzeros"], sd[f"{name}.scales"],
                        32).T
        assert torch.equal(w, fp16_scale_dequant(rec)), name
        expected.get_submodule(name).weight.data = w.contiguous()
    x = torch.randint(0, 500, (2, 32), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        a, b = expected(input_ids=x).logits, model(input_ids=x).logits
    assert (a - b).abs().max().item() <= 0.01 * b.abs().max().item()


@pytest.mark.parametrize(("weight", "field"), [
    ({"bit": 3, "symmetric": False, "granularity": "per_group", "group_size": 32},
     "quant.weight.bit"),
    ({"bit": 8, "symmetric": False, "granularity": "per_group", "group_size": 32},
     "quant.weight.bit"),
    ({"bit": 4, "symmetric": False, "granularity": "per_group", "group_size": 64},
     "quant.weight.group_size"),  # 160 % 64: partial groups
    ({"bit": 4, "symmetric": False, "granularity": "per_tensor"}, "quant.weight.granularity"),
])
def test_unsupported_settings_fail_at_config_time(weight: dict, field: str, tmp_path: Path,
                                                  tiny_llama_dir: Path) -> None:
    with pytest.raises(ConfigError) as err:
        resolve_config(_config(tiny_llama_dir, tmp_path / "o", weight))
    assert err.value.path == field, str(err.value)
