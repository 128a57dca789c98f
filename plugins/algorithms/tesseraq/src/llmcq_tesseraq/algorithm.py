"""TesseraQ's driver: per block, fix each linear's grid, learn its rounding (progressive
adaptive rounding, PAR) and its dequantization scales so the quantized block reproduces the
float block's outputs, then hand the learned integer codes to the records.

Per block:

1. ``calibrate``: with ``load_transform``, fold the saved AWQ scales
   (``<scale_path>/scales.pth``) into the block through the layout's scaling pairs
   (:func:`llmcq.artefacts.fold_saved_scales`, the fold AWQ's ``load_scale`` uses) and
   publish what was folded. The weights are untouched otherwise.
2. ``transform``: the float targets first (:class:`llmcq.recon.FloatChain`; the float chain
   beside the quantized inputs under ``quant_out``), then with ``weight_clip`` the clip
   ranges: v1 searched on the fly (:func:`llmcq.quant.clip.search_clip` on about 512 tokens
   of each group's input gathered from every rank, :class:`llmcq.stats.TokenSample`), v2
   those an earlier step of the recipe published for the block or ``<clip_path>/clips.pth``;
   queries and keys (declared roles ``q``, ``k``, ``qkv``) keep min-max, as in llmc. Each
   linear's grid is fixed: min-max per group of the weight clamped to its range (v1 also
   clamps the float weights in place, as llmc's v1 does; v2 leaves them alone, as llmc's
   learnable clip factors do: the codes are the same either way). Then PAR on core's harness
   (:func:`llmcq.recon.reconstruct`, once per stage with a fresh Adam): before each stage
   the most decided rounding variables are hardened (:func:`solver.harden`), then
   ``iterations`` steps on ``batch_size`` samples drawn at random train the soft ones (and
   the scale factors) on llmc's L2 loss of the block output, with ``quant.act`` each
   linear's input fake-quantized per token (straight-through with ``quant.act.ste``).
   After the last stage every variable is hardened (:func:`solver.final_rounding`).
3. ``quantize``: records holding exactly those codes and tuned scales, so the fake-quantized
   model the run evaluates and every export are the weights the training ended with.

Data-parallel calibration (``torchrun``): the harness averages every step's gradients over
the ranks and every rank draws the same sample positions (the same seed) within its own
share, so every rank holds the same rounding variables after each step; the hardening reads
only those, and the clip search runs on the gathered token sample: every rank makes the
same decisions and writes the same records. A step averages ``W * batch_size`` samples
(``batch_size`` from each rank's share): statistically the schedule of one process with
``batch_size`` ``W * b``, not bit for bit (one process draws other samples).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from llmcq import dist, recon
from llmcq.algorithm import Algorithm
from llmcq.artefacts import artefact_path, fold_saved_scales, load_artefact
from llmcq.errors import ConfigError, DataError, PluginError
from llmcq.pipeline.blockwise import Block, BlockInputs, block_output
from llmcq.quant.clip import apply_clip, search_clip
from llmcq.quant.qparams import QParams, n_groups
from llmcq.quant.record import QuantizedLinear, make_record
from llmcq.quant.spec import PerGroup, WeightQuantSpec
from llmcq.stats import TokenSample
from llmcq_tesseraq import TesseraQSpecial, solver
from llmcq_tesseraq.flat import FlatRounding

__all__ = ["TesseraQ", "LinearRounding", "QK_ROLES", "CLIP_TOKENS", "is_query_or_key"]

log = logging.getLogger("llmcq.tesseraq")
_KEY = "tesseraq"
#: roles whose clipping llmc leaves to min-max (their error passes through the softmax,
#: which a per-linear output error does not see)
QK_ROLES = ("q", "k", "qkv")
#: tokens of each group's input the v1 clip search scores (llmc's TesseraQ: 512)
CLIP_TOKENS = 512


@dataclass
class LinearRounding:
    """One linear's fixed grid and its learnable rounding.

    ``base``: ``floor(W / s)`` ``[out, in]``; ``r``: the rounding variables ``[out, in]``;
    ``state``: :data:`solver.SOFT` where ``r`` is still trained, else the hard offset 0/1
    (int8); ``scale``/``zero``: the min-max grid ``[out, G]``; ``nu``: the scale factors'
    variables ``[out, G]`` (None without ``optimize_scale``)."""

    base: torch.Tensor
    r: torch.Tensor
    state: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    nu: torch.Tensor | None
    #: what does not change between hardenings, spread over the columns once (the training
    #: forward runs every step): for the ``state`` object it was computed for
    _fixed: dict[str, Any] = field(default_factory=dict, repr=False)

    def _pieces(self, spec: WeightQuantSpec) -> dict[str, Any]:
        if self._fixed.get("state") is not self.state:
            cols = self.base.shape[1]
            zero = None if self.zero is None else solver.per_column(self.zero, spec, cols)
            self._fixed = {
                "state": self.state, "zero": zero,
                "offset": self.base if zero is None else self.base + zero,
                "soft": self.state == solver.SOFT, "hard": self.state.float(),
                "scale": solver.per_column(self.scale, spec, cols) if self.nu is None
                else None,
            }
        return self._fixed

    def weight(self, spec: WeightQuantSpec) -> torch.Tensor:
        """The fake-quantized weight with the current (soft and hard) rounding: the values
        of :func:`solver.fake_quant`, with the fixed parts computed once per state."""
        p = self._pieces(spec)
        h = torch.where(p["soft"], solver.rectified_sigmoid(self.r), p["hard"])
        lo, hi = solver.bounds(spec)
        q = torch.clamp(p["offset"] + h, lo, hi)
        scale = p["scale"] if self.nu is None else solver.per_column(
            solver.effective_scale(self.scale, self.nu), spec, self.base.shape[1])
        return solver.dequantize(q, p["zero"], scale)


def _nearest(t: LinearRounding) -> LinearRounding:
    """``t`` with every variable hard at its initial decision (round to nearest) and the
    scales untuned: the start the training improves on."""
    h = solver.final_rounding(t.r, torch.full_like(t.state, solver.SOFT))
    return LinearRounding(t.base, t.r, h.to(torch.int8), t.scale, t.zero,
                          None if t.nu is None else torch.zeros_like(t.nu))


def is_query_or_key(block: Block, name: str) -> bool:
    """Whether ``name`` is a query or key projection by its declared role."""
    role = block.role(name)
    if role is None:
        raise PluginError(f"{name} has no declared role; TesseraQ's clipping leaves queries "
                          "and keys at min-max and finds them by role (the model adapter must "
                          "declare roles), or set weight_clip: False", where=block.name)
    return role.kind in QK_ROLES


def init_linear(w: torch.Tensor, spec: WeightQuantSpec, *, optimize_scale: bool
                ) -> LinearRounding:
    """A linear's grid from its (clipped) weight, the rounding variables at the fractional
    parts and the scale factors at 1."""
    scale, zero = solver.grid_qparams(w, spec)
    base, r0 = solver.init_rounding(w, scale, spec)
    state = torch.full(base.shape, solver.SOFT, dtype=torch.int8, device=base.device)
    nu = nn.Parameter(torch.zeros_like(scale)) if optimize_scale else None
    return LinearRounding(base, nn.Parameter(r0), state, scale, zero, nu)


class TesseraQ(Algorithm):
    """TesseraQ (Li & Panda, 2024, arXiv:2410.19103), llmc's ``TesseraQ``.

    ```yaml
    quant:
        method: TesseraQ
        weight: {bit: 2, symmetric: False, granularity: per_group, group_size: 64,
                 calib_algo: minmax}
        special: {lr: 0.001, iterations: 250, batch_size: 4, optimize_scale: True,
                  scale_lr: 0.001, thresholds: upstream, weight_clip: True,
                  clip_version: v1}
        quant_out: True
    ```
    """

    #: targets are the float block's, also after an earlier step clipped in place
    float_targets = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        sp = self.special
        assert isinstance(sp, TesseraQSpecial)
        self.sp: TesseraQSpecial = sp
        quant = self.run.config.quant
        assert quant is not None and quant.weight is not None
        self._quant_out = bool(quant.quant_out)
        self._aste = quant.act is not None and bool(quant.act.ste)
        self._schedule = sp.schedule
        base = getattr(self.run.config, "base", None)
        self._seed = int(getattr(base, "seed", 0) or 0)
        self._chain = recon.FloatChain()
        self._heads: tuple[int, int] | None = None
        self._losses: list[tuple[float, float]] = []
        self._changed: list[float] = []
        self._nonfinite: list[int] = []
        self._amp = False
        #: the current block's grid per quantized linear (per-linear settings)
        self._grids: dict[str, WeightQuantSpec] = {}
        # llmc's two-step flow: files written by awq in an earlier run (read before any
        # block, so a missing or unreadable file stops the run at once)
        self._saved_scales = load_artefact("scales", sp.scale_path or ".") \
            if sp.load_transform else None
        self._saved_clips = load_artefact("clips", sp.clip_path) \
            if sp.weight_clip and sp.clip_version == "v2" and sp.clip_path else None

    # ------------------------------------------------------------------ stages

    def calibrate(self, block: Block, inputs: BlockInputs | None) -> None:
        if inputs is None:
            raise DataError("TesseraQ needs calibration inputs (add a calib section)")
        if self._saved_scales is not None:
            source = str(artefact_path("scales", self.sp.scale_path or "."))
            applied = fold_saved_scales(block, self._saved_scales, heads=self._heads_of(),
                                        source=source)
            self.run.artefacts.publish("scales", {block.full_name(n): s.float()
                                                  for n, s in applied.items()},
                                       producer=f"{_KEY}:load_transform")

    def transform(self, block: Block, inputs: BlockInputs | None) -> None:
        if inputs is None:
            raise DataError("TesseraQ needs calibration inputs (add a calib section)")
        # the float targets before anything here changes the block (the clipping does)
        targets = self._chain.targets(block, inputs, quant_out=self._quant_out,
                                      aug_loss=self.sp.aug_loss)
        # each linear on its own grid; linears kept in float are not trained (no state)
        grids = {n: g for n, g in self.weights_of(block).items() if g is not None}
        self._grids = grids
        weights = {name: lin.weight.data for name, lin in self.quantized_linears(block).items()}
        if self.sp.weight_clip:
            with torch.no_grad():
                for name, (lo, hi) in self._clips(block, inputs).items():
                    w = weights[name]
                    weights[name] = apply_clip(w, lo.to(w.device), hi.to(w.device),
                                               grids[name])
                    if self.sp.clip_version == "v1":  # llmc's v1 clamps the weights in place
                        w.copy_(weights[name])
        with torch.no_grad():
            state = {name: init_linear(w, grids[name], optimize_scale=self.sp.optimize_scale)
                     for name, w in weights.items()}
        acts = self.acts_of(block)
        act = recon.ActQuant(acts, ste=self._aste) if any(acts.values()) else None
        with torch.no_grad():  # llmc logs the loss before and after: here on every sample
            nearest = {n: _nearest(t) for n, t in state.items()}
            before = self._block_loss(block, inputs, targets, nearest, act)
            del nearest
        with torch.enable_grad():
            self._train(block, inputs, targets, state, act)
        out: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}
        changed = []
        with torch.no_grad():
            for name, t in state.items():
                h = solver.final_rounding(t.r, t.state)
                q = solver.codes(t.base, h, t.zero, grids[name])
                scale = solver.effective_scale(t.scale, t.nu)
                out[name] = (q, scale, t.zero)
                changed.append(solver.change_ratio(t.base, h, weights[name], t.scale,
                                                   grids[name]))
                t.state = h.to(torch.int8)
            after = self._block_loss(block, inputs, targets, state, act)
        del targets, weights
        self._losses.append((before, after))
        log.info("%s: TesseraQ block loss %.4g (round to nearest) -> %.4g", block.name,
                 before, after)
        self._changed.append(sum(changed) / max(len(changed), 1))
        self.run.scratch(block.index)[_KEY] = out

    def quantize(self, block: Block, inputs: BlockInputs | None) -> dict[str, QuantizedLinear]:
        learned = self.run.scratch(block.index).pop(_KEY, None)
        if learned is None:
            raise PluginError("TesseraQ's transform did not run for this block",
                              where=block.name)
        records = {}
        for name, lin in self.quantized_linears(block).items():
            q, scale, zero = learned[name]
            records[name] = make_record(q, QParams(scale, zero), self.weight_of(block, name),
                                        bias=lin.bias)
        return records

    def summary(self) -> dict[str, Any]:
        return {
            "thresholds": list(self._schedule), "iterations": self.sp.iterations,
            "optimize_scale": self.sp.optimize_scale,
            "weight_clip": self.sp.clip_version if self.sp.weight_clip else False,
            "train_dtype": "bfloat16 autocast" if self._amp else "float32",
            # the block's loss on the calibration samples with the weights rounded to
            # nearest on the (clipped) grid, and with the learned rounding and scales
            "block_loss": [[float(f"{a:.4g}"), float(f"{b:.4g}")] for a, b in self._losses],
            # share of weights rounded otherwise than to nearest on the same grid, per block
            "change_ratio": [round(c, 4) for c in self._changed],
            "nonfinite_loss_blocks": self._nonfinite,
        }

    # ------------------------------------------------------------------ pieces

    def _train(self, block: Block, inputs: BlockInputs, targets: recon.Targets,
               state: dict[str, LinearRounding], act: recon.ActQuant | None) -> None:
        """PAR: one :func:`llmcq.recon.reconstruct` call (a fresh Adam) per stage, the
        hardening before each."""
        # every linear's variables in one flat tensor each (state's become views of them):
        # a step computes all the weights with one set of kernels (flat.py)
        flat = FlatRounding(state, self._grids)

        def params(base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            eff = dict(base)
            eff.update({f"{name}.weight": w for name, w in flat.weights().items()})
            return eff

        groups = [recon.ParamGroup([flat.r], lr=self.sp.lr, weight_decay=self.sp.wd,
                                   name="rounding"),
                  recon.ParamGroup([] if flat.nu is None else [flat.nu],
                                   lr=self.sp.scale_lr or self.sp.lr,
                                   weight_decay=self.sp.scale_wd, name="scale")]
        n = len(self._schedule)
        for k, threshold in enumerate(self._schedule):
            for t in state.values():
                t.state = solver.harden(t.r, t.state, threshold)
            if not self.sp.iterations:
                continue
            result = recon.reconstruct(
                block, inputs, targets, groups,
                settings=recon.ReconSettings(
                    iterations=self.sp.iterations, batch_size=self.sp.batch_size,
                    amp=not self.sp.deactive_amp, optimizer="adam",
                    lr_schedule=self.sp.lr_schedule, seed=self._stage_seed(block, k)),
                params=params, loss=recon.TargetLoss(solver.l2_loss, aug="mean"), act=act,
                progress=self.run.progress and dist.is_main(),
                desc=f"tesseraq {block.name} stage {k + 1}/{n}")
            self._amp = result.amp
            if result.rolled_back:  # keep the variables of the stage's start, then harden
                self._nonfinite.append(block.index)
                log.warning("%s: non-finite TesseraQ loss in stage %d; the remaining stages "
                            "are not trained", block.name, k + 1)
                break

    @torch.no_grad()
    def _block_loss(self, block: Block, inputs: BlockInputs, targets: recon.Targets,
                    state: dict[str, LinearRounding], act: recon.ActQuant | None) -> float:
        """The training loss (without aug_loss) of the block with ``state``'s weights, the
        mean over every calibration batch of every rank."""
        params = {n: p.detach().float() for n, p in block.module.named_parameters()}
        for name, t in state.items():
            params[f"{name}.weight"] = t.weight(self._grids[name])
        total = torch.zeros((), dtype=torch.float64)
        with recon.act_quant_hooks(act, block.linears()):
            for h, kw, target in zip(inputs.hidden, inputs.kwargs, targets.target,
                                     strict=True):
                out = block_output(functional_call(block.module, params, (h.float(),),
                                                   recon.float_kwargs(kw)))
                total += float(solver.l2_loss(out.float(), target))
        both = torch.tensor([float(total), float(len(inputs))], dtype=torch.float64)
        if dist.active():
            dev = next(block.module.parameters()).device
            both = dist.all_reduce_sum(both.to(dev)).cpu()
        return float(both[0]) / max(float(both[1]), 1.0)

    def _stage_seed(self, block: Block, stage: int) -> int:
        """A different draw of samples per block and stage, the same on every rank."""
        return self._seed * 1_000_003 + block.index * 1009 + stage

    def _clips(self, block: Block, inputs: BlockInputs
               ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Clip ranges ``(lo, hi)`` ``[out, G]`` per linear (relative names), queries and
        keys excluded."""
        names = {gi: [n for n in g.linears if not is_query_or_key(block, n)
                      and self.weight_of(block, n) is not None]
                 for gi, g in enumerate(block.groups)}
        if self.sp.clip_version == "v2":
            given = self._given_clips(block)
            out = {}
            for group_names in names.values():
                for n in group_names:
                    if n not in given:
                        raise DataError(f"no clip range for {block.full_name(n)} among the "
                                        "given ones (clip_version v2): were they written for "
                                        "this model and granularity?")
                    out[n] = self._checked(block, n, given[n])
            return out
        # v1: AWQ's clip search on the fly, on a token sample of each group's input
        probes = {gi: block.groups[gi].linears[ns[0]] for gi, ns in names.items() if ns}
        if not probes:
            return {}
        dev = next(iter(probes.values())).weight.device
        total = int(recon.global_count(inputs.n_tokens, device=dev))
        samples = {gi: TokenSample(max(1, total // CLIP_TOKENS), limit=CLIP_TOKENS,
                                   width=lin.in_features, device=dev)
                   for gi, lin in probes.items()}
        inputs.observe(block.module, {str(gi): lin for gi, lin in probes.items()},
                       lambda key, x, _y: samples[int(key)].update(x))
        out = {}
        for gi, sample in samples.items():
            x = sample.reduce().value.float()
            if x.shape[0] == 0:  # no rank's tokens reached it (an MoE expert): min-max
                continue
            for n in names[gi]:
                w = block.groups[gi].linears[n].weight.data
                spec = self._grids[n]
                sym = spec.symmetric if self.sp.clip_sym is None else self.sp.clip_sym
                out[n] = search_clip(w, x, spec, n_tokens=x.shape[0],
                                     symmetric_clip=sym,
                                     rows_per_chunk=512 if x.is_cuda else 64)
            del x
        return out

    def _given_clips(self, block: Block) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """clip_version v2: ``<clip_path>/clips.pth`` when given, else what earlier steps of
        the recipe published for the block (awq with clip_version v2, omniquant)."""
        if self._saved_clips is not None:
            prefix = block.name + "."
            found = {k[len(prefix):]: v for k, v in self._saved_clips.items()
                     if k.startswith(prefix)}
            if not found:
                where = artefact_path("clips", self.sp.clip_path or ".")
                raise DataError(f"{where} has no clip ranges for {block.name}: was it written "
                                "for this model (awq with weight_clip: True, clip_version: "
                                "v2, save_clip: True)?")
            return found
        found = self.run.artefacts.for_block("clips", block)
        if not found:
            raise ConfigError("quant.special.clip_version", "v2", reason=f"no earlier step "
                              f"published clip ranges for {block.name}: give awq weight_clip: "
                              "True and clip_version: v2 (or run omniquant before TesseraQ), "
                              "give clip_path, or use clip_version: v1")
        return found

    def _checked(self, block: Block, name: str, clip: tuple[torch.Tensor, torch.Tensor]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = clip
        lin = block.linears()[name]
        spec = self._grids[name]
        gran = spec.granularity
        shape = (lin.out_features, n_groups(lin.in_features, gran)
                 if isinstance(gran, PerGroup) else 1)
        if tuple(lo.shape) != shape or tuple(hi.shape) != shape:
            raise DataError(f"the clip range of {block.full_name(name)} has shape "
                            f"{tuple(hi.shape)}; this run's {spec.describe()} needs "
                            f"{shape}")
        return lo, hi

    def _heads_of(self) -> tuple[int, int]:
        if self._heads is None:
            assert self.run.adapter is not None
            self._heads = self.run.adapter.attention_heads(self.run.model)
        return self._heads
