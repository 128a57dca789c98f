"""Evaluators (entry-point group ``llmcq.evaluators``); core ships perplexity and llmc's
decode perplexity (token-by-token decoding through the KV cache).

The specs live here, torch-free; the implementations in :mod:`llmcq.eval.ppl` and
:mod:`llmcq.eval.decode`.
"""

from llmcq.api import EvaluatorSpec

__all__ = ["PPL", "DECODE_PPL"]

PPL = EvaluatorSpec(name="ppl", summary="perplexity, GPTQ protocol (non-overlapping windows)",
                    aliases=("perplexity",), impl="llmcq.eval.ppl:evaluate")

DECODE_PPL = EvaluatorSpec(name="decode_ppl",
                           summary="perplexity of token-by-token decoding through the KV cache "
                                   "(llmc's decode_ppl; num_samples windows)",
                           impl="llmcq.eval.decode:evaluate")
