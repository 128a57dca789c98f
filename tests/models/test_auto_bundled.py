"""``model.type: auto`` on the real bundled SmolLM2-135M (GGUF): the traced layout is the
Llama adapter's (roles and norm kinds included), every pair verified, for all 30 blocks."""

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
    assert adapter.ambiguous == [] and adapter.unroled == [] and adapter.unplaced == []
    assert adapter.check_head(model) is None
    assert adapter.layout_facts(model)[0] == {"scaling_pairs", "roles", "norm_kinds",
                                              "rotation_points"}
    assert adapter.layout.final_norm_kind == "rms"
    layout = adapter.layout
    assert (layout.blocks, layout.final_norm, layout.lm_head) == ("model.layers", "model.norm",
                                                                  "lm_head")
    assert layout.embeddings == LLAMA_LAYOUT.embeddings
    want = {(g.linears, g.prev_op, g.prev_kind, g.inspect, g.inspect_kwargs, g.roles)
            for g in LLAMA_LAYOUT.block.groups}
    for i in range(len(adapter.blocks(model))):
        layout = adapter.block_layout(model, i)
        got = {(g.linears, g.prev_op, g.prev_kind, g.inspect, g.inspect_kwargs, g.roles)
               for g in layout.groups}
        assert got == want, i
        assert set(layout.norms) == set(LLAMA_LAYOUT.block.norms), i
