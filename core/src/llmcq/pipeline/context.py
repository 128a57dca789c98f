"""What a run carries: the resolved config, the model, the recipe steps and the records."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from llmcq.artefacts import ArtefactStore
from llmcq.pipeline.blockwise import Block, BlockInputs

if TYPE_CHECKING:
    import pluggy
    import torch

    from llmcq.algorithm import Algorithm
    from llmcq.api import AlgorithmSpec
    from llmcq.config.loader import ResolvedConfig
    from llmcq.config.schema import RunConfig, SpecialConfig
    from llmcq.model.adapter import ModelAdapter
    from llmcq.plugins.registry import EntryPointInfo
    from llmcq.quant.record import QuantizedLinear
    from llmcq.quant.spec import ActQuantSpec, WeightQuantSpec
    from llmcq.specs import RunSpecs

__all__ = ["Step", "RunContext", "Block", "BlockInputs"]


@dataclass
class Step:
    """One recipe step: an algorithm named in ``quant.method``/``sparse.method``."""

    index: int
    name: str
    spec: AlgorithmSpec
    info: EntryPointInfo
    special: SpecialConfig
    algorithm: Algorithm | None = None

    @property
    def label(self) -> str:
        return f"{self.spec.name} ({self.info.label})"


@dataclass
class RunContext:
    """Everything a stage needs. Passed to every hook as ``run``."""

    resolved: ResolvedConfig
    device: torch.device
    pm: pluggy.PluginManager
    model: Any = None
    tokenizer: Any = None
    adapter: ModelAdapter | None = None
    steps: list[Step] = field(default_factory=list)
    #: the step whose ``quantize`` makes the records (None: core's round-to-nearest)
    quantizer: Step | None = None
    #: the run's typed specs (``resolved.specs``); ``weight``/``act`` are its two grids
    weight: WeightQuantSpec | None = None
    act: ActQuantSpec | None = None
    #: records by full module name, filled block by block (kept on the CPU)
    records: dict[str, QuantizedLinear] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    #: show progress bars
    progress: bool = True
    #: memo for values computed once per run (tokenized evaluation text, ...)
    cache: dict[Any, Any] = field(default_factory=dict)
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("llmcq"))
    #: (zeros, weights) of every pruned linear, by full name (``compression.sparsity``)
    pruned: dict[str, tuple[int, int]] = field(default_factory=dict)
    #: old indices of the blocks a step removed before the block loop (ShortGPT)
    removed_blocks: list[int] = field(default_factory=list)
    #: typed hand-off between recipe steps (AWQ's scales and clips, ...)
    artefacts: ArtefactStore = field(default_factory=lambda: ArtefactStore())
    _scratch: dict[int, dict[str, Any]] = field(default_factory=dict)
    _specs: RunSpecs | None = None

    def __post_init__(self) -> None:
        specs = self.resolved.specs
        if self.weight is None:
            self.weight = specs.weight
        if self.act is None:
            self.act = specs.act

    @property
    def config(self) -> RunConfig:
        return self.resolved.config

    @property
    def specs(self) -> RunSpecs:
        """The typed specs of the run (resolved once at config time; once the model is
        loaded, with per-linear settings bound to its linears: ``specs.weight_for(name)``)."""
        return self._specs if self._specs is not None else self.resolved.specs

    @specs.setter
    def specs(self, value: RunSpecs) -> None:
        self._specs = value

    def token_source(self, dataset: Any) -> Any:
        """What a dataset spec tokenizes with: the tokenizer, or for synthetic token ids
        (``needs_tokenizer = False``) the vocabulary bound as an ``int``: the smaller of the
        tokenizer's vocabulary and the model's input-embedding rows."""
        from llmcq.errors import DataError

        if getattr(dataset, "needs_tokenizer", True):
            if self.tokenizer is None:
                raise DataError(f"dataset {dataset.name} needs a tokenizer and the checkpoint "
                                "has none")
            return self.tokenizer
        rows = int(self.model.get_input_embeddings().num_embeddings)
        return rows if self.tokenizer is None else min(rows, len(self.tokenizer))

    def scratch(self, block_index: int) -> dict[str, Any]:
        """A per-block dict for statistics shared between stages and plugins."""
        return self._scratch.setdefault(block_index, {})

    def drop_scratch(self, block_index: int) -> None:
        self._scratch.pop(block_index, None)
