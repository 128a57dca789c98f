"""GPU benchmarks of issue 6, one section per process (each writes OUT/<section>.json).

    python bench/gpu/bench.py env      --out DIR
    python bench/gpu/bench.py floor    --out DIR --shape 7b
    python bench/gpu/bench.py ours     --out DIR --shape 7b --algo gptq [--layers N] [--profile]
    python bench/gpu/bench.py side     --out DIR --shape 7b --algo gptq --layers 8
    python bench/gpu/bench.py memory   --out DIR --shape 70b --depths 2,4,8
    python bench/gpu/bench.py evalspeed --out DIR --shape 7b --windows 32
    python bench/gpu/bench.py prune    --out DIR --shape 7b --layers 4 --mask 2:4
    python bench/gpu/bench.py rotate   --out DIR --shape 7b

Settings shared by every section (the issue's): W4 symmetric, groups of 128, bf16 random
weights of the named Llama shape, 128 calibration samples x 2048 tokens in batches of 8
(``--text FILE`` maps real text bytes into the vocabulary, otherwise random ids), the
lm_head kept in float. "ours" is llmcq's block loop (``quantize_model``: capture of the
first block's inputs, every block calibrated, quantized and advanced, records back to host
memory), timed end to end with the model already loaded in host memory.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

W4 = {"bit": 4, "symmetric": True, "granularity": "per_group", "group_size": 128}
#: llm-compressor's preset of the same grid (``--asym`` switches both to asymmetric grids,
#: where the two tools' grid formulas coincide: scale = (max - min) / 15)
PEER_SCHEME = {"scheme": "W4A16"}
SPECIAL = {
    # llmc's GPTQ defaults; static groups = llm-compressor's default "static" act-order
    "gptq": {"actorder": True, "static_groups": True, "percdamp": 0.01, "blocksize": 128,
             "true_sequential": True},
    # llmc's awq_w_only example: v2 scales over 20 points, then the clip search
    "awq": {"trans": True, "trans_version": "v2", "weight_clip": True, "n_grid": 20},
}


# --------------------------------------------------------------------------- llmcq runs


def _model_folder(model: Any) -> str:
    folder = Path(tempfile.mkdtemp(prefix="gpu6-model-"))
    model.config.save_pretrained(folder)
    model.config._name_or_path = str(folder)
    return str(folder)


def make_ctx(model: Any, algo: str, special: dict[str, Any] | None = None,
             seq_len: int = 2048, sections: dict[str, Any] | None = None) -> Any:
    """A RunContext for ``model`` (in host memory) as ``llmcq run`` would build it;
    ``sections`` replaces the quant section (e.g. ``{"sparse": {...}}`` for pruning only)."""
    from llmcq.config.loader import resolve_config
    from llmcq.pipeline.builtin import Builtin
    from llmcq.pipeline.context import RunContext
    from llmcq.pipeline.runner import _build_steps, pick_device
    from llmcq.plugins.manager import make_plugin_manager
    from llmcq.quant.spec import WeightQuantSpec

    folder = _model_folder(model)
    dummy = Path(folder) / "calib.txt"
    dummy.write_text("calibration batches are passed directly\n")
    raw = {"base": {"seed": 0, "device": "auto"}, "model": {"type": "llama", "path": folder},
           "quant": {"method": algo, "weight": dict(W4),
                     "special": dict(SPECIAL.get(algo, {}), **(special or {}))},
           "calib": {"name": "custom_txt", "path": str(dummy), "n_samples": 128,
                     "seq_len": seq_len, "bs": 8, "preproc": "random_truncate_txt"},
           "save": {"save_path": str(Path(folder) / "out"), "overwrite": True}}
    if algo == "rtn":
        raw["quant"].pop("special")
    if sections is not None:
        raw.pop("quant")
        raw.update(sections)
    if algo in ("tesseraq", "autoround"):  # trained on the quantized chain's inputs
        raw["quant"]["quant_out"] = True
    try:
        resolved = resolve_config(raw, overwrite=True)
    except Exception:
        raw["calib"].update(name="wikitext2", preproc="wikitext2_gptq")
        resolved = resolve_config(raw, overwrite=True)
    cfg = resolved.config
    ctx = RunContext(resolved=resolved, device=pick_device("auto"),
                     pm=make_plugin_manager(builtin=Builtin()), progress=False)
    if cfg.quant is not None and cfg.quant.weight is not None:
        ctx.weight = WeightQuantSpec.from_section(cfg.quant.weight)
    mspec = resolved.model[0]
    ctx.adapter = mspec.load_impl()(mspec, cfg.model)
    ctx.model = model
    _build_steps(ctx)
    return ctx


class Profile:
    """Inclusive wall time of named functions (synchronizing around each call)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._undo: list[tuple[Any, str, Any]] = []

    def wrap(self, owner: Any, attr: str, label: str | None = None) -> None:
        fn = getattr(owner, attr, None)
        if fn is None:
            return
        label = label or attr

        @functools.wraps(fn)
        def inner(*a: Any, **k: Any) -> Any:
            C.sync()
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                C.sync()
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - t
                self.calls[label] = self.calls.get(label, 0) + 1

        setattr(owner, attr, inner)
        self._undo.append((owner, attr, fn))

    def undo(self) -> None:
        for owner, attr, fn in reversed(self._undo):
            setattr(owner, attr, fn)
        self._undo.clear()

    def report(self) -> dict[str, Any]:
        return {k: {"s": round(v, 3), "calls": self.calls[k]}
                for k, v in sorted(self.seconds.items(), key=lambda kv: -kv[1])}


def profiled(algo: str) -> Profile:
    import llmcq.pipeline.engine as eng
    from llmcq.pipeline.blockwise import BlockInputs
    from llmcq.quant.record import QuantizedLinear

    p = Profile()
    p.wrap(eng, "capture_block_inputs")
    p.wrap(eng, "_check_records")
    p.wrap(BlockInputs, "advance")
    p.wrap(BlockInputs, "observe")
    p.wrap(QuantizedLinear, "to", "record.to(cpu)")
    p.wrap(torch.nn.Module, "to", "Module.to")
    if algo == "gptq":
        import llmcq_gptq.algorithm as ga
        import llmcq_gptq.solver as gs

        p.wrap(ga, "accumulate_hessian")
        p.wrap(ga, "gptq_quantize")
        p.wrap(gs, "inverse_cholesky")
    if algo == "awq":
        import llmcq_awq.algorithm as aa

        p.wrap(aa, "search_group_scale")
        p.wrap(aa, "search_clip")
        p.wrap(aa, "fold_scale")
        p.wrap(aa.Awq, "_clip_inputs")
        p.wrap(BlockInputs, "collect")
    import llmcq.pipeline.engine as eng2

    p.wrap(eng2, "rtn_records") if hasattr(eng2, "rtn_records") else None
    return p


def run_ours(model: Any, algo: str, calib: list[torch.Tensor], *, profile: bool = False,
             special: dict[str, Any] | None = None) -> dict[str, Any]:
    from llmcq.pipeline.engine import quantize_model

    ctx = make_ctx(model, algo, special)
    prof = profiled(algo) if profile else None
    C.peak_reset()
    t: dict[str, float] = {}
    try:
        with C.timed(t, "quantize"):
            quantize_model(ctx, calib)
    finally:
        if prof is not None:
            prof.undo()
    out = {"seconds": t["quantize"], "peak_gpu_bytes": C.peak_bytes(),
           "records": len(ctx.records),
           "summary": [s.algorithm.summary() for s in ctx.steps if s.algorithm]}
    if prof is not None:
        out["profile"] = prof.report()
    out["_ctx"] = ctx
    return out


# --------------------------------------------------------------------------- the peer


def _peer_tokenizer(folder: str) -> Any:
    from llmcq.testing.tiny_models import train_tokenizer

    tok = train_tokenizer(["the quick brown fox jumps over the lazy dog " * 50], vocab_size=300)
    tok.save_pretrained(folder)
    return tok


def run_peer(model: Any, algo: str, calib: list[torch.Tensor]) -> dict[str, Any]:
    """llm-compressor 0.14 ``oneshot`` (sequential pipeline, one layer on the GPU)."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier

    folder = _model_folder(model)
    tok = _peer_tokenizer(folder)
    ids = [row.tolist() for b in calib for row in b]  # batches -> samples
    ds = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(s) for s in ids]})
    if algo == "gptq":
        from llmcompressor.modifiers.gptq import GPTQModifier

        recipe = [GPTQModifier(scheme=PEER_SCHEME["scheme"], targets="Linear", ignore=["lm_head"])]
    else:
        try:
            from llmcompressor.modifiers.transform import AWQModifier
        except ImportError:
            from llmcompressor.modifiers.awq import AWQModifier
        recipe = [AWQModifier(n_grid=20, duo_scaling=True),
                  QuantizationModifier(scheme=PEER_SCHEME["scheme"], targets="Linear",
                                       ignore=["lm_head"])]
    C.peak_reset()
    t: dict[str, float] = {}
    with C.timed(t, "oneshot"):
        oneshot(model=model, processor=tok, recipe=recipe, dataset=ds,
                num_calibration_samples=len(ids), max_seq_length=len(ids[0]),
                shuffle_calibration_samples=False)
    return {"seconds": t["oneshot"], "peak_gpu_bytes": C.peak_bytes()}


@torch.no_grad()
def peer_weights(model: Any) -> dict[str, torch.Tensor]:
    """Every parameter as the peer's forward uses it (weights fake-quantized)."""
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    out: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is None or scheme.weights is None:
            continue
        w = module.weight.data
        out[f"{name}.weight"] = forward_quantize(module, w, "weight",
                                                 scheme.weights).detach().to("cpu").clone()
    for name, p in model.named_parameters():
        out.setdefault(name, p.detach().to("cpu").clone())
    return out


# --------------------------------------------------------------------------- errors


@torch.no_grad()
def output_errors(float_model: Any, variants: dict[str, Any], held: list[torch.Tensor]
                  ) -> dict[str, Any]:
    """Layer-output error of each quantized model on held-out tokens.

    ``block``: per decoder block, ``||B_q(h) - B(h)||^2 / ||B(h) - h||^2`` with ``h`` the
    float model's input of that block (the error relative to what the block adds),
    averaged over blocks; ``final``: the same at the final norm's output when each model
    runs end to end (error carried through every block).
    """
    dev = C.device()
    layers = {k: m.model.layers for k, m in {"float": float_model, **variants}.items()}
    n = len(layers["float"])
    emb, rot, norm = float_model.model.embed_tokens, float_model.model.rotary_emb, \
        float_model.model.norm
    for m in (emb, rot, norm):
        m.to(dev)
    ids = torch.stack(held).to(dev)
    h = emb(ids)
    pos = torch.arange(ids.shape[1], device=dev)[None]
    pe = rot(h, pos)
    ends = {k: h.clone() for k in variants}
    per_block: dict[str, list[float]] = {k: [] for k in variants}
    for i in range(n):
        fb = layers["float"][i].to(dev)
        ref = C.block_out(fb(h, position_embeddings=pe, position_ids=pos))
        delta = (ref.float() - h.float()).pow(2).sum()
        for k in variants:
            qb = layers[k][i].to(dev)
            out = C.block_out(qb(h, position_embeddings=pe, position_ids=pos))
            per_block[k].append(float((out.float() - ref.float()).pow(2).sum() / delta))
            ends[k] = C.block_out(qb(ends[k], position_embeddings=pe, position_ids=pos))
            qb.to("cpu")
        fb.to("cpu")
        h = ref
    final_ref = norm(h).float()
    res = {}
    for k in variants:
        fin = norm(ends[k]).float()
        res[k] = {"block_rel_mse_mean": sum(per_block[k]) / n,
                  "block_rel_mse": [round(x, 6) for x in per_block[k]],
                  "final_rel_mse": float((fin - final_ref).pow(2).sum() / final_ref.pow(2).sum())}
    for m in (emb, rot, norm):
        m.to("cpu")
    return res


def errors_or_trace(float_model: Any, variants: dict[str, Any], held: list[torch.Tensor]
                    ) -> dict[str, Any]:
    """:func:`output_errors`, or the failure and its trace (the timings stay reported)."""
    try:
        return output_errors(float_model, variants, held)
    except Exception as exc:  # noqa: BLE001
        return {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-3000:]}


def ours_quantized(model: Any, ctx: Any) -> Any:
    from llmcq.pipeline.engine import deploy_fake_quant

    deploy_fake_quant(model, ctx.records)
    return model


def rtn_model(model: Any) -> Any:
    ctx = make_ctx(model, "rtn")
    from llmcq.pipeline.engine import quantize_model

    quantize_model(ctx, None)
    return ours_quantized(model, ctx)


# --------------------------------------------------------------------------- sections


def sec_env(a: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = C.env_info()
    if not torch.cuda.is_available():
        return out
    dev = C.device()
    n = 8192
    x = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    y = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    for _ in range(3):
        x @ y
    times = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        x @ y
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    times.sort()
    out["bf16_matmul_tflops"] = round(2 * n**3 / times[len(times) // 2] / 1e12, 1)
    big = torch.empty(2 * 1024**3, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(big)
    dst.copy_(big)
    C.sync()
    t = time.perf_counter()
    for _ in range(5):
        dst.copy_(big)
    C.sync()
    out["d2d_copy_TBps"] = round(2 * big.numel() * 5 / (time.perf_counter() - t) / 1e12, 2)
    del big, dst
    # float32-output product of bf16 operands (the GPTQ Hessian path)
    a16 = torch.randn(16384, 4096, device=dev, dtype=torch.bfloat16)
    try:
        r = torch.mm(a16.T, a16, out_dtype=torch.float32)
        out["mm_out_dtype_f32"] = str(r.dtype)
        C.sync()
        t = time.perf_counter()
        for _ in range(10):
            torch.mm(a16.T, a16, out_dtype=torch.float32)
        C.sync()
        out["mm_out_dtype_tflops"] = round(2 * 16384 * 4096**2 * 10 /
                                           (time.perf_counter() - t) / 1e12, 1)
    except Exception as exc:  # noqa: BLE001
        out["mm_out_dtype_f32"] = f"unsupported: {exc}"
    a32 = a16.float()
    C.sync()
    t = time.perf_counter()
    for _ in range(10):
        a32.T @ a32
    C.sync()
    out["fp32_mm_tflops(tf32=%s)" % torch.backends.cuda.matmul.allow_tf32] = round(
        2 * 16384 * 4096**2 * 10 / (time.perf_counter() - t) / 1e12, 1)
    # host -> device copy of a 7B block from pageable memory (the block loop's move)
    blk = torch.empty(202 * 1024**2, dtype=torch.bfloat16)
    C.sync()
    t = time.perf_counter()
    g = blk.to(dev)
    C.sync()
    out["h2d_pageable_GBps"] = round(blk.numel() * 2 / (time.perf_counter() - t) / 1e9, 1)
    t = time.perf_counter()
    g.to("cpu")
    out["d2h_pageable_GBps"] = round(blk.numel() * 2 / (time.perf_counter() - t) / 1e9, 1)
    return out


def calib_tokens(a: argparse.Namespace, vocab: int) -> list[torch.Tensor]:
    if a.text:
        samples = C.text_tokens(Path(a.text), a.n_samples, a.seq_len, vocab, seed=0)
    else:
        samples = C.random_tokens(a.n_samples, a.seq_len, vocab, seed=0)
    return C.batches(samples, a.bs)


def held_tokens(a: argparse.Namespace, vocab: int) -> list[torch.Tensor]:
    if a.text:
        return C.text_tokens(Path(a.text), a.held, a.seq_len, vocab, seed=1)
    return C.random_tokens(a.held, a.seq_len, vocab, seed=1)


def floor_of(cfg: Any, tokens: int, seq_len: int, tflops: float, algo: str,
             n_grid: int = 20) -> dict[str, float]:
    """The least arithmetic each run must do, at the measured bf16 matmul rate.

    One forward of the calibration tokens through every block (each block's inputs must be
    computed); GPTQ adds ``2 d^2`` per token for each distinct linear input (4 Hessians per
    Llama block: q/k/v, o, gate/up, down); AWQ adds ``n_grid`` forwards of each group's
    inspect module (attention, o_proj, MLP, down_proj), i.e. ``n_grid`` block forwards.
    """
    fwd = (C.linear_flops_per_token(cfg) + C.attention_flops_per_token(cfg, seq_len)) * tokens
    h, i, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    extra = 0.0
    if algo == "gptq":
        extra = 2.0 * (3 * h * h + i * i) * tokens * L
    elif algo == "awq":
        extra = n_grid * fwd
    rate = tflops * 1e12
    return {"forward_s": round(fwd / rate, 2), "floor_seconds": round((fwd + extra) / rate, 2),
            "flop": fwd + extra}


def sec_floor(a: argparse.Namespace) -> dict[str, Any]:
    """Measured: one bf16 forward of the calibration tokens through the whole model on the
    GPU (no block moves, no hooks), and the analytic floors at the measured matmul rate."""
    model = C.build_model(a.shape, a.layers, home=str(C.device()))
    cfg = model.config
    calib = calib_tokens(a, cfg.vocab_size)
    tok = sum(int(b.numel()) for b in calib)
    dev = C.device()
    body = model.model
    with torch.no_grad():
        body(input_ids=calib[0].to(dev))  # warm-up
        t: dict[str, float] = {}
        with C.timed(t, "forward"):
            for b in calib:
                body(input_ids=b.to(dev))
    out = {"shape": a.shape, "layers": cfg.num_hidden_layers, "tokens": tok,
           "measured_forward_s": t["forward"], "peak_gpu_bytes": C.peak_bytes()}
    if a.tflops:
        for algo in ("gptq", "awq"):
            out[algo] = floor_of(cfg, tok, a.seq_len, a.tflops, algo)
    return out


def sec_ours(a: argparse.Namespace) -> dict[str, Any]:
    t: dict[str, float] = {}
    with C.timed(t, "load"):
        model = C.build_model(a.shape, a.layers)
    cfg = model.config
    calib = calib_tokens(a, cfg.vocab_size)
    res = run_ours(model, a.algo, calib, profile=a.profile)
    res.pop("_ctx")
    res.update(shape=a.shape, layers=cfg.num_hidden_layers, algo=a.algo, load_seconds=t["load"],
               tokens=sum(int(b.numel()) for b in calib), profiled=a.profile)
    if a.tflops:
        res.update(floor_of(cfg, res["tokens"], a.seq_len, a.tflops, a.algo))
    return res


def sec_side(a: argparse.Namespace) -> dict[str, Any]:
    """Ours and llm-compressor on the same model, tokens and grid; then output errors."""
    base = C.build_model(a.shape, a.layers)
    cfg = base.config
    calib = calib_tokens(a, cfg.vocab_size)
    held = held_tokens(a, cfg.vocab_size)
    out: dict[str, Any] = {"shape": a.shape, "layers": cfg.num_hidden_layers, "algo": a.algo,
                           "tokens": sum(int(b.numel()) for b in calib),
                           "held_out_tokens": a.held * a.seq_len}
    variants: dict[str, Any] = {}
    mine = copy.deepcopy(base)
    r = run_ours(mine, a.algo, calib, profile=a.profile)
    ctx = r.pop("_ctx")
    out["ours"] = r
    variants["llmcq"] = ours_quantized(mine, ctx)
    try:
        peer = copy.deepcopy(base)
        out["peer"] = run_peer(peer, a.algo, calib)
        w = peer_weights(peer)
        del peer
        pm = copy.deepcopy(base)
        missing = pm.load_state_dict(w, strict=False)
        out["peer"]["unloaded_keys"] = len(missing.unexpected_keys)
        variants["llm-compressor"] = pm
    except Exception as exc:  # noqa: BLE001
        out["peer"] = {"error": f"{type(exc).__name__}: {exc}",
                       "trace": traceback.format_exc()[-3000:]}
    variants["rtn"] = rtn_model(copy.deepcopy(base))
    out["errors"] = errors_or_trace(base, variants, held)
    if "seconds" in out.get("peer", {}):
        out["ratio"] = round(out["peer"]["seconds"] / out["ours"]["seconds"], 2)
    return out


def sec_memory(a: argparse.Namespace) -> dict[str, Any]:
    """Peak GPU memory of GPTQ on 2/4/8 blocks of the shape; per-block figures."""
    out: dict[str, Any] = {"shape": a.shape, "algo": a.algo, "runs": {}}
    for depth in [int(d) for d in a.depths.split(",")]:
        model = C.build_model(a.shape, depth)
        calib = calib_tokens(a, model.config.vocab_size)
        r = run_ours(model, a.algo, calib)
        r.pop("_ctx")
        out["runs"][str(depth)] = {"seconds": r["seconds"], "peak_gpu_bytes": r["peak_gpu_bytes"],
                                   "s_per_block": round(r["seconds"] / depth, 2)}
        print(depth, out["runs"][str(depth)], flush=True)
        del model
        C.write_json(Path(a.out), a.name or "memory", out)
    peaks = [v["peak_gpu_bytes"] or 0 for v in out["runs"].values()]
    out["flat"] = max(peaks) <= 1.05 * min(peaks)
    full = C.SHAPES[a.shape]["num_hidden_layers"]
    spb = [v["s_per_block"] for v in out["runs"].values()]
    out["extrapolated_full_depth"] = {
        "blocks": full, "peak_gpu_bytes": max(peaks),
        "seconds": round(max(spb) * full, 1),
        "how": "peak is flat in depth (one block + activations + one solve), so the full "
               "model's peak is the measured peak; time = slowest measured seconds/block x "
               "blocks; host memory holds the bf16 model (~2 bytes x parameters)"}
    return out


def sec_evalspeed(a: argparse.Namespace) -> dict[str, Any]:
    """Perplexity evaluation tokens/s: llmcq's evaluator vs a plain transformers loop, timed
    alternately ``--repeats`` times (median), so a slow moment falls on both."""
    import statistics

    from llmcq.eval.ppl import perplexity

    dev = C.device()
    model = C.build_model(a.shape, a.layers, home=str(dev))
    samples = held_tokens(argparse.Namespace(**{**vars(a), "held": a.windows}),
                          model.config.vocab_size)
    ids = torch.cat(samples)
    out: dict[str, Any] = {"shape": a.shape, "windows": a.windows, "seq_len": a.seq_len,
                           "repeats": a.repeats}
    times: dict[str, list[float]] = {"plain_transformers": [], "llmcq_bs1": [], "llmcq_bs4": []}
    ppl: dict[str, float] = {}
    with torch.no_grad():
        model(input_ids=samples[0][None].to(dev))  # warm-up
        for _ in range(a.repeats):
            t: dict[str, float] = {}
            with C.timed(t, "plain_transformers"):
                nll = 0.0
                for s in samples:
                    x = s[None].to(dev)
                    nll += float(model(input_ids=x, labels=x).loss)
            ppl["plain_transformers"] = float(torch.tensor(nll / len(samples)).exp())
            for bs in (1, 4):
                with C.timed(t, f"llmcq_bs{bs}"):
                    ppl[f"llmcq_bs{bs}"], _ = perplexity(model, ids, a.seq_len, bs=bs,
                                                         device=dev, progress=False)
            for k in times:
                times[k].append(t[k])
    for k, ts in times.items():
        med = statistics.median(ts)
        out[k] = {"seconds": ts, "median_s": med, "tokens_per_s": round(ids.numel() / med),
                  "ppl": ppl[k]}
    for bs in (1, 4):
        out[f"ratio_bs{bs}"] = round(out[f"llmcq_bs{bs}"]["tokens_per_s"] /
                                     out["plain_transformers"]["tokens_per_s"], 3)
    return out


def _linear_sparsity(model: Any) -> float:
    zeros = total = 0
    for m in model.model.layers.modules():
        if isinstance(m, torch.nn.Linear):
            zeros += int((m.weight == 0).sum())
            total += m.weight.numel()
    return zeros / max(total, 1)


def sec_prune(a: argparse.Namespace) -> dict[str, Any]:
    """SparseGPT (issue 18) on the shape: ours (``sparse`` section, each block calibrated on
    the pruned blocks' outputs) and llm-compressor's ``SparseGPTModifier`` on the same model,
    tokens and mask; seconds, peak GPU memory, measured sparsity, output errors."""
    from llmcq.pipeline.engine import quantize_model

    base = C.build_model(a.shape, a.layers)
    cfg = base.config
    calib = calib_tokens(a, cfg.vocab_size)
    held = held_tokens(a, cfg.vocab_size)
    nm = a.mask if ":" in a.mask else None
    weight = {"mask_structure": nm} if nm else {"sparsity": float(a.mask)}
    out: dict[str, Any] = {"shape": a.shape, "layers": cfg.num_hidden_layers, "mask": a.mask,
                           "tokens": sum(int(b.numel()) for b in calib),
                           "held_out_tokens": a.held * a.seq_len}
    mine = copy.deepcopy(base)
    ctx = make_ctx(mine, "sparsegpt", sections={"sparse": {
        "method": "SparseGPT", "weight": weight, "sparsity_out": True,
        "special": {"blocksize": 128, "percdamp": 0.01}}})
    C.peak_reset()
    t: dict[str, float] = {}
    with C.timed(t, "ours"):
        quantize_model(ctx, calib)
    out["ours"] = {"seconds": t["ours"], "peak_gpu_bytes": C.peak_bytes(),
                   "sparsity": _linear_sparsity(mine)}
    C.write_json(Path(a.out), (a.name or "prune") + "-partial", out)  # survives a timeout
    variants: dict[str, Any] = {"llmcq": mine}
    try:
        from datasets import Dataset
        from llmcompressor import oneshot
        from llmcompressor.modifiers.pruning import SparseGPTModifier

        peer = copy.deepcopy(base)
        folder = _model_folder(peer)
        tok = _peer_tokenizer(folder)
        ids = [row.tolist() for b in calib for row in b]
        ds = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids]})
        mod = SparseGPTModifier(sparsity=0.5 if nm else float(a.mask),
                                mask_structure=nm or "0:0", targets=["Linear"],
                                ignore=["re:.*lm_head"], block_size=128, dampening_frac=0.01)
        C.peak_reset()
        with C.timed(t, "peer"):
            oneshot(model=peer, processor=tok, recipe=[mod], dataset=ds,
                    num_calibration_samples=len(ids), max_seq_length=len(ids[0]),
                    shuffle_calibration_samples=False)
        out["peer"] = {"seconds": t["peer"], "peak_gpu_bytes": C.peak_bytes(),
                       "sparsity": _linear_sparsity(peer)}
        variants["llm-compressor"] = peer.to("cpu")
    except Exception as exc:  # noqa: BLE001
        out["peer"] = {"error": f"{type(exc).__name__}: {exc}",
                       "trace": traceback.format_exc()[-3000:]}
    out["errors"] = errors_or_trace(base, variants, held)
    if "seconds" in out.get("peer", {}):
        out["ratio"] = round(out["peer"]["seconds"] / out["ours"]["seconds"], 2)
    full = C.SHAPES[a.shape]["num_hidden_layers"]
    out["ours"]["extrapolated_full_depth_s"] = round(t["ours"] / cfg.num_hidden_layers * full, 1)
    return out


@torch.no_grad()
def _logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


def sec_rotate(a: argparse.Namespace) -> dict[str, Any]:
    """Offline rotations R1 + R2 (issue 17) on the whole shape on the GPU: ours (QuaRot's
    ``transform_model``: norm fusion, Hadamard R1 on the residual stream, R2 per head) and
    llm-compressor's ``SpinQuantModifier(rotations=[R1, R2], transform_type="hadamard")``;
    seconds, peak GPU memory, and how well each preserves the logits (float model, bf16)."""
    dev = C.device()
    out: dict[str, Any] = {"shape": a.shape}
    ids = C.random_tokens(1, 256, C.llama_config(a.shape, a.layers).vocab_size, seed=1)[0][None]
    ids = ids.to(dev)

    def preserved(model: Any, ref: torch.Tensor) -> dict[str, float]:
        got = _logits(model, ids)
        return {"logits_rel_err": float((got - ref).norm() / ref.norm()),
                "top1_agree": float((got.argmax(-1) == ref.argmax(-1)).float().mean())}

    t: dict[str, float] = {}
    model = C.build_model(a.shape, a.layers, home=str(dev))
    out["layers"] = model.config.num_hidden_layers
    ref = _logits(model, ids)
    try:
        ctx = make_ctx(model, "quarot", special={"rotate_mode": "hadamard",
                                                 "online_rotate": False})
        step = next(s for s in ctx.steps if s.algorithm is not None
                    and s.algorithm.implements("transform_model"))
        C.peak_reset()
        with C.timed(t, "ours"):
            step.algorithm.transform_model(model)
        out["ours"] = {"seconds": t["ours"], "peak_gpu_bytes": C.peak_bytes(),
                       "facts": {k: v for k, v in step.algorithm.summary().items()
                                 if k != "online"}, **preserved(model, ref)}
    except Exception as exc:  # noqa: BLE001
        out["ours"] = {"error": f"{type(exc).__name__}: {exc}",
                       "trace": traceback.format_exc()[-3000:]}
    del model
    torch.cuda.empty_cache()
    try:
        from datasets import Dataset
        from llmcompressor import oneshot
        from llmcompressor.modifiers.transform import SpinQuantModifier

        model = C.build_model(a.shape, a.layers, home=str(dev))
        folder = _model_folder(model)
        tok = _peer_tokenizer(folder)
        row = ids[0, :64].tolist()
        ds = Dataset.from_dict({"input_ids": [row], "attention_mask": [[1] * len(row)]})
        C.peak_reset()
        with C.timed(t, "peer"):
            oneshot(model=model, processor=tok, dataset=ds, num_calibration_samples=1,
                    max_seq_length=len(row), recipe=[SpinQuantModifier(
                        rotations=["R1", "R2"], transform_type="hadamard")])
        out["peer"] = {"seconds": t["peer"], "peak_gpu_bytes": C.peak_bytes(),
                       **preserved(model.to(dev), ref)}
    except Exception as exc:  # noqa: BLE001
        out["peer"] = {"error": f"{type(exc).__name__}: {exc}",
                       "trace": traceback.format_exc()[-3000:]}
    if "seconds" in out.get("peer", {}) and "seconds" in out.get("ours", {}):
        out["ratio"] = round(out["peer"]["seconds"] / out["ours"]["seconds"], 2)
    return out


def sec_sweep(a: argparse.Namespace) -> dict[str, Any]:
    """GPTQ's column sweep alone on the 7B linears' shapes: the Triton kernel vs the torch
    column loop (same H, same grid), and host<->GPU copy rates through the pinned buffer vs
    pageable copies."""
    from llmcq.pipeline.transfer import to_host, upload_module
    from llmcq.quant.spec import PerGroup, WeightQuantSpec
    from llmcq_gptq import triton_sweep
    from llmcq_gptq.solver import gptq_quantize

    dev = C.device()
    spec = WeightQuantSpec(bits=4, symmetric=True, granularity=PerGroup(128))
    g = torch.Generator(device=dev).manual_seed(0)
    out: dict[str, Any] = {"spec": "W4 sym g128, blocksize 128, float32 sweep"}
    for label, rows, cols in (("qkv 12288x4096", 12288, 4096), ("down 4096x11008", 4096, 11008)):
        x = torch.randn(4096, cols, device=dev, generator=g)
        H = 2 * x.T @ x / x.shape[0]
        W = torch.randn(rows, cols, device=dev, generator=g) * 0.02
        row: dict[str, Any] = {}
        for name, kern in (("kernel", True), ("loop", False)):
            gptq_quantize(W[:256], H, spec, kernel=kern)  # warm-up (compile)
            t: dict[str, float] = {}
            with C.timed(t, name):
                res = gptq_quantize(W, H, spec, kernel=kern, return_dequant=True)
            err = float(((W - res.w_hat) @ x[:1024].T).square().sum())
            row[name] = {"seconds": round(t[name], 3), "layer_error": err}
        row["speedup"] = round(row["loop"]["seconds"] / row["kernel"]["seconds"], 1)
        # launch shapes of the kernel: (rows per program, warps)
        real = triton_sweep.LAUNCH
        try:
            for launch in ((16, 4), (32, 4), (16, 2), (16, 1), (8, 1), (4, 1), (32, 1)):
                triton_sweep.LAUNCH = launch
                gptq_quantize(W[:256], H, spec, kernel=True)
                with C.timed(t, str(launch)):
                    gptq_quantize(W, H, spec, kernel=True)
                row.setdefault("launch_seconds", {})[str(launch)] = t[str(launch)]
        finally:
            triton_sweep.LAUNCH = real
        out[label] = row
        print(label, row, flush=True)
    # copies: one 7B block's worth of bf16 weights (405 MB)
    block = torch.nn.Linear(4096, 49_545, bias=False).to(torch.bfloat16)
    nbytes = block.weight.numel() * 2
    t = {}
    with C.timed(t, "pageable_up"):
        block.to(dev)
    block.to("cpu")
    upload_module(block, dev)  # the first call allocates the pinned buffer
    block.to("cpu")
    with C.timed(t, "pinned_up"):
        upload_module(block, dev)
    gw = block.weight.detach()
    with C.timed(t, "pageable_down"):
        gw.to("cpu")
    with C.timed(t, "pinned_down"):
        to_host(gw)
    out["copies_GBps"] = {k: round(nbytes / v / 1e9, 2) for k, v in t.items()}
    return out


def sec_dp(a: argparse.Namespace) -> dict[str, Any]:
    """Data-parallel GPTQ: run under ``torchrun --nproc-per-node N`` (or alone for N = 1).
    Every rank builds the same seeded model and tokens; ``quantize_model`` shards the
    batches and all-reduces the Hessians (NCCL). Rank 0 keeps the first two blocks' records
    in ``--keep`` for :func:`sec_dpcompare`."""
    from llmcq import dist

    dist.init_from_env()
    model = C.build_model(a.shape, a.layers)
    calib = calib_tokens(a, model.config.vocab_size)
    base = copy.deepcopy(model) if a.errors and dist.is_main() else None
    if dist.active():
        torch.distributed.barrier()  # every rank has built its model
    res = run_ours(model, a.algo, calib)
    ctx = res.pop("_ctx")
    res.update(world_size=dist.world_size(), rank=dist.rank(), shape=a.shape,
               layers=model.config.num_hidden_layers, algo=a.algo,
               tokens=sum(int(b.numel()) for b in calib))
    if base is not None:  # what the result is worth: output errors on held-out tokens
        held = held_tokens(a, model.config.vocab_size)
        res["errors"] = output_errors(base, {"llmcq": ours_quantized(model, ctx)},
                                      held)["llmcq"]
    if dist.is_main() and a.keep:
        keep = {k: (r.qweight, r.scale, r.zero) for k, r in ctx.records.items()
                if k.startswith(("model.layers.0.", "model.layers.1."))}
        torch.save(keep, Path(a.keep) / f"records-w{dist.world_size()}.pt")
    dist.shutdown()
    return res


def sec_dpcompare(a: argparse.Namespace) -> dict[str, Any]:
    """One GPU vs N GPUs: share of equal codes and the largest scale difference."""
    one = torch.load(Path(a.keep) / "records-w1.pt")
    out: dict[str, Any] = {}
    for f in sorted(Path(a.keep).glob("records-w*.pt")):
        if f.name == "records-w1.pt":
            continue
        other = torch.load(f)
        eq = tot = 0
        worst = 0.0
        for k, (q, s, _z) in one.items():
            q2, s2, _ = other[k]
            eq += int((q == q2).sum())
            tot += q.numel()
            worst = max(worst, float(((s - s2).abs() / s.abs().clamp_min(1e-12)).max()))
        out[f.stem] = {"linears": len(one), "codes_equal_share": eq / tot,
                       "max_rel_scale_diff": worst}
    return out


SECTIONS = {"dp": sec_dp, "dpcompare": sec_dpcompare, "sweep": sec_sweep, "env": sec_env, "floor": sec_floor, "ours": sec_ours, "side": sec_side,
            "memory": sec_memory, "evalspeed": sec_evalspeed,
            "prune": sec_prune, "rotate": sec_rotate}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("section", choices=sorted(SECTIONS))
    ap.add_argument("--out", required=True)
    ap.add_argument("--name", default=None, help="JSON file name (default: the section)")
    ap.add_argument("--shape", default="7b", choices=sorted(C.SHAPES))
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--algo", default="gptq", choices=("gptq", "awq", "rtn"))
    ap.add_argument("--n-samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--bs", type=int, default=8)
    ap.add_argument("--held", type=int, default=8, help="held-out samples for the errors")
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--text", default=None, help="real text file mapped into the vocabulary")
    ap.add_argument("--depths", default="2,4,8")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--keep", default=None, help="dp: folder for rank 0's records")
    ap.add_argument("--errors", action="store_true", help="dp: output errors on held-out")
    ap.add_argument("--asym", action="store_true", help="asymmetric W4 g128 (ours and peer)")
    ap.add_argument("--repeats", type=int, default=3, help="evalspeed: alternating timings")
    ap.add_argument("--mask", default="0.5", help="prune: sparsity (0.5) or N:M (2:4)")
    ap.add_argument("--tflops", type=float, default=None, help="measured bf16 matmul rate")
    a = ap.parse_args(argv)
    if a.asym:
        W4["symmetric"] = False
        PEER_SCHEME["scheme"] = "W4A16_ASYM"
    if a.tflops is None:
        env = Path(a.out) / "env.json"
        if env.exists():
            a.tflops = json.loads(env.read_text()).get("bf16_matmul_tflops")
    name = a.name or a.section
    if int(os.environ.get("RANK", "0")) > 0:  # torchrun: rank 0 writes the section's file
        name += f"-rank{os.environ['RANK']}"
    t = time.perf_counter()
    try:
        res = SECTIONS[a.section](a)
    except Exception as exc:  # noqa: BLE001
        res = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-4000:]}
    res["wall_s"] = round(time.perf_counter() - t, 1)
    res["weight"] = dict(W4, peer_scheme=PEER_SCHEME["scheme"])
    res["env"] = {k: v for k, v in C.env_info().items() if k in ("gpu", "torch", "transformers")}
    C.write_json(Path(a.out), name, res)
    return 0 if "error" not in res else 1


if __name__ == "__main__":
    raise SystemExit(main())
