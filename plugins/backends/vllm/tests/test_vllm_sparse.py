"""Pruned models through save_vllm / save_sgl (dense compressed-tensors layouts, pruned weights
stored as the codes of exact zero; see llmcq_vllm.sparse for why no sparse format): reloaded
by transformers + compressed-tensors, the zeros are exactly the pruned weights (2:4 groups
intact), the weights are the fake-quant model's bit for bit, the logits and the perplexity
are the in-process ones; a pruned float model exports as it is."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from llmcq.config.loader import resolve_config
from llmcq.errors import ConfigError
from llmcq.model.hf_io import save_hf_folder
from llmcq.model.loading import ModelSource, load_pretrained
from llmcq.pipeline.runner import run
from llmcq.sparsity import NM
from llmcq.sparsity.masks import structure_violations

W4G32A = {"bit": 4, "symmetric": False, "granularity": "per_group", "group_size": 32}
W8CHS = {"bit": 8, "symmetric": True, "granularity": "per_channel"}


def _config(model: Path, data: Path, save: Path, weight: dict[str, Any],
            quant: dict[str, Any] | None, **flags: bool) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "base": {"seed": 0, "device": "cpu"},
        "model": {"type": "llama", "path": str(model)},
        "eval": {"eval_pos": ["transformed"] + (["fake_quant"] if quant else []),
                 "name": "wikitext2", "path": str(data / "wikitext2" / "test.txt"),
                 "seq_len": 64, "bs": 2, "num_samples": 4},
        "sparse": {"method": "magnitude", "weight": weight},
        "save": {"save_path": str(save), **flags},
    }
    if quant is not None:
        cfg["quant"] = quant
    return cfg


def _linears(model: Any) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and ".layers." in n}


def _ids() -> torch.Tensor:
    return torch.randint(0, 500, (2, 40), generator=torch.Generator().manual_seed(3))


def _ppl(folder: Path, data: Path, save: Path) -> float:
    cfg = {"base": {"seed": 0, "device": "cpu"}, "model": {"type": "llama", "path": str(folder)},
           "eval": {"eval_pos": ["pretrain"], "name": "wikitext2",
                    "path": str(data / "wikitext2" / "test.txt"), "seq_len": 64, "bs": 2,
                    "num_samples": 4},
           "save": {"save_path": str(save)}}
    return run(resolve_config(cfg), progress=False)["eval"]["pretrain"]["wikitext2"]["ppl"]


@pytest.mark.parametrize("structure,weight,fmt", [("2:4", W4G32A, "pack-quantized"),
                                                  ("unstructured", W8CHS, "pack-quantized")])
def test_sparse_quantized_export_reloads_with_the_zeros_weights_logits_and_ppl(
        structure: str, weight: dict[str, Any], fmt: str, tiny_llama_dir: Path,
        shared_data: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    sparse = {"mask_structure": structure} if structure != "unstructured" else {"sparsity": 0.5}
    out = tmp_path / "o"
    res = run(resolve_config(_config(tiny_llama_dir, shared_data, out, sparse,
                                     {"method": "rtn", "weight": weight}, save_trans=True,
                                     save_fake=True, save_vllm=True)), progress=False)
    folder = out / "vllm_quant_model"
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qc["format"] == fmt and not qc.get("sparsity_config")  # none written
    assert set(res["compression"]["export_bytes"]) == {"trans", "fake", "vllm"}
    assert all(v > 0 for v in res["compression"]["export_bytes"].values())

    pruned = {n: m.weight == 0 for n, m in _linears(
        AutoModelForCausalLM.from_pretrained(str(out / "transformed_model"))).items()}
    fake = AutoModelForCausalLM.from_pretrained(str(out / "fake_quant_model")).eval()
    deq = AutoModelForCausalLM.from_pretrained(
        str(folder), quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
    zeros = total = 0
    for name, lin in _linears(deq).items():
        w = lin.weight
        assert torch.equal(w, fake.get_submodule(name).weight), name
        assert (w[pruned[name]] == 0).all(), name  # every pruned weight is an exact zero
        assert int(pruned[name].sum()) == w.numel() // 2, name
        if structure == "2:4":
            assert structure_violations(w != 0, NM(2, 4)) == 0, name
        zeros += int((w == 0).sum())
        total += w.numel()
    # compression.sparsity: the measured zeros of the pruned linears (kept weights that
    # round to zero included), the same count in the reloaded checkpoint
    assert res["compression"]["sparsity"] == pytest.approx(zeros / total, abs=1e-6)
    assert res["compression"]["mask_sparsity"] == 0.5
    x = _ids()
    with torch.no_grad():
        assert (deq(input_ids=x).logits - fake(input_ids=x).logits).abs().max() <= 1e-5
    if structure == "2:4":  # perplexity of the reloaded checkpoint, through a plain folder
        plain = tmp_path / "plain"
        plain.mkdir()
        save_hf_folder(deq, None, plain)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            (plain / f).write_bytes((folder / f).read_bytes())
        ppl = _ppl(plain, shared_data, tmp_path / "p")
        assert ppl == pytest.approx(res["eval"]["fake_quant"]["wikitext2"]["ppl"], rel=1e-5)


def test_pruned_float_model_exports_as_it_is(tiny_llama_dir: Path, shared_data: Path,
                                            tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model, tok = load_pretrained(ModelSource(tiny_llama_dir))
    out = tmp_path / "o"
    res = run(resolve_config(_config(tiny_llama_dir, shared_data, out, {"sparsity": 0.5}, None,
                                     save_vllm=True, save_sgl=True)),
              progress=False, model=model, tokenizer=tok)
    x = _ids()
    for sub in ("vllm_quant_model", "sgl_quant_model"):
        cfg = json.loads((out / sub / "config.json").read_text())
        assert "quantization_config" not in cfg
        saved = AutoModelForCausalLM.from_pretrained(str(out / sub)).eval()
        lin = _linears(saved)
        zeros = sum(int((m.weight == 0).sum()) for m in lin.values())
        assert zeros / sum(m.weight.numel() for m in lin.values()) == pytest.approx(
            res["compression"]["sparsity"], abs=1e-6)
        with torch.no_grad():
            torch.testing.assert_close(saved(input_ids=x).logits, model(input_ids=x).logits,
                                       rtol=0, atol=1e-6)


def test_lightllm_still_needs_w8a8_for_a_pruned_model(tiny_llama_dir: Path, shared_data: Path,
                                                      tmp_path: Path) -> None:
    cfg = _config(tiny_llama_dir, shared_data, tmp_path / "o", {"sparsity": 0.5}, None,
                  save_lightllm=True)
    with pytest.raises(ConfigError) as err:
        resolve_config(cfg)
    assert err.value.path == "save.save_lightllm" and "quant.weight" in str(err.value)


def test_fp8_codes_of_pruned_weights_are_zero() -> None:
    """The FP8 path (sparse steps refuse float-quant grids today, so no run reaches it):
    pruned weights are written as FP8 zero, the kept codes as the record holds them."""
    from llmcq.quant.rtn import rtn_records
    from llmcq.quant.spec import PerChannel, WeightQuantSpec
    from llmcq.sparsity.masks import nm_mask
    from llmcq_vllm.export import compress_record

    lin = torch.nn.Linear(32, 8, bias=False)
    spec = WeightQuantSpec(bits=8, symmetric=True, granularity=PerChannel(), fmt="e4m3")
    rec = rtn_records({"l": lin}, spec)["l"]
    rec.mask = nm_mask(lin.weight.abs(), 2, 4)
    tensors, fmt, _w, _i = compress_record(rec, torch.float32)
    codes = tensors["weight"]
    assert fmt == "float-quantized" and codes.dtype == torch.float8_e4m3fn
    assert (codes.float()[~rec.mask] == 0).all()
    assert torch.equal(codes.float()[rec.mask], rec.qweight.float()[rec.mask])
