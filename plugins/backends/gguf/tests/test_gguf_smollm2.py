"""The bundled SmolLM2-135M is itself a Q4_1 GGUF (groups of 32). RTN W4 g32 asymmetric with
``round_zp: False`` recovers each block's grid exactly (scale = d, fractional zero = -m/d), so
exporting it back to Q4_1 must reproduce the source file's Q4_1 blocks byte for byte: a test of
packing, names, Q/K row order and metadata copying against a file written by llama.cpp's own
tools. (transformers-loaded logits of this export vs llmcq's fake-quant model: see README,
measured by bench/export_gguf_llamacpp.py, kept out of CI for time.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from llmcq.config.loader import resolve_config
from llmcq.pipeline.runner import run

pytestmark = pytest.mark.slow


def test_round_trip_of_the_bundled_q4_1_file_is_byte_identical(smollm2_path: Path,
                                                                smollm2_copy: Any,
                                                                tmp_path: Path) -> None:
    from gguf import GGUFReader

    model, tok = smollm2_copy()
    cfg: dict[str, Any] = {
        "model": {"type": "llama", "path": str(smollm2_path)},
        "quant": {"method": "rtn", "weight": {"bit": 4, "symmetric": False,
                                              "granularity": "per_group", "group_size": 32,
                                              "round_zp": False}},
        "save": {"save_path": str(tmp_path / "out"), "save_gguf": True}}
    run(resolve_config(cfg), progress=False, model=model, tokenizer=tok)
    path = tmp_path / "out" / "gguf_quant_model" / "model-Q4_1.gguf"
    src, dst = GGUFReader(str(smollm2_path)), GGUFReader(str(path))
    src_t = {t.name: t for t in src.tensors}
    dst_t = {t.name: t for t in dst.tensors}
    assert set(dst_t) == set(src_t)
    q41 = [n for n, t in dst_t.items() if t.tensor_type.name == "Q4_1"]
    assert len(q41) == 30 * 7
    for name in q41:
        assert src_t[name].tensor_type.name == "Q4_1"
        assert np.array_equal(np.asarray(dst_t[name].data), np.asarray(src_t[name].data)), name
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.pre",
                "tokenizer.chat_template", "llama.rope.freq_base", "llama.context_length"):
        a, b = src.fields[key].contents(), dst.fields[key].contents()
        assert a == b, key
    assert dst.fields["general.file_type"].contents() == 3  # MOSTLY_Q4_1
