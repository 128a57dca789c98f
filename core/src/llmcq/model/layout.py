"""Declarative description of a model family (torch-free).

A :class:`ModelLayout` says where the blocks, embeddings, final norm and head are; a
:class:`BlockLayout` lists the block's linears in :class:`LinearGroup` s, llmc's "subsets":
which linears read the same input, which module produces that input (for scaling-based
algorithms such as AWQ and SmoothQuant), and which module to run to measure the group's
output error. Every algorithm reads this one table; an adapter for a new family is mostly
this data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = ["ROLES", "READER_ROLES", "WRITER_ROLES", "SCORE_ROLES", "NORM_KINDS", "NORM_FEEDS",
           "NormSite", "LinearGroup", "BlockLayout", "ModelLayout", "attention_groups",
           "mlp_groups", "prenorm_block", "llama_like_layout"]

#: what a linear does in its block. Multi-head latent attention (DeepSeek-V2/V3, MiniCPM3):
#: ``q_a`` / ``q_b`` the low-rank query down / up projections, ``kv_a`` the latent (and
#: rotary key) down projection, ``kv_b`` the latent's up projection to keys and values.
#: ``router``: a linear whose output weighs or selects experts (kept float).
ROLES = ("q", "k", "v", "o", "qkv", "q_a", "q_b", "kv_a", "kv_b", "gate", "up", "down",
         "gate_up", "router", "expert_gate", "expert_up", "expert_down", "expert_gate_up",
         "shared_gate", "shared_up", "shared_down", "shared_gate_up", "lm_head")
#: roles whose linears read the (normalized) residual stream
READER_ROLES = frozenset({"q", "k", "v", "qkv", "q_a", "kv_a", "gate", "up", "gate_up",
                          "router", "expert_gate", "expert_up", "expert_gate_up",
                          "shared_gate", "shared_up", "shared_gate_up", "lm_head"})
#: roles whose outputs reach the attention scores (an error there passes through the
#: softmax: AWQ and OmniQuant leave their clipping to min-max)
SCORE_ROLES = frozenset({"q", "k", "qkv", "q_a", "q_b", "kv_a", "kv_b"})
#: roles whose linears write into the residual stream
WRITER_ROLES = frozenset({"o", "down", "expert_down", "shared_down"})
#: norm kinds: RMSNorm (``y = x / rms(x) * w``), LayerNorm (mean-centred, weight and
#: bias), Gemma's offset RMSNorm (``y = x / rms(x) * (1 + w)``)
NORM_KINDS = ("rms", "layer", "rms_offset")
#: where a norm sits: on the residual stream's copy that feeds attention or MLP inputs
#: (pre-norms: ``attn``, ``mlp``, both in parallel blocks: ``attn_mlp``), on the attention
#: or MLP output before the residual add (sandwich post-norms: ``attn_out``, ``mlp_out``),
#: on query / key heads (``qk``), on a low-rank latent inside attention (MLA's
#: ``q_a_layernorm`` / ``kv_a_layernorm``: ``latent``), or on the residual stream itself, its
#: output being the residual too (post-LN blocks: ``residual``)
NORM_FEEDS = ("attn", "mlp", "attn_mlp", "attn_out", "mlp_out", "qk", "latent", "residual")


@dataclass(frozen=True)
class NormSite:
    """A norm of the block: its name (relative to the block), kind and what it feeds."""

    name: str
    kind: str
    feeds: str

    def __post_init__(self) -> None:
        if self.kind not in NORM_KINDS:
            raise ValueError(f"unknown norm kind {self.kind!r}; allowed {', '.join(NORM_KINDS)}")
        if self.feeds not in NORM_FEEDS:
            raise ValueError(f"unknown norm position {self.feeds!r}; allowed "
                             f"{', '.join(NORM_FEEDS)}")


@dataclass(frozen=True)
class LinearGroup:
    """Linears of one block that read the same input.

    ``linears`` are names relative to the block; ``*`` matches one name component
    (``mlp.experts.*.up_proj``). ``prev_op`` is the module whose output is exactly that input:
    a norm (its weight absorbs a per-channel scale) or a linear (its output rows absorb it);
    ``None`` when no such module exists and scaling must not be applied. ``inspect`` is the
    module whose output measures the group's error, run with the block's keyword inputs when
    ``inspect_kwargs``. Where no single module reads the group's input (parallel attention:
    one norm feeds attention and MLP), ``inspect`` is a tuple of modules whose outputs on that
    input are added, and ``inspect_kwargs`` a tuple saying which of them take the keywords.
    """

    linears: tuple[str, ...]
    prev_op: str | None
    inspect: str | tuple[str, ...]
    prev_kind: Literal["norm", "linear", "none"] = "norm"
    inspect_kwargs: bool | tuple[bool, ...] = False
    #: the role of each entry of ``linears`` (:data:`ROLES`); empty: not declared
    roles: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.linears:
            raise ValueError("a LinearGroup needs at least one linear")
        if self.roles:
            if len(self.roles) != len(self.linears):
                raise ValueError(f"roles {self.roles} need one entry per linear "
                                 f"{self.linears}")
            bad = [r for r in self.roles if r not in ROLES]
            if bad:
                raise ValueError(f"unknown roles {bad}; allowed {', '.join(ROLES)}")
        if self.prev_op is None and self.prev_kind != "none":
            object.__setattr__(self, "prev_kind", "none")
        if isinstance(self.inspect, tuple):
            flags = self.inspect_kwargs
            if not isinstance(flags, tuple):
                flags = (bool(flags),) * len(self.inspect)
            if len(flags) != len(self.inspect):
                raise ValueError("inspect_kwargs needs one flag per inspect module")
            object.__setattr__(self, "inspect_kwargs", flags)
        elif isinstance(self.inspect_kwargs, tuple):
            raise ValueError("a tuple of inspect_kwargs needs a tuple of inspect modules")

    @property
    def inspect_names(self) -> tuple[str, ...]:
        return self.inspect if isinstance(self.inspect, tuple) else (self.inspect,)

    @property
    def inspect_flags(self) -> tuple[bool, ...]:
        flags = self.inspect_kwargs
        return flags if isinstance(flags, tuple) else (bool(flags),)


@dataclass(frozen=True)
class BlockLayout:
    """The linear groups of one block, in execution order.

    ``float_linears`` are linears deliberately left unquantized (an MoE router, say); every
    other linear of the block must appear in exactly one group. ``float_roles``: their
    roles, one each. ``norms``: the block's norms with kinds and positions.
    """

    groups: tuple[LinearGroup, ...]
    float_linears: tuple[str, ...] = ()
    float_roles: tuple[str, ...] = ()
    norms: tuple[NormSite, ...] = ()

    def __post_init__(self) -> None:
        if self.float_roles and len(self.float_roles) != len(self.float_linears):
            raise ValueError("float_roles need one entry per float linear")
        bad = [r for r in self.float_roles if r not in ROLES]
        if bad:
            raise ValueError(f"unknown roles {bad}; allowed {', '.join(ROLES)}")

    @property
    def has_roles(self) -> bool:
        """Every linear (float ones included) has a declared role."""
        return all(g.roles for g in self.groups) and \
            (not self.float_linears or bool(self.float_roles))

    def roles(self) -> dict[str, str]:
        """Linear name pattern -> role, for every linear with a declared role."""
        out = {}
        for g in self.groups:
            out.update(zip(g.linears, g.roles))
        out.update(zip(self.float_linears, self.float_roles))
        return out

    def residual_readers(self) -> tuple[str, ...]:
        """Patterns of the linears reading the residual stream (through a norm)."""
        return tuple(n for n, r in self.roles().items() if r in READER_ROLES)

    def residual_writers(self) -> tuple[str, ...]:
        """Patterns of the linears writing into the residual stream."""
        return tuple(n for n, r in self.roles().items() if r in WRITER_ROLES)

    @property
    def has_norm_kinds(self) -> bool:
        """Every norm producing a group's input is declared with its kind."""
        declared = {n.name for n in self.norms}
        return bool(self.norms) and all(g.prev_op in declared for g in self.groups
                                        if g.prev_kind == "norm" and g.prev_op)

    def norm_kinds(self) -> dict[str, str]:
        """Norm name -> kind, for every declared norm."""
        return {n.name: n.kind for n in self.norms}

    @property
    def rotatable(self) -> bool:
        """The residual stream can be rotated through this block: roles and norm kinds
        declared, no norm on a writer's output before the residual add (sandwich post-norms)
        and none on the residual stream itself (post-LN)."""
        return self.has_roles and self.has_norm_kinds and not any(
            n.feeds in ("attn_out", "mlp_out", "residual") for n in self.norms)


@dataclass(frozen=True)
class ModelLayout:
    """Where things are in a ``*ForCausalLM`` model (dotted paths from the model root)."""

    blocks: str
    embeddings: tuple[str, ...]
    final_norm: str | None
    lm_head: str
    block: BlockLayout
    #: module computing shared position embeddings (rotary), if the family has one
    rotary: str | None = None
    #: other modules a block-wise forward must run before the blocks (learned positions, ...)
    pre_block: tuple[str, ...] = field(default_factory=tuple)
    #: kind of ``final_norm`` (:data:`NORM_KINDS`); None: not declared
    final_norm_kind: str | None = None
    #: why the residual stream cannot be rotated whatever the blocks declare (a LayerNorm
    #: on the embeddings' output, learned positions also written into the stream, ...): one
    #: sentence each; any withholds ``rotation_points``
    rotation_blockers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.final_norm_kind is not None and self.final_norm_kind not in NORM_KINDS:
            raise ValueError(f"unknown norm kind {self.final_norm_kind!r}; allowed "
                             f"{', '.join(NORM_KINDS)}")


# --------------------------------------------------------------------------- builders
# Most decoder blocks are "pre-norm attention, then pre-norm MLP"; these helpers spell that
# out once so family adapters only name their modules.

def attention_groups(*, norm: str | None, qkv: tuple[str, ...], out: str,
                     attn: str = "self_attn", v: str | None = None,
                     qkv_roles: tuple[str, ...] | None = None) -> tuple[LinearGroup, ...]:
    """Attention projections read ``norm``'s output; the output projection reads a per-channel
    linear function of ``v`` (None when ``v`` is fused with q/k and cannot absorb a scale).
    Roles: ``q, k, v`` for three projections, ``qkv`` for one fused projection, ``o``."""
    if qkv_roles is None:
        qkv_roles = ("q", "k", "v") if len(qkv) == 3 else ("qkv",) if len(qkv) == 1 else ()
    return (
        LinearGroup(linears=qkv, prev_op=norm, prev_kind="norm", inspect=attn,
                    inspect_kwargs=True, roles=qkv_roles),
        LinearGroup(linears=(out,), prev_op=v, prev_kind="linear", inspect=out, roles=("o",)),
    )


def mlp_groups(*, norm: str | None, up: tuple[str, ...], down: str, mlp: str = "mlp",
               down_prev: str | None = None,
               up_roles: tuple[str, ...] | None = None) -> tuple[LinearGroup, ...]:
    """MLP input projections read ``norm``'s output; ``down`` reads a per-channel linear
    function of ``down_prev`` (``up_proj`` of a gated MLP, ``fc1`` under ReLU; None under
    GELU, whose output is not a per-channel scaling of its input). Roles: ``gate, up`` for
    two input projections, ``up`` for one (or ``gate_up`` when fused: pass ``up_roles``),
    ``down``."""
    if up_roles is None:
        up_roles = ("gate", "up") if len(up) == 2 else ("up",) if len(up) == 1 else ()
    return (
        LinearGroup(linears=up, prev_op=norm, prev_kind="norm", inspect=mlp, roles=up_roles),
        LinearGroup(linears=(down,), prev_op=down_prev, prev_kind="linear", inspect=down,
                    roles=("down",)),
    )


def prenorm_block(*, attn: str = "self_attn", mlp: str = "mlp",
                  attn_norm: str = "input_layernorm", mlp_norm: str = "post_attention_layernorm",
                  q: str = "q_proj", k: str = "k_proj", v: str = "v_proj", o: str = "o_proj",
                  gate: str | None = "gate_proj", up: str = "up_proj", down: str = "down_proj",
                  relu: bool = False, norm_kind: str = "rms",
                  extra_norms: tuple[NormSite, ...] = ()) -> BlockLayout:
    """A Llama-shaped block: ``attn_norm -> q,k,v``; ``v -> o``; ``mlp_norm -> gate,up``;
    ``up -> down`` (gated MLP), or ``up -> down`` only when ``relu`` for an ungated MLP.
    ``norm_kind`` is the kind of both pre-norms; ``extra_norms`` adds other norms of the
    block (sandwich post-norms, q/k norms)."""
    a = f"{attn}."
    m = f"{mlp}." if mlp else ""
    ups = (f"{m}{gate}", f"{m}{up}") if gate else (f"{m}{up}",)
    down_prev = f"{m}{up}" if (gate or relu) else None
    return BlockLayout(groups=(
        *attention_groups(norm=attn_norm, qkv=(a + q, a + k, a + v), out=a + o, attn=attn,
                          v=a + v),
        *mlp_groups(norm=mlp_norm, up=ups, down=f"{m}{down}", mlp=mlp or f"{m}{up}",
                    down_prev=down_prev),
    ), norms=(NormSite(attn_norm, norm_kind, "attn"), NormSite(mlp_norm, norm_kind, "mlp"),
              *extra_norms))


def llama_like_layout(block: BlockLayout | None = None, *,
                      final_norm_kind: str = "rms") -> ModelLayout:
    """Where things are in the many ``*ForCausalLM`` classes that copy Llama's module names
    (``model.layers``, ``model.embed_tokens``, ``model.rotary_emb``, ``model.norm``,
    ``lm_head``); ``block`` defaults to the pre-norm Llama block."""
    return ModelLayout(blocks="model.layers", embeddings=("model.embed_tokens",),
                       rotary="model.rotary_emb", final_norm="model.norm", lm_head="lm_head",
                       block=block if block is not None else prenorm_block(),
                       final_norm_kind=final_norm_kind)
