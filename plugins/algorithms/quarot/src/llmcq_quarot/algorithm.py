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
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from llmcq.algorithm import Algorithm
from llmcq.errors import PluginError
from llmcq.model.adapter import resolve_block
from llmcq.model.layout import READER_ROLES, WRITER_ROLES
from llmcq.quant.transform import MatrixTransform, OnlineTransform, attach_online_transform
from llmcq.transforms.hadamard import Hadamard, hadamard_matrix, hadamard_order, \
    random_orthogonal
from llmcq_quarot.rotation import fold_online, fuse_norm, rotate_embedding, rotate_heads, \
    rotate_reader, rotate_writer, untie_head

__all__ = ["Quarot", "orthogonal", "online_transform"]

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


class Quarot(Algorithm):
    """Rotations before the block loop; quantizes nothing itself."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.facts: dict[str, Any] = {}

    def _seed(self) -> int:
        cfg = getattr(self.run, "config", None)
        base = getattr(cfg, "base", None)
        return int(getattr(base, "seed", 42))

    def _device(self) -> torch.device:
        dev = getattr(self.run, "device", None)
        return torch.device(dev) if dev is not None else torch.device("cpu")

    @torch.no_grad()
    def transform_model(self, model: nn.Module) -> None:
        adapter = self.run.adapter
        layout = adapter.layout
        facts = adapter.facts(model)
        special = self.special
        seed = self._seed()
        device = self._device()
        # ---------------------------------------------------------------- checks first
        if layout.rotation_blockers:
            raise PluginError("quarot: " + "; ".join(layout.rotation_blockers),
                              stage="transform_model")
        if facts.final_norm_kind not in ("rms", "rms_offset"):
            raise PluginError(f"quarot: the final norm is of kind {facts.final_norm_kind!r}; "
                              "only RMSNorm (rms, rms_offset) models are rotated for now "
                              "(LayerNorm needs the stream mean-centred first)",
                              stage="transform_model")
        blocks = adapter.blocks(model)
        plans = []
        for i, block in enumerate(blocks):
            where = f"{layout.blocks}.{i}"
            lay = adapter.block_layout(model, i)
            if not lay.rotatable:
                raise PluginError(f"quarot: {where} cannot be rotated (roles or norm kinds "
                                  "missing, or a sandwich / post-LN norm)",
                                  stage="transform_model")
            groups = resolve_block(block, lay, where=where)
            plans.append(self._plan(block, lay, groups, where))
        emb_names = layout.embeddings
        embs = [model.get_submodule(n) for n in emb_names]
        head = adapter.lm_head(model)
        final = model.get_submodule(layout.final_norm) if layout.final_norm else None
        # ---------------------------------------------------------------- 1. norms
        for plan in plans:
            for norm, kind, readers in plan["norms"]:
                fuse_norm(norm, kind, readers, device)
        # ---------------------------------------------------------------- 2. untie
        untied = any(untie_head(model, head, e) for e in embs)
        if untied:
            log.warning("quarot: lm_head shares its weight with the embeddings (tied); "
                        "untied for the rotation: the head keeps its own rotated copy and "
                        "exports are saved with tie_word_embeddings: False (%d more "
                        "parameters)", head.weight.numel())
        if final is not None:
            fuse_norm(final, facts.final_norm_kind, [head], device)
        # ---------------------------------------------------------------- 3. R1
        q, r1 = orthogonal(facts.hidden_size, special.rotate_mode, seed, "hidden size")
        q = q.to(device)
        for e in embs:
            rotate_embedding(e, q)
        rotate_reader(head, q)
        for plan in plans:
            for lin in plan["readers"]:
                rotate_reader(lin, q)
            for lin in plan["writers"]:
                rotate_writer(lin, q)
        # ---------------------------------------------------------------- 4. R2
        r2 = None
        if any(plan["vo"] for plan in plans):
            r, r2 = orthogonal(facts.head_dim, "hadamard", seed + 1, "head_dim")
            r = r.to(device)
            for plan in plans:
                for v, o in plan["vo"]:
                    rotate_heads(v, o, r, heads=facts.heads, kv_heads=facts.kv_heads)
        skipped_r2 = [plan["where"] for plan in plans if not plan["vo"]]
        if skipped_r2:
            log.info("quarot: R2 skipped in %s (no separate v_proj / o_proj)",
                     ", ".join(skipped_r2))
        # ---------------------------------------------------------------- 5. R4
        r4: dict[str, int] = {}
        if special.online_rotate:
            cache: dict[int, OnlineTransform] = {}
            for plan in plans:
                for name, lin in plan["down"]:
                    n = lin.in_features
                    if n not in cache:
                        cache[n] = online_transform(n, seed + 2, "down_proj input",
                                                    special.fp32_had)
                    t = cache[n]
                    fold_online(lin, t.matrix(torch.float64).to(device))
                    attach_online_transform(lin, t)
                    r4[t.describe()] = r4.get(t.describe(), 0) + 1
        self.facts = {
            "r1": r1, "r2": r2, "norms_fused": sum(len(p["norms"]) for p in plans)
            + (final is not None), "untied_embeddings": untied,
            "online": r4,  # transform -> number of linears applying it
            "rotate_mode": special.rotate_mode,
        }
        log.info("quarot: R1 %s on the residual stream, R2 %s per head, R4 %s", r1, r2,
                 ", ".join(self.facts["online"]) or "off")

    def _plan(self, block: nn.Module, lay: Any, groups: Any, where: str) -> dict[str, Any]:
        """The block's norms with their readers, its readers, writers, (v, o) pairs and
        down projections (by role)."""
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
                    raise PluginError(f"quarot: {where}.{site.name} is a {site.kind} norm; "
                                      "only RMSNorm models (rms, rms_offset) are rotated "
                                      "for now", stage="transform_model")
                entry = norms.setdefault(site.name, (g.prev_op, site.kind, []))
                entry[2].extend(g.linears.values())
                fed.update(id(lin) for lin in g.linears.values())
        float_readers = [n for n, r in zip(lay.float_linears, lay.float_roles)
                         if r in READER_ROLES]
        unfed = [n for n, lin in ((n, lin) for g in groups for n, lin in g.linears.items())
                 if lin in readers and id(lin) not in fed]
        if float_readers or unfed:
            raise PluginError(f"quarot: {where}: residual readers not fed by a declared "
                              f"pre-norm: {', '.join(float_readers + unfed)} (MoE experts "
                              "read the MLP norm beside the router: not supported yet)",
                              stage="transform_model")
        vs, os_ = by_role.get("v", []), by_role.get("o", [])
        vo = [(vs[0][1], os_[0][1])] if len(vs) == 1 and len(os_) == 1 else []
        down = [(n, lin) for role in DOWN_ROLES for n, lin in by_role.get(role, [])]
        return {"where": where, "norms": list(norms.values()), "readers": readers,
                "writers": writers, "vo": vo, "down": down}

    def summary(self) -> dict[str, Any]:
        return dict(self.facts)
