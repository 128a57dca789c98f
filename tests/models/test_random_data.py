"""The ``random`` calibration/evaluation data name: seeded token ids from the vocabulary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from llmcq.config.loader import resolve_config
from llmcq.config.schema import CalibSection
from llmcq.data.datasets import RANDOM
from llmcq.errors import ConfigError


def test_random_ids_are_seeded_and_in_vocabulary(tiny_tokenizer: Any) -> None:
    calib = CalibSection(name="random", n_samples=3, seq_len=16, seed=7)
    a = RANDOM.calibration_ids(tiny_tokenizer, calib)
    assert [len(s) for s in a] == [16, 16, 16]
    assert all(0 <= t < len(tiny_tokenizer) for s in a for t in s)
    assert a == RANDOM.calibration_ids(tiny_tokenizer, calib)
    other = RANDOM.calibration_ids(tiny_tokenizer, calib.model_copy(update={"seed": 8}))
    assert other != a
    assert len(set(t for s in a for t in s)) > 20  # not a constant
    ev = RANDOM.evaluation_ids(tiny_tokenizer, None, 32)
    assert len(ev) == 32 * 32 and ev == RANDOM.evaluation_ids(tiny_tokenizer, None, 32)


def test_random_needs_no_path_and_resolves_by_name(tiny_llama_dir: Path, tmp_path: Path) -> None:
    cfg = {"model": {"type": "llama", "path": str(tiny_llama_dir)},
           "calib": {"name": "Random", "n_samples": 2, "seq_len": 16},
           "quant": {"method": "gptq", "weight": {"bit": 4, "symmetric": False,
                                                  "granularity": "per_channel"}},
           "eval": {"name": "random", "seq_len": 16, "eval_pos": ["pretrain"]},
           "save": {"save_path": str(tmp_path / "o")}}
    resolved = resolve_config(cfg)
    assert resolved.calib is not None and resolved.calib[0].name == "random"
    cfg["calib"]["name"] = "randm"
    with pytest.raises(ConfigError, match="random"):
        resolve_config(cfg)
