"""Remove whole decoder blocks from a loaded model (layer pruning: ShortGPT).

The result is a smaller dense model that plain ``transformers`` builds from its own config:

* the blocks' ``ModuleList`` keeps the surviving blocks, in order;
* the (text) config's ``num_hidden_layers`` is the new depth, every per-layer list of the old
  length (``layer_types``, ``no_rope_layers``, ...) keeps the survivors' entries, index lists
  (``mlp_only_layers``) are renumbered and prefix counts (``first_k_dense_replace``,
  ``max_window_layers``: "the first k layers are ...") count the survivors below k;
* every block's modules are renumbered: a fresh model is built from the new config on the
  ``meta`` device (no memory) and each scalar attribute of a module (``layer_idx``, which the
  KV cache is indexed by, ``attention_type``, ``is_sliding``, model-level flags such as
  ``has_sliding_layers``) takes the value the fresh model has at the same module path; a
  surviving block whose children the fresh model builds differently (a dense block where the
  config now says MoE: a periodic pattern such as ``decoder_sparse_step`` that removal broke)
  is refused, naming the block.

So ``save_pretrained`` writes a folder that ``from_pretrained`` rebuilds into exactly the
in-process model.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from llmcq.errors import PluginError

__all__ = ["remove_blocks", "prune_config", "INDEX_LISTS", "PREFIX_COUNTS"]

log = logging.getLogger("llmcq")

#: config fields that list layer indices (renumbered, removed ones dropped)
INDEX_LISTS = ("mlp_only_layers",)
#: config fields meaning "the first k layers are of one kind" (k becomes the survivors < k)
PREFIX_COUNTS = ("first_k_dense_replace", "max_window_layers")
_SCALARS = (bool, int, float, str, type(None))


def _text_config(config: Any) -> Any:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def prune_config(config: Any, keep: Sequence[int], old_n: int) -> list[str]:
    """Update ``config``'s text config in place for the blocks ``keep`` (old indices, sorted)
    out of ``old_n``; returns the fields changed."""
    tc = _text_config(config)
    new_index = {old: new for new, old in enumerate(keep)}
    changed = ["num_hidden_layers"]
    for key, value in list(vars(tc).items()):
        if key.startswith("_") or key == "num_hidden_layers":
            continue
        if key in INDEX_LISTS and isinstance(value, (list, tuple)):
            setattr(tc, key, type(value)(new_index[i] for i in value if i in new_index))
            changed.append(key)
        elif key in PREFIX_COUNTS and isinstance(value, int) and not isinstance(value, bool):
            setattr(tc, key, sum(1 for i in keep if i < value))
            changed.append(key)
        elif isinstance(value, (list, tuple)) and len(value) == old_n:
            setattr(tc, key, type(value)(value[i] for i in keep))
            changed.append(key)
    tc.num_hidden_layers = len(keep)
    return changed


def _fresh_model(model: nn.Module) -> nn.Module | None:
    """The model ``type(model)`` builds from its (updated) config, on ``meta``."""
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    try:
        with torch.device("meta"):
            return type(model)(config)
    except Exception as exc:  # a class that cannot be built from its config alone
        log.warning("remove_blocks: could not rebuild %s from its config on the meta device "
                    "(%s: %s); only layer_idx attributes are renumbered",
                    type(model).__name__, type(exc).__name__, exc)
        return None


def _scalar_attrs(module: nn.Module) -> dict[str, Any]:
    return {k: v for k, v in vars(module).items()
            if not k.startswith("_") and k != "training" and isinstance(v, _SCALARS)}


def remove_blocks(model: nn.Module, blocks_path: str, remove: Sequence[int]) -> list[int]:
    """Delete the blocks ``remove`` (indices into ``model.get_submodule(blocks_path)``) and
    make the model what its updated config builds (see the module); returns the kept old
    indices in order."""
    blocks = model.get_submodule(blocks_path)
    old_n = len(blocks)
    drop = sorted(set(int(i) for i in remove))
    if any(i < 0 or i >= old_n for i in drop):
        raise PluginError(f"cannot remove blocks {drop}: the model has {old_n} blocks",
                          stage="remove_blocks")
    if len(drop) >= old_n:
        raise PluginError(f"cannot remove all {old_n} blocks", stage="remove_blocks")
    keep = [i for i in range(old_n) if i not in set(drop)]
    if not drop:
        return keep
    parent_name, _, leaf = blocks_path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, nn.ModuleList([blocks[i] for i in keep]))
    changed = prune_config(model.config, keep, old_n)
    # layer_idx first (the meta rebuild below refines everything else)
    for new, old in enumerate(keep):
        for mod in parent.get_submodule(leaf)[new].modules():
            if getattr(mod, "layer_idx", None) == old:
                mod.layer_idx = new
    fresh = _fresh_model(model)
    if fresh is not None:
        fresh_mods = dict(fresh.named_modules())
        prefix = f"{blocks_path}."
        for name, mod in model.named_modules():
            other = fresh_mods.get(name)
            if other is None:
                continue
            if name.startswith(prefix) and name.count(".") == blocks_path.count(".") + 2 \
                    and type(mod).__name__ != type(other).__name__:
                new = int(name[len(prefix):].split(".")[0])
                raise PluginError(
                    f"after removing blocks {drop}, the config builds {name} as "
                    f"{type(other).__name__}, but the surviving block {keep[new]} holds "
                    f"{type(mod).__name__}: a per-layer pattern of the config "
                    "(a periodic field) cannot describe the smaller model",
                    stage="remove_blocks", where=name)
            mine, theirs = _scalar_attrs(mod), _scalar_attrs(other)
            for key, value in theirs.items():
                if key in mine and mine[key] != value:
                    setattr(mod, key, value)
    log.info("removed blocks %s of %d (config fields updated: %s)", drop, old_n,
             ", ".join(changed))
    return keep
