"""Finding a model's layout by tracing.

1. **Model level.** One forward pass on random token ids with hooks on every module: the
   blocks are the ``ModuleList`` whose children all ran (the most parameters wins, so a
   vision tower that text does not reach is never picked); modules with weights or buffers
   that ran before the first block are the pre-block modules (embeddings, positions,
   rotary); the last norm-like module after the last block is the final norm (its kind
   learned as below); the output embedding is the head.
2. **Block level.** Each distinct block structure is run once on the first block's captured
   input with hooks on all its sub-modules. Linears reading the same data (same storage,
   offset and size) form a group. A module whose output *is* that data is the candidate
   producer; otherwise earlier linears whose outputs could map per channel onto the input
   (same width, or grouped-query repetition) are candidates, nearest first. The inspect
   module is the smallest module containing the group that reads the same data (or, for
   parallel attention, the block's children that do, added). Every norm's kind, every
   linear's role and every norm's position come from :mod:`llmcq_auto.infer`.
3. **Verification.** A candidate pair is accepted only if folding a random positive scale
   into a float32 copy of the block (:func:`llmcq.transforms.scaling.fold_scale`, into a norm
   as the kind it was learned to be: ``w' = (1 + w) / s - 1`` for Gemma's ``1 + w``) leaves
   the block's output unchanged. A norm that is the candidate but fails (it also feeds a
   router or the residual stream, or its kind is not recognised) is reported as ambiguous,
   as are linears the input did not reach and linears called twice.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from llmcq.model.adapter import resolve_group
from llmcq.model.layout import BlockLayout, LinearGroup, NormSite
from llmcq.transforms.scaling import fold_scale
from llmcq_auto import infer

__all__ = ["BlockTrace", "ModelTrace", "trace_model", "trace_block", "data_key"]

#: relative output change above which a folded scale is judged not function-preserving
TOLERANCE = 1e-3
ROUTER_ATTRS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def data_key(t: torch.Tensor) -> tuple[Any, ...]:
    """Identity of the data a tensor views: reshapes of contiguous data share a key."""
    base = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t.dtype)
    return base if t.is_contiguous() else (*base, tuple(t.shape), tuple(t.stride()))


def _first_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    hs = kwargs.get("hidden_states")
    if isinstance(hs, torch.Tensor):
        return hs
    for v in (*args, *kwargs.values()):
        if isinstance(v, torch.Tensor):
            return v
    return None


def _out_tensor(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


def _extra_inputs(args: tuple[Any, ...], kwargs: dict[str, Any],
                  main: torch.Tensor) -> tuple[bool, bool, frozenset[str]]:
    """(anything besides the main input?, extra positional inputs?, extra keyword names)."""
    pos = [a for a in args if a is not main and a is not None]
    kws = frozenset(k for k, v in kwargs.items() if v is not main and v is not None
                    and not isinstance(v, bool))
    return bool(pos or kws), bool(pos), kws


def is_norm_like(mod: nn.Module, width: int) -> bool:
    w = getattr(mod, "weight", None)
    return (not isinstance(mod, nn.Linear) and isinstance(w, torch.Tensor) and w.dim() == 1
            and w.numel() == width)


@dataclass
class Call:
    order: int
    inp: torch.Tensor | None
    out: torch.Tensor | None
    extra: bool
    extra_positional: bool = False
    extra_names: frozenset[str] = frozenset()

    def replayable(self, block_kwargs: set[str]) -> bool:
        """Whether ``module(x, **block_kwargs)`` (or ``module(x)``) reproduces this call."""
        return not self.extra_positional and self.extra_names <= block_kwargs


@contextmanager
def _recording(root: nn.Module, *, skip_root: bool = True) -> Iterator[dict[str, list[Call]]]:
    calls: dict[str, list[Call]] = {}
    counter = [0]
    handles = []
    for name, mod in root.named_modules():
        if skip_root and not name:
            continue
        pending: dict[str, Any] = {}

        def pre(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                _p: dict[str, Any] = pending) -> None:
            x = _first_tensor(args, kwargs)
            extra = _extra_inputs(args, kwargs, x) if x is not None else (True, True,
                                                                          frozenset())
            _p.setdefault("stack", []).append((x, extra))

        def post(_m: nn.Module, _args: Any, _kwargs: Any, out: Any, _name: str = name,
                 _p: dict[str, Any] = pending) -> None:
            x, (extra, positional, names) = _p["stack"].pop()
            counter[0] += 1
            calls.setdefault(_name, []).append(Call(counter[0], x, _out_tensor(out), extra,
                                                    positional, names))

        handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(mod.register_forward_hook(post, with_kwargs=True))
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


# --------------------------------------------------------------------------- block level

@dataclass
class BlockTrace:
    """What tracing one block found: its layout and what could not be verified."""

    layout: BlockLayout
    #: scaling pairs (and groups) that could not be verified
    ambiguous: list[str] = field(default_factory=list)
    float_linears: tuple[str, ...] = ()
    #: linears whose role could not be inferred
    unroled: list[str] = field(default_factory=list)
    #: norms whose kind or position could not be found
    unplaced: list[str] = field(default_factory=list)


def _to_float(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.float() if obj.is_floating_point() else obj
    if isinstance(obj, tuple):
        return tuple(_to_float(o) for o in obj)
    if isinstance(obj, list):
        return [_to_float(o) for o in obj]
    if isinstance(obj, dict):
        return {k: _to_float(v) for k, v in obj.items()}
    return obj


def _block_out(block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _lca(names: list[str]) -> str:
    parts = [n.split(".") for n in names]
    common: list[str] = []
    for level in zip(*parts):
        if all(p == level[0] for p in level):
            common.append(level[0])
        else:
            break
    return ".".join(common)


def _inspect_for(linears: list[str], key: tuple[Any, ...], calls: dict[str, list[Call]],
                 block_kwargs: set[str]) -> tuple[str | tuple[str, ...], Any] | None:
    """(inspect, inspect_kwargs) for a group reading data ``key``; None if none fits.

    The smallest module holding the group that reads the data (a lone linear: the largest
    module around it that reads the same data, e.g. an ungated MLP), called in a way
    ``run_inspect`` can replay; for parallel branches, the block's children holding the
    group, added."""
    def reads(name: str) -> Call | None:
        for c in calls.get(name, []):
            if c.inp is not None and data_key(c.inp) == key and c.replayable(block_kwargs):
                return c
        return None

    node = _lca(linears)
    if len(linears) == 1 and node == linears[0]:
        c = reads(node)
        parent = node.rpartition(".")[0]
        while c is not None and parent and reads(parent) is not None:
            node, c = parent, reads(parent)
            parent = node.rpartition(".")[0]
        if c is not None:
            return node, c.extra
    while node:
        c = reads(node)
        if c is not None:
            return node, c.extra
        node = node.rpartition(".")[0]
    # nothing below the block reads the data as a whole: its children that contain the group
    kids = sorted({n.split(".")[0] for n in linears},
                  key=lambda k: calls[k][0].order if k in calls else 0)
    found = [(k, reads(k)) for k in kids]
    if len(kids) > 1 and all(c is not None for _, c in found):
        flags = tuple(bool(c.extra) for _, c in found if c is not None)
        return tuple(k for k, _ in found), flags
    return None


def _router_sizes(config: Any) -> set[int]:
    sizes = {1}
    for cfg in (config, getattr(config, "text_config", None)):
        for attr in ROUTER_ATTRS:
            v = getattr(cfg, attr, None) if cfg is not None else None
            if isinstance(v, int) and v > 1:
                sizes.add(v)
    return sizes


@torch.no_grad()
def _verify(block32: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any],
            ref: torch.Tensor, group: LinearGroup, heads: tuple[int, int],
            seed: int, norm_kind: str | None = None) -> bool:
    """Fold a random positive scale for ``group`` into a copy of ``block32`` (into a norm
    producer as a norm of ``norm_kind``); is the block's output unchanged?"""
    trial = copy.deepcopy(block32)
    try:
        kinds = {group.prev_op: norm_kind} if group.prev_op and norm_kind else None
        rg = resolve_group(trial, group, where="trace", norm_kinds=kinds)
        prev = rg.prev_op
        width = next(iter(rg.linears.values())).in_features
        n = prev.out_features if isinstance(prev, nn.Linear) else width
        gen = torch.Generator().manual_seed(seed)
        s = torch.rand(n, generator=gen) * 1.5 + 0.5
        kw: dict[str, Any] = {}
        if isinstance(prev, nn.Linear) and prev.out_features != width:
            kw = {"n_heads": heads[0], "n_kv_heads": heads[1]}
        fold_scale(rg, s.to(hidden.device), **kw)
        out = _block_out(trial, hidden, kwargs)
    except Exception:
        return False
    err = float((out - ref).abs().max())
    return err <= TOLERANCE * max(1.0, float(ref.abs().max()))


def _is_norm(mod: nn.Module) -> bool:
    w = mod._parameters.get("weight") if not isinstance(mod, nn.Linear) else None
    return isinstance(w, torch.Tensor) and w.dim() == 1


@torch.no_grad()
def trace_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any], *,
                heads: tuple[int, int], config: Any = None, seed: int = 0) -> BlockTrace:
    """The layout of ``block`` from one forward on ``(hidden, kwargs)`` (see module doc)."""
    block32 = copy.deepcopy(block).float()
    hidden32, kw32 = _to_float(hidden), _to_float(kwargs)
    with _recording(block32) as calls:
        ref = _block_out(block32, hidden32, kw32)
    again = _block_out(block32, hidden32, kw32)
    ambiguous: list[str] = []
    deterministic = torch.allclose(again, ref)
    if not deterministic:
        ambiguous.append("the block's output differs between two identical calls "
                         "(randomness or state): no pair can be verified")
    mods = dict(block32.named_modules())
    linears = [n for n, m in mods.items() if isinstance(m, nn.Linear)]
    routers = _router_sizes(config)
    floats = tuple(n for n in linears if mods[n].out_features in routers  # type: ignore[operator]
                   and any(w in n.rsplit(".", 1)[-1].lower() for w in ("gate", "router")))

    # group by the data each linear reads
    groups: dict[tuple[Any, ...], list[str]] = {}
    first_call: dict[tuple[Any, ...], int] = {}
    unreached: list[str] = []
    once: list[str] = []
    for n in linears:
        if n in floats:
            continue
        cs = calls.get(n, [])
        if not cs or cs[0].inp is None:
            unreached.append(n)
            continue
        if len(cs) > 1:
            ambiguous.append(f"{n} runs {len(cs)} times per forward (shared weights): "
                             "not scaled")
        else:
            once.append(n)
        key = data_key(cs[0].inp)
        groups.setdefault(key, []).append(n)
        first_call[key] = min(first_call.get(key, cs[0].order), cs[0].order)

    # the data flow between linears and norms, the norms' kinds, the linears' roles
    norm_names = [n for n, m in mods.items() if n and _is_norm(m) and len(calls.get(n, [])) == 1]
    ran_floats = [f for f in floats if f in calls]
    flow = infer.data_flow(block32, hidden32, kw32, once + norm_names,
                           once + ran_floats + norm_names, seed=seed + 7)
    kinds = {n: infer.norm_kind(mods[n], flow.inputs.get(n), seed=seed + 3 + j)
             for j, n in enumerate(norm_names)}
    if deterministic:
        roles, unroled = infer.infer_roles(block32, flow, once, floats)
    else:
        roles, unroled = {f: "router" for f in floats}, list(once)
    unroled += [n for n in linears if n not in roles and n not in unroled]

    out_groups: list[LinearGroup] = []
    folds: dict[str, bool] = {}

    def group_roles(names: list[str]) -> tuple[str, ...]:
        return tuple(roles[n] for n in names) if all(n in roles for n in names) else ()

    for i, key in enumerate(sorted(groups, key=lambda k: first_call[k])):
        names = sorted(groups[key], key=lambda n: calls[n][0].order)
        width = mods[names[0]].in_features  # type: ignore[union-attr]
        found = _inspect_for(names, key, calls, set(kwargs))
        if found is None:
            out_groups.append(LinearGroup(linears=tuple(names), prev_op=None, inspect=names[0],
                                          roles=group_roles(names)))
            if len(names) > 1:
                ambiguous.append(f"{', '.join(names)}: no module (or set of parallel branches) "
                                 "reads their shared input as a whole; not scaled")
            continue
        inspect, inspect_kw = found
        # the module whose output is this data
        producers = [(c.order, n) for n, cs in calls.items() for c in cs
                     if n not in names and c.out is not None and data_key(c.out) == key
                     and not (c.inp is not None and data_key(c.inp) == key)  # pass-through
                     and not any(n.startswith(x + ".") or n == x for x in names)]
        producers.sort()
        direct = producers[-1][1] if producers else None
        # the innermost module producing it (a container returning its child's output)
        if producers:
            innermost = [n for _, n in producers if not any(o.startswith(n + ".")
                                                           for _, o in producers)]
            direct = innermost[-1] if innermost else direct
        cands: list[tuple[str, str]] = []
        if direct is not None and is_norm_like(mods[direct], width):
            cands.append((direct, "norm"))
        elif direct is not None and isinstance(mods[direct], nn.Linear):
            cands.append((direct, "linear"))
        else:
            first = calls[names[0]][0].order
            scope = _lca(names)
            if scope in names:  # a single linear: look in the module holding it
                scope = scope.rpartition(".")[0]
            prefix = scope + "." if scope else ""
            for n in reversed([x for x in linears if x in calls and x not in names
                               and x.startswith(prefix) and calls[x][0].order < first]):
                out_f = mods[n].out_features  # type: ignore[union-attr]
                ratio = heads[0] // max(heads[1], 1)
                if out_f == width or (ratio > 1 and out_f * ratio == width):
                    cands.append((n, "linear"))
        accepted = None
        for j, (cand, kind) in enumerate(cands):
            trial = LinearGroup(linears=tuple(names), prev_op=cand,
                                prev_kind=kind,  # type: ignore[arg-type]
                                inspect=inspect, inspect_kwargs=inspect_kw,
                                roles=group_roles(names))
            if kind == "norm" and kinds.get(cand) is None:
                continue  # a norm of no known kind cannot absorb a scale
            ok = _verify(block32, hidden32, kw32, ref, trial, heads, seed + 97 * i + j,
                         norm_kind=kinds.get(cand))
            if kind == "norm":
                folds[cand] = ok
            if ok:
                accepted = trial
                break
        if accepted is None:
            accepted = LinearGroup(linears=tuple(names), prev_op=None, inspect=inspect,
                                   inspect_kwargs=inspect_kw, roles=group_roles(names))
            if cands and cands[0][1] == "norm":
                norm = cands[0][0]
                why = ("its kind (RMSNorm, LayerNorm or 1 + w) could not be recognised"
                       if kinds.get(norm) is None else
                       f"its output also reaches something besides these linears (a router, "
                       f"the residual stream, ...) although it folds as a {kinds[norm]} norm")
                ambiguous.append(f"{', '.join(names)}: their input is {norm}'s output, but "
                                 f"folding a scale into {norm} changes the block's output: "
                                 f"{why}; not scaled")
        out_groups.append(accepted)
    for n in unreached:
        out_groups.append(LinearGroup(linears=(n,), prev_op=None, inspect=n))
        ambiguous.append(f"{n} did not run on the tracing input; quantized without a "
                         "producer")

    # where each norm sits
    writer_outputs = {data_key(calls[n][0].out): r for n, r in roles.items()
                      if r in ("o", "down", "expert_down", "shared_down")
                      and calls.get(n) and calls[n][0].out is not None}
    sources = set(once) | set(norm_names)
    sites: list[NormSite] = []
    unplaced: list[str] = []
    block_key = data_key(ref)
    for n in norm_names:
        c = calls[n][0]
        if kinds.get(n) is None or c.inp is None or c.out is None:
            unplaced.append(f"{n}: its kind (RMSNorm, LayerNorm or 1 + w) could not be "
                            "recognised")
            continue
        readers = [m for m in once + ran_floats if n in flow.direct(m, sources)]
        pos = infer.norm_position(n, input_key=data_key(c.inp), output_key=data_key(c.out),
                                  block_output_key=block_key, writer_outputs=writer_outputs,
                                  readers=readers, roles=roles,
                                  feeders=flow.direct(n, set(once)), folds=folds.get(n))
        if pos is None:
            unplaced.append(f"{n}: what its output feeds could not be found")
            continue
        sites.append(NormSite(n, kinds[n], pos))  # type: ignore[arg-type]
    unroled_msgs = [f"{n}: its role could not be inferred from the data flow" for n in unroled]
    return BlockTrace(BlockLayout(groups=tuple(out_groups), float_linears=floats,
                                  float_roles=tuple(roles.get(f, "router") for f in floats),
                                  norms=tuple(sites)),
                      ambiguous, floats, unroled_msgs, unplaced)


def structure_key(block: nn.Module) -> tuple[Any, ...]:
    """Blocks with equal keys share a layout."""
    return tuple((n, type(m).__name__, tuple(getattr(m, "weight", torch.empty(0)).shape)
                  if isinstance(getattr(m, "weight", None), torch.Tensor) else ())
                 for n, m in block.named_modules())


# --------------------------------------------------------------------------- model level

@dataclass
class ModelTrace:
    blocks: str
    embeddings: tuple[str, ...]
    pre_block: tuple[str, ...]
    final_norm: str | None
    lm_head: str
    post_block: tuple[str, ...]
    block_input: tuple[torch.Tensor, dict[str, Any]]
    notes: list[str] = field(default_factory=list)
    #: the final norm's input on the tracing forward (float32), to learn its kind
    final_norm_input: torch.Tensor | None = None


class _Stop(Exception):
    pass


def _name_of(model: nn.Module, target: nn.Module | None) -> str | None:
    if target is None:
        return None
    for n, m in model.named_modules():
        if m is target:
            return n
    return None


@torch.no_grad()
def trace_model(model: nn.Module, ids: torch.Tensor) -> ModelTrace:
    """Blocks, pre-block modules, final norm and head of ``model`` from one forward."""
    with _recording(model) as calls:
        model(input_ids=ids, use_cache=False)
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)
             and all(f"{n}.{i}" in calls for i in range(len(m)))]
    if not lists:
        raise ValueError("no list of blocks ran on a text input")
    blocks_name, blocks = max(lists, key=lambda nm: sum(p.numel() for p in nm[1].parameters()))
    first = calls[f"{blocks_name}.0"][0].order
    last = calls[f"{blocks_name}.{len(blocks) - 1}"][-1].order
    head = _name_of(model, model.get_output_embeddings())
    emb = _name_of(model, model.get_input_embeddings())
    if head is None or emb is None:
        raise ValueError("the model has no input or output embedding module")

    def owns_state(n: str) -> bool:
        m = model.get_submodule(n)
        return any(True for _ in m.parameters(recurse=False)) or \
            any(True for _ in m.buffers(recurse=False))

    def outside(n: str) -> bool:  # neither in the blocks nor a module holding them
        return not n.startswith(blocks_name + ".") and not blocks_name.startswith(n + ".") \
            and n != blocks_name

    pre = [n for n, cs in calls.items() if cs[0].order < first and n != emb
           and outside(n) and owns_state(n)]
    post = [n for n, cs in calls.items() if cs[0].order > last and n != head
            and outside(n) and owns_state(n)]
    post.sort(key=lambda n: calls[n][0].order)
    hidden = model.config.get_text_config().hidden_size if hasattr(model.config,
                                                                   "get_text_config") \
        else model.config.hidden_size
    norms = [n for n in post if is_norm_like(model.get_submodule(n), hidden)]
    final_norm = norms[-1] if norms else None

    # the first block's input, for tracing blocks
    got: dict[str, Any] = {}

    def grab(_m: nn.Module, args: tuple[Any, ...], kw: dict[str, Any]) -> None:
        kw = dict(kw)
        h = args[0] if args else kw.pop("hidden_states")
        for k in ("past_key_values", "past_key_value"):
            kw.pop(k, None)
        kw["use_cache"] = False
        got["x"] = (h, kw)
        raise _Stop

    handle = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(input_ids=ids, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    final_in = calls[final_norm][0].inp if final_norm is not None else None
    return ModelTrace(blocks_name, (emb,), tuple(pre), final_norm, head,
                      tuple(n for n in post if n != final_norm), got["x"],
                      final_norm_input=None if final_in is None else final_in.detach().float())
