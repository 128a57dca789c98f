"""Per-channel scale folding is function-preserving for every group of the Llama layout,
including grouped-query v_proj -> o_proj, and folds into a norm by its declared kind
(RMSNorm, LayerNorm, Gemma's 1 + w)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from llmcq.model.adapter import resolve_block
from llmcq.model.loading import ModelSource, load_pretrained
from llmcq.transforms.scaling import expand_kv_scale, fold_scale, reduce_to_kv, scale_norm_


def _adapter() -> Any:
    from llmcq_llama.adapter import LlamaAdapter

    return LlamaAdapter()


def test_expand_and_reduce_kv() -> None:
    s = torch.arange(1.0, 7.0)  # 2 kv heads x head_dim 3
    e = expand_kv_scale(s, n_heads=4, n_kv_heads=2)
    assert e.tolist() == [1, 2, 3, 1, 2, 3, 4, 5, 6, 4, 5, 6]
    assert torch.equal(reduce_to_kv(e, 4, 2), s)


@pytest.mark.parametrize("group_index", [0, 1, 2, 3])
def test_fold_scale_preserves_the_model(tiny_llama_dir: Path, group_index: int) -> None:
    model, _ = load_pretrained(ModelSource(tiny_llama_dir))
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # GQA
    x = torch.randint(0, 500, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=x).logits
    adapter = _adapter()
    heads, kv = adapter.attention_heads(model)
    for i, block in enumerate(adapter.blocks(model)):
        group = resolve_block(block, adapter.layout.block, where=f"b{i}")[group_index]
        width = group.prev_op.weight.shape[0]
        s = torch.rand(width, generator=torch.Generator().manual_seed(i)) * 3 + 0.2
        w_before = next(iter(group.linears.values())).weight.clone()
        fold_scale(group, s, n_heads=heads, n_kv_heads=kv)
        assert not torch.equal(next(iter(group.linears.values())).weight, w_before)
    with torch.no_grad():
        after = model(input_ids=x).logits
    assert torch.allclose(after, before, atol=1e-4, rtol=1e-4)


def test_fold_scale_rejects_wrong_width(tiny_llama_dir: Path) -> None:
    model, _ = load_pretrained(ModelSource(tiny_llama_dir))
    group = resolve_block(model.model.layers[0], _adapter().layout.block, where="b0")[1]
    with pytest.raises(ValueError, match="n_heads"):
        fold_scale(group, torch.ones(group.prev_op.out_features))


class _OffsetRMSNorm(torch.nn.Module):
    """Gemma's norm: ``x / rms(x) * (1 + w)``."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(w.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1.0 + self.weight)


@pytest.mark.parametrize("kind", ["rms", "layer", "rms_offset"])
def test_scale_norm_divides_the_output_by_kind(kind: str) -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(16, generator=gen) * 0.3
    if kind == "rms_offset":
        norm: torch.nn.Module = _OffsetRMSNorm(w)
    else:
        norm = torch.nn.LayerNorm(16) if kind == "layer" else torch.nn.RMSNorm(16)
        with torch.no_grad():
            norm.weight.copy_(1.0 + w)
            if kind == "layer":
                norm.bias.copy_(torch.randn(16, generator=gen))
    x = torch.randn(5, 16, generator=gen)
    s = torch.rand(16, generator=gen) * 1.5 + 0.5
    with torch.no_grad():
        ref = norm(x)
        scale_norm_(norm, s, kind)
        assert torch.allclose(norm(x), ref / s, atol=1e-5)
    with pytest.raises(ValueError, match="unknown norm kind"):
        scale_norm_(norm, s, "batch")


def _gemma_offset_norms() -> Any:
    """A tiny Gemma2 as transformers builds it (its norms compute x / rms * (1 + w); no
    adapter, so no OffsetRMSNorm swap), with the norm weights off zero."""
    from transformers import AutoModelForCausalLM

    from llmcq.testing.tiny_models import tiny_family_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_family_config("gemma2")).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
            else:
                p.add_(torch.randn_like(p) * 0.2)
    return model


@pytest.mark.parametrize("declared", ["rms_offset", "rms"])
def test_fold_into_offset_norms_follows_the_declared_kind(declared: str) -> None:
    """Folding into Gemma's 1 + w norms as ``rms_offset`` (w' = (1 + w) / s - 1) keeps the
    logits; declaring them plain RMSNorms (w' = w / s) does not."""
    from llmcq.model.layout import NormSite, prenorm_block

    model = _gemma_offset_norms()
    layout = prenorm_block(mlp_norm="pre_feedforward_layernorm", norm_kind=declared,
                           extra_norms=(NormSite("post_attention_layernorm", "rms_offset",
                                                 "attn_out"),
                                        NormSite("post_feedforward_layernorm", "rms_offset",
                                                 "mlp_out")))
    x = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(input_ids=x).logits
    folded = 0
    for i, block in enumerate(model.model.layers):
        for group in resolve_block(block, layout, where=f"b{i}"):
            if group.spec.prev_kind != "norm":
                continue
            assert group.prev_norm_kind == declared
            s = torch.rand(64, generator=torch.Generator().manual_seed(10 + folded)) * 1.5 + 0.5
            fold_scale(group, s)
            folded += 1
    assert folded == 4
    with torch.no_grad():
        after = model(input_ids=x).logits
    err = float((after - before).abs().max())
    if declared == "rms_offset":
        assert err <= 1e-4 * float(before.abs().max()), err
    else:
        assert err > 1e-2 * float(before.abs().max()), err
