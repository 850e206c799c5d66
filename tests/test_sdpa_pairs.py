"""SDPA's (P0) (sequence, KV head) pair term: kvmodel.timing.sdpa_pair_efficiency / sdpa_charged_bytes, fitted by
kvmodel.calibration.fit_curves_pairs (shared by head dims), used by kvmodel predict, kvmodel calibrate and the
validation model (validation.heldout)."""

import numpy as np
import pytest

from kvmodel.calibration import fit_curve, fit_curves_pairs, fit_p0_pairs
from kvmodel.predict import FP16, attention_call_time_s
from kvmodel.specs import BandwidthCurve, Calibration, get_gpu
from kvmodel.timing import TimeModel, curve_time_s, sdpa_charged_bytes, sdpa_pair_efficiency


def test_pair_efficiency_rises_with_pairs_and_saturates():
    p = np.array([1, 2, 4, 8, 16, 32, 256, 4096], float)
    e = sdpa_pair_efficiency(p, 2.0)
    assert np.all(np.diff(e) > 0)
    assert np.all((e > 0) & (e <= 1))
    assert e[-1] > 0.9999
    assert sdpa_pair_efficiency(2.0, 2.0) == pytest.approx(2 ** -0.5)


def test_pair_term_off_is_the_old_curve():
    nb = np.array([1e5, 1e7, 1e9])
    for off in (None, 0.0):
        assert np.array_equal(sdpa_charged_bytes(nb, np.array([1, 2, 64]), off), nb)
        assert sdpa_pair_efficiency(3.0, off) == 1.0


def test_charged_bytes_leave_the_launch_floor_alone():
    """Below the curve's knee the floor dominates: few pairs slow the streaming, not the launch."""
    c = dict(t0_s=5e-6, bw_GBps=4500.0, knee_bytes=4e6, sharpness=3.0)
    small, big = 1e4, 1e9
    t_small = [curve_time_s(sdpa_charged_bytes(small, p, 2.0), **c) for p in (2, 64)]
    t_big = [curve_time_s(sdpa_charged_bytes(big, p, 2.0), **c) for p in (2, 64)]
    assert t_small[0] / t_small[1] < 1.01
    assert t_big[0] / t_big[1] > 1.3


def _synthetic(h_true, rng):
    pts = {}
    truth = {64: (4e-6, 4400.0, 3e6, 2.5), 128: (5e-6, 4500.0, 6e6, 2.5)}
    for d, (t0, bw, knee, n) in truth.items():
        pairs = np.array([2, 4, 8, 16, 32, 64, 128] if d == 64 else [8, 16, 32, 64, 128, 256], float)
        T = np.array([1024, 4096, 16384, 65536, 131072], float)
        P, TT = np.meshgrid(pairs, T)
        nb = P.ravel() * TT.ravel() * d * 2 * 2
        t = curve_time_s(sdpa_charged_bytes(nb, P.ravel(), h_true), t0, bw, knee, n)
        pts[d] = (nb, P.ravel(), t * np.exp(rng.normal(0, 0.01, t.size)))
    return pts


def test_fit_recovers_a_known_pairs_half_shared_by_head_dims():
    rng = np.random.default_rng(0)
    curves = fit_curves_pairs(_synthetic(2.5, rng))
    hs = {c.pairs_half for c in curves.values()}
    assert len(hs) == 1
    assert hs.pop() == pytest.approx(2.5, rel=0.15)


def test_fit_without_pair_dependence_keeps_the_term_near_off():
    rng = np.random.default_rng(1)
    curves = fit_curves_pairs(_synthetic(0.0, rng))
    h = next(iter(curves.values())).pairs_half
    assert h == 0.0 or sdpa_pair_efficiency(8.0, h) > 0.97


def test_fit_with_one_pair_count_is_the_plain_curve():
    nb = np.geomspace(1e5, 1e9, 8)
    t = curve_time_s(nb, 5e-6, 4000.0, 1e6, 2.0)
    out = fit_curves_pairs({64: (nb, np.full(8, 16.0), t)})
    assert out[64].pairs_half is None
    assert out[64].bw_GBps == pytest.approx(fit_curve(nb, t).bw_GBps)


def test_calibrate_fits_the_pair_term_from_grid_rows():
    rng = np.random.default_rng(2)
    rows = []
    for d, (nb, p, t) in _synthetic(2.5, rng).items():
        for b, pp, tt in zip(nb, p, t):
            rows.append(dict(pipeline="P0", variant="default", B=pp, Hkv=1, d=d, bytes_moved=b, median_s=tt,
                             status="ok"))
    plain = BandwidthCurve(t0_s=5e-6, bw_GBps=4000.0)
    att = fit_p0_pairs({"attention:P0": plain, "attention:P0:d64": plain, "attention:P0:d128": plain}, rows)
    assert len({att[k].pairs_half for k in att}) == 1
    assert att["attention:P0:d64"].pairs_half == pytest.approx(2.5, rel=0.15)


def test_predict_charges_few_pairs_and_old_calibrations_are_unchanged():
    gpu = get_gpu("H200")
    c = BandwidthCurve(t0_s=5e-6, bw_GBps=4500.0, knee_bytes=2e6, sharpness=2.0)
    old = TimeModel(gpu, Calibration(gpu="H200", runtime="x", read_bw_GBps=4500.0, copy_bw_GBps=4000.0,
                                     ops={"attention:P0": c}))
    new = TimeModel(gpu, Calibration(gpu="H200", runtime="x", read_bw_GBps=4500.0, copy_bw_GBps=4000.0,
                                     ops={"attention:P0": c.model_copy(update={"pairs_half": 2.0})}))
    args = dict(T=131072, Hq=14, head_dim=64)
    t_old = attention_call_time_s(old, "P0", FP16, 1, Hkv=2, **args)
    t_new_few = attention_call_time_s(new, "P0", FP16, 1, Hkv=2, **args)
    t_new_many = attention_call_time_s(new, "P0", FP16, 64, Hkv=2, **args)
    t_old_many = attention_call_time_s(old, "P0", FP16, 64, Hkv=2, **args)
    assert t_new_few > 1.3 * t_old
    assert t_new_many == pytest.approx(t_old_many, rel=0.01)
    # None (a YAML written before the term) loads and means off
    assert BandwidthCurve(t0_s=1e-6, bw_GBps=100.0).pairs_half is None
