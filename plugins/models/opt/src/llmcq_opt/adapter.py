"""Where things are in ``OPTForCausalLM``.

Pre-LN OPT (all sizes but 350m): ``self_attn_layer_norm -> q,k,v``, ``v_proj -> out_proj``,
``final_layer_norm -> fc1`` and, since ReLU is positively homogeneous
(``relu(x / s) = relu(x) / s`` for ``s > 0``), ``fc1 -> fc2``. Post-LN OPT (350m,
``do_layer_norm_before: false``) normalizes after the residual add, so the norms' outputs
are also the residual stream: no norm may absorb a scale there.

Before the blocks run the token embedding, the learned positions (``embed_positions``) and,
for 350m, ``project_in``; after them ``final_layer_norm`` (pre-LN only), ``project_out``
(350m) and the head.
"""

from __future__ import annotations

import torch
from torch import nn

from llmcq.model.adapter import ModelAdapter
from llmcq.model.layout import BlockLayout, LinearGroup, ModelLayout, NormSite

__all__ = ["OptAdapter", "OPT_LAYOUT", "opt_block"]

#: what stops a rotation of OPT's residual stream
POSITIONS_BLOCKER = ("the learned positions (model.decoder.embed_positions) also write into "
                     "the residual stream, and the layout declares no role for them")


def opt_block(*, pre_ln: bool = True, relu: bool = True) -> BlockLayout:
    """Roles ``q, k, v, o`` (``out_proj``), ``up`` (``fc1``), ``down`` (``fc2``); both norms
    are LayerNorms, pre-norms (``attn``, ``mlp``) or, post-LN, on the residual itself."""
    return BlockLayout(groups=(
        LinearGroup(linears=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                    prev_op="self_attn_layer_norm" if pre_ln else None, inspect="self_attn",
                    inspect_kwargs=True, roles=("q", "k", "v")),
        LinearGroup(linears=("self_attn.out_proj",), prev_op="self_attn.v_proj",
                    prev_kind="linear", inspect="self_attn.out_proj", roles=("o",)),
        LinearGroup(linears=("fc1",), prev_op="final_layer_norm" if pre_ln else None,
                    inspect="fc1", roles=("up",)),
        LinearGroup(linears=("fc2",), prev_op="fc1" if relu else None, prev_kind="linear",
                    inspect="fc2", roles=("down",)),
    ), norms=(NormSite("self_attn_layer_norm", "layer", "attn" if pre_ln else "residual"),
              NormSite("final_layer_norm", "layer", "mlp" if pre_ln else "residual")))


OPT_LAYOUT = ModelLayout(
    blocks="model.decoder.layers",
    embeddings=("model.decoder.embed_tokens",),
    pre_block=("model.decoder.embed_positions",),
    final_norm="model.decoder.final_layer_norm",
    lm_head="lm_head",
    block=opt_block(),
    final_norm_kind="layer",
    rotation_blockers=(POSITIONS_BLOCKER,),
)


class OptAdapter(ModelAdapter):
    layout = OPT_LAYOUT

    def prepare(self, model: nn.Module) -> None:
        """The few OPT variations live in the config: pick this model's layout."""
        cfg = model.config
        dec = model.model.decoder
        pre_block = ["model.decoder.embed_positions"]
        blockers = [POSITIONS_BLOCKER]
        if getattr(dec, "project_in", None) is not None:
            pre_block.append("model.decoder.project_in")
            blockers.append("project_in / project_out map the residual stream to and from "
                            "the embedding width")
        has_final = dec.final_layer_norm is not None
        self.layout = ModelLayout(
            blocks=OPT_LAYOUT.blocks, embeddings=OPT_LAYOUT.embeddings,
            pre_block=tuple(pre_block),
            final_norm=OPT_LAYOUT.final_norm if has_final else None,
            lm_head="lm_head",
            block=opt_block(pre_ln=bool(cfg.do_layer_norm_before),
                            relu=cfg.activation_function == "relu"),
            final_norm_kind="layer" if has_final else None,
            rotation_blockers=tuple(blockers))

    def head_logits(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        dec = model.model.decoder
        if dec.final_layer_norm is not None:
            hidden = dec.final_layer_norm(hidden)
        if dec.project_out is not None:
            hidden = dec.project_out(hidden)
        return model.lm_head(hidden)
