"""The base class of algorithm drivers (what an ``AlgorithmSpec.impl`` names).

Override only the stages the algorithm needs; the others do nothing:

* :meth:`Algorithm.transform_model` - once, before the block loop (rotations, norm fusion);
* :meth:`Algorithm.calibrate` - per block: observe the block on its inputs (accumulate
  statistics, e.g. a Hessian), weights untouched;
* :meth:`Algorithm.transform` - per block: function-preserving changes to the float weights
  (scaling, smoothing, rotation, clipping) or pruning;
* :meth:`Algorithm.prune` - per block, sparse steps: return a keep-mask per linear; core
  zeroes the pruned weights and hands the masks to later steps (``block.masks``);
* :meth:`Algorithm.quantize` - per block: return one :class:`QuantizedLinear` per linear;
* :meth:`Algorithm.observe_block` and :meth:`Algorithm.remove_blocks` - layer pruning
  (ShortGPT): before anything else, every block of the unpruned model runs once on the
  calibration data and ``observe_block`` sees its inputs and outputs; then
  ``remove_blocks`` names the blocks to delete and core deletes them (config and layer
  indices renumbered) before the model-wide transforms and the block loop.

Per block, core calls each recipe step's ``calibrate`` then ``transform`` (then ``prune``
for sparse steps) in recipe order, sparse steps first, then ``quantize`` of the last quant
step that implements it. So in ``[awq, gptq]`` GPTQ's ``calibrate`` sees the block already
scaled by AWQ.

Lifetime: core builds one instance per recipe step per run, after the model is loaded and
before the first block (so ``__init__`` may refuse settings that need the model); the same
instance sees every block in order and :meth:`summary` is read once at the end. Keep per-block
state keyed by ``block.index`` and drop it when the block is done.

Per-linear grids (``quant.mix_bits``, ``ignored_layers``): ``self.weight``/``self.act`` are
the global ones; each linear's own are :meth:`Algorithm.weight_of` / :meth:`Algorithm.act_of`
(None: kept in float, or its input unquantized), and :meth:`Algorithm.quantized_linears`
lists the linears to quantize. An algorithm that uses them everywhere (records, search
losses, learned parameters) declares ``AlgorithmSpec.per_layer_specs = True``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

    from llmcq.config.schema import SpecialConfig
    from llmcq.pipeline.blockwise import Block, BlockInputs
    from llmcq.pipeline.context import RunContext, Step
    from llmcq.quant.record import QuantizedLinear
    from llmcq.quant.spec import ActQuantSpec, WeightQuantSpec

__all__ = ["Algorithm", "STAGES"]

STAGES = ("transform_model", "calibrate", "transform", "prune", "quantize",
          "observe_block", "remove_blocks")


class Algorithm:
    """A recipe step's driver.

    ``self.weight`` / ``self.act`` / ``self.sparsity``: the run's typed specs
    (:class:`~llmcq.quant.spec.WeightQuantSpec`, :class:`~llmcq.quant.spec.ActQuantSpec`,
    :class:`~llmcq.sparsity.SparsitySpec`, ``None`` when absent), the same objects the
    config-time checks saw; ``self.special``: the step's validated special config;
    ``self.run``: the :class:`~llmcq.pipeline.context.RunContext`.
    """

    #: True: the algorithm trains against the float block's outputs
    #: (:class:`llmcq.recon.FloatChain`); the engine then keeps each block's parameters from
    #: before the recipe's first quant step changes it in ``block.float_params``, so an
    #: earlier step's in-place change that is not function-preserving (AWQ's clipping) does
    #: not become part of the targets
    float_targets: bool = False

    def __init__(self, *, run: RunContext, step: Step) -> None:
        self.run = run
        self.step = step
        self.special: SpecialConfig = step.special
        self.weight = run.weight
        self.act = run.act
        # a stand-in run (unit tests, scripts) may carry only weight/act
        specs = getattr(run, "specs", None)
        if specs is None:
            from llmcq.specs import RunSpecs

            specs = RunSpecs(weight=self.weight, act=self.act)
        self.specs = specs
        self.sparsity = specs.sparsity

    # ------------------------------------------------------------------ per linear

    def weight_of(self, block: Block, name: str) -> WeightQuantSpec | None:
        """The weight grid of the block's linear ``name`` (relative to the block): its
        ``quant.mix_bits`` setting's, else ``quant.weight``; None when kept in float."""
        if not hasattr(self.specs, "weight_for"):  # a stand-in run: the global grids only
            return self.weight
        return self.specs.weight_for(block.full_name(name))

    def act_of(self, block: Block, name: str) -> ActQuantSpec | None:
        """The activation quantization of that linear's input (None: left in float)."""
        if not hasattr(self.specs, "act_for"):
            return self.act
        return self.specs.act_for(block.full_name(name))

    def weights_of(self, block: Block) -> dict[str, WeightQuantSpec | None]:
        """Every linear of the block with its weight grid (None: kept in float), in
        ``block.linears()`` order; ``rtn_records`` takes it as its ``spec``."""
        return {n: self.weight_of(block, n) for n in block.linears()}

    def acts_of(self, block: Block) -> dict[str, ActQuantSpec | None]:
        """Every linear of the block with its activation quantization (None: float input);
        ``llmcq.recon.ActQuant`` takes it as its ``spec``."""
        return {n: self.act_of(block, n) for n in block.linears()}

    def quantized_linears(self, block: Block) -> dict[str, nn.Linear]:
        """The block's linears that get a record (those not kept in float)."""
        return {n: lin for n, lin in block.linears().items()
                if self.weight_of(block, n) is not None}

    @classmethod
    def implements(cls, stage: str) -> bool:
        """Whether this class overrides ``stage`` (one of :data:`STAGES`)."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
        return getattr(cls, stage) is not getattr(Algorithm, stage)

    def transform_model(self, model: nn.Module) -> None:
        """Model-wide transform before the block loop."""

    def calibrate(self, block: Block, inputs: BlockInputs | None) -> None:
        """Observe ``block`` on ``inputs``; must not change weights."""

    def transform(self, block: Block, inputs: BlockInputs | None) -> None:
        """Change the block's float weights in place (function-preserving or pruning)."""

    def prune(self, block: Block, inputs: BlockInputs | None) -> dict[str, torch.Tensor] | None:
        """Sparse steps: ``{relative linear name: bool mask}`` (``True`` = kept), shaped like
        the weight and honouring ``self.sparsity``; core checks the structure, zeroes the
        pruned weights and combines the masks of several sparse steps."""
        return None

    def quantize(self, block: Block, inputs: BlockInputs | None
                 ) -> dict[str, QuantizedLinear] | None:
        """Records for the block's linears, keyed by name relative to the block."""
        return None

    def observe_block(self, block: Block, inputs: BlockInputs,
                      outputs: list[torch.Tensor]) -> None:
        """Layer pruning, before the block loop: block ``block.index`` of the unpruned model
        on the calibration data (``inputs``: its inputs per batch, the dense chain;
        ``outputs``: its outputs per batch). Accumulate running statistics; with
        data-parallel calibration this rank's share only (reduce in :meth:`remove_blocks`).
        Called only for algorithms that implement :meth:`remove_blocks`."""

    def remove_blocks(self) -> list[int]:
        """Layer pruning: the indices of the blocks to delete (of the unpruned model), once,
        after every block was observed; core deletes them and renumbers the rest."""
        return []

    def summary(self) -> dict[str, Any]:
        """Extra facts for results.json (e.g. how often damping was raised)."""
        return {}
