"""``eval.type: kl``: per-token KL(float ‖ compressed) and top-1 agreement against the float
model's next-token distributions on the same windows (llama.cpp's ``--kl-divergence``).

Torch-free: the spec and its config-time checks. The maths is in :mod:`llmcq_kl.solver`,
the run plumbing (the float reference cached on disk at ``pretrain``) in
:mod:`llmcq_kl.evaluate`.
"""

from __future__ import annotations

from typing import Any

from llmcq.api import EvaluatorSpec
from llmcq.errors import ConfigError

__all__ = ["SPEC", "KLSpec"]


class KLSpec(EvaluatorSpec):
    def check(self, section: Any, prefix: str) -> None:
        if "pretrain" not in section.eval_pos:
            raise ConfigError(f"{prefix}.eval_pos", list(section.eval_pos),
                              reason="type kl compares against the float model, whose "
                              "next-token log-probs are cached when it is evaluated at "
                              "pretrain", allowed="a list that includes pretrain")
        if section.num_samples is None:
            raise ConfigError(f"{prefix}.num_samples", None, reason="type kl caches the float "
                              "model's log-probs on disk (windows x seq_len x vocab x 2 bytes): "
                              "give the number of windows", allowed="a positive integer")
        if section.inference_per_block:
            raise ConfigError(f"{prefix}.inference_per_block", True, reason="type kl runs the "
                              "whole model", allowed="False")
        if section.kv_chunk is not None:
            raise ConfigError(f"{prefix}.kv_chunk", section.kv_chunk, reason="type kl does not "
                              "feed windows through a KV cache", allowed="absent (None)")


SPEC = KLSpec(name="kl",
              summary="per-token KL(float || quantized) mean/median/p99 and top-1 agreement "
                      "against the float model (cached at pretrain)",
              aliases=("kl_divergence",), impl="llmcq_kl.evaluate:evaluate")
