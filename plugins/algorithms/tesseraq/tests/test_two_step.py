"""llmc's two-step AWQ -> TesseraQ flow through files, against the one-recipe run.

Step 1 runs AWQ alone and saves its scales and (clip_version v2) clip ranges; step 2 runs
TesseraQ alone on the original model with ``load_transform`` and ``clip_version: v2``: the
saved scales are folded into each block and the saved clips bound the weights before the
grids are fixed. With ``quant_out: False`` both flows see the same block inputs and the same
sample draws, so the trained records of step 2 equal, bit for bit, those of
``quant.method: [awq, tesseraq]`` reading AWQ's artefacts in one run.
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
from llmcq.errors import DataError
from llmcq.model.loading import ModelSource, load_pretrained
from llmcq.pipeline.runner import run
from llmcq.plugins import registry

W2 = {"bit": 2, "symmetric": False, "granularity": "per_group", "group_size": 16,
      "calib_algo": "learnable"}
AWQ = {"trans": True, "trans_version": "v2", "weight_clip": True, "clip_version": "v2",
       "n_grid": 3, "do_gqa_trans": True}
TQ = {"iterations": 3, "batch_size": 2, "lr": 0.01, "scale_lr": 0.005,
      "thresholds": [0.5, 0.1], "weight_clip": True, "clip_version": "v2"}

pytestmark = pytest.mark.skipif(
    "awq" not in [i.name for i in registry.discover("llmcq.algorithms")],
    reason="the awq plugin (llmcq-awq) is not installed")


def _cfg(model: Path, data: Path, save: Path, method: Any, special: dict[str, Any],
         weight: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "base": {"seed": 0, "device": "cpu"},
        "model": {"type": "llama", "path": str(model)},
        "calib": {"name": "wikitext2", "path": str(data / "wikitext2" / "valid.txt"),
                  "n_samples": 4, "seq_len": 32, "preproc": "wikitext2_gptq", "bs": 1,
                  "seed": 1},
        "eval": {"eval_pos": ["fake_quant"], "name": "wikitext2",
                 "path": str(data / "wikitext2" / "test.txt"), "seq_len": 32,
                 "num_samples": 1},
        "quant": {"method": method, "weight": weight or W2, "special": special,
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


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    """The tiny blocks train faster on one thread than on two threads fighting over the
    cores (with each other and with other jobs)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir: Path) -> tuple[Any, Any]:
    return load_pretrained(ModelSource(tiny_llama_dir))


def _run(cfg: dict[str, Any], tiny: tuple[Any, Any]) -> _Spy:
    spy = _Spy()
    run(resolve_config(cfg), progress=False, model=copy.deepcopy(tiny[0]), tokenizer=tiny[1],
        extra_plugins=[spy])
    return spy


def test_saved_awq_then_load_transform_equals_the_one_recipe_run(
        tmp_path: Path, tiny_llama_dir: Path, shared_data: Path,
        tiny: tuple[Any, Any]) -> None:
    saved = tmp_path / "awq"
    one = _run(_cfg(tiny_llama_dir, shared_data, tmp_path / "one", ["Awq", "TesseraQ"],
                    {"Awq": AWQ, "TesseraQ": TQ}), tiny)
    # step 1: awq alone saves its scales and v2 clip ranges (its own records: RTN)
    step1 = _run(_cfg(tiny_llama_dir, shared_data, tmp_path / "s1", "awq",
                      {**AWQ, "save_scale": True, "scale_path": str(saved),
                       "save_clip": True, "clip_path": str(saved)},
                      weight={**W2, "calib_algo": "minmax"}), tiny)
    for kind in ("scales", "clips"):  # the files hold what AWQ published
        assert set(step1.artefacts.get(kind, producer="awq")) == set(load_artefact(kind, saved))
    # step 2: TesseraQ alone on the original model, the seed README's keys
    two = _run(_cfg(tiny_llama_dir, shared_data, tmp_path / "s2", "TesseraQ",
                    {**TQ, "load_transform": True, "scale_path": str(saved),
                     "clip_path": str(saved)}), tiny)
    assert set(two.records) == set(one.records) and len(one.records) == 14
    for name, a in one.records.items():
        b = two.records[name]
        assert torch.equal(a.qweight, b.qweight), name
        assert torch.equal(a.scale, b.scale) and torch.equal(a.zero, b.zero), name
    # the training changed the rounding: the records are not round-to-nearest of AWQ's
    rtn = step1.records
    assert any(not torch.equal(rtn[n].qweight, r.qweight) for n, r in one.records.items())
    # what load_transform folded is published like AWQ's scales in the recipe
    folded = two.artefacts.get("scales", producer="tesseraq:load_transform")
    assert set(folded) == set(one.artefacts.get("scales", producer="awq"))


def test_missing_or_foreign_files_stop_the_run(tmp_path: Path, tiny_llama_dir: Path,
                                               shared_data: Path,
                                               tiny: tuple[Any, Any]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="scales.pth"):
        _run(_cfg(tiny_llama_dir, shared_data, tmp_path / "m", "tesseraq",
                  {**TQ, "clip_version": "v1", "load_transform": True,
                   "scale_path": str(empty)}), tiny)
    folder = tmp_path / "other"
    folder.mkdir()
    torch.save({"model.decoder.layers.0.fc1": torch.ones(64)}, folder / "scales.pth")
    with pytest.raises(DataError, match="no scales for model.layers.0"):
        _run(_cfg(tiny_llama_dir, shared_data, tmp_path / "o", "tesseraq",
                  {**TQ, "clip_version": "v1", "iterations": 0, "load_transform": True,
                   "scale_path": str(folder)}), tiny)
