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

__all__ = ["LinearGroup", "BlockLayout", "ModelLayout", "attention_groups", "mlp_groups",
           "prenorm_block", "llama_like_layout"]


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

    def __post_init__(self) -> None:
        if not self.linears:
            raise ValueError("a LinearGroup needs at least one linear")
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
    other linear of the block must appear in exactly one group.
    """

    groups: tuple[LinearGroup, ...]
    float_linears: tuple[str, ...] = ()


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


# --------------------------------------------------------------------------- builders
# Most decoder blocks are "pre-norm attention, then pre-norm MLP"; these helpers spell that
# out once so family adapters only name their modules.

def attention_groups(*, norm: str | None, qkv: tuple[str, ...], out: str,
                     attn: str = "self_attn", v: str | None = None) -> tuple[LinearGroup, ...]:
    """Attention projections read ``norm``'s output; the output projection reads a per-channel
    linear function of ``v`` (None when ``v`` is fused with q/k and cannot absorb a scale)."""
    return (
        LinearGroup(linears=qkv, prev_op=norm, prev_kind="norm", inspect=attn,
                    inspect_kwargs=True),
        LinearGroup(linears=(out,), prev_op=v, prev_kind="linear", inspect=out),
    )


def mlp_groups(*, norm: str | None, up: tuple[str, ...], down: str, mlp: str = "mlp",
               down_prev: str | None = None) -> tuple[LinearGroup, ...]:
    """MLP input projections read ``norm``'s output; ``down`` reads a per-channel linear
    function of ``down_prev`` (``up_proj`` of a gated MLP, ``fc1`` under ReLU; None under
    GELU, whose output is not a per-channel scaling of its input)."""
    return (
        LinearGroup(linears=up, prev_op=norm, prev_kind="norm", inspect=mlp),
        LinearGroup(linears=(down,), prev_op=down_prev, prev_kind="linear", inspect=down),
    )


def prenorm_block(*, attn: str = "self_attn", mlp: str = "mlp",
                  attn_norm: str = "input_layernorm", mlp_norm: str = "post_attention_layernorm",
                  q: str = "q_proj", k: str = "k_proj", v: str = "v_proj", o: str = "o_proj",
                  gate: str | None = "gate_proj", up: str = "up_proj", down: str = "down_proj",
                  relu: bool = False) -> BlockLayout:
    """A Llama-shaped block: ``attn_norm -> q,k,v``; ``v -> o``; ``mlp_norm -> gate,up``;
    ``up -> down`` (gated MLP), or ``up -> down`` only when ``relu`` for an ungated MLP."""
    a = f"{attn}."
    m = f"{mlp}." if mlp else ""
    ups = (f"{m}{gate}", f"{m}{up}") if gate else (f"{m}{up}",)
    down_prev = f"{m}{up}" if (gate or relu) else None
    return BlockLayout(groups=(
        *attention_groups(norm=attn_norm, qkv=(a + q, a + k, a + v), out=a + o, attn=attn,
                          v=a + v),
        *mlp_groups(norm=mlp_norm, up=ups, down=f"{m}{down}", mlp=mlp or f"{m}{up}",
                    down_prev=down_prev),
    ))


def llama_like_layout(block: BlockLayout | None = None) -> ModelLayout:
    """Where things are in the many ``*ForCausalLM`` classes that copy Llama's module names
    (``model.layers``, ``model.embed_tokens``, ``model.rotary_emb``, ``model.norm``,
    ``lm_head``); ``block`` defaults to the pre-norm Llama block."""
    return ModelLayout(blocks="model.layers", embeddings=("model.embed_tokens",),
                       rotary="model.rotary_emb", final_norm="model.norm", lm_head="lm_head",
                       block=block if block is not None else prenorm_block())
