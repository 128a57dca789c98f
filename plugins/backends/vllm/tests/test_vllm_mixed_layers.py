"""Layer-wise mixed precision in the compressed-tensors checkpoint vLLM/SGLang read: one
``config_groups`` scheme per grid with its linears as targets, linears kept in float in
``ignore``; reloaded by transformers + compressed-tensors (each linear decoded by its own
group's scheme, :func:`llmcq_vllm.reload.load_dequantized`), the checkpoint holds the records'
weights bit for bit and gives the fake-quant logits and perplexity."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import llmcq
from llmcq.config.loader import resolve_config
from llmcq.data.datasets import DatasetSpec
from llmcq.eval.ppl import perplexity
from llmcq.model.loading import ModelSource, load_pretrained
from llmcq.pipeline.runner import run
from llmcq.plugins import registry
from llmcq_vllm.reload import load_dequantized

W4 = {"bit": 4, "symmetric": False, "granularity": "per_group", "group_size": 32}
W8 = {"bit": 8, "symmetric": True, "granularity": "per_channel"}
DOWN = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
FLOAT = ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj",
         "model.layers.1.self_attn.o_proj"]


class _Records:
    @llmcq.hookimpl
    def llmcq_evaluate(self, run: Any) -> list:
        self.records = dict(run.records)
        return []


def _run(model_dir: Path, data: Path, out: Path, flag: str) -> tuple[Any, Any, dict, dict]:
    cfg = {"base": {"seed": 0, "device": "cpu"},
           "model": {"type": "llama", "path": str(model_dir)},
           "eval": {"eval_pos": ["fake_quant"], "name": "wikitext2",
                    "path": str(data / "wikitext2" / "test.txt"), "seq_len": 64,
                    "num_samples": 3},
           "quant": {"method": "rtn", "weight": W4, "mix_bits": {
               "setting_0": {"layer_name": ["down_proj"], "weight": W8},
               "setting_1": {"layer_name": ["o_proj#1"], "do_quant": False}}},
           "ignored_layers": {"block_ids": [0], "layer_names": ["mlp.gate_proj", "mlp.up_proj"]},
           "save": {"save_path": str(out), flag: True, "save_fake": True}}
    model, tok = load_pretrained(ModelSource(model_dir))
    original = {k: v.clone() for k, v in model.state_dict().items()}
    spy = _Records()
    results = run(resolve_config(cfg), progress=False, model=model, tokenizer=tok,
                  extra_plugins=[spy])
    return model, tok, spy.records, {"results": results, "original": original}


@pytest.mark.parametrize("flag, folder", [("save_vllm", "vllm_quant_model"),
                                          ("save_sgl", "sgl_quant_model")])
def test_mixed_layers_export_and_reload(flag: str, folder: str, tiny_llama_dir: Path,
                                        shared_data: Path, tmp_path: Path) -> None:
    model, tok, records, extra = _run(tiny_llama_dir, shared_data, tmp_path / "out", flag)
    path = tmp_path / "out" / folder
    assert set(records) == {f"model.layers.{i}.{n}" for i in range(2) for n in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")} - set(FLOAT)

    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    groups = list(qc["config_groups"].values())
    assert len(groups) == 2
    by_bits = {g["weights"]["num_bits"]: g for g in groups}
    assert sorted(by_bits[8]["targets"]) == DOWN
    assert by_bits[8]["weights"]["strategy"] == "channel" and by_bits[8]["weights"]["symmetric"]
    assert sorted(by_bits[4]["targets"]) == sorted(set(records) - set(DOWN))
    assert by_bits[4]["weights"]["group_size"] == 32
    assert sorted(qc["ignore"]) == sorted(["lm_head", *FLOAT])

    deq = load_dequantized(path)
    for name, rec in records.items():
        assert torch.equal(deq.get_submodule(name).weight, rec.dequantize().float()), name
    for name in FLOAT:
        assert torch.equal(deq.get_submodule(name).weight,
                           extra["original"][f"{name}.weight"].float()), name
    x = torch.randint(0, 500, (2, 32), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        theirs, ours = deq(input_ids=x).logits, model(input_ids=x).logits
    assert (theirs - ours).abs().max().item() <= 1e-5

    # the fake-quant perplexity of results.json, from the reloaded checkpoint
    dspec, _ = registry.load_spec("llmcq.datasets", "wikitext2", field="eval.name",
                                  kind=DatasetSpec)
    ids = dspec.evaluation_ids(tok, str(shared_data / "wikitext2" / "test.txt"), 64)
    ppl, n = perplexity(deq, ids, 64, max_windows=3, progress=False)
    fake = extra["results"]["eval"]["fake_quant"]["wikitext2"]
    assert n == fake["windows"] == 3
    assert ppl == pytest.approx(fake["ppl"], rel=1e-5)


def test_mixed_weight_activation_schemes_are_written_per_group(tiny_llama_dir: Path,
                                                                 tmp_path: Path) -> None:
    """W8A8 with a W4A8 setting and a weight-only one: one scheme each, with its own
    input activations (none for the weight-only linears)."""
    act = {"bit": 8, "symmetric": True, "granularity": "per_token"}
    cfg = {"base": {"seed": 0, "device": "cpu"},
           "model": {"type": "llama", "path": str(tiny_llama_dir)},
           "quant": {"method": "rtn", "weight": W8, "act": act, "mix_bits": {
               "setting_0": {"layer_name": ["down_proj"], "weight": {**W8, "bit": 4},
                             "act": act},
               "setting_1": {"layer_name": ["o_proj"], "weight": W8}}},
           "save": {"save_path": str(tmp_path / "out"), "save_vllm": True}}
    run(resolve_config(cfg), progress=False)
    qc = json.loads((tmp_path / "out" / "vllm_quant_model" / "config.json").read_text())
    qc = qc["quantization_config"]
    schemes = {(g["weights"]["num_bits"], g["input_activations"] is not None):
               sorted(g["targets"]) for g in qc["config_groups"].values()}
    assert schemes[(4, True)] == DOWN
    assert schemes[(8, False)] == [f"model.layers.{i}.self_attn.o_proj" for i in range(2)]
    assert len(schemes[(8, True)]) == 10
    assert qc["format"] == "mixed-precision"
