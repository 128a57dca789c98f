"""Shared pieces of the GPU benchmarks: real-shaped random models, tokens, timing, JSON.

No weights can be downloaded on the device machine: models are built from transformers
configs (Llama-2-7B, Llama-3-8B, Llama-2-70B shapes, optionally with fewer blocks) with
random weights drawn on the GPU (normal, std 0.02, as transformers' initializer), then
moved to host memory, which is where llmcq's block loop expects them.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

SHAPES: dict[str, dict[str, Any]] = {
    # hidden, intermediate, heads, kv heads, layers, vocab (Llama-2 / Llama-3 configs)
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
               num_key_value_heads=32, num_hidden_layers=32, vocab_size=32000,
               max_position_embeddings=4096),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
               num_key_value_heads=8, num_hidden_layers=32, vocab_size=128256,
               max_position_embeddings=8192),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64,
                num_key_value_heads=8, num_hidden_layers=80, vocab_size=32000,
                max_position_embeddings=4096),
    # CPU smoke tests of these scripts
    "toy": dict(hidden_size=256, intermediate_size=512, num_attention_heads=4,
                num_key_value_heads=4, num_hidden_layers=2, vocab_size=512,
                max_position_embeddings=512),
}


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def llama_config(shape: str, layers: int | None = None) -> Any:
    from transformers import LlamaConfig

    kw = dict(SHAPES[shape])
    if layers is not None:
        kw["num_hidden_layers"] = layers
    cfg = LlamaConfig(**kw, rms_norm_eps=1e-5, tie_word_embeddings=False,
                      attn_implementation="sdpa")
    return cfg


@torch.no_grad()
def build_model(shape: str, layers: int | None = None, *, seed: int = 0,
                dtype: torch.dtype = torch.bfloat16, home: str = "cpu") -> Any:
    """A LlamaForCausalLM of ``shape`` with random weights, in ``home`` memory, eval mode."""
    from transformers import LlamaForCausalLM

    cfg = llama_config(shape, layers)
    build_on = device()
    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    model = model.to_empty(device=build_on)
    g = torch.Generator(device=build_on).manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() == 1:  # RMSNorm weights
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02, generator=g)
    # rotary inverse frequencies are a non-persistent buffer, left empty by ``to_empty``
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    model.model.rotary_emb = LlamaRotaryEmbedding(cfg).to(build_on)
    model.eval()
    model.config.use_cache = False
    return model.to(home)


def random_tokens(n: int, seq_len: int, vocab: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (seq_len,), generator=g) for _ in range(n)]


def text_tokens(path: Path, n: int, seq_len: int, vocab: int, seed: int) -> list[torch.Tensor]:
    """Windows of real text: the bytes of ``path`` mapped into the vocabulary (a tokenizer
    of the random model does not exist; real text keeps the id statistics of language)."""
    data = torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8).long()
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, data.numel() - seq_len - 1, (n,), generator=g)
    return [(data[s:s + seq_len] * 97 + 13) % vocab for s in starts.tolist()]


def batches(samples: list[torch.Tensor], bs: int) -> list[torch.Tensor]:
    return [torch.stack(samples[i:i + bs]) for i in range(0, len(samples), bs)]


@contextmanager
def timed(into: dict[str, float], key: str):
    sync()
    t0 = time.perf_counter()
    try:
        yield
    finally:
        sync()
        into[key] = round(time.perf_counter() - t0, 3)


def peak_reset() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_bytes() -> int | None:
    return int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None


def write_json(out: Path, name: str, obj: Any) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    print(f"[{name}] {json.dumps(obj, default=str)[:1500]}", flush=True)
    return path


def linear_flops_per_token(cfg: Any) -> float:
    """Multiply-adds x 2 of every decoder linear for one token, all blocks."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    kv = h * cfg.num_key_value_heads // cfg.num_attention_heads
    per_block = h * h * 2 + 2 * h * kv + 3 * h * i
    return 2.0 * per_block * cfg.num_hidden_layers


def attention_flops_per_token(cfg: Any, seq_len: int) -> float:
    """QK^T and PV with a causal mask (half the square), all blocks."""
    return 2.0 * 2 * cfg.hidden_size * seq_len / 2 * cfg.num_hidden_layers


def env_info() -> dict[str, Any]:
    import importlib.metadata as md

    out: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda}
    for n in ("transformers", "accelerate", "llmcompressor", "compressed-tensors", "datasets",
              "pyarrow", "llmcq"):
        try:
            out[n] = md.version(n)
        except md.PackageNotFoundError:
            out[n] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out.update(gpu=p.name, sms=p.multi_processor_count, gpu_mem=p.total_memory)
    out["cpus"] = os.cpu_count()
    return out


def block_out(out: Any) -> torch.Tensor:
    """A decoder block's hidden states (a tensor, or the first item of a tuple)."""
    return out[0] if isinstance(out, (tuple, list)) else out
