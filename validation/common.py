"""Shared helpers of the validation package: data paths, error statistics, atomic writes, curve fitting."""

from __future__ import annotations

import json
import math
from importlib import resources
from pathlib import Path

import numpy as np

from kvmodel.specs import BandwidthCurve
from kvmodel.timing import OccupancyCurve, curve_time_s


def package_dir() -> Path:
    """The installed ``kvmodel.validation`` folder (the repository's validation/ in an editable install)."""
    return Path(str(resources.files("kvmodel.validation")))


def data_path(*parts: str) -> Path:
    return package_dir().joinpath("data", *parts)


# ----------------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------------


def pct_error(pred, meas):
    """Signed percentage error of predictions: 100 * (pred / meas - 1)."""
    return 100.0 * (np.asarray(pred, dtype=float) / np.asarray(meas, dtype=float) - 1.0)


def error_stats(pred, meas) -> dict:
    """median / p90 / max absolute % error, signed median (bias) and n."""
    e = pct_error(pred, meas)
    e = e[np.isfinite(e)]
    if e.size == 0:
        return {"n": 0, "median_abs_pct": None, "p90_abs_pct": None, "max_abs_pct": None, "median_signed_pct": None}
    a = np.abs(e)
    return {
        "n": int(e.size),
        "median_abs_pct": round(float(np.median(a)), 2),
        "p90_abs_pct": round(float(np.percentile(a, 90)), 2),
        "max_abs_pct": round(float(a.max()), 2),
        "median_signed_pct": round(float(np.median(e)), 2),
    }


def grouped_stats(df, by, pred="pred_s", meas="meas_s") -> dict:
    """error_stats per group of ``df`` (a pandas frame) by column(s) ``by``."""
    out = {}
    for key, g in df.groupby(by, sort=True):
        key = key[0] if isinstance(key, tuple) and len(key) == 1 else key
        out[str(key) if not isinstance(key, tuple) else "/".join(map(str, key))] = error_stats(g[pred], g[meas])
    return out


def md_table(rows: list[dict], cols: list[str], headers: list[str] | None = None) -> str:
    """A Markdown table of ``rows`` (dicts) over ``cols``."""
    headers = headers or cols

    def fmt(v):
        if v is None:
            return "–"
        if isinstance(v, float):
            if math.isnan(v):
                return "–"
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Atomic writes
# ----------------------------------------------------------------------------------------------------------------


from kvmodel.atomic import atomic_write_bytes, atomic_write_text  # noqa: E402,F401  (re-exported)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return None if not np.isfinite(o) else float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def atomic_savefig(fig, path: Path, dpi: int = 110) -> None:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


# ----------------------------------------------------------------------------------------------------------------
# Fitting
# ----------------------------------------------------------------------------------------------------------------


def _lsq(residual, x0, bounds=None):
    from scipy.optimize import least_squares

    kw = {} if bounds is None else {"bounds": bounds}
    return least_squares(residual, x0, loss="soft_l1", f_scale=0.05, max_nfev=4000, **kw)


def fit_curve(nbytes, t_s, base_s=None, sharpness=None) -> BandwidthCurve:
    """Fit ``t = base + t0 + smoothmax(bytes, knee)/BW`` (log-time least squares, robust soft-L1 loss).

    ``base_s``: a known time added to every point (e.g. the rest of a pipeline), default 0. ``sharpness``: fix the
    smooth-max exponent instead of fitting it.
    """
    nbytes = np.asarray(nbytes, dtype=float)
    t_s = np.asarray(t_s, dtype=float)
    base = np.zeros_like(t_s) if base_s is None else np.asarray(base_s, dtype=float)
    rest = np.maximum(t_s - base, 1e-9)
    # start: plateau BW from the largest calls, t0 from the smallest, knee at 1/4 of the median bytes
    big = nbytes >= np.percentile(nbytes, 80)
    bw0 = float(np.median(nbytes[big] / rest[big])) / 1e9
    t00 = max(float(np.min(rest)) * 0.5, 1e-7)
    knee0 = max(float(np.median(nbytes)) * 0.25, 1.0)
    fix_n = sharpness is not None

    def unpack(th):
        t0, bw, knee = np.exp(th[:3])
        n = sharpness if fix_n else float(np.exp(th[3]))
        return t0, bw, knee, n

    def model(th):
        t0, bw, knee, n = unpack(th)
        return base + curve_time_s(nbytes, t0, bw, knee, n)

    best = None
    for n0 in ([sharpness] if fix_n else [2.0, 6.0]):
        x0 = np.log([t00, max(bw0, 1e-3), knee0] + ([] if fix_n else [n0]))
        lo = [np.log(1e-8), np.log(1e-3), np.log(1.0)] + ([] if fix_n else [np.log(0.5)])
        hi = [np.log(1.0), np.log(1e5), np.log(1e12)] + ([] if fix_n else [np.log(200.0)])
        x0 = np.clip(x0, np.array(lo) + 1e-6, np.array(hi) - 1e-6)
        r = _lsq(lambda th: np.log(model(th) / t_s), x0, bounds=(lo, hi))
        if best is None or r.cost < best.cost:
            best = r
    t0, bw, knee, n = unpack(best.x)
    pred = model(best.x)
    return BandwidthCurve(t0_s=float(t0), bw_GBps=float(bw), knee_bytes=float(knee), sharpness=float(n),
                          r2=_r2_log(t_s, pred), n_points=int(t_s.size),
                          median_abs_pct_error=float(np.median(np.abs(pct_error(pred, t_s)))))


def _r2_log(t, pred) -> float:
    y = np.log(t)
    ss_res = float(np.sum((y - np.log(pred)) ** 2))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    return 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")


def fit_occupancy(programs, nbytes, t_s, sm_count: int, head_dim=128, c_res_choices=(2, 3, 4),
                  fit_head_dim=True, splits=None, overheads: bool = False,
                  merge_in_rounds: bool = False, one_split: bool = False,
                  l2_hit=None, l2_rate_scale=None) -> tuple[OccupancyCurve, dict]:
    """Fit a fused kernel's :class:`OccupancyCurve` to measured calls.

    Parameters: t0, the sharing rate r_c, the lone-program rate r_1 = r_c * c_res^u with u in [0, 1] (a lone program
    cannot beat its whole SM), optionally the head-dim exponent, and with ``overheads`` a per-program fixed cost
    (in bytes) and a split-K merge cost a + b * splits (needs ``splits``), or with ``merge_in_rounds``
    a + b * rounds (:func:`kvmodel.timing.merge_rounds`: the v3 merge loads its splits 16 at a time). c_res (programs resident per SM) is an
    integer, 2..4 by default (a 4-warp program always fits twice on a Hopper SM): each choice is fitted and the
    fewest resident programs within 1 % of the best robust cost kept. Returns (curve, fit info).
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
    use_merge = overheads and sp is not None and bool(np.any(sp > 1))
    big = programs >= np.percentile(programs, 75)
    plateau0 = float(np.median(nbytes[big] / t_s[big])) / 1e9

    def make(th, c):
        t0, rc = np.exp(th[0]), np.exp(th[1])
        u = th[2]
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
        mpr = 0.0
        if merge_in_rounds:
            mps, mpr = 0.0, mps
        s1 = float(np.exp(th[k])) if fit_s1 else 1.0
        k += 1 if fit_s1 else 0
        sl2 = float(np.exp(th[k])) if fit_l2 else float(l2_rate_scale or 1.0)
        return OccupancyCurve(l2_rate_scale=sl2, t0_s=float(t0), r1_GBps=float(rc * c ** u), rc_GBps=float(rc),
                              c_res=int(c),
                              head_dim_exponent=float(e), program_overhead_bytes=w0, merge_s=ms,
                              merge_per_split_s=mps, merge_per_round_s=mpr, one_split_rate_scale=s1)

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
        x0 = np.clip(x0, np.array(lo) + 1e-9, np.array(hi) - 1e-9)

        def resid(th, c=c):
            return np.log(make(th, c).time_s(programs, nbytes, sm_count, head_dim=hd, splits=sp, l2_hit=l2h) / t_s)

        r = _lsq(resid, x0, bounds=(lo, hi))
        results.append((r.cost, c, r.x))
    best = min(r[0] for r in results)
    # parsimony: the fewest resident programs whose fit is within 1 % of the best
    cost, c, th = min((r for r in results if r[0] <= best * 1.01 + 1e-12), key=lambda x: x[1])
    curve = make(th, c)
    pred = curve.time_s(programs, nbytes, sm_count, head_dim=hd, splits=sp, l2_hit=l2h)
    info = {"c_res_costs": {int(ci): round(float(co), 4) for co, ci, _ in results},
            "r2_log": _r2_log(t_s, pred), "n_points": int(t_s.size),
            "median_abs_pct_error": float(np.median(np.abs(pct_error(pred, t_s))))}
    return curve, info


def curve_dict(c: BandwidthCurve) -> dict:
    return {k: v for k, v in c.model_dump().items() if v is not None}
