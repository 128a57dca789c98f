"""The model-adapter base: a :class:`~llmcq.model.layout.ModelLayout` plus loading.

A family plugin subclasses :class:`ModelAdapter`, sets ``layout`` and, only where its family
needs it, overrides a method (custom loading, a block whose layout depends on its index).
"""

from __future__ import annotations

import fnmatch
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from llmcq.errors import PluginError
from llmcq.model.layout import BlockLayout, LinearGroup, ModelLayout
from llmcq.model.loading import ModelSource, load_pretrained

if TYPE_CHECKING:
    from llmcq.api import ModelSpec
    from llmcq.config.schema import ModelSection

__all__ = ["ModelAdapter", "ResolvedGroup", "LinearRole", "ModelFacts", "resolve_group",
           "resolve_block", "linear_names", "PROBE_TOKENS"]

#: tokens of the probe input that checks an adapter's block-wise logits
PROBE_TOKENS = 16


@dataclass(frozen=True)
class LinearRole:
    """A linear's role (:data:`llmcq.model.layout.ROLES`) and, for an expert's linears, the
    expert's index (the component a ``*`` of the layout pattern matched)."""

    kind: str
    expert: int | None = None

    def __str__(self) -> str:
        return self.kind if self.expert is None else f"{self.kind}[{self.expert}]"


@dataclass(frozen=True)
class ModelFacts:
    """Facts of a loaded model that transforms of the whole residual stream need."""

    hidden_size: int
    heads: int
    kv_heads: int
    head_dim: int
    tied_embeddings: bool
    final_norm_kind: str | None


@dataclass
class ResolvedGroup:
    """A :class:`LinearGroup` bound to one block's modules (patterns expanded)."""

    spec: LinearGroup
    linears: dict[str, nn.Linear]
    prev_op: nn.Module | None
    inspect: nn.Module
    #: every inspect module when the layout names several (their outputs are added)
    inspect_all: tuple[nn.Module, ...] = ()
    #: the declared role of each linear (empty when the layout declares none)
    roles: dict[str, LinearRole] = field(default_factory=dict)
    #: the declared kind (:data:`llmcq.model.layout.NORM_KINDS`) of ``prev_op`` when it is
    #: a norm listed in the block's ``norms``; None: not declared (folding then divides its
    #: weight and bias, right for RMSNorm and LayerNorm)
    prev_norm_kind: str | None = None

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


def _expert_index(pattern: str, name: str, role: str = "") -> int | None:
    """The integer a ``*`` of ``pattern`` matched in ``name`` (``experts.*.up`` /
    ``experts.3.up``); for an expert's role (``expert_*``) named without a ``*``, the last
    integer component of the name (its index in the expert list)."""
    for p, n in zip(pattern.split("."), name.split("."), strict=False):
        if p == "*" and n.isdigit():
            return int(n)
    if role.startswith("expert_"):
        digits = [n for n in name.split(".") if n.isdigit()]
        if digits:
            return int(digits[-1])
    return None


def resolve_group(block: nn.Module, group: LinearGroup, *, where: str,
                  norm_kinds: Mapping[str, str] | None = None) -> ResolvedGroup:
    """Bind one group to ``block``'s modules. ``norm_kinds`` (norm name -> kind, from
    :meth:`BlockLayout.norm_kinds`) gives ``prev_norm_kind`` when the producer is a norm."""
    linears: dict[str, nn.Linear] = {}
    roles: dict[str, LinearRole] = {}
    for k, pattern in enumerate(group.linears):
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
            if group.roles:
                roles[name] = LinearRole(group.roles[k],
                                         _expert_index(pattern, name, group.roles[k]))
    prev = block.get_submodule(group.prev_op) if group.prev_op else None
    inspect = tuple(block.get_submodule(n) for n in group.inspect_names)
    kind = (norm_kinds or {}).get(group.prev_op) \
        if group.prev_op and group.prev_kind == "norm" else None
    return ResolvedGroup(group, linears, prev, inspect[0],
                         inspect if isinstance(group.inspect, tuple) else (), roles, kind)


def resolve_block(block: nn.Module, layout: BlockLayout, *, where: str) -> list[ResolvedGroup]:
    """Bind a block layout to a block and check it covers every linear exactly once (and
    that the norms it declares exist)."""
    absent = []
    for site in layout.norms:
        try:
            block.get_submodule(site.name)
        except AttributeError:
            absent.append(site.name)
    if absent:
        raise PluginError(f"block layout declares norms absent from {where}: "
                          f"{', '.join(absent)}", stage="layout")
    kinds = layout.norm_kinds()
    groups = [resolve_group(block, g, where=where, norm_kinds=kinds) for g in layout.groups]
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
    #: whether :meth:`load` fails without tokenizer files (core sets it per run: False when
    #: no dataset of the run tokenizes text)
    require_tokenizer: bool = True

    def load(self, source: ModelSource) -> tuple[Any, Any]:
        """``(model, tokenizer)`` on the CPU in eval mode, prepared (:meth:`prepare`)."""
        cfg = self.config
        model, tokenizer = load_pretrained(
            source,
            torch_dtype=cfg.torch_dtype if cfg else "auto",
            use_fast=(cfg.tokenizer_mode == "fast") if cfg else True,
            trust_remote_code=cfg.trust_remote_code if cfg else False,
            auto_class=self.auto_class,
            require_tokenizer=self.require_tokenizer,
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

    # ------------------------------------------------------------------ checks and facts

    def layout_facts(self, model: nn.Module) -> tuple[set[str], dict[str, str]]:
        """The layout facts (:data:`llmcq.capabilities.LAYOUT_FEATURES`) this adapter's
        layout provides for ``model``, and why each missing one is missing. Core checks
        them against what the recipe needs before calibration, for every adapter."""
        n = len(self.blocks(model))
        layouts: dict[int, tuple[int, BlockLayout]] = {}
        for i in range(n):
            lay = self.block_layout(model, i)
            layouts.setdefault(id(lay), (i, lay))
        provides: set[str] = set()
        reasons: dict[str, str] = {}
        where = self.layout.blocks
        no_roles = [f"{where}.{i}" for i, lay in layouts.values() if not lay.has_roles]
        if no_roles:
            reasons["roles"] = f"linears without a declared role in {', '.join(no_roles)}"
        else:
            provides.add("roles")
        if any(g.prev_op for _, lay in layouts.values() for g in lay.groups):
            provides.add("scaling_pairs")
        else:
            reasons["scaling_pairs"] = "no linear group declares a prev_op"
        no_kinds = [f"{where}.{i}" for i, lay in layouts.values() if not lay.has_norm_kinds]
        if no_kinds:
            reasons["norm_kinds"] = f"norms without a declared kind in {', '.join(no_kinds)}"
        else:
            provides.add("norm_kinds")
        stuck = [f"{where}.{i}" for i, lay in layouts.values() if not lay.rotatable]
        blockers = self.layout.rotation_blockers
        if stuck or blockers or self.layout.final_norm_kind is None or \
                "roles" not in provides:
            reasons["rotation_points"] = (
                "; ".join(blockers) if blockers else
                f"blocks {', '.join(stuck)} lack roles or norm kinds, or hold a norm on a "
                "writer's output before the residual add (sandwich norms) or on the residual "
                "stream itself (post-LN)" if stuck else
                "the final norm's kind is not declared")
        else:
            provides.add("rotation_points")
        return provides, reasons

    @torch.no_grad()
    def check_head(self, model: nn.Module) -> str | None:
        """Whether block-by-block execution reproduces the model: the last block's output
        through :meth:`head_logits` must give the model's own logits on a probe input.
        Returns what is wrong, or None."""
        blocks = self.blocks(model)
        last: dict[str, torch.Tensor] = {}

        def keep(_m: nn.Module, _a: Any, out: Any) -> None:
            last["h"] = out[0] if isinstance(out, (tuple, list)) else out

        vocab = model.get_input_embeddings().num_embeddings
        gen = torch.Generator().manual_seed(0)
        device = next(model.parameters()).device
        ids = torch.randint(0, vocab, (1, PROBE_TOKENS), generator=gen).to(device)
        handle = blocks[len(blocks) - 1].register_forward_hook(keep)
        try:
            logits = model(input_ids=ids, use_cache=False).logits
        finally:
            handle.remove()
        try:
            mine = self.head_logits(model, last["h"])
        except Exception as exc:  # a broken override is reported, not raised
            return f"head_logits failed on the probe input: {type(exc).__name__}: {exc}"
        if mine.shape != logits.shape:
            return f"head_logits gives shape {tuple(mine.shape)}, the model {tuple(logits.shape)}"
        err = float((mine.float() - logits.float()).abs().max())
        scale = float(logits.float().abs().max()) or 1.0
        if err > 1e-3 * scale + 1e-4:
            return (f"the block-wise logits (final norm -> head_logits) differ from the "
                    f"model's by up to {err:.3g} (|logits| up to {scale:.3g}) on a "
                    f"{PROBE_TOKENS}-token probe: the head does more than the adapter "
                    "computes (logit scaling or soft-capping?)")
        return None

    def facts(self, model: nn.Module) -> ModelFacts:
        """Sizes and ties of the loaded model (rotations need them)."""
        cfg = model.config
        cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        heads, kv = self.attention_heads(model)
        hidden = int(getattr(cfg, "hidden_size"))
        head_dim = int(getattr(cfg, "head_dim", None) or hidden // heads)
        emb = model.get_input_embeddings()
        head = model.get_submodule(self.layout.lm_head)
        tied = getattr(head, "weight", None) is getattr(emb, "weight", None)
        return ModelFacts(hidden, heads, kv, head_dim, bool(tied), self.layout.final_norm_kind)
