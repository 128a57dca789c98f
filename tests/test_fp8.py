"""FP8 (E4M3) grids: the maths against closed forms, the config rules (llmc's
``quant_type: float-quant``), the record, and an RTN W8A8-FP8 run through ``llmcq run``."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from llmcq.config.loader import resolve_config
from llmcq.errors import ConfigError
from llmcq.quant.clip import search_clip
from llmcq.quant.fake import ActRangeObserver
from llmcq.quant.qparams import (
    fake_quantize_act,
    fake_quantize_weight,
    float_codes,
    grid_qparams,
    group_view,
    minmax_qparams,
    quantize_weight,
)
from llmcq.quant.record import make_record
from llmcq.quant.spec import ActQuantSpec, PerChannel, PerTensor, PerToken, WeightQuantSpec

W_CH = WeightQuantSpec(bits=8, symmetric=True, granularity=PerChannel(), fmt="e4m3")
W_T = WeightQuantSpec(bits=8, symmetric=True, granularity=PerTensor(), fmt="e4m3")
A_TOK = ActQuantSpec(bits=8, symmetric=True, granularity=PerToken(), fmt="e4m3")
A_TEN = ActQuantSpec(bits=8, symmetric=True, granularity=PerTensor(), fmt="e4m3")

FP8_W = {"quant_type": "float-quant", "bit": "e4m3", "symmetric": True,
         "granularity": "per_channel", "use_qtorch": True}
FP8_A = {"quant_type": "float-quant", "bit": "e4m3", "symmetric": True,
         "granularity": "per_token", "use_qtorch": True}


def e4m3_grid() -> torch.Tensor:
    """Every finite E4M3 (fn) value, from the format's definition (bias 7, no infinities,
    exponent 15 with mantissa 7 is NaN): subnormals m/8 * 2^-6, normals (1 + m/8) 2^(e-7)."""
    pos = {m / 8 * 2.0**-6 for m in range(8)}
    pos |= {(1 + m / 8) * 2.0 ** (e - 7) for e, m in itertools.product(range(1, 16), range(8))
            if (e, m) != (15, 7)}
    vals = sorted(pos | {-v for v in pos})
    return torch.tensor(vals, dtype=torch.float64)


def nearest_on_grid(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    d = (x.double().reshape(-1, 1) - grid.reshape(1, -1)).abs()
    return grid[d.argmin(dim=1)].reshape(x.shape)


# --------------------------------------------------------------------------- maths

def test_grid_is_the_e4m3_format_and_its_values_round_trip_exactly() -> None:
    grid = e4m3_grid()
    assert grid.max().item() == 448.0 and len(grid) == 2 * 127 - 1  # +-0 counted once
    one = torch.ones(1, 1, 1)
    codes = float_codes(grid.float().reshape(1, 1, -1), one, "e4m3")
    assert codes.dtype == torch.float8_e4m3fn
    assert torch.equal(codes.double().reshape(-1), grid)


def test_codes_are_the_nearest_grid_value_and_saturate() -> None:
    grid = e4m3_grid()
    x = torch.randn(4000, generator=torch.Generator().manual_seed(0)) * 100
    codes = float_codes(x.reshape(1, 1, -1), torch.ones(1, 1, 1), "e4m3").double().reshape(-1)
    assert torch.equal(codes, nearest_on_grid(x, grid))
    big = torch.tensor([1e4, -1e4, 470.0, -449.0]).reshape(1, 1, -1)
    assert float_codes(big, torch.ones(1, 1, 1), "e4m3").float().reshape(-1).tolist() == \
        [448.0, -448.0, 448.0, -448.0]


@pytest.mark.parametrize("spec", [W_CH, W_T], ids=["per_channel", "per_tensor"])
def test_weight_scale_codes_and_error_bound(spec: WeightQuantSpec) -> None:
    w = torch.randn(12, 40, generator=torch.Generator().manual_seed(1))
    w[3] *= 50
    q, qp = quantize_weight(w, spec)
    assert q.dtype == torch.float8_e4m3fn and qp.zero is None
    absmax = w.abs().amax(dim=1, keepdim=True) if spec.granularity == PerChannel() \
        else w.abs().amax().reshape(1, 1)
    assert torch.equal(qp.scale, absmax / 448)
    scale = qp.scale.expand(w.shape[0], 1) if qp.scale.shape[0] == 1 else qp.scale
    # codes: the nearest E4M3 value of w / s; the largest magnitude maps to +-448 exactly
    assert torch.equal(q.double(), nearest_on_grid(w / scale, e4m3_grid()))
    assert (q.float().abs().amax(dim=1) == 448).sum() >= (1 if spec == W_T else w.shape[0])
    w_hat = fake_quantize_weight(w, spec)
    assert torch.equal(w_hat, q.float() * scale)
    # half a step: 2^-4 relative in the normal range, 2^-10 * s among subnormals
    bound = torch.maximum(w.abs() * 2.0**-4, scale * 2.0**-10) * (1 + 1e-6)
    assert ((w - w_hat).abs() <= bound).all()
    assert torch.equal(fake_quantize_weight(w_hat, spec), w_hat)  # on the grid: exact


def test_record_holds_float8_codes_and_dequantizes_to_the_fake_weight() -> None:
    w = torch.randn(8, 24, generator=torch.Generator().manual_seed(2))
    q, qp = quantize_weight(w, W_CH)
    rec = make_record(q.float(), qp, W_CH)  # any dtype holding grid values
    assert rec.qweight.dtype == torch.float8_e4m3fn and rec.zero is None and rec.is_float
    assert torch.equal(rec.dequantize(), fake_quantize_weight(w, W_CH))
    assert rec.describe() == "w-fp8(e4m3) per_channel"


def test_dynamic_activations_per_token_and_per_tensor() -> None:
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(3))
    x[0, 1] *= 30
    grid = e4m3_grid()
    rows = x.reshape(-1, 16)
    s_tok = rows.abs().amax(dim=1, keepdim=True) / 448
    want = nearest_on_grid(rows / s_tok, grid).float() * s_tok
    assert torch.equal(fake_quantize_act(x, A_TOK), want.reshape(x.shape))
    s_ten = rows.abs().amax() / 448
    want = nearest_on_grid(rows / s_ten, grid).float() * s_ten
    assert torch.equal(fake_quantize_act(x, A_TEN), want.reshape(x.shape))
    assert fake_quantize_act(x.half(), A_TOK).dtype == torch.float16


def test_static_activation_scale_from_the_observer() -> None:
    obs = ActRangeObserver()
    obs.update(torch.tensor([[-3.0, 1.0]]))
    obs.update(torch.tensor([[2.0, 7.0]]))
    static = ActQuantSpec(bits=8, symmetric=True, granularity=PerTensor(), static=True,
                          fmt="e4m3")
    scale, zero = obs.qparams(static)
    assert zero is None and scale.item() == pytest.approx(7.0 / 448, rel=1e-7)
    x = torch.tensor([[7.0, -3.0, 0.1]])
    out = fake_quantize_act(x, static, scale)
    assert out[0, 0].item() == pytest.approx(7.0, rel=1e-6)
    assert torch.equal(out, float_codes(x, scale, "e4m3").float() * scale)


def test_integer_grids_go_through_the_old_functions() -> None:
    w = torch.randn(6, 32, generator=torch.Generator().manual_seed(4))
    for sym in (True, False):
        spec = WeightQuantSpec(bits=4, symmetric=sym)
        wg = group_view(w, spec.granularity)
        a, b = grid_qparams(wg, spec)
        c, d = minmax_qparams(wg, 4, sym)
        assert torch.equal(a, c) and (b is None) == (d is None)
    assert not WeightQuantSpec(bits=4, symmetric=True).is_float
    assert (W_CH.qmin, W_CH.qmax) == (-448.0, 448.0)
    with pytest.raises(ValueError):
        WeightQuantSpec(bits=4, symmetric=True, fmt="e4m3")


def test_clip_search_on_the_fp8_grid_never_loses_to_no_clip() -> None:
    g = torch.Generator().manual_seed(5)
    w = torch.randn(8, 64, generator=g)
    w[:, 0] *= 40  # an outlier column: clipping can pay off
    x = torch.randn(128, 64, generator=g)
    lo, hi = search_clip(w, x, W_CH, grid=10, max_shrink=0.5)
    ref = x @ w.t()

    def err(wc: torch.Tensor) -> torch.Tensor:
        return (x @ fake_quantize_weight(wc, W_CH).t() - ref).pow(2).mean(0)

    clipped = torch.clamp(w, lo, hi)
    assert (err(clipped) <= err(w) * (1 + 1e-6)).all()


# --------------------------------------------------------------------------- config

def cfg(model: Path, save: Path, weight: dict, act: dict | None = None,
        method: str = "rtn", data: Path | None = None) -> dict[str, Any]:
    q: dict[str, Any] = {"method": method, "weight": weight}
    if act is not None:
        q["act"] = act
    out: dict[str, Any] = {"base": {"seed": 0, "device": "cpu"},
                           "model": {"type": "llama", "path": str(model)}, "quant": q,
                           "save": {"save_path": str(save)}}
    if data is not None:
        out["calib"] = {"name": "wikitext2", "path": str(data / "wikitext2" / "valid.txt"),
                        "n_samples": 4, "seq_len": 64, "preproc": "wikitext2_gptq", "bs": 2}
    return out


def test_llmc_fp8_sections_resolve_to_float_specs(tmp_path: Path, tiny_llama_dir: Path) -> None:
    r = resolve_config(cfg(tiny_llama_dir, tmp_path / "o", FP8_W, FP8_A))
    from llmcq.quant.spec import ActQuantSpec as A
    from llmcq.quant.spec import WeightQuantSpec as W

    assert r.config.quant is not None and r.config.quant.weight is not None
    w = W.from_section(r.config.quant.weight)
    assert (w.bits, w.fmt, w.is_float, w.granularity) == (8, "e4m3", True, PerChannel())
    a = A.from_section(r.config.quant.act)  # type: ignore[arg-type]
    assert (a.bits, a.fmt, a.granularity, a.static) == (8, "e4m3", PerToken(), False)
    # int-quant stays the default
    r = resolve_config(cfg(tiny_llama_dir, tmp_path / "o2", {"bit": 4}))
    assert r.config.quant.weight.quant_type == "int-quant"  # type: ignore[union-attr]


@pytest.mark.parametrize(("weight", "act", "field", "allowed"), [
    ({**FP8_W, "bit": "e5m2"}, None, "quant.weight.bit", "e4m3"),
    ({**FP8_W, "bit": 8}, None, "quant.weight.bit", "e4m3"),
    ({**FP8_W, "symmetric": False}, None, "quant.weight.symmetric", "True"),
    ({**FP8_W, "granularity": "per_group", "group_size": 32}, None, "quant.weight.granularity",
     "per_channel, per_tensor"),
    ({**FP8_W, "calib_algo": "mse"}, None, "quant.weight.calib_algo", "minmax"),
    (FP8_W, {**FP8_A, "bit": "e3m2"}, "quant.act.bit", "e4m3"),
    (FP8_W, {**FP8_A, "granularity": "per_group", "group_size": 16}, "quant.act.granularity",
     "per_token, per_tensor"),
    (FP8_W, {"bit": 8, "granularity": "per_token"}, "quant.act.quant_type", "float-quant"),
    ({"bit": 8}, FP8_A, "quant.act.quant_type", "int-quant"),
    ({"bit": "e4m3"}, None, "quant.weight.bit", "an integer from 2 to 8"),
    ({**FP8_W, "quant_type": "fp8"}, None, "quant.weight.quant_type", "float-quant"),
])
def test_fp8_refusals_name_the_field(weight: dict, act: dict | None, field: str, allowed: str,
                                     tmp_path: Path, tiny_llama_dir: Path) -> None:
    with pytest.raises(ConfigError) as err:
        resolve_config(cfg(tiny_llama_dir, tmp_path / "o", weight, act))
    assert err.value.path == field, str(err.value)
    assert allowed in str(err.value), str(err.value)


@pytest.mark.parametrize("method", ["gptq", "hqq", "omniquant", "osplus"])
def test_int_only_algorithms_refuse_fp8(method: str, tmp_path: Path, tiny_llama_dir: Path,
                                        shared_data: Path) -> None:
    act = FP8_A if method == "osplus" else None
    with pytest.raises(ConfigError) as err:
        resolve_config(cfg(tiny_llama_dir, tmp_path / "o", FP8_W, act, method=method,
                           data=shared_data))
    assert err.value.path == "quant.weight.quant_type", str(err.value)
    assert "int-quant" in str(err.value)


@pytest.mark.parametrize("method", ["rtn", "awq", "smoothquant"])
def test_fp8_capable_algorithms_accept_it(method: str, tmp_path: Path, tiny_llama_dir: Path,
                                          shared_data: Path) -> None:
    resolve_config(cfg(tiny_llama_dir, tmp_path / "o", FP8_W, FP8_A, method=method,
                       data=None if method == "rtn" else shared_data))


# --------------------------------------------------------------------------- end to end

def test_rtn_w8a8_fp8_through_llmcq_run(llmcq_cli: Any, tmp_path: Path, tiny_llama_dir: Path,
                                        shared_data: Path) -> None:
    c = cfg(tiny_llama_dir, tmp_path / "out", FP8_W, FP8_A)
    c["eval"] = {"eval_pos": ["pretrain", "fake_quant"], "name": "wikitext2",
                 "path": str(shared_data / "wikitext2" / "test.txt"), "seq_len": 64, "bs": 2,
                 "num_samples": 4}
    c["save"]["save_fake"] = True
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(c))
    res = llmcq_cli("run", str(path))
    assert res.returncode == 0, res
    r = json.loads((tmp_path / "out" / "results.json").read_text())
    fp, fq = (r["eval"][p]["wikitext2"]["ppl"] for p in ("pretrain", "fake_quant"))
    assert fp != fq and abs(fq / fp - 1) < 0.05  # FP8 on a random tiny model: close, not equal
    meta = json.loads((tmp_path / "out" / "fake_quant_model" / "llmcq_quant.json").read_text())
    layer = meta["layers"]["model.layers.0.self_attn.q_proj"]
    assert layer["weight"]["fmt"] == "e4m3" and layer["act"]["fmt"] == "e4m3"
