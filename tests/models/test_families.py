"""Every model family, and ``model.type: auto`` on each, on tiny random models built offline
from transformers configs (hidden 64, 2 blocks; MoE with 4 experts):

* the block description covers every linear of every block exactly once (routers float);
* the layout's embeddings / pre-block modules / final norm / head reproduce the logits when
  the model is run block by block (what calibration and per-block evaluation do);
* folding a random positive scale into every scaling pair leaves the logits unchanged;
* RTN and GPTQ run end to end, and ``save_trans`` / ``save_fake`` reload with the logits of
  the float / fake-quantized model;
* the automatic adapter finds the hand-written layout, roles included (it learns Gemma's
  ``1 + weight`` norms and folds into them as such).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from llmcq.config.loader import resolve_config
from llmcq.errors import ConfigError, PluginError
from llmcq.model.adapter import ModelAdapter, linear_names, resolve_block
from llmcq.model.loading import ModelSource
from llmcq.pipeline.blockwise import capture_block_inputs
from llmcq.pipeline.runner import run
from llmcq.plugins import registry
from llmcq.testing.tiny_models import auto_model_class, save_tiny_model, tiny_family_config
from llmcq.transforms.scaling import fold_scale

#: tiny-config key -> model.type of its hand-written adapter
FAMILIES = {
    "llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3",
    "mixtral": "mixtral", "qwen2_moe": "qwen2_moe", "qwen3_moe": "qwen3_moe", "opt": "opt",
    "bloom": "bloom", "falcon": "falcon", "gemma2": "gemma2", "gemma3_text": "gemma3_text",
    "phi": "phi", "phi3": "phi3", "stablelm": "stablelm", "starcoder2": "starcoder2",
    "deepseek_v2": "deepseek_v2", "deepseek_v3": "deepseek_v3", "llava": "llava",
    # other wirings of a family: Falcon-40B style (two norms, GQA), OPT-350m style (post-LN,
    # project_in/out), StableLM-2-12B style (parallel residual, per-head q/k norms)
    "falcon_new": "falcon", "opt_postln": "opt", "stablelm_parallel": "stablelm",
    "ministral": "mistral",
}
#: llmc's model.type spellings that must resolve (case-insensitive) to our adapters
LLMC_NAMES = {"Llama": "llama", "SmolLM": "llama", "Mistral": "mistral", "Mixtral": "mixtral",
              "Qwen2": "qwen2", "Qwen2Moe": "qwen2_moe", "Opt": "opt", "Bloom": "bloom",
              "Falcon": "falcon", "Gemma2": "gemma2", "Phi": "phi", "Phi3": "phi3",
              "StableLm": "stablelm", "DeepseekV2": "deepseek_v2", "DeepseekV3": "deepseek_v3",
              "LlavaHf": "llava"}
#: what auto must report as unverifiable (the same groups the hand adapters leave unscaled
#: on purpose: a norm that also feeds the router, or the residual of a post-LN block)
AUTO_AMBIGUOUS = {
    "qwen2_moe": "mlp.shared_expert.gate_proj, mlp.shared_expert.up_proj: their input is "
                 "post_attention_layernorm's output",
    "deepseek_v2": "model.layers.1: mlp.shared_experts.gate_proj",
    "deepseek_v3": "model.layers.1: mlp.shared_experts.gate_proj",
    "opt_postln": "fc1: their input is self_attn_layer_norm's output",
}

#: architectures with no family adapter (not in llmc, or InternLM3/MiniCPM3 standing in for
#: InternLM2/MiniCPM, whose modeling code transformers does not ship): auto only
AUTO_ONLY = ["gpt_neox", "gpt_bigcode", "internlm3", "minicpm3", "olmo2"]

PARAMS = [pytest.param(f, a, id=f"{f}-{a}") for f in FAMILIES for a in ("family", "auto")] + \
    [pytest.param(f, "auto", id=f"{f}-auto") for f in AUTO_ONLY]


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Any:
    """Tiny matrices: one thread is much faster than two on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Any) -> Any:
    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            folder = tmp_path_factory.mktemp(f"tiny-{family}")
            cfg = tiny_family_config(family, vocab_size=len(tiny_tokenizer))
            cache[family] = save_tiny_model(folder, cfg, tiny_tokenizer, perturb_vectors=True)
        return cache[family]

    return get


def adapter_for(model_type: str) -> ModelAdapter:
    spec, _ = registry.load_spec("llmcq.models", model_type, field="model.type")
    return spec.load_impl()(spec, None)  # type: ignore[attr-defined]


def load(folder: Path, kind: str, family: str) -> tuple[ModelAdapter, nn.Module, Any]:
    adapter = adapter_for(FAMILIES.get(family, "auto") if kind == "family" else "auto")
    model, tok = adapter.load(ModelSource(folder))
    model.float()
    return adapter, model, tok


def ids(n: int = 2, length: int = 24, vocab: int = 500) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(3))


@torch.no_grad()
def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(input_ids=x, use_cache=False).logits.float()


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-4) -> bool:
    return float((a - b).abs().max()) <= rel * max(1.0, float(b.abs().max()))


def block_groups(adapter: ModelAdapter, model: nn.Module) -> list[list[Any]]:
    blocks = adapter.blocks(model)
    return [resolve_block(b, adapter.block_layout(model, i), where=f"block {i}")
            for i, b in enumerate(blocks)]


# --------------------------------------------------------------------------- layout

@pytest.mark.parametrize("family,kind", PARAMS)
def test_layout_covers_every_linear_once(family: str, kind: str, family_dirs: Any) -> None:
    adapter, model, _ = load(family_dirs(family), kind, family)
    for i, (block, groups) in enumerate(zip(adapter.blocks(model), block_groups(adapter, model),
                                            strict=True)):
        layout = adapter.block_layout(model, i)
        listed = [n for g in groups for n in g.linears]
        assert len(listed) == len(set(listed))
        floats = set(layout.float_linears)
        assert set(listed) | floats == set(linear_names(block)), (family, i)
        # only router-like linears may be left float
        for name in floats:
            assert block.get_submodule(name).out_features <= 4, name
    # the head is not a block linear; MoE experts are nn.Linear after prepare()
    assert isinstance(adapter.lm_head(model), nn.Linear)


@pytest.mark.parametrize("family,kind", PARAMS)
def test_blockwise_forward_reproduces_logits(family: str, kind: str, family_dirs: Any) -> None:
    """embeddings + pre-block modules, blocks one by one, final norm + head = the model."""
    adapter, model, _ = load(family_dirs(family), kind, family)
    x = ids()
    ref = logits(model, x)
    inputs = capture_block_inputs(model, adapter, [x], torch.device("cpu"))
    for block in adapter.blocks(model):
        inputs.advance(block)
    with torch.no_grad():
        got = adapter.head_logits(model, inputs.hidden[0]).float()
    # (MiniCPM3 and Granite divide by config.logits_scaling before or after the head, Gemma
    # soft-caps: auto's head_logits does both; core's check_head confirms it on a probe)
    assert close(got, ref), float((got - ref).abs().max())
    assert adapter.check_head(model) is None


@pytest.mark.parametrize("family,kind", PARAMS)
def test_scale_folding_preserves_logits(family: str, kind: str, family_dirs: Any) -> None:
    adapter, model, _ = load(family_dirs(family), kind, family)
    x = ids()
    ref = logits(model, x)
    heads = adapter.attention_heads(model)
    gen = torch.Generator().manual_seed(11)
    scaled = 0
    for groups in block_groups(adapter, model):
        for g in groups:
            if g.prev_op is None:
                continue
            width = next(iter(g.linears.values())).in_features
            n = g.prev_op.out_features if isinstance(g.prev_op, nn.Linear) else width
            s = torch.rand(n, generator=gen) * 1.5 + 0.5
            kw = {"n_heads": heads[0], "n_kv_heads": heads[1]} if n != width else {}
            fold_scale(g, s, **kw)
            scaled += 1
    got = logits(model, x)
    assert close(got, ref), (scaled, float((got - ref).abs().max()))
    n_blocks = len(adapter.blocks(model))
    if family == "olmo2":  # post-norm blocks: only v -> o and up -> down
        assert scaled == 2 * n_blocks
    elif family in ("phi", "phi3", "bloom", "falcon", "falcon_new", "gpt_neox", "gpt_bigcode",
                    "opt_postln", "stablelm_parallel"):
        assert scaled >= n_blocks  # fused qkv / parallel branches: fewer pairs
    else:
        assert scaled >= 3 * n_blocks


# --------------------------------------------------------------------------- end to end

def _config(folder: Path, save: Path, method: str, model_type: str | None,
            **save_flags: bool) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "base": {"seed": 0, "device": "cpu"},
        "model": {"path": str(folder)},
        "quant": {"method": method, "weight": {"bit": 4, "symmetric": False,
                                               "granularity": "per_group", "group_size": 16}},
        "save": {"save_path": str(save), **save_flags},
    }
    if model_type is not None:
        cfg["model"]["type"] = model_type
    if method != "rtn":
        cfg["calib"] = {"name": "random", "n_samples": 4, "seq_len": 32, "bs": 2, "seed": 1}
    return cfg


@pytest.mark.parametrize("family,kind", PARAMS)
def test_rtn_and_gptq_run_and_exports_reload(family: str, kind: str, family_dirs: Any,
                                            tmp_path: Path) -> None:
    folder = family_dirs(family)
    mtype = FAMILIES[family] if kind == "family" else "auto"
    if family in AUTO_ONLY:
        mtype = None  # no model.type: the automatic adapter is the default
    cls = auto_model_class(tiny_family_config(family))
    x = ids()
    for method in ("rtn", "gptq"):
        adapter, model, tok = load(folder, kind, family)
        float_logits = logits(model, x)
        n_linears = sum(len(g.linears) for gs in block_groups(adapter, model) for g in gs)
        out = tmp_path / method
        # GPTQ transforms nothing: its transformed export is RTN's, tested once
        res = run(resolve_config(_config(folder, out, method, mtype, save_fake=True,
                                         save_trans=method == "rtn")),
                  progress=False, model=model, tokenizer=tok)
        assert res["quantized_linears"] == n_linears > 0
        fake_logits = logits(model, x)
        assert not close(fake_logits, float_logits, 1e-3)
        fake = cls.from_pretrained(str(out / "fake_quant_model")).float().eval()
        assert close(logits(fake, x), fake_logits, 1e-5), method
        if method == "rtn":
            trans = cls.from_pretrained(str(out / "transformed_model")).float().eval()
            assert close(logits(trans, x), float_logits, 1e-5), method


# --------------------------------------------------------------------------- auto

def _signature(adapter: ModelAdapter, model: nn.Module) -> list[set[tuple[Any, ...]]]:
    out = []
    for i, groups in enumerate(block_groups(adapter, model)):
        layout = adapter.block_layout(model, i)
        sig = {(frozenset(g.linears), g.spec.prev_op, g.spec.prev_kind, g.spec.inspect,
                g.spec.inspect_kwargs, frozenset((n, str(r)) for n, r in g.roles.items()))
               for g in groups}
        sig.add(("float", frozenset(zip(layout.float_linears, layout.float_roles))))
        out.append(sig)
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_auto_finds_the_family_layout(family: str, family_dirs: Any) -> None:
    folder = family_dirs(family)
    hand, hmodel, _ = load(folder, "family", family)
    auto, amodel, _ = load(folder, "auto", family)
    assert auto.layout.blocks == hand.layout.blocks
    assert auto.layout.lm_head == hand.layout.lm_head
    assert auto.layout.final_norm == hand.layout.final_norm
    assert set(hand.layout.embeddings) <= set(auto.layout.embeddings)
    if family in AUTO_AMBIGUOUS:
        assert any(AUTO_AMBIGUOUS[family] in m for m in auto.ambiguous), auto.ambiguous
        assert all("router" in m and "residual" in m for m in auto.ambiguous)
    else:
        assert auto.ambiguous == []
    assert auto.unroled == []  # type: ignore[attr-defined]
    h, a = _signature(hand, hmodel), _signature(auto, amodel)
    assert h == a, (h, a)


def test_auto_reports_and_refuses_scaling_on_ambiguous_parts(family_dirs: Any,
                                                             tmp_path: Path) -> None:
    """Qwen2-MoE's shared expert reads the norm the router reads: auto cannot verify that
    pair, withholds scaling pairs, and core refuses AWQ naming the parts (never the name)."""
    folder = family_dirs("qwen2_moe")
    cfg = _config(folder, tmp_path / "awq", "awq", "auto")
    adapter, model, tok = load(folder, "auto", "qwen2_moe")
    assert "scaling_pairs" not in adapter.layout_facts(model)[0]
    with pytest.raises(ConfigError) as err:
        run(resolve_config(cfg), progress=False, model=model, tokenizer=tok)
    msg = str(err.value)
    assert "model.layers.0 (and the 1 other blocks built like it): " \
           "mlp.shared_expert.gate_proj, mlp.shared_expert.up_proj" in msg
    assert "scale" in msg and "auto" in msg
    # the same model with GPTQ (no layout needs) runs
    adapter, model, tok = load(folder, "auto", "qwen2_moe")
    res = run(resolve_config(_config(folder, tmp_path / "gptq", "gptq", "auto")),
              progress=False, model=model, tokenizer=tok)
    assert res["quantized_linears"] == 2 * (4 + 4 * 3 + 3)


def test_auto_runs_awq_on_gemma2_and_keeps_the_function(family_dirs: Any,
                                                        tmp_path: Path) -> None:
    """auto learns Gemma's 1 + w norms (rms_offset), folds AWQ's scales into them as
    w' = (1 + w) / s - 1, and the transformed model keeps the float logits."""
    folder = family_dirs("gemma2")
    adapter, model, tok = load(folder, "auto", "gemma2")
    assert adapter.ambiguous == [] and "scaling_pairs" in adapter.layout_facts(model)[0]
    kinds = {n.name: n.kind for n in adapter.block_layout(model, 0).norms}
    assert kinds["input_layernorm"] == kinds["pre_feedforward_layernorm"] == "rms_offset"
    x = ids()
    ref = logits(model, x)
    norm_before = model.model.layers[0].input_layernorm.weight.clone()
    cfg = _config(folder, tmp_path / "awq", "awq", "auto", save_trans=True)
    cfg["quant"]["special"] = {"trans": True, "trans_version": "v2", "n_grid": 5,
                               "weight_clip": False}
    res = run(resolve_config(cfg), progress=False, model=model, tokenizer=tok)
    assert res["recipe"][0]["groups_scaled"] >= 3 * 2  # both norm pairs and up -> down
    trans = auto_model_class(model.config).from_pretrained(str(tmp_path / "awq" /
                                                               "transformed_model"))
    assert not torch.equal(trans.model.layers[0].input_layernorm.weight.float(), norm_before)
    assert close(logits(trans.float(), x), ref, 2e-3)


def test_auto_allows_scaling_when_every_pair_is_verified(family_dirs: Any,
                                                         tmp_path: Path) -> None:
    folder = family_dirs("qwen2")
    adapter, model, tok = load(folder, "auto", "qwen2")
    assert adapter.ambiguous == []
    x = ids()
    ref = logits(model, x)
    cfg = _config(folder, tmp_path / "sq", "smoothquant", "auto", save_trans=True)
    cfg["quant"]["act"] = {"bit": 8, "symmetric": True, "granularity": "per_token"}
    run(resolve_config(cfg), progress=False, model=model, tokenizer=tok)
    trans = auto_model_class(model.config).from_pretrained(str(tmp_path / "sq" /
                                                               "transformed_model"))
    assert close(logits(trans.float(), x), ref, 1e-4)


def test_unknown_family_defaults_to_auto(family_dirs: Any, tmp_path: Path,
                                         llmcq_cli: Any) -> None:
    """GPT-NeoX has no family adapter: no model.type -> auto, through the CLI."""
    import json

    import yaml

    folder = family_dirs("gpt_neox")
    resolved = resolve_config(_config(folder, tmp_path / "x", "gptq", None))
    assert resolved.model[0].name == "auto"
    assert any("automatic adapter" in n for n in resolved.notes)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_config(folder, tmp_path / "out", "gptq", None,
                                           save_fake=True)))
    res = llmcq_cli("run", str(path), env={"OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res
    r = json.loads((tmp_path / "out" / "results.json").read_text())
    assert r["quantized_linears"] == 2 * 4
    assert r["calibration"]["tokens"] == 4 * 32


@pytest.mark.parametrize("llmc_name,ours", list(LLMC_NAMES.items()))
def test_llmc_model_type_names_resolve(llmc_name: str, ours: str) -> None:
    spec, _ = registry.load_spec("llmcq.models", llmc_name, field="model.type")
    assert spec.name == ours


def test_layout_errors_name_the_missing_linear(family_dirs: Any) -> None:
    adapter, model, _ = load(family_dirs("mixtral"), "family", "mixtral")
    layout = adapter.block_layout(model, 0)
    broken = dataclasses.replace(layout, groups=layout.groups[:-1])  # drop the last expert's down
    with pytest.raises(PluginError, match="not covered: mlp.experts.3.w2"):
        resolve_block(adapter.blocks(model)[0], broken, where="model.layers.0")


@pytest.mark.parametrize("llmc_name", ["Starcoder", "InternLM2", "MiniCPM"])
def test_llmc_names_without_an_adapter_use_auto(llmc_name: str, family_dirs: Any,
                                                tmp_path: Path) -> None:
    cfg = _config(family_dirs("gpt_bigcode"), tmp_path / "o", "rtn", llmc_name)
    resolved = resolve_config(cfg)
    assert resolved.model[0].name == "auto"
    assert any(llmc_name in n and "automatic adapter" in n for n in resolved.notes)
    with pytest.raises(ConfigError, match="model.type"):
        resolve_config(_config(family_dirs("gpt_bigcode"), tmp_path / "o", "rtn", "Starcodr"))
