"""RTN W8A8-FP8 (e4m3 weights per channel, e4m3 activations per token, dynamic) on the real
bundled SmolLM2-135M, on a short slice of wikitext2 (8 x 512 tokens).

Measured (plugins/backends/vllm/scripts/measure_fp8.py, same slice): float 30.641, FP8 W8A8
31.677 (+3.4%), FP8 weight-only 31.320 (+2.2%). The 2% the issue's brief suggested does not
hold on this small model: E4M3 keeps 3 mantissa bits, a relative rounding error of up to
2^-4 (RMS about 3.6%) on every weight, where int8 per channel errs by about 1% of a row's
RMS; weight-only FP8 alone costs 2.2%. Asserted: between +1% and +5% of float, so FP8 that
does nothing (or rounds to a finer grid than E4M3) fails the lower bound, a wrong scale or
an unsaturated grid the upper one; and the records hold E4M3 codes (float8 dtype, each row's
largest code exactly 448, at most 253 distinct values).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from llmcq import hookimpl
from llmcq.config.loader import resolve_config
from llmcq.pipeline.runner import run

pytestmark = pytest.mark.slow

FP8_W = {"quant_type": "float-quant", "bit": "e4m3", "symmetric": True,
         "granularity": "per_channel", "use_qtorch": True}
FP8_A = {"quant_type": "float-quant", "bit": "e4m3", "symmetric": True,
         "granularity": "per_token", "use_qtorch": True}


class KeepRecords:
    def __init__(self) -> None:
        self.records: dict[str, Any] = {}

    @hookimpl
    def llmcq_evaluate(self, run: Any, model: Any, position: str) -> list[dict[str, Any]]:
        if position == "fake_quant":
            self.records = dict(run.records)
        return []


@pytest.fixture(scope="module")
def result(smollm2_copy: Any, shared_data: Path,
           tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, KeepRecords]:
    model, tok = smollm2_copy()
    cfg = {"model": {"type": "llama"},
           "eval": {"eval_pos": ["pretrain", "fake_quant"], "name": "wikitext2",
                    "path": str(shared_data / "wikitext2" / "test.txt"), "seq_len": 512,
                    "num_samples": 8},
           "quant": {"method": "rtn", "weight": FP8_W, "act": FP8_A},
           "save": {"save_path": str(tmp_path_factory.mktemp("fp8"))}}
    keep = KeepRecords()
    res = run(resolve_config(cfg), progress=False, model=model, tokenizer=tok,
              extra_plugins=[keep])
    return res, keep


def test_rtn_w8a8_fp8_costs_one_to_five_percent(result: tuple[dict, KeepRecords]) -> None:
    res, _ = result
    fp = res["eval"]["pretrain"]["wikitext2"]["ppl"]
    fq = res["eval"]["fake_quant"]["wikitext2"]["ppl"]
    assert 1.01 < fq / fp < 1.05, (fp, fq)


def test_records_hold_e4m3_codes(result: tuple[dict, KeepRecords]) -> None:
    _, keep = result
    assert len(keep.records) == 30 * 7
    rec = keep.records["model.layers.5.mlp.down_proj"]
    assert rec.qweight.dtype == torch.float8_e4m3fn and rec.zero is None
    codes = rec.qweight.float()
    assert torch.equal(codes.abs().amax(dim=1), torch.full((codes.shape[0],), 448.0))
    assert max(row.unique().numel() for row in codes) <= 253
