"""What a traced block's linears do and what kind of norms it holds, found numerically.

* **Norm kinds** (:func:`norm_kind`): a random positive scale is folded into a float32 copy
  of a norm assuming each kind of :data:`llmcq.model.layout.NORM_KINDS`
  (:func:`llmcq.transforms.scaling.scale_norm_`); the kind is the one under which the norm's
  output is divided by the scale (``rms``/``layer``: weight and bias divided; ``rms_offset``:
  ``w' = (1 + w) / s - 1``). ``layer`` is told from ``rms`` by centring: a LayerNorm's
  output does not change when a constant is added to each row of its input.
* **Data flow** (:func:`data_flow`): each linear's output is multiplied by a random positive
  per-channel scale (once over all tokens, once on the first token only) and every linear's
  and norm's input is compared with the reference run: independent, per-channel
  proportional ("linear": a scaling pair), or changed otherwise; and whether a change made
  on the first token stays on it (no mixing across tokens) or spreads (attention).
* **Roles** (:func:`infer_roles`), from the direct dependencies (the transitive reduction
  of the data flow): a linear whose input mixes tokens of a direct feeder is an attention
  output ``o``; of its feeders, the value path is proportional (``v``), the key path spreads
  non-proportionally (``k``), the query path stays on its token (``q``, the causal mask
  makes queries and keys asymmetric); one feeder spreading non-proportionally with no value
  beside it is a fused ``qkv``, or with a query beside it MLA's ``kv_b`` (its own feeder
  ``kv_a``); a query fed through a norm by another linear is MLA's ``q_b`` (that one
  ``q_a``). Among the other linears, one whose direct feeders feed only it is an MLP's
  ``down``: of two feeders the proportional one is ``up`` and the other ``gate``; a lone
  feeder is ``up``, or ``gate_up`` when it is twice as wide as ``down`` reads. An MLP that ran
  on a subset of the tokens is an expert (``expert_*``, its index that in its expert list);
  a full-token MLP beside experts is a shared expert (``shared_*``). Float linears (routers)
  are ``router``. Names only break ties between symmetric cases (two query-like or two
  gate-like feeders).
* **Norm positions** (:func:`norm_position`): on a writer's output (``attn_out``,
  ``mlp_out``), on queries/keys (``qk``), on an MLA latent (``latent``), before attention
  and/or the MLP (``attn``, ``mlp``, ``attn_mlp``) by the roles reading it, or on the
  residual stream itself (``residual``: its output is the block's output, or a scale folded
  into it reaches more than its readers and no router or expert explains why).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from llmcq.transforms.scaling import scale_norm_

__all__ = ["norm_kind", "Flow", "data_flow", "infer_roles", "norm_position", "ATTN_ROLES",
           "MLP_ROLES"]

#: relative change under which an input counts as unchanged
SAME = 1e-6
#: relative residual under which an input counts as per-channel proportional
PROPORTIONAL = 1e-4

ATTN_ROLES = frozenset({"q", "k", "v", "qkv", "q_a", "kv_a"})
MLP_ROLES = frozenset({"gate", "up", "gate_up", "expert_gate", "expert_up", "expert_gate_up",
                       "shared_gate", "shared_up", "shared_gate_up", "router"})


def _out(x: Any) -> torch.Tensor | None:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], torch.Tensor):
        return x[0]
    return None


def _close(a: torch.Tensor | None, b: torch.Tensor | None, rel: float) -> bool:
    if a is None or b is None or a.shape != b.shape:
        return False
    return float((a - b).abs().max()) <= rel * max(1.0, float(b.abs().max()))


# --------------------------------------------------------------------------- norm kinds

@torch.no_grad()
def norm_kind(norm: nn.Module, x: torch.Tensor | None, *, seed: int = 0) -> str | None:
    """The kind of ``norm`` (float32, called on ``x``), or None when no kind fits."""
    weight = getattr(norm, "weight", None)
    if x is None or not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        return None
    try:
        ref = _out(norm(x))
    except Exception:
        return None
    if ref is None or ref.shape[-1] != weight.numel():
        return None
    gen = torch.Generator().manual_seed(seed)
    s = (torch.rand(weight.numel(), generator=gen) * 1.5 + 0.5).to(ref.device, ref.dtype)
    fits = []
    for kind in ("rms", "rms_offset"):
        trial = copy.deepcopy(norm)
        scale_norm_(trial, s, kind)
        if _close(_out(trial(x)), ref / s, 1e-4):
            fits.append(kind)
    if len(fits) != 1:
        return None
    shift = torch.randn(*x.shape[:-1], 1, generator=gen).to(x.device, x.dtype)
    centred = _close(_out(norm(x + shift)), ref, 1e-4)
    if fits[0] == "rms":
        return "layer" if centred else "rms"
    return None if centred else "rms_offset"


# --------------------------------------------------------------------------- data flow

@dataclass
class Flow:
    """How the inputs of ``targets`` respond to each source linear's output."""

    #: target -> source -> "linear" (per-channel proportional) | "nonlinear"; absent:
    #: independent
    rel: dict[str, dict[str, str]] = field(default_factory=dict)
    #: target -> source -> whether a change of the source's first token stays on the
    #: target's first token (None: the target does not read one row per token)
    local: dict[str, dict[str, bool | None]] = field(default_factory=dict)
    #: rows (tokens) of each target's reference input
    rows: dict[str, int] = field(default_factory=dict)
    #: rows of the block's input
    tokens: int = 0
    #: each target's input in the reference run
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)

    def feeds(self, target: str, among: set[str] | None = None) -> set[str]:
        dep = set(self.rel.get(target, {}))
        return dep if among is None else dep & among

    def direct(self, target: str, among: set[str] | None = None) -> set[str]:
        """Sources (of ``among``) ``target`` depends on other than through another of them."""
        dep = self.feeds(target, among)
        return {s for s in dep if not any(s in self.feeds(k, among) for k in dep if k != s)}


def _record(block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any],
            targets: Iterable[str], source: str | None = None,
            edit: Callable[[torch.Tensor], torch.Tensor] | None = None
            ) -> dict[str, torch.Tensor]:
    """First input of every target module on one forward, with ``source``'s output edited."""
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for name in targets:
        mod = block.get_submodule(name)

        def pre(_m: nn.Module, args: tuple[Any, ...], kw: dict[str, Any],
                _n: str = name) -> None:
            if _n in seen:
                return
            x = args[0] if args and isinstance(args[0], torch.Tensor) else \
                kw.get("hidden_states", kw.get("input"))
            if isinstance(x, torch.Tensor):
                seen[_n] = x.detach().clone()

        handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
    if source is not None and edit is not None:
        handles.append(block.get_submodule(source).register_forward_hook(
            lambda _m, _a, out: edit(out)))
    try:
        block(hidden, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return seen


def _relation(ref: torch.Tensor, new: torch.Tensor | None) -> str | None:
    if new is None or new.shape != ref.shape:
        return "nonlinear"
    if _close(new, ref, SAME):
        return None
    c = ref.shape[-1]
    r, n = ref.reshape(-1, c).double(), new.reshape(-1, c).double()
    t = (r * n).sum(0) / (r * r).sum(0).clamp_min(1e-30)
    fit = r * t
    scale = max(1.0, float(n.abs().max()))
    return "linear" if float((n - fit).abs().max()) <= PROPORTIONAL * scale else "nonlinear"


@torch.no_grad()
def data_flow(block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any],
              sources: list[str], targets: list[str], *, seed: int = 0) -> Flow:
    """Perturb each source's output (linears and norms), see which targets' inputs change
    and how."""
    tokens = hidden.numel() // hidden.shape[-1]
    ref = _record(block, hidden, kwargs, targets)
    flow = Flow(tokens=tokens, rows={t: x.numel() // x.shape[-1] for t, x in ref.items()},
                inputs=ref)
    gen = torch.Generator().manual_seed(seed)
    for src in sources:
        mod = block.get_submodule(src)
        width = mod.out_features if isinstance(mod, nn.Linear) else mod.weight.numel()
        s = (torch.rand(width, generator=gen) * 1.5 + 0.5).to(hidden.device, hidden.dtype)

        def everywhere(out: torch.Tensor, _s: torch.Tensor = s) -> torch.Tensor:
            return out * _s

        def first_token(out: torch.Tensor, _s: torch.Tensor = s) -> torch.Tensor:
            edited = out.contiguous().clone()
            flat = edited.view(-1, edited.shape[-1])  # row 0: the first token of a linear
            flat[0] = flat[0] * _s
            return edited

        scaled = _record(block, hidden, kwargs, targets, src, everywhere)
        # locality only matters for sources reading every token (an expert reads a routed
        # subset): skip that run for the others
        poked = _record(block, hidden, kwargs, targets, src, first_token) \
            if flow.rows.get(src) == tokens else {}
        for t, r in ref.items():
            if t == src:
                continue
            rel = _relation(r, scaled.get(t))
            if rel is None:
                continue
            flow.rel.setdefault(t, {})[src] = rel
            p = poked.get(t)
            local: bool | None = None
            if flow.rows[t] == tokens and p is not None and p.shape == r.shape:
                c = r.shape[-1]
                rest = (p - r).reshape(-1, c)[1:]
                local = float(rest.abs().max()) <= SAME * max(1.0, float(r.abs().max())) \
                    if rest.numel() else True
            flow.local.setdefault(t, {})[src] = local
    return flow


# --------------------------------------------------------------------------- roles

def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1].lower()


def _by_name(names: list[str], marks: dict[str, tuple[str, ...]]) -> dict[str, str] | None:
    """Tie-break: each name matched by exactly one role's marks (leaf name prefixes)."""
    out: dict[str, str] = {}
    for n in names:
        hits = [r for r, ms in marks.items() if any(_leaf(n).startswith(m) for m in ms)]
        if len(hits) != 1:
            return None
        out[n] = hits[0]
    return out if len(set(out.values())) == len(out) else None


def _expert_list_index(block: nn.Module, name: str) -> tuple[str, int] | None:
    """(the ModuleList holding ``name``'s unit, the unit's index in it), innermost first."""
    parts = name.split(".")
    for k in range(len(parts) - 1, 0, -1):
        parent = ".".join(parts[:k - 1]) if k > 1 else ""
        try:
            holder = block.get_submodule(parent) if parent else block
        except AttributeError:
            continue
        if isinstance(holder, nn.ModuleList) and parts[k - 1].isdigit():
            return parent, int(parts[k - 1])
    return None


def infer_roles(block: nn.Module, flow: Flow, linears: list[str], floats: Iterable[str]
                ) -> tuple[dict[str, str], list[str]]:
    """Role of each linear (see the module docstring) and the linears left without one."""
    roles: dict[str, str] = {f: "router" for f in floats}
    width = {n: (block.get_submodule(n).in_features, block.get_submodule(n).out_features)
             for n in linears}
    direct = {n: flow.direct(n, set(linears)) for n in linears}
    consumers = {n: {m for m in linears if n in direct[m]} for n in linears}

    def local(src: str, dst: str) -> bool | None:
        return flow.local.get(dst, {}).get(src)

    def rel(src: str, dst: str) -> str | None:
        return flow.rel.get(dst, {}).get(src)

    def upstream(n: str) -> str | None:
        """The linear feeding only ``n`` through a norm or a slice (MLA's down projection)."""
        ups = [a for a in direct[n] if a not in roles and consumers[a] == {n}]
        return ups[0] if len(ups) == 1 and direct[n] == {ups[0]} else None

    # attention: an output linear whose input mixes tokens of a direct feeder
    outputs = [m for m in linears
               if any(local(f, m) is False for f in direct[m]) and m not in roles]
    for o in outputs:
        feeders = sorted(direct[o], key=linears.index)
        qside = [f for f in feeders if local(f, o) is True]
        spread = [f for f in feeders if local(f, o) is False]
        values = [f for f in spread if rel(f, o) == "linear"]
        keys = [f for f in spread if rel(f, o) == "nonlinear"]
        if values and not keys and len(qside) == 2:  # no causal asymmetry seen: break the tie
            a, b = qside
            if width[a][1] != width[b][1]:  # grouped-query attention: queries are wider
                qside, keys = ([a], [b]) if width[a][1] > width[b][1] else ([b], [a])
            else:
                named = _by_name(qside, {"q": ("q", "query"), "k": ("k", "key")})
                if named is not None:
                    qside = [n for n, r in named.items() if r == "q"]
                    keys = [n for n, r in named.items() if r == "k"]
        if len(values) > 1 or len(keys) > 1 or len(qside) > 1:
            continue
        if any(f in roles for f in feeders):
            continue
        roles[o] = "o"
        for q in qside:
            up = upstream(q)
            if up is not None:
                roles[q], roles[up] = "q_b", "q_a"
            else:
                roles[q] = "q"
        if values:
            roles[values[0]] = "v"
            for k in keys:
                roles[k] = "k"
        elif keys and qside:  # keys and values from one projection of a latent (MLA)
            up = upstream(keys[0])
            roles[keys[0]] = "kv_b"
            if up is not None:
                roles[up] = "kv_a"
        elif keys:
            roles[keys[0]] = "qkv"
        else:
            del roles[o]

    # MLPs: a linear whose direct feeders feed only it
    units: list[tuple[str, list[str]]] = []
    for d in linears:
        feeders = sorted(direct[d], key=linears.index)
        if d in roles or not feeders or any(f in roles for f in feeders) or \
                any(consumers[f] != {d} for f in feeders):
            continue
        units.append((d, feeders))
    experts = {d for d, _ in units if flow.rows.get(d, flow.tokens) < flow.tokens}
    lists = {_expert_list_index(block, d)[0] for d in experts  # type: ignore[index]
             if _expert_list_index(block, d) is not None}
    for d, _ in units:  # an expert no token of the probe reached fully is still one
        hit = _expert_list_index(block, d)
        if hit is not None and hit[0] in lists:
            experts.add(d)
    for d, feeders in units:
        if len(feeders) == 2:
            kinds = {f: rel(f, d) for f in feeders}
            ups = [f for f in feeders if kinds[f] == "linear"]
            if len(ups) == 1:
                named: dict[str, str] | None = {f: "up" if f in ups else "gate" for f in feeders}
            else:
                named = _by_name(feeders, {"gate": ("gate", "w1"), "up": ("up", "w3")})
            if named is None:
                continue
        elif len(feeders) == 1:
            f = feeders[0]
            fused = width[f][1] == 2 * width[d][0] and rel(f, d) == "nonlinear"
            named = {f: "gate_up" if fused else "up"}
        else:
            continue
        prefix = "expert_" if d in experts else "shared_" if experts else ""
        roles[d] = f"{prefix}down"
        for f, r in named.items():
            roles[f] = f"{prefix}{r}"
    missing = [n for n in linears if n not in roles]
    return roles, missing


# --------------------------------------------------------------------------- norm positions

def norm_position(name: str, *, input_key: Any, output_key: Any, block_output_key: Any,
                  writer_outputs: dict[Any, str], readers: list[str], roles: dict[str, str],
                  feeders: set[str], folds: bool | None) -> str | None:
    """Where norm ``name`` sits (see the module docstring); None if not found.

    ``writer_outputs``: data key of each ``o``/``*down`` output -> that role; ``readers``:
    the linears reading the norm's output; ``feeders``: the linears it depends on directly;
    ``folds``: whether a scale folded into it reached only its readers (None: not tried)."""
    role = writer_outputs.get(input_key)
    if role is not None:
        return "attn_out" if role == "o" else "mlp_out"
    kinds = {roles.get(f) for f in feeders}
    if feeders and kinds <= {"q", "k", "qkv"}:
        return "qk"
    if feeders and kinds <= {"q_a", "kv_a"}:
        return "latent"
    if output_key == block_output_key:
        return "residual"
    reading = {roles.get(r) for r in readers}
    if not readers or None in reading:
        return None
    routed = "router" in reading or any(r.startswith("expert_") for r in reading if r)
    if folds is False and not routed:  # not explained by a router reading it too
        return "residual"
    attn, mlp = bool(reading & ATTN_ROLES), bool(reading & MLP_ROLES)
    return "attn_mlp" if attn and mlp else "attn" if attn else "mlp" if mlp else None
