"""Layer-wise mixed precision in GGUF: every tensor of a GGUF file has its own type, so each
linear is written in the llama.cpp type of its own grid (Q4_1 for the global W4 g32 asym,
Q8_0 for a W8 g32 sym setting) and linears kept in float as F32; read back by the ``gguf``
package and by transformers' GGUF loader. Grids no llama.cpp type holds are refused at the
setting's key."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import llmcq
import pytest
import torch
from llmcq.config.loader import resolve_config
from llmcq.errors import ConfigError
from llmcq.model.loading import ModelSource, load_pretrained
from llmcq.pipeline.runner import run

Q4_1 = {"bit": 4, "symmetric": False, "granularity": "per_group", "group_size": 32}
Q8_0 = {"bit": 8, "symmetric": True, "granularity": "per_group", "group_size": 32}


class _Records:
    @llmcq.hookimpl
    def llmcq_export(self, backend: str, records: dict) -> list:
        if backend == "gguf":
            self.records = {k: v.to("cpu") for k, v in records.items()}
        return []


def _config(model: Path, save: Path, setting: dict) -> dict[str, Any]:
    return {"base": {"seed": 0, "device": "cpu"}, "model": {"type": "llama", "path": str(model)},
            "quant": {"method": "rtn", "weight": Q4_1, "mix_bits": {
                "setting_0": {"layer_name": ["down_proj"], "weight": setting},
                "setting_1": {"layer_name": ["o_proj#1"], "do_quant": False}}},
            "save": {"save_path": str(save), "save_gguf": True}}


def _gguf_weight(rec: Any) -> torch.Tensor:
    """What llama.cpp computes from the stored blocks: fp16 d (and m)."""
    s = rec.scale.half().float()[:, rec.column_groups()]
    if rec.zero is None:
        return rec.qweight.float() * s
    m = (-rec.zero * rec.scale).half().float()[:, rec.column_groups()]
    return s * rec.qweight.float() + m


def test_each_linear_in_its_own_type(tmp_path: Path, tiny_llama_dir: Path) -> None:
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM

    model, tok = load_pretrained(ModelSource(tiny_llama_dir))
    float_model = copy.deepcopy(model)
    spy = _Records()
    run(resolve_config(_config(tiny_llama_dir, tmp_path / "out", Q8_0)), progress=False,
        model=model, tokenizer=tok, extra_plugins=[spy])
    folder = tmp_path / "out" / "gguf_quant_model"
    path = folder / "model-mixed.gguf"
    assert sorted(p.name for p in folder.iterdir()) == [path.name]

    reader = GGUFReader(str(path))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    for i in range(2):
        assert types[f"blk.{i}.ffn_down.weight"] == "Q8_0"
        assert types[f"blk.{i}.ffn_gate.weight"] == types[f"blk.{i}.attn_q.weight"] == "Q4_1"
    assert types["blk.0.attn_output.weight"] == "Q4_1"
    assert types["blk.1.attn_output.weight"] == "F32"  # kept in float
    assert "model.layers.1.self_attn.o_proj" not in spy.records

    loaded = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=path.name)
    expected = copy.deepcopy(float_model)
    for name, rec in spy.records.items():
        expected.get_submodule(name).weight.data = _gguf_weight(rec)
    o1 = "model.layers.1.self_attn.o_proj"
    assert torch.equal(loaded.get_submodule(o1).weight, float_model.get_submodule(o1).weight)
    x = torch.randint(0, 500, (2, 32), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        got = loaded(input_ids=x).logits
        exp = expected(input_ids=x).logits
        ours = model(input_ids=x).logits
    assert (got - exp).abs().max().item() <= 1e-4
    assert (got - ours).abs().max().item() <= 0.02 * ours.abs().max().item()


@pytest.mark.parametrize("setting, field", [
    ({**Q8_0, "symmetric": False}, "quant.mix_bits.setting_0.weight.symmetric"),
    ({**Q8_0, "group_size": 64}, "quant.mix_bits.setting_0.weight.group_size"),
    ({**Q4_1, "bit": 3}, "quant.mix_bits.setting_0.weight.bit"),
])
def test_a_setting_no_llama_cpp_type_holds_is_refused(setting: dict, field: str,
                                                      tmp_path: Path,
                                                      tiny_llama_dir: Path) -> None:
    with pytest.raises(ConfigError) as err:
        resolve_config(_config(tiny_llama_dir, tmp_path / "out", setting))
    assert err.value.path == field, str(err.value)
    assert "gguf" in str(err.value)
