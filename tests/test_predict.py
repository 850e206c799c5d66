"""predict(): the report's numbers hang together, the grid agrees with the scalar path, bad inputs are refused."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmodel.predict import FP16, predict, predict_grid, step_time_s
from kvmodel.specs import KVFormat, Workload, get_gpu, get_model, parse_kv_format
from kvmodel.timing import TimeModel

H200 = get_gpu("h200")
LLAMA = get_model("llama-3.1-8b")


def _p(batch=1, ctx=4096, kv="int4", **kw):
    return predict(H200, LLAMA, Workload(batch=batch, context_tokens=ctx, kv=parse_kv_format(kv), **kw))


def test_uncalibrated_prediction_says_so():
    p = _p()
    assert p.timing.startswith("uncalibrated")
    assert any("uncalibrated" in n for n in p.notes)


def test_bytes_add_up_and_regime_follows_kv_fraction():
    p = _p(batch=1, ctx=1024)
    b = p.bytes
    assert b.total == pytest.approx(b.weights_streamed + b.kv_read + b.kv_write + b.activations)
    assert p.regime == "weight-bound" and p.kv_fraction < 0.5
    big = _p(batch=64, ctx=32768)
    assert big.regime == "KV-bound" and big.kv_fraction > 0.5
    assert p.crossover_context_tokens is not None


def test_fused_int4_beats_fp16_and_non_fused_loses_in_kv_bound_regime():
    p = _p(batch=32, ctx=32768)
    assert p.fused.speedup_vs_fp16 > 1.5
    assert p.non_fused.speedup_vs_fp16 < 1.0
    assert p.fused.speedup_vs_fp16 <= p.compression_ratio


def test_fp16_format_gives_speedup_one():
    p = _p(kv="fp16", batch=8, ctx=8192)
    assert p.fused.speedup_vs_fp16 == pytest.approx(1.0, rel=1e-9)
    assert p.compression_ratio == 1.0


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 128), T=st.integers(1, 1 << 18),
       kv=st.sampled_from(["int4", "int8", "k8v4", "k16v4", "k4v8", "fp8"]))
def test_fused_speedup_never_exceeds_compression_ratio(B, T, kv):
    p = _p(batch=B, ctx=T, kv=kv)
    assert p.fused.speedup_vs_fp16 <= p.compression_ratio * (1 + 1e-9)
    assert p.fused.attention_bytes_per_step < p.fp16.attention_bytes_per_step < p.non_fused.attention_bytes_per_step


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 512), T=st.integers(1, 1 << 20))
def test_fits_iff_footprint_within_usable_capacity(B, T):
    p = _p(batch=B, ctx=T)
    assert p.memory.fits == (p.memory.footprint_bytes <= p.memory.usable_bytes)
    if not p.memory.fits:
        assert any("does not fit" in n and "GiB" in n for n in p.notes)


def test_step_time_monotone_in_batch_and_context():
    tm = TimeModel(H200)
    kv = parse_kv_format("int4")
    t = step_time_s(tm, LLAMA, kv, np.array([1, 2, 4, 8])[:, None], np.array([1024, 4096, 16384])[None, :])
    assert (np.diff(t, axis=0) > 0).all() and (np.diff(t, axis=1) > 0).all()


def test_grid_matches_scalar_predictions():
    gpus = [H200, get_gpu("h100")]
    models = [LLAMA, get_model("qwen2.5-7b")]
    fmts = [FP16, parse_kv_format("int4"), parse_kv_format("k8v4")]
    Bs, Ts = [1, 16], [1024, 65536]
    g = predict_grid(gpus, models, fmts, Bs, Ts)
    assert g["step_time_s"].shape == (2, 2, 3, 2, 2)
    for gi, gpu in enumerate(gpus):
        for mi, m in enumerate(models):
            for fi, kv in enumerate(fmts):
                for bi, B in enumerate(Bs):
                    for ti, T in enumerate(Ts):
                        p = predict(gpu, m, Workload(batch=B, context_tokens=T, kv=kv))
                        assert g["step_time_s"][gi, mi, fi, bi, ti] == pytest.approx(p.fused.step_time_s)
                        assert g["fits"][gi, mi, fi, bi, ti] == p.memory.fits


def test_group_that_does_not_divide_head_dim_is_refused():
    gemma = get_model("qwen2.5-0.5b")  # head_dim 64
    with pytest.raises(ValueError, match="group size 128"):
        predict(H200, gemma, Workload(batch=1, context_tokens=100, kv=KVFormat(k_bits=4, v_bits=4, group_size=128)))


def test_generation_reread_sum_reported():
    p = _p(ctx=1000, gen_tokens=10)
    assert p.reread_token_reads == sum(1000 + i for i in range(10))


def test_weights_dtype_scales_weight_bytes():
    a = _p(weight_bytes_per_param=2.0)
    b = _p(weight_bytes_per_param=0.5)
    assert b.bytes.weights_streamed == pytest.approx(a.bytes.weights_streamed / 4)


def test_per_format_attention_curve_is_used_when_calibrated():
    from kvmodel.specs import BandwidthCurve, Calibration

    slow = BandwidthCurve(t0_s=5e-6, bw_GBps=500.0)
    fast = BandwidthCurve(t0_s=5e-6, bw_GBps=4000.0)
    cal = Calibration(gpu="H200-SXM", read_bw_GBps=4600, ops={"attention:P5": fast, "attention:P5:k8v4": slow,
                                                               "attention:P0": fast, "weights": fast,
                                                               "lm_head": fast})
    tm = TimeModel(H200, cal)
    assert tm.attention_op("P5", 8, 4) == "attention:P5:k8v4"
    assert tm.attention_op("P5", 4, 4) == "attention:P5"
    wl = dict(batch=16, context_tokens=32768)
    p84 = predict(H200, LLAMA, Workload(kv=parse_kv_format("k8v4"), **wl), calibration=cal)
    p44 = predict(H200, LLAMA, Workload(kv=parse_kv_format("int4"), **wl), calibration=cal)
    assert p84.fused.step_time_s > 3 * p44.fused.step_time_s
    assert p84.timing.startswith("calibrated")
