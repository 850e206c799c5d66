"""The fused kernel's occupancy fit (kvmodel.fused_fit): parameter recovery on synthetic calls, and the one
implementation shared by `kvmodel calibrate` and the validation model."""

from __future__ import annotations

import numpy as np
import pytest

from kvmodel import calibration as cal
from kvmodel import fused_fit
from kvmodel.specs import get_gpu
from kvmodel.timing import OccupancyCurve, split_count
from kvmodel.validation import common, h100_study, heldout

SMS = 132


def test_fit_occupancy_recovers_known_curve():
    rng = np.random.default_rng(0)
    truth = OccupancyCurve(6e-6, r1_GBps=30.0, rc_GBps=15.5, c_res=2)
    B, T = (x.ravel() for x in np.meshgrid([1, 2, 4, 8, 16, 32, 64, 128.0], [1024, 4096, 16384, 65536.0]))
    hkv = 8
    programs = B * hkv * split_count(B * hkv, T, SMS)
    nbytes = B * T * hkv * 128.0
    t = truth.time_s(programs, nbytes, SMS) * np.exp(0.01 * rng.standard_normal(B.size))
    c, info = fused_fit.fit_occupancy(programs, nbytes, t, SMS)
    assert c.c_res == 2
    assert c.rc_GBps == pytest.approx(15.5, rel=0.03)
    assert c.r1_GBps == pytest.approx(30.0, rel=0.1)
    assert c.t0_s == pytest.approx(6e-6, rel=0.2)
    assert info["n_points"] == B.size and info["median_abs_pct_error"] < 2


def test_fixed_knee_sets_the_lone_program_rate():
    """knee_programs holds the SM's saturation point fixed: r_1 = c_res * r_c / knee, whatever the rows say; the
    1-warp shape's curves are fitted with KNEE_PROGRAMS_1WARP (4 warp schedulers per SM)."""
    rng = np.random.default_rng(1)
    truth = OccupancyCurve(5e-6, r1_GBps=10.0, rc_GBps=4.0, c_res=10)  # knee 10 * 4 / 10 = 4 programs
    programs = np.array([264, 528, 1056, 1320, 2112, 2640, 5280.0])
    nbytes = programs * 2e6
    t = truth.time_s(programs, nbytes, SMS) * np.exp(0.005 * rng.standard_normal(programs.size))
    c, _ = fused_fit.fit_occupancy(programs, nbytes, t, SMS, c_res_choices=(10,), knee_programs=4)
    assert c.c_res == 10 and c.r1_GBps == pytest.approx(c.c_res * c.rc_GBps / 4, rel=1e-6)
    assert c.rc_GBps == pytest.approx(4.0, rel=0.05)
    assert fused_fit.KNEE_PROGRAMS_1WARP == 4


def test_fit_fused_curves_on_synthetic_grid(tmp_path):
    """heldout.synthetic_attention's ground truth: INT4 (30, 15.5 GB/s) and FP16 (40, 17 GB/s), 2 per SM."""
    path = heldout.synthetic_attention(tmp_path / "decode_attention.csv", noise=0.01)
    d = heldout.load_attention(path)
    p5 = d[(d.pipeline == "P5") & (d.variant == "") & d.format.isin(["int4", "fp16"])]
    fc = fused_fit.fit_fused_curves(p5, SMS)
    assert set(fc.pooled) == {(k, k, hd) for k in (4, 16) for hd in (64, 128, 256)}
    for (k, _, hd), c in fc.pooled.items():
        truth = {4: 15.5, 16: 17.0}[k]
        assert c.c_res == 2, (k, hd)
        assert c.plateau_GBps(SMS) == pytest.approx(SMS * 2 * truth, rel=0.03), (k, hd)
        assert fc.info[(k, k, hd)]["median_abs_pct_error"] < 2
    # block shapes with enough rows get their own curve where the kernel launches two shapes (kernel_config)
    for key in fc.per_shape:
        g = p5[(p5.k_bits == key[0]) & (p5.v_bits == key[1]) & (p5.d == key[2])]
        assert g.config.nunique() > 1 and (g.config == key[3]).sum() >= fused_fit.MIN_ROWS_PER_SHAPE
    pred = fc.time_s(p5, SMS)
    assert np.median(np.abs(pred / p5.median_s.to_numpy() - 1)) < 0.02
    # lookup: the shape's curve, else the pooled one; nearest head dim only when asked
    k = next(iter(fc.per_shape))
    assert fc.curve(*k) is fc.per_shape[k]
    assert fc.curve(4, 4, 128, "no-such-shape") is fc.pooled[(4, 4, 128)]
    assert fc.curve(4, 4, 96, nearest=False) is None and fc.curve(4, 4, 96) is not None


def test_merge_is_shared_per_head_dim(tmp_path):
    """The split-K merge is one launch whatever the split kernel's format and block shape: with
    FUSED_MERGE_PER_HEAD_DIM every curve of a head dim carries the same (merge_s, merge_per_split_s), fitted with
    fit_occupancy's merge_fixed holding it."""
    path = heldout.synthetic_attention(tmp_path / "decode_attention.csv", noise=0.01)
    d = heldout.load_attention(path)
    p5 = d[(d.pipeline == "P5") & (d.variant == "")]
    assert fused_fit.FUSED_MERGE_PER_HEAD_DIM
    fc = fused_fit.fit_fused_curves(p5, SMS)
    by_d = {}
    for key, c in list(fc.pooled.items()) + list(fc.per_shape.items()):
        by_d.setdefault(key[2], set()).add((round(c.merge_s, 15), round(c.merge_per_split_s, 18)))
    assert set(by_d) == {64, 128, 256} and all(len(v) == 1 for v in by_d.values()), by_d
    # merge_fixed: the merge is not a free parameter of the curve
    g = p5[(p5.k_bits == 4) & (p5.v_bits == 4) & (p5.d == 128)]
    c, _ = fused_fit.fit_occupancy(g["programs"], g["loads"], g["median_s"], SMS, splits=g["num_splits"],
                                   overheads=True, merge_fixed=(3e-6, 1e-7))
    assert (c.merge_s, c.merge_per_split_s) == (3e-6, 1e-7)


def test_validation_and_calibration_share_the_fit(tmp_path, monkeypatch):
    """One implementation: the validation model (heldout.fit_attention) and kvmodel calibrate (fit_fused) both call
    kvmodel.fused_fit.fit_fused_curves; the validation package's fit_occupancy is kvmodel's."""
    assert common.fit_occupancy is fused_fit.fit_occupancy
    assert h100_study.fit_occupancy is fused_fit.fit_occupancy
    calls = []

    def spy(p5, sm_count):
        calls.append((len(p5), sm_count))
        return fused_fit.FusedCurves()

    monkeypatch.setattr(fused_fit, "fit_fused_curves", spy)
    path = heldout.synthetic_attention(tmp_path / "decode_attention.csv", noise=0.0)
    d = heldout.load_attention(path)
    heldout.fit_attention(d[d.variant == ""])
    assert cal.fit_fused(cal.read_csv_rows(path), get_gpu("h200")) == {}
    n_default_p5 = int(((d.pipeline == "P5") & (d.variant == "")).sum())
    assert calls == [(n_default_p5, SMS), (n_default_p5, SMS)]


def test_add_fused_columns_fills_missing_splits_by_the_kernel_rule():
    import pandas as pd

    from kvmodel.timing import kernel_split_count

    d = pd.DataFrame({"B": [4, 4], "T": [8192, 8192], "Hq": [32, 32], "Hkv": [8, 8], "d": [128, 128],
                      "k_bits": [4, 4], "v_bits": [4, 4], "num_splits": [3, np.nan]})
    f = fused_fit.add_fused_columns(d, SMS, 50 * 2**20)
    assert f.num_splits.tolist() == [3.0, float(kernel_split_count(4, 4, 128, 4, 8, 8192, SMS))]
    assert f.programs.tolist() == [4 * 8 * 3.0, 4 * 8 * f.num_splits[1]]
    assert (f.format == "int4").all() and (f.loads == f.bytes_P5).all()
