"""OmniQuant's driver: per block, learn clip factors (LWC) and channel scales (LET) so the
fake-quantized block reproduces the float block's outputs, then fold the scales into the
float weights (transform) and quantize with the learned clipping (quantize).

Per block:

1. ``calibrate``: with ``load_transform``, first fold the saved AWQ scales
   (``<scale_path>/scales.pth``) into the block through the layout's scaling pairs
   (:func:`llmcq.artefacts.fold_saved_scales`, the fold AWQ's ``load_scale`` uses). Then the
   per-channel ``max|X|`` at the input of each LET site (:class:`llmcq.stats.ChannelAbsMax`,
   reduced over ranks; the SmoothQuant-style initialization), and with ``search_clip_init``
   initial clip factors: from the clip ranges an earlier step published for the block
   (``load_clip``: ``run.artefacts.for_block("clips", block)``), from ``<clip_path>/clips.pth``
   (``load_clip`` or ``load_transform`` with ``clip_path``), or from an input-aware clip
   search (:func:`llmcq.quant.clip.search_clip`) on a strided token sample gathered from
   every rank (:class:`llmcq.stats.TokenSample`). Queries and keys (declared roles ``q``,
   ``k``, ``qkv``) keep min-max there, as in llmc. The weights are untouched otherwise.
2. ``transform``: core's block-reconstruction harness (:mod:`llmcq.recon`): float targets
   from the block before any change (with ``quant_out`` the float chain beside the
   quantized inputs, :class:`llmcq.recon.FloatChain`), AdamW (``lwc_lr``, ``let_lr``, ``wd``)
   on ``MSE(block_q(X), target)`` (plus the aug_loss target) for ``epochs`` passes over the
   calibration batches, the block run with its weights replaced by ``Q(LET(W))`` and, with
   ``quant.act``, its linears' inputs fake-quantized per token with straight-through
   rounding; bfloat16 autocast on CUDA unless ``deactive_amp``; under ``torchrun`` the
   gradients are averaged over the ranks every step. Then the learned scales are folded into
   the float weights with :func:`llmcq.transforms.scaling.fold_scale` (function-preserving).
3. ``quantize``: records of the folded weights on the learned clipped grids.

LET sites come from the adapter's linear groups and the linears' declared roles: a norm
producer (``input_layernorm -> q,k,v``, ``post_attention_layernorm -> gate,up``), the value
projection (role ``v``: ``v_proj -> o_proj``, with grouped-query attention one scale per
value channel, repeated over the query heads that share it), and an up projection (role
``up``: ``up_proj -> down_proj``) only with ``smooth_up_down``. The reference's extra
query/key scale is not learned (see the README).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from llmcq import dist, recon
from llmcq.algorithm import Algorithm
from llmcq.artefacts import artefact_path, fold_saved_scales, load_artefact
from llmcq.errors import ConfigError, DataError, PluginError
from llmcq.model.adapter import ResolvedGroup, resolve_block
from llmcq.pipeline.blockwise import Block, BlockInputs
from llmcq.quant.clip import search_clip
from llmcq.quant.qparams import group_view, n_groups
from llmcq.quant.record import QuantizedLinear, make_record
from llmcq.quant.spec import PerTensor, WeightQuantSpec
from llmcq.stats import ChannelAbsMax, TokenSample
from llmcq.transforms.scaling import consumer_width, expand_kv_scale, fold_scale
from llmcq_omniquant import OmniQuantSpecial, solver

__all__ = ["OmniQuant", "LetSite", "let_sites", "transformed_params", "fold_site",
           "is_query_or_key", "QK_ROLES", "V_ROLES", "UP_ROLES"]

log = logging.getLogger("llmcq.omniquant")
_KEY = "omniquant"
#: roles whose clipping llmc's clip search leaves to min-max (errors in queries and keys
#: are amplified by the softmax, which a per-linear output error does not see)
QK_ROLES = ("q", "k", "qkv")
#: producer roles of LET's linear sites: the value projection (-> output projection) and
#: the up projection (-> down projection, with smooth_up_down)
V_ROLES = ("v",)
UP_ROLES = ("up", "expert_up", "shared_up")


@dataclass
class LetSite:
    """A linear group whose producer absorbs a learnable per-channel scale (and shift)."""

    index: int  # position in the block's groups
    group: ResolvedGroup
    producer: str  # the producer's name relative to the block
    linear: bool  # the producer is a linear (its output rows absorb the scale), else a norm
    repeat: int  # consumer width / producer width (query heads per key/value head)
    shift: bool  # producer and consumers have biases to absorb a shift
    #: a norm producer's declared kind (rms, layer, rms_offset: Gemma's 1 + w); None: linear
    norm_kind: str | None = None

    @property
    def consumers(self) -> list[str]:
        return list(self.group.linears)


def _role(block: Block, name: str, why: str) -> str:
    role = block.role(name)
    if role is None:
        raise PluginError(f"{name} has no declared role; OmniQuant finds {why} by the "
                          "linears' roles (the model adapter must declare them)",
                          where=block.name)
    return role.kind


def is_query_or_key(block: Block, name: str) -> bool:
    """Whether ``name`` (relative to ``block``) is a query or key projection by its declared
    role (:data:`QK_ROLES`): llmc leaves their clipping to min-max in the clip search."""
    return _role(block, name, "queries and keys") in QK_ROLES


def let_sites(block: Block, heads: tuple[int, int], *, up_down: bool) -> list[LetSite]:
    """The block's LET sites, in group order (see the module docstring)."""
    n_heads, n_kv = heads
    sites = []
    for i, g in enumerate(block.groups):
        prev, name = g.prev_op, g.spec.prev_op
        if prev is None or name is None or g.spec.prev_kind == "none":
            continue
        width = consumer_width(g)
        consumers_bias = all(lin.bias is not None for lin in g.linears.values())
        if g.spec.prev_kind == "linear":
            if not isinstance(prev, nn.Linear):
                continue
            kind = _role(block, name, "LET's value -> output and up -> down pairs")
            if kind in UP_ROLES and not up_down:
                continue  # up_proj -> down_proj: only with smooth_up_down
            if kind not in V_ROLES + UP_ROLES:
                continue
            out = prev.out_features
            if width % out or (width != out and width // out != n_heads // max(n_kv, 1)):
                continue
            sites.append(LetSite(i, g, name, True, width // out,
                                 prev.bias is not None and consumers_bias))
        else:
            weight = getattr(prev, "weight", None)
            if not isinstance(weight, torch.Tensor) or weight.numel() != width:
                continue
            bias = getattr(prev, "bias", None)
            sites.append(LetSite(i, g, name, False, 1,
                                 isinstance(bias, torch.Tensor) and consumers_bias,
                                 g.prev_norm_kind))
    return sites


def transformed_params(base: dict[str, torch.Tensor], sites: list[LetSite],
                       scales: dict[int, torch.Tensor], shifts: dict[int, torch.Tensor],
                       heads: tuple[int, int]) -> dict[str, torch.Tensor]:
    """The block's parameters (``base``, by name) after the equivalent transformation of
    every site, differentiable in the scales and shifts: what :func:`fold_scale` would write,
    without touching the module."""
    eff = dict(base)
    n_heads, n_kv = heads
    for s in sites:
        scale, shift = scales[s.index], shifts.get(s.index)
        pw, pb = f"{s.producer}.weight", f"{s.producer}.bias"
        w, b = solver.scale_producer(eff[pw], eff.get(pb), scale, shift, linear=s.linear,
                                     offset=s.norm_kind == "rms_offset")
        eff[pw] = w
        if b is not None:
            eff[pb] = b
        if s.repeat > 1:
            scale = expand_kv_scale(scale, n_heads, n_kv)
            shift = None if shift is None else expand_kv_scale(shift, n_heads, n_kv)
        for name in s.consumers:
            cw, cb = f"{name}.weight", f"{name}.bias"
            w, b = solver.scale_consumer(eff[cw], eff.get(cb), scale, shift)
            eff[cw] = w
            if b is not None:
                eff[cb] = b
    return eff


def fold_site(site: LetSite, scale: torch.Tensor, shift: torch.Tensor | None,
              heads: tuple[int, int]) -> None:
    """Fold a learned scale (and shift) into the float weights in place (function-preserving):
    shifts into the biases, then :func:`llmcq.transforms.scaling.fold_scale`."""
    n_heads, n_kv = heads
    g = site.group
    if shift is not None:
        wide = shift if site.repeat == 1 else expand_kv_scale(shift, n_heads, n_kv)
        for lin in g.linears.values():
            assert lin.bias is not None
            lin.bias.data += (lin.weight.data.float() @ wide.float()).to(lin.bias.dtype)
        bias = getattr(g.prev_op, "bias", None)
        assert isinstance(bias, torch.Tensor)
        bias.data -= shift.to(bias.dtype)
    if site.linear and site.repeat > 1:
        fold_scale(g, scale, n_heads=n_heads, n_kv_heads=n_kv)
    else:
        fold_scale(g, scale)


class OmniQuant(Algorithm):
    """OmniQuant (Shao et al., 2023, arXiv:2308.13137), llmc's ``OmniQuant``.

    ```yaml
    quant:
        method: OmniQuant
        weight: {bit: 3, symmetric: False, granularity: per_group, group_size: 64,
                 calib_algo: learnable, ste: True}
        special: {lwc: True, let: False, lwc_lr: 0.01, let_lr: 0.005, use_shift: False,
                  alpha: 0.5, deactive_amp: True, epochs: 20, wd: 0, aug_loss: False}
        quant_out: True
    ```
    """

    #: targets are the float block's, also after an earlier step clipped in place
    float_targets = True

    #: keep the float chain's inputs in the targets (``Batch.float_hidden``), for a subclass
    #: whose loss reruns float internals (ABQ-LLM's attention maps)
    keep_float_inputs = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        sp = self.omniquant_settings(self.special)
        self.sp: OmniQuantSpecial = sp
        quant = self.run.config.quant
        assert quant is not None and quant.weight is not None
        self._quant_out = bool(quant.quant_out)
        # llmc: straight-through rounding only with ``ste: True`` (its configs set it)
        self._wste = bool(quant.weight.ste)
        self._aste = quant.act is not None and bool(quant.act.ste)
        self._heads: tuple[int, int] | None = None
        self._chain = recon.FloatChain()
        self._losses: list[tuple[float, float]] = []
        self._nonfinite: list[int] = []
        self._sites: list[str] = []
        self._amp = False
        # llmc's two-step flow: AWQ saved its scales/clips in an earlier run
        self._clip_init = sp.search_clip_init or bool(sp.load_transform and sp.clip_path)
        self._load_clip = sp.load_clip or bool(sp.load_transform and sp.clip_path)
        self._saved_scales = load_artefact("scales", sp.scale_path or ".") \
            if sp.load_transform else None
        self._saved_clips = load_artefact("clips", sp.clip_path) \
            if self._load_clip and sp.clip_path else None
        if sp.use_shift:  # refuse before any evaluation or calibration runs
            self._check_shift()

    def omniquant_settings(self, special: Any) -> OmniQuantSpecial:
        """The OmniQuant settings this driver runs with: the step's special config here; a
        subclass with keys of its own (ABQ-LLM) maps them onto OmniQuant's."""
        assert isinstance(special, OmniQuantSpecial)
        return special

    def after_fold(self, block: Block, state: dict[str, Any]) -> None:
        """Called after the learned scales are folded into the float weights, before the
        records are built (nothing here; ABQ-LLM folds its rank-1 compensation)."""

    # ------------------------------------------------------------------ stages

    def calibrate(self, block: Block, inputs: BlockInputs | None) -> None:
        if inputs is None:
            raise DataError("OmniQuant needs calibration inputs (add a calib section)")
        if self._saved_scales is not None:
            self._load_transform(block)
        if self.sp.search_scale_init:
            self._check_scales_applied(block)
        state = self.run.scratch(block.index).setdefault(_KEY, {})
        sites = self._sites_of(block)
        if block.index == 0:
            self._sites = [f"{s.producer} -> {','.join(s.consumers)}" for s in sites]
        targets: dict[str, nn.Module] = {}
        if self.sp.let and not self.sp.search_scale_init:
            for s in sites:
                targets[f"let{s.index}"] = next(iter(s.group.linears.values()))
        clip_names: dict[int, list[str]] = {}
        given: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if self.sp.lwc and self._clip_init:
            given = self._earlier_clips(block) if self._load_clip else {}
            for gi, g in enumerate(block.groups):
                names = [n for n in g.linears if not is_query_or_key(block, n)
                         and self.weight_of(block, n) is not None]
                if names:
                    clip_names[gi] = names
                if any(n not in given for n in names):
                    targets[f"clip{gi}"] = g.linears[names[0]]
        if not targets and not clip_names:
            return
        # statistics over every rank's tokens (data-parallel calibration): the LET
        # initialization's max|X| reduced by max, the clip search's tokens gathered
        n_tok = int(inputs.hidden[0].shape[1])  # llmc samples seq_len tokens for the search
        stride = max(1, int(recon.global_count(inputs.n_tokens)) // n_tok)
        absmax = {k: ChannelAbsMax() for k in targets if k.startswith("let")}
        tokens = {k: TokenSample(stride) for k in targets if k.startswith("clip")}

        def fn(key: str, x: torch.Tensor, _y: torch.Tensor) -> None:
            (absmax[key] if key in absmax else tokens[key]).update(x)

        if targets:
            inputs.observe(block.module, targets, fn)
        state["act_absmax"] = {int(k[3:]): v.reduce().value for k, v in absmax.items()}
        clip_init: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        for gi, names in clip_names.items():
            x = None
            for name in names:
                w = block.groups[gi].linears[name].weight.data
                spec = self.weight_of(block, name)  # each linear's own grid
                assert spec is not None
                sym = spec.symmetric if self.sp.clip_sym is None else self.sp.clip_sym
                if name in given:
                    lo, hi = given[name]
                else:
                    if x is None:
                        x = tokens[f"clip{gi}"].reduce().value.float()
                    lo, hi = search_clip(w, x, spec, n_tokens=x.shape[0], symmetric_clip=sym)
                clip_init[name] = solver.clip_factors(w, lo, hi, spec, symmetric_clip=sym)
            tokens.pop(f"clip{gi}", None)
            del x
        state["clip_init"] = clip_init

    def transform(self, block: Block, inputs: BlockInputs | None) -> None:
        if inputs is None:
            raise DataError("OmniQuant needs calibration inputs (add a calib section)")
        state = self.run.scratch(block.index).setdefault(_KEY, {})
        sites = self._sites_of(block)
        scales, shifts, factors = self._init_params(block, sites, state)
        if self.sp.epochs > 0:
            targets = self._chain.targets(block, inputs, quant_out=self._quant_out,
                                          aug_loss=self.sp.aug_loss,
                                          keep_inputs=self.keep_float_inputs)
            with torch.enable_grad():
                self._train(block, inputs, sites, scales, shifts, factors, targets)
            del targets
        with torch.no_grad():
            for s in sites:
                fold_site(s, solver.truncate_scale(scales[s.index].detach()),
                          None if s.index not in shifts else shifts[s.index].detach(),
                          self._heads_of())
            self.after_fold(block, state)
        state["lwc"] = {n: (u.detach(), None if lo is None else lo.detach())
                        for n, (u, lo) in factors.items()}
        state.pop("clip_init", None)
        state.pop("act_absmax", None)
        if self.run.quantizer is not self.step:  # a later step quantizes: hand it the clipping
            clips = {}
            for name, lin in block.linears().items():
                if name in state["lwc"]:
                    up, low = state["lwc"][name]
                    spec = self.weight_of(block, name)
                    assert spec is not None  # linears kept in float learn no clipping
                    # the learned range of the weights LWC saw, before they are clamped to it
                    # (of the clamped ones it would shrink a second time)
                    clips[block.full_name(name)] = self._learned_range(lin.weight.data, spec,
                                                                       up, low)
                    lin.weight.data = solver.lwc_clip(lin.weight.data, spec, up, low)
            self.run.artefacts.publish("clips", clips, producer=_KEY)

    def quantize(self, block: Block, inputs: BlockInputs | None) -> dict[str, QuantizedLinear]:
        factors = self.run.scratch(block.index).get(_KEY, {}).get("lwc", {})
        out = {}
        for name, lin in self.quantized_linears(block).items():
            spec = self.weight_of(block, name)
            assert spec is not None
            up, low = factors.get(name, (None, None))
            q, qp = solver.lwc_quantize(lin.weight.data, spec, up, low)
            out[name] = make_record(q, qp, spec, bias=lin.bias)
        return out

    def summary(self) -> dict[str, Any]:
        return {
            "epochs": self.sp.epochs, "lwc": self.sp.lwc, "let": self.sp.let,
            "let_sites": self._sites,
            "train_dtype": "bfloat16 autocast" if self._amp else "float32",
            # mean training loss of the first and of the last epoch, per block
            "block_loss": [[float(f"{a:.4g}"), float(f"{b:.4g}")] for a, b in self._losses],
            "nonfinite_loss_blocks": self._nonfinite,
        }

    # ------------------------------------------------------------------ pieces

    def _load_transform(self, block: Block) -> None:
        """Fold the saved scales into the block (llmc's ``load_transform``) and publish what
        was folded, as AWQ does in one recipe."""
        assert self._saved_scales is not None
        source = str(artefact_path("scales", self.sp.scale_path or "."))
        heads = self._heads_of()
        applied = fold_saved_scales(block, self._saved_scales, heads=heads, source=source)
        self.run.artefacts.publish("scales", {block.full_name(n): s.float()
                                              for n, s in applied.items()},
                                   producer=f"{_KEY}:load_transform")

    def _check_scales_applied(self, block: Block) -> None:
        """search_scale_init starts LET from 1: some step must have scaled this block."""
        if not self.run.artefacts.for_block("scales", block):
            raise ConfigError("quant.special.search_scale_init", True,
                              reason=f"no earlier step applied scales to {block.name} (LET "
                              "would start from 1 on an unscaled block): put awq with trans: "
                              "True before OmniQuant, or load them with load_transform: True "
                              "and scale_path")

    def _earlier_clips(self, block: Block) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Clip ranges ``(lo, hi)`` per linear (relative names) for this block: from
        ``<clip_path>/clips.pth`` when given, else those earlier steps published
        (``run.artefacts.for_block("clips", block)``, e.g. AWQ with clip_version v2)."""
        if self._saved_clips is not None:
            prefix = block.name + "."
            found = {k[len(prefix):]: v for k, v in self._saved_clips.items()
                     if k.startswith(prefix)}
            where = str(artefact_path("clips", self.sp.clip_path or "."))
            if not found:
                raise DataError(f"{where} has no clip ranges for {block.name}: was it written "
                                "for this model (awq with weight_clip: True, clip_version: v2, "
                                "save_clip: True)?")
            return found
        found = self.run.artefacts.for_block("clips", block)
        if not found:
            raise ConfigError("quant.special.load_clip", True, reason=f"no earlier step left "
                              f"clip ranges for {block.name}: run awq with weight_clip: True "
                              "and clip_version: v2 before OmniQuant, give clip_path, or set "
                              "load_clip: False")
        return found

    def _learned_range(self, w: torch.Tensor, spec: WeightQuantSpec, up: torch.Tensor | None,
                       low: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The learned clip bounds ``(lo, hi)`` (``[out, G]``) of ``w`` (the clips artefact)."""
        wg = group_view(w.float(), spec.granularity)
        lo, hi = solver.lwc_range(wg, None if up is None else up.float().to(w.device),
                                  None if low is None else low.float().to(w.device),
                                  spec.symmetric)
        return lo.squeeze(-1), hi.squeeze(-1)

    def _check_shift(self) -> None:
        adapter, model = self.run.adapter, self.run.model
        assert adapter is not None
        name = f"{adapter.layout.blocks}.0"
        module = adapter.blocks(model)[0]
        block = Block(0, name, module, resolve_block(module, adapter.block_layout(model, 0),
                                                     where=name))
        if not any(s.shift for s in self._sites_of(block)):
            raise ConfigError("quant.special.use_shift", True, reason="this model's LET sites "
                              "have no biases to absorb a shift (Llama-style blocks have none; "
                              "llmc refuses it too); set use_shift: False")

    def _heads_of(self) -> tuple[int, int]:
        if self._heads is None:
            assert self.run.adapter is not None
            self._heads = self.run.adapter.attention_heads(self.run.model)
        return self._heads

    def _sites_of(self, block: Block) -> list[LetSite]:
        """The block's LET sites, but those whose consumers are all kept in float (nothing
        quantized there for LET to help; llmc's AWQ skips such groups too)."""
        if not self.sp.let:
            return []
        return [s for s in let_sites(block, self._heads_of(), up_down=self.sp.smooth_up_down)
                if any(self.weight_of(block, n) is not None for n in s.consumers)]

    def _init_params(self, block: Block, sites: list[LetSite], state: dict[str, Any]
                     ) -> tuple[dict[int, nn.Parameter], dict[int, nn.Parameter],
                                dict[str, tuple[nn.Parameter, nn.Parameter | None]]]:
        """Learnable tensors (float32, on the block's device) at their initial values."""
        dev = next(block.module.parameters()).device
        n_heads, n_kv = self._heads_of() if sites else (1, 1)
        scales: dict[int, nn.Parameter] = {}
        shifts: dict[int, nn.Parameter] = {}
        stats = state.get("act_absmax", {})
        for s in sites:
            width = consumer_width(s.group)
            if self.sp.search_scale_init:
                init = torch.ones(width // s.repeat, device=dev)
            else:
                wmax = torch.cat([lin.weight.detach().abs().float()
                                  for lin in s.group.linears.values()]).amax(dim=0)
                act = stats[s.index].to(dev)
                if s.repeat > 1:
                    wmax = solver.reduce_to_kv_max(wmax, n_heads, n_kv)
                    act = solver.reduce_to_kv_max(act, n_heads, n_kv)
                init = solver.let_init_scale(act, wmax, self.sp.alpha)
            scales[s.index] = nn.Parameter(init.to(dev))
            if self.sp.use_shift and s.shift:
                shifts[s.index] = nn.Parameter(torch.zeros_like(init))
        factors: dict[str, tuple[nn.Parameter, nn.Parameter | None]] = {}
        if self.sp.lwc:
            clip_init = state.get("clip_init", {})
            for name, lin in self.quantized_linears(block).items():
                if self._clip_init and name not in clip_init:
                    continue  # queries and keys keep min-max (llmc)
                spec = self.weight_of(block, name)
                assert spec is not None
                if name in clip_init:
                    up0, low0 = clip_init[name]
                else:
                    up0 = torch.full(_factor_shape(lin, spec), solver.LWC_INIT, device=dev)
                    low0 = None if spec.symmetric else up0.clone()
                up = nn.Parameter(up0.float().to(dev))
                low = None if low0 is None else nn.Parameter(low0.float().to(dev))
                factors[name] = (up, low)
        return scales, shifts, factors

    def _train(self, block: Block, inputs: BlockInputs, sites: list[LetSite],
               scales: dict[int, nn.Parameter], shifts: dict[int, nn.Parameter],
               factors: dict[str, tuple[nn.Parameter, nn.Parameter | None]],
               targets: recon.Targets) -> None:
        """LWC and LET trained on core's reconstruction harness: the block runs with
        ``Q(LET(W))`` (:func:`transformed_params`, then :func:`solver.lwc_fake_quant`)."""
        lwc = [p for up, low in factors.values() for p in (up, low) if p is not None]
        let = list(scales.values()) + list(shifts.values())
        # each linear on its own grid; linears kept in float are only transformed
        grids = {n: g for n, g in self.weights_of(block).items() if g is not None}
        heads = self._heads_of() if sites else (1, 1)
        ste = self._wste
        acts = self.acts_of(block)

        def params(base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            eff = transformed_params(base, sites, scales, shifts, heads)
            for name, spec in grids.items():
                up, low = factors.get(name, (None, None))
                key = f"{name}.weight"
                eff[key] = solver.lwc_fake_quant(eff[key], spec, up, low, ste=ste)
            return eff

        def truncate() -> None:  # LET scales stay away from 0 (llmc's truncation)
            for s in scales.values():
                s.copy_(solver.truncate_scale(s))

        result = recon.reconstruct(
            block, inputs, targets,
            [recon.ParamGroup(lwc, lr=self.sp.lwc_lr, name="lwc"),
             recon.ParamGroup(let, lr=self.sp.let_lr, name="let")],
            settings=recon.ReconSettings(epochs=self.sp.epochs, amp=not self.sp.deactive_amp,
                                         weight_decay=self.sp.wd, optimizer="adamw"),
            params=params, loss=recon.TargetLoss(recon.mse, aug="sum"),
            act=recon.ActQuant(acts, ste=self._aste) if any(acts.values()) else None,
            before_step=truncate, progress=self.run.progress and dist.is_main(),
            desc=f"omniquant {block.name}")
        self._amp = result.amp
        if not result.losses:
            return
        if result.rolled_back:
            self._nonfinite.append(block.index)
        self._losses.append((result.first, result.last))
        log.info("%s: OmniQuant loss %.3g -> %.3g", block.name, result.first, result.last)


def _factor_shape(linear: nn.Linear, spec: WeightQuantSpec) -> tuple[int, int]:
    """Shape ``[rows, G]`` of a linear's clip factors (one per quantization group)."""
    if isinstance(spec.granularity, PerTensor):
        return (1, 1)
    return (linear.out_features, n_groups(linear.in_features, spec.granularity))
