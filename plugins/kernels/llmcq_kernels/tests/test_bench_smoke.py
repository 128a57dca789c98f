"""bench/gpu/kernels_speed.py runs with --smoke on the CPU (tiny shapes, reference path)
and writes the JSON the GPU session will read."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[4]


def test_kernels_speed_smoke(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location(
        "kernels_speed", REPO / "bench" / "gpu" / "kernels_speed.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "smoke.json"
    assert bench.main(["--smoke", "--iters", "1", "--warmup", "0", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["smoke"] and res["env"]["device"] == "cpu"
    impls = {r["impl"] for r in res["rows"]}
    assert impls == {"bf16", "int4_torch", "ours_w4", "ours_w2", "ours_mixed_w24",
                     "ours_w8a8", "ours_w4a8", "ours_w4a4", "int8_torch"}
    for r in res["rows"]:
        if r["impl"].startswith("ours"):
            assert "error" not in r, r
            assert r["ms"] > 0 and r["max_err"] <= 2.0**-6 * r["ref_max"], r
        if r["impl"] == "int8_torch" and "error" not in r:  # torch's CPU _int_mm, if any
            assert r["max_err"] <= 2.0**-6 * r["ref_max"], r


def test_kernels_speed_decode_smoke(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location(
        "kernels_speed", REPO / "bench" / "gpu" / "kernels_speed.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "decode.json"
    assert bench.main(["--smoke", "--decode-only", "--decode-tokens", "2",
                       "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["decode"]["rows"]
    assert [r["impl"] for r in rows] == ["bf16", "ours_w4", "ours_w2"]
    assert all(r.get("tokens_per_s", 0) > 0 for r in rows), rows


def test_kernels_speed_wa_only_smoke(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location(
        "kernels_speed", REPO / "bench" / "gpu" / "kernels_speed.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "wa.json"
    assert bench.main(["--smoke", "--wa-only", "--ms", "3", "--iters", "1", "--warmup", "0",
                       "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["impl"] for r in rows} == {"bf16", "ours_w8a8", "ours_w4a8", "ours_w4a4",
                                         "int8_torch"}
    assert {r["act_bits"] for r in rows if r["impl"] != "bf16"} == {8, 4}
