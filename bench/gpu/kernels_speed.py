"""Speed of llmcq-kernels' weight-only matmul (mixpack layout) against bf16 cuBLAS and
torch's int4 kernel, and of its weight-activation (WxAy, int8 tensor cores) matmul against
torch._int_mm, on the 7B Llama linear shapes (issue 16, "The kernels").

    python bench/gpu/kernels_speed.py --out bench/results/kernels_speed_h100.json
    python bench/gpu/kernels_speed.py --smoke --out /tmp/kernels_smoke.json   # CPU check

Rows: every (K x N) of 4096x4096 (q/k/v/o), 4096x11008 (gate/up), 11008x4096 (down), every
M of 1, 16, 256 tokens, for

* ``bf16``: ``torch.matmul(x, W.t())`` with a bf16 weight (cuBLAS);
* ``int4_torch``: ``torch.ops.aten._weight_int4pack_mm`` on the weight packed by
  ``_convert_weight_to_int4pack`` (g128, bf16 scales and zeros); its signature changed
  across torch versions, so every known form is tried and a failure is recorded as the
  row's ``error`` instead of stopping the run;
* ``ours_w4`` / ``ours_w2``: ``llmcq_kernels.triton_mm.kernel_linear`` on a random mixpack
  linear, W4A16 / W2A16 asymmetric g128 (random codes, scales and zeros), bf16
  activations; plus ``ours_mixed_w24``: groups of 2 and 4 bits drawn at random (bit map);
  each also checked against the reference path (``max_err``, float32 reference); the int4
  row is checked against the bf16 matmul of the same W4 weights (``max_err_vs_bf16``: a
  large value means this torch's int4 packing convention differs from the one assumed);
* ``ours_w8a8`` / ``ours_w4a8`` / ``ours_w4a4``: ``llmcq_kernels.triton_wa.wa_linear`` (per-
  token int8/int4 activations quantized in the kernel's prologue after a row-absmax pass,
  per-channel symmetric W8 / W4 weights, int8 tensor cores) on bf16 activations, checked
  against ``wa_layout.wa_reference`` on the float32 activations (``max_err``);
* ``int8_torch``: the same W8A8 op in torch: the per-token quantize (absmax, divide, round,
  clamp, int8), ``torch._int_mm`` on the pre-quantized int8 W8 weight, the float32 epilogue
  ``acc * s_x * s_w`` cast to bf16 (``_int_mm`` needs more than 16 rows: ``M <= 16`` is
  padded to 32 rows, ``m_padded``); checked against the same reference. ``--no-wa`` skips
  these four rows, ``--wa-only`` keeps only them and ``bf16``.

Timing: CUDA events around each call, ``--warmup`` calls first, then ``--iters`` timed
calls, each after the L2 cache is flushed (a 256 MB write) unless ``--no-flush`` (a 4096 x
4096 bf16 weight is 32 MB and would otherwise stay in the H100's 50 MB L2); the median is
reported, with ``speedup_vs_bf16`` per row. ``--tune`` also times ``candidate_configs(M)``
(tiles, split-K, warps) per row and keeps the best (the default's time stays as
``default_ms``); ``--shapes`` / ``--ms`` narrow the run. ``--decode`` (or
``--decode-only``) adds a whole-model greedy decode at batch 1 of a 7B-shaped Llama (random
weights), bf16 against W4 and W2 g128 KernelLinears, in tokens/s. ``--smoke`` runs tiny shapes on the CPU
(reference path, ``time.perf_counter``) so the script itself can be checked anywhere.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parents[2]
SHAPES_7B = [(4096, 4096), (4096, 11008), (11008, 4096)]  # (K = in, N = out)
MS = (1, 16, 256)
GROUP = 128


def _env(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(),
                            "device": device}
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as exc:  # noqa: BLE001
        info["triton"] = f"unavailable: {exc}"
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["sms"] = torch.cuda.get_device_properties(0).multi_processor_count
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                        capture_output=True, text=True).stdout.strip()
    except OSError:
        pass
    return info


class Timer:
    def __init__(self, device: str, warmup: int, iters: int, flush: bool) -> None:
        self.device, self.warmup, self.iters = device, warmup, iters
        self.cache = (torch.empty(256 << 20, dtype=torch.uint8, device=device)
                      if flush and device == "cuda" else None)

    def __call__(self, fn: Callable[[], Any]) -> float:
        """Median milliseconds per call."""
        for _ in range(self.warmup):
            fn()
        times = []
        if self.device == "cuda":
            torch.cuda.synchronize()
            for _ in range(self.iters):
                if self.cache is not None:
                    self.cache.zero_()
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
        else:
            for _ in range(self.iters):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


def int4_torch(w_codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
               group: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> x @ W^T`` through torch's int4 kernel, for unsigned 4-bit codes ``[N, K]``,
    scales/zeros ``[N, K / group]``: tries the known signatures (torch 2.2-2.4: int32
    codes ``[N, K]``; 2.5+: uint8 ``[N, K / 2]``, two codes a byte, high nibble first).
    torch's zero is ``(8 - z) * s`` on a grid centred at 8: ``w = (q - 8) * s + zero``."""
    n, k = w_codes.shape
    ops = torch.ops.aten
    sz = torch.stack([scale, (8 - zero.float()) * scale], dim=-1)  # [N, G, 2]
    sz = sz.transpose(0, 1).contiguous().to(torch.bfloat16)  # [G, N, 2]
    errors = []
    packed_u8 = ((w_codes[:, ::2] << 4) | w_codes[:, 1::2]).to(torch.uint8).contiguous()
    for weight in (packed_u8, w_codes.to(torch.int32).contiguous()):
        for tiles in (8, 4, 2):
            try:
                packed = ops._convert_weight_to_int4pack(weight, tiles)
                fn = lambda x, p=packed: ops._weight_int4pack_mm(x, p, group, sz)  # noqa: E731
                fn(torch.zeros(1, k, dtype=torch.bfloat16, device=w_codes.device))
                return fn
            except Exception as exc:  # noqa: BLE001 - the signature of this torch version
                errors.append(f"{weight.dtype} tiles {tiles}: {str(exc).splitlines()[0]}")
    raise RuntimeError("; ".join(errors))


def int8_torch(w8: torch.Tensor, scale: torch.Tensor
               ) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> Q_a8(x) @ W^T`` through ``torch._int_mm`` for signed int8 codes ``w8``
    ``[N, K]`` and per-channel float32 scales ``[N]``: llmcq's per-token A8 arithmetic
    (``absmax / 127``, floor 1e-8, round half to even, clamp) in torch ops."""
    wt = w8.contiguous().t()  # [K, N], column-major: the layout cuBLASLt's int8 GEMM takes

    def fn(x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        sx = (xf.abs().amax(1, keepdim=True) / 127.0).clamp(min=1e-8)
        xq = torch.round(xf / sx).clamp(-128, 127).to(torch.int8)
        m = xq.shape[0]
        if m <= 16:
            xq = torch.nn.functional.pad(xq, (0, 0, 0, 32 - m))
        acc = torch._int_mm(xq, wt)[:m]
        return (acc.float() * sx * scale).to(x.dtype)

    return fn


def wa_candidate_configs(m: int) -> list[dict[str, int]]:
    """Configurations ``--tune`` times for the WxAy kernel: the weight-only ones, plus
    ``tl.dot`` on a padded 16-row tile below 16 tokens, plus the quantize as a pass of its
    own (``PREQ``) on the tensor-core ones."""
    out = candidate_configs(m)
    out += [{**cfg, "PREQ": 1} for cfg in out if cfg["USE_DOT"]]
    if m < 16:
        for bn in (32, 64, 128):
            for bk in (64, 128):
                for split in (1, 2, 4, 8):
                    out.append({"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": bk,
                                "SPLIT_K": split, "USE_DOT": 1, "num_warps": 4})
    return out


def candidate_configs(m: int) -> list[dict[str, int]]:
    """Configurations ``--tune`` times for ``M`` tokens (besides the default)."""
    out = []
    if m < 16:
        bm = 1 << max(0, (m - 1).bit_length())
        for bn in (32, 64, 128):
            for bk in (64, 128, 256):
                if bm * bn * bk > 16384:
                    continue
                for split in (1, 2, 4, 8):
                    out.append({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk,
                                "SPLIT_K": split, "USE_DOT": 0})
    else:
        for bm in sorted({16, min(64, 1 << (m - 1).bit_length())}):
            for bn in (64, 128):
                for bk in (32, 64, 128):
                    for split in (1, 2):
                        for warps in (4, 8):
                            out.append({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk,
                                        "SPLIT_K": split, "USE_DOT": 1, "num_warps": warps})
    return out


def tune_row(row: dict[str, Any], timer: Any, configs: list[dict[str, int]],
             call: Any) -> None:
    """Time ``call(cfg)`` for every candidate config; keep the fastest in ``row`` (its
    default's time as ``default_ms``, every try as ``tuned``)."""
    tried = [{"config": row["config"], "ms": row["ms"]}]
    for cfg in configs:
        try:
            tried.append({"config": cfg, "ms": timer(lambda cfg=cfg: call(cfg))})
        except Exception as exc:  # noqa: BLE001
            tried.append({"config": cfg, "error": str(exc)[:300]})
    best = min((t for t in tried if "ms" in t), key=lambda t: t["ms"])
    row["default_ms"] = row["ms"]
    row["ms"], row["config"] = best["ms"], best["config"]
    row["tuned"] = tried


def run(args: argparse.Namespace) -> dict[str, Any]:
    from llmcq.quant.spec import ActQuantSpec
    from llmcq_kernels import triton_mm, triton_wa
    from llmcq_kernels.layout import repack
    from llmcq_kernels.reference import reference_linear
    from llmcq_kernels.synthetic import random_packed
    from llmcq_kernels.wa_layout import pack_wa, unpack_wa, wa_reference
    from llmcq_mixpack.dequant import dequantize
    from llmcq_mixpack.packing import unpack_codes

    device = "cpu" if args.smoke else "cuda"
    shapes = [(256, 128), (128, 256)] if args.smoke else SHAPES_7B
    ms = (1, 16) if args.smoke else MS
    if args.shapes:
        shapes = [tuple(int(v) for v in pair.split("x")) for pair in args.shapes.split(",")]
    if args.ms:
        ms = tuple(int(v) for v in args.ms.split(","))
    timer = Timer(device, args.warmup, args.iters, not args.no_flush)
    rows: list[dict[str, Any]] = []
    result = {"env": _env(device), "smoke": args.smoke, "tune": args.tune, "group_size": GROUP,
              "warmup": args.warmup, "iters": args.iters, "l2_flush": not args.no_flush,
              "activations": "bfloat16", "wa_weights": "per-channel symmetric",
              "wa_activations": "per-token symmetric, dynamic", "rows": rows}
    for k, n in shapes:
        packs = {"ours_w4": random_packed(n, k, 4, GROUP, seed=1),
                 "ours_w2": random_packed(n, k, 2, GROUP, seed=2),
                 "ours_mixed_w24": random_packed(n, k, (2, 4), GROUP, seed=3)}
        if args.wa_only:  # the bf16 baseline still uses the W4 weights' values
            packs = {"ours_w4": packs["ours_w4"]}
        p4 = packs["ours_w4"]
        w_bf16 = dequantize(p4).to(device, torch.bfloat16)
        int4_fn, int4_err = None, None
        if device == "cuda" and not args.wa_only:
            try:
                codes = unpack_codes(p4.streams, p4.bit_map(), (n, k), GROUP).to(torch.int32)
                assert p4.zero is not None
                int4_fn = int4_torch(codes.to(device), p4.scale.to(device),
                                     p4.zero.to(device), GROUP)
            except Exception as exc:  # noqa: BLE001
                int4_err = f"{type(exc).__name__}: {exc}"[:2000]
        else:
            int4_err = "CUDA only (smoke run)"
        kps = {} if args.wa_only else {name: repack(p) for name, p in packs.items()}
        if device == "cuda":
            from dataclasses import replace

            mv = lambda t: None if t is None else t.to(device)  # noqa: E731
            kps = {name: replace(kp, **{f: mv(getattr(kp, f)) for f in (
                "planes", "stream_base", "stream_words", "bits", "group_pos", "scale",
                "zero", "col_perm")}) for name, kp in kps.items()}
        wa: dict[str, tuple[Any, ActQuantSpec]] = {}
        int8_fn = None
        if not args.no_wa:
            w8 = pack_wa(random_packed(n, k, 8, None, symmetric=True, seed=4)).to(device)
            w4 = pack_wa(random_packed(n, k, 4, None, symmetric=True, seed=5)).to(device)
            wa = {"ours_w8a8": (w8, ActQuantSpec(8, True)),
                  "ours_w4a8": (w4, ActQuantSpec(8, True)),
                  "ours_w4a4": (w4, ActQuantSpec(4, True))}
            int8_fn = int8_torch(unpack_wa(w8).to(torch.int8), w8.scale)
        for m in ms:
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            base = timer(lambda: torch.matmul(x, w_bf16.t()))
            rows.append({"K": k, "N": n, "M": m, "impl": "bf16", "ms": base})
            if int4_fn is not None:
                try:
                    t = timer(lambda: int4_fn(x))
                    want = torch.matmul(x, w_bf16.t()).float()  # the same W4 weights
                    rows.append({"K": k, "N": n, "M": m, "impl": "int4_torch", "ms": t,
                                 "speedup_vs_bf16": base / t,
                                 "max_err_vs_bf16": float((int4_fn(x).float() - want)
                                                          .abs().max()),
                                 "ref_max": float(want.abs().max())})
                except Exception as exc:  # noqa: BLE001
                    rows.append({"K": k, "N": n, "M": m, "impl": "int4_torch",
                                 "error": str(exc)[:500]})
            elif not args.wa_only:
                rows.append({"K": k, "N": n, "M": m, "impl": "int4_torch", "error": int4_err})
            for name, kp in kps.items():
                row: dict[str, Any] = {"K": k, "N": n, "M": m, "impl": name}
                try:
                    if device == "cuda":
                        fn = lambda kp=kp: triton_mm.kernel_linear(x, kp)  # noqa: E731
                        row["config"] = triton_mm.choose_config(m, n, k)
                    else:  # the reference path KernelLinear takes on a CPU
                        fn = lambda p=packs[name]: reference_linear(x, p)  # noqa: E731
                    ref = reference_linear(x.float(), _on(packs[name], device)).float()
                    row["max_err"] = float((fn().float() - ref).abs().max())
                    row["ref_max"] = float(ref.abs().max())
                    row["ms"] = timer(fn)
                    if args.tune and device == "cuda":
                        tune_row(row, timer, candidate_configs(m),
                                 lambda cfg, kp=kp: triton_mm.kernel_linear(
                                     x, kp, config=cfg))
                    row["speedup_vs_bf16"] = base / row["ms"]
                except Exception as exc:  # noqa: BLE001
                    row["error"] = f"{type(exc).__name__}: {exc}"[:2000]
                    traceback.print_exc()
                rows.append(row)
            for name, (wp, act) in wa.items():
                row = {"K": k, "N": n, "M": m, "impl": name, "act_bits": act.bits}
                try:
                    if device == "cuda":
                        fn = lambda wp=wp, act=act: triton_wa.wa_linear(x, wp, act)  # noqa: E731
                        row["config"] = triton_wa.choose_config(m, n, wp.k_split)
                    else:  # the reference path WALinear takes on a CPU
                        fn = lambda wp=wp, act=act: wa_reference(x, wp, act)  # noqa: E731
                    ref = wa_reference(x.float(), wp, act)
                    row["max_err"] = float((fn().float() - ref).abs().max())
                    row["ref_max"] = float(ref.abs().max())
                    row["ms"] = timer(fn)
                    if args.tune and device == "cuda":
                        tune_row(row, timer, wa_candidate_configs(m),
                                 lambda cfg, wp=wp, act=act: triton_wa.wa_linear(
                                     x, wp, act, config=cfg))
                    row["speedup_vs_bf16"] = base / row["ms"]
                except Exception as exc:  # noqa: BLE001
                    row["error"] = f"{type(exc).__name__}: {exc}"[:2000]
                    traceback.print_exc()
                rows.append(row)
            if int8_fn is not None:
                row = {"K": k, "N": n, "M": m, "impl": "int8_torch", "act_bits": 8}
                if m <= 16:
                    row["m_padded"] = 32
                try:
                    ref = wa_reference(x.float(), wa["ours_w8a8"][0], ActQuantSpec(8, True))
                    row["max_err"] = float((int8_fn(x).float() - ref).abs().max())
                    row["ref_max"] = float(ref.abs().max())
                    row["ms"] = timer(lambda f=int8_fn: f(x))
                    row["speedup_vs_bf16"] = base / row["ms"]
                except Exception as exc:  # noqa: BLE001
                    row["error"] = f"{type(exc).__name__}: {exc}"[:2000]
                rows.append(row)
            print(json.dumps([r for r in rows if r["M"] == m and r["K"] == k
                              and r["N"] == n]), flush=True)
    return result


def decode(args: argparse.Namespace) -> dict[str, Any]:
    """Whole-model greedy decode at batch 1: a Llama of the 7B shape (random weights,
    bf16; ``--smoke``: a tiny one on the CPU) against the same model with every block
    linear a W4 / W2 g128 :class:`KernelLinear` (random codes; the lm_head stays bf16).
    Tokens/s over ``--decode-tokens`` new tokens after a prompt of 16, best of 3 runs."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from llmcq_kernels.module import KernelLinear
    from llmcq_kernels.synthetic import random_packed
    from llmcq.quant.fake import set_module

    device = "cpu" if args.smoke else "cuda"
    if args.smoke:
        cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)
    else:
        cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                          num_hidden_layers=32, num_attention_heads=32,
                          num_key_value_heads=32)
    n_new = args.decode_tokens or (4 if args.smoke else 128)
    prompt = torch.randint(0, cfg.vocab_size, (1, 16), device=device)
    out: dict[str, Any] = {"config": "llama-7b shape" if not args.smoke else "tiny",
                           "new_tokens": n_new, "prompt": 16, "rows": []}

    def tokens_per_s(model: Any) -> float:
        best = float("inf")
        for _ in range(3):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.no_grad():
                model.generate(prompt, max_new_tokens=n_new, min_new_tokens=n_new,
                               do_sample=False, pad_token_id=0)
            if device == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        return n_new / best

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    out["rows"].append({"impl": "bf16", "tokens_per_s": tokens_per_s(model)})
    names = [n for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")]
    for bits in (4, 2):
        packs: dict[tuple[int, int], Any] = {}
        for name in names:
            lin = model.get_submodule(name)
            key = (lin.out_features, lin.in_features)
            if key not in packs:  # one random linear per shape, its tensors copied per use
                packs[key] = random_packed(*key, bits, GROUP, seed=bits)
            set_module(model, name, KernelLinear(packs[key], None).to(device))
        try:
            row = {"impl": f"ours_w{bits}", "tokens_per_s": tokens_per_s(model)}
            row["speedup_vs_bf16"] = row["tokens_per_s"] / out["rows"][0]["tokens_per_s"]
        except Exception as exc:  # noqa: BLE001
            row = {"impl": f"ours_w{bits}", "error": f"{type(exc).__name__}: {exc}"[:2000]}
        out["rows"].append(row)
        print(json.dumps(row), flush=True)
    return out


def _on(p: Any, device: str) -> Any:
    from dataclasses import replace

    mv = lambda t: None if t is None else t.to(device)  # noqa: E731
    return replace(p, streams={b: s.to(device) for b, s in p.streams.items()},
                   group_bits=mv(p.group_bits), scale=mv(p.scale), zero=mv(p.zero),
                   col_perm=mv(p.col_perm))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="JSON file to write")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes on the CPU through the reference path")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--no-flush", action="store_true", help="do not flush L2 between calls")
    ap.add_argument("--tune", action="store_true",
                    help="also time candidate_configs(M) per row (CUDA; every config compiles "
                         "once: minutes) and report the best, with default_ms and the list")
    ap.add_argument("--shapes", default=None,
                    help="K x N pairs to run instead of the 7B ones, e.g. 4096x4096,11008x4096")
    ap.add_argument("--ms", default=None, help="token counts, e.g. 1,16")
    ap.add_argument("--no-wa", action="store_true",
                    help="skip the weight-activation rows (ours_w8a8, ours_w4a8, ours_w4a4, "
                         "int8_torch)")
    ap.add_argument("--wa-only", action="store_true",
                    help="only bf16 and the weight-activation rows")
    ap.add_argument("--decode", action="store_true",
                    help="also the whole-model batch-1 decode (7B shape, W4/W2 vs bf16)")
    ap.add_argument("--decode-only", action="store_true", help="only the decode section")
    ap.add_argument("--decode-tokens", type=int, default=None, help="new tokens (128)")
    args = ap.parse_args(argv)
    if args.warmup is None:
        args.warmup = 1 if args.smoke else 10
    if args.iters is None:
        args.iters = 3 if args.smoke else 50
    if args.wa_only and args.no_wa:
        ap.error("--wa-only and --no-wa exclude each other")
    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA device: run with --smoke on a CPU", file=sys.stderr)
        return 2
    result = run(args) if not args.decode_only else {"env": _env(
        "cpu" if args.smoke else "cuda"), "smoke": args.smoke, "rows": []}
    if args.decode or args.decode_only:
        result["decode"] = decode(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
