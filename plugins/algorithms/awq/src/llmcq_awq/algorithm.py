"""AWQ's plumbing: per block, search and fold the scales group by group, then search and
apply the weight clipping; the maths is in :mod:`llmcq_awq.solver`.

Lifecycle per block (``transform``; AWQ has no ``quantize``: core's round-to-nearest, or the
next quantizing step of the recipe such as GPTQ, quantizes the weights AWQ prepared):

1. for each linear group with a producer (``prev_op``), in layout order:
   collect the group's input ``X`` (one copy, freed after the group), ``s_X`` (and ``s_W``
   for v1), the float outputs of the group's inspect module, then the grid search: each
   candidate fake-quantizes ``W diag(s)`` from the saved exact weights and runs the inspect
   module on ``X / s``; the best scale (over all batches) is folded into the producer and
   the linears with :func:`llmcq.transforms.scaling.fold_scale`. ``v_proj -> o_proj`` under
   grouped-query attention is searched per kv channel (``do_gqa_trans``);
2. with ``weight_clip``: for each group, the inputs again (after every fold of the block),
   a per-group clip range per linear except queries and keys (by their declared roles:
   ``q``, ``k``, ``qkv``; :func:`llmcq.quant.clip.search_clip`) on a strided sample of
   about ``calib.seq_len`` tokens gathered from every rank (:class:`llmcq.stats.TokenSample`,
   so every rank searches the same tokens), and the ranges applied once all are searched
   (``clip_version: v1``);
3. scales and clips are published as the run's artefacts (``run.artefacts``, kinds
   ``scales`` and ``clips``, producer ``awq``; see :mod:`llmcq.artefacts`) for later steps
   of the recipe, and after the last block written to ``<scale_path>/scales.pth`` /
   ``<clip_path>/clips.pth`` when asked (``save_scale`` / ``save_clip``, core's artefact
   files). ``load_scale`` / ``load_clip`` read those files back (core's
   :func:`~llmcq.artefacts.load_artefact`) and apply them instead of searching.

Data-parallel calibration: channel means and candidate losses are all-reduced, and the clip
search runs on the gathered token sample, so every rank folds and clips the same weights.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from llmcq import dist
from llmcq.algorithm import Algorithm
from llmcq.artefacts import artefact_path, check_writable, group_scale, load_artefact
from llmcq.errors import DataError, PluginError
from llmcq.model.adapter import ResolvedGroup
from llmcq.pipeline.blockwise import Block, BlockInputs
from llmcq.quant.clip import apply_clip, search_clip
from llmcq.quant.qparams import fake_quantize_act, fake_quantize_weight, n_groups
from llmcq.quant.spec import ActQuantSpec, PerGroup, WeightQuantSpec
from llmcq.stats import TokenSample
from llmcq.transforms.scaling import consumer_width, expand_kv_scale, fold_scale, reduce_to_kv
from llmcq_awq import AwqSpecial
from llmcq_awq.solver import ChannelAbsMean, ScaleSearch, search_scale, weight_salience

__all__ = ["Awq", "search_group_scale", "clip_skipped", "QK_ROLES", "PRODUCER"]

_SKIP = "skip"
#: roles whose clipping llmc and the reference leave alone (their error passes through
#: the softmax, which a per-linear output error does not see)
QK_ROLES = ("q", "k", "qkv")
#: the producer name of AWQ's artefacts
PRODUCER = "awq"


def clip_skipped(block: Block, name: str) -> bool:
    """Whether llmc/AWQ leave this linear unclipped: queries and keys, by declared role."""
    role = block.role(name)
    if role is None:
        raise PluginError(f"{name} has no declared role; AWQ's clipping leaves queries and "
                          "keys alone and finds them by role (the adapter must declare roles)",
                          where=block.name)
    return role.kind in QK_ROLES


@torch.no_grad()
def search_group_scale(group: ResolvedGroup, xs: list[torch.Tensor],
                       kwargs: list[dict[str, Any]],
                       weight: WeightQuantSpec | Mapping[str, WeightQuantSpec | None],
                       act: ActQuantSpec | None, *, n_grid: int = 20, version: str = "v2",
                       heads: tuple[int, int] | None = None) -> ScaleSearch:
    """Eq. 4 for one group on its collected inputs ``xs`` (one tensor per batch).

    ``weight``: the grid of every linear, or one grid per linear name (per-linear settings;
    a linear mapped to None is kept in float: the loss uses its scaled float weight).
    ``heads=(n_heads, n_kv_heads)`` when the producer has fewer channels than the consumers
    read (GQA ``v_proj -> o_proj``): the scale is over the producer's channels and repeated
    over query heads. The group's weights are exactly restored before returning.
    """
    grids = weight if isinstance(weight, Mapping) else {n: weight for n in group.linears}
    stat = ChannelAbsMean()
    for x in xs:
        stat.update(x)
    device = next(iter(group.linears.values())).weight.device
    # data-parallel calibration: the mean over every rank's tokens (no-op on one rank); a
    # rank whose share sent no token here (an MoE expert) joins every reduction with zeros
    local = stat.mean() if stat.count else torch.zeros(consumer_width(group), device=device)
    s_x, _ = dist.weighted_mean(local, stat.count)
    s_w = None
    if version == "v1":  # over the quantized linears, each grouped by its own grid
        quantized = [(lin.weight, g) for n, lin in group.linears.items()
                     if (g := grids[n]) is not None]
        s_w = weight_salience([w for w, _ in quantized], [g.granularity for _, g in quantized])
    if heads is not None:
        s_x = reduce_to_kv(s_x, *heads)
        s_w = None if s_w is None else reduce_to_kv(s_w, *heads)
    refs = [group.run_inspect(x, kw) for x, kw in zip(xs, kwargs, strict=True)]
    n_el = float(dist.all_reduce_sum(torch.tensor(
        [float(sum(r.numel() for r in refs))], device=device))) \
        if dist.active() else sum(r.numel() for r in refs)
    exact = {n: lin.weight.data.clone() for n, lin in group.linears.items()}

    def loss(s: torch.Tensor) -> torch.Tensor:
        sc = expand_kv_scale(s, *heads) if heads is not None else s
        for n, lin in group.linears.items():
            scaled = exact[n].float() * sc
            g = grids[n]
            lin.weight.data.copy_(scaled if g is None else fake_quantize_weight(scaled, g))
        err = torch.zeros((), device=s.device, dtype=torch.float32)
        for x, kw, ref in zip(xs, kwargs, refs, strict=True):
            xq = (x.float() / sc).to(x.dtype)
            if act is not None:
                xq = fake_quantize_act(xq, act)
            err = err + (group.run_inspect(xq, kw).float() - ref.float()).pow(2).sum()
        # the mean over every batch (of every rank), compared only after all of them
        return dist.all_reduce_sum(err) / n_el

    try:
        return search_scale(s_x, loss, n_grid=n_grid, version=version, s_w=s_w)
    finally:
        for n, lin in group.linears.items():
            lin.weight.data.copy_(exact[n])


def _global_sum(n: int, device: torch.device) -> int:
    """``n`` summed over the data-parallel ranks (``n`` itself in one process)."""
    if not dist.active():
        return n
    return int(dist.all_reduce_sum(torch.tensor([float(n)], device=device)).item())


class Awq(Algorithm):
    """AWQ scale search and weight clipping (``quant.method: awq``; llmc ``Awq``).

    ``quant.special`` keys: see :class:`llmcq_awq.AwqSpecial`. Weight-only, or
    weight-activation (the search then fake-quantizes the scaled inputs dynamically).
    """

    special: AwqSpecial

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        sp = self.special
        assert self.weight is not None
        self.loaded_scales = load_artefact("scales", sp.scale_path or ".") \
            if sp.load_scale else None
        self.loaded_clips = load_artefact("clips", sp.clip_path or ".") \
            if sp.load_clip else None
        for save, kind, where in ((sp.save_scale, "scales", sp.scale_path),
                                  (sp.save_clip, "clips", sp.clip_path)):
            if save:  # fail before any block is processed
                check_writable(kind, where or ".", overwrite=self.run.resolved.overwrite)
        self.alphas: list[float] = []
        self.counts: Counter[str] = Counter()
        self.written: dict[str, str] = {}

    # ------------------------------------------------------------------ stages

    @torch.no_grad()
    def transform(self, block: Block, inputs: BlockInputs | None) -> None:
        sp = self.special
        scales: dict[str, torch.Tensor] = {}
        clips: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if sp.trans:
            for group in block.groups:
                scales.update(self._scale_group(block, group, inputs))
        if sp.weight_clip:
            for group in block.groups:
                clips.update(self._clip_group(block, group, inputs))
            if sp.clip_version == "v1":
                linears = block.linears()
                for name, (lo, hi) in clips.items():
                    w = linears[name].weight
                    spec = self.weight_of(block, name)
                    assert spec is not None  # float linears are not clipped
                    w.data.copy_(apply_clip(w.data, lo.to(w.device), hi.to(w.device), spec))
        # the typed hand-off: later steps read these through run.artefacts.for_block(...)
        store = self.run.artefacts
        store.publish("scales", {block.full_name(n): s.float() for n, s in scales.items()},
                      producer=PRODUCER)
        store.publish("clips", {block.full_name(n): (lo.float(), hi.float())
                                for n, (lo, hi) in clips.items()}, producer=PRODUCER)
        if block.index == len(self.run.adapter.blocks(self.run.model)) - 1:
            self._write()

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.counts)
        if self.alphas:
            out["alpha_mean"] = round(sum(self.alphas) / len(self.alphas), 4)
            out["alpha_counts"] = {f"{a:g}": c for a, c in sorted(Counter(self.alphas).items())}
        out.update(self.written)
        return out

    # ------------------------------------------------------------------ scales

    def _heads(self, block: Block, group: ResolvedGroup) -> tuple[int, int] | str | None:
        """None: plain fold; (heads, kv_heads): GQA fold; "skip": leave the group alone."""
        if group.spec.prev_kind != "linear":
            return None
        prev = group.prev_op
        assert isinstance(prev, nn.Linear)
        width = consumer_width(group)
        if prev.out_features == width:
            return None
        heads, kv = self.run.adapter.attention_heads(self.run.model)
        if kv < heads and heads % kv == 0 and prev.out_features * (heads // kv) == width:
            return (heads, kv) if self.special.do_gqa_trans else _SKIP
        raise PluginError(f"{group.spec.prev_op} has {prev.out_features} outputs but "
                          f"{', '.join(group.linears)} read {width} columns, and this is not "
                          f"grouped-query attention ({heads} heads, {kv} kv heads)",
                          where=block.name)

    def _search_act(self, block: Block, group: ResolvedGroup) -> ActQuantSpec | None:
        """The activation grid the scale search applies to the group's shared input: its
        first quantized linear's (llmc), dynamic (static scales are fixed by core after the
        transform: a dynamic per-tensor proxy of the same grid)."""
        name = next(n for n in group.linears if self.weight_of(block, n) is not None)
        act = self.act_of(block, name)
        return None if act is None else replace(act, static=False)

    def _scale_group(self, block: Block, group: ResolvedGroup,
                     inputs: BlockInputs | None) -> dict[str, torch.Tensor]:
        if group.spec.prev_kind == "none" or group.prev_op is None:
            return {}
        if all(self.weight_of(block, n) is None for n in group.linears):
            self.counts["groups_kept_float"] += 1  # nothing quantized to protect (llmc)
            return {}
        heads = self._heads(block, group)
        if heads == _SKIP:
            self.counts["groups_skipped_gqa"] += 1
            self.run.log.debug("%s: %s not scaled (grouped-query attention; set "
                               "do_gqa_trans: True)", block.name, ", ".join(group.linears))
            return {}
        assert heads is None or isinstance(heads, tuple)
        device = next(iter(group.linears.values())).weight.device
        if self.loaded_scales is not None:
            s = self._loaded_scale(block, group, heads)
            if s is None:
                return {}
            s = s.to(device)
        else:
            if inputs is None:
                raise PluginError("the scale search needs calibration inputs", where=block.name)
            first = next(iter(group.linears))
            xs = inputs.collect(block.module, {first: group.linears[first]},
                                stop_early=True)[first]
            kwargs = inputs.kwargs
            # an MoE expert sees only the batches that routed tokens to it; decided over
            # every rank, so all ranks skip or search (and reduce) together
            seen = _global_sum(len(xs), device)
            partial = _global_sum(int(len(xs) != len(kwargs)), device)
            if partial:
                if not seen:
                    self.counts["groups_skipped_no_tokens"] += 1
                    self.run.log.warning("%s: %s received no calibration tokens; not scaled",
                                         block.name, ", ".join(group.linears))
                    return {}
                if any(group.spec.inspect_flags):
                    raise PluginError(f"{', '.join(group.linears)} ran on {len(xs)} of "
                                      f"{len(kwargs)} calibration batches, and its inspect "
                                      "module needs the block's keyword inputs",
                                      where=block.name)
                kwargs = [{} for _ in xs]
            grids = {n: self.weight_of(block, n) for n in group.linears}
            res = search_group_scale(group, xs, kwargs, grids, self._search_act(block, group),
                                     n_grid=self.special.n_grid,
                                     version=self.special.trans_version, heads=heads)
            del xs
            s = res.scale
            self.alphas.append(res.alpha)
            self.run.log.debug("%s: %s alpha=%s loss %.4g (identity %.4g)", block.name,
                               ", ".join(group.linears), res.alpha,
                               float(res.losses[max(res.index, 0)]), float(res.losses[0]))
        n_heads, n_kv = heads if heads is not None else (None, None)
        fold_scale(group, s, n_heads=n_heads, n_kv_heads=n_kv)
        self.counts["groups_scaled"] += 1
        consumer = expand_kv_scale(s, *heads) if heads is not None else s
        return {name: consumer for name in group.linears}

    def _loaded_scale(self, block: Block, group: ResolvedGroup,
                      heads: tuple[int, int] | None) -> torch.Tensor | None:
        assert self.loaded_scales is not None
        source = str(artefact_path("scales", self.special.scale_path or "."))
        s = group_scale(block, group, self.loaded_scales, heads=heads, source=source)
        if s is None:
            if not any(k.startswith(block.name + ".") for k in self.loaded_scales):
                raise DataError(f"{source} has no scales for {block.name}: was it written for "
                                "this model?")
            self.counts["groups_not_in_scale_file"] += 1
        return s

    # ------------------------------------------------------------------ clipping

    def _clip_group(self, block: Block, group: ResolvedGroup, inputs: BlockInputs | None
                    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        names = [n for n in group.linears if not clip_skipped(block, n)
                 and self.weight_of(block, n) is not None]
        if not names:
            return {}
        if self.loaded_clips is not None:
            return {n: self._loaded_clip(block, n, group.linears[n]) for n in names}
        if inputs is None:
            raise PluginError("the clip search needs calibration inputs", where=block.name)
        x = self._clip_inputs(block, group, inputs)
        out = {}
        if x.shape[0] == 0:  # no rank's tokens reached it (an MoE expert): left unclipped
            self.counts["groups_unclipped_no_tokens"] += 1
            return out
        for n in names:
            lin = group.linears[n]
            spec = self.weight_of(block, n)
            assert spec is not None
            sym = spec.symmetric if self.special.clip_sym is None else self.special.clip_sym
            # more output rows per step on a GPU: the search is launch-bound there (the
            # rows are independent, so the result does not depend on the chunking)
            out[n] = search_clip(lin.weight.data, x, spec, n_tokens=x.shape[0],
                                 symmetric_clip=sym, rows_per_chunk=512 if x.is_cuda else 64)
            self.counts["linears_clipped"] += 1
        return out

    def _clip_inputs(self, block: Block, group: ResolvedGroup,
                     inputs: BlockInputs) -> torch.Tensor:
        """About ``calib.seq_len`` tokens of the group's input, evenly strided over every
        batch of every rank (llmc's ``n_sample_token``), without keeping the rest: the same
        tokens on every rank (gathered in rank order), the tokens one process keeps when
        there is one."""
        calib = self.run.config.calib
        n_tok = calib.seq_len if calib is not None else 512
        first = next(iter(group.linears))
        device = group.linears[first].weight.device
        total = int(dist.all_reduce_sum(torch.tensor([float(inputs.n_tokens)],
                                                     dtype=torch.float64, device=device))
                    .item()) if dist.active() else inputs.n_tokens
        sample = TokenSample(max(1, total // n_tok), limit=n_tok,
                             width=group.linears[first].in_features, device=device)
        inputs.observe(block.module, {first: group.linears[first]},
                       lambda _n, x, _y: sample.update(x), stop_early=True)
        return sample.reduce().value

    def _loaded_clip(self, block: Block, name: str,
                     lin: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.loaded_clips is not None
        source = artefact_path("clips", self.special.clip_path or ".")
        full = block.full_name(name)
        if full not in self.loaded_clips:
            raise DataError(f"{source} has no clip range for {full}: was it written for this "
                            "model?")
        lo, hi = self.loaded_clips[full]
        spec = self.weight_of(block, name)
        assert spec is not None
        gran = spec.granularity
        shape = (lin.out_features, n_groups(lin.in_features, gran)
                 if isinstance(gran, PerGroup) else 1)
        if tuple(lo.shape) != shape or tuple(hi.shape) != shape:
            raise DataError(f"{source}: {full} has ranges of shape {tuple(hi.shape)}, this "
                            f"run's {spec.describe()} needs {shape}")
        self.counts["linears_clipped"] += 1
        return lo.to(lin.weight.device), hi.to(lin.weight.device)

    # ------------------------------------------------------------------ outputs

    def _write(self) -> None:
        """Every block's scales / clips, as published, to core's artefact files (rank 0
        writes; every rank holds the same values)."""
        sp = self.special
        overwrite = self.run.resolved.overwrite
        for on, kind, where, key in ((sp.save_scale, "scales", sp.scale_path, "scale_file"),
                                     (sp.save_clip, "clips", sp.clip_path, "clip_file")):
            if not (on and where):
                continue
            if dist.is_main():
                self.run.artefacts.save(kind, where, overwrite=overwrite, producer=PRODUCER)
            path = artefact_path(kind, where)
            self.written[key] = str(path)
            self.run.log.info("AWQ %s written to %s", kind, path)
