"""The SM's smooth saturation in resident programs (``OccupancyCurve.sm_sharpness``, symbolic
``fused_wave_time_smooth``): the limits and monotonicity it guards, its fit, and its round trip through a
calibration."""

from __future__ import annotations

import numpy as np
import pytest

from kvmodel import fused_fit
from kvmodel.timing import OccupancyCurve, fused_kernel_time_s

SMS = 132


def _curve(n, c_res=12, r1=6.0, rc=2.0, t0=5e-6):
    return OccupancyCurve(t0, r1_GBps=r1, rc_GBps=rc, c_res=c_res, sm_sharpness=n)


def test_sharp_saturation_tends_to_the_hard_min():
    """A large sharpness gives fused_wave_time's hard min; 0 is that formula itself."""
    p = np.array([1, 64, 132, 264, 528, 1024, 1584, 2000, 5000.0])
    nb = p * 1e6
    hard = _curve(0.0).time_s(p, nb, SMS)
    assert np.allclose(_curve(200.0).time_s(p, nb, SMS), hard, rtol=1e-2)
    assert np.allclose(fused_kernel_time_s(p, nb, SMS, 12, 6.0, 2.0, 5e-6, sm_sharpness=0.0), hard)


@pytest.mark.parametrize("n", [1.0, 2.0, 4.0, 16.0])
def test_adding_a_program_never_makes_a_call_faster(n):
    """Programs of the same work: one more program (a wave or part of one added) never lowers the call's time."""
    p = np.arange(1, 6 * 12 * SMS + 1, dtype=float)
    t = _curve(n).time_s(p, p * 2e5, SMS)
    assert np.all(np.diff(t) >= -1e-15)


@pytest.mark.parametrize("n", [1.0, 2.0, 4.0, 16.0])
def test_sm_throughput_rises_with_resident_programs_and_never_beats_the_lone_rate(n):
    """Within one wave (every program resident) an SM's throughput rises with its programs, with diminishing
    returns, and no program streams faster than alone (r_1)."""
    c = _curve(n)
    k = np.arange(1, c.c_res + 1, dtype=float)
    p = k * SMS  # k programs on every SM
    w = 1e6
    thr = p * w / (c.time_s(p, p * w, SMS) - c.t0_s) / SMS / 1e9  # GB/s per SM
    assert np.all(np.diff(thr) > 0)
    assert np.all(np.diff(thr, 2) <= 1e-9)  # concave: each added program gains less
    assert np.all(thr / k <= c.r1_GBps * (1 + 1e-9))
    assert thr[-1] <= c.c_res * c.rc_GBps * (1 + 1e-9)


def test_fit_recovers_a_smooth_saturation():
    """Same work in 256 / 512 / 1024 ... programs (the calibration probe's design) identifies the sharpness and the
    lone-program rate; a hard knee cannot fit such rows."""
    rng = np.random.default_rng(3)
    truth = OccupancyCurve(6e-6, r1_GBps=6.0, rc_GBps=1.8, c_res=12, sm_sharpness=2.0)
    progs, byts = [], []
    for total in (1.4e8, 3.5e7, 8.8e6):
        for p in (132, 256, 512, 1024, 1584, 2048, 4096):
            progs.append(p)
            byts.append(total)
    programs, nbytes = np.array(progs, float), np.array(byts)
    t = truth.time_s(programs, nbytes, SMS) * np.exp(0.005 * rng.standard_normal(programs.size))
    c, info = fused_fit.fit_occupancy(programs, nbytes, t, SMS, c_res_choices=(12,), fit_sharpness=True,
                                      knee_programs=4)
    assert c.sm_sharpness == pytest.approx(2.0, rel=0.25)
    assert c.r1_GBps == pytest.approx(6.0, rel=0.1)
    assert info["median_abs_pct_error"] < 1.5
    hard, hinfo = fused_fit.fit_occupancy(programs, nbytes, t, SMS, c_res_choices=(12,), knee_programs=4)
    assert hard.sm_sharpness == 0.0 and hinfo["median_abs_pct_error"] > info["median_abs_pct_error"]


def test_sharpness_round_trips_through_a_calibration_curve():
    from kvmodel.specs import FusedKernelCurve

    occ = _curve(2.5)
    f = FusedKernelCurve(**occ.as_dict())
    assert f.sm_sharpness == 2.5
    back = f.occupancy_curve()
    p = np.array([100, 700, 3000.0])
    assert np.allclose(back.time_s(p, p * 1e6, SMS), occ.time_s(p, p * 1e6, SMS))
    # an older calibration without the field keeps the hard min
    assert FusedKernelCurve(t0_s=1e-6, r1_GBps=5.0, rc_GBps=2.0, c_res=4).occupancy_curve().sm_sharpness == 0.0
