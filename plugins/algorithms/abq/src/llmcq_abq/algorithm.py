"""ABQ-LLM's driver: OmniQuant's (:class:`llmcq_omniquant.algorithm.OmniQuant`: LET
statistics in ``calibrate``, training on core's harness and folding in ``transform``, records
on the learned clipped grids in ``quantize``) with ABQ-LLM's training:

* the loss of :mod:`llmcq_abq.solver`: ``MSE - log |mean cos|`` against the float chain's
  target and (``aug_loss``) the float block on the quantized inputs, plus the bidirectional
  KL of the head-averaged attention maps (``attn_loss``). The quantized block's queries and
  keys are read by forward hooks on its ``q``/``k`` linears during the training forward; the
  float ones are recomputed every step from the float chain's input of the batch with the
  float parameters (the norm feeding them, then the two projections), so no map outlives its
  step;
* LET also on ``up_proj -> down_proj`` (the reference balances it in every Llama block);
* the rank-1 compensation ``W + a b^T`` of ``down_proj`` in the first and last blocks
  (``compensation_layers``), trained with the block (learning rate 1e-2, as the reference)
  and folded into the float weight after the LET fold, so ``quantize`` records an ordinary
  quantized linear of the compensated weight;
* bit balance: 2-bit asymmetric grids with 5 levels (codes 0..4, step range / 4) in training
  and in the records (``QuantizedLinear.levels``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from llmcq import dist, recon
from llmcq.errors import PluginError
from llmcq.pipeline.blockwise import Block, BlockInputs
from llmcq.quant.record import QuantizedLinear, make_record
from llmcq.quant.spec import WeightQuantSpec
from llmcq_abq import AbqSpecial, solver
from llmcq_omniquant import OmniQuantSpecial
from llmcq_omniquant import solver as omni
from llmcq_omniquant.algorithm import LetSite, OmniQuant, transformed_params

__all__ = ["ABQ", "AttentionProbe", "compensation_blocks", "DOWN_ROLES"]

log = logging.getLogger("llmcq.abq")
#: roles of the linears that get the rank-1 compensation
DOWN_ROLES = ("down",)


def compensation_blocks(n_blocks: int, first: int, last: int) -> list[int]:
    """Indices of the blocks whose down_proj is compensated: the first ``first`` and the
    last ``last`` (the reference: ``i <= 2 or i >= n - 4``)."""
    return [i for i in range(n_blocks) if i < first or i >= n_blocks - last]


class AttentionProbe:
    """The head-averaged attention maps of one block's training step: the quantized one from
    the ``q``/``k`` linears' outputs (forward hooks, while :meth:`hooks` is active), the float
    one recomputed from the float chain's input with the float parameters."""

    def __init__(self, block: Block, heads: tuple[int, int],
                 float_params: dict[str, torch.Tensor]) -> None:
        names = {kind: [n for n in block.linears() if (r := block.role(n)) is not None
                        and r.kind == kind] for kind in ("q", "k")}
        if len(names["q"]) != 1 or len(names["k"]) != 1:
            raise PluginError("ABQ-LLM's attention-map loss needs one query and one key "
                              f"projection (roles q, k); found {names}. Set attn_loss: False",
                              where=block.name)
        self.q, self.k = names["q"][0], names["k"][0]
        group = next(g for g in block.groups if self.q in g.linears)
        if self.k not in group.linears or group.spec.prev_kind == "linear" or \
                group.prev_op is None or group.spec.prev_op is None:
            raise PluginError("ABQ-LLM's attention-map loss recomputes the float queries and "
                              "keys from the norm that feeds both; this block's layout has "
                              "none. Set attn_loss: False", where=block.name)
        self.norm, self.norm_name = group.prev_op, group.spec.prev_op
        self.heads = heads
        attn = block.module.get_submodule(self.q.rsplit(".", 1)[0]) if "." in self.q else None
        scaling = getattr(attn, "scaling", None)
        self.scaling = float(scaling) if isinstance(scaling, (int, float)) else None
        self.params = float_params
        self.modules = {self.q: block.linears()[self.q], self.k: block.linears()[self.k]}
        self.seen: dict[str, torch.Tensor] = {}
        self.block_name = block.name

    @contextmanager
    def hooks(self) -> Iterator[None]:
        def grab(name: str) -> Any:
            def hook(_m: nn.Module, _args: Any, out: torch.Tensor) -> None:
                self.seen[name] = out
            return hook

        handles = [m.register_forward_hook(grab(n)) for n, m in self.modules.items()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            self.seen.clear()

    def _rotary(self, kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        pe = kwargs.get("position_embeddings")
        if not (isinstance(pe, tuple) and len(pe) == 2):
            raise PluginError("ABQ-LLM's attention-map loss needs the rotary position "
                              "embeddings among the block's inputs (Llama-style attention); "
                              "set attn_loss: False for this model", where=self.block_name)
        return pe[0], pe[1]

    def map(self, q: torch.Tensor, k: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        cos, sin = self._rotary(kwargs)
        n_heads, n_kv = self.heads
        return solver.attention_map(q, k, n_heads, n_kv, cos=cos, sin=sin,
                                    scaling=self.scaling)

    @torch.no_grad()
    def float_map(self, x: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        prefix = f"{self.norm_name}."
        own = {n: self.params[prefix + n] for n, _ in self.norm.named_parameters()}
        h = functional_call(self.norm, own, (x.float(),))
        q, k = (F.linear(h, self.params[f"{n}.weight"], self.params.get(f"{n}.bias"))
                for n in (self.q, self.k))
        return self.map(q, k, kwargs)

    def loss(self, batch: recon.Batch) -> torch.Tensor:
        """``KL(A_f || A_q) + KL(A_q || A_f)`` of the step's maps."""
        quantized = self.map(self.seen[self.q], self.seen[self.k], batch.kwargs)
        x = batch.float_hidden if batch.float_hidden is not None else batch.hidden
        return solver.kl_both_ways(self.float_map(x, batch.kwargs), quantized)


class ABQ(OmniQuant):
    """ABQ-LLM (Zeng et al., 2024, arXiv:2408.08554).

    ```yaml
    quant:
        method: ABQLLM
        weight: {bit: 4, symmetric: False, granularity: per_channel, calib_algo: learnable,
                 ste: True}
        act: {bit: 4, symmetric: False, granularity: per_token, ste: True}
        special: {lwc: True, let: True, lwc_lr: 0.01, let_lr: 0.005, alpha: 0.5, epochs: 10,
                  wd: 0, aug_loss: True, deactive_amp: True, compensation_layers: [3, 4]}
        quant_out: True
    ```
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.keep_float_inputs = self.abq.attn_loss
        self._comp: dict[int, dict[str, tuple[nn.Parameter, nn.Parameter]]] = {}
        self._comp_blocks: list[int] | None = None
        self._comp_done: list[int] = []
        self._attn_kl: list[float] = []

    def omniquant_settings(self, special: Any) -> OmniQuantSpecial:
        assert isinstance(special, AbqSpecial)
        self.abq: AbqSpecial = special
        return OmniQuantSpecial(lwc=special.lwc, let=special.let, lwc_lr=special.lwc_lr,
                                let_lr=special.let_lr, alpha=special.alpha,
                                deactive_amp=special.deactive_amp, epochs=special.epochs,
                                wd=special.wd, aug_loss=special.aug_loss,
                                smooth_up_down=special.let and special.smooth_up_down)

    def levels_of(self, spec: WeightQuantSpec) -> int | None:
        """The grid's levels when bit balance changes them: ``2^bits + 1`` for 2-bit
        asymmetric grids (the reference's ``qmax = 2^n`` at ``n <= 2``), else None."""
        if self.abq.bit_balance and spec.bits == 2 and not spec.symmetric:
            return 2**spec.bits + 1
        return None

    def quantize(self, block: Block, inputs: BlockInputs | None) -> dict[str, QuantizedLinear]:
        """OmniQuant's records on the learned clipped grids, with bit balance's levels."""
        factors = self.run.scratch(block.index).get("omniquant", {}).get("lwc", {})
        out = {}
        for name, lin in self.quantized_linears(block).items():
            spec = self.weight_of(block, name)
            assert spec is not None
            up, low = factors.get(name, (None, None))
            levels = self.levels_of(spec)
            q, qp = omni.lwc_quantize(lin.weight.data, spec, up, low, levels=levels)
            out[name] = make_record(q, qp, spec, bias=lin.bias, levels=levels)
        return out

    # ------------------------------------------------------------------ compensation

    def _compensated_here(self, block: Block) -> bool:
        if self._comp_blocks is None:
            first, last = self.abq.compensation_layers
            adapter = self.run.adapter
            assert adapter is not None
            n = len(adapter.blocks(self.run.model))
            self._comp_blocks = compensation_blocks(n, first, last)
        return block.index in self._comp_blocks

    def _compensation_params(self, block: Block
                             ) -> dict[str, tuple[nn.Parameter, nn.Parameter]]:
        """``a`` (zeros ``[out, 1]``) and ``b`` (ones ``[1, in]``) per quantized down_proj of
        a compensated block."""
        if not any(self.abq.compensation_layers) or not self._compensated_here(block):
            return {}
        out = {}
        for name, lin in self.quantized_linears(block).items():
            role = block.role(name)
            if role is None or role.kind not in DOWN_ROLES:
                continue
            dev = lin.weight.device
            out[name] = (nn.Parameter(torch.zeros(lin.out_features, 1, device=dev)),
                         nn.Parameter(torch.ones(1, lin.in_features, device=dev)))
        return out

    def after_fold(self, block: Block, state: dict[str, Any]) -> None:
        """Fold ``a b^T`` into the (LET-folded) float weight: the records quantize it."""
        comp = self._comp.pop(block.index, {})
        for name, (a, b) in comp.items():
            lin = block.linears()[name]
            w = lin.weight.data
            lin.weight.data = solver.compensated(w.float(), a.detach(), b.detach()).to(w.dtype)
        if comp:
            self._comp_done.append(block.index)

    # ------------------------------------------------------------------ training

    def _train(self, block: Block, inputs: BlockInputs, sites: list[LetSite],
               scales: dict[int, nn.Parameter], shifts: dict[int, nn.Parameter],
               factors: dict[str, tuple[nn.Parameter, nn.Parameter | None]],
               targets: recon.Targets) -> None:
        lwc = [p for up, low in factors.values() for p in (up, low) if p is not None]
        let = list(scales.values()) + list(shifts.values())
        comp = self._compensation_params(block)
        grids = {n: g for n, g in self.weights_of(block).items() if g is not None}
        heads = self._heads_of()
        ste = self._wste
        acts = self.acts_of(block)

        def params(base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            eff = transformed_params(base, sites, scales, shifts, heads)
            for name, (a, b) in comp.items():
                key = f"{name}.weight"
                eff[key] = solver.compensated(eff[key], a, b)
            for name, spec in grids.items():
                up, low = factors.get(name, (None, None))
                key = f"{name}.weight"
                eff[key] = omni.lwc_fake_quant(eff[key], spec, up, low, ste=ste,
                                               levels=self.levels_of(spec))
            return eff

        def truncate() -> None:  # LET scales stay away from 0 (the reference's truncation)
            for s in scales.values():
                s.copy_(omni.truncate_scale(s))

        probe = None
        if self.abq.attn_loss:
            fparams = block.float_params if block.float_params is not None else {
                n: p.detach().float() for n, p in block.module.named_parameters()}
            probe = AttentionProbe(block, heads, {n: p.float() for n, p in fparams.items()})
        kl_sum: torch.Tensor | None = None  # on the compute device: no host sync per step
        kl_n = [0]

        def loss(out: torch.Tensor, batch: recon.Batch) -> torch.Tensor:
            value = solver.target_loss(out, batch.target)
            if batch.aug is not None:
                value = value + solver.target_loss(out, batch.aug)
            if probe is not None:
                kl = probe.loss(batch)
                nonlocal kl_sum
                kl_sum = kl.detach() if kl_sum is None else kl_sum + kl.detach()
                kl_n[0] += 1
                value = value + kl
            return value

        comp_params = [t for pair in comp.values() for t in pair]
        with probe.hooks() if probe is not None else _nothing():
            result = recon.reconstruct(
                block, inputs, targets,
                [recon.ParamGroup(lwc, lr=self.sp.lwc_lr, name="lwc"),
                 recon.ParamGroup(let, lr=self.sp.let_lr, name="let"),
                 recon.ParamGroup(comp_params, lr=self.abq.compensation_lr,
                                  name="compensation")],
                settings=recon.ReconSettings(epochs=self.sp.epochs,
                                             amp=not self.sp.deactive_amp,
                                             weight_decay=self.sp.wd, optimizer="adamw"),
                params=params, loss=loss,
                act=recon.ActQuant(acts, ste=self._aste) if any(acts.values()) else None,
                before_step=truncate, progress=self.run.progress and dist.is_main(),
                desc=f"abq {block.name}")
        if comp:
            self._comp[block.index] = comp
        self._amp = result.amp
        if kl_sum is not None and kl_n[0]:
            self._attn_kl.append(float(kl_sum) / kl_n[0])
        if not result.losses:
            return
        if result.rolled_back:
            self._nonfinite.append(block.index)
        self._losses.append((result.first, result.last))
        log.info("%s: ABQ-LLM loss %.3g -> %.3g", block.name, result.first, result.last)

    def summary(self) -> dict[str, Any]:
        out = super().summary()
        out.update({
            "compensated_blocks": list(self._comp_done),
            "attn_loss": self.abq.attn_loss,
            # mean attention-map KL term over the training steps, per block
            "attn_kl": [float(f"{v:.4g}") for v in self._attn_kl],
        })
        return out


@contextmanager
def _nothing() -> Iterator[None]:
    yield
