"""The automatic adapter: a :class:`~llmcq.model.adapter.ModelAdapter` whose layout comes
from tracing the loaded model (:mod:`llmcq_auto.trace`)."""

from __future__ import annotations

import copy
import logging
import weakref
from typing import Any

import torch
from torch import nn

from llmcq.errors import PluginError
from llmcq.model.adapter import ModelAdapter
from llmcq.model.layout import BlockLayout, ModelLayout
from llmcq.model.moe import checkpoint_expert_names, unfuse_experts
from llmcq_auto.infer import norm_kind
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
        #: "block part: reason" for every scaling pair or group the trace could not verify
        self.ambiguous: list[str] = []
        #: "block linear: reason" for every linear whose role could not be inferred
        self.unroled: list[str] = []
        #: "block norm: reason" for every norm whose kind or position could not be found
        self.unplaced: list[str] = []
        #: why the residual stream cannot be rotated (modules before or after the blocks)
        self.rotation_blockers: list[str] = []
        self.notes: list[str] = []

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
            for k in ("ambiguous", "unroled", "unplaced", "rotation_blockers", "notes"):
                self.__dict__[k] = list(cached[k])
            return
        self._trace(model)
        _TRACES[model] = {k: self.__dict__[k] for k in _TRACED}

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
        found: dict[Any, Any] = {}
        members: dict[Any, list[int]] = {}
        for i, block in enumerate(blocks):
            key = structure_key(block)
            if key not in by_structure:
                bt = trace_block(block, hidden, kwargs, heads=heads, config=model.config,
                                 seed=i)
                by_structure[key] = bt.layout
                found[key] = bt
            members.setdefault(key, []).append(i)
            self._block_layouts[i] = by_structure[key]
        for key, bt in found.items():
            idx = members[key]
            where = f"{mt.blocks}.{idx[0]}" + (f" (and the {len(idx) - 1} other blocks "
                                                "built like it)" if len(idx) > 1 else "")
            self.ambiguous += [f"{where}: {a}" for a in bt.ambiguous]
            self.unroled += [f"{where}: {a}" for a in bt.unroled]
            self.unplaced += [f"{where}: {a}" for a in bt.unplaced]
        final_kind = None
        if mt.final_norm is not None:
            final_kind = norm_kind(copy.deepcopy(model.get_submodule(mt.final_norm)).float(),
                                   mt.final_norm_input)
            if final_kind is None:
                self.unplaced.append(f"{mt.final_norm}: its kind (RMSNorm, LayerNorm or "
                                     "1 + w) could not be recognised")
        for name in mt.pre_block:
            if any(True for _ in model.get_submodule(name).parameters()):
                self.rotation_blockers.append(
                    f"{name} (run before the blocks) has weights and changes the residual "
                    "stream besides the embeddings")
        for name in mt.post_block:
            self.rotation_blockers.append(f"{name} runs between the last block and the head")
        self.layout = ModelLayout(blocks=mt.blocks, embeddings=mt.embeddings,
                                  final_norm=mt.final_norm, lm_head=mt.lm_head,
                                  block=self._block_layouts[0], pre_block=mt.pre_block,
                                  final_norm_kind=final_kind,
                                  rotation_blockers=tuple(self.rotation_blockers))
        self._post_block = mt.post_block
        for a in self.ambiguous + self.unroled:
            log.warning("model.type auto: %s", a)

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
        """Final norm, any module the trace found between the last block and the head, the
        head, then the config's logit scaling (Granite's ``logits_scaling``) and soft-capping
        (Gemma's ``final_logit_softcapping``). Core's :meth:`check_head` compares the result
        with the model's logits before a per-block evaluation."""
        if self.layout.final_norm:
            hidden = model.get_submodule(self.layout.final_norm)(hidden)
        for name in getattr(self, "_post_block", ()):
            hidden = model.get_submodule(name)(hidden)
        logits = model.get_submodule(self.layout.lm_head)(hidden)
        cfg = _text_config(model)
        scaling = getattr(cfg, "logits_scaling", None)
        if scaling:
            logits = logits / scaling
        cap = getattr(cfg, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def layout_facts(self, model: nn.Module) -> tuple[set[str], dict[str, str]]:
        """What the traced layout provides: core's reading of it, less whatever the trace
        could not verify (each withheld fact names the parts, block by block)."""
        self.ensure_prepared(model)
        provides, reasons = super().layout_facts(model)
        withheld = {
            "scaling_pairs": ("model.type auto could not verify every scaling pair",
                              self.ambiguous),
            "roles": ("model.type auto could not infer every linear's role", self.unroled),
            "norm_kinds": ("model.type auto could not recognise every norm",
                           [u for u in self.unplaced if "kind" in u]),
            "rotation_points": ("model.type auto could not place every norm or module on "
                                "the residual stream", self.unplaced + self.unroled),
        }
        for fact, (what, parts) in withheld.items():
            if parts:
                provides.discard(fact)
                reasons[fact] = f"{what}: {'; '.join(parts)}"
        return provides, reasons


#: what tracing found, shared by every adapter instance on the same model
_TRACED = ("_layout", "_block_layouts", "ambiguous", "unroled", "unplaced", "rotation_blockers",
           "notes", "_post_block")
