"""Export parity of AutoRound on the tiny Llama (2 blocks, hidden 64, intermediate 160): a short
run written with ``save_vllm`` (compressed-tensors pack-quantized: W4 g32 asymmetric, W8
per-channel symmetric) and ``save_fake``. The packed checkpoint decodes exactly to the
records' codes, scales and zero points (test_plumbing.py checks that the records are the
trained fake-quantized weights); reloaded by the real consumer stack (transformers +
compressed-tensors, dequantized on the CPU) it has the records' dequantized weights bit for
bit and the logits of llmcq's fake-quantized model, in-process and reloaded from save_fake,
within 1e-5 (the bound plugins/backends/vllm/tests/test_vllm_export.py sets for weight-only
RTN exports)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from llmcq.testing.export_parity import check_vllm_export

W4G32 = {"bit": 4, "symmetric": False, "granularity": "per_group", "group_size": 32}
W8CH = {"bit": 8, "symmetric": True, "granularity": "per_channel"}
SHORT = {"iters": 8, "lr": 0.05, "batch_size": 2}


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("weight", [W4G32, W8CH], ids=["w4g32-asym", "w8-channel-sym"])
def test_vllm_export_decodes_to_the_records_and_gives_the_fake_quant_logits(
        weight: dict[str, Any], tmp_path: Path, tiny_llama_dir: Path,
        shared_data: Path) -> None:
    check_vllm_export("autoround", SHORT, weight, tmp_path, tiny_llama_dir, shared_data)
