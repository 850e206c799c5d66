"""Fit the bandwidth curves and overheads of :mod:`kvmodel.timing` to measurements; read/write calibration YAML.

Analytic side only (numpy, scipy, pandas; never torch). Inputs are the CSVs ``kvmodel calibrate`` writes
(:mod:`kvmodel.measure.probes`, :mod:`kvmodel.measure.e2e_decode`) and, when present, the decode-attention grid
(``decode_attention.csv``: ``pipeline,B,T,Hq,Hkv,d,k_bits,v_bits,group,median_s,bytes_moved``).

Every op class gets the curve ``t = t0 + smoothmax(bytes, knee) / BW`` (:func:`kvmodel.timing.curve_time_s`),
time **per call** (one kernel / op invocation), fitted by bounded least squares on log time:

* ``read``, ``copy``  – streaming probes (copy bytes = read + write);
* ``weights``         – the q/k/v/o/gate/up/down GEMV/GEMM probes that are memory-bound (FLOPs at
  ``DEFAULT_FLOP_EFFICIENCY`` × datasheet take < half the time of the bytes at the read ceiling);
* ``lm_head``         – the LM-head probes (knee and sharpness taken from ``weights``: all points are large);
* ``attention:<P>``   – the attention grid when present, else the attention-only timings of the end-to-end
  step (``attn_s`` / layers, bytes = ``bytes_kv_pipeline`` / layers).

The fused kernel (P5) also gets occupancy curves from the grid (``Calibration.fused``, :func:`fit_fused`: program
waves per SM, per format, head dim and block shape, fitted by :mod:`kvmodel.fused_fit`, the fit the validation
model uses); :mod:`kvmodel.predict` times P5 calls by them and keeps the ``attention:P5...`` curves as the fallback.

Per-step and per-layer overheads are what the end-to-end step takes beyond the sum of its calls, as
:mod:`kvmodel.predict` charges them: residual = measured − (weights + attention), fitted as
``step_overhead_s + layers × layer_overhead_s`` (non-negative least squares). Hugging Face runtimes share the
kernel-level curves and get their own overheads, and their own ``attention:P0`` curve (their SDPA path differs).

    python -m kvmodel.calibration --data validation/data/h200 --out hardware/calibrations
"""

from __future__ import annotations

import argparse
import csv
import math
import re
import sys
from importlib import resources
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import yaml
from scipy.optimize import least_squares, nnls

from kvmodel.specs import (BandwidthCurve, Calibration, FusedKernelCurve, GPUSpec, SpecError, get_gpu,
                           gpu_for_device_name, load_yaml_spec)
from kvmodel.timing import (DEFAULT_FLOP_EFFICIENCY, curve_time_s, expand_charged_bytes, expand_reread_miss,
                            fused_curve_key, kernel_config, kernel_config_key, sdpa_charged_bytes)

RUNTIMES = ("kvmodel-graph", "hf-eager", "hf-static-graph")
MiB = 1024**2

__all__ = [
    "CalibrationDataError", "fit_curve", "curve_quality", "fit_stream", "fit_weights", "fit_lm_head",
    "fit_attention", "fit_curve_reread", "fit_curves_pairs", "fit_p0_pairs", "expand_points_from_grid",
    "p0_points_from_grid", "grid_calibration_rows", "fit_fused",
    "fit_overheads", "attention_op", "fit_calibration", "fit_all", "write_calibration",
    "load_calibration",
    "find_calibration", "calibration_path", "gpu_slug", "read_csv_rows",
]


class CalibrationDataError(ValueError):
    """The measurement files are missing or hold too little to fit; the message says what."""


# ----------------------------------------------------------------------------------------------------------------
# Curve fitting
# ----------------------------------------------------------------------------------------------------------------

_BOUNDS = {  # physical ranges (inclusive); the fit is done in transformed coordinates
    "t0_s": (0.0, 1e-2),
    "bw_GBps": (1.0, 1e5),
    "knee_bytes": (1.0, 1e11),
    "sharpness": (1.0, 8.0),
}


def curve_quality(nbytes, times, curve: BandwidthCurve) -> dict:
    """R² of log time, median |error| in %, and n for ``curve`` against measured ``times``."""
    x = np.asarray(nbytes, float)
    t = np.asarray(times, float)
    pred = curve_time_s(x, curve.t0_s, curve.bw_GBps, curve.knee_bytes, curve.sharpness)
    lt, lp = np.log(t), np.log(pred)
    ss_res = float(np.sum((lt - lp) ** 2))
    ss_tot = float(np.sum((lt - lt.mean()) ** 2))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res < 1e-12 else 0.0)
    return {"r2": r2, "median_abs_pct_error": float(np.median(np.abs(pred / t - 1.0)) * 100.0), "n_points": len(t)}


def fit_curve(nbytes, times, fixed: Optional[dict] = None, init: Optional[dict] = None,
              loss: str = "soft_l1") -> BandwidthCurve:
    """Fit ``t = t0 + smoothmax(bytes, knee)/BW`` to (bytes, seconds) by bounded least squares on log time.

    ``fixed``: parameters held constant (e.g. ``{"knee_bytes": 1e7, "sharpness": 2}``). Several starting points
    are tried; the best (lowest cost) wins. The result carries R², median |error| % and n.
    """
    x = np.asarray(nbytes, float)
    t = np.asarray(times, float)
    ok = np.isfinite(x) & np.isfinite(t) & (t > 0) & (x >= 0)
    x, t = x[ok], t[ok]
    if len(t) < 2:
        raise CalibrationDataError(f"need at least 2 points to fit a curve, got {len(t)}")
    fixed = dict(fixed or {})
    names = [n for n in ("t0_s", "bw_GBps", "knee_bytes", "sharpness") if n not in fixed]
    # too few points for every parameter: hold the shape parameters first
    for n_drop in ("sharpness", "knee_bytes"):
        if len(t) < len(names) + 1 and n_drop in names:
            fixed[n_drop] = {"sharpness": 2.0, "knee_bytes": 1.0}[n_drop]
            names.remove(n_drop)

    # coordinates: t0 in microseconds, log10 bw, log10 knee, sharpness
    def to_u(name, v):
        if name == "t0_s":
            return v * 1e6
        if name in ("bw_GBps", "knee_bytes"):
            return math.log10(max(v, 1.0))
        return v

    def from_u(name, u):
        if name == "t0_s":
            return u * 1e-6
        if name in ("bw_GBps", "knee_bytes"):
            return 10.0**u
        return u

    lo = [to_u(n, _BOUNDS[n][0]) for n in names]
    hi = [to_u(n, _BOUNDS[n][1]) for n in names]

    def params(u):
        p = dict(fixed)
        p.update({n: from_u(n, v) for n, v in zip(names, u)})
        return p

    lt = np.log(t)

    def resid(u):
        p = params(u)
        pred = curve_time_s(x, p["t0_s"], p["bw_GBps"], p["knee_bytes"], p["sharpness"])
        return np.log(np.maximum(pred, 1e-30)) - lt

    # starting points from the data: plateau bandwidth from the largest points, floor from the smallest
    big = x >= np.quantile(x, 0.75)
    bw0 = float(np.clip(np.median(x[big] / t[big]) / 1e9, 2.0, 9e4))
    tmin = float(np.min(t))
    starts = []
    for t0_frac in (0.05, 0.5, 0.9):
        for knee in (1e5, 1e7, 1e8):
            for n in (1.5, 3.0):
                s = {"t0_s": tmin * t0_frac, "bw_GBps": bw0, "knee_bytes": knee, "sharpness": n}
                if init:
                    s.update({k: v for k, v in init.items() if k in s})
                starts.append([float(np.clip(to_u(k, s[k]), lo_, hi_)) for k, lo_, hi_ in zip(names, lo, hi)])
    best = None
    for u0 in starts:
        try:
            r = least_squares(resid, u0, bounds=(lo, hi), loss=loss, f_scale=0.05, max_nfev=400)
        except (ValueError, FloatingPointError):
            continue
        if best is None or r.cost < best.cost:
            best = r
    if best is None:
        raise CalibrationDataError("curve fit failed from every starting point")
    p = params(best.x)
    curve = BandwidthCurve(t0_s=float(p["t0_s"]), bw_GBps=float(p["bw_GBps"]),
                           knee_bytes=float(p["knee_bytes"]), sharpness=float(p["sharpness"]))
    return curve.model_copy(update=curve_quality(x, t, curve))


def _robust_cost(pred, times) -> float:
    """The fits' soft-L1 cost (scale 0.05) of log-time residuals."""
    r = np.log(np.maximum(np.asarray(pred, float), 1e-30) / np.asarray(times, float))
    return float(np.sum(np.sqrt(1.0 + (r / 0.05) ** 2) - 1.0))


def fit_curve_reread(nbytes, reread_bytes, times, fit=None, max_weight: float = 2.0) -> BandwidthCurve:
    """A P0-expand curve with its repeat-read term: ``t = curve(bytes + w x reread_bytes)``
    (:func:`kvmodel.timing.expand_charged_bytes`; ``reread_bytes``: the repeat reads DRAM serves, i.e.
    ``attn_bytes_P0_expand_reread`` x :func:`kvmodel.timing.expand_reread_miss`). The weight w in
    [0, ``max_weight``] is found by a bounded scalar search on the robust cost, the curve re-fitted by ``fit``
    (default :func:`fit_curve`; any ``fit(bytes, times) -> BandwidthCurve``) at each w. Without DRAM-served repeat
    reads among the points the weight is not identified: the plain curve, ``reread_weight`` None."""
    from scipy.optimize import minimize_scalar

    fit = fit or fit_curve
    x = np.asarray(nbytes, float)
    r = np.asarray(reread_bytes, float)
    t = np.asarray(times, float)
    if not np.any(r > 0):
        return fit(x, t)

    def curve_at(w):
        return fit(expand_charged_bytes(x, r, 1.0, w), t)

    def cost(w):
        c = curve_at(w)
        return _robust_cost(curve_time_s(expand_charged_bytes(x, r, 1.0, w), c.t0_s, c.bw_GBps, c.knee_bytes,
                                         c.sharpness), t)

    res = minimize_scalar(cost, bounds=(0.0, max_weight), method="bounded", options={"xatol": 1e-3})
    w = float(res.x) if cost(float(res.x)) <= cost(0.0) else 0.0
    return curve_at(w).model_copy(update={"reread_weight": w})


#: Extra calibration rows beside a decode-attention grid ``<stem>.csv``: ``<stem>_calib.csv`` (the grid's format;
#: written by ``python -m kvmodel.measure.p5_calib_probe``: explicit split counts, variant ``sp<N>``).
GRID_CALIB_SUFFIX = "_calib"


#: Upper bound of SDPA's fitted half-efficiency pair count (:func:`fit_curves_pairs`), pairs.
SDPA_PAIRS_HALF_MAX = 64.0


def fit_curves_pairs(points: dict, fit=None, max_half: float = SDPA_PAIRS_HALF_MAX) -> dict:
    """P0 (SDPA) curves with their (sequence, KV head) pair term, one saturation parameter shared by all of them:
    ``points[key] = (bytes, pairs, seconds)`` (pairs = B x Hkv); each key's curve is fitted by ``fit`` (default
    :func:`fit_curve`; any ``fit(bytes, times) -> BandwidthCurve``) at the charged bytes
    (:func:`kvmodel.timing.sdpa_charged_bytes`), and ``pairs_half`` in [0, ``max_half``] by a bounded scalar
    search on the summed robust cost (log pairs_half; 0 = off kept when no better). Shared: SDPA's parallelism over
    pairs is one mechanism whatever the head dim, and only some head dims have calls of few pairs (the training
    split's d = 128 model never has fewer than 8, Qwen2.5-0.5B at d = 64 has 2-256). Without two distinct pair
    counts among the points the term is not identified: the plain curves, ``pairs_half`` None. Returns key ->
    BandwidthCurve."""
    from scipy.optimize import minimize_scalar

    fit = fit or fit_curve
    pts = {k: tuple(np.asarray(a, float) for a in v) for k, v in points.items() if len(v[0]) >= 2}
    if not pts:
        return {}
    if np.unique(np.concatenate([p for _, p, _ in pts.values()])).size < 2:
        return {k: fit(x, t) for k, (x, _, t) in pts.items()}

    def fitted(h):
        """(summed robust cost, curves) with every key's curve fitted at the bytes charged for ``h``."""
        tot, curves = 0.0, {}
        for k, (x, p, t) in pts.items():
            xb = sdpa_charged_bytes(x, p, h)
            c = curves[k] = fit(xb, t)
            tot += _robust_cost(curve_time_s(xb, c.t0_s, c.bw_GBps, c.knee_bytes, c.sharpness), t)
        return tot, curves

    res = minimize_scalar(lambda lh: fitted(float(np.exp(lh)))[0], bounds=(np.log(0.1), np.log(max_half)),
                          method="bounded", options={"xatol": 1e-2})
    h = float(np.exp(res.x))
    (cost_h, curves_h), (cost_0, curves_0) = fitted(h), fitted(0.0)
    h, curves = (h, curves_h) if cost_h <= cost_0 else (0.0, curves_0)
    return {k: c.model_copy(update={"pairs_half": h}) for k, c in curves.items()}


def _json_file(path: Path) -> dict:
    import json

    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def grid_kernel_version(grid_path) -> Optional[str]:
    """Fused-kernel version that measured the decode-attention grid at ``grid_path`` (its provenance's
    ``kernel_version``) when :mod:`kvmodel.timing` ports it, else None (the current kernel's rules apply)."""
    from kvmodel.timing import KERNEL_PORT_VERSIONS

    grid_path = Path(grid_path)
    v = _json_file(grid_path.with_name(grid_path.stem + ".provenance.json")).get("kernel_version")
    return v if v in KERNEL_PORT_VERSIONS else None


def grid_calibration_rows(grid_path) -> tuple[list[dict], str]:
    """The extra calibration rows beside the decode-attention grid at ``grid_path`` (``<stem>_calib.csv``), as rows
    of the grid: explicit-split variants ``sp<N>`` become 'default' (the default kernel at a given split count: the
    measured ``num_splits`` is what the fits use); ablation variants are dropped. None when the file is absent or
    its provenance names another kernel version than the grid's. Returns (rows, note)."""
    grid_path = Path(grid_path)
    path = grid_path.with_name(grid_path.stem + GRID_CALIB_SUFFIX + ".csv")
    if not path.exists():
        return [], "not present"
    kv_grid = _json_file(grid_path.with_name(grid_path.stem + ".provenance.json")).get("kernel_version")
    kv_cal = _json_file(path.with_name(path.stem + ".provenance.json")).get("kernel_version")
    if kv_grid and kv_cal and kv_grid != kv_cal:
        return [], f"left out: measured with kernel {kv_cal}, the grid with {kv_grid}"
    rows = []
    for r in read_csv_rows(path):
        v = (r.get("variant") or "default").strip()
        if v == "default" or re.fullmatch(r"sp\d+", v):
            rows.append({**r, "variant": "default"})
    return rows, f"{len(rows)} rows"


def expand_points_from_grid(grid_rows: Sequence[dict], l2_bytes: float) -> dict[str, tuple[list, list, list]]:
    """(bytes, DRAM-served repeat-read bytes, seconds) of the grid's P0-expand rows, under ``attention:P0-expand``
    and ``attention:P0-expand:d<d>`` (the keys :func:`attention_points_from_grid` files them under). Repeat reads:
    symbolic ``attn_bytes_P0_expand_reread`` x :func:`kvmodel.timing.expand_reread_miss`."""
    from kvmodel import traffic

    pts: dict[str, tuple[list, list, list]] = {}
    for r in grid_rows:
        if not _ok(r) or (r.get("variant") or "default") != "default" or r.get("pipeline") != "P0-expand":
            continue
        b, t = _f(r, "bytes_moved"), _f(r, "median_s")
        dims = [_f(r, k) for k in ("B", "T", "Hq", "Hkv", "d")]
        if not (b and t) or not all(dims):
            continue
        B, T, Hq, Hkv, d = dims
        rr = float(traffic.expand_reread_bytes(B, T, Hq, Hkv, d))
        rr *= float(expand_reread_miss(T, d, l2_bytes))
        for k in ("attention:P0-expand", f"attention:P0-expand:d{int(d)}"):
            xs, rs, ts = pts.setdefault(k, ([], [], []))
            xs.append(b)
            rs.append(rr)
            ts.append(t)
    return pts


# ----------------------------------------------------------------------------------------------------------------
# Reading measurement files
# ----------------------------------------------------------------------------------------------------------------


def p0_points_from_grid(grid_rows: Sequence[dict]) -> dict[str, tuple[list, list, list]]:
    """(bytes, pairs, seconds) of the grid's default P0 (SDPA) rows under ``attention:P0`` and
    ``attention:P0:d<d>`` (the keys :func:`attention_points_from_grid` files them under); pairs = B x Hkv, the
    (sequence, KV head) pairs of :func:`kvmodel.timing.sdpa_pair_efficiency`."""
    pts: dict[str, tuple[list, list, list]] = {}
    for r in grid_rows:
        if not _ok(r) or (r.get("variant") or "default") != "default" or r.get("pipeline") != "P0":
            continue
        b, t, B, H, d = (_f(r, k) for k in ("bytes_moved", "median_s", "B", "Hkv", "d"))
        if not (b and t and B and H and d):
            continue
        for k in ("attention:P0", f"attention:P0:d{int(d)}"):
            xs, ps, ts = pts.setdefault(k, ([], [], []))
            xs.append(b), ps.append(B * H), ts.append(t)
    return pts


def fit_p0_pairs(att: dict, grid_rows: Sequence[dict], min_points: int = 4) -> dict:
    """``att`` with its SDPA curves (``attention:P0:d<d>``, and the pooled ``attention:P0``) re-fitted with the
    (sequence, KV head) pair term: one ``pairs_half`` shared by the head dims (:func:`fit_curves_pairs`), the pooled
    curve then fitted at that value. Keys without grid points are left as they are."""
    pts = p0_points_from_grid(grid_rows)
    per_d = {k: v for k, v in pts.items() if k != "attention:P0" and k in att and len(v[0]) >= min_points}
    if not per_d:
        return att
    out = dict(att)
    out.update(fit_curves_pairs(per_d))
    h = next(iter(out[k] for k in per_d)).pairs_half
    if "attention:P0" in pts and "attention:P0" in att and len(pts["attention:P0"][0]) >= min_points:
        x, p, t = (np.asarray(a, float) for a in pts["attention:P0"])
        out["attention:P0"] = fit_curve(sdpa_charged_bytes(x, p, h), t).model_copy(update={"pairs_half": h})
    return out


def read_csv_rows(path) -> list[dict]:
    """Complete rows of a results CSV (a torn last line is ignored)."""
    path = Path(path)
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    rows = list(csv.DictReader(text.splitlines()))
    return [r for r in rows if None not in r.values() and None not in r]


def _f(r: dict, k: str) -> Optional[float]:
    try:
        v = float(r.get(k, ""))
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _ok(r: dict) -> bool:
    return r.get("status", "ok") in ("ok", "ok-eager", "") and (_f(r, "median_s") or 0) > 0


# ----------------------------------------------------------------------------------------------------------------
# Fits per op class
# ----------------------------------------------------------------------------------------------------------------


def fit_stream(probe_rows: Sequence[dict], op: str = "read") -> tuple[Optional[BandwidthCurve], Optional[float]]:
    """Curve of ``read`` (best implementation per size) or ``copy``, and the ceiling (best GB/s ≥ 256 MiB)."""
    by_size: dict[float, float] = {}
    for r in probe_rows:
        if r.get("op") != op or not _ok(r):
            continue
        b, t = _f(r, "bytes_moved"), _f(r, "median_s")
        if b and t and (b not in by_size or t < by_size[b]):
            by_size[b] = t
    if not by_size:
        return None, None
    x = np.array(sorted(by_size))
    t = np.array([by_size[v] for v in x])
    big = x >= 256 * MiB * (2 if op == "copy" else 1)
    ceiling = float(np.max(x[big] / t[big]) / 1e9) if big.any() else float(np.max(x / t) / 1e9)
    curve = fit_curve(x, t) if len(x) >= 2 else None
    return curve, ceiling


def fit_weights(probe_rows: Sequence[dict], peak_flops: float, ceiling_GBps: float,
                memory_bound_ratio: float = 0.5) -> tuple[BandwidthCurve, int]:
    """``weights`` curve from memory-bound GEMV/GEMM probes; returns (curve, rows excluded as compute-bound)."""
    xs, ts, excluded = [], [], 0
    for r in probe_rows:
        if r.get("op") != "weights" or not _ok(r):
            continue
        b, t, fl = _f(r, "bytes_moved"), _f(r, "median_s"), _f(r, "flops") or 0.0
        if not b or not t:
            continue
        if fl / peak_flops > memory_bound_ratio * b / (ceiling_GBps * 1e9):
            excluded += 1
            continue
        xs.append(b)
        ts.append(t)
    if len(xs) < 2:
        raise CalibrationDataError("probes.csv holds fewer than 2 memory-bound 'weights' rows")
    return fit_curve(xs, ts), excluded


def fit_lm_head(probe_rows: Sequence[dict], weights: Optional[BandwidthCurve], peak_flops: float,
                ceiling_GBps: float, memory_bound_ratio: float = 0.5) -> Optional[BandwidthCurve]:
    xs, ts = [], []
    for r in probe_rows:
        if r.get("op") != "lm_head" or not _ok(r):
            continue
        b, t, fl = _f(r, "bytes_moved"), _f(r, "median_s"), _f(r, "flops") or 0.0
        if b and t and fl / peak_flops <= memory_bound_ratio * b / (ceiling_GBps * 1e9):
            xs.append(b)
            ts.append(t)
    if len(xs) < 2:
        return None
    fixed = {"knee_bytes": weights.knee_bytes, "sharpness": weights.sharpness} if weights else None
    return fit_curve(xs, ts, fixed=fixed)


def attention_op(pipeline: str, k_bits=None, v_bits=None) -> str:
    """Op-class name of an attention measurement: ``attention:<P>``; the quantized pipelines run at 16/16 (our
    FP16 split-K kernel) get ``attention:<P>-fp16`` so they do not blur the quantized curve."""
    try:
        fp16 = int(float(k_bits)) >= 16 and int(float(v_bits)) >= 16
    except (TypeError, ValueError):
        fp16 = False
    if pipeline in ("P1", "P5") and fp16:
        return f"attention:{pipeline}-fp16"
    return f"attention:{pipeline}"


def attention_points_from_grid(grid_rows: Sequence[dict]) -> dict[str, tuple[list, list]]:
    """(bytes, seconds) per ``attention:<pipeline>`` from the decode-attention grid."""
    pts: dict[str, tuple[list, list]] = {}
    for r in grid_rows:
        if not _ok(r) or (r.get("variant") or "default") != "default":  # ablations (nosplit, nogqa) left out
            continue
        b, t = _f(r, "bytes_moved"), _f(r, "median_s")
        p = (r.get("pipeline") or "").strip()
        if not (b and t and p):
            continue
        shape = None
        if p == "P5" and all(_f(r, k) for k in ("B", "Hkv", "T", "d")):
            cfg = kernel_config(_f(r, "k_bits"), _f(r, "v_bits"), _f(r, "d"), _f(r, "B"), _f(r, "Hkv"), _f(r, "T"))
            shape = kernel_config_key(cfg)
        _add_point(pts, p, r.get("k_bits"), r.get("v_bits"), b, t, head_dim=r.get("d"), shape=shape)
    return pts


def attention_points_from_e2e(e2e_rows: Sequence[dict]) -> dict[str, tuple[list, list]]:
    """(bytes per call, seconds per call) per ``attention:<pipeline>`` from the e2e step's attention-only timing
    (``attn_s`` over all layers; bytes ``bytes_kv_pipeline``; both divided by the layer count)."""
    pts: dict[str, tuple[list, list]] = {}
    for r in e2e_rows:
        if r.get("runtime", "kvmodel-graph") != "kvmodel-graph" or not _ok(r):
            continue
        a, b, L = _f(r, "attn_s"), _f(r, "bytes_kv_pipeline") or _f(r, "bytes_kv"), _f(r, "n_layers")
        if not (a and b and L):
            continue
        _add_point(pts, r["pipeline"], r.get("k_bits"), r.get("v_bits"), b / L, a / L)
    return pts


def _add_point(pts: dict, pipeline: str, k_bits, v_bits, nbytes: float, seconds: float, head_dim=None,
               shape: Optional[str] = None) -> None:
    """File one attention measurement under its pooled op (``attention:P5``, ``attention:P5-fp16``) and, for a
    quantized format, under ``attention:P5:k4v4`` too; with a head dim, also under ``...:d<d>`` keys (kernels
    differ in efficiency per head dim: SDPA at d=256, the instruction-bound quantized loop)."""
    op = attention_op(pipeline, k_bits, v_bits)
    keys = [op]
    try:
        kb, vb = int(float(k_bits)), int(float(v_bits))
    except (TypeError, ValueError):
        kb = vb = None
    try:
        d = int(float(head_dim)) if head_dim not in (None, "") else None
    except (TypeError, ValueError):
        d = None
    quantized = kb is not None and not op.endswith("-fp16") and (kb < 16 or vb < 16)
    if quantized:
        keys.append(f"{op}:k{kb}v{vb}")
    if d is not None:
        keys.append(f"{keys[-1]}:d{d}" if quantized else f"{op}:d{d}")
        if shape:  # the fused kernel's block shape (kernel_config): two programs with different costs per token
            keys.append(f"{keys[-1]}:{shape}")
    for k in keys:
        xs, ts = pts.setdefault(k, ([], []))
        xs.append(nbytes)
        ts.append(seconds)


def fit_attention(points: dict[str, tuple[list, list]], min_points: int = 4) -> dict[str, BandwidthCurve]:
    """One curve per op key. The pooled quantized curve ``attention:<P>`` is fitted on K4V4 alone when that
    format has points (the design's headline format; formats differ in efficiency); per-format curves
    ``attention:<P>:k<b>v<b>`` carry the others."""
    out = {}
    for op, (xs, ts) in sorted(points.items()):
        if op.count(":") == 1 and f"{op}:k4v4" in points and len(points[f"{op}:k4v4"][0]) >= min_points:
            xs, ts = points[f"{op}:k4v4"]
        if len(xs) >= min_points:
            out[op] = fit_curve(xs, ts)
    return out


def fit_fused(grid_rows: Sequence[dict], gpu: GPUSpec) -> dict[str, FusedKernelCurve]:
    """Occupancy curves of the fused kernel (P5) from the decode-attention grid's default-kernel rows, fitted by
    :func:`kvmodel.fused_fit.fit_fused_curves` (the validation model's fit), keyed by
    :func:`kvmodel.timing.fused_curve_key`. Rows need B, T, Hq, Hkv, d, k_bits, v_bits; the measured num_splits
    is used where present (else the kernel's rule). Empty when too few rows."""
    import pandas as pd

    from kvmodel import fused_fit

    need = ("B", "T", "Hq", "Hkv", "d", "k_bits", "v_bits")
    rows = [r for r in grid_rows if _ok(r) and (r.get("pipeline") or "").strip() == "P5"
            and (r.get("variant") or "default") == "default" and all(_f(r, k) for k in need)]
    if len(rows) < fused_fit.MIN_ROWS_POOLED:
        return {}
    d = pd.DataFrame(rows)
    d["median_s"] = pd.to_numeric(d["median_s"])
    d = fused_fit.add_fused_columns(d, gpu.sm_count, gpu.l2_cache_MiB * MiB)
    fc = fused_fit.fit_fused_curves(d, gpu.sm_count)
    out = {}
    for key, curve in list(fc.pooled.items()) + list(fc.per_shape.items()):
        inf = fc.info[key]
        out[fused_curve_key(*key)] = FusedKernelCurve(
            **curve.as_dict(), r2=float(inf["r2_log"]), n_points=int(inf["n_points"]),
            median_abs_pct_error=float(inf["median_abs_pct_error"]))
    return dict(sorted(out.items()))


# ----------------------------------------------------------------------------------------------------------------
# Overheads from end-to-end residuals
# ----------------------------------------------------------------------------------------------------------------


def _resolve_model(name: str):
    from kvmodel.specs import ModelSpec, get_model

    try:
        return get_model(name)
    except (KeyError, SpecError):
        from kvmodel.measure.e2e_decode import FALLBACK_MODELS  # torch-free at import

        if name in FALLBACK_MODELS:
            return ModelSpec(name=name, **FALLBACK_MODELS[name])
        raise


def _kv_format(r: dict):
    from kvmodel.specs import KVFormat

    return KVFormat(k_bits=int(float(r["k_bits"])), v_bits=int(float(r["v_bits"])),
                    group_size=int(float(r.get("group") or 32)))


def _components_s(gpu: GPUSpec, cal: Calibration, rows: Sequence[dict], attention_op: Optional[str] = None,
                  kernel_version: Optional[str] = None):
    """Predicted weights + attention seconds per e2e row, as kvmodel.predict charges them (no overheads), the fused
    kernel's calls by the launch rules of ``kernel_version`` (the one that measured the rows; None: current)."""
    from kvmodel.predict import attention_time_s, weights_time_s
    from kvmodel.timing import TimeModel

    tm = TimeModel(gpu, cal, kernel_version=kernel_version)
    w, a, L = [], [], []
    for r in rows:
        spec = _resolve_model(r["model"])
        B, T = float(r["B"]), float(r["T"])
        pipe = attention_op or r["pipeline"]
        w.append(float(weights_time_s(tm, spec, B)))
        a.append(float(attention_time_s(tm, spec, _kv_format(r), B, T, pipe)))
        L.append(spec.num_layers)
    return np.array(w), np.array(a), np.array(L, float)


def fit_overheads(measured, components, layers) -> tuple[float, float, dict]:
    """``measured − components ≈ step + layers × layer`` by non-negative least squares (relative weights)."""
    m = np.asarray(measured, float)
    c = np.asarray(components, float)
    L = np.asarray(layers, float)
    wgt = 1.0 / m
    A = np.stack([np.ones_like(L), L], axis=1) * wgt[:, None]
    (step, layer), _ = nnls(A, (m - c) * wgt)
    pred = c + step + layer * L
    q = {"n": len(m), "median_abs_pct_error": float(np.median(np.abs(pred / m - 1)) * 100),
         "max_abs_pct_error": float(np.max(np.abs(pred / m - 1)) * 100)}
    return float(step), float(layer), q


# ----------------------------------------------------------------------------------------------------------------
# The whole calibration
# ----------------------------------------------------------------------------------------------------------------


def gpu_slug(gpu: GPUSpec | str) -> str:
    """Short file-name form of a GPU: its shortest alias (``h200``), lower case."""
    if isinstance(gpu, str):
        names = [gpu]
    else:
        names = [gpu.name, *gpu.aliases]
    best = min(names, key=lambda s: (len(s), s))
    return re.sub(r"[^a-z0-9]+", "-", best.lower()).strip("-")


def _provenance(data_dir: Path, stem: str) -> dict:
    import json

    p = data_dir / f"{stem}.provenance.json"
    if p.exists():
        try:
            return json.loads(p.read_text())
        except (OSError, ValueError):
            return {}
    return {}


def _resolve_gpu(gpu: Optional[str], prov: dict) -> GPUSpec:
    name = gpu or prov.get("gpu_name") or prov.get("device_name")
    if not name:
        raise CalibrationDataError("no GPU named and the provenance files do not say which GPU was measured")
    return gpu_for_device_name(name)


def fit_calibration(data_dir, gpu: Optional[str] = None, runtime: str = "kvmodel-graph",
                    attention_csv=None, command: str = "",
                    fused: Optional[dict[str, FusedKernelCurve]] = None,
                    kernel_version: Optional[str] = None) -> Calibration:
    """Fit one runtime's :class:`Calibration` from ``data_dir`` (probes.csv, e2e_decode.csv and, if present,
    decode_attention.csv). ``fused``: the fused kernel's curves when already fitted from the same grid (they do not
    depend on the runtime), else :func:`fit_fused` fits them. ``kernel_version``: the fused kernel that measured
    the e2e rows, whose launch rules the overhead fit charges its P5 calls by (default: the grid's provenance,
    :func:`grid_kernel_version`, else the current kernel)."""
    data_dir = Path(data_dir)
    probe_rows = read_csv_rows(data_dir / "probes.csv")
    if not probe_rows:
        raise CalibrationDataError(f"{data_dir / 'probes.csv'}: missing or empty (run the probes first)")
    e2e_rows = read_csv_rows(data_dir / "e2e_decode.csv")
    grid_path = Path(attention_csv) if attention_csv else data_dir / "decode_attention.csv"
    grid_rows = read_csv_rows(grid_path)
    extra_rows, extra_note = grid_calibration_rows(grid_path) if grid_rows else ([], "")
    grid_rows = grid_rows + extra_rows
    if kernel_version is None and grid_rows:
        kernel_version = grid_kernel_version(grid_path)
    prov = _provenance(data_dir, "probes") or _provenance(data_dir, "e2e_decode")
    g = _resolve_gpu(gpu, prov)
    peak = g.fp16_dense_TFLOPS * 1e12 * DEFAULT_FLOP_EFFICIENCY

    read_curve, read_bw = fit_stream(probe_rows, "read")
    copy_curve, copy_bw = fit_stream(probe_rows, "copy")
    if read_bw is None:
        raise CalibrationDataError("probes.csv holds no 'read' rows")
    ops: dict[str, BandwidthCurve] = {}
    notes = []
    if read_curve:
        ops["read"] = read_curve
    if copy_curve:
        ops["copy"] = copy_curve
    ops["weights"], n_excl = fit_weights(probe_rows, peak, read_bw)
    notes.append(f"weights: GEMV/GEMM probes, {n_excl} compute-bound rows left out")
    lm = fit_lm_head(probe_rows, ops["weights"], peak, read_bw)
    if lm:
        ops["lm_head"] = lm
    if grid_rows:
        att = fit_attention(attention_points_from_grid(grid_rows))
        notes.append(f"attention: decode-attention grid {grid_path.name} ({len(grid_rows) - len(extra_rows)} rows"
                     + (f", + {len(extra_rows)} calibration rows of {grid_path.stem}{GRID_CALIB_SUFFIX}.csv)"
                        if extra_rows else ")"))
        # pipelines the grid lacks but the e2e step measured
        for op, c in fit_attention(attention_points_from_e2e(e2e_rows)).items():
            if op not in att:
                att[op] = c
                notes.append(f"{op}: from the e2e attention-only timings")
    else:
        att = fit_attention(attention_points_from_e2e(e2e_rows))
        if att:
            notes.append("attention: e2e attention-only timings (no decode_attention.csv yet)")
    # P0-expand: its repeat reads leave L2 once a (sequence, head) slab and its copy exceed it
    for op, (xs, rs, ts) in expand_points_from_grid(grid_rows, g.l2_cache_MiB * MiB).items():
        if op in att and len(xs) >= 4:
            att[op] = fit_curve_reread(xs, rs, ts)
    # P0 (SDPA): its bandwidth saturates in the (sequence, KV head) pairs of the call
    if grid_rows:
        att = fit_p0_pairs(att, grid_rows)
    ops.update(att)
    if fused is None:
        fused = fit_fused(grid_rows, g) if grid_rows else {}
    if fused:
        notes.append(f"fused P5: {len(fused)} occupancy curves from the decode-attention grid (kvmodel.fused_fit)")

    base = Calibration(gpu=g.name, runtime=runtime, read_bw_GBps=read_bw, copy_bw_GBps=copy_bw, ops=ops,
                       fused=fused)
    step_s, layer_s = 0.0, None
    rt_rows = [r for r in e2e_rows if r.get("runtime") == runtime and _ok(r)]
    if runtime == "kvmodel-graph":
        rows = [r for r in rt_rows if attention_op(r["pipeline"], r["k_bits"], r["v_bits"]) == f"attention:{r['pipeline']}"
                and f"attention:{r['pipeline']}" in ops]
        if rows:
            w, a, L = _components_s(g, base, rows, kernel_version=kernel_version)
            m = np.array([float(r["median_s"]) for r in rows])
            step_s, layer_s, q = fit_overheads(m, w + a, L)
            notes.append(f"overheads: e2e residuals, n={q['n']}, step model median |err| "
                         f"{q['median_abs_pct_error']:.1f}%, max {q['max_abs_pct_error']:.1f}%")
    elif rt_rows:
        step_s, layer_s, att_curve, q = _fit_hf_runtime(g, base, rt_rows)
        if att_curve is not None:
            ops["attention:P0"] = att_curve
        notes.append(f"{runtime}: overheads + attention:P0 fitted jointly to {q['n']} e2e rows, median |err| "
                     f"{q['median_abs_pct_error']:.1f}%, max {q['max_abs_pct_error']:.1f}%")
    else:
        raise CalibrationDataError(f"e2e_decode.csv holds no '{runtime}' rows")

    src = _provenance(data_dir, "e2e_decode") or prov
    return Calibration(
        gpu=g.name, runtime=runtime, device_name=str(src.get("device_name") or src.get("gpu_name") or ""),
        driver=str(src.get("driver") or ""), torch=str(src.get("torch") or ""), triton=str(src.get("triton") or ""),
        date=str(src.get("date") or ""), command=command or str(src.get("command") or ""),
        read_bw_GBps=read_bw, copy_bw_GBps=copy_bw, step_overhead_s=step_s, layer_overhead_s=layer_s,
        ops=ops, fused=fused, fused_kernel_version=(kernel_version or "") if fused else "", notes="; ".join(notes),
    )


def _fit_hf_runtime(g: GPUSpec, base: Calibration, rows: Sequence[dict]):
    """HF runtimes: measured = step + L·layer + weights(base curves) + L·attn_curve(bytes per layer).

    The attention curve's knee and sharpness come from ``attention:P0`` of our runtime when known."""
    w, _, L = _components_s(g, base, rows, attention_op="P0")
    m = np.array([float(r["median_s"]) for r in rows])
    kv_per_layer = np.array([float(r["bytes_kv"]) for r in rows]) / L
    ref = base.ops.get("attention:P0")
    knee = ref.knee_bytes if ref else 1e6
    n = ref.sharpness if ref else 2.0
    if len(rows) < 4:
        step, layer, q = fit_overheads(m, w, L)
        return step, layer, None, q

    def resid(u):
        step, layer, t0, lbw = u[0] * 1e-6, u[1] * 1e-6, u[2] * 1e-6, u[3]
        att = curve_time_s(kv_per_layer, t0, 10**lbw, knee, n)
        pred = w + step + L * (layer + att)
        return np.log(pred) - np.log(m)

    r = least_squares(resid, [10.0, 10.0, 5.0, 3.3], bounds=([0, 0, 0, 0.0], [1e5, 1e5, 1e4, 5.0]),
                      loss="soft_l1", f_scale=0.05)
    step, layer, t0, lbw = r.x[0] * 1e-6, r.x[1] * 1e-6, r.x[2] * 1e-6, r.x[3]
    att = BandwidthCurve(t0_s=t0, bw_GBps=10**lbw, knee_bytes=knee, sharpness=n)
    pred = np.exp(resid(r.x)) * m
    err = np.abs(pred / m - 1) * 100
    att = att.model_copy(update=dict(n_points=len(m), median_abs_pct_error=float(np.median(err)),
                                     r2=_r2(np.log(m), np.log(pred))))
    return step, layer, att, {"n": len(m), "median_abs_pct_error": float(np.median(err)),
                              "max_abs_pct_error": float(np.max(err))}


def _r2(y, yhat) -> float:
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    return 1.0 - float(np.sum((y - yhat) ** 2)) / ss_tot if ss_tot > 0 else 1.0


# ----------------------------------------------------------------------------------------------------------------
# YAML
# ----------------------------------------------------------------------------------------------------------------


def _package_calibrations_dir() -> Path:
    return Path(str(resources.files("kvmodel.hardware"))) / "calibrations"


def calibration_path(gpu: GPUSpec | str, runtime: str = "kvmodel-graph", root=None) -> Path:
    """``<root>/<gpu-slug>-<runtime>.yaml`` (root: the package's ``hardware/calibrations``)."""
    root = Path(root) if root is not None else _package_calibrations_dir()
    return root / f"{gpu_slug(gpu)}-{runtime}.yaml"


def calibration_yaml(cal: Calibration) -> str:
    data = cal.model_dump(mode="json", exclude_none=True)
    head = (f"# kvmodel calibration: {cal.gpu} / runtime {cal.runtime}. Written by `kvmodel calibrate`; curves are\n"
            f"# t = t0_s + smoothmax(bytes, knee_bytes; sharpness) / bw_GBps per call (kvmodel.timing); `fused`:\n"
            "# the fused kernel's occupancy curves (kvmodel.timing.OccupancyCurve, fitted by kvmodel.fused_fit).\n")
    return head + yaml.safe_dump(data, sort_keys=False, width=110)


def write_calibration(cal: Calibration, path=None, root=None) -> Path:
    """Write ``cal`` as YAML atomically (default: the package's ``hardware/calibrations/<gpu>-<runtime>.yaml``)."""
    from kvmodel.atomic import atomic_write_text

    if path is None:
        try:
            g = get_gpu(cal.gpu)
        except KeyError:
            g = cal.gpu
        path = calibration_path(g, cal.runtime, root)
    return atomic_write_text(path, calibration_yaml(cal))


def load_calibration(path) -> Calibration:
    """Read a calibration YAML (validated; :class:`~kvmodel.specs.SpecError` names the file and field)."""
    return load_yaml_spec(path, Calibration)


def find_calibration(gpu_name: str, runtime: str = "kvmodel-graph", root=None) -> Optional[Calibration]:
    """The shipped calibration of ``gpu_name`` (catalog name or alias) for ``runtime``, or None if absent."""
    root = Path(root) if root is not None else _package_calibrations_dir()
    if not root.is_dir():
        return None
    try:
        g = get_gpu(gpu_name)
        names = {g.name}
    except KeyError:
        g, names = None, {gpu_name}
    p = calibration_path(g if g is not None else gpu_name, runtime, root)
    if p.exists():
        return load_calibration(p)
    for f in sorted(root.glob("*.yaml")):  # any file name: match on the content
        try:
            cal = load_calibration(f)
        except SpecError:
            continue
        if cal.runtime == runtime and cal.gpu in names:
            return cal
    return None


def fit_all(data_dir, out_root=None, gpu: Optional[str] = None, runtimes: Iterable[str] = RUNTIMES,
            attention_csv=None, command: str = "", log=print) -> list[Path]:
    """Fit and write every runtime ``data_dir``'s e2e file measured (kvmodel-graph is required)."""
    present = {r.get("runtime") for r in read_csv_rows(Path(data_dir) / "e2e_decode.csv") if _ok(r)}
    written = []
    fused = None  # the fused kernel's curves: fitted with the first runtime, shared by the others
    for rt in runtimes:
        if rt != "kvmodel-graph" and rt not in present:
            continue
        cal = fit_calibration(data_dir, gpu, rt, attention_csv, command, fused=fused)
        fused = cal.fused
        p = write_calibration(cal, root=out_root)
        written.append(p)
        log(summarize(cal, p))
    return written


def summarize(cal: Calibration, path=None) -> str:
    lines = [f"{cal.gpu} / {cal.runtime}" + (f" -> {path}" if path else ""),
             f"  read ceiling {cal.read_bw_GBps:.0f} GB/s, copy {cal.copy_bw_GBps or 0:.0f} GB/s; "
             f"step overhead {cal.step_overhead_s * 1e6:.1f} us, layer overhead "
             f"{(cal.layer_overhead_s or 0) * 1e6:.2f} us"]
    for op, c in cal.ops.items():
        lines.append(f"  {op:22s} t0 {c.t0_s * 1e6:7.2f} us  BW {c.bw_GBps:7.0f} GB/s  knee {c.knee_bytes:10.3g} B  "
                     f"n {c.sharpness:4.2f}  R2 {c.r2 if c.r2 is not None else float('nan'):6.3f}  "
                     f"med|err| {c.median_abs_pct_error if c.median_abs_pct_error is not None else float('nan'):5.1f}%"
                     f"  ({c.n_points} pts)")
    for key, f in cal.fused.items():
        lines.append(f"  {key:34s} occupancy: t0 {f.t0_s * 1e6:6.2f} us  r1 {f.r1_GBps:6.2f} GB/s  rc "
                     f"{f.rc_GBps:6.2f} GB/s  c_res {f.c_res:2d}  med|err| "
                     f"{f.median_abs_pct_error if f.median_abs_pct_error is not None else float('nan'):5.1f}%"
                     f"  ({f.n_points} pts)")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="Fit calibration YAMLs from measured CSVs (no GPU needed)")
    ap.add_argument("--data", required=True, help="folder with probes.csv, e2e_decode.csv [, decode_attention.csv]")
    ap.add_argument("--out", default=None, help="folder for <gpu>-<runtime>.yaml (default: the package's)")
    ap.add_argument("--gpu", default=None, help="catalog GPU (default: from the provenance files)")
    ap.add_argument("--attention", default=None, help="decode-attention grid CSV (default: <data>/decode_attention.csv)")
    a = ap.parse_args(argv)
    try:
        fit_all(a.data, a.out, a.gpu, attention_csv=a.attention, command=" ".join(["kvmodel.calibration", *sys.argv[1:]]))
    except (CalibrationDataError, SpecError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
