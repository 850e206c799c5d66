"""Tensor parallelism (analytic half of issue 8): N = 1 is the single-GPU model exactly; weights split 1/N;
KV heads ceil(H_kv / N); all-reduce time grows with the batch; a GPU without a GPU-GPU link refuses N > 1."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmodel import traffic
from kvmodel.predict import (
    FP16,
    allreduce_time_s,
    attention_time_s,
    predict,
    step_time_s,
    tp_link,
    weights_time_s,
)
from kvmodel.specs import GPUSpec, Workload, get_gpu, get_interconnect, get_model, parse_kv_format
from kvmodel.timing import TimeModel

H200 = get_gpu("h200")
LLAMA = get_model("llama-3.1-8b")
LLAMA70 = get_model("llama-3.1-70b")
INT4 = parse_kv_format("int4")


def _wl(B=8, T=32768, kv=INT4):
    return Workload(batch=B, context_tokens=T, kv=kv)


def test_tp1_equals_single_gpu_prediction_exactly():
    for m in (LLAMA, LLAMA70):
        for B, T in ((1, 1024), (16, 65536)):
            a = predict(H200, m, _wl(B, T))
            b = predict(H200, m, _wl(B, T), tp=1)
            assert a.model_dump() == b.model_dump()
            assert type(b).__name__ == "Prediction"


def test_tp1_step_time_identical_bits():
    tm = TimeModel(H200)
    Bs = np.array([1, 3, 64])[:, None]
    Ts = np.array([100, 4096, 131072])[None, :]
    for m in (LLAMA, get_model("mixtral-8x7b"), get_model("deepseek-v3")):
        a = step_time_s(tm, m, INT4, Bs, Ts, "P5")
        b = step_time_s(tm, m, INT4, Bs, Ts, "P5", tp=1)
        assert np.array_equal(a, b)
        assert np.array_equal(weights_time_s(tm, m, Bs), weights_time_s(tm, m, Bs, tp=1))
        assert np.array_equal(attention_time_s(tm, m, INT4, Bs, Ts, "P0"),
                              attention_time_s(tm, m, INT4, Bs, Ts, "P0", tp=1))


@pytest.mark.parametrize("N", [2, 4, 8])
def test_weights_per_gpu_scale_one_over_n(N):
    v = traffic.model_symbols(LLAMA70)
    v.update(traffic.kv_symbols(INT4), b_w=2.0, B=4, N=N)
    total = traffic.evaluate("weight_bytes_streamed", v)
    assert traffic.evaluate("weight_bytes_per_gpu", v) == pytest.approx(total / N, rel=1e-12)
    p = predict(H200, LLAMA70, _wl(4, 8192), tp=N)
    assert p.tensor_parallel.weights_streamed_per_gpu == pytest.approx(p.bytes.weights_streamed / N, rel=1e-12)
    one = predict(H200, LLAMA70, _wl(4, 8192))
    # resident weights per GPU are the single-GPU weights over N
    assert p.memory.weights_bytes == pytest.approx(one.memory.weights_bytes / N, rel=1e-12)


@settings(max_examples=50, deadline=None)
@given(hkv=st.sampled_from([1, 2, 4, 8, 16]), N=st.sampled_from([1, 2, 3, 4, 8, 16]), B=st.integers(1, 64),
       T=st.integers(1, 1 << 17))
def test_kv_per_gpu_uses_ceil_of_heads_over_n(hkv, N, B, T):
    v = dict(B=B, T=T, L=32, L_s=0, W=1, H_kv=hkv, d=128, d_v=128, N=N, **traffic.kv_symbols(INT4))
    heads = math.ceil(hkv / N)
    assert traffic.evaluate("kv_heads_per_gpu", v) == heads
    per_gpu = traffic.evaluate("kv_read_bytes_per_gpu", v)
    one_head = traffic.evaluate("kv_read_bytes", {**v, "H_kv": 1})
    assert per_gpu == pytest.approx(heads * one_head, rel=1e-12)
    # replicated when H_kv < N: never less than one head's bytes, and the GPUs together hold >= the model's KV
    assert per_gpu * N >= traffic.evaluate("kv_read_bytes", v) * (1 - 1e-12)


def test_kv_heads_replicated_when_fewer_than_gpus():
    qwen = get_model("qwen2.5-7b")  # 4 KV heads
    p = predict(H200, qwen, _wl(8, 16384), tp=8)
    assert p.tensor_parallel.kv_heads_per_gpu == 1
    assert p.tensor_parallel.kv_read_per_gpu == pytest.approx(p.bytes.kv_read / 4, rel=1e-12)
    mla = get_model("deepseek-v3")  # one latent per layer, on every GPU
    assert predict(H200, mla, _wl(1, 4096), tp=8).tensor_parallel.kv_heads_per_gpu == 1


@settings(max_examples=30, deadline=None)
@given(B=st.integers(1, 512), N=st.sampled_from([2, 4, 8]))
def test_allreduce_time_grows_with_batch(B, N):
    link = get_interconnect(H200.gpu_link)
    t = allreduce_time_s(LLAMA70, np.array([B, B + 1, 2 * B]), N, link)
    assert t[0] < t[1] <= t[2]
    assert float(allreduce_time_s(LLAMA70, B, 1, None)) == 0.0


def test_allreduce_time_matches_formula_and_latency_floor():
    link = get_interconnect(H200.gpu_link)
    t = float(allreduce_time_s(LLAMA70, 16, 4, link, latency_s=0.0))
    msg = 16 * LLAMA70.hidden_size * 2
    expect = 2 * LLAMA70.num_layers * 2 * 3 / 4 * msg / (link.bandwidth_per_direction_GBps * 1e9)
    assert t == pytest.approx(expect, rel=1e-12)
    lat = float(allreduce_time_s(LLAMA70, 1e-9, 4, link, latency_s=10e-6))
    assert lat == pytest.approx(2 * LLAMA70.num_layers * 10e-6, rel=1e-3)


def test_tp_speeds_up_weight_bound_big_model_and_adds_allreduce():
    tm = TimeModel(H200)
    t1 = float(step_time_s(tm, LLAMA70, INT4, 1, 4096))
    t4 = float(step_time_s(tm, LLAMA70, INT4, 1, 4096, tp=4))
    assert t4 < t1 / 2
    p = predict(H200, LLAMA70, _wl(1, 4096), tp=4)
    assert p.fused.step_time_s == pytest.approx(t4)
    assert p.tensor_parallel.allreduce_time_s > 0
    assert any("tensor parallel" in n for n in p.notes)


def test_tp_makes_a_model_fit_that_does_not_fit_on_one_gpu():
    big = predict(H200, get_model("qwen2.5-72b"), _wl(32, 32768, FP16))
    assert not big.memory.fits
    tp = predict(H200, get_model("qwen2.5-72b"), _wl(32, 32768, FP16), tp=4)
    assert tp.memory.fits and tp.tensor_parallel.fits_per_gpu


def test_no_gpu_link_is_a_clear_error():
    nolink = GPUSpec(**{**H200.model_dump(), "name": "nolink", "gpu_link": None})
    assert tp_link(nolink, 1) is None
    with pytest.raises(ValueError, match="no GPU-GPU link"):
        tp_link(nolink, 2)
    with pytest.raises(ValueError, match="no GPU-GPU link"):
        predict(nolink, LLAMA, _wl(), tp=2)
    with pytest.raises(ValueError, match="positive integer"):
        tp_link(H200, 0)


def test_cli_predict_tp_bad_values(monkeypatch):
    from click.testing import CliRunner

    from kvmodel.cli import cli

    r = CliRunner().invoke(cli, ["predict", "--gpu", "h200", "--model", "llama-3.1-8b", "--ctx", "4k", "--tp", "0"])
    assert r.exit_code == 2 and "Traceback" not in r.output


def test_cli_predict_tp_reports_per_gpu_terms_and_refuses_no_link():
    import json

    from click.testing import CliRunner

    from kvmodel.cli import cli

    r = CliRunner().invoke(cli, ["predict", "--gpu", "h100", "--model", "llama-3.1-70b", "--ctx", "32k", "--batch", "8",
                                 "--tp", "4"])
    assert r.exit_code == 0, r.output
    assert "Tensor parallel x4 over NVLink-4" in r.output and "2 KV heads" in r.output
    r = CliRunner().invoke(cli, ["predict", "--gpu", "h100", "--model", "llama-3.1-70b", "--ctx", "32k", "--tp", "2",
                                 "--json"])
    d = json.loads(r.output)
    assert d["tensor_parallel"]["degree"] == 2 and d["tensor_parallel"]["kv_heads_per_gpu"] == 4
    one = json.loads(CliRunner().invoke(cli, ["predict", "--gpu", "h100", "--model", "llama-3.1-8b", "--ctx", "4k",
                                              "--json"]).output)
    tp1 = json.loads(CliRunner().invoke(cli, ["predict", "--gpu", "h100", "--model", "llama-3.1-8b", "--ctx", "4k",
                                              "--tp", "1", "--json"]).output)
    assert one == tp1 and "tensor_parallel" not in one
    r = CliRunner().invoke(cli, ["predict", "--gpu", "l40s", "--model", "llama-3.1-8b", "--ctx", "4k", "--tp", "2"])
    assert r.exit_code == 2 and "no GPU-GPU link" in r.output and "Traceback" not in r.output


def test_calibrated_tp_link_terms_replace_the_catalog_link():
    from kvmodel.predict import allreduce_terms, predict
    from kvmodel.specs import Calibration, TPLinkCalibration, TPLinkDegree, Workload, get_gpu, get_model, parse_kv_format
    from kvmodel.timing import TimeModel

    gpu, model = get_gpu("h200"), get_model("llama-3.1-8b")
    link_cal = TPLinkCalibration(bw_GBps=100.0, launch_s=20e-6, hop_latency_s=5e-6,
                                 per_tp={2: TPLinkDegree(latency_s=15e-6, bw_GBps=300.0)})
    cal = Calibration(gpu=gpu.name, read_bw_GBps=4600.0, tp_link=link_cal)
    link2, lat2 = allreduce_terms(TimeModel(gpu, cal), 2)
    assert (link2.bandwidth_per_direction_GBps, lat2) == (300.0, 15e-6)  # measured at this degree
    link4, lat4 = allreduce_terms(TimeModel(gpu, cal), 4)
    assert link4.bandwidth_per_direction_GBps == 100.0 and lat4 == pytest.approx(20e-6 + 6 * 5e-6)  # joint fit
    wl = Workload(batch=64, context_tokens=4096, kv=parse_kv_format("int4"))
    slow = predict(gpu, model, wl, calibration=cal, tp=4)
    fast = predict(gpu, model, wl, calibration=Calibration(gpu=gpu.name, read_bw_GBps=4600.0), tp=4)
    assert slow.tensor_parallel.allreduce_time_s > fast.tensor_parallel.allreduce_time_s
    assert "calibrated" in slow.tensor_parallel.link
