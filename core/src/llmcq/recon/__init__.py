"""Block reconstruction: train a few tensors per block so the quantized block reproduces the
float block's outputs. One harness for OmniQuant (LWC + LET), TesseraQ (rounding and scale
tuning), AutoRound (signed rounding offsets), SliM-LLM+ (LWC with per-group bits), ABQ-LLM
(LWC + LET with a distribution loss) and NormTweaking (norm weights).

The problem, per block ``B`` with learnable tensors ``theta``::

    min_theta  (1/N) sum_b  L( B(x_b; P_theta(W)),  B_float(x_f,b) )

``x_b`` are the block's calibration inputs (the quantized chain's under ``quant_out``),
``x_f,b`` the float chain's (:class:`FloatChain`), ``W`` the block's float parameters and
``P_theta`` the caller's map from them to what the training forward uses (fake-quantized,
transformed; straight-through rounding keeps it differentiable). ``L`` defaults to MSE; with
``aug_loss`` a second term against ``B_float(x_b)`` is added.

Usage (OmniQuant's, abridged)::

    from llmcq import recon

    chain = recon.FloatChain()                      # one per run: carries the float chain
    ...
    targets = chain.targets(block, inputs, quant_out=True, aug_loss=sp.aug_loss)

    def params(base):                               # base: {name: float32 tensor}
        eff = let_transform(base, scales)           # differentiable in the scales
        for name in block.linears():
            eff[f"{name}.weight"] = lwc_fake_quant(eff[f"{name}.weight"], up[name], ste=True)
        return eff

    result = recon.reconstruct(
        block, inputs, targets,
        [recon.ParamGroup(lwc_tensors, lr=1e-2), recon.ParamGroup(let_tensors, lr=5e-3)],
        settings=recon.ReconSettings(epochs=20, amp=not sp.deactive_amp, weight_decay=sp.wd),
        params=params,                              # P_theta
        act=recon.ActQuant(act_spec, ste=True),     # per-linear input fake quant (STE)
        before_step=truncate_scales)                # projections, under no_grad
    result.losses, result.rolled_back               # per-epoch mean loss; NaN rollback

What the harness owns (the plumbing); the maths (``params``, the loss) stays the caller's:

* **Schedule** (:class:`ReconSettings`): ``epochs`` passes over the batches in order, one
  AdamW/Adam step per batch; or ``iterations`` steps on ``batch_size`` samples drawn at
  random (seeded). AdamW, Adam or signed gradient descent (``signsgd``), or a factory;
  ``weight_decay`` per :class:`ParamGroup` or for all; a learning-rate schedule per call
  (``constant``, ``cosine``, ``linear``); optional gradient norm clipping; ``keep_best``
  ends with the tensors of the lowest step loss.
* **Forward**: ``torch.func.functional_call(block.module, params(base), (x,), kwargs)``:
  the module's own parameters are never written; they are frozen while training and their
  ``requires_grad`` flags restored afterwards. The learnable tensors end with
  ``requires_grad=False`` (fold or quantize them afterwards).
* **Activations** (:class:`ActQuant`): each linear's input fake-quantized per token (or
  group) with straight-through rounding (:func:`act_fake_quant`, the values of core's
  ``fake_quantize_act``), through forward pre-hooks; or a caller's quantizer.
* **AMP**: bfloat16 autocast on CUDA when ``amp`` (llmc's ``deactive_amp: False``),
  float32 otherwise; the loss is computed on float32 outputs.
* **Loss** (:mod:`llmcq.recon.losses`): ``loss(out, batch)`` with the :class:`Batch`
  (target, aug target, inputs, float inputs when kept, indices); :class:`TargetLoss` wraps a
  pairwise loss (MSE by default; ``aug="sum"`` as OmniQuant, ``"mean"`` as TesseraQ).
  :func:`kl_divergence` and :func:`neg_log_cosine` are there for distribution losses.
* **Non-finite losses**: the mean loss is read once per epoch (or per ``log_every``
  iterations); NaN/Inf restores the tensors of the previous epoch and stops the block.
* **Data parallel** (:mod:`llmcq.recon.dp`): under ``torchrun`` every step averages the
  gradients over the ranks (:func:`average_gradients`), so every rank takes the same step
  and ends with the same tensors; ranks with fewer batches join the reduction without a
  gradient. Logged losses are means over every rank's batches. ``W`` ranks with
  ``calib.bs`` b take the steps one process takes with ``calib.bs`` ``W * b`` (up to float
  rounding); a method that cannot agree across ranks calls :func:`refuse_data_parallel`.

Call :func:`reconstruct` as often as the method needs per block (TesseraQ: once per
hardening stage, each with a fresh optimizer).
"""

from __future__ import annotations

from llmcq.recon.dp import average_gradients, global_count, refuse_data_parallel, steps_per_epoch
from llmcq.recon.losses import TargetLoss, kl_divergence, mse, neg_log_cosine
from llmcq.recon.optim import SignSGD, lr_factor
from llmcq.recon.quant import act_fake_quant, act_quant_hooks, fake_quant_grouped
from llmcq.recon.settings import (ActQuant, Batch, BatchLoss, ParamGroup, ParamsFn,
                                  ReconResult, ReconSettings)
from llmcq.recon.targets import FloatChain, Targets
from llmcq.recon.train import float_kwargs, reconstruct

__all__ = ["reconstruct", "ReconSettings", "ParamGroup", "ActQuant", "Batch", "BatchLoss",
           "ParamsFn", "ReconResult", "FloatChain", "Targets", "TargetLoss", "mse",
           "neg_log_cosine", "kl_divergence", "act_fake_quant", "act_quant_hooks",
           "fake_quant_grouped", "float_kwargs", "average_gradients", "global_count",
           "steps_per_epoch", "refuse_data_parallel", "SignSGD", "lr_factor"]
