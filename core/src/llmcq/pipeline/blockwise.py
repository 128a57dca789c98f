"""Block-wise execution: capture the first block's inputs, then run one block at a time.

Only the block being processed sits on the compute device; the rest of the model stays in
host memory, so device memory is one block plus the calibration activations whatever the
depth. Activations are replaced batch by batch as they flow through a block, so there is
one copy of them at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from llmcq.errors import DataError
from llmcq.model.adapter import LinearRole, ModelAdapter, ResolvedGroup

__all__ = ["Block", "BlockInputs", "capture_block_inputs", "on_device", "block_output"]


@dataclass
class Block:
    """One decoder block being processed: its index, dotted name, module and linear groups.

    ``masks``: keep-masks of the linears pruned by earlier sparse steps of the recipe
    (relative name -> bool ``[out, in]``, on the block's device); a quantizer that declares
    ``uses_masks`` keeps those weights at zero while it optimizes.

    ``float_params``: the block's parameters (name -> tensor) as they were before the first
    quant step of the recipe changed the block, kept by the engine when a step's algorithm
    sets ``float_targets`` (reconstruction targets are then the float model's,
    whatever an earlier step did in place, e.g. AWQ's clipping); None otherwise.
    """

    index: int
    name: str
    module: nn.Module
    groups: list[ResolvedGroup]
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    float_params: dict[str, torch.Tensor] | None = None

    def linears(self) -> dict[str, nn.Linear]:
        """Every quantizable linear of the block (relative name -> module), in group order."""
        out: dict[str, nn.Linear] = {}
        for g in self.groups:
            out.update(g.linears)
        return out

    def full_name(self, relative: str) -> str:
        return f"{self.name}.{relative}"

    def role(self, name: str) -> LinearRole | None:
        """The declared role of the linear ``name`` (relative), None when undeclared."""
        for g in self.groups:
            if name in g.roles:
                return g.roles[name]
        return None

    def by_role(self, *kinds: str) -> dict[str, nn.Linear]:
        """The block's linears whose role is one of ``kinds`` (e.g. ``"q", "k"``)."""
        out: dict[str, nn.Linear] = {}
        for g in self.groups:
            for name, lin in g.linears.items():
                r = g.roles.get(name)
                if r is not None and r.kind in kinds:
                    out[name] = lin
        return out


def block_output(out: Any) -> torch.Tensor:
    """The hidden states a decoder block returns (a tensor, or the first item of a tuple)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def _move(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_move(o, device) for o in obj)
    if isinstance(obj, list):
        return [_move(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _move(v, device) for k, v in obj.items()}
    return obj


class BlockInputs:
    """Calibration inputs of the current block: hidden states and keyword inputs per batch.

    Keyword inputs are what the model passes its blocks (attention mask, rotary position
    embeddings, position ids); a sub-module run with ``inspect_kwargs`` receives them too.
    """

    def __init__(self, hidden: list[torch.Tensor], kwargs: list[dict[str, Any]]) -> None:
        if len(hidden) != len(kwargs):
            raise ValueError("one kwargs dict per batch is required")
        self.hidden = hidden
        self.kwargs = kwargs

    def __len__(self) -> int:
        return len(self.hidden)

    @property
    def n_tokens(self) -> int:
        return sum(int(h.shape[0] * h.shape[1]) for h in self.hidden)

    @property
    def n_samples(self) -> int:
        return sum(int(h.shape[0]) for h in self.hidden)

    def batches(self) -> Iterator[tuple[torch.Tensor, dict[str, Any]]]:
        yield from zip(self.hidden, self.kwargs)

    @torch.no_grad()
    def forward(self, module: nn.Module) -> list[torch.Tensor]:
        """Outputs of ``module`` (a whole block) on every batch."""
        return [block_output(module(h, **kw)) for h, kw in self.batches()]

    def replace(self, hidden: list[torch.Tensor]) -> None:
        """Use ``hidden`` (one tensor per batch, e.g. outputs kept from earlier) as the
        inputs from now on."""
        if len(hidden) != len(self.hidden):
            raise ValueError("one tensor per batch is required")
        self.hidden = list(hidden)

    @torch.no_grad()
    def advance(self, module: nn.Module, *, check: str = "") -> None:
        """Replace the inputs by ``module``'s outputs, batch by batch (one copy in memory)."""
        for i, (h, kw) in enumerate(self.batches()):
            out = block_output(module(h, **kw))
            if check and not torch.isfinite(out).all():
                raise DataError(f"non-finite activations (NaN/Inf) at the output of {check}, "
                                f"calibration batch {i}")
            self.hidden[i] = out

    @torch.no_grad()
    def observe(self, module: nn.Module, targets: dict[str, nn.Module],
                fn: Callable[[str, torch.Tensor, torch.Tensor], None], *,
                stop_early: bool = False) -> None:
        """Run ``module`` on every batch; call ``fn(name, input, output)`` for each target.

        This is how statistics are accumulated (Hessians, absmax, ranges) without storing
        activations: ``fn`` folds each batch into a running state. ``stop_early``: end each
        batch's forward pass as soon as every target has run once (the rest of the block is
        not computed; only for callers that need nothing but the targets' inputs/outputs,
        and targets that run once per forward).
        """
        pending: set[str] = set()
        handles = []
        for name, target in targets.items():
            def hook(_m: nn.Module, args: tuple[Any, ...], out: Any, _name: str = name) -> None:
                fn(_name, args[0], block_output(out))
                if stop_early:
                    pending.discard(_name)
                    if not pending:
                        raise _Stop
            handles.append(target.register_forward_hook(hook))
        try:
            for h, kw in self.batches():
                pending.clear()
                pending.update(targets)
                try:
                    module(h, **kw)
                except _Stop:
                    pass
        finally:
            for handle in handles:
                handle.remove()

    @torch.no_grad()
    def collect(self, module: nn.Module, targets: dict[str, nn.Module], *,
                stop_early: bool = False) -> dict[str, list[torch.Tensor]]:
        """Inputs of each target, one tensor per batch (for algorithms that replay them,
        such as AWQ's scale search). Costs one activation copy per target: prefer
        :meth:`observe` when a running statistic is enough."""
        got: dict[str, list[torch.Tensor]] = {name: [] for name in targets}
        self.observe(module, targets, lambda name, x, _y: got[name].append(x.detach()),
                     stop_early=stop_early)
        return got


class _Stop(Exception):
    pass


@contextmanager
def on_device(modules: Sequence[nn.Module], device: torch.device) -> Iterator[None]:
    """Move ``modules`` to ``device`` for the duration, then back to where they were."""
    homes = []
    for m in modules:
        p = next(iter(m.parameters()), None)
        if p is None:
            p = next(iter(m.buffers()), None)
        homes.append(p.device if p is not None else torch.device("cpu"))
        m.to(device)
    try:
        yield
    finally:
        for m, home in zip(modules, homes):
            m.to(home)


@torch.no_grad()
def capture_block_inputs(model: nn.Module, adapter: ModelAdapter,
                         batches: Sequence[torch.Tensor], device: torch.device) -> BlockInputs:
    """Inputs of the first block for each batch of token ids, computed on ``device``.

    A forward pre-hook on block 0 records its arguments and stops the forward pass, so only
    the embedding (and rotary/position modules) run; blocks never leave host memory here.
    """
    adapter.ensure_prepared(model)  # layouts that depend on the model (auto, OPT-350m)
    layout = adapter.layout
    blocks = adapter.blocks(model)
    names = list(layout.embeddings) + ([layout.rotary] if layout.rotary else []) \
        + list(layout.pre_block)
    pre = [model.get_submodule(n) for n in names]
    hidden: list[torch.Tensor] = []
    kwargs: list[dict[str, Any]] = []

    def grab(_m: nn.Module, args: tuple[Any, ...], kw: dict[str, Any]) -> None:
        kw = dict(kw)
        h = args[0] if args else kw.pop("hidden_states")
        kw.pop("past_key_values", None)
        kw.pop("past_key_value", None)
        kw["use_cache"] = False
        hidden.append(h.detach())
        kwargs.append({k: _detach(v) for k, v in kw.items()})
        raise _Stop

    handle = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with on_device(pre, device):
            for i, ids in enumerate(batches):
                try:
                    model(input_ids=ids.to(device), use_cache=False)
                except _Stop:
                    pass
                else:  # pragma: no cover - the hook always fires
                    raise RuntimeError("block 0 was never called; check the adapter's layout")
                if not torch.isfinite(hidden[-1]).all():
                    raise DataError(f"non-finite embeddings (NaN/Inf) for calibration batch {i}")
    finally:
        handle.remove()
    return BlockInputs(hidden, kwargs)


def _detach(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.detach()
    if isinstance(v, tuple):
        return tuple(_detach(x) for x in v)
    return v
