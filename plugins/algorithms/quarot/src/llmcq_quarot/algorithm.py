"""QuaRot's driver: everything happens in ``transform_model``, before the block loop.

1. fuse every norm's weight into its readers (:func:`~llmcq_quarot.rotation.fuse_norm`);
2. untie the head from the embeddings (logged; the saved config says
   ``tie_word_embeddings: False``);
3. R1: ``Q`` of the hidden size on the embeddings, every writer and every reader;
4. R2: a head_dim Hadamard on ``v_proj``'s heads and ``o_proj``'s columns;
5. R4 (``online_rotate``): a Hadamard of ``down_proj``'s input width folded into its
   weight and attached as an online input transform
   (:func:`llmcq.quant.transform.attach_online_transform`): the float model applies it in
   a forward pre-hook, so every later step (GPTQ's Hessian, static activation ranges) sees
   the rotated input, and the engine gives the record that ``input_transform``.

The run's quantizer (RTN, GPTQ, ...) then quantizes the rotated weights block by block.

Each stage is a function of a :class:`RotationPlan` (:func:`plan_rotation`,
:func:`fuse_and_untie`, :func:`rotate_residual`, :func:`rotate_value_heads`,
:func:`attach_down_transforms`), so a method that chooses the rotations differently
(SpinQuant learns R1 and R2 per block) reuses the fusion, the planning and R4.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from llmcq.algorithm import Algorithm
from llmcq.errors import PluginError
from llmcq.model.adapter import resolve_block
from llmcq.model.layout import READER_ROLES, WRITER_ROLES
from llmcq.quant.transform import MatrixTransform, OnlineTransform, attach_online_transform
from llmcq.transforms.hadamard import Hadamard, hadamard_matrix, hadamard_order, random_orthogonal
from torch import nn

from llmcq_quarot.rotation import (
    fold_online,
    fuse_norm,
    rotate_embedding,
    rotate_heads,
    rotate_reader,
    rotate_writer,
    untie_head,
)

__all__ = ["Quarot", "orthogonal", "online_transform", "RotationPlan", "plan_rotation",
           "block_plan", "fuse_and_untie", "rotate_residual", "rotate_value_heads",
           "attach_down_transforms", "run_seed", "run_device"]

log = logging.getLogger("llmcq.quarot")

#: roles whose input gets R4's online Hadamard (the MLP's down projections)
DOWN_ROLES = frozenset({"down", "expert_down", "shared_down"})
#: norm positions on the residual stream's copies read by attention / MLP
PRE_NORM_FEEDS = frozenset({"attn", "mlp", "attn_mlp"})


def orthogonal(n: int, mode: str, seed: int, what: str) -> tuple[torch.Tensor, str]:
    """An orthogonal ``n x n`` matrix (float64) and its description: a Hadamard matrix
    when ``mode == "hadamard"`` and one exists for ``n``, else random orthogonal from
    ``seed`` (with a warning when a Hadamard was asked for)."""
    if mode == "hadamard":
        order = hadamard_order(n)
        if order is not None:
            return hadamard_matrix(n, torch.float64), f"hadamard({n} = {order[0]} x {order[1]})"
        log.warning("quarot: no Hadamard matrix of order %d (%s) from Sylvester x Paley: "
                    "using a random orthogonal matrix (seed %d) instead", n, what, seed)
    return random_orthogonal(n, seed, torch.float64), f"random_orthogonal({n}, seed {seed})"


def online_transform(n: int, seed: int, what: str, fp32: bool = True) -> OnlineTransform:
    """R4's online transform of width ``n``: :class:`~llmcq.transforms.hadamard.Hadamard`
    (computed in float32, or in the input's dtype when not ``fp32``) when one exists, else
    a random orthogonal :class:`MatrixTransform` (warned)."""
    if hadamard_order(n) is not None:
        return Hadamard(n, fp32=fp32)
    log.warning("quarot: no Hadamard matrix of order %d (%s): the online transform is a "
                "random orthogonal matrix (seed %d), applied as a dense matmul", n, what, seed)
    return MatrixTransform(random_orthogonal(n, seed, torch.float32))


@dataclass
class RotationPlan:
    """What the rotations touch, found (and checked) before any weight changes: per block
    its norms with their readers, its residual readers and writers, its (v, o) pairs and
    its down projections (by role); the model's embeddings, head and final norm."""

    blocks: list[dict[str, Any]]
    embeddings: list[nn.Module]
    head: nn.Linear
    final: nn.Module | None
    #: the adapter's facts (hidden_size, heads, kv_heads, head_dim, final_norm_kind)
    facts: Any


def plan_rotation(model: nn.Module, adapter: Any, who: str = "quarot") -> RotationPlan:
    """Check that ``model`` can be rotated and list what the rotations touch; raises
    :class:`PluginError` (prefixed ``who``) before anything changes."""
    layout = adapter.layout
    facts = adapter.facts(model)
    if layout.rotation_blockers:
        raise PluginError(f"{who}: " + "; ".join(layout.rotation_blockers),
                          stage="transform_model")
    if facts.final_norm_kind not in ("rms", "rms_offset"):
        raise PluginError(f"{who}: the final norm is of kind {facts.final_norm_kind!r}; "
                          "only RMSNorm (rms, rms_offset) models are rotated for now "
                          "(LayerNorm needs the stream mean-centred first)",
                          stage="transform_model")
    plans = []
    for i, block in enumerate(adapter.blocks(model)):
        where = f"{layout.blocks}.{i}"
        lay = adapter.block_layout(model, i)
        if not lay.rotatable:
            raise PluginError(f"{who}: {where} cannot be rotated (roles or norm kinds "
                              "missing, or a sandwich / post-LN norm)",
                              stage="transform_model")
        groups = resolve_block(block, lay, where=where)
        plans.append(block_plan(lay, groups, where, who))
    return RotationPlan(
        blocks=plans, embeddings=[model.get_submodule(n) for n in layout.embeddings],
        head=adapter.lm_head(model),
        final=model.get_submodule(layout.final_norm) if layout.final_norm else None,
        facts=facts)


@torch.no_grad()
def fuse_and_untie(model: nn.Module, plan: RotationPlan, device: torch.device,
                   who: str = "quarot") -> bool:
    """Fuse every pre-norm into its readers, give the head its own copy of tied embeddings
    (warned), fuse the final norm into the head. Returns whether the head was untied."""
    for bp in plan.blocks:
        for norm, kind, readers in bp["norms"]:
            fuse_norm(norm, kind, readers, device)
    untied = any(untie_head(model, plan.head, e) for e in plan.embeddings)
    if untied:
        log.warning("%s: lm_head shares its weight with the embeddings (tied); "
                    "untied for the rotation: the head keeps its own rotated copy and "
                    "exports are saved with tie_word_embeddings: False (%d more "
                    "parameters)", who, plan.head.weight.numel())
    if plan.final is not None:
        fuse_norm(plan.final, plan.facts.final_norm_kind, [plan.head], device)
    return untied


@torch.no_grad()
def rotate_residual(plan: RotationPlan, q: torch.Tensor) -> None:
    """R1: ``Q`` on the embeddings, the head, every residual reader and writer."""
    for e in plan.embeddings:
        rotate_embedding(e, q)
    rotate_reader(plan.head, q)
    for bp in plan.blocks:
        for lin in bp["readers"]:
            rotate_reader(lin, q)
        for lin in bp["writers"]:
            rotate_writer(lin, q)


@torch.no_grad()
def rotate_value_heads(plan: RotationPlan, r: torch.Tensor | Sequence[torch.Tensor]) -> None:
    """R2: one head_dim matrix for every block, or one per block (a sequence), on each
    block's (v_proj, o_proj) pair."""
    rs = [r] * len(plan.blocks) if isinstance(r, torch.Tensor) else list(r)
    if len(rs) != len(plan.blocks):
        raise ValueError(f"{len(rs)} R2 matrices for {len(plan.blocks)} blocks")
    facts = plan.facts
    for bp, ri in zip(plan.blocks, rs, strict=True):
        for v, o in bp["vo"]:
            rotate_heads(v, o, ri, heads=facts.heads, kv_heads=facts.kv_heads)


@torch.no_grad()
def attach_down_transforms(plan: RotationPlan, seed: int, fp32: bool,
                           device: torch.device) -> dict[str, int]:
    """R4: fold a Hadamard of ``down_proj``'s input width into every down projection and
    attach it as the linear's online input transform. Returns transform -> count."""
    r4: dict[str, int] = {}
    cache: dict[int, OnlineTransform] = {}
    for bp in plan.blocks:
        for _name, lin in bp["down"]:
            n = lin.in_features
            if n not in cache:
                cache[n] = online_transform(n, seed + 2, "down_proj input", fp32)
            t = cache[n]
            fold_online(lin, t.matrix(torch.float64).to(device))
            attach_online_transform(lin, t)
            r4[t.describe()] = r4.get(t.describe(), 0) + 1
    return r4


def block_plan(lay: Any, groups: Any, where: str, who: str = "quarot") -> dict[str, Any]:
    """One block's norms with their readers, its readers, writers, (v, o) pairs and down
    projections (by role)."""
    sites = {s.name: s for s in lay.norms}
    norms: dict[str, tuple[nn.Module, str, list[nn.Linear]]] = {}
    readers: list[nn.Linear] = []
    writers: list[nn.Linear] = []
    fed: set[int] = set()
    by_role: dict[str, list[tuple[str, nn.Linear]]] = {}
    for g in groups:
        for name, lin in g.linears.items():
            role = g.roles[name].kind
            by_role.setdefault(role, []).append((name, lin))
            if role in READER_ROLES:
                readers.append(lin)
            elif role in WRITER_ROLES:
                writers.append(lin)
        site = sites.get(g.spec.prev_op) if g.spec.prev_kind == "norm" else None
        if site is not None and site.feeds in PRE_NORM_FEEDS:
            if site.kind not in ("rms", "rms_offset"):
                raise PluginError(f"{who}: {where}.{site.name} is a {site.kind} norm; "
                                  "only RMSNorm models (rms, rms_offset) are rotated "
                                  "for now", stage="transform_model")
            entry = norms.setdefault(site.name, (g.prev_op, site.kind, []))
            entry[2].extend(g.linears.values())
            fed.update(id(lin) for lin in g.linears.values())
    float_readers = [n for n, r in zip(lay.float_linears, lay.float_roles, strict=False)
                     if r in READER_ROLES]
    unfed = [n for n, lin in ((n, lin) for g in groups for n, lin in g.linears.items())
             if lin in readers and id(lin) not in fed]
    if float_readers or unfed:
        raise PluginError(f"{who}: {where}: residual readers not fed by a declared "
                          f"pre-norm: {', '.join(float_readers + unfed)} (MoE experts "
                          "read the MLP norm beside the router: not supported yet)",
                          stage="transform_model")
    vs, os_ = by_role.get("v", []), by_role.get("o", [])
    vo = [(vs[0][1], os_[0][1])] if len(vs) == 1 and len(os_) == 1 else []
    down = [(n, lin) for role in DOWN_ROLES for n, lin in by_role.get(role, [])]
    return {"where": where, "norms": list(norms.values()), "readers": readers,
            "writers": writers, "vo": vo, "down": down}


class Quarot(Algorithm):
    """Rotations before the block loop; quantizes nothing itself."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.facts: dict[str, Any] = {}

    def _seed(self) -> int:
        return run_seed(self.run)

    def _device(self) -> torch.device:
        return run_device(self.run)

    @torch.no_grad()
    def transform_model(self, model: nn.Module) -> None:
        special = self.special
        seed = self._seed()
        device = self._device()
        plan = plan_rotation(model, self.run.adapter)  # checks first, nothing changed yet
        facts = plan.facts
        untied = fuse_and_untie(model, plan, device)
        q, r1 = orthogonal(facts.hidden_size, special.rotate_mode, seed, "hidden size")
        rotate_residual(plan, q.to(device))
        r2 = None
        if any(bp["vo"] for bp in plan.blocks):
            r, r2 = orthogonal(facts.head_dim, "hadamard", seed + 1, "head_dim")
            rotate_value_heads(plan, r.to(device))
        skipped_r2 = [bp["where"] for bp in plan.blocks if not bp["vo"]]
        if skipped_r2:
            log.info("quarot: R2 skipped in %s (no separate v_proj / o_proj)",
                     ", ".join(skipped_r2))
        r4 = attach_down_transforms(plan, seed, special.fp32_had, device) \
            if special.online_rotate else {}
        self.facts = {
            "r1": r1, "r2": r2, "norms_fused": sum(len(bp["norms"]) for bp in plan.blocks)
            + (plan.final is not None), "untied_embeddings": untied,
            "online": r4,  # transform -> number of linears applying it
            "rotate_mode": special.rotate_mode,
        }
        log.info("quarot: R1 %s on the residual stream, R2 %s per head, R4 %s", r1, r2,
                 ", ".join(self.facts["online"]) or "off")

    def summary(self) -> dict[str, Any]:
        return dict(self.facts)


def run_seed(run: Any) -> int:
    """``base.seed`` of the run (42 for a stand-in run without a config)."""
    cfg = getattr(run, "config", None)
    base = getattr(cfg, "base", None)
    return int(getattr(base, "seed", 42))


def run_device(run: Any) -> torch.device:
    """The run's compute device (the CPU for a stand-in run without one)."""
    dev = getattr(run, "device", None)
    return torch.device(dev) if dev is not None else torch.device("cpu")
