"""Where things are in ``Gemma2ForCausalLM`` / ``Gemma3ForCausalLM``.

Gemma's RMSNorm multiplies by ``1 + weight``, so dividing ``weight`` by a scale (what the
shared scaling code does to a norm) would not divide the output. :meth:`GemmaAdapter.prepare`
swaps each block norm for :class:`OffsetRMSNorm`, which holds the effective multiplier
``1 + weight`` as its ``weight`` (computing the same function) and writes ``weight - 1``
back under the original key when saved, so exports reload with transformers' Gemma classes.

A block: ``input_layernorm -> q,k,v``; ``v_proj -> o_proj``; ``post_attention_layernorm``
normalizes the attention *output* (a sandwich norm) and ``pre_feedforward_layernorm`` feeds
``gate,up``; ``up_proj -> down_proj``. Logits are soft-capped
(``cap * tanh(logits / cap)``) when ``final_logit_softcapping`` is set.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from llmcq.model.adapter import ModelAdapter
from llmcq.model.layout import llama_like_layout, prenorm_block

__all__ = ["GemmaAdapter", "GEMMA_LAYOUT", "OffsetRMSNorm"]

GEMMA_LAYOUT = llama_like_layout(prenorm_block(mlp_norm="pre_feedforward_layernorm"))

#: norms that feed linears (the ones scaling may touch)
_FEEDING = ("input_layernorm", "pre_feedforward_layernorm")


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

    def head_logits(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().head_logits(model, hidden)
        cap = getattr(model.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits
