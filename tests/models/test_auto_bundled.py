"""``model.type: auto`` on the real bundled SmolLM2-135M (GGUF): the traced layout is the
Llama adapter's, every pair verified, for all 30 blocks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow


def test_auto_finds_the_llama_layout_on_smollm2(smollm2_path: Path) -> None:
    from llmcq.model.loading import ModelSource
    from llmcq_auto.adapter import AutoAdapter
    from llmcq_llama.adapter import LLAMA_LAYOUT

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        adapter = AutoAdapter()
        model, _ = adapter.load(ModelSource(smollm2_path.parent, smollm2_path.name))
    finally:
        torch.set_num_threads(before)
    assert adapter.ambiguous == [] and adapter.head_problem is None
    layout = adapter.layout
    assert (layout.blocks, layout.final_norm, layout.lm_head) == ("model.layers", "model.norm",
                                                                  "lm_head")
    assert layout.embeddings == LLAMA_LAYOUT.embeddings
    want = {(g.linears, g.prev_op, g.prev_kind, g.inspect, g.inspect_kwargs)
            for g in LLAMA_LAYOUT.block.groups}
    for i in range(len(adapter.blocks(model))):
        got = {(g.linears, g.prev_op, g.prev_kind, g.inspect, g.inspect_kwargs)
               for g in adapter.block_layout(model, i).groups}
        assert got == want, i
