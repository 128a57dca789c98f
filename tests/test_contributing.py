"""CONTRIBUTING.md's examples run: the page's ``# file:`` blocks become packages (an
algorithm, a private model adapter, a backend, a hooks module) that are registered in
process and run together on the tiny Llama; its ``# example`` blocks are executed as
written. A newcomer's algorithm package stays under 50 lines."""

from __future__ import annotations

import importlib
import re
import sys
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from llmcq.config.describe import describe_spec
from llmcq.config.loader import resolve_config
from llmcq.errors import ConfigError
from llmcq.plugins import registry

PAGE = Path(__file__).resolve().parent.parent / "CONTRIBUTING.md"
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
GROUP_OF = {"AlgorithmSpec": "llmcq.algorithms", "ModelSpec": "llmcq.models",
            "BackendSpec": "llmcq.backends"}


def _blocks() -> list[tuple[str, str]]:
    return [(lang, body) for lang, body in BLOCK.findall(PAGE.read_text())]


def _files() -> dict[str, str]:
    out = {}
    for _lang, body in _blocks():
        first, _, rest = body.partition("\n")
        if first.startswith("# file: "):
            out[first.removeprefix("# file: ").strip()] = body
    return out


def _examples() -> list[str]:
    return [body for _lang, body in _blocks() if body.startswith("# example")]


@pytest.fixture
def page_packages(tmp_path: Path) -> dict[str, ModuleType]:
    """Write the page's packages, import them, register their specs in process."""
    files = _files()
    roots = set()
    for rel, body in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(body)
        roots.add(tmp_path / rel.split("/")[0])
    mods: dict[str, ModuleType] = {}
    for root in sorted(roots):
        sys.path.insert(0, str(root))
        for pkg in (p for p in root.iterdir() if (p / "__init__.py").is_file()):
            mods[pkg.name] = importlib.import_module(pkg.name)
    registered = []
    for name, mod in mods.items():
        spec = getattr(mod, "SPEC", None)
        if spec is None:
            continue
        group = next(g for cls, g in GROUP_OF.items()
                     if cls in [k.__name__ for k in type(spec).__mro__])
        registry.register(group, spec)
        registered.append((group, spec.name))
    yield mods
    for group, name in registered:
        registry.unregister(group, name)
    for root in roots:
        sys.path.remove(str(root))
    for name in mods:
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            sys.modules.pop(key)


def test_the_algorithm_package_is_small_and_its_entry_point_is_right(tmp_path: Path) -> None:
    files = {k: v for k, v in _files().items() if k.startswith("llmcq-pow2/")}
    assert set(files) == {"llmcq-pow2/pyproject.toml", "llmcq-pow2/llmcq_pow2/__init__.py"}
    lines = sum(len(body.rstrip("\n").splitlines()) for body in files.values())
    assert lines < 50, f"the example algorithm package has {lines} lines"
    meta = tomllib.loads(files["llmcq-pow2/pyproject.toml"])
    assert meta["project"]["entry-points"]["llmcq.algorithms"] == {"pow2": "llmcq_pow2:SPEC"}


def test_every_example_block_runs() -> None:
    examples = _examples()
    assert len(examples) >= 4
    for body in examples:
        exec(compile(body, "CONTRIBUTING.md", "exec"), {"__name__": "contributing_example"})


def test_the_page_packages_run_together(page_packages: dict[str, ModuleType],
                                        tiny_llama_dir: Path, tmp_path: Path) -> None:
    from llmcq.pipeline.runner import run
    from safetensors.torch import load_file

    pow2 = page_packages["llmcq_pow2"]
    keys = {k["key"]: k for k in describe_spec(pow2.SPEC)["keys"]}
    assert "round each scale up" in keys["rounding"]["doc"]
    cfg = {"base": {"seed": 0, "device": "cpu"},
           "model": {"type": "myfamily", "path": str(tiny_llama_dir)},
           "calib": {"name": "random", "n_samples": 2, "seq_len": 32},
           "quant": {"method": ["awq", "pow2"],
                     "weight": {"bit": 4, "symmetric": False, "granularity": "per_group",
                                "group_size": 32},
                     "special": {"awq": {"trans": True, "weight_clip": True},
                                 "pow2": {"rounding": "nearest"}}},
           "save": {"save_path": str(tmp_path / "o"), "save_fake": True, "backends": ["codes"]}}
    out = run(resolve_config(cfg), progress=False, extra_plugins=[page_packages["llmcq_card"]])
    codes = load_file(str(tmp_path / "o" / "codes_model" / "codes.safetensors"))
    scales = [v for k, v in codes.items() if k.endswith(".scale")]
    assert len(scales) == out["quantized_linears"] == 2 * 7
    for s in scales:  # the pow2 algorithm ran: every scale is a power of two
        assert torch.equal(torch.log2(s), torch.log2(s).round())
    for folder in ("codes_model", "fake_quant_model"):
        assert (tmp_path / "o" / folder / "MODEL_CARD.md").read_text().startswith("exported")
    assert out["compression"]["export_bytes"]["codes"] > 0
    # a tensor-wise grid is refused by the backend's own check, at config time
    cfg["quant"]["weight"] = {"bit": 4, "symmetric": True, "granularity": "per_tensor"}
    cfg["save"]["save_path"] = str(tmp_path / "o2")
    with pytest.raises(ConfigError) as err:
        resolve_config(cfg)
    assert err.value.path == "quant.weight.granularity" and "codes" in str(err.value)


def test_the_capability_example_refuses_as_the_page_says(tiny_llama_dir: Path,
                                                         tmp_path: Path) -> None:
    body = next(b for b in _examples() if "outlier_demo" in b)
    ns: dict[str, Any] = {"__name__": "contributing_example"}
    exec(compile(body, "CONTRIBUTING.md", "exec"), ns)
    registry.register("llmcq.algorithms", ns["SPEC"])
    try:
        cfg = {"model": {"type": "llama", "path": str(tiny_llama_dir)},
               "calib": {"name": "random", "n_samples": 2, "seq_len": 32},
               "quant": {"method": "outlier_demo", "special": {"keep": 4},
                         "weight": {"bit": 4, "symmetric": True, "granularity": "per_channel"}},
               "save": {"save_path": str(tmp_path / "o"), "save_vllm": True}}
        with pytest.raises(ConfigError) as err:
            resolve_config(cfg)
        msg = str(err.value)
        assert msg.startswith("quant.special.keep: backend vllm (save.save_vllm)")
        assert "outlier_demo produces" in msg and "set keep: 0" in msg
        assert msg.endswith("allowed: vllm writes: act_quant, float_format, float_linears, "
                            "kv_cache_quant, layer_grids, sparsity_mask")
        cfg["save"] = {"save_path": str(tmp_path / "o"), "save_fake": True}
        resolve_config(cfg)
    finally:
        registry.unregister("llmcq.algorithms", "outlier_demo")
