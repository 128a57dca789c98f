"""Run a peer (reference) quantizer on the bundled model; write a dense fake-quantized HF folder.

Runs in the peers' venv (``bash bench/peers/setup.sh`` creates ``.venv-peers``). The output
folder loads with a plain ``AutoModelForCausalLM.from_pretrained`` (no quantization_config,
no compressed-tensors): every quantized linear holds the peer's dequantized weights, every
other tensor the peer's (e.g. SmoothQuant folds its scales into the RMSNorm weights). llmcq
then evaluates it like any checkpoint, so every row shares one evaluation.

    .venv-peers/bin/python bench/peers/run_peer.py --method gptq --bits 3 --group-size 64 \
        --asym --calib /tmp/calib.json --out /tmp/peer-gptq-w3g64

Methods (the decoder blocks' linears are quantized, the tied lm_head stays float):
  rtn          llm-compressor QuantizationModifier (min-max round-to-nearest; data-free)
  gptq         llm-compressor GPTQModifier (needs --calib)
  spinquant-gptq  llm-compressor SpinQuantModifier(rotations=["R1", "R2"],
               transform_type=--spin-type) then GPTQModifier as ``gptq`` (needs --calib): the
               embeddings untied, centred, the norms fused into the linears, R1 and R2 fused
               into the weights (no online hook is left: checked), so the dense folder holds
               the whole rotated model with an untied, float lm_head. Its "hadamard" type
               is Sylvester only (2^n): SmolLM2's hidden size 576 = 36 x 16 is refused
               ("Cannot construct deterministic hadamard of size != 2^n"), so the default
               is "random-hadamard" (its stored Hadamard 36 x Sylvester 16 times random
               signs, torch seed 0: a full-size R1 like ours); --spin-block 64 keeps
               "hadamard" with block-diagonal 64 x 64 rotations instead
  awq          llm-compressor AWQModifier + QuantizationModifier (needs --calib and a GPU)
  smoothquant  llm-compressor SmoothQuantModifier + QuantizationModifier (needs --calib)
  hqq          the hqq package's HQQLinear with its defaults (data-free, weight-only, asym)
  autoround    the auto-round package's AutoRound (SignRound; needs --calib; weight-only),
               float32 on the CPU (--ar-amp false), our calibration ids as its dataset

Activation quantization (``--act-bits``, per-token dynamic) cannot be stored in a dense
folder: it is recorded in ``peer_meta.json`` under ``activation`` with the exact formula, and
the evaluator applies it to the input of every decoder linear (see README.md).

Exit status: 0 done; 2 bad arguments or a setting the peer refuses (``status: refused``);
3 the peer cannot run on this machine (``status: not_runnable``, e.g. AWQ without a GPU).
In both failure cases ``--out`` holds only ``peer_meta.json`` saying why.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from export_model import ensure_exported  # noqa: E402

LLMC_METHODS = ("rtn", "gptq", "awq", "smoothquant", "spinquant-gptq")
METHODS = (*LLMC_METHODS, "hqq", "autoround")
NEEDS_CALIB = ("gptq", "awq", "smoothquant", "autoround", "spinquant-gptq")
#: methods whose output rotates the residual stream: lm_head is untied (and stays float)
ROTATES = ("spinquant-gptq",)
META = "peer_meta.json"


class PeerRefused(Exception):
    """A setting the peer itself rejects (exit 2)."""


class NotRunnable(Exception):
    """The peer cannot run on this machine (exit 3)."""


# --------------------------------------------------------------------------- arguments


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[1:]))
    ap.add_argument("--method", required=True, choices=METHODS)
    ap.add_argument("--bits", type=int, required=True, help="weight bits")
    ap.add_argument("--group-size", type=int, required=True,
                    help="weight group size along the input dimension; -1 = per channel")
    sym = ap.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", help="symmetric weights")
    sym.add_argument("--asym", dest="sym", action="store_false",
                     help="asymmetric weights (default)")
    ap.set_defaults(sym=False)
    ap.add_argument("--act-bits", type=int, default=None,
                    help="per-token dynamic activation quantization of every decoder "
                         "linear's input (llm-compressor methods only)")
    asym = ap.add_mutually_exclusive_group()
    asym.add_argument("--act-sym", dest="act_sym", action="store_true",
                      help="symmetric activations (default, as llm-compressor's W8A8 preset)")
    asym.add_argument("--act-asym", dest="act_sym", action="store_false",
                      help="asymmetric activations")
    ap.set_defaults(act_sym=True)
    ap.add_argument("--calib", type=Path, default=None,
                    help="JSON list of token-id lists (bench/peers/make_calib.py)")
    ap.add_argument("--out", type=Path, required=True, help="output folder (replaced)")
    ap.add_argument("--model", type=Path, default=None,
                    help="float HF folder (default: the bundled GGUF exported by "
                         "export_model.py to its cache folder)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    g = ap.add_argument_group("peer knobs (defaults are the peers' own)")
    g.add_argument("--spin-type", choices=("random-hadamard", "hadamard", "random-matrix"),
                   default="random-hadamard", help="spinquant-gptq: SpinQuantModifier's "
                   "transform_type (hadamard needs powers of two: see --spin-block)")
    g.add_argument("--spin-block", type=int, default=None,
                   help="spinquant-gptq: SpinQuantModifier's transform_block_size")
    g.add_argument("--actorder", choices=("static", "weight", "none"), default="static",
                   help="GPTQ activation ordering (llm-compressor default: static)")
    g.add_argument("--block-size", type=int, default=128, help="GPTQ block size")
    g.add_argument("--dampening-frac", type=float, default=0.01, help="GPTQ damping")
    g.add_argument("--sq-alpha", type=float, default=0.5,
                   help="SmoothQuant smoothing_strength (llm-compressor default 0.5)")
    g.add_argument("--awq-n-grid", type=int, default=20, help="AWQ grid points")
    g.add_argument("--awq-duo-scaling", choices=("true", "false", "both"), default="true")
    g.add_argument("--ar-iters", type=int, default=200, help="AutoRound iters per block")
    g.add_argument("--ar-lr", type=float, default=None,
                   help="AutoRound lr (default: the package's, 1/iters)")
    g.add_argument("--ar-minmax-lr", type=float, default=None,
                   help="AutoRound minmax_lr (default: the package's, lr)")
    g.add_argument("--ar-batch-size", type=int, default=8, help="AutoRound batch_size")
    g.add_argument("--ar-minmax-tuning", choices=("true", "false"), default="true",
                   help="AutoRound enable_minmax_tuning")
    g.add_argument("--ar-not-use-best-mse", choices=("true", "false"), default="false")
    g.add_argument("--ar-quanted-input", choices=("true", "false"), default="true",
                   help="AutoRound enable_quanted_input (llmcq: quant.quant_out)")
    g.add_argument("--ar-seed", type=int, default=42, help="AutoRound seed")
    g.add_argument("--ar-amp", choices=("true", "false"), default="false",
                   help="AutoRound amp; true casts the whole model to bfloat16 (also on the "
                        "CPU); default false: float32, as llmcq trains on the CPU")
    g.add_argument("--ar-device", default="cpu",
                   help="AutoRound device_map (cuda on the GPU machine)")
    g.add_argument("--ar-scale-dtype", choices=("fp16", "fp32"), default="fp16",
                   help="AutoRound scale_dtype (the package's default fp16)")
    args = ap.parse_args(argv)
    if args.method not in NEEDS_CALIB and args.calib is not None:
        print(f"run_peer: {args.method} is data-free; --calib is ignored", file=sys.stderr)
        args.calib = None
    if args.method in NEEDS_CALIB and args.calib is None:
        ap.error(f"--method {args.method} needs --calib")
    if not 1 <= args.bits <= 8:
        ap.error("--bits must be in 1..8")
    if args.group_size == 0 or args.group_size < -1:
        ap.error("--group-size must be positive or -1 (per channel)")
    if args.act_bits is not None and not 2 <= args.act_bits <= 8:
        ap.error("--act-bits must be in 2..8")
    return args


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    s: dict[str, Any] = {
        "method": args.method, "w_bits": args.bits, "w_group_size": args.group_size,
        "w_granularity": "per_channel" if args.group_size == -1 else "per_group",
        "w_symmetric": args.sym,
        "a_bits": args.act_bits,
        "a_symmetric": args.act_sym if args.act_bits is not None else None,
        "threads": args.threads,
    }
    if args.method in ("gptq", "spinquant-gptq"):
        s.update(actorder=args.actorder, block_size=args.block_size,
                 dampening_frac=args.dampening_frac)
    if args.method == "smoothquant":
        s.update(smoothing_strength=args.sq_alpha)
    if args.method == "spinquant-gptq":
        s.update(rotations=["R1", "R2"], transform_type=args.spin_type,
                 transform_block_size=args.spin_block)
    if args.method == "awq":
        s.update(n_grid=args.awq_n_grid, duo_scaling=args.awq_duo_scaling)
    if args.method == "autoround":
        s.update(autoround_settings(args))
    return s


# --------------------------------------------------------------------------- helpers


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "transformers", "llmcompressor", "compressed-tensors", "hqq",
                 "auto-round"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def decoder_linears(model: Any) -> dict[str, Any]:
    """``name -> nn.Linear`` for every linear inside the decoder blocks (not lm_head)."""
    import torch

    return {f"model.layers.{i}.{n}": m for i, layer in enumerate(model.model.layers)
            for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}


def check_group_size(model: Any, args: argparse.Namespace) -> None:
    """Refuse what the peer refuses (or would silently mis-group), before any work."""
    if args.group_size == -1 or args.method == "autoround":
        return  # auto-round pads a partial last group (as llmcq does)
    bad = sorted({int(m.in_features) for m in decoder_linears(model).values()
                  if m.in_features % args.group_size})
    if not bad:
        if args.method == "hqq" and args.group_size % 8:
            raise PeerRefused(f"hqq requires group_size to be a multiple of 8 "
                              f"(got {args.group_size})")
        return
    if args.method == "hqq":
        # hqq reshapes the whole matrix to (-1, group_size): a group would straddle two rows.
        raise PeerRefused(f"group_size {args.group_size} does not divide in_features {bad}: "
                          "hqq would form groups that straddle output rows")
    raise PeerRefused(f"llm-compressor refuses group_size {args.group_size}: it does not "
                      f"divide in_features {bad} (its group_size_validation errors at "
                      "initialize for columns % group_size != 0)")


def load_calib(path: Path) -> list[list[int]]:
    data = json.loads(path.read_text())
    if (not isinstance(data, list) or not data
            or not all(isinstance(s, list) and s and all(isinstance(t, int) for t in s)
                       for s in data)):
        raise SystemExit(f"run_peer: {path} must be a non-empty JSON list of token-id lists")
    return data


def distinct_per_group(w: Any, group_size: int) -> int:
    """Largest number of distinct values in one quantization group of ``w`` (out, in)."""
    import torch

    rows, cols = w.shape
    g = cols if group_size == -1 else group_size
    pad = (-cols) % g  # a partial last group (auto-round): repeat its last column
    if pad:
        w = torch.cat([w, w[:, -1:].expand(rows, pad)], dim=1)
    groups = w.reshape(rows, -1, g)
    s, _ = torch.sort(groups, dim=-1)
    return int(((s[..., 1:] != s[..., :-1]).sum(-1) + 1).max())


# --------------------------------------------------------------------------- activation fq


def activation_semantics(bits: int, symmetric: bool) -> dict[str, Any]:
    """What llm-compressor (compressed-tensors 0.19) does to a linear's input, per token."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return {
        "bits": bits, "symmetric": symmetric, "granularity": "per_token", "dynamic": True,
        "where": "input of every decoder-block nn.Linear (q,k,v,o,gate,up,down); "
                 "not lm_head, not the attention matmuls, no KV-cache quantization",
        "reduce": "min/max over the hidden (last) dimension of each token, separately per "
                  "batch row and position; then min = min(min, 0), max = max(max, 0)",
        "qrange": [qmin, qmax],
        "scale": (f"max(|min|, |max|) / ((2^{bits} - 1) / 2)  (= absmax / "
                  f"{(2 ** bits - 1) / 2}, NOT absmax / {qmax})") if symmetric else
                 f"(max - min) / (2^{bits} - 1)",
        "zero_point": "0" if symmetric else
                      f"round(clamp({qmin} - min / scale, {qmin}, {qmax})) (stored as int8)",
        "quantize": f"q = clamp(round(x / scale + zero_point), {qmin}, {qmax}); "
                    "round = torch.round (half to even)",
        "dequantize": "x_hat = (q - zero_point) * scale, in the activation dtype",
        "zero_scale": "a scale of exactly 0 becomes torch.finfo(dtype).eps",
        "llmcq_equivalent": (
            f"llmcq act quant: bit {bits}, symmetric {symmetric}, per-token dynamic, with "
            + ("the scale absmax / ((2^b - 1)/2) and the signed range [-2^(b-1), 2^(b-1)-1]; "
               "llmc's symmetric convention absmax / (2^(b-1) - 1) differs from it"
               if symmetric else
               "min/max widened to include 0 and an integer (rounded) zero point")),
    }


def act_fake_quant(x: Any, bits: int, symmetric: bool) -> Any:
    """Our own transcription of ``activation_semantics`` (checked against the peer)."""
    import torch

    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    mn = x.amin(dim=-1, keepdim=True).clamp(max=0)
    mx = x.amax(dim=-1, keepdim=True).clamp(min=0)
    if symmetric:
        scale = torch.maximum(mn.abs(), mx) / ((qmax - qmin) / 2)
        zp = torch.zeros_like(scale)
    else:
        scale = (mx - mn) / (qmax - qmin)
        zp = torch.round(torch.clamp(qmin - mn / scale, qmin, qmax))
    scale = torch.where(scale == 0, torch.finfo(x.dtype).eps, scale)
    q = torch.clamp(torch.round(x / scale + zp), qmin, qmax)
    return (q - zp) * scale


def add_act_hooks(model: Any, bits: int, symmetric: bool) -> list[Any]:
    return [m.register_forward_pre_hook(
        lambda _m, inp: (act_fake_quant(inp[0], bits, symmetric), *inp[1:]))
        for m in decoder_linears(model).values()]


# --------------------------------------------------------------------------- llm-compressor


def llmc_scheme(args: argparse.Namespace) -> Any:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    w = QuantizationArgs(num_bits=args.bits, type="int", symmetric=args.sym,
                         strategy="channel" if args.group_size == -1 else "group",
                         group_size=None if args.group_size == -1 else args.group_size)
    a = None
    if args.act_bits is not None:
        a = QuantizationArgs(num_bits=args.act_bits, type="int", symmetric=args.act_sym,
                             strategy="token", dynamic=True)
    return QuantizationScheme(targets=["Linear"], weights=w, input_activations=a)


def llmc_recipe(args: argparse.Namespace) -> list[Any]:
    from llmcompressor.modifiers.quantization import QuantizationModifier

    groups = {"group_0": llmc_scheme(args)}
    ignore = ["lm_head"]
    if args.method == "rtn":
        return [QuantizationModifier(config_groups=groups, ignore=ignore)]
    if args.method in ("gptq", "spinquant-gptq"):
        from llmcompressor.modifiers.gptq import GPTQModifier

        gptq = GPTQModifier(config_groups=groups, ignore=ignore, block_size=args.block_size,
                            dampening_frac=args.dampening_frac,
                            actorder=None if args.actorder == "none" else args.actorder)
        if args.method == "gptq":
            return [gptq]
        from llmcompressor.modifiers.transform import SpinQuantModifier

        return [SpinQuantModifier(rotations=["R1", "R2"], transform_type=args.spin_type,
                                  transform_block_size=args.spin_block), gptq]
    if args.method == "smoothquant":
        from llmcompressor.modifiers.transform import SmoothQuantModifier

        return [SmoothQuantModifier(smoothing_strength=args.sq_alpha),
                QuantizationModifier(config_groups=groups, ignore=ignore)]
    if args.method == "awq":
        from llmcompressor.modifiers.transform import AWQModifier

        duo: Any = {"true": True, "false": False, "both": "both"}[args.awq_duo_scaling]
        return [AWQModifier(n_grid=args.awq_n_grid, duo_scaling=duo),
                QuantizationModifier(config_groups=groups, ignore=ignore)]
    raise AssertionError(args.method)


def run_llmcompressor(args: argparse.Namespace, model: Any, tok: Any,
                      calib: list[list[int]] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """oneshot; returns (updated state tensors by name, extra meta)."""
    import torch
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize
    from llmcompressor import oneshot

    if args.method == "awq" and not torch.accelerator.is_available():
        raise NotRunnable(
            "llm-compressor 0.14's AWQ needs a GPU: its grid search pins the cached "
            "activations in host memory (IntermediatesCache.pin_memory), and on a CPU-only "
            "torch pin_memory raises 'Cannot access accelerator device when none is "
            "available'; REFERENCE.md measured that with this patched out it needs hours on "
            "2 CPU cores. Run it where torch.accelerator.is_available().")
    dataset = None
    kwargs: dict[str, Any] = {}
    if calib is not None:
        from datasets import Dataset

        dataset = Dataset.from_dict({"input_ids": calib,
                                     "attention_mask": [[1] * len(s) for s in calib]})
        kwargs.update(num_calibration_samples=len(calib), shuffle_calibration_samples=False,
                      max_seq_length=max(len(s) for s in calib), batch_size=1)
    # oneshot re-reads the config from model.config._name_or_path (the exported folder).
    oneshot(model=model, processor=tok, recipe=llmc_recipe(args), dataset=dataset,
            output_dir=None, **kwargs)

    extra: dict[str, Any] = {}
    if args.method in ROTATES:
        # R1/R2 are weight transforms, fused at calibration start; an input/output hook or a
        # parametrization left behind would not be in the dense folder: refuse it
        hooked = [n for n, m in model.named_modules()
                  if (m._forward_pre_hooks or m._forward_hooks) and n != ""
                  and getattr(m, "quantization_scheme", None) is None]
        params = [n for n, m in model.named_modules() if hasattr(m, "parametrizations")]
        if hooked or params:
            raise RuntimeError(f"{args.method}: online transforms left on {hooked[:4]} "
                               f"parametrizations on {params[:4]}: not a dense model")
        extra["rotation"] = {
            "online_hooks": 0, "tie_word_embeddings": bool(model.config.tie_word_embeddings),
            "lm_head_shares_embeddings": model.lm_head.weight.data_ptr()
            == model.model.embed_tokens.weight.data_ptr()}
    # The peer fake-quantizes at forward time; materialise exactly what its forward uses.
    updates: dict[str, Any] = {}
    quantized = []
    with torch.no_grad():
        for name, module in model.named_modules():
            scheme = getattr(module, "quantization_scheme", None)
            if scheme is None or scheme.weights is None:
                continue
            updates[f"{name}.weight"] = forward_quantize(
                module, module.weight.data, "weight", scheme.weights).detach().clone()
            quantized.append(name)
        for name, p in model.named_parameters():
            updates.setdefault(name, p.detach().clone())
    return updates, {"quantized_modules": quantized, **extra}


# --------------------------------------------------------------------------- hqq


def run_hqq(args: argparse.Namespace, model: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    import torch
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    if args.sym:
        raise PeerRefused("hqq is asymmetric by construction (a float zero per group)")
    if args.act_bits is not None:
        raise PeerRefused("hqq is weight-only")
    cfg = BaseQuantizeConfig(nbits=args.bits,
                             group_size=None if args.group_size == -1 else args.group_size)
    updates: dict[str, Any] = {}
    with torch.no_grad():
        for name, lin in decoder_linears(model).items():
            hq = HQQLinear(lin, quant_config=cfg, compute_dtype=torch.float32, device="cpu",
                           del_orig=False)
            w = hq.dequantize().reshape(lin.weight.shape).to(torch.float32)
            updates[f"{name}.weight"] = w.detach().clone()
            del hq
    wq = cfg["weight_quant_params"]
    import inspect

    from hqq.core.quantize import Quantizer

    solver = Quantizer.optimize_weights
    opt = inspect.signature(solver).parameters.get("opt_params")
    return updates, {"quantized_modules": sorted(n[: -len(".weight")] for n in updates),
                     "hqq_config": {k: (v if isinstance(v, (int, float, bool, str, type(None)))
                                        else str(v)) for k, v in wq.items()},
                     "hqq_optimizer": {"solver": getattr(solver, "__name__", str(solver)),
                                       "opt_params": None if opt is None else opt.default}}


# --------------------------------------------------------------------------- auto-round


def autoround_settings(args: argparse.Namespace) -> dict[str, Any]:
    """AutoRound's arguments as passed (None: the package derives it)."""
    return {"iters": args.ar_iters, "lr": args.ar_lr, "minmax_lr": args.ar_minmax_lr,
            "batch_size": args.ar_batch_size,
            "enable_minmax_tuning": args.ar_minmax_tuning == "true",
            "not_use_best_mse": args.ar_not_use_best_mse == "true",
            "enable_quanted_input": args.ar_quanted_input == "true",
            "seed": args.ar_seed, "amp": args.ar_amp == "true", "device": args.ar_device,
            "scale_dtype": args.ar_scale_dtype}


def check_autoround(args: argparse.Namespace, calib: list[list[int]] | None) -> None:
    """What run_peer refuses for auto-round, before any work."""
    if args.method != "autoround":
        return
    if args.act_bits is not None:
        raise PeerRefused("run_peer drives auto-round weight-only (as llmcq's autoround)")
    if not calib or len({len(s) for s in calib}) != 1:
        raise PeerRefused("auto-round skips samples shorter than its seqlen: give samples of "
                          "one length")


def run_autoround(args: argparse.Namespace, model: Any, tok: Any, calib: list[list[int]]
                  ) -> tuple[dict[str, Any], dict[str, Any]]:
    """auto-round's AutoRound (SignRound) on our calibration ids; the linears it quantizes
    end holding its dequantized weights (its ``unwrapper`` writes them), read back here."""
    import torch
    from auto_round import AutoRound
    from auto_round.algorithms.quantization.sign_round.config import SignRoundConfig
    from auto_round.schemes import QuantizationScheme

    check_autoround(args, calib)
    s = autoround_settings(args)
    scheme = QuantizationScheme.from_dict({
        "bits": args.bits, "sym": args.sym, "data_type": "int", "act_bits": 16,
        "group_size": -1 if args.group_size == -1 else args.group_size})
    config = SignRoundConfig(iters=s["iters"], lr=s["lr"], minmax_lr=s["minmax_lr"],
                             enable_minmax_tuning=s["enable_minmax_tuning"],
                             not_use_best_mse=s["not_use_best_mse"],
                             enable_quanted_input=s["enable_quanted_input"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # pre-tokenized samples, one [1, seqlen] tensor each: no dataset download, no text
    ar = AutoRound(model, tokenizer=tok, scheme=scheme, alg_configs=config,
                   dataset=[torch.tensor([ids]) for ids in calib], nsamples=len(calib),
                   seqlen=len(calib[0]), batch_size=s["batch_size"], seed=s["seed"],
                   amp=s["amp"], scale_dtype=s["scale_dtype"], enable_torch_compile=False,
                   device_map=s["device"], low_cpu_mem_usage=False)
    out = ar.quantize()
    qmodel = out[0] if isinstance(out, tuple) else out
    if qmodel is not model:
        raise RuntimeError("auto-round returned another model object")
    updates = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    linears = decoder_linears(model)
    quantized = sorted(n for n in linears if not torch.equal(updates[f"{n}.weight"],
                                                             before[f"{n}.weight"]))
    import importlib.metadata as md

    return updates, {"quantized_modules": quantized,
                     "autoround": {"version": md.version("auto-round"), **s,
                                   "resolved_lr": getattr(config, "lr", None),
                                   "resolved_minmax_lr": getattr(config, "minmax_lr", None),
                                   "dataset": "pre-tokenized calibration ids (--calib)"}}


# --------------------------------------------------------------------------- output


def write_dense(model_dir: Path, out_tmp: Path, updates: dict[str, Any], tok: Any,
                quantized: list[str], untie: bool = False) -> dict[str, Any]:
    """A fresh float model from ``model_dir`` with ``updates`` copied in, saved plainly;
    ``untie``: lm_head gets its own matrix first (rotated models) and the config says so."""
    import torch
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    if untie:
        base.lm_head.weight = torch.nn.Parameter(base.lm_head.weight.detach().clone())
        base.config.tie_word_embeddings = False
        if hasattr(base.config, "get_text_config"):
            base.config.get_text_config().tie_word_embeddings = False
    sd = base.state_dict()
    changed, dropped = [], []
    with torch.no_grad():
        for name, t in updates.items():
            if name not in sd:
                dropped.append(name)  # qparams (weight_scale, ...) the dense folder needs not
                continue
            if sd[name].shape != t.shape:
                raise RuntimeError(f"{name}: shape {tuple(t.shape)} != {tuple(sd[name].shape)}")
            if not torch.equal(sd[name], t.to(sd[name].dtype)):
                changed.append(name)
                sd[name].copy_(t)
    quant_weights = {f"{q}.weight" for q in quantized}
    base.save_pretrained(str(out_tmp))
    tok.save_pretrained(str(out_tmp))
    return {"changed_non_quantized": sorted(set(changed) - quant_weights),
            "dropped_peer_tensors": sorted({d.rsplit(".", 1)[-1] for d in dropped})}


def verify(out: Path, updates: dict[str, Any], quantized: list[str], args: argparse.Namespace,
           peer_model: Any | None, calib: list[list[int]] | None, tok: Any) -> dict[str, Any]:
    """Reload the folder plainly; check weights, grid sizes and (llm-compressor) logits."""
    import torch
    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert getattr(again.config, "quantization_config", None) is None
    sd = again.state_dict()
    max_distinct = 0
    for q in quantized:
        w = sd[f"{q}.weight"]
        if not torch.equal(w, updates[f"{q}.weight"]):
            raise RuntimeError(f"{q}.weight differs after reload")
        max_distinct = max(max_distinct, distinct_per_group(w, args.group_size))
    if max_distinct > 2 ** args.bits:
        raise RuntimeError(f"a group holds {max_distinct} distinct values > 2^{args.bits}")
    if args.method in ROTATES:
        if again.lm_head.weight.data_ptr() == again.model.embed_tokens.weight.data_ptr() or \
                not torch.equal(again.lm_head.weight, updates["lm_head.weight"]):
            raise RuntimeError("the rotated, untied lm_head did not reload as written")
    elif not torch.equal(again.lm_head.weight, again.model.embed_tokens.weight):
        raise RuntimeError("lm_head is no longer tied to the embeddings")
    res: dict[str, Any] = {"reloads": True, "quantized_linears": len(quantized),
                           "max_distinct_per_group": max_distinct}
    if args.method in ROTATES:
        res["lm_head_untied_float"] = True
    else:
        res["lm_head_tied_float"] = True
    if peer_model is not None:
        ids = torch.tensor([(calib[0] if calib else
                             tok("The capital of France is Paris, and")["input_ids"])[:128]])
        hooks = add_act_hooks(again, args.act_bits, args.act_sym) if args.act_bits else []
        with torch.no_grad():
            ours = again(ids).logits
            theirs = peer_model(ids).logits
        for h in hooks:
            h.remove()
        if hooks:  # the hooks must matter, or the comparison proves nothing
            with torch.no_grad():
                res["max_logit_diff_without_act_quant"] = float(
                    (again(ids).logits - theirs).abs().max())
        diff = float((ours - theirs).abs().max())
        res["max_logit_diff_vs_peer_forward"] = diff
        res["peer_forward_compared_with"] = ("dense folder + run_peer.act_fake_quant hooks"
                                             if args.act_bits else "dense folder")
        if not diff <= 1e-3 * max(1.0, float(theirs.abs().max())):
            raise RuntimeError(f"dense folder does not reproduce the peer's forward "
                               f"(max |logit diff| {diff})")
    return res


def write_meta(out: Path, meta: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / META).write_text(json.dumps(meta, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    load_at_start = round(os.getloadavg()[0], 2)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(max(1, args.threads))
    torch.manual_seed(0)
    meta: dict[str, Any] = {
        "peer": {"hqq": "hqq", "autoround": "auto-round"}.get(args.method, "llm-compressor"),
        "method": args.method, "settings": settings_of(args), "versions": versions(),
        "calib": None, "status": "running",
    }
    out = args.out.resolve()
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)

    def fail(status: str, reason: str, code: int) -> int:
        shutil.rmtree(tmp, ignore_errors=True)
        if out.exists():
            shutil.rmtree(out)
        meta.update(status=status, reason=reason,
                    wall_s={"total": round(time.perf_counter() - t_start, 2)},
                    peak_rss_bytes=peak_rss_bytes())
        write_meta(out, meta)
        print(f"run_peer: {status}: {reason}", file=sys.stderr)
        return code

    calib = load_calib(args.calib) if args.calib is not None else None
    if calib is not None:
        meta["calib"] = {"file": str(args.calib.resolve()), "samples": len(calib),
                         "tokens": sum(map(len, calib)),
                         "seq_lens": sorted({len(s) for s in calib})}
    model_dir = (args.model or ensure_exported()).resolve()
    meta["model"] = str(model_dir)

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    load_s = time.perf_counter() - t0
    try:
        check_group_size(model, args)
        check_autoround(args, calib)
        if args.method == "hqq" and (args.sym or args.act_bits is not None):
            run_hqq(args, model)  # raises PeerRefused
    except PeerRefused as exc:
        return fail("refused", str(exc), 2)

    t0, c0 = time.perf_counter(), cpu_seconds()
    try:
        if args.method == "hqq":
            updates, extra = run_hqq(args, model)
            peer_model = None
        elif args.method == "autoround":
            assert calib is not None
            updates, extra = run_autoround(args, model, tok, calib)
            peer_model = None  # its forward already uses the written weights
        else:
            updates, extra = run_llmcompressor(args, model, tok, calib)
            peer_model = model
    except NotRunnable as exc:
        return fail("not_runnable", str(exc), 3)
    quantize_s, quantize_cpu_s = time.perf_counter() - t0, cpu_seconds() - c0
    rss_after_quantize = peak_rss_bytes()

    t0 = time.perf_counter()
    tmp.mkdir(parents=True)
    quantized = extra["quantized_modules"]
    meta.update(extra)
    meta.update(write_dense(model_dir, tmp, updates, tok, quantized,
                            untie=args.method in ROTATES))
    write_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    meta["verify"] = verify(tmp, updates, quantized, args, peer_model, calib, tok)
    verify_s = time.perf_counter() - t0
    if args.act_bits is not None:
        meta["activation"] = activation_semantics(args.act_bits, args.act_sym)
        meta["activation_note"] = ("not stored in the weights: apply it at evaluation to the "
                                   "input of every decoder linear (see 'activation')")
    meta.update(status="ok", wall_s={"load": round(load_s, 2), "quantize": round(quantize_s, 2),
                                     "write": round(write_s, 2), "verify": round(verify_s, 2),
                                     "total": round(time.perf_counter() - t_start, 2)},
                cpu_s={"quantize": round(quantize_cpu_s, 2), "total": round(cpu_seconds(), 2)},
                loadavg_at_start=load_at_start,
                peak_rss_bytes=rss_after_quantize, peak_rss_bytes_incl_verify=peak_rss_bytes())
    (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    print(json.dumps({"out": str(out), "status": "ok", "wall_s": meta["wall_s"],
                      "max_distinct_per_group": meta["verify"]["max_distinct_per_group"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
