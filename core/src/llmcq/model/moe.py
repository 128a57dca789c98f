"""Mixture-of-experts helpers shared by the MoE family adapters.

transformers 5 stores a sparse MoE block's experts as two 3D parameters (``gate_up_proj``
``[E, 2I, H]`` and ``down_proj`` ``[E, H, I]``) inside one module called with
``(hidden, top_k_index, top_k_weights)``. Quantization works on ``nn.Linear`` s, so
:func:`unfuse_experts` replaces such a module by :class:`ExpertList`: one small module per
expert with ``gate``/``up``/``down`` ``nn.Linear`` s, computing the same function. Its state
dict uses the per-expert names that transformers' checkpoint conversion merges back into the
3D layout on load (``experts.<e>.gate_proj.weight`` for Qwen-MoE/DeepSeek,
``experts.<e>.w1.weight`` for Mixtral), so exported folders reload with ``from_pretrained``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["Expert", "ExpertList", "unfuse_experts", "is_fused_experts", "expert_groups",
           "checkpoint_expert_names",
           "sparse_moe_block"]


class Expert(nn.Module):
    """``down(act(gate(x)) * up(x))`` with configurable child names."""

    def __init__(self, gate: nn.Linear, up: nn.Linear, down: nn.Linear,
                 act: Callable[[torch.Tensor], torch.Tensor],
                 names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")) -> None:
        super().__init__()
        self._names = names
        for name, mod in zip(names, (gate, up, down), strict=True):
            self.add_module(name, mod)
        self.act_fn = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u, d = (getattr(self, n) for n in self._names)
        return d(self.act_fn(g(x)) * u(x))


class ExpertList(nn.ModuleList):
    """Experts as a ``ModuleList`` with the fused module's calling convention."""

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        n = len(self)
        with torch.no_grad():
            hit = torch.bincount(top_k_index.flatten(), minlength=n)[:n].nonzero().flatten()
        for e in hit.tolist():
            token_idx, pos = torch.where(top_k_index == e)
            y = self[e](hidden_states[token_idx])
            y = y * top_k_weights[token_idx, pos, None]
            # index_put_ with accumulate: index_add_ is orders of magnitude slower on some
            # CPU builds; each token reaches an expert at most once, so both are exact
            out.index_put_((token_idx,), y.to(out.dtype), accumulate=True)
        return out


def is_fused_experts(module: nn.Module) -> bool:
    gu, dn = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return isinstance(gu, torch.Tensor) and isinstance(dn, torch.Tensor) and gu.dim() == 3


@torch.no_grad()
def _split(module: nn.Module, names: tuple[str, str, str]) -> ExpertList:
    gate_up, down = module.gate_up_proj, module.down_proj
    n_exp, two_i, hidden = gate_up.shape
    inter = two_i // 2
    experts = ExpertList()
    for e in range(n_exp):
        lin = []
        for w in (gate_up[e, :inter], gate_up[e, inter:], down[e]):
            layer = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
            layer.weight.copy_(w)
            layer.weight.requires_grad_(False)
            lin.append(layer)
        experts.append(Expert(*lin, act=module.act_fn, names=names))
    return experts


def unfuse_experts(model: nn.Module, *, names: tuple[str, str, str] = ("gate_proj", "up_proj",
                                                                       "down_proj")) -> int:
    """Replace every fused-experts module of ``model`` by an :class:`ExpertList` (in place);
    returns how many were replaced. Idempotent."""
    targets = [n for n, m in model.named_modules() if is_fused_experts(m)]
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _split(parent.get_submodule(child), names))
    return len(targets)


def expert_groups(prefix: str, *, names: tuple[str, str, str] = ("gate_proj", "up_proj",
                                                                 "down_proj"),
                  role: str = "expert") -> tuple[Any, ...]:
    """Linear groups of one gated expert MLP at ``prefix`` (an :class:`Expert` or a shared
    expert): ``gate, up`` read the expert's input, ``up -> down`` is an exact scaling pair.
    ``role``: ``"expert"`` (roles ``expert_gate/up/down``, the index read from ``prefix``)
    or ``"shared"`` (``shared_gate/up/down``).

    The input group has no producer: in a sparse MoE block the router reads the same norm
    output as the experts, so a scale folded into that norm would change the routing (the
    router is kept float and cannot absorb it). Scaling-based algorithms skip these groups.
    """
    from llmcq.model.layout import LinearGroup

    if role not in ("expert", "shared"):
        raise ValueError(f"role must be 'expert' or 'shared', not {role!r}")
    g, u, d = (f"{prefix}.{n}" for n in names)
    return (
        LinearGroup(linears=(g, u), prev_op=None, inspect=prefix,
                    roles=(f"{role}_gate", f"{role}_up")),
        LinearGroup(linears=(d,), prev_op=u, prev_kind="linear", inspect=d,
                    roles=(f"{role}_down",)),
    )


def sparse_moe_block(block: nn.Module, *, attn_groups: tuple[Any, ...], mlp: str = "mlp",
                     names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"),
                     shared: str | None = None, float_linears: tuple[str, ...] = (),
                     float_roles: tuple[str, ...] | None = None,
                     norms: tuple[Any, ...] = ()) -> Any:
    """The :class:`~llmcq.model.layout.BlockLayout` of a block whose ``mlp`` holds an
    :class:`ExpertList` at ``mlp.experts`` (and optionally a shared expert at
    ``mlp.<shared>`` with the usual gate/up/down names). ``float_linears`` (a one-output
    shared-expert gate, say) are routers unless ``float_roles`` says otherwise; ``norms``:
    the block's :class:`~llmcq.model.layout.NormSite` s."""
    from llmcq.model.layout import BlockLayout

    experts = block.get_submodule(f"{mlp}.experts")
    groups: list[Any] = list(attn_groups)
    for e in range(len(experts)):
        groups += expert_groups(f"{mlp}.experts.{e}", names=names)
    if shared is not None:
        groups += expert_groups(f"{mlp}.{shared}", role="shared")
    if float_roles is None:
        float_roles = ("router",) * len(float_linears)
    return BlockLayout(groups=tuple(groups), float_linears=float_linears,
                       float_roles=float_roles, norms=tuple(norms))


def checkpoint_expert_names(model_type: str | None) -> tuple[str, str, str] | None:
    """Per-expert ``(gate, up, down)`` names transformers merges into the 3D layout when it
    loads a ``model_type`` checkpoint (from its conversion mapping), or None if unknown."""
    import re

    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:  # pragma: no cover - older transformers
        return None
    try:
        mapping = get_checkpoint_conversion_mapping(model_type) or []
    except Exception:
        return None
    pair: list[str] = []
    single: list[str] = []
    for conv in mapping:
        pats = getattr(conv, "source_patterns", None) or []
        names = [m.group(1) for p in pats if (m := re.search(r"experts\.\*\.(\w+)\.weight", p))]
        if len(names) == 2 and len(pats) == 2:
            pair = names
        elif len(names) == 1 and len(pats) == 1:
            single = names
    if pair and single:
        return pair[0], pair[1], single[0]
    return None
