"""llmc's two-step AWQ -> OmniQuant flow through files, against the one-recipe run.

Step 1 runs AWQ alone and saves its scales and (clip_version v2) clip ranges; step 2 runs
OmniQuant alone on the original model with ``load_transform``: the saved scales are folded
into each block and the saved clips start LWC. With ``quant_out: False`` both flows see the
same block inputs, so the records of step 2 equal, bit for bit, those of
``quant.method: [awq, omniquant]`` reading AWQ's artefacts in one run; the run's artefact
store holds what AWQ published, and the files hold the same values.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

import llmcq
from llmcq.artefacts import load_artefact
from llmcq.config.loader import resolve_config
from llmcq.errors import ConfigError, DataError
from llmcq.model.loading import ModelSource, load_pretrained
from llmcq.pipeline.runner import run
from llmcq.plugins import registry

W3 = {"bit": 3, "symmetric": False, "granularity": "per_group", "group_size": 16,
      "calib_algo": "learnable", "ste": True}
AWQ = {"trans": True, "trans_version": "v2", "weight_clip": True, "clip_version": "v2",
       "n_grid": 5, "do_gqa_trans": True}
OMNI = {"epochs": 2, "lwc": True, "lwc_lr": 0.05}
LET = {"let": True, "let_lr": 0.01, "search_scale_init": True}

pytestmark = pytest.mark.skipif(
    "awq" not in [i.name for i in registry.discover("llmcq.algorithms")],
    reason="the awq plugin (llmcq-awq) is not installed")


def _cfg(model: Path, data: Path, save: Path, method: Any, special: dict[str, Any],
         weight: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "base": {"seed": 0, "device": "cpu"},
        "model": {"type": "llama", "path": str(model)},
        "calib": {"name": "wikitext2", "path": str(data / "wikitext2" / "valid.txt"),
                  "n_samples": 4, "seq_len": 48, "preproc": "wikitext2_gptq", "bs": 2,
                  "seed": 1},
        "eval": {"eval_pos": ["fake_quant"], "name": "wikitext2",
                 "path": str(data / "wikitext2" / "test.txt"), "seq_len": 48,
                 "num_samples": 2},
        "quant": {"method": method, "weight": weight or W3, "special": special,
                  "quant_out": False},
        "save": {"save_path": str(save)},
    }


class _Spy:
    def __init__(self) -> None:
        self.records: dict[str, Any] = {}
        self.artefacts: Any = None

    @llmcq.hookimpl
    def llmcq_evaluate(self, run: Any) -> list:
        self.records = dict(run.records)
        self.artefacts = run.artefacts
        return []


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir: Path) -> tuple[Any, Any]:
    return load_pretrained(ModelSource(tiny_llama_dir))


def _run(cfg: dict[str, Any], tiny: tuple[Any, Any]) -> _Spy:
    spy = _Spy()
    run(resolve_config(cfg), progress=False, model=copy.deepcopy(tiny[0]), tokenizer=tiny[1],
        extra_plugins=[spy])
    return spy


@pytest.mark.parametrize("let", [False, True], ids=["lwc", "lwc+let"])
def test_saved_awq_then_load_transform_equals_the_one_recipe_run(
        let: bool, tmp_path: Path, tiny_llama_dir: Path, shared_data: Path,
        tiny: tuple[Any, Any]) -> None:
    saved = tmp_path / "awq"
    omni = {**OMNI, **(LET if let else {})}
    one = _run(_cfg(tiny_llama_dir, shared_data, tmp_path / "one", ["awq", "omniquant"],
                    {"awq": AWQ, "omniquant": {**omni, "search_clip_init": True,
                                               "load_clip": True}}), tiny)
    # step 1: awq alone saves its scales and v2 clip ranges (its own records: RTN)
    step1 = _run(_cfg(tiny_llama_dir, shared_data, tmp_path / "s1", "awq",
                      {**AWQ, "save_scale": True, "scale_path": str(saved),
                       "save_clip": True, "clip_path": str(saved)},
                      weight={**W3, "calib_algo": "minmax"}), tiny)
    # the files hold what AWQ published in the run (core's artefact files)
    for kind in ("scales", "clips"):
        published = step1.artefacts.get(kind, producer="awq")
        on_disk = load_artefact(kind, saved)
        assert published and set(published) == set(on_disk)
        for name, value in published.items():
            got = on_disk[name]
            pairs = zip(value, got, strict=True) if kind == "clips" else [(value, got)]
            assert all(torch.equal(a, b) for a, b in pairs), name
    # q/k are never clipped; o_proj's scale is its kv-channel scale repeated (GQA)
    assert "model.layers.0.self_attn.q_proj" not in on_disk
    assert "model.layers.0.self_attn.o_proj" in load_artefact("scales", saved)
    # step 2: omniquant alone on the original model, llmc's load_transform keys
    two = _run(_cfg(tiny_llama_dir, shared_data, tmp_path / "s2", "omniquant",
                    {**omni, "load_transform": True, "scale_path": str(saved),
                     "clip_path": str(saved)}), tiny)
    assert set(two.records) == set(one.records) and len(one.records) == 14
    for name, a in one.records.items():
        b = two.records[name]
        if not let or ".layers.0." in name:  # bit for bit
            assert torch.equal(a.qweight, b.qweight), name
            assert torch.equal(a.scale, b.scale) and torch.equal(a.zero, b.zero), name
        else:
            # with LET the recipe's block 0 is LET-folded (function-preserving up to float
            # rounding) before its outputs feed block 1, where step 1 fed awq the outputs of
            # the AWQ-scaled block: block 1 sees inputs equal up to rounding
            assert (a.qweight == b.qweight).float().mean() > 0.99, name
            assert torch.allclose(a.dequantize(), b.dequantize(), rtol=0,
                                  atol=1e-3 * float(a.dequantize().abs().max())), name
    # what load_transform folded is published like AWQ's scales in the recipe
    folded = two.artefacts.get("scales", producer="omniquant:load_transform")
    assert set(folded) == set(one.artefacts.get("scales", producer="awq"))


def test_two_step_config_errors(tmp_path: Path, tiny_llama_dir: Path,
                                shared_data: Path) -> None:
    def refused(special: dict[str, Any], method: Any = "omniquant") -> ConfigError:
        with pytest.raises(ConfigError) as err:
            resolve_config(_cfg(tiny_llama_dir, shared_data, tmp_path / "x", method, special))
        return err.value

    empty = tmp_path / "empty"
    empty.mkdir()
    assert refused({"load_transform": True}).path == "quant.special.scale_path"
    err = refused({"load_transform": True, "scale_path": str(empty)})
    assert err.path == "quant.special.scale_path" and "no scales.pth" in str(err)
    err = refused({"clip_path": str(empty), "search_clip_init": True, "load_clip": True})
    assert err.path == "quant.special.clip_path" and "no clips.pth" in str(err)
    assert refused({"scale_path": str(empty)}).path == "quant.special.scale_path"
    assert refused({"lwc": False, "let": True, "load_transform": True,
                    "scale_path": str(empty), "clip_path": str(empty)}).path.startswith(
        "quant.special.")
    err = refused({"awq": {"trans": True}, "omniquant": {"load_transform": True,
                                                        "scale_path": str(empty)}},
                  ["awq", "omniquant"])
    assert err.path == "quant.special.omniquant.load_transform"


def test_load_transform_refuses_a_file_for_another_model(
        tmp_path: Path, tiny_llama_dir: Path, shared_data: Path, tiny: tuple[Any, Any]) -> None:
    folder = tmp_path / "other"
    folder.mkdir()
    torch.save({"model.decoder.layers.0.fc1": torch.ones(64)}, folder / "scales.pth")
    with pytest.raises(DataError, match="no scales for model.layers.0"):
        _run(_cfg(tiny_llama_dir, shared_data, tmp_path / "o", "omniquant",
                  {"epochs": 1, "load_transform": True, "scale_path": str(folder)}), tiny)


def test_shipped_step1_and_the_documented_step2_validate(tmp_path: Path, shared_data: Path,
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    import yaml

    from llmcq.testing.paths import shipped_config

    repo = Path(__file__).resolve().parents[4]
    path = repo / "configs" / "omniquant" / "awq_omniq_step1_awq.yaml"
    monkeypatch.chdir(repo)
    raw = shipped_config(path, shared_data)
    raw["save"]["save_path"] = str(tmp_path / "s1")
    step1 = resolve_config(copy.deepcopy(raw))
    assert step1.steps[0].special.clip_version == "v2" and step1.steps[0].special.save_clip
    # the step 2 of the config's comment, pointed at a folder holding the two files
    text = path.read_text()
    snippet = "\n".join(line[2:] for line in text.splitlines()
                        if line.startswith("#   ") and not line.startswith("#   .venv"))
    special = yaml.safe_load(snippet)["quant"]["special"]
    files = tmp_path / "awq"
    files.mkdir()
    for name in ("scales.pth", "clips.pth"):
        (files / name).write_bytes(b"")
    special.update(scale_path=str(files), clip_path=str(files))
    raw["quant"] = {**raw["quant"], "method": "OmniQuant", "special": special,
                    "weight": {**raw["quant"]["weight"], "calib_algo": "learnable",
                               "ste": True}}
    raw["save"]["save_path"] = str(tmp_path / "s2")
    step2 = resolve_config(raw)
    assert step2.steps[0].special.load_transform
