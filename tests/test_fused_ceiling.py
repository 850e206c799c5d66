"""The fused kernel's read-ceiling term (kvmodel.timing.fused_ceiling_time_s, OccupancyCurve.ceiling_GBps)."""

import numpy as np
import pandas as pd

from kvmodel import fused_fit
from kvmodel.specs import FusedKernelCurve
from kvmodel.timing import OccupancyCurve, fused_ceiling_time_s

SMS = 132


def _curve(**kw):
    return OccupancyCurve(t0_s=5e-6, r1_GBps=60.0, rc_GBps=30.0, c_res=2, **kw)


def test_ceiling_off_is_old_behaviour():
    p, nb = np.array([16.0, 128, 1024]), np.array([2e6, 16e6, 128e6])
    old = _curve().time_s(p, nb, SMS, splits=np.array([4.0, 4, 4]))
    off = _curve(ceiling_GBps=0.0).time_s(p, nb, SMS, splits=np.array([4.0, 4, 4]))
    np.testing.assert_allclose(off, old)
    # an old calibration YAML entry (no ceiling_GBps) loads and is off
    fk = FusedKernelCurve(t0_s=5e-6, r1_GBps=60.0, rc_GBps=30.0, c_res=2)
    assert fk.occupancy_curve().ceiling_GBps == 0.0
    np.testing.assert_allclose(fk.occupancy_curve().time_s(p, nb, SMS), _curve().time_s(p, nb, SMS))


def test_time_never_below_bytes_at_ceiling():
    c = _curve(ceiling_GBps=4500.0)
    nb = np.geomspace(1e5, 1e10, 40)
    for p in (16.0, 132.0, 2048.0):
        t = c.time_s(np.full(nb.shape, p), nb, SMS)
        assert np.all(t >= c.t0_s + nb / 4500e9 * (1 - 1e-12))
        assert np.all(t >= _curve().time_s(np.full(nb.shape, p), nb, SMS) * (1 - 1e-12))


def test_monotone_in_bytes_within_one_wave():
    c = _curve(ceiling_GBps=4500.0)
    p = np.array([16.0, 32, 64, 128])
    nb = p * 131e3  # same bytes per program: the wave time alone is flat
    t = c.time_s(p, nb, SMS)
    assert np.all(np.diff(t) > 0)
    assert np.ptp(_curve().time_s(p, nb, SMS)) < 1e-15
    t2 = fused_ceiling_time_s(1e-6, np.linspace(0, 1e8, 50), 4500.0)
    assert np.all(np.diff(t2) > 0)


def test_fit_recovers_known_fraction():
    rng = np.random.default_rng(0)
    read = 4500.0
    truth = _curve(ceiling_GBps=0.8 * read)
    rows = []
    for p in (16, 32, 64, 128, 256, 512, 1024, 2048):
        for w in (3e4, 1.3e5, 5e5):
            rows.append(dict(k_bits=16, v_bits=16, d=128, config="", programs=float(p), loads=p * w,
                             num_splits=4.0, l2_hit=0.0))
    df = pd.DataFrame(rows)
    fc = fused_fit.FusedCurves(pooled={(16, 16, 128): _curve(ceiling_GBps=read)})
    df["median_s"] = truth.time_s(df.programs, df.loads, SMS, splits=df.num_splits) * np.exp(
        rng.normal(0, 0.005, len(df)))
    f = fused_fit.fit_ceiling_fraction(fc, df, SMS, read)
    assert abs(f - 0.8) < 0.03
    assert abs(fc.pooled[(16, 16, 128)].ceiling_GBps - f * read) < 1e-6


def test_read_ceiling_of_rows():
    assert fused_fit.read_ceiling_of(pd.DataFrame({"x": [1]})) == 0.0
    assert fused_fit.read_ceiling_of(pd.DataFrame({"read_ceiling_GBps": [4497.6, 4497.6, np.nan]})) == 4497.6
