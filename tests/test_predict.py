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


def _fused_cal(d=128):
    """A calibration whose P5 bandwidth curve is deliberately slow and whose INT4 kernel has occupancy curves: a
    pooled one at head dim ``d`` and a slower one for the 1-warp block shape (n32w1)."""
    from kvmodel.specs import BandwidthCurve, Calibration, FusedKernelCurve

    slow = BandwidthCurve(t0_s=5e-6, bw_GBps=300.0)
    fast = BandwidthCurve(t0_s=5e-6, bw_GBps=4000.0)
    pooled = FusedKernelCurve(t0_s=4e-6, r1_GBps=20.0, rc_GBps=10.0, c_res=2, program_overhead_bytes=2048.0,
                              merge_s=2e-6, merge_per_split_s=3e-8)
    shape = FusedKernelCurve(t0_s=6e-6, r1_GBps=6.0, rc_GBps=2.0, c_res=11, one_split_rate_scale=0.9)
    return Calibration(gpu="H200-SXM", read_bw_GBps=4600,
                       ops={"attention:P5": slow, "attention:P0": fast, "weights": fast, "lm_head": fast},
                       fused={f"attention:P5:k4v4:d{d}": pooled, f"attention:P5:k4v4:d{d}:n32w1": shape})


def test_fused_occupancy_curve_times_p5_when_calibrated():
    """P5 with an occupancy curve: programs = B*Hkv*splits (the kernel's split rule), the block shape's curve first,
    then the pooled one; formats without one keep the bandwidth curve."""
    from kvmodel.predict import attention_call_time_s
    from kvmodel.timing import kernel_config, kernel_config_key, kernel_split_count

    cal = _fused_cal()
    tm = TimeModel(H200, cal)
    int4, k8v4 = parse_kv_format("int4"), parse_kv_format("k8v4")
    B, T, Hq, Hkv, d = np.array([1.0, 4, 64, 128]), np.array([1024.0, 8192, 32768, 4096]), 32, 8, 128
    got = attention_call_time_s(tm, "P5", int4, B, T, Hq, Hkv, d)
    from kvmodel import traffic

    nbytes = traffic.attention_layer_bytes("P5", B, T, Hq, Hkv, d, 4, 4, 32)
    for i in range(B.size):
        ns = float(kernel_split_count(4, 4, d, B[i], Hkv, T[i], H200.sm_count))
        shape = kernel_config_key(kernel_config(4, 4, d, B[i], Hkv, T[i]))
        key = "attention:P5:k4v4:d128" + (":n32w1" if shape == "n32w1" else "")
        want = cal.fused[key].occupancy_curve().time_s(B[i] * Hkv * ns, nbytes[i], H200.sm_count, head_dim=d,
                                                       splits=ns)
        assert got[i] == pytest.approx(float(want), rel=1e-12), (i, key)
    assert {kernel_config_key(kernel_config(4, 4, d, b, Hkv, t)) for b, t in zip(B, T)} >= {"n64w4", "n32w1"}
    # no occupancy curve for K8V4: its bandwidth curve, exactly as without any fused curves
    plain = TimeModel(H200, cal.model_copy(update={"fused": {}}))
    assert np.array_equal(attention_call_time_s(tm, "P5", k8v4, B, T, Hq, Hkv, d),
                          attention_call_time_s(plain, "P5", k8v4, B, T, Hq, Hkv, d))
    assert np.all(attention_call_time_s(plain, "P5", int4, B, T, Hq, Hkv, d) != got)
    # nor at another head dim, nor for the non-fused pipelines
    assert np.array_equal(attention_call_time_s(tm, "P5", int4, B, T, 16, 8, 256),
                          attention_call_time_s(plain, "P5", int4, B, T, 16, 8, 256))
    assert np.array_equal(attention_call_time_s(tm, "P1", int4, B, T, Hq, Hkv, d),
                          attention_call_time_s(plain, "P1", int4, B, T, Hq, Hkv, d))
    # the grid path (2-D B x T) agrees with the per-call path
    t2 = attention_call_time_s(tm, "P5", int4, B[:, None], T[None, :], Hq, Hkv, d)
    assert t2.shape == (4, 4) and np.allclose(np.diag(t2), got, rtol=1e-12)


def test_fused_curve_in_step_time_windowed_layers_and_tp():
    """attention_time_s charges every layer the per-call time: windowed layers at min(T, W), and under tensor
    parallelism each GPU's ceil(H/N) heads."""
    from kvmodel.predict import attention_call_time_s, attention_time_s

    gemma = get_model("gemma-3-12b")  # 40 of 48 layers windowed (W = 1024), head dim 256
    tm = TimeModel(H200, _fused_cal(d=256))
    int4 = parse_kv_format("int4")
    B, T = np.array([[1.0], [16.0]]), np.array([[4096.0, 65536.0]])
    L, Ls, W = 48, 40, 1024
    one = lambda t, hq=16, hkv=8: attention_call_time_s(tm, "P5", int4, B, t, hq, hkv, 256)  # noqa: E731
    want = (L - Ls) * one(T) + Ls * one(np.minimum(T, W))
    assert np.allclose(attention_time_s(tm, gemma, int4, B, T, "P5"), want, rtol=1e-12)
    want_tp = (L - Ls) * one(T, 8, 4) + Ls * one(np.minimum(T, W), 8, 4)
    assert np.allclose(attention_time_s(tm, gemma, int4, B, T, "P5", tp=2), want_tp, rtol=1e-12)
    # predict() uses it: the fused (P5) step differs from the same calibration without occupancy curves
    p = predict(H200, gemma, Workload(batch=16, context_tokens=65536, kv=int4), calibration=tm.calibration)
    q = predict(H200, gemma, Workload(batch=16, context_tokens=65536, kv=int4),
                calibration=tm.calibration.model_copy(update={"fused": {}}))
    assert p.fused.step_time_s != q.fused.step_time_s and p.fp16.step_time_s == q.fp16.step_time_s


def test_p5_calls_follow_the_launch_rules_of_the_calibrations_kernel():
    """A calibration's fused curves describe the kernel that measured them: predict follows that kernel's launch
    rules (kernel v8 at Qwen2.5-7B B=1 T=4K: 16 splits, its merge reading 16 splits a round) unless told otherwise,
    and says so; without a recorded version, the current kernel's (v11 and v12: 32 two-tile splits, one merge
    round; at Llama's 8 KV heads v11 keeps 16, where v10 launched 32; v12 changed large launches only: Llama
    B=8 T=32K 4/4 16 splits, v11 32)."""
    from kvmodel.predict import attention_call_time_s
    from kvmodel.timing import KERNEL_PORT_VERSION, kernel_config, kernel_split_count

    assert KERNEL_PORT_VERSION == "v12"
    assert kernel_split_count(4, 4, 128, 8, 8, 32768, 132, "v11") == 32.0
    assert kernel_split_count(4, 4, 128, 8, 8, 32768, 132) == 16.0
    assert kernel_config(4, 4, 256, 16, 8, 32768)["num_warps"] == 1
    assert kernel_config(4, 4, 256, 16, 8, 32768, "v11")["num_warps"] == 2
    assert kernel_split_count(4, 4, 128, 1, 8, 4096, 132, "v8") == 16.0
    assert kernel_split_count(4, 4, 128, 1, 8, 4096, 132, "v10") == 32.0
    assert kernel_split_count(4, 4, 128, 1, 8, 4096, 132) == 16.0
    assert kernel_split_count(4, 4, 128, 1, 4, 4096, 132) == 32.0  # 128 programs: within v11's cap
    assert kernel_config(4, 4, 128, 1, 8, 4096, "v9")["merge_round_splits"] == 16
    assert kernel_config(4, 4, 128, 1, 8, 4096)["merge_round_splits"] == 64
    assert kernel_config(4, 4, 64, 1, 8, 4096)["merge_round_splits"] == 128
    with pytest.raises(ValueError, match="not ported"):
        kernel_config(4, 4, 128, 1, 8, 4096, "v7")
    with pytest.raises(ValueError, match="not ported"):
        TimeModel(H200, None, kernel_version="v99")

    cal = _fused_cal()
    curve = cal.fused["attention:P5:k4v4:d128"].model_copy(update={"merge_per_round_s": 1e-6})
    cal = cal.model_copy(update={"fused": {**cal.fused, "attention:P5:k4v4:d128": curve}})
    current, old = TimeModel(H200, cal), TimeModel(H200, cal.model_copy(update={"fused_kernel_version": "v8"}))
    assert current.kernel_version == "v12" and old.kernel_version == "v8"
    assert "v8's launch rules" in old.label and "launch rules" not in current.label
    assert TimeModel(H200, cal, kernel_version="v8").kernel_version == "v8"
    int4 = parse_kv_format("int4")
    # Qwen2.5-7B's shape (28 / 4 / 128) at B=1 T=4K: v8 16 splits, v11/v12 32 two-tile splits (128 programs)
    t_old = attention_call_time_s(old, "P5", int4, 1, 4096, 28, 4, 128)
    t_cur = attention_call_time_s(current, "P5", int4, 1, 4096, 28, 4, 128)
    occ = cal.fused["attention:P5:k4v4:d128:n64w4"].occupancy_curve() \
        if "attention:P5:k4v4:d128:n64w4" in cal.fused else curve.occupancy_curve()
    from kvmodel import traffic

    nb = traffic.attention_layer_bytes("P5", 1, 4096, 28, 4, 128, 4, 4, 32)
    want_old = occ.time_s(4 * 16, nb, H200.sm_count, head_dim=128, splits=16.0, merge_round_splits=16)
    want_cur = occ.time_s(4 * 32, nb, H200.sm_count, head_dim=128, splits=32.0, merge_round_splits=64)
    assert float(t_old) == pytest.approx(float(want_old), rel=1e-12)
    assert float(t_cur) == pytest.approx(float(want_cur), rel=1e-12)
    assert float(t_old) != float(t_cur)


def test_merge_rounds_follow_the_splits_per_round():
    from kvmodel.timing import merge_rounds

    assert list(merge_rounds([1, 4, 5, 16, 17, 32, 64], 16)) == [1, 1, 1, 1, 2, 2, 4]
    assert list(merge_rounds([1, 4, 5, 16, 17, 32, 64], 64)) == [1, 1, 1, 1, 1, 1, 1]
    assert list(merge_rounds([32, 32], np.array([16, 64]))) == [2, 1]
