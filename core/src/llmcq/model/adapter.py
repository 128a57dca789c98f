"""The model-adapter base: a :class:`~llmcq.model.layout.ModelLayout` plus loading.

A family plugin subclasses :class:`ModelAdapter`, sets ``layout`` and, only where its family
needs it, overrides a method (custom loading, a block whose layout depends on its index).
"""

from __future__ import annotations

import fnmatch
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from llmcq.errors import PluginError
from llmcq.model.layout import BlockLayout, LinearGroup, ModelLayout
from llmcq.model.loading import ModelSource, load_pretrained

if TYPE_CHECKING:
    from llmcq.api import ModelSpec
    from llmcq.config.schema import ModelSection

__all__ = ["ModelAdapter", "ResolvedGroup", "resolve_group", "resolve_block", "linear_names"]


@dataclass
class ResolvedGroup:
    """A :class:`LinearGroup` bound to one block's modules (patterns expanded)."""

    spec: LinearGroup
    linears: dict[str, nn.Linear]
    prev_op: nn.Module | None
    inspect: nn.Module
    #: every inspect module when the layout names several (their outputs are added)
    inspect_all: tuple[nn.Module, ...] = ()

    def run_inspect(self, x: torch.Tensor, block_kwargs: dict[str, Any]) -> torch.Tensor:
        """Output of the ``inspect`` module on its input ``x`` (the linears' shared input),
        given the block's keyword inputs when the layout says it needs them. With several
        inspect modules (parallel attention and MLP), the sum of their outputs."""
        mods = self.inspect_all or (self.inspect,)
        total: torch.Tensor | None = None
        for mod, kw in zip(mods, self.spec.inspect_flags, strict=True):
            out = mod(x, **block_kwargs) if kw else mod(x)
            out = out[0] if isinstance(out, (tuple, list)) else out
            total = out if total is None else total + out
        assert total is not None
        return total


def linear_names(module: nn.Module) -> list[str]:
    """Dotted names of every ``nn.Linear`` under ``module``."""
    return [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]


def _expand(block: nn.Module, pattern: str) -> list[str]:
    if "*" not in pattern:
        return [pattern]
    names = [n for n, _ in block.named_modules()]
    depth = pattern.count(".")
    return [n for n in names if n.count(".") == depth and fnmatch.fnmatchcase(n, pattern)]


def resolve_group(block: nn.Module, group: LinearGroup, *, where: str) -> ResolvedGroup:
    linears: dict[str, nn.Linear] = {}
    for pattern in group.linears:
        hits = _expand(block, pattern)
        if not hits:
            raise PluginError(f"layout names {pattern!r}, which matches nothing in {where}",
                              stage="layout")
        for name in hits:
            try:
                mod = block.get_submodule(name)
            except AttributeError as exc:
                raise PluginError(f"layout names {name!r}, absent from {where}",
                                  stage="layout") from exc
            if not isinstance(mod, nn.Linear):
                raise PluginError(f"{where}.{name} is a {type(mod).__name__}, not nn.Linear",
                                  stage="layout")
            linears[name] = mod
    prev = block.get_submodule(group.prev_op) if group.prev_op else None
    inspect = tuple(block.get_submodule(n) for n in group.inspect_names)
    return ResolvedGroup(group, linears, prev, inspect[0],
                         inspect if isinstance(group.inspect, tuple) else ())


def resolve_block(block: nn.Module, layout: BlockLayout, *, where: str) -> list[ResolvedGroup]:
    """Bind a block layout to a block and check it covers every linear exactly once."""
    groups = [resolve_group(block, g, where=where) for g in layout.groups]
    seen: dict[str, int] = {}
    for g in groups:
        for name in g.linears:
            seen[name] = seen.get(name, 0) + 1
    twice = sorted(n for n, c in seen.items() if c > 1)
    floats = {n for p in layout.float_linears for n in _expand(block, p)}
    missing = sorted(set(linear_names(block)) - set(seen) - floats)
    if twice or missing:
        detail = []
        if twice:
            detail.append(f"listed twice: {', '.join(twice)}")
        if missing:
            detail.append(f"not covered: {', '.join(missing)}")
        raise PluginError(f"block layout does not match {where} ({'; '.join(detail)})",
                          stage="layout")
    return groups


class ModelAdapter:
    """Base of model-family adapters. Subclasses set :attr:`layout`."""

    layout: ClassVar[ModelLayout]

    def __init__(self, spec: ModelSpec | None = None, config: ModelSection | None = None) -> None:
        self.spec = spec
        self.config = config
        self._prepared: weakref.WeakSet[nn.Module] = weakref.WeakSet()

    #: transformers auto class the family loads with (vision-language models differ)
    auto_class: ClassVar[str] = "AutoModelForCausalLM"

    def load(self, source: ModelSource) -> tuple[Any, Any]:
        """``(model, tokenizer)`` on the CPU in eval mode, prepared (:meth:`prepare`)."""
        cfg = self.config
        model, tokenizer = load_pretrained(
            source,
            torch_dtype=cfg.torch_dtype if cfg else "auto",
            use_fast=(cfg.tokenizer_mode == "fast") if cfg else True,
            trust_remote_code=cfg.trust_remote_code if cfg else False,
            auto_class=self.auto_class,
        )
        self.ensure_prepared(model)
        return model, tokenizer

    def prepare(self, model: nn.Module) -> None:
        """Make ``model`` quantizable in place without changing its function: for example
        split experts stored as 3D tensors into one ``nn.Linear`` per expert. Called once
        per model and adapter (by :meth:`load`, and by :meth:`blocks` for a model passed in
        directly); must be idempotent."""

    def ensure_prepared(self, model: nn.Module) -> None:
        """:meth:`prepare` ``model`` unless this adapter already did (prepare is
        idempotent: another adapter instance may prepare the same model again)."""
        prepared = self.__dict__.setdefault("_prepared", weakref.WeakSet())
        if model not in prepared:
            self.prepare(model)
            prepared.add(model)

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        self.ensure_prepared(model)
        return model.get_submodule(self.layout.blocks)  # type: ignore[return-value]

    def block_layout(self, model: nn.Module, index: int) -> BlockLayout:
        """The layout of block ``index``; override for families whose blocks differ."""
        return self.layout.block

    def lm_head(self, model: nn.Module) -> nn.Linear:
        return model.get_submodule(self.layout.lm_head)  # type: ignore[return-value]

    def attention_heads(self, model: nn.Module) -> tuple[int, int]:
        """``(query heads, key/value heads)`` for grouped-query-aware scaling."""
        cfg = model.config
        heads = int(cfg.num_attention_heads)
        return heads, int(getattr(cfg, "num_key_value_heads", None) or heads)

    def head_logits(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from the last block's output (final norm, then head). Override for
        families with extra head operations (logit soft-capping, scaling)."""
        if self.layout.final_norm:
            hidden = model.get_submodule(self.layout.final_norm)(hidden)
        return model.get_submodule(self.layout.lm_head)(hidden)
