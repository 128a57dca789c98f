"""llmcq.model.remove_blocks (layer pruning) on tiny models of several families: the smaller
model saves and reloads with the same logits; per-layer config fields follow the surviving
blocks; a periodic pattern the smaller model cannot keep is refused."""

from __future__ import annotations

import tempfile
from typing import Any

import pytest
import torch

from llmcq.errors import PluginError
from llmcq.model.remove_blocks import remove_blocks
from llmcq.testing.tiny_models import auto_model_class, tiny_family_config


def _model(family: str, layers: int = 4, **extra: Any) -> Any:
    cfg = tiny_family_config(family, 512)
    text = cfg.get_text_config()
    text.num_hidden_layers = layers
    if getattr(text, "layer_types", None) is not None:  # rebuilt for the new depth
        text.layer_types = None
    for k, v in extra.items():
        setattr(text, k, v)
    cfg = type(cfg)(**cfg.to_dict())
    torch.manual_seed(0)
    return auto_model_class(cfg).from_config(cfg).eval()


def _reload_diff(model: Any) -> float:
    ids = torch.randint(0, 500, (1, 40), generator=torch.Generator().manual_seed(1))
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        again = auto_model_class(model.config).from_pretrained(folder).eval()
        with torch.no_grad():
            return float((again(input_ids=ids).logits - model(input_ids=ids).logits)
                         .abs().max())


@pytest.mark.parametrize("family,path,drop", [
    ("deepseek_v2", "model.layers", [0, 2]),        # first_k_dense_replace 1 -> 0
    ("gemma3_text", "model.layers", [1, 3]),        # layer_types (5 sliding, 1 full)
    ("llava", "model.language_model.layers", [1]),  # the nested text config
    ("bloom", "transformer.h", [2]),                # n_layer through attribute_map
])
def test_smaller_model_reloads_with_the_same_logits(family: str, path: str,
                                                    drop: list[int]) -> None:
    model = _model(family, 6 if family == "gemma3_text" else 4)
    text = model.config.get_text_config()
    old_types = list(getattr(text, "layer_types", None) or [])
    n = text.num_hidden_layers
    keep = remove_blocks(model, path, drop)
    assert keep == [i for i in range(n) if i not in drop]
    assert text.num_hidden_layers == len(keep) == len(model.get_submodule(path))
    if old_types:
        assert text.layer_types == [old_types[i] for i in keep]
    if family == "deepseek_v2":
        assert text.first_k_dense_replace == 0  # block 0, the dense one, is gone
    for j, block in enumerate(model.get_submodule(path)):
        idx = {m.layer_idx for m in block.modules() if hasattr(m, "layer_idx")}
        assert idx <= {j}, (j, idx)
    assert _reload_diff(model) == 0.0


def test_a_periodic_pattern_removal_breaks_is_refused() -> None:
    model = _model("qwen2_moe", decoder_sparse_step=2)  # MoE on blocks 1 and 3
    with pytest.raises(PluginError) as err:
        remove_blocks(model, "model.layers", [1])
    assert "model.layers.1.mlp" in str(err.value) and "surviving block 2" in str(err.value)
    with pytest.raises(PluginError):
        remove_blocks(_model("llama"), "model.layers", [0, 1, 2, 3])
