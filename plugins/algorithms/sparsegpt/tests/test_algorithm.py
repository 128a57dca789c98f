"""SparseGPT through the pipeline on the tiny Llama: exact structure, the joint mode's records
are the sweep's (pruned weights exactly zero, the transformed weights equal the records'
dequantization, the grid RTN's spec), prune-only + RTN and + GPTQ keep the zeros, bad keys
fail at config time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from llmcq.config.loader import resolve_config
from llmcq.errors import ConfigError
from llmcq.model.loading import ModelSource, load_pretrained
from llmcq.pipeline.runner import run
from llmcq.sparsity import NM
from llmcq.sparsity.masks import structure_violations

W4G32 = {"bit": 4, "symmetric": False, "granularity": "per_group", "group_size": 32}


def _config(model: Path, data: Path, save: Path, weight: dict[str, Any],
            quant: dict[str, Any] | None = None,
            special: dict[str, Any] | None = None) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "base": {"seed": 0, "device": "cpu"},
        "model": {"type": "llama", "path": str(model)},
        "calib": {"name": "wikitext2", "path": str(data / "wikitext2" / "valid.txt"),
                  "n_samples": 4, "seq_len": 64, "preproc": "wikitext2_gptq", "bs": 2,
                  "seed": 1},
        "eval": {"eval_pos": ["transformed"] + (["fake_quant"] if quant else []),
                 "name": "wikitext2", "path": str(data / "wikitext2" / "test.txt"),
                 "seq_len": 64, "bs": 2, "num_samples": 2},
        "sparse": {"method": "SparseGPT", "weight": weight, "special": special or {}},
        "save": {"save_path": str(save), "save_trans": True},
    }
    if quant is not None:
        cfg["quant"] = quant
        cfg["save"]["save_fake"] = True
    return cfg


def _linears(model: Any) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and ".layers." in n}


@pytest.mark.parametrize("weight", [{"sparsity": 0.5}, {"mask_structure": "2:4"}])
def test_prune_only_updates_kept_weights(weight: dict[str, Any], tiny_llama_dir: Path,
                                         shared_data: Path, tmp_path: Path) -> None:
    cfg = _config(tiny_llama_dir, shared_data, tmp_path / "o", weight)
    out = run(resolve_config(cfg), progress=False)
    dense, _ = load_pretrained(ModelSource(tiny_llama_dir))
    trans, _ = load_pretrained(ModelSource(tmp_path / "o" / "transformed_model"))
    for name, lin in _linears(trans).items():
        w, w0 = lin.weight, dense.get_submodule(name).weight
        zero = w == 0
        assert (zero.sum(1) == w.shape[1] // 2).all()
        if "mask_structure" in weight:
            assert structure_violations(~zero, NM(2, 4)) == 0
        assert not torch.equal(w[~zero], w0[~zero])  # OBS moved the kept weights
    assert out["compression"]["sparsity"] == pytest.approx(0.5, abs=1e-6)
    assert out["recipe"][0]["joint_quant"] is False


def test_joint_records_are_the_sweep(tiny_llama_dir: Path, shared_data: Path,
                                     tmp_path: Path) -> None:
    """50 % + W4 g32 beside quant.method RTN: the records hold the sweep's codes; the
    transformed model (the sweep's dequantized weights) and the fake-quantized one are the
    same weights, pruned ones exactly zero; with joint_quant off RTN rounds the pruned
    weights instead, a different model."""
    quant = {"method": "RTN", "weight": W4G32}
    res = {}
    for joint in (True, False):
        save = tmp_path / f"o{joint}"
        cfg = _config(tiny_llama_dir, shared_data, save, {"sparsity": 0.5}, quant,
                      {"joint_quant": joint})
        out = run(resolve_config(cfg), progress=False)
        assert out["recipe"][0]["joint_quant"] is joint
        assert out["compression"]["mask_sparsity"] == pytest.approx(0.5)
        fake, _ = load_pretrained(ModelSource(save / "fake_quant_model"))
        trans, _ = load_pretrained(ModelSource(save / "transformed_model"))
        for name, lin in _linears(fake).items():
            t = trans.get_submodule(name).weight
            assert (lin.weight[t == 0] == 0).all()
            assert ((lin.weight == 0).sum(1) >= lin.weight.shape[1] // 2).all()
            if joint:
                torch.testing.assert_close(lin.weight, t, rtol=0, atol=1e-6)
        res[joint] = fake
    a, b = _linears(res[True]), _linears(res[False])
    assert any(not torch.equal(a[n].weight, b[n].weight) for n in a)


def test_sparsegpt_then_gptq_keeps_the_2of4_zeros(tiny_llama_dir: Path, shared_data: Path,
                                                  tmp_path: Path) -> None:
    quant = {"method": "GPTQ", "weight": W4G32}
    cfg = _config(tiny_llama_dir, shared_data, tmp_path / "o", {"mask_structure": "2:4"},
                  quant)
    out = run(resolve_config(cfg), progress=False)
    assert out["recipe"][0]["joint_quant"] is False  # GPTQ sweeps on its own
    fake, _ = load_pretrained(ModelSource(tmp_path / "o" / "fake_quant_model"))
    for lin in _linears(fake).values():
        assert structure_violations(lin.weight != 0, NM(2, 4)) == 0


@pytest.mark.parametrize("special,quant,path", [
    ({"blocksize": 0}, None, "sparse.special.blocksize"),
    ({"percdamp": -1}, None, "sparse.special.percdamp"),
    ({"block_size": 64}, None, "sparse.special.block_size"),
    ({}, {"method": "RTN", "weight": {"bit": "e4m3", "quant_type": "float-quant",
                                      "symmetric": True, "granularity": "per_channel"}},
     "quant.weight.quant_type"),
])
def test_bad_keys_fail_at_config_time(special: dict[str, Any], quant: dict[str, Any] | None,
                                      path: str, tiny_llama_dir: Path, shared_data: Path,
                                      tmp_path: Path) -> None:
    cfg = _config(tiny_llama_dir, shared_data, tmp_path / "o", {"sparsity": 0.5}, quant,
                  special)
    with pytest.raises(ConfigError) as err:
        resolve_config(cfg)
    assert path in str(err.value)
    cfg["sparse"]["weight"] = {"n_prune_layers": 2}
    cfg["sparse"]["special"] = {}
    cfg.pop("quant", None)
    with pytest.raises(ConfigError) as err:
        resolve_config(cfg)
    assert "sparse.weight.n_prune_layers" in str(err.value)
