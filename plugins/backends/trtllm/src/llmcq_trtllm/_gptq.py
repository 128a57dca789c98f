"""What GPTQ's settings mean for the checkpoint (torch-free)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llmcq.config.schema import RunConfig


def gptq_writes_g_idx(config: RunConfig) -> bool:
    """GPTQ with act-order and dynamic groups quantizes columns out of group order (g_idx)."""
    sp = None if config.quant is None else config.quant.special_of("gptq")
    if sp is None or config.quant is None or config.quant.weight is None:
        return False
    return (config.quant.weight.granularity == "per_group" and bool(sp.get("actorder", True))
            and not sp.get("static_groups", False))
