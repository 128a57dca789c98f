"""QuaRot's rotations preserve the float function (float64 tiny Llamas, tied and untied,
GQA), spread a planted outlier channel, and fall back to random orthogonal matrices for
sizes without a Hadamard matrix."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from llmcq.plugins import registry
from llmcq.quant.transform import online_transform_of
from llmcq.testing.tiny_models import tiny_llama_config
from llmcq_quarot import QuarotSpecial
from llmcq_quarot.algorithm import Quarot


def tiny(seed: int = 0, *, dtype: torch.dtype = torch.float64, **cfg: Any) -> Any:
    """A tiny Llama with random weights and norms away from 1 (float64 by default)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(**cfg))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
            else:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    return model.to(dtype).eval()


def adapter() -> Any:
    spec, _ = registry.load_spec("llmcq.models", "llama", field="model.type")
    return spec.load_impl()(spec)


def quarot(model: Any, seed: int = 0, **special: Any) -> Quarot:
    run = SimpleNamespace(adapter=adapter(), model=model, weight=None, act=None,
                          device=torch.device("cpu"),
                          config=SimpleNamespace(base=SimpleNamespace(seed=seed)))
    algo = Quarot(run=run, step=SimpleNamespace(special=QuarotSpecial(**special)))
    algo.transform_model(model)
    return algo


def logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal up to float32 rounding: transformers' RMSNorm normalizes in float32 even in a
    float64 model (differences ~1e-7 on logits of order 1; a wrong rotation gives ~1)."""
    torch.testing.assert_close(a, b, rtol=1e-5, atol=5e-6)


IDS = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("mode", ["hadamard", "random"])
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("online", [False, True])
def test_rotation_preserves_logits(mode: str, tied: bool, online: bool) -> None:
    model = tiny(tie_word_embeddings=tied)  # GQA: 4 heads, 2 kv heads
    ref = logits(model, IDS)
    algo = quarot(model, rotate_mode=mode, online_rotate=online)
    out = logits(model, IDS)
    close(out, ref)
    head, emb = model.lm_head, model.model.embed_tokens
    assert head.weight is not emb.weight and not model.config.tie_word_embeddings
    assert algo.facts["untied_embeddings"] is tied
    assert algo.facts["r1"].startswith("hadamard(64" if mode == "hadamard" else "random")
    # the norms are weightless, the weights really changed
    for blk in model.model.layers:
        assert torch.equal(blk.input_layernorm.weight, torch.ones_like(
            blk.input_layernorm.weight))
        down = blk.mlp.down_proj
        assert (online_transform_of(down) is not None) is online
    assert torch.equal(model.model.norm.weight, torch.ones_like(model.model.norm.weight))
    assert not torch.allclose(emb.weight, tiny(tie_word_embeddings=tied).model.embed_tokens
                              .weight)


def test_rotation_mha_and_random_is_seeded() -> None:
    a, b = tiny(num_key_value_heads=4), tiny(num_key_value_heads=4)
    ref = logits(a, IDS)
    quarot(a, seed=3, rotate_mode="random")
    quarot(b, seed=3, rotate_mode="random")
    close(logits(a, IDS), ref)
    assert torch.equal(a.model.embed_tokens.weight, b.model.embed_tokens.weight)
    c = tiny(num_key_value_heads=4)
    quarot(c, seed=4, rotate_mode="random")
    assert not torch.allclose(a.model.embed_tokens.weight, c.model.embed_tokens.weight)


def test_sizes_without_hadamard_fall_back(caplog: pytest.LogCaptureFixture) -> None:
    # hidden 52 (head_dim 26) and intermediate 92 have no Sylvester x Paley Hadamard
    model = tiny(hidden_size=52, intermediate_size=92, num_attention_heads=2,
                 num_key_value_heads=1)
    ref = logits(model, IDS)
    with caplog.at_level(logging.WARNING, logger="llmcq.quarot"):
        algo = quarot(model, rotate_mode="hadamard", online_rotate=True)
    close(logits(model, IDS), ref)
    text = caplog.text
    assert "no Hadamard matrix of order 52" in text and "hidden size" in text
    assert "order 26" in text and "order 92" in text
    assert algo.facts["r1"].startswith("random_orthogonal(52")
    t = online_transform_of(model.model.layers[0].mlp.down_proj)
    assert t is not None and t.kind == "matrix" and t.size == 92


def test_rotation_spreads_an_outlier_channel() -> None:
    """A residual channel with 30x the energy of the others (planted through the embeddings
    and the readers' norms): after R1 the max/rms of the inputs of q/k/v per token drops."""
    model = tiny(dtype=torch.float32)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 5] *= 30.0

    def ratio(m: Any) -> float:
        got: list[torch.Tensor] = []
        h = m.model.layers[0].self_attn.q_proj.register_forward_hook(
            lambda _m, a, _o: got.append(a[0].detach()))
        logits(m, IDS)
        h.remove()
        x = got[0].reshape(-1, got[0].shape[-1])
        return float((x.abs().amax(-1) / x.pow(2).mean(-1).sqrt()).mean())

    before = ratio(model)
    quarot(model, online_rotate=False)
    after = ratio(model)
    assert before > 5.0 and after < before / 3, (before, after)


def test_online_transform_is_applied_in_float() -> None:
    """R4: down_proj's weight holds W H^T and a pre-hook applies H to its input, so the
    float linear alone gives W x; the hook's transform is what records will carry."""
    model = tiny()
    w = model.model.layers[1].mlp.down_proj.weight.detach().clone()
    quarot(model, online_rotate=True)
    down = model.model.layers[1].mlp.down_proj
    t = online_transform_of(down)
    assert t is not None and t.kind == "hadamard" and t.size == 160
    x = torch.randn(3, 160, dtype=torch.float64)
    # the residual rotation R1 acts on the output rows: compare through Q^T
    q = model.model.layers[1].mlp.down_proj.weight.detach() @ t.matrix(torch.float64)
    close(down(x), x @ q.T)  # the Hadamard computes in float32
    assert not torch.allclose(q, w)  # R1 rotated the rows


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3", "phi3"])
def test_other_dense_families_keep_their_function(family: str) -> None:
    """q/k/v biases (qwen2), q/k norms (qwen3), fused qkv and gate_up (phi3: R2 skipped)."""
    from llmcq.testing.tiny_models import auto_model_class, tiny_family_config

    cfg = tiny_family_config(family)
    torch.manual_seed(0)
    model = auto_model_class(cfg).from_config(cfg).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.08) if p.dim() >= 2 else p.add_(0.3 * torch.randn_like(p))
    spec, _ = registry.load_spec("llmcq.models", family, field="model.type")
    ad = spec.load_impl()(spec)
    ref = logits(model, IDS)
    run = SimpleNamespace(adapter=ad, model=model, weight=None, act=None,
                          device=torch.device("cpu"))
    algo = Quarot(run=run, step=SimpleNamespace(special=QuarotSpecial()))
    algo.transform_model(model)
    close(logits(model, IDS), ref)
    assert (algo.facts["r2"] is None) is (family == "phi3")


@pytest.mark.parametrize("family,match", [("mixtral", "MoE experts"),
                                          ("falcon", "LayerNorm")])
def test_unsupported_families_are_refused_with_the_reason(family: str, match: str) -> None:
    from llmcq.errors import PluginError
    from llmcq.testing.tiny_models import auto_model_class, tiny_family_config

    cfg = tiny_family_config(family)
    model = auto_model_class(cfg).from_config(cfg).eval()
    spec, _ = registry.load_spec("llmcq.models", family, field="model.type")
    ad = spec.load_impl()(spec)
    ad.ensure_prepared(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    run = SimpleNamespace(adapter=ad, model=model, weight=None, act=None)
    with pytest.raises(PluginError, match=match):
        Quarot(run=run, step=SimpleNamespace(special=QuarotSpecial())).transform_model(model)
    # refused before anything changed
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_offset_norm_fuses_as_one_plus_w() -> None:
    """Gemma's RMSNorm computes x / rms(x) * (1 + w): fused into the reader as 1 + w, the
    norm's weight set to 0."""
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

    from llmcq_quarot.rotation import fuse_norm

    torch.manual_seed(0)
    norm = GemmaRMSNorm(16).double()
    with torch.no_grad():
        norm.weight.normal_(0.0, 0.5)
    lin = torch.nn.Linear(16, 5).double()
    x = torch.randn(4, 16, dtype=torch.float64)
    ref = lin(norm(x))
    fuse_norm(norm, "rms_offset", [lin])
    assert torch.equal(norm.weight, torch.zeros(16, dtype=torch.float64))
    close(lin(norm(x)), ref)


def test_fp32_had_chooses_the_online_transform_precision() -> None:
    from llmcq.quant.transform import transform_from_dict
    from llmcq.transforms.hadamard import Hadamard

    a, b = tiny(), tiny()
    quarot(a, fp32_had=True)
    quarot(b, fp32_had=False)
    ta = online_transform_of(a.model.layers[0].mlp.down_proj)
    tb = online_transform_of(b.model.layers[0].mlp.down_proj)
    assert isinstance(ta, Hadamard) and isinstance(tb, Hadamard)
    assert ta.fp32 and not tb.fp32
    assert torch.equal(a.model.layers[0].mlp.down_proj.weight,
                       b.model.layers[0].mlp.down_proj.weight)
    from llmcq.transforms.hadamard import hadamard_matrix

    h = hadamard_matrix(160, torch.float64)
    x = torch.randn(4, 160, dtype=torch.float64)
    torch.testing.assert_close(tb.apply(x), x @ h.T, rtol=1e-12,
                               atol=1e-12)  # float64 kept: no float32 rounding
    assert float((ta.apply(x) - x @ h.T).abs().max()) > 1e-12
    xb = x.to(torch.bfloat16)
    assert tb.apply(xb).dtype == torch.bfloat16
    assert tb.to_dict()["fp32"] is False and "fp32" not in ta.to_dict()
    back = transform_from_dict(tb.to_dict())  # the precision survives serialization
    assert isinstance(back, Hadamard) and not back.fp32
    torch.testing.assert_close(back.apply(x), tb.apply(x), rtol=0, atol=0)
