"""Shared helpers of the validation package: data paths, error statistics, atomic writes, curve fitting (the fused
kernel's occupancy fit, :func:`fit_occupancy`, is :mod:`kvmodel.fused_fit`'s, re-exported here)."""

from __future__ import annotations

import json
import math
from importlib import resources
from pathlib import Path

import numpy as np

from kvmodel.fused_fit import fit_occupancy  # noqa: F401  (re-exported: the one occupancy fit, kvmodel's)
from kvmodel.fused_fit import lsq as _lsq
from kvmodel.fused_fit import r2_log as _r2_log
from kvmodel.specs import BandwidthCurve
from kvmodel.timing import curve_time_s


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


def curve_dict(c: BandwidthCurve) -> dict:
    return {k: v for k, v in c.model_dump().items() if v is not None}
