"""Roles, norm kinds and layout facts of every family, and ``auto``'s inferred ones, on tiny
random models built in memory from transformers configs (hidden 64, 2 blocks):

* every linear of every block resolves to the role the family's modeling code gives it
  (experts with their index, routers float);
* every declared norm kind folds a scale exactly (the norm's output is divided by it) and
  is told apart from the other kinds (a LayerNorm centres, an RMSNorm does not);
* each family's ``ModelSpec.provides`` (what ``llmcq validate`` checks) is what its
  ``layout_facts`` reports on the loaded model (wiring variants provide no more);
* ``model.type: auto`` infers the same roles, learns the same norm kinds and positions for
  the norms that feed linears, and provides the same facts except where it cannot verify a
  scaling pair (documented per family).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from llmcq.model.adapter import ModelAdapter, resolve_block
from llmcq.plugins import registry
from llmcq.testing.tiny_models import auto_model_class, tiny_family_config
from llmcq.transforms.scaling import scale_norm_

#: tiny-config key -> model.type of its hand-written adapter (see test_families.py)
FAMILIES = {
    "llama": "llama", "mistral": "mistral", "ministral": "mistral", "qwen2": "qwen2",
    "qwen3": "qwen3", "mixtral": "mixtral", "qwen2_moe": "qwen2_moe", "qwen3_moe": "qwen3_moe",
    "opt": "opt", "opt_postln": "opt", "bloom": "bloom", "falcon": "falcon",
    "falcon_new": "falcon", "gemma2": "gemma2", "gemma3_text": "gemma3_text", "phi": "phi",
    "phi3": "phi3", "stablelm": "stablelm", "stablelm_parallel": "stablelm",
    "starcoder2": "starcoder2", "deepseek_v2": "deepseek_v2", "deepseek_v3": "deepseek_v3",
    "llava": "llava",
}
#: the tiny config each family's spec is checked on (its default wiring)
DEFAULT_WIRING = ["llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe",
                  "opt", "bloom", "falcon", "gemma2", "gemma3_text", "phi", "phi3", "stablelm",
                  "starcoder2", "deepseek_v2", "deepseek_v3", "llava"]

LLAMA = {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v",
         "self_attn.o_proj": "o", "mlp.gate_proj": "gate", "mlp.up_proj": "up",
         "mlp.down_proj": "down"}
ATTN = {k: v for k, v in LLAMA.items() if k.startswith("self_attn")}
OPT = {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v",
       "self_attn.out_proj": "o", "fc1": "up", "fc2": "down"}
FUSED = {"self_attention.query_key_value": "qkv", "self_attention.dense": "o",
         "mlp.dense_h_to_4h": "up", "mlp.dense_4h_to_h": "down"}
MLA_V2 = {"self_attn.q_proj": "q", "self_attn.kv_a_proj_with_mqa": "kv_a",
          "self_attn.kv_b_proj": "kv_b", "self_attn.o_proj": "o"}
MLA_V3 = {"self_attn.q_a_proj": "q_a", "self_attn.q_b_proj": "q_b",
          "self_attn.kv_a_proj_with_mqa": "kv_a", "self_attn.kv_b_proj": "kv_b",
          "self_attn.o_proj": "o"}


def experts(names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"),
            n: int = 4) -> dict[str, str]:
    return {f"mlp.experts.{e}.{name}": f"expert_{role}[{e}]" for e in range(n)
            for name, role in zip(names, ("gate", "up", "down"), strict=True)}


def shared(prefix: str) -> dict[str, str]:
    return {f"{prefix}.{n}": f"shared_{r}" for n, r in (("gate_proj", "gate"), ("up_proj", "up"),
                                                        ("down_proj", "down"))}


DENSE_MLP = {k: v for k, v in LLAMA.items() if k.startswith("mlp")}
#: family -> the roles of every linear of the last block (and of block 0 where it differs)
ROLES: dict[str, dict[str, str]] = {
    **{f: LLAMA for f in ("llama", "mistral", "ministral", "qwen2", "qwen3", "gemma2",
                          "gemma3_text", "stablelm", "stablelm_parallel", "llava")},
    "mixtral": {**ATTN, **experts(("w1", "w3", "w2"))},
    "qwen2_moe": {**ATTN, **experts(), **shared("mlp.shared_expert"),
                  "mlp.shared_expert_gate": "router"},
    "qwen3_moe": {**ATTN, **experts()},
    "opt": OPT, "opt_postln": OPT, "bloom": FUSED, "falcon": FUSED, "falcon_new": FUSED,
    "phi": {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v",
            "self_attn.dense": "o", "mlp.fc1": "up", "mlp.fc2": "down"},
    "phi3": {"self_attn.qkv_proj": "qkv", "self_attn.o_proj": "o",
             "mlp.gate_up_proj": "gate_up", "mlp.down_proj": "down"},
    "starcoder2": {**ATTN, "mlp.c_fc": "up", "mlp.c_proj": "down"},
    "deepseek_v2": {**MLA_V2, **experts(), **shared("mlp.shared_experts")},
    "deepseek_v3": {**MLA_V3, **experts(), **shared("mlp.shared_experts")},
}
FIRST_BLOCK = {"deepseek_v2": {**MLA_V2, **DENSE_MLP}, "deepseek_v3": {**MLA_V3, **DENSE_MLP}}

#: family -> {norm: (kind, position)} declared by its adapter (every norm of the last block)
NORMS: dict[str, dict[str, tuple[str, str]]] = {
    "llama": {"input_layernorm": ("rms", "attn"), "post_attention_layernorm": ("rms", "mlp")},
    "qwen3": {"input_layernorm": ("rms", "attn"), "post_attention_layernorm": ("rms", "mlp"),
              "self_attn.q_norm": ("rms", "qk"), "self_attn.k_norm": ("rms", "qk")},
    "gemma2": {"input_layernorm": ("rms", "attn"),  # OffsetRMSNorm after prepare: holds 1 + w
               "post_attention_layernorm": ("rms_offset", "attn_out"),
               "pre_feedforward_layernorm": ("rms", "mlp"),
               "post_feedforward_layernorm": ("rms_offset", "mlp_out")},
    "gemma3_text": {"input_layernorm": ("rms", "attn"),
                    "post_attention_layernorm": ("rms_offset", "attn_out"),
                    "pre_feedforward_layernorm": ("rms", "mlp"),
                    "post_feedforward_layernorm": ("rms_offset", "mlp_out"),
                    "self_attn.q_norm": ("rms_offset", "qk"),
                    "self_attn.k_norm": ("rms_offset", "qk")},
    "opt": {"self_attn_layer_norm": ("layer", "attn"), "final_layer_norm": ("layer", "mlp")},
    "opt_postln": {"self_attn_layer_norm": ("layer", "residual"),
                   "final_layer_norm": ("layer", "residual")},
    "falcon": {"input_layernorm": ("layer", "attn_mlp")},
    "falcon_new": {"ln_attn": ("layer", "attn"), "ln_mlp": ("layer", "mlp")},
    "phi": {"input_layernorm": ("layer", "attn_mlp")},
    "stablelm_parallel": {"input_layernorm": ("layer", "attn_mlp"),
                          "self_attn.q_layernorm": ("layer", "qk"),
                          "self_attn.k_layernorm": ("layer", "qk")},
    "deepseek_v3": {"input_layernorm": ("rms", "attn"), "post_attention_layernorm": ("rms", "mlp"),
                    "self_attn.q_a_layernorm": ("rms", "latent"),
                    "self_attn.kv_a_layernorm": ("rms", "latent")},
}


def expected_norms(family: str) -> dict[str, tuple[str, str]]:
    if family in NORMS:
        return NORMS[family]
    if family == "qwen3_moe":
        return NORMS["qwen3"]
    if family == "deepseek_v2":
        return {k: v for k, v in NORMS["deepseek_v3"].items() if "q_a" not in k}
    if family in ("bloom", "stablelm", "starcoder2"):
        return {k: ("layer", f) for k, (_, f) in NORMS["llama"].items()}
    return NORMS["llama"]


FINAL_KIND = {"gemma2": "rms_offset", "gemma3_text": "rms_offset", "opt": "layer",
              "opt_postln": None, "bloom": "layer", "falcon": "layer", "falcon_new": "layer",
              "phi": "layer", "stablelm": "layer", "stablelm_parallel": "layer",
              "starcoder2": "layer"}
#: where auto provides less than the family adapter: the scaling pair it cannot verify
AUTO_WITHHOLDS = {"qwen2_moe": {"scaling_pairs"}, "deepseek_v2": {"scaling_pairs"},
                  "deepseek_v3": {"scaling_pairs"}, "opt_postln": {"scaling_pairs"}}


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Any:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(family: str) -> nn.Module:
    """A tiny random model with norms and biases moved off their 1 / 0 init."""
    torch.manual_seed(0)
    cfg = tiny_family_config(family)
    model = auto_model_class(cfg).from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
            elif p.numel() > 1:
                p.add_(torch.randn_like(p) * 0.05)
    return model


def adapter_for(model_type: str) -> ModelAdapter:
    spec, _ = registry.load_spec("llmcq.models", model_type, field="model.type")
    return spec.load_impl()(spec, None)  # type: ignore[attr-defined]


def loaded(family: str, kind: str = "family") -> tuple[ModelAdapter, nn.Module]:
    adapter = adapter_for(FAMILIES[family] if kind == "family" else "auto")
    model = tiny(family)
    adapter.ensure_prepared(model)
    return adapter, model


def block_roles(adapter: ModelAdapter, model: nn.Module, i: int) -> dict[str, str]:
    block = adapter.blocks(model)[i]
    layout = adapter.block_layout(model, i)
    roles = {n: str(r) for g in resolve_block(block, layout, where=f"block {i}")
             for n, r in g.roles.items()}
    roles.update(zip(layout.float_linears, layout.float_roles))
    return roles


@torch.no_grad()
def norm_inputs(model: nn.Module, block: nn.Module, names: list[str]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    handles = [block.get_submodule(n).register_forward_pre_hook(
        lambda _m, args, _n=n: seen.setdefault(_n, args[0].detach().clone())) for n in names]
    try:
        model(input_ids=torch.randint(0, 500, (1, 24), generator=torch.Generator().manual_seed(1)),
              use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return seen


@torch.no_grad()
def folds_as(norm: nn.Module, x: torch.Tensor, kind: str) -> bool:
    """A scale folded into ``norm`` as ``kind`` divides its output by the scale."""
    import copy

    mods = [norm] if isinstance(getattr(norm, "weight", None), torch.Tensor) else \
        [m for m in norm.modules() if isinstance(getattr(m, "weight", None), torch.Tensor)]
    trial = copy.deepcopy(norm)
    tmods = [trial] if mods == [norm] else \
        [m for m in trial.modules() if isinstance(getattr(m, "weight", None), torch.Tensor)]
    width = mods[0].weight.numel()
    s = torch.rand(width, generator=torch.Generator().manual_seed(2)) * 1.5 + 0.5
    for m in tmods:
        scale_norm_(m, s, kind)
    ref, got = norm(x), trial(x)
    return float((got - ref / s).abs().max()) <= 1e-4 * float(ref.abs().max())


@torch.no_grad()
def centres(norm: nn.Module, x: torch.Tensor) -> bool:
    ref = norm(x)
    got = norm(x + torch.randn(*x.shape[:-1], 1, generator=torch.Generator().manual_seed(4)))
    return float((got - ref).abs().max()) <= 1e-4 * float(ref.abs().max())


# --------------------------------------------------------------------------- family adapters

@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_linear_has_its_role(family: str) -> None:
    adapter, model = loaded(family)
    n = len(adapter.blocks(model))
    for i in range(n):
        want = FIRST_BLOCK.get(family, ROLES[family]) if i == 0 else ROLES[family]
        assert block_roles(adapter, model, i) == want, (family, i)
        assert adapter.block_layout(model, i).has_roles


@pytest.mark.parametrize("family", list(FAMILIES))
def test_norm_kinds_fold_exactly_and_are_told_apart(family: str) -> None:
    adapter, model = loaded(family)
    last = len(adapter.blocks(model)) - 1
    layout = adapter.block_layout(model, last)
    block = adapter.blocks(model)[last]
    declared = {n.name: (n.kind, n.feeds) for n in layout.norms}
    assert declared == expected_norms(family)
    xs = norm_inputs(model, block, list(declared))
    others = {"rms": "rms_offset", "layer": "rms_offset", "rms_offset": "rms"}
    for name, (kind, _) in declared.items():
        norm, x = block.get_submodule(name), xs[name]
        assert folds_as(norm, x, kind), (name, kind)
        assert not folds_as(norm, x, others[kind]), (name, kind)
        assert centres(norm, x) == (kind == "layer"), (name, kind)
    want_final = FINAL_KIND.get(family, "rms")
    assert adapter.layout.final_norm_kind == want_final
    if want_final is not None:
        final = model.get_submodule(adapter.layout.final_norm)
        x = norm_inputs(model, model, [adapter.layout.final_norm])[adapter.layout.final_norm]
        assert folds_as(final, x, want_final)
        assert centres(final, x) == (want_final == "layer")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_spec_provides_what_the_loaded_layout_provides(family: str) -> None:
    spec, _ = registry.load_spec("llmcq.models", FAMILIES[family], field="model.type")
    adapter, model = loaded(family)
    provides, reasons = adapter.layout_facts(model)
    assert spec.provides is not None  # type: ignore[attr-defined]
    if family in DEFAULT_WIRING:
        assert provides == set(spec.provides), reasons  # type: ignore[attr-defined]
    else:  # a wiring variant is checked again at load; it never provides more
        assert provides <= set(spec.provides), reasons  # type: ignore[attr-defined]
    assert set(reasons) == {"scaling_pairs", "roles", "norm_kinds", "rotation_points"} - provides
    if "gemma" in family:
        assert "sandwich" in reasons["rotation_points"]
    if family in ("opt", "bloom"):
        assert "residual stream" in reasons["rotation_points"]


# --------------------------------------------------------------------------- auto

@pytest.mark.parametrize("family", list(FAMILIES))
def test_auto_infers_the_family_roles_kinds_and_facts(family: str) -> None:
    hand, hmodel = loaded(family)
    auto, amodel = loaded(family, "auto")
    assert auto.unroled == []  # type: ignore[attr-defined]
    for i in range(len(hand.blocks(hmodel))):
        assert block_roles(auto, amodel, i) == block_roles(hand, hmodel, i), (family, i)
        # the norms feeding linears: same kind (Gemma's are OffsetRMSNorm in the family
        # adapter, holding 1 + w: auto sees transformers' own 1 + w norm) and position
        hk = {n.name: (n.kind, n.feeds) for n in hand.block_layout(hmodel, i).norms}
        ak = {n.name: (n.kind, n.feeds) for n in auto.block_layout(amodel, i).norms}
        for g in hand.block_layout(hmodel, i).groups:
            if g.prev_kind == "norm" and g.prev_op:
                kind, feeds = hk[g.prev_op]
                if "gemma" in family:
                    kind = "rms_offset"
                assert ak[g.prev_op] == (kind, feeds), (family, i, g.prev_op)
        for name, site in hk.items():  # and every other norm the family declares
            if name in ak and "gemma" not in family:
                assert ak[name] == site, (family, i, name)
    assert auto.layout.final_norm_kind == hand.layout.final_norm_kind
    hp, _ = hand.layout_facts(hmodel)
    ap, why = auto.layout_facts(amodel)
    assert ap == hp - AUTO_WITHHOLDS.get(family, set()), why
    for fact in AUTO_WITHHOLDS.get(family, ()):
        assert "could not verify" in why[fact]
