"""The automatic adapter: a :class:`~llmcq.model.adapter.ModelAdapter` whose layout comes
from tracing the loaded model (:mod:`llmcq_auto.trace`)."""

from __future__ import annotations

import copy
import logging
import weakref
from typing import Any

import torch
from torch import nn

from llmcq.errors import ConfigError, PluginError
from llmcq.model.adapter import ModelAdapter
from llmcq.model.layout import BlockLayout, ModelLayout
from llmcq.model.moe import checkpoint_expert_names, unfuse_experts
from llmcq_auto import SAFE_ALGORITHMS
from llmcq_auto.trace import structure_key, trace_block, trace_model

__all__ = ["AutoAdapter", "TRACE_TOKENS"]

log = logging.getLogger("llmcq")

#: random tokens in the tracing input (enough for every expert of a small MoE to be hit)
TRACE_TOKENS = 128

#: what tracing found, per model object (a second adapter instance on the same model, as
#: when a loaded model is handed to ``llmcq.pipeline.runner.run``, does not trace again)
_TRACES: weakref.WeakKeyDictionary[nn.Module, dict[str, Any]] = weakref.WeakKeyDictionary()


def _text_config(model: nn.Module) -> Any:
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _auto_class_for(source: Any) -> str:
    if getattr(source, "gguf_file", None):
        return "AutoModelForCausalLM"
    try:
        from transformers import AutoConfig
        from transformers.models.auto.modeling_auto import (
            MODEL_FOR_CAUSAL_LM_MAPPING,
            MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING,
        )

        cfg = AutoConfig.from_pretrained(str(source.folder))
        if type(cfg) not in MODEL_FOR_CAUSAL_LM_MAPPING and \
                type(cfg) in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING:
            return "AutoModelForImageTextToText"
    except Exception:  # let the loader report what is wrong with the checkpoint
        pass
    return "AutoModelForCausalLM"


class AutoAdapter(ModelAdapter):
    """Layout found by tracing; see the package docstring."""

    @property  # type: ignore[override]
    def layout(self) -> ModelLayout:  # set per model by prepare()
        found = self.__dict__.get("_layout")
        if found is None:
            raise PluginError("model.type auto: the model has not been traced yet; call "
                              "adapter.ensure_prepared(model) (load() and blocks() do)",
                              stage="layout")
        return found

    @layout.setter
    def layout(self, value: ModelLayout) -> None:
        self.__dict__["_layout"] = value

    def __init__(self, spec: Any = None, config: Any = None) -> None:
        super().__init__(spec, config)
        self._block_layouts: dict[int, BlockLayout] = {}
        #: "block part: reason" for everything the trace could not verify
        self.ambiguous: list[str] = []
        self.notes: list[str] = []
        #: why head_logits cannot be trusted (per-block evaluation), if it cannot
        self.head_problem: str | None = None

    def load(self, source: Any) -> tuple[Any, Any]:
        """Load with the causal-LM auto class, or the image-text-to-text one for a
        vision-language checkpoint (whose language model is then what gets quantized)."""
        self.auto_class = _auto_class_for(source)
        return super().load(source)

    # ------------------------------------------------------------------ discovery

    @torch.no_grad()
    def prepare(self, model: nn.Module) -> None:
        cached = _TRACES.get(model)
        if cached is not None:  # traced by another AutoAdapter instance: reuse
            self.__dict__.update(copy.copy(cached))
            self.ambiguous = list(cached["ambiguous"])
            return
        self._trace(model)
        _TRACES[model] = {k: self.__dict__[k] for k in ("_layout", "_block_layouts",
                                                         "ambiguous", "notes", "head_problem",
                                                         "_post_block")}

    def _trace(self, model: nn.Module) -> None:
        names = checkpoint_expert_names(getattr(model.config, "model_type", None))
        if unfuse_experts(model, **({"names": names} if names else {})):
            self.notes.append("experts stored as 3D tensors were split into one module per "
                              "expert")
        vocab = model.get_input_embeddings().num_embeddings
        device = next(model.parameters()).device
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (1, TRACE_TOKENS), generator=gen).to(device)
        mt = trace_model(model, ids)
        blocks = model.get_submodule(mt.blocks)
        hidden, kwargs = mt.block_input
        heads = self.attention_heads(model)
        by_structure: dict[Any, BlockLayout] = {}
        found: dict[Any, list[str]] = {}
        members: dict[Any, list[int]] = {}
        for i, block in enumerate(blocks):
            key = structure_key(block)
            if key not in by_structure:
                bt = trace_block(block, hidden, kwargs, heads=heads, config=model.config,
                                 seed=i)
                by_structure[key] = bt.layout
                found[key] = bt.ambiguous
            members.setdefault(key, []).append(i)
            self._block_layouts[i] = by_structure[key]
        for key, msgs in found.items():
            idx = members[key]
            where = f"{mt.blocks}.{idx[0]}" + (f" (and the {len(idx) - 1} other blocks "
                                                "built like it)" if len(idx) > 1 else "")
            self.ambiguous += [f"{where}: {a}" for a in msgs]
        self.layout = ModelLayout(blocks=mt.blocks, embeddings=mt.embeddings,
                                  final_norm=mt.final_norm, lm_head=mt.lm_head,
                                  block=self._block_layouts[0], pre_block=mt.pre_block)
        self._post_block = mt.post_block
        self._check_head(model, ids, mt.blocks)
        for a in self.ambiguous:
            log.warning("model.type auto: %s", a)

    def _check_head(self, model: nn.Module, ids: torch.Tensor, blocks_name: str) -> None:
        last: dict[str, torch.Tensor] = {}
        blocks = model.get_submodule(blocks_name)

        def keep(_m: nn.Module, _a: Any, out: Any) -> None:
            last["h"] = out[0] if isinstance(out, (tuple, list)) else out

        h = blocks[len(blocks) - 1].register_forward_hook(keep)
        try:
            logits = model(input_ids=ids, use_cache=False).logits
        finally:
            h.remove()
        self.head_problem = None
        try:
            mine = self.head_logits(model, last["h"])
            ok = mine.shape == logits.shape and torch.allclose(mine.float(), logits.float(),
                                                               atol=1e-4, rtol=1e-3)
        except Exception:
            ok = False
        if not ok:
            self.head_problem = ("final norm -> head does not reproduce the model's logits "
                                 "(extra scaling or code between them)")
            log.warning("model.type auto: %s; per-block evaluation is refused",
                        self.head_problem)

    # ------------------------------------------------------------------ adapter API

    def block_layout(self, model: nn.Module, index: int) -> BlockLayout:
        self.ensure_prepared(model)
        return self._block_layouts[index]

    def attention_heads(self, model: nn.Module) -> tuple[int, int]:
        cfg = _text_config(model)
        heads = int(getattr(cfg, "num_attention_heads", 1) or 1)
        kv = getattr(cfg, "num_key_value_heads", None) or heads
        if getattr(cfg, "multi_query", False) and not getattr(cfg, "new_decoder_architecture",
                                                               False):
            kv = 1
        return heads, int(kv)

    def head_logits(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        if getattr(self, "head_problem", None):
            raise PluginError(f"model.type auto: {self.head_problem}; set "
                              "eval.inference_per_block: False", stage="evaluate")
        if self.layout.final_norm:
            hidden = model.get_submodule(self.layout.final_norm)(hidden)
        for name in getattr(self, "_post_block", ()):
            hidden = model.get_submodule(name)(hidden)
        logits = model.get_submodule(self.layout.lm_head)(hidden)
        cap = getattr(_text_config(model), "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def check_recipe(self, model: nn.Module, methods: list[str]) -> None:
        """Refuse scaling-based algorithms when part of the layout could not be verified."""
        self.ensure_prepared(model)
        unsafe = [m for m in methods if m not in SAFE_ALGORITHMS]
        if self.ambiguous and unsafe:
            parts = "; ".join(self.ambiguous)
            raise ConfigError("quant.method", ", ".join(methods),
                              allowed=", ".join(SAFE_ALGORITHMS),
                              reason=f"model.type auto could not verify every scaling pair of "
                                     f"this model ({parts}); {', '.join(unsafe)} moves scales "
                                     "between modules, so only algorithms without scaling "
                                     "pairs may run (or write a family adapter)")
