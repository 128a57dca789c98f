"""The scaling and training algorithm classes on every family's hand-written adapter (tiny
random models, see test_families.py): AWQ (scale search + fold), SmoothQuant (W8A8 with
smoothing) and OmniQuant (learnable clipping + equivalent transformation, one epoch) run end
to end; the transformed float model exported by ``save_trans`` keeps the float logits (the
transforms are function-preserving) and ``save_fake`` reloads with the fake-quantized
logits. This is what docs/model_families.md reports per family.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from llmcq.config.loader import resolve_config
from llmcq.pipeline.runner import run
from llmcq.testing.tiny_models import auto_model_class, save_tiny_model, tiny_family_config

from llmcq_fake import load_fake_quant  # noqa: I001 - a plugin, installed with the suite

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe", "opt",
            "bloom", "falcon", "gemma2", "gemma3_text", "phi", "phi3", "stablelm",
            "starcoder2", "deepseek_v2", "deepseek_v3", "llava",
            "falcon_new", "opt_postln", "stablelm_parallel"]
#: wiring variants (see test_families.py) -> their family's model.type
VARIANT_OF = {"falcon_new": "falcon", "opt_postln": "opt", "stablelm_parallel": "stablelm"}

RECIPES: dict[str, dict[str, Any]] = {
    "awq": {"method": "awq", "special": {"trans": True, "trans_version": "v2", "n_grid": 5,
                                         "weight_clip": False}},
    "smoothquant": {"method": "smoothquant", "special": {"alpha": 0.5},
                    "act": {"bit": 8, "symmetric": True, "granularity": "per_token"},
                    "weight": {"bit": 8, "symmetric": True, "granularity": "per_channel"}},
    "omniquant": {"method": "omniquant", "special": {"lwc": True, "let": True, "epochs": 1},
                  "weight": {"bit": 4, "symmetric": False, "granularity": "per_group",
                             "group_size": 16, "calib_algo": "learnable"}},
}


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Any:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Any) -> Any:
    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            folder = tmp_path_factory.mktemp(f"alg-{family}")
            cfg = tiny_family_config(family, vocab_size=len(tiny_tokenizer))
            cache[family] = save_tiny_model(folder, cfg, tiny_tokenizer, perturb_vectors=True)
        return cache[family]

    return get


MOE = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3")


def reload_prepared(adapter: Any, folder: Path) -> Any:
    """A fake-quant folder loaded through the family adapter (MoE experts split per expert,
    as quantized), with the activation settings of ``llmcq_quant.json`` re-applied: what
    ``llmcq_fake.load_fake_quant`` does for models transformers loads with that layout."""
    import json

    from llmcq.model.loading import ModelSource
    from llmcq.quant.fake import FakeQuantLinear, set_module
    from llmcq.quant.spec import ActQuantSpec

    model, _ = adapter.load(ModelSource(folder))
    meta = json.loads((folder / "llmcq_quant.json").read_text())
    for name, layer in meta["layers"].items():
        if layer["act"] is None:
            continue
        lin = model.get_submodule(name)
        scale = layer["act_scale"]
        zero = layer["act_zero"]
        set_module(model, name, FakeQuantLinear(
            lin.weight.data, lin.bias.data if lin.bias is not None else None,
            act=ActQuantSpec.from_dict(layer["act"]),
            act_scale=None if scale is None else torch.tensor(scale),
            act_zero=None if zero is None else torch.tensor(zero)))
    return model.float().eval()


def _logits(model: Any, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x, use_cache=False).logits.float()


def _close(a: torch.Tensor, b: torch.Tensor, rel: float) -> bool:
    return float((a - b).abs().max()) <= rel * max(1.0, float(b.abs().max()))


@pytest.mark.parametrize("method", list(RECIPES))
@pytest.mark.parametrize("family", FAMILIES)
def test_algorithm_class_runs_and_exports(family: str, method: str, dirs: Any,
                                          tmp_path: Path) -> None:
    from llmcq.model.loading import ModelSource
    from llmcq.plugins import registry

    folder = dirs(family)
    mtype = VARIANT_OF.get(family, family)
    spec, _ = registry.load_spec("llmcq.models", mtype, field="model.type")
    adapter = spec.load_impl()(spec, None)  # type: ignore[attr-defined]
    model, tok = adapter.load(ModelSource(folder))
    model.float()
    x = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(5))
    float_logits = _logits(model, x)
    recipe = RECIPES[method]
    quant = {"method": recipe["method"], "special": recipe["special"],
             "weight": recipe.get("weight", {"bit": 4, "symmetric": False,
                                             "granularity": "per_group", "group_size": 16})}
    if "act" in recipe:
        quant["act"] = recipe["act"]
    cfg = {"base": {"seed": 0, "device": "cpu"}, "model": {"type": mtype, "path": str(folder)},
           # one calibration batch (many small batches: test_awq_on_moe_with_many_small_batches)
           "calib": {"name": "random", "n_samples": 4, "seq_len": 32, "bs": -1, "seed": 1},
           "quant": quant,
           "save": {"save_path": str(tmp_path / "out"), "save_trans": True, "save_fake": True}}
    res = run(resolve_config(cfg), progress=False, model=model, tokenizer=tok)
    assert res["quantized_linears"] > 0
    fake_logits = _logits(model, x)
    cls = auto_model_class(model.config)
    trans = cls.from_pretrained(str(tmp_path / "out" / "transformed_model")).float().eval()
    # scaling/LET are function-preserving; OmniQuant's clipping lives in the records only
    assert _close(_logits(trans, x), float_logits, 2e-3), method
    if family == "llava" or (family in MOE and "act" in recipe):
        fake = reload_prepared(adapter, tmp_path / "out" / "fake_quant_model")
    else:
        fake = load_fake_quant(tmp_path / "out" / "fake_quant_model").float()
    # with activation quantization, a last-bit difference in a norm's output (Gemma stores
    # 1 + w as w) can move a token's activation across a rounding boundary
    assert _close(_logits(fake, x), fake_logits, 1e-2 if "act" in recipe else 1e-4), method
    assert not _close(fake_logits, float_logits, 1e-4)


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_awq_on_moe_with_many_small_batches(family: str, clip: bool, dirs: Any,
                                            tmp_path: Path) -> None:
    """With one sample per batch, some experts get no token in some batches: AWQ searches
    each expert's scale (and clip range) on the batches that reached it. Without clipping
    the scaled model keeps its float logits."""
    from llmcq.model.loading import ModelSource
    from llmcq.plugins import registry

    folder = dirs(family)
    spec, _ = registry.load_spec("llmcq.models", family, field="model.type")
    adapter = spec.load_impl()(spec, None)  # type: ignore[attr-defined]
    model, tok = adapter.load(ModelSource(folder))
    model.float()
    x = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(5))
    float_logits = _logits(model, x)
    cfg = {"base": {"seed": 0, "device": "cpu"}, "model": {"type": family, "path": str(folder)},
           "calib": {"name": "random", "n_samples": 8, "seq_len": 8, "bs": 1, "seed": 3},
           "quant": {"method": "awq", "special": {"trans": True, "trans_version": "v2",
                                                  "n_grid": 5, "weight_clip": clip},
                     "weight": {"bit": 4, "symmetric": False, "granularity": "per_group",
                                "group_size": 16}},
           "save": {"save_path": str(tmp_path / "out"), "save_trans": True}}
    res = run(resolve_config(cfg), progress=False, model=model, tokenizer=tok)
    summary = res["recipe"][0]
    n_blocks = model.config.num_hidden_layers
    # attention pairs alone give at most 2 groups a block; the rest are experts' up -> down
    assert summary["groups_scaled"] > 2 * n_blocks, summary
    if clip:
        assert summary.get("linears_clipped", 0) > 0, summary
        return
    cls = auto_model_class(model.config)
    trans = cls.from_pretrained(str(tmp_path / "out" / "transformed_model")).float().eval()
    assert _close(_logits(trans, x), float_logits, 2e-3)
