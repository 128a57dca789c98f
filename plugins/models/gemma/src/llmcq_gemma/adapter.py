"""Where things are in ``Gemma2ForCausalLM`` / ``Gemma3ForCausalLM``.

Gemma's RMSNorm multiplies by ``1 + weight`` (norm kind ``rms_offset``). Core's folding
handles that kind directly (``w' = (1 + w) / s - 1``), but OmniQuant's equivalent
transformation computes a norm producer's scaled weight itself as ``w / s`` while it learns,
so :meth:`GemmaAdapter.prepare` still swaps the two norms that feed linears for
:class:`OffsetRMSNorm`, which holds the effective multiplier ``1 + weight`` as its
``weight`` (computing the same function; kind ``rms``) and writes ``weight - 1`` back under
the original key when saved, so exports reload with transformers' Gemma classes.

A block: ``input_layernorm -> q,k,v``; ``v_proj -> o_proj``; ``post_attention_layernorm``
normalizes the attention *output* (a sandwich norm, ``attn_out``) and
``pre_feedforward_layernorm`` feeds ``gate,up``; ``up_proj -> down_proj``;
``post_feedforward_layernorm`` normalizes the MLP output (``mlp_out``). Gemma 3 adds per-head
``q_norm``/``k_norm``. The sandwich norms stop a rotation of the residual stream, so the
family provides no ``rotation_points``. Logits are soft-capped (``cap * tanh(logits / cap)``)
when ``final_logit_softcapping`` is set.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from llmcq.model.adapter import ModelAdapter
from llmcq.model.layout import BlockLayout, NormSite, llama_like_layout, prenorm_block

__all__ = ["GemmaAdapter", "GEMMA_LAYOUT", "GEMMA3_BLOCK", "OffsetRMSNorm"]

#: norms that feed linears (swapped for OffsetRMSNorm by prepare: kind rms afterwards)
_FEEDING = ("input_layernorm", "pre_feedforward_layernorm")
_SANDWICH = (NormSite("post_attention_layernorm", "rms_offset", "attn_out"),
             NormSite("post_feedforward_layernorm", "rms_offset", "mlp_out"))
_QK = (NormSite("self_attn.q_norm", "rms_offset", "qk"),
       NormSite("self_attn.k_norm", "rms_offset", "qk"))

GEMMA_LAYOUT = llama_like_layout(prenorm_block(mlp_norm="pre_feedforward_layernorm",
                                               extra_norms=_SANDWICH),
                                 final_norm_kind="rms_offset")
GEMMA3_BLOCK: BlockLayout = prenorm_block(mlp_norm="pre_feedforward_layernorm",
                                          extra_norms=_SANDWICH + _QK)


class OffsetRMSNorm(nn.Module):
    """Gemma's RMSNorm with ``weight`` holding ``1 + w``; saved and loaded as ``w``."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.eps = norm.eps
        self.weight = nn.Parameter(1.0 + norm.weight.data.float(), requires_grad=False)
        if norm.weight.dtype != torch.float32:
            self.weight.data = self.weight.data.to(norm.weight.dtype)
        self._register_state_dict_hook(OffsetRMSNorm._to_checkpoint)
        self._register_load_state_dict_pre_hook(OffsetRMSNorm._from_checkpoint)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * self.weight.float()).type_as(x)

    @staticmethod
    def _to_checkpoint(module: nn.Module, state: dict[str, Any], prefix: str,
                       _meta: Any) -> None:
        key = prefix + "weight"
        if key in state:
            state[key] = state[key] - 1.0

    @staticmethod
    def _from_checkpoint(state: dict[str, Any], prefix: str, *_args: Any) -> None:
        key = prefix + "weight"
        if key in state:
            state[key] = state[key] + 1.0

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, weight holds 1 + w"


class GemmaAdapter(ModelAdapter):
    layout = GEMMA_LAYOUT

    def prepare(self, model: nn.Module) -> None:
        for block in model.get_submodule(self.layout.blocks):
            for name in _FEEDING:
                norm = getattr(block, name)
                if not isinstance(norm, OffsetRMSNorm):
                    setattr(block, name, OffsetRMSNorm(norm))

    def block_layout(self, model: nn.Module, index: int) -> BlockLayout:
        if hasattr(self.blocks(model)[index].self_attn, "q_norm"):
            return GEMMA3_BLOCK
        return self.layout.block

    def head_logits(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().head_logits(model, hidden)
        cap = getattr(model.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits
