"""Fit the fused decode-attention kernel's (P5) occupancy curves to measured calls: the one implementation used by
``kvmodel calibrate`` (:mod:`kvmodel.calibration`) and by the validation model (``kvmodel.validation.heldout``).

Each call is timed by :class:`kvmodel.timing.OccupancyCurve` (programs in waves of ``c_res`` per SM, symbolic
``fused_wave_time``) with programs = ``fused_programs_splitk`` (B x Hkv x splits) and bytes = ``attn_bytes_P5``.
One curve per (K/V format, head dim), all block shapes pooled, and one per (format, head dim, block shape) where the
kernel launches more than one shape (:func:`kvmodel.timing.kernel_config`) and the rows allow. The L2-served rate
(``l2_rate_scale``) is one value shared by every curve, fitted by alternating with the curves; so is the split-K
merge, one ``merge_s + merge_per_split_s x splits`` per head dim (:data:`FUSED_MERGE_PER_HEAD_DIM`: the merge launch
reads fp32 partials of d channels whatever the format and block shape of the split kernel).

Analytic side only: numpy, scipy, pandas (never torch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pandas as pd

from kvmodel import traffic
from kvmodel.timing import (OccupancyCurve, kernel_config, kernel_config_key, kernel_split_count,
                            l2_hit_fraction)

#: A (format, head dim) gets its pooled curve from this many rows.
MIN_ROWS_POOLED = 6
#: A block shape gets its own curve from this many rows (else the pooled curve of its format and head dim). 5: the
#: small-launch (64, 4) shape of a format whose large launches use another shape has 5 calibration rows at d = 128
#: in the committed split; the pooled curve, dominated by the other shape's rows, missed those launches by up to 31 %.
MIN_ROWS_PER_SHAPE = 5
#: Programs at which an SM's throughput saturates for the 1-warp 32-token shape (``n32w1``), held fixed in its fit:
#: an SM has 4 warp schedulers, and up to 4 one-warp programs issue without competing. Fits that see programs per
#: SM below 8 (d = 64, whose B = 1-2 launches have 256-512 programs) find 3.7-4.6; the d = 128 rows (>= 1,024
#: programs) cannot tell, and a free knee there mispredicted 512-program launches by up to 27 %. Used only with a
#: hard saturation: the shapes of :data:`SM_SATURATION_SHAPES` fit their knee together with the sharpness (the
#: calibration probe's 256-512-program launches at d = 128 identify both).
KNEE_PROGRAMS_1WARP = 4
#: Resident programs per SM tried for a pooled curve (a 4-warp program always fits twice on a Hopper SM).
C_RES_CHOICES_POOLED = (2, 3, 4)
#: Resident programs per SM tried when fitting a block shape's curve (1-warp programs fit many times per SM).
C_RES_CHOICES = (2, 3, 4, 6, 8, 9, 10, 11, 12, 16)
#: Fit the one-split launch's own per-program rate (the kernel's SPLIT=False specialization).
FUSED_ONE_SPLIT = True
#: Time the split-K merge in rounds of split loads (kvmodel.timing.merge_rounds) instead of per split.
FUSED_MERGE_IN_ROUNDS = False
#: One split-K merge cost per head dim, shared by all formats and block shapes, fitted by alternating with the
#: curves (:func:`_fit_merge_per_head_dim`). Per curve, the merge was identified by one 128-split training row per
#: curve and over-charged 64-128-split calls of short programs; the calibration probe's same-work pairs
#: (``kvmodel.measure.p5_calib_probe``) identify it per head dim.
FUSED_MERGE_PER_HEAD_DIM = True
#: Alternations of (merge per head dim with the curves held, the curves with the merge held).
FUSED_MERGE_ITERATIONS = 2
#: Fit the SM's saturation in resident programs smoothly (``OccupancyCurve.sm_sharpness``) for these block shapes:
#: the 1-2-warp programs, many of which fit on an SM and whose latency-bound loops keep gaining from co-resident
#: programs past the knee (calibration probe, same work: 2 / 4 / 8 programs per SM at 8/8 d = 128 take
#: 222 / 158 / 144 us, 4/4 125 / 78 / 68 us; a hard knee at 4 says 2 : 1 : 1).
FUSED_SM_SATURATION = True
SM_SATURATION_SHAPES = ("n32w1", "n32w2")
#: Bounds of the fitted sharpness (1: f(k) ~ k/(1 + k/knee); 16: nearly the hard min).
SM_SHARPNESS_MIN, SM_SHARPNESS_MAX = 1.0, 16.0
#: Model the L2-resident loads of the smallest benchmark calls (one rate shared by all curves).
FUSED_L2 = True
#: Alternations of (fit the curves with the L2 rate fixed, fit the L2 rate with the curves fixed), at most.
FUSED_L2_ITERATIONS = 2
#: The alternation stops early once the L2 rate moves by less than this fraction (the curves would not change).
FUSED_L2_TOLERANCE = 1e-3
#: Bound every curve's streaming by the call's DRAM bytes at the chip's read ceiling
#: (:func:`kvmodel.timing.fused_ceiling_time_s`): the rows' measured ``read_ceiling_GBps`` x one fraction shared by all
#: curves, fitted (:func:`fit_ceiling_fraction`) by alternating with the curves. Without it the one-wave launches'
#: time is flat in their programs and the small 4-warp shape's per-program rates came out unphysical (r1 ~10-20 TB/s
#: per program); the fp16 d = 128 T = 1K calls of 2-16 MB took 7.5-9.8 us, all predicted 8.7.
FUSED_CEILING = True
#: Bounds of the fitted fraction of the measured read ceiling.
CEILING_FRACTION_MIN, CEILING_FRACTION_MAX = 0.5, 2.0


def format_label(k_bits, v_bits) -> str:
    """Short name of a K/V format: 'fp16', 'int4' (equal bits) or 'k16v4'."""
    k, v = int(k_bits), int(v_bits)
    return "fp16" if (k, v) == (16, 16) else (f"int{k}" if k == v else f"k{k}v{v}")


# ----------------------------------------------------------------------------------------------------------------
# Rows
# ----------------------------------------------------------------------------------------------------------------


def add_fused_columns(d: pd.DataFrame, sm_count: int, l2_bytes: float) -> pd.DataFrame:
    """A copy of decode-attention rows with what the P5 fit needs: ``format``, ``bytes_P5``, ``bytes_P5_perq``,
    ``num_splits`` (the measured one; missing ones by the kernel's rule, :func:`kvmodel.timing.kernel_split_count`),
    ``programs``, ``loads`` (bytes the programs load), ``config`` (block shape key), ``large_launch``,
    ``rotation_span`` (bytes of the benchmark's rotated input copies) and ``l2_hit``.

    Needs columns B, T, Hq, Hkv, d, k_bits, v_bits; optional group (32), variant ('' = default kernel; 'nogqa':
    one program per query head, 'nosplit': one split), num_splits and working_sets (1)."""
    d = d.copy()
    B, T, Hq, Hkv, hd = (pd.to_numeric(d[c]).to_numpy(float) for c in ("B", "T", "Hq", "Hkv", "d"))
    kb, vb = pd.to_numeric(d["k_bits"]).to_numpy(float), pd.to_numeric(d["v_bits"]).to_numpy(float)
    g = (pd.to_numeric(d["group"], errors="coerce").fillna(32.0).to_numpy(float) if "group" in d.columns
         else np.full(len(d), 32.0))
    variant = (d["variant"].fillna("").astype(str).replace("default", "").to_numpy() if "variant" in d.columns
               else np.full(len(d), ""))
    nogqa = variant == "nogqa"
    prog_heads = np.where(nogqa, Hq, Hkv)
    d["format"] = [format_label(k, v) for k, v in zip(kb, vb)]
    d["bytes_P5"] = traffic.attention_layer_bytes("P5", B, T, Hq, Hkv, hd, kb, vb, g)
    vals = {"B": B, "T": T, "H_q": Hq, "H_kv": Hkv, "d": hd, "d_v": hd, "d_q": hd, "b_a": 2, "b_k": kb, "b_v": vb,
            "g": g, "m_k": np.where(kb >= 16, 0, 2), "m_v": np.where(vb >= 16, 0, 2)}
    d["bytes_P5_perq"] = traffic.evaluate("attn_bytes_P5_nosplit_loads", vals)
    ns = (np.array(pd.to_numeric(d["num_splits"], errors="coerce"), dtype=float) if "num_splits" in d.columns
          else np.full(len(d), np.nan))
    miss = ~np.isfinite(ns)
    if miss.any():
        ns[miss] = [1.0 if v == "nosplit" else float(kernel_split_count(k, v_, h, b, ph, t, sm_count))
                    for k, v_, h, b, ph, t, v in zip(kb[miss], vb[miss], hd[miss], B[miss], prog_heads[miss],
                                                     T[miss], variant[miss])]
    d["num_splits"] = ns
    d["programs"] = np.where(nogqa, B * Hq * ns, traffic.evaluate("fused_programs_splitk",
                                                                  {"B": B, "H_kv": Hkv, "n_split": ns}))
    d["loads"] = np.where(nogqa, d["bytes_P5_perq"], d["bytes_P5"])
    # the block shape of each call (the kernel's own rule, ported: kvmodel.timing.kernel_config)
    cfgs = [kernel_config(k, v, h, b, ph, t) for k, v, h, b, ph, t in zip(kb, vb, hd, B, prog_heads, T)]
    d["config"] = [kernel_config_key(c) for c in cfgs]
    d["large_launch"] = [bool(c["large"]) for c in cfgs]
    # the benchmark cycles over `working_sets` copies of each call's inputs; a pool that fits in L2 stays there
    ws = (pd.to_numeric(d["working_sets"], errors="coerce").fillna(1.0).to_numpy(float)
          if "working_sets" in d.columns else 1.0)
    d["rotation_span"] = d["loads"].to_numpy(float) * ws
    d["l2_hit"] = l2_hit_fraction(d["rotation_span"], l2_bytes)
    return d


# ----------------------------------------------------------------------------------------------------------------
# One curve
# ----------------------------------------------------------------------------------------------------------------


def lsq(residual, x0, bounds=None):
    """Robust least squares (soft-L1 loss, scale 0.05 in log time) as every curve fit here uses it."""
    from scipy.optimize import least_squares

    kw = {} if bounds is None else {"bounds": bounds}
    return least_squares(residual, x0, loss="soft_l1", f_scale=0.05, max_nfev=4000, **kw)


def r2_log(t, pred) -> float:
    """R² of log time."""
    y = np.log(t)
    ss_res = float(np.sum((y - np.log(pred)) ** 2))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    return 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")


def fit_occupancy(programs, nbytes, t_s, sm_count: int, head_dim=128, c_res_choices=C_RES_CHOICES_POOLED,
                  fit_head_dim=True, splits=None, overheads: bool = False,
                  merge_in_rounds: bool = False, one_split: bool = False,
                  l2_hit=None, l2_rate_scale=None, knee_programs=None,
                  merge_fixed=None, fit_sharpness: bool = False,
                  ceiling_GBps: float = 0.0) -> tuple[OccupancyCurve, dict]:
    """Fit a fused kernel's :class:`OccupancyCurve` to measured calls.

    Parameters: t0, the sharing rate r_c, the lone-program rate r_1 = r_c * c_res^u with u in [0, 1] (a lone program
    cannot beat its whole SM), optionally the head-dim exponent, and with ``overheads`` a per-program fixed cost
    (in bytes) and a split-K merge cost a + b * splits (needs ``splits``), or with ``merge_in_rounds``
    a + b * rounds (:func:`kvmodel.timing.merge_rounds`: the v3 merge loads its splits 16 at a time). With
    ``one_split`` the one-split launch's own rate where the rows hold both kinds of launch; with ``l2_hit`` (fraction
    of each call's loads served by L2) an L2-served rate, fitted unless ``l2_rate_scale`` holds it fixed. c_res
    (programs resident per SM) is an integer, 2..4 by default (a 4-warp program always fits twice on a Hopper SM):
    each choice is fitted and the fewest resident programs within 1 % of the best robust cost kept. ``knee_programs``:
    hold the programs per SM at which the SM saturates fixed (r_1 = c_res * r_c / knee) instead of fitting u.
    ``merge_fixed``: hold the split-K merge at ``(merge_s, merge_per_split_s)`` instead of fitting it.
    ``fit_sharpness``: fit the SM's saturation sharpness (``OccupancyCurve.sm_sharpness``, symbolic
    ``fused_wave_time_smooth``) and the knee (u) with it, instead of a hard min. ``ceiling_GBps``: the read ceiling
    (x its fraction) the calls' DRAM bytes are bounded by (``OccupancyCurve.ceiling_GBps``), held fixed; 0: off.
    Returns (curve, fit info: c_res_costs, r2_log, n_points, median_abs_pct_error).
    """
    programs = np.asarray(programs, dtype=float)
    nbytes = np.asarray(nbytes, dtype=float)
    t_s = np.asarray(t_s, dtype=float)
    hd = np.broadcast_to(np.asarray(head_dim, dtype=float), t_s.shape)
    sp = None if splits is None else np.asarray(splits, dtype=float)
    fit_e = fit_head_dim and np.unique(hd).size > 1
    # one-split launches run the kernel's SPLIT=False specialization: its own per-program rate, fitted when the
    # rows hold both kinds of launch
    l2h = None if l2_hit is None else np.broadcast_to(np.asarray(l2_hit, dtype=float), t_s.shape)
    # an L2-served rate, fitted when enough rows have their loads in L2 (>= 3) and enough do not
    # (``l2_rate_scale`` given: held fixed, e.g. one value shared by several curves)
    fit_l2 = (l2_rate_scale is None and l2h is not None and int(np.sum(l2h > 0.5)) >= 3
              and int(np.sum(l2h < 0.5)) >= 3)
    fit_s1 = (one_split and sp is not None and int(np.sum(sp <= 1)) >= 2 and int(np.sum(sp > 1)) >= 2)
    use_merge = overheads and sp is not None and bool(np.any(sp > 1)) and merge_fixed is None
    big = programs >= np.percentile(programs, 75)
    plateau0 = float(np.median(nbytes[big] / t_s[big])) / 1e9

    def make(th, c):
        t0, rc = np.exp(th[0]), np.exp(th[1])
        u = th[2]
        # an SM's throughput saturates at knee programs: r_1 = c * r_c / knee (u = 1 - ln k/ln c); with a fitted
        # sharpness the knee is fitted too (the saturation is no longer a corner)
        if knee_programs and not fit_sharpness:
            u = float(np.clip(1.0 - np.log(knee_programs) / np.log(c), 0.0, 1.0)) if c > 1 else 0.0
        k = 3
        e = 0.0
        if fit_e:
            e = th[k]
            k += 1
        w0 = ms = mps = 0.0
        if overheads:
            w0 = float(np.exp(th[k]))
            k += 1
            if use_merge:
                ms, mps = float(np.exp(th[k])), float(np.exp(th[k + 1]))
            k += 2 if use_merge else 0
        if merge_fixed is not None:
            ms, mps = float(merge_fixed[0]), float(merge_fixed[1])
        mpr = 0.0
        if merge_in_rounds:
            mps, mpr = 0.0, mps
        s1 = float(np.exp(th[k])) if fit_s1 else 1.0
        k += 1 if fit_s1 else 0
        sl2 = float(np.exp(th[k])) if fit_l2 else float(l2_rate_scale or 1.0)
        k += 1 if fit_l2 else 0
        nsat = float(np.exp(th[k])) if fit_sharpness else 0.0
        return OccupancyCurve(l2_rate_scale=sl2, t0_s=float(t0), r1_GBps=float(rc * c ** u), rc_GBps=float(rc),
                              c_res=int(c), sm_sharpness=nsat,
                              head_dim_exponent=float(e), program_overhead_bytes=w0, merge_s=ms,
                              merge_per_split_s=mps, merge_per_round_s=mpr, one_split_rate_scale=s1,
                              ceiling_GBps=float(ceiling_GBps or 0.0))

    results = []
    for c in c_res_choices:
        rc0 = max(plateau0 / (sm_count * c), 1e-3)
        x0 = [np.log(max(float(t_s.min()) * 0.5, 1e-7)), np.log(rc0), 0.5]
        lo = [np.log(1e-8), np.log(1e-4), 0.0]
        hi = [np.log(1.0), np.log(1e4), 1.0]
        if fit_e:
            x0.append(0.0), lo.append(-3.0), hi.append(3.0)
        if overheads:
            x0.append(np.log(4096.0)), lo.append(np.log(1.0)), hi.append(np.log(1e8))
            if use_merge:
                x0.append(np.log(2e-6)), lo.append(np.log(1e-9)), hi.append(np.log(1e-3))
                x0.append(np.log(2e-8)), lo.append(np.log(1e-11)), hi.append(np.log(1e-4))
        if fit_s1:
            x0.append(0.0), lo.append(np.log(0.5)), hi.append(np.log(2.0))
        if fit_l2:
            x0.append(np.log(1.5)), lo.append(0.0), hi.append(np.log(4.0))
        if fit_sharpness:
            x0.append(np.log(2.0)), lo.append(np.log(SM_SHARPNESS_MIN)), hi.append(np.log(SM_SHARPNESS_MAX))
        x0 = np.clip(x0, np.array(lo) + 1e-9, np.array(hi) - 1e-9)

        def resid(th, c=c):
            return np.log(make(th, c).time_s(programs, nbytes, sm_count, head_dim=hd, splits=sp, l2_hit=l2h) / t_s)

        r = lsq(resid, x0, bounds=(lo, hi))
        results.append((r.cost, c, r.x))
    best = min(r[0] for r in results)
    # parsimony: the fewest resident programs whose fit is within 1 % of the best
    cost, c, th = min((r for r in results if r[0] <= best * 1.01 + 1e-12), key=lambda x: x[1])
    curve = make(th, c)
    pred = curve.time_s(programs, nbytes, sm_count, head_dim=hd, splits=sp, l2_hit=l2h)
    info = {"c_res_costs": {int(ci): round(float(co), 4) for co, ci, _ in results},
            "r2_log": r2_log(t_s, pred), "n_points": int(t_s.size),
            "median_abs_pct_error": float(np.median(np.abs(pred / t_s - 1.0)) * 100.0)}
    return curve, info


# ----------------------------------------------------------------------------------------------------------------
# All curves of a grid
# ----------------------------------------------------------------------------------------------------------------


def curve_label(key: tuple) -> str:
    """'int4/d128' for a pooled key (k_bits, v_bits, head_dim), 'int4/d128/n32w1' for a block shape's."""
    return "/".join([format_label(key[0], key[1]), f"d{int(key[2])}", *map(str, key[3:])])


@dataclass
class FusedCurves:
    """The fused kernel's fitted curves: ``pooled[(k_bits, v_bits, head_dim)]`` (all block shapes) and
    ``per_shape[(k_bits, v_bits, head_dim, shape)]`` (shape = :func:`kvmodel.timing.kernel_config_key`), the shared
    L2-served rate scale, and each curve's fit info (:func:`fit_occupancy`) under the same key in ``info``."""

    pooled: dict = field(default_factory=dict)
    per_shape: dict = field(default_factory=dict)
    l2_rate_scale: float = 1.0
    info: dict = field(default_factory=dict)
    #: the measured read ceiling the curves are bounded by (GB/s) and the fitted fraction of it; 0: term off
    read_ceiling_GBps: float = 0.0
    ceiling_fraction: float = 0.0

    def curve(self, k_bits, v_bits, head_dim, shape: Optional[str] = None,
              nearest: bool = True) -> Optional[OccupancyCurve]:
        """The curve of the program the kernel runs: (format, head dim, block shape) when fitted, else the pooled
        curve of (format, head dim). ``nearest``: else the format's pooled curve at the nearest fitted head dim
        (log2 distance), else INT4's, else any format's; None when nothing fits."""
        k, v, d = int(k_bits), int(v_bits), int(head_dim)
        if shape and (k, v, d, shape) in self.per_shape:
            return self.per_shape[(k, v, d, shape)]
        if (k, v, d) in self.pooled or not nearest:
            return self.pooled.get((k, v, d))
        same = ({kd[2]: c for kd, c in self.pooled.items() if kd[:2] == (k, v)}
                or {kd[2]: c for kd, c in self.pooled.items() if kd[:2] == (4, 4)}
                or {kd[2]: c for kd, c in self.pooled.items()})
        if not same:
            return None
        dims = np.array(sorted(same))
        return same[int(dims[np.argmin(np.abs(np.log2(dims) - np.log2(float(d))))])]

    def all_curves(self) -> list:
        return list(self.pooled.values()) + list(self.per_shape.values())

    def time_s(self, rows: pd.DataFrame, sm_count: int, l2: bool = True, nearest: bool = True) -> np.ndarray:
        """Predicted seconds of rows prepared by :func:`add_fused_columns` (programs, loads, num_splits,
        config, l2_hit); NaN where no curve applies. ``l2``: charge the rows' L2 hits (benchmark calls)."""
        out = np.full(len(rows), np.nan)
        if len(rows) == 0:
            return out
        keys = rows[["k_bits", "v_bits", "d", "config"]].astype({"k_bits": int, "v_bits": int, "d": int})
        for (k, v, d, cfg), idx in keys.groupby(["k_bits", "v_bits", "d", "config"]).indices.items():
            occ = self.curve(k, v, d, cfg or None, nearest=nearest)
            if occ is None:
                continue
            g = rows.iloc[idx]
            out[idx] = occ.time_s(g["programs"].to_numpy(float), g["loads"].to_numpy(float), sm_count,
                                  head_dim=g["d"].to_numpy(float), splits=g["num_splits"].to_numpy(float),
                                  l2_hit=g["l2_hit"].to_numpy(float) if l2 and "l2_hit" in g.columns else None)
        return out


def _fit_curves(p5: pd.DataFrame, sm_count: int, l2_rate_scale: float, merge: Optional[dict] = None,
                read_ceiling_GBps: float = 0.0, ceiling_fraction: float = 0.0) -> FusedCurves:
    """Every pooled and per-shape curve with the L2-served rate held at ``l2_rate_scale`` (and, with ``merge``,
    the split-K merge held at ``merge[head_dim] = (merge_s, merge_per_split_s)``; with ``read_ceiling_GBps`` and
    ``ceiling_fraction`` > 0, bounded by the read ceiling x that fraction)."""
    out = FusedCurves(l2_rate_scale=l2_rate_scale, read_ceiling_GBps=float(read_ceiling_GBps or 0.0),
                      ceiling_fraction=float(ceiling_fraction or 0.0))
    ceil = out.read_ceiling_GBps * out.ceiling_fraction

    def fit(g, c_res_choices, knee=None, sharp=False):
        mf = None if merge is None else merge.get(int(g["d"].iloc[0]))
        return fit_occupancy(g["programs"], g["loads"], g["median_s"], sm_count, head_dim=g["d"],
                             c_res_choices=c_res_choices, splits=g["num_splits"], overheads=True,
                             one_split=FUSED_ONE_SPLIT, merge_in_rounds=FUSED_MERGE_IN_ROUNDS,
                             l2_hit=g["l2_hit"] if FUSED_L2 else None, l2_rate_scale=l2_rate_scale,
                             knee_programs=knee, merge_fixed=mf, fit_sharpness=sharp, ceiling_GBps=ceil)

    for (kb, vb, hd), g in p5.groupby(["k_bits", "v_bits", "d"]):
        if len(g) < MIN_ROWS_POOLED:
            continue
        key = (int(kb), int(vb), int(hd))
        out.pooled[key], out.info[key] = fit(g, C_RES_CHOICES_POOLED)
        # one curve per block shape the kernel actually launches (kernel_config): small launches run 4-warp
        # 64-token programs, large 4-bit launches 1-2-warp 32-token programs with other per-token costs and
        # residency; a (format, head dim) with one shape only keeps its pooled curve as that shape's curve
        if g["config"].nunique() < 2:
            continue
        for cfg, gc in g.groupby("config"):
            if len(gc) < MIN_ROWS_PER_SHAPE:
                continue
            knee = KNEE_PROGRAMS_1WARP if str(cfg) == "n32w1" else None
            sharp = FUSED_SM_SATURATION and str(cfg) in SM_SATURATION_SHAPES
            out.per_shape[key + (str(cfg),)], out.info[key + (str(cfg),)] = fit(gc, C_RES_CHOICES, knee, sharp)
    return out


def _fit_l2_scale(curves: FusedCurves, p5: pd.DataFrame, sm_count: int) -> float:
    """The shared L2-served rate scale, fitted on the rows whose rotation pool fits in L2 (curves held fixed)."""
    from scipy.optimize import minimize_scalar

    hit = p5[p5["l2_hit"] > 0.5]
    if len(hit) < 3:
        return 1.0
    meas = hit["median_s"].to_numpy(float)

    def cost(ls):
        s = float(np.exp(ls))
        for c in curves.all_curves():
            c.l2_rate_scale = s
        r = np.log(curves.time_s(hit, sm_count) / meas)
        r = r[np.isfinite(r)]
        return float(np.sum(np.sqrt(1.0 + (r / 0.05) ** 2) - 1.0))

    return float(np.exp(minimize_scalar(cost, bounds=(0.0, np.log(4.0)), method="bounded").x))


def _fit_merge_per_head_dim(curves: FusedCurves, p5: pd.DataFrame, sm_count: int) -> dict:
    """The split-K merge per head dim, ``(merge_s, merge_per_split_s)``, shared by every format and block shape
    of that head dim (the merge launch reads fp32 partials of d channels whatever the split kernel's format), fitted
    on the rows with splits > 1 with the curves' other terms held."""
    out = {}
    for hd, g in p5.groupby("d"):
        g = g[g["num_splits"] > 1]
        if len(g) < 3:
            continue
        saved = {}
        for c in curves.all_curves():
            saved[id(c)] = (c.merge_s, c.merge_per_split_s)
            c.merge_s = c.merge_per_split_s = 0.0
        base = curves.time_s(g, sm_count)
        for c in curves.all_curves():
            c.merge_s, c.merge_per_split_s = saved[id(c)]
        ok = np.isfinite(base)
        base, meas, ns = base[ok], g["median_s"].to_numpy(float)[ok], g["num_splits"].to_numpy(float)[ok]

        def resid(th):
            return np.log((base + np.exp(th[0]) + np.exp(th[1]) * ns) / meas)

        r = lsq(resid, [np.log(2e-6), np.log(5e-8)], bounds=([np.log(1e-9), np.log(1e-11)],
                                                             [np.log(1e-4), np.log(1e-5)]))
        out[int(hd)] = (float(np.exp(r.x[0])), float(np.exp(r.x[1])))
    return out


def read_ceiling_of(p5: pd.DataFrame) -> float:
    """The chip's measured read ceiling (GB/s) of a grid's rows: the median of their ``read_ceiling_GBps`` (each
    benchmark row carries the read probe of its run); 0 when the rows have none (the ceiling term stays off)."""
    if "read_ceiling_GBps" not in p5.columns:
        return 0.0
    v = pd.to_numeric(p5["read_ceiling_GBps"], errors="coerce").to_numpy(float)
    v = v[np.isfinite(v) & (v > 0)]
    return float(np.median(v)) if v.size else 0.0


def fit_ceiling_fraction(curves: FusedCurves, p5: pd.DataFrame, sm_count: int, read_ceiling_GBps: float) -> float:
    """The fraction of the measured read ceiling shared by every curve (``OccupancyCurve.ceiling_GBps`` =
    fraction x ``read_ceiling_GBps``), fitted on all rows with the curves' other terms held (soft-L1 in log time,
    bounded by :data:`CEILING_FRACTION_MIN`..:data:`CEILING_FRACTION_MAX`). Sets the curves to it; returns it."""
    from scipy.optimize import minimize_scalar

    meas = p5["median_s"].to_numpy(float)

    def set_to(f):
        for c in curves.all_curves():
            c.ceiling_GBps = f * read_ceiling_GBps
        curves.read_ceiling_GBps, curves.ceiling_fraction = float(read_ceiling_GBps), float(f)

    def cost(lf):
        set_to(float(np.exp(lf)))
        r = np.log(curves.time_s(p5, sm_count) / meas)
        r = r[np.isfinite(r)]
        return float(np.sum(np.sqrt(1.0 + (r / 0.05) ** 2) - 1.0))

    f = float(np.exp(minimize_scalar(cost, bounds=(np.log(CEILING_FRACTION_MIN), np.log(CEILING_FRACTION_MAX)),
                                     method="bounded").x))
    set_to(f)
    return f


def fit_fused_curves(p5: pd.DataFrame, sm_count: int) -> FusedCurves:
    """All P5 curves of a grid's default-kernel rows (prepared by :func:`add_fused_columns`, with ``median_s``):
    pooled per (format, head dim), per block shape where fitted, the split-K merge per head dim shared by all of
    them (:data:`FUSED_MERGE_PER_HEAD_DIM`, :data:`FUSED_MERGE_ITERATIONS` alternations), and one L2-served rate
    shared by all, found by alternating (:data:`FUSED_L2_ITERATIONS`) fits of the curves with it fixed and of it
    with the curves fixed, until it moves by less than :data:`FUSED_L2_TOLERANCE`. With :data:`FUSED_CEILING` and
    rows that carry ``read_ceiling_GBps``, every curve is bounded by the read ceiling x one fraction
    (:func:`fit_ceiling_fraction`, fitted once after the merge, starting from 1)."""
    l2s = 1.0
    ceil = read_ceiling_of(p5) if FUSED_CEILING else 0.0
    frac = 1.0 if ceil > 0 else 0.0
    curves = _fit_curves(p5, sm_count, l2s, None, ceil, frac)
    merge = None
    if FUSED_MERGE_PER_HEAD_DIM:
        for _ in range(FUSED_MERGE_ITERATIONS):
            merge = _fit_merge_per_head_dim(curves, p5, sm_count)
            curves = _fit_curves(p5, sm_count, l2s, merge, ceil, frac)
    if ceil > 0:
        frac = fit_ceiling_fraction(curves, p5, sm_count, ceil)
        curves = _fit_curves(p5, sm_count, l2s, merge, ceil, frac)
    if not FUSED_L2:
        return curves
    for _ in range(FUSED_L2_ITERATIONS):
        new = _fit_l2_scale(curves, p5, sm_count)
        if abs(np.log(new / l2s)) < FUSED_L2_TOLERANCE:
            for c in curves.all_curves():
                c.l2_rate_scale = new
            curves.l2_rate_scale = new
            break
        l2s = new
        curves = _fit_curves(p5, sm_count, l2s, merge, ceil, frac)
    return curves
