"""The block-wise engine computes exactly what the whole model computes, and its device
memory does not grow with depth."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from llmcq.errors import PluginError
from llmcq.eval.ppl import perplexity
from llmcq.model.adapter import resolve_block
from llmcq.model.layout import BlockLayout, LinearGroup
from llmcq.model.loading import ModelSource, load_pretrained
from llmcq.pipeline.blockwise import capture_block_inputs


@pytest.fixture
def tiny(tiny_llama_dir: Path) -> tuple[Any, Any]:
    return load_pretrained(ModelSource(tiny_llama_dir))


def _adapter() -> Any:
    from llmcq_llama.adapter import LlamaAdapter

    return LlamaAdapter()


def test_blocks_one_by_one_equal_the_whole_model(tiny: Any) -> None:
    model, _ = tiny
    adapter = _adapter()
    batches = [torch.randint(0, 500, (2, 48)), torch.randint(0, 500, (3, 48))]
    inputs = capture_block_inputs(model, adapter, batches, torch.device("cpu"))
    assert len(inputs) == 2 and inputs.n_tokens == 5 * 48
    for block in adapter.blocks(model):
        inputs.advance(block)
    for h, ids in zip(inputs.hidden, batches):
        with torch.no_grad():
            expected = model(input_ids=ids).logits
            got = adapter.head_logits(model, h)
        assert torch.allclose(got, expected, atol=1e-5)


def test_per_block_perplexity_equals_whole_model(tiny: Any) -> None:
    model, _ = tiny
    ids = torch.randint(0, 500, (700,), generator=torch.Generator().manual_seed(0))
    whole, n = perplexity(model, ids, 64, bs=3, progress=False)
    per_block, m = perplexity(model, ids, 64, bs=3, per_block=True, adapter=_adapter(),
                              progress=False)
    assert n == m == 10
    assert per_block == pytest.approx(whole, rel=1e-5)
    limited, k = perplexity(model, ids, 64, max_windows=4, progress=False)
    assert k == 4 and limited != whole


def test_layout_must_cover_every_linear(tiny: Any) -> None:
    model, _ = tiny
    block = model.model.layers[0]
    partial = BlockLayout(groups=(LinearGroup(linears=("mlp.up_proj",), prev_op=None,
                                              inspect="mlp"),))
    with pytest.raises(PluginError, match="not covered: mlp.down_proj"):
        resolve_block(block, partial, where="model.layers.0")
    twice = BlockLayout(groups=_adapter().layout.block.groups + (
        LinearGroup(linears=("mlp.up_proj",), prev_op=None, inspect="mlp"),))
    with pytest.raises(PluginError, match="listed twice: mlp.up_proj"):
        resolve_block(block, twice, where="model.layers.0")
    groups = resolve_block(block, _adapter().layout.block, where="model.layers.0")
    names = [n for g in groups for n in g.linears]
    assert names == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                     "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


@pytest.mark.gpu
def test_peak_gpu_memory_is_flat_in_depth(tmp_path: Path, tiny_tokenizer: Any,
                                          shared_data: Path) -> None:
    """Quantizing 2, 4 and 8 blocks of the same width peaks at the same device memory."""
    from llmcq.config.loader import resolve_config
    from llmcq.pipeline.runner import run
    from llmcq.testing.tiny_models import save_tiny_model, tiny_llama_config

    peaks = {}
    for depth in (2, 4, 8):
        folder = save_tiny_model(tmp_path / f"d{depth}", tiny_llama_config(
            vocab_size=len(tiny_tokenizer), hidden_size=512, intermediate_size=1536,
            num_hidden_layers=depth, num_attention_heads=8, num_key_value_heads=4),
            tiny_tokenizer)
        cfg = {"base": {"device": "cuda"}, "model": {"type": "llama", "path": str(folder)},
               "calib": {"name": "wikitext2", "path": str(shared_data / "wikitext2/valid.txt"),
                         "n_samples": 8, "seq_len": 256, "preproc": "wikitext2_gptq"},
               "quant": {"method": "rtn", "weight": {"bit": 4, "granularity": "per_group",
                                                     "group_size": 128},
                         "act": {"bit": 8, "granularity": "per_tensor", "static": True},
                         "quant_out": True},
               "save": {"save_path": str(tmp_path / f"out{depth}")}}
        res = run(resolve_config(cfg), progress=False)
        peaks[depth] = res["peak_memory_bytes"]["cuda_by_stage"]["quantize"]
    assert max(peaks.values()) <= min(peaks.values()) * 1.05, peaks


def test_block_roles_and_norm_kinds_come_from_the_layout(tiny: Any) -> None:
    """What algorithms read instead of module names: each linear's declared role, and the
    kind of the norm producing a group's input."""
    from llmcq.pipeline.blockwise import Block

    model, _ = tiny
    layout = _adapter().layout.block
    block = Block(0, "model.layers.0", model.model.layers[0],
                  resolve_block(model.model.layers[0], layout, where="model.layers.0"))
    assert str(block.role("self_attn.k_proj")) == "k"
    assert block.role("mlp.nothing") is None
    assert list(block.by_role("q", "k")) == ["self_attn.q_proj", "self_attn.k_proj"]
    assert list(block.by_role("down")) == ["mlp.down_proj"]
    kinds = {g.spec.prev_op: g.prev_norm_kind for g in block.groups}
    assert kinds == {"input_layernorm": "rms", "self_attn.v_proj": None,
                     "post_attention_layernorm": "rms", "mlp.up_proj": None}
    # a declared norm that is not in the block is a layout error
    import dataclasses

    from llmcq.model.layout import NormSite

    bad = dataclasses.replace(layout, norms=layout.norms + (NormSite("q_norm", "rms", "qk"),))
    with pytest.raises(PluginError, match="declares norms absent from model.layers.0: q_norm"):
        resolve_block(model.model.layers[0], bad, where="model.layers.0")


def test_expert_roles_carry_the_expert_index() -> None:
    from torch import nn

    from llmcq.model.moe import expert_groups

    block = nn.Module()
    block.mlp = nn.Module()
    block.mlp.experts = nn.ModuleList()
    for _ in range(3):
        e = nn.Module()
        e.gate_proj, e.up_proj, e.down_proj = nn.Linear(8, 4), nn.Linear(8, 4), nn.Linear(4, 8)
        block.mlp.experts.append(e)
    layout = BlockLayout(groups=tuple(g for e in range(3)
                                      for g in expert_groups(f"mlp.experts.{e}")))
    roles = {n: str(r) for g in resolve_block(block, layout, where="b") for n, r in
             g.roles.items()}
    assert roles["mlp.experts.2.up_proj"] == "expert_up[2]"
    assert roles["mlp.experts.0.down_proj"] == "expert_down[0]"
    assert len(roles) == 9
