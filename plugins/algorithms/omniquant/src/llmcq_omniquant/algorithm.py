"""OmniQuant's driver: per block, learn clip factors (LWC) and channel scales (LET) so the
fake-quantized block reproduces the float block's outputs, then fold the scales into the
float weights (transform) and quantize with the learned clipping (quantize).

Per block:

1. ``calibrate``: running per-channel ``max|X|`` at the input of each LET site (for the
   SmoothQuant-style initialization), and with ``search_clip_init`` an input-aware clip search
   (:func:`llmcq.quant.clip.search_clip`) turned into initial clip factors. Weights untouched.
2. ``transform``: targets are the float block's outputs, computed before any change (with
   ``quant_out`` the float chain of block outputs is kept beside the quantized inputs, as the
   reference does). AdamW on ``MSE(block_q(X), target)`` for ``epochs`` passes over the
   calibration batches, the block run through :func:`torch.func.functional_call` with its
   weights replaced by ``Q(LET(W))`` and, with ``quant.act``, its linears' inputs fake-quantized
   per token with straight-through rounding. Then the learned scales are folded into the
   float weights with :func:`llmcq.transforms.scaling.fold_scale` (function-preserving).
3. ``quantize``: records of the folded weights on the learned clipped grids.

LET sites come from the adapter's linear groups: a norm producer (``input_layernorm ->
q,k,v``, ``post_attention_layernorm -> gate,up``) or the attention's value projection
(``v_proj -> o_proj``, with grouped-query attention: one scale per value channel, repeated
over the query heads that share it); ``up_proj -> down_proj`` only with ``smooth_up_down``.
The reference's extra query/key scale is not learned (see the README).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from llmcq.algorithm import Algorithm
from llmcq.errors import ConfigError, DataError
from llmcq.model.adapter import ResolvedGroup, resolve_block
from llmcq.pipeline.blockwise import Block, BlockInputs, block_output
from llmcq.quant.clip import search_clip
from llmcq.quant.qparams import n_groups
from llmcq.quant.record import QuantizedLinear, make_record
from llmcq.quant.spec import PerTensor, WeightQuantSpec
from llmcq.transforms.scaling import consumer_width, expand_kv_scale, fold_scale
from llmcq_omniquant import OmniQuantSpecial, solver

__all__ = ["OmniQuant", "LetSite", "let_sites", "transformed_params", "fold_site",
           "is_query_or_key"]

log = logging.getLogger("llmcq.omniquant")
_KEY = "omniquant"


@dataclass
class LetSite:
    """A linear group whose producer absorbs a learnable per-channel scale (and shift)."""

    index: int  # position in the block's groups
    group: ResolvedGroup
    producer: str  # the producer's name relative to the block
    linear: bool  # the producer is a linear (its output rows absorb the scale), else a norm
    repeat: int  # consumer width / producer width (query heads per key/value head)
    shift: bool  # producer and consumers have biases to absorb a shift

    @property
    def consumers(self) -> list[str]:
        return list(self.group.linears)


def is_query_or_key(name: str) -> bool:
    """Linears whose clipping llmc leaves to min-max in the clip search (errors in queries and
    keys are amplified by the softmax, which a per-linear output error does not see)."""
    leaf = name.rsplit(".", 1)[-1]
    return leaf.startswith(("q_", "k_")) or leaf in ("query", "key") or "Wqkv" in leaf


def let_sites(block: Block, heads: tuple[int, int], *, up_down: bool) -> list[LetSite]:
    """The block's LET sites, in group order (see the module docstring)."""
    attention = {g.spec.inspect for g in block.groups if g.spec.inspect_kwargs}
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
            if name.rpartition(".")[0] not in attention and not up_down:
                continue  # up_proj -> down_proj: only with smooth_up_down
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
                                 isinstance(bias, torch.Tensor) and consumers_bias))
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
        w, b = solver.scale_producer(eff[pw], eff.get(pb), scale, shift, linear=s.linear)
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


def _float_kwargs(v: Any, dtype: torch.dtype) -> Any:
    if isinstance(v, torch.Tensor):
        return v.to(dtype) if v.is_floating_point() else v
    if isinstance(v, tuple):
        return tuple(_float_kwargs(x, dtype) for x in v)
    if isinstance(v, dict):
        return {k: _float_kwargs(x, dtype) for k, x in v.items()}
    return v


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

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        sp = self.special
        assert isinstance(sp, OmniQuantSpecial)
        self.sp: OmniQuantSpecial = sp
        quant = self.run.config.quant
        assert quant is not None and quant.weight is not None
        self._quant_out = bool(quant.quant_out)
        # llmc: straight-through rounding only with ``ste: True`` (its configs set it)
        self._wste = bool(quant.weight.ste)
        self._aste = quant.act is not None and bool(quant.act.ste)
        self._heads: tuple[int, int] | None = None
        self._fp_chain: list[torch.Tensor] | None = None
        self._losses: list[tuple[float, float]] = []
        self._nonfinite: list[int] = []
        self._sites: list[str] = []
        self._amp = False
        if sp.use_shift:  # refuse before any evaluation or calibration runs
            self._check_shift()

    # ------------------------------------------------------------------ stages

    def calibrate(self, block: Block, inputs: BlockInputs | None) -> None:
        if inputs is None:
            raise DataError("OmniQuant needs calibration inputs (add a calib section)")
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
        if self.sp.lwc and self.sp.search_clip_init:
            given = self._earlier_clips(block) if self.sp.load_clip else {}
            for gi, g in enumerate(block.groups):
                names = [n for n in g.linears if not is_query_or_key(n)]
                if names:
                    clip_names[gi] = names
                if any(n not in given for n in names):
                    targets[f"clip{gi}"] = g.linears[names[0]]
        absmax: dict[str, torch.Tensor] = {}
        tokens: dict[str, list[torch.Tensor]] = {}
        n_tok = int(inputs.hidden[0].shape[1])  # llmc samples seq_len tokens for the search
        stride = max(1, inputs.n_tokens // n_tok)
        if not targets and not clip_names:
            return

        def fn(key: str, x: torch.Tensor, _y: torch.Tensor) -> None:
            x2 = x.detach().reshape(-1, x.shape[-1])
            if key.startswith("let"):
                m = x2.abs().amax(dim=0).float()
                absmax[key] = m if key not in absmax else torch.maximum(absmax[key], m)
            else:
                tokens.setdefault(key, []).append(x2[::stride].float())

        if targets:
            inputs.observe(block.module, targets, fn)
        state["act_absmax"] = {int(k[3:]): v for k, v in absmax.items()}
        clip_init: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        sym = self.weight.symmetric if self.sp.clip_sym is None else self.sp.clip_sym
        for gi, names in clip_names.items():
            x = None
            for name in names:
                w = block.groups[gi].linears[name].weight.data
                if name in given:
                    lo, hi = given[name]
                else:
                    if x is None:
                        x = torch.cat(tokens[f"clip{gi}"])
                    lo, hi = search_clip(w, x, self.weight, n_tokens=x.shape[0],
                                         symmetric_clip=sym)
                clip_init[name] = solver.clip_factors(w, lo, hi, self.weight, symmetric_clip=sym)
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
            targets, aug = self._targets(block, inputs)
            with torch.enable_grad():
                self._train(block, inputs, sites, scales, shifts, factors, targets, aug)
            del targets, aug
        with torch.no_grad():
            for s in sites:
                fold_site(s, solver.truncate_scale(scales[s.index].detach()),
                          None if s.index not in shifts else shifts[s.index].detach(),
                          self._heads_of())
        state["lwc"] = {n: (u.detach(), None if lo is None else lo.detach())
                        for n, (u, lo) in factors.items()}
        state.pop("clip_init", None)
        state.pop("act_absmax", None)
        if self.run.quantizer is not self.step:  # a later step quantizes: hand it the clipping
            for name, lin in block.linears().items():
                if name in state["lwc"]:
                    up, low = state["lwc"][name]
                    lin.weight.data = solver.lwc_clip(lin.weight.data, self.weight, up, low)

    def quantize(self, block: Block, inputs: BlockInputs | None) -> dict[str, QuantizedLinear]:
        factors = self.run.scratch(block.index).get(_KEY, {}).get("lwc", {})
        out = {}
        for name, lin in block.linears().items():
            up, low = factors.get(name, (None, None))
            q, qp = solver.lwc_quantize(lin.weight.data, self.weight, up, low)
            out[name] = make_record(q, qp, self.weight, bias=lin.bias)
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

    def _earlier_clips(self, block: Block) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Clip ranges ``(lo, hi)`` per linear that earlier steps left for this block
        (``run.scratch(block)[step]["clips"]``, as AWQ does)."""
        found: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for key, value in self.run.scratch(block.index).items():
            if key != _KEY and isinstance(value, dict) and isinstance(value.get("clips"), dict):
                found.update(value["clips"])
        if not found:
            raise ConfigError("quant.special.load_clip", True, reason=f"no earlier step left "
                              f"clip ranges for {block.name}: run awq with weight_clip: True "
                              "and clip_version: v2 before OmniQuant, or set load_clip: False")
        return found

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
        if not self.sp.let:
            return []
        return let_sites(block, self._heads_of(), up_down=self.sp.smooth_up_down)

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
            for name, lin in block.linears().items():
                if self.sp.search_clip_init and name not in clip_init:
                    continue  # queries and keys keep min-max (llmc)
                if name in clip_init:
                    up0, low0 = clip_init[name]
                else:
                    up0 = torch.full(_factor_shape(lin, self.weight), solver.LWC_INIT,
                                     device=dev)
                    low0 = None if self.weight.symmetric else up0.clone()
                up = nn.Parameter(up0.float().to(dev))
                low = None if low0 is None else nn.Parameter(low0.float().to(dev))
                factors[name] = (up, low)
        return scales, shifts, factors

    @torch.no_grad()
    def _targets(self, block: Block, inputs: BlockInputs
                 ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """Float outputs of the unchanged block: the loss targets (and aug_loss's)."""
        module = block.module
        if not self._quant_out:
            out = inputs.forward(module)
            return out, (out if self.sp.aug_loss else None)
        # quantized inputs flow through the blocks: keep the float chain beside them
        if block.index == 0 or self._fp_chain is None:
            self._fp_chain = list(inputs.hidden)
        out = [block_output(module(h, **kw))
               for h, kw in zip(self._fp_chain, inputs.kwargs, strict=True)]
        self._fp_chain = out
        aug = None
        if self.sp.aug_loss:
            aug = out if block.index == 0 else inputs.forward(module)
        return out, aug

    @contextmanager
    def _act_quant(self, block: Block) -> Iterator[None]:
        """Fake-quantize every linear's input (straight-through) while training."""
        act = self.act
        handles = []
        if act is not None:
            ste = self._aste

            def pre(_m: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
                return (solver.act_fake_quant(args[0], act, ste=ste), *args[1:])

            handles = [lin.register_forward_pre_hook(pre) for lin in block.linears().values()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _train(self, block: Block, inputs: BlockInputs, sites: list[LetSite],
               scales: dict[int, nn.Parameter], shifts: dict[int, nn.Parameter],
               factors: dict[str, tuple[nn.Parameter, nn.Parameter | None]],
               targets: list[torch.Tensor], aug: list[torch.Tensor] | None) -> None:
        from tqdm.auto import tqdm

        module = block.module
        dev = next(module.parameters()).device
        self._amp = dev.type == "cuda" and not self.sp.deactive_amp
        cast = (torch.autocast(device_type="cuda", dtype=torch.bfloat16) if self._amp
                else nullcontext())
        lwc = [p for up, low in factors.values() for p in (up, low) if p is not None]
        let = list(scales.values()) + list(shifts.values())
        groups = [g for g in ({"params": lwc, "lr": self.sp.lwc_lr},
                              {"params": let, "lr": self.sp.let_lr}) if g["params"]]
        learnable = lwc + let
        if not groups:
            return
        optimizer = torch.optim.AdamW(groups, weight_decay=self.sp.wd)
        base = {n: p.detach().float() for n, p in module.named_parameters()}
        kwargs = [_float_kwargs(kw, torch.float32) for kw in inputs.kwargs]
        linears = list(block.linears())
        heads = self._heads_of() if sites else (1, 1)
        flags = {p: p.requires_grad for p in module.parameters()}
        for p in flags:
            p.requires_grad_(False)
        snapshot = [p.detach().clone() for p in learnable]
        first = last = float("nan")
        n = len(inputs)
        try:
            with self._act_quant(block):
                for epoch in tqdm(range(self.sp.epochs), desc=f"omniquant {block.name}",
                                  leave=False, disable=not self.run.progress):
                    total = torch.zeros((), device=dev)
                    for i, h in enumerate(inputs.hidden):
                        with torch.no_grad():
                            for s in scales.values():
                                s.copy_(solver.truncate_scale(s))
                        with cast:
                            eff = transformed_params(base, sites, scales, shifts, heads)
                            for name in linears:
                                up, low = factors.get(name, (None, None))
                                key = f"{name}.weight"
                                eff[key] = solver.lwc_fake_quant(eff[key], self.weight, up, low,
                                                                 ste=self._wste)
                            out = block_output(functional_call(module, eff, (h.float(),),
                                                               kwargs[i])).float()
                            loss = F.mse_loss(out, targets[i].float())
                            if aug is not None:
                                loss = loss + F.mse_loss(out, aug[i].float())
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        optimizer.step()
                        total += loss.detach()
                    last = float(total) / n  # one host sync per epoch
                    if epoch == 0:
                        first = last
                    if last != last or last in (float("inf"), float("-inf")):
                        with torch.no_grad():
                            for p, saved in zip(learnable, snapshot, strict=True):
                                p.copy_(saved)
                        self._nonfinite.append(block.index)
                        log.warning("%s: non-finite OmniQuant loss in epoch %d; keeping the "
                                    "parameters of the epoch before", block.name, epoch)
                        break
                    snapshot = [p.detach().clone() for p in learnable]
        finally:
            for p, flag in flags.items():
                p.requires_grad_(flag)
            for p in learnable:
                p.requires_grad_(False)
            del optimizer, base, kwargs
        self._losses.append((first, last))
        log.info("%s: OmniQuant loss %.3g -> %.3g", block.name, first, last)


def _factor_shape(linear: nn.Linear, spec: WeightQuantSpec) -> tuple[int, int]:
    """Shape ``[rows, G]`` of a linear's clip factors (one per quantization group)."""
    if isinstance(spec.granularity, PerTensor):
        return (1, 1)
    return (linear.out_features, n_groups(linear.in_features, spec.granularity))
