"""ShortGPT layer pruning (llmc's ``ShortGPT``): remove the ``n_prune_layers`` decoder blocks
of lowest Block Influence (Men et al. 2024).

``sparse.method: ShortGPT`` with ``sparse.weight.n_prune_layers: N``; needs calibration data.
Torch-free module (``llmcq validate``); the implementation is :mod:`llmcq_shortgpt.algorithm`.
"""

from __future__ import annotations

from llmcq.api import AlgorithmSpec, StepSettings
from llmcq.errors import ConfigError

__all__ = ["SPEC", "ShortGPTSpec"]

KEY = "sparse.weight.n_prune_layers"


class ShortGPTSpec(AlgorithmSpec):
    def check(self, step: StepSettings) -> None:
        super().check(step)
        sparse = step.config.sparse
        n = sparse.weight.n_prune_layers if sparse is not None and sparse.weight else None
        if n is None:
            raise ConfigError(KEY, None, show_value=False, allowed="an integer >= 1",
                              reason="ShortGPT removes this many whole blocks; set it")
        quant = step.config.quant
        if quant is not None and getattr(quant, "bit_budget", None) is not None:
            raise ConfigError("quant.bit_budget", "present", show_value=False,
                              reason="the bit-budget search plans bits for the linears of "
                              f"the unpruned model, before ShortGPT removes blocks ({KEY}); "
                              "prune in one run (save_trans), then run the budget on the "
                              "smaller model")


SPEC = ShortGPTSpec(
    name="shortgpt",
    summary="ShortGPT layer pruning: remove the n_prune_layers blocks of lowest Block "
            "Influence (1 - cos(block input, block output)) on calibration data; the result "
            "is a smaller dense model",
    impl="llmcq_shortgpt.algorithm:ShortGPT",
    kind="sparse",
    aliases=("ShortGPT",),
    needs_calibration=True,
    sparse_keys=("n_prune_layers",),
    # removes whole blocks and touches no grid: any quantizer after it may quantize
    # activations or use FP8
    supports_act=True,
    weight_formats=("int", "float"),
)
