"""Fit the tensor-parallel link terms of the model to all-reduce measurements (issue 8). numpy/scipy only.

The model charges each decode step ``allreduce_time`` (:mod:`kvmodel.symbolic`)::

    2·L·(λ + 2(N−1)/N · B·h·b_a / BW_link)

i.e. one all-reduce of a message of ``x = B·h·b_a`` bytes over N GPUs takes ``t(x) = λ + 2(N−1)/N · x / BW``
(ring all-reduce: every GPU sends and receives 2(N−1)/N of the message). Given rows of
:mod:`kvmodel.measure.allreduce_probe` (``tp, bytes, median_s`` per all-reduce) — or the ``allreduce_s`` column
of :mod:`kvmodel.measure.tp_decode` (2·L calls of B × hidden per step) — this module fits, per N,

* ``latency_s`` = λ, the per-call latency (launch + synchronization + hops), and
* ``bw_GBps`` = BW, the effective per-direction link bandwidth *at decode message sizes* (NCCL's small-message
  protocols do not reach the datasheet bandwidth; that is the point of measuring it),

by non-negative least squares on relative error, refined with a robust (soft-L1) loss as
:mod:`kvmodel.calibration` does. With two or more N it also fits one bandwidth and λ(N) = launch + 2(N−1)·hop,
the decomposition :func:`kvmodel.predict.allreduce_latency_default_s` uses (``DEFAULT_ALLREDUCE_LAUNCH_S`` +
2(N−1)·``link.latency_s``).

How ``predict`` consumes the fit: a calibration's ``tp_link`` (:class:`~kvmodel.specs.TPLinkCalibration`, exactly
:meth:`LinkTerms.calibration_entry`) gives λ and BW per degree (``kvmodel.predict.allreduce_terms``: the degree's
own fit when it was measured, else launch + 2(N−1)·hop and the joint BW). :func:`calibration_with_link` fills it
into a calibration, and ``--calibration-out`` writes that calibration (atomically). Without a calibration,
``predict(..., tp=N, allreduce_latency_s=terms.latency_s(N))`` overrides λ alone, and
``kvmodel.predict.allreduce_time_s(model, B, N, terms.interconnect(link), terms.latency_s(N))`` takes both.

    python -m kvmodel.tp_fit validation/data/h200-tp/allreduce.csv [--mode graph] [--out tp_link.yaml] \
        [--calibration-out hardware/calibrations/h200-kvmodel-graph.yaml]
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
from scipy.optimize import least_squares, nnls

from kvmodel.calibration import _f, _ok  # the shared CSV-row helpers (numeric field, usable measurement)

__all__ = [
    "LinkFit",
    "LinkTerms",
    "ring_factor",
    "fit_link",
    "fit_link_terms",
    "points_from_probe_rows",
    "points_from_tp_rows",
    "link_terms_yaml",
    "calibration_with_link",
    "predict_tp_rows",
    "error_summary",
    "summarize",
    "main",
]

#: bounds of the fitted values (as in kvmodel.calibration)
LATENCY_BOUNDS_S = (0.0, 1e-2)
BW_BOUNDS_GBPS = (0.01, 1e5)


def ring_factor(n):
    """Bytes each GPU sends (and receives) per byte of message in a ring all-reduce over ``n`` GPUs: the
    ``allreduce_ring_factor`` of :mod:`kvmodel.symbolic` (the factor ``allreduce_time`` charges); a float for a
    scalar ``n``, an array for an array."""
    from kvmodel import traffic  # noqa: PLC0415 - sympy/lambdify only, no torch

    out = np.asarray(traffic.evaluate("allreduce_ring_factor", {"N": np.asarray(n, dtype=float)}), dtype=float)
    return float(out) if out.ndim == 0 else out


@dataclass
class LinkFit:
    """``t(x) = latency_s + ring_factor(tp) · x / (bw_GBps · 1e9)`` for one TP degree."""

    tp: int
    latency_s: float
    bw_GBps: float
    r2: float = float("nan")  # of log time
    median_abs_pct_error: float = float("nan")
    max_abs_pct_error: float = float("nan")
    n_points: int = 0
    bytes_range: tuple = (0, 0)
    note: str = ""

    def time_s(self, nbytes):
        return self.latency_s + ring_factor(self.tp) * np.asarray(nbytes, float) / (self.bw_GBps * 1e9)


@dataclass
class LinkTerms:
    """Fitted link terms: one :class:`LinkFit` per TP degree, and (two or more degrees) a joint fit
    ``t = launch_s + 2(N−1)·hop_latency_s + ring_factor(N)·x/BW`` with one ``bw_GBps``."""

    per_tp: dict = field(default_factory=dict)  # tp -> LinkFit
    bw_GBps: Optional[float] = None  # joint bandwidth (one degree: that degree's)
    launch_s: Optional[float] = None  # joint fit only
    hop_latency_s: Optional[float] = None  # joint fit only
    joint_r2: Optional[float] = None
    joint_median_abs_pct_error: Optional[float] = None
    source: str = ""

    def latency_s(self, tp: int) -> float:
        """λ for ``tp``: the degree's own fit when measured, else the joint launch + 2(N−1)·hop."""
        if tp in self.per_tp:
            return self.per_tp[tp].latency_s
        if self.launch_s is not None and self.hop_latency_s is not None:
            return self.launch_s + 2 * (tp - 1) * self.hop_latency_s
        raise KeyError(f"no all-reduce latency for tp={tp}: measured degrees {sorted(self.per_tp)}")

    def bandwidth_GBps(self, tp: Optional[int] = None) -> float:
        if tp is not None and tp in self.per_tp:
            return self.per_tp[tp].bw_GBps
        if self.bw_GBps is None:
            raise KeyError("no fitted bandwidth")
        return self.bw_GBps

    def time_s(self, nbytes, tp: int):
        return self.latency_s(tp) + ring_factor(tp) * np.asarray(nbytes, float) / (
            self.bandwidth_GBps(tp) * 1e9
        )

    def interconnect(self, base, tp: Optional[int] = None):
        """A copy of the catalog link ``base`` (:class:`~kvmodel.specs.Interconnect`) with the fitted bandwidth
        (and hop latency when the joint fit has one): ``allreduce_time_s(model, B, tp, link, latency_s)`` of
        :mod:`kvmodel.predict` takes it as is."""
        upd = {
            "bandwidth_per_direction_GBps": float(self.bandwidth_GBps(tp)),
            "notes": (base.notes + " " if base.notes else "") + f"bandwidth fitted to all-reduce timings "
            f"({self.source or 'measured'})",
        }
        if self.hop_latency_s is not None:
            upd["latency_s"] = float(self.hop_latency_s)
        return base.model_copy(update=upd)

    def predict_kwargs(self, tp: int) -> dict:
        """Keyword arguments of ``predict`` / ``step_time_s`` that override λ (without a calibrated ``tp_link``)."""
        return {"tp": tp, "allreduce_latency_s": self.latency_s(tp)}

    def calibration_entry(self) -> dict:
        """Plain data for a calibration file's ``tp_link`` block (:class:`~kvmodel.specs.TPLinkCalibration`)."""
        return {
            "bw_GBps": _r(self.bw_GBps),
            "launch_s": _r(self.launch_s),
            "hop_latency_s": _r(self.hop_latency_s),
            "joint_r2": _r(self.joint_r2),
            "source": self.source,
            "per_tp": {
                int(k): {
                    "latency_s": _r(v.latency_s),
                    "bw_GBps": _r(v.bw_GBps),
                    "r2": _r(v.r2),
                    "median_abs_pct_error": _r(v.median_abs_pct_error),
                    "n_points": v.n_points,
                }
                for k, v in sorted(self.per_tp.items())
            },
        }


def _r(v, digits: int = 6):
    if v is None:
        return None
    v = float(v)
    if not math.isfinite(v):
        return None
    return float(f"{v:.{digits}g}")


def _quality(t, pred) -> tuple[float, float, float]:
    lt, lp = np.log(t), np.log(np.maximum(pred, 1e-30))
    ss_res = float(np.sum((lt - lp) ** 2))
    ss_tot = float(np.sum((lt - lt.mean()) ** 2))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res < 1e-12 else 0.0)
    err = np.abs(pred / t - 1.0) * 100.0
    return r2, float(np.median(err)), float(np.max(err))


def _clean(x, t):
    x = np.asarray(x, float)
    t = np.asarray(t, float)
    ok = np.isfinite(x) & np.isfinite(t) & (t > 0) & (x >= 0)
    return x[ok], t[ok]


def fit_link(nbytes: Sequence[float], times: Sequence[float], tp: int, loss: str = "soft_l1") -> LinkFit:
    """Fit λ and BW of ``t = λ + ring_factor(tp)·x/BW`` to per-call times (seconds) of messages of ``nbytes``."""
    if tp < 2:
        raise ValueError("all-reduce link terms need tp >= 2")
    x, t = _clean(nbytes, times)
    if len(t) < 2 or len(np.unique(x)) < 2:
        raise ValueError(f"tp={tp}: need at least 2 distinct message sizes, got {len(np.unique(x))}")
    f = ring_factor(tp)
    # linear start: min sum((λ + c·f·x)/t − 1)^2 with λ, c >= 0 (relative error: small messages count as much)
    A = np.column_stack([1.0 / t, f * x / t])
    (lam0, c0), _ = nnls(A, np.ones_like(t))
    bw_lo, bw_hi = BW_BOUNDS_GBPS
    bw0 = float(np.clip(1.0 / (c0 * 1e9), bw_lo, bw_hi)) if c0 > 0 else bw_hi
    lam0 = float(np.clip(lam0, *LATENCY_BOUNDS_S))

    # robust refinement on relative residuals; coordinates: λ in µs, log10 BW
    def resid(u):
        lam, bw = u[0] * 1e-6, 10.0 ** u[1]
        return (lam + f * x / (bw * 1e9)) / t - 1.0

    lo = [LATENCY_BOUNDS_S[0] * 1e6, math.log10(bw_lo)]
    hi = [LATENCY_BOUNDS_S[1] * 1e6, math.log10(bw_hi)]
    u0 = [float(np.clip(lam0 * 1e6, lo[0], hi[0])), float(np.clip(math.log10(bw0), lo[1], hi[1]))]
    r = least_squares(resid, u0, bounds=(lo, hi), loss=loss, f_scale=0.05, max_nfev=400)
    lam, bw = float(r.x[0] * 1e-6), float(10.0 ** r.x[1])
    fit = LinkFit(
        tp=int(tp), latency_s=lam, bw_GBps=bw, n_points=len(t), bytes_range=(float(x.min()), float(x.max()))
    )
    fit.r2, fit.median_abs_pct_error, fit.max_abs_pct_error = _quality(t, fit.time_s(x))
    if bw >= bw_hi * 0.999:
        fit.note = "time flat in message size over the measured range: bandwidth unresolved (at its bound)"
    return fit


def _fit_joint(points: dict) -> tuple[float, float, float, float, float]:
    """One BW and λ(N) = launch + 2(N−1)·hop over several degrees; returns launch, hop, bw, r2, median error."""
    xs, ts, ns = [], [], []
    for tp, (x, t) in points.items():
        xs.append(x)
        ts.append(t)
        ns.append(np.full(len(t), float(tp)))
    x, t, n = np.concatenate(xs), np.concatenate(ts), np.concatenate(ns)
    f = 2.0 * (n - 1) / n
    A = np.column_stack([1.0 / t, 2.0 * (n - 1) / t, f * x / t])
    (a0, h0, c0), _ = nnls(A, np.ones_like(t))
    bw_lo, bw_hi = BW_BOUNDS_GBPS
    bw0 = float(np.clip(1.0 / (c0 * 1e9), bw_lo, bw_hi)) if c0 > 0 else bw_hi

    def resid(u):
        launch, hop, bw = u[0] * 1e-6, u[1] * 1e-6, 10.0 ** u[2]
        return (launch + 2.0 * (n - 1) * hop + f * x / (bw * 1e9)) / t - 1.0

    lo = [0.0, 0.0, math.log10(bw_lo)]
    hi = [LATENCY_BOUNDS_S[1] * 1e6, LATENCY_BOUNDS_S[1] * 1e6, math.log10(bw_hi)]
    u0 = [
        float(np.clip(a0 * 1e6, lo[0], hi[0])),
        float(np.clip(h0 * 1e6, lo[1], hi[1])),
        float(np.clip(math.log10(bw0), lo[2], hi[2])),
    ]
    r = least_squares(resid, u0, bounds=(lo, hi), loss="soft_l1", f_scale=0.05, max_nfev=600)
    launch, hop, bw = float(r.x[0] * 1e-6), float(r.x[1] * 1e-6), float(10.0 ** r.x[2])
    pred = launch + 2.0 * (n - 1) * hop + f * x / (bw * 1e9)
    r2, med, _ = _quality(t, pred)
    return launch, hop, bw, r2, med




def points_from_probe_rows(
    rows: Iterable[dict], mode: Optional[str] = "graph", backend: Optional[str] = None
) -> dict:
    """``{tp: (bytes, seconds per all-reduce)}`` from :mod:`kvmodel.measure.allreduce_probe` rows (tp ≥ 2,
    status ok; ``mode`` / ``backend`` filter when given and present in the rows)."""
    out: dict = {}
    for r in rows:
        if not _ok(r) or (_f(r, "tp") or 0) < 2:
            continue
        if mode and r.get("mode") not in (None, "", mode):
            continue
        if backend and r.get("backend") not in (None, "", backend):
            continue
        x = _f(r, "bytes")
        if x is None:
            B, h = _f(r, "B"), _f(r, "hidden")
            if B is None or h is None:
                continue
            x = B * h * 2
        out.setdefault(int(_f(r, "tp")), ([], []))
        out[int(_f(r, "tp"))][0].append(x)
        out[int(_f(r, "tp"))][1].append(_f(r, "median_s"))
    return {k: (np.asarray(v[0], float), np.asarray(v[1], float)) for k, v in out.items()}


def points_from_tp_rows(rows: Iterable[dict]) -> dict:
    """``{tp: (bytes, seconds per all-reduce)}`` from :mod:`kvmodel.measure.tp_decode` rows: ``allreduce_s`` is
    ``allreduce_calls_per_step`` (2·L) calls of ``allreduce_bytes_per_call`` (B × hidden × 2) bytes."""
    out: dict = {}
    for r in rows:
        tp, s = _f(r, "tp"), _f(r, "allreduce_s")
        calls, x = _f(r, "allreduce_calls_per_step"), _f(r, "allreduce_bytes_per_call")
        if (
            not tp
            or tp < 2
            or not s
            or not calls
            or x is None
            or r.get("status", "ok") not in ("ok", "ok-eager")
        ):
            continue
        out.setdefault(int(tp), ([], []))
        out[int(tp)][0].append(x)
        out[int(tp)][1].append(s / calls)
    return {k: (np.asarray(v[0], float), np.asarray(v[1], float)) for k, v in out.items()}


def fit_link_terms(
    rows_or_points,
    mode: Optional[str] = "graph",
    backend: Optional[str] = None,
    min_points: int = 3,
    source: str = "",
) -> LinkTerms:
    """Fit :class:`LinkTerms` from probe rows (dicts, e.g. :func:`kvmodel.calibration.read_csv_rows`) or from
    ``{tp: (bytes, seconds)}`` points. Degrees with fewer than ``min_points`` points are left out; with two or
    more degrees the joint fit (one bandwidth, λ = launch + 2(N−1)·hop) is added."""
    if isinstance(rows_or_points, dict):
        points = {
            int(k): (np.asarray(v[0], float), np.asarray(v[1], float)) for k, v in rows_or_points.items()
        }
    else:
        points = points_from_probe_rows(rows_or_points, mode=mode, backend=backend)
    points = {k: _clean(*v) for k, v in points.items() if k >= 2}
    points = {k: v for k, v in points.items() if len(v[1]) >= min_points and len(np.unique(v[0])) >= 2}
    if not points:
        raise ValueError(f"no TP degree with >= {min_points} all-reduce timings at >= 2 message sizes")
    terms = LinkTerms(per_tp={k: fit_link(x, t, k) for k, (x, t) in sorted(points.items())}, source=source)
    if len(points) >= 2:
        launch, hop, bw, r2, med = _fit_joint(points)
        terms.launch_s, terms.hop_latency_s, terms.bw_GBps = launch, hop, bw
        terms.joint_r2, terms.joint_median_abs_pct_error = r2, med
    else:
        only = next(iter(terms.per_tp.values()))
        terms.bw_GBps = only.bw_GBps
    return terms


def predict_tp_rows(rows: Iterable[dict], gpu, calibration=None, terms: Optional[LinkTerms] = None) -> list:
    """Prediction next to measurement for :mod:`kvmodel.measure.tp_decode` rows (status ok).

    The predicted step is :func:`kvmodel.predict.step_time_s` at the row's ``tp``; with ``terms`` its all-reduce
    part uses the fitted λ and bandwidth (the catalog link's bandwidth term is swapped for the fitted one — the
    step time is a sum, so this is exact). Returns dicts: model, tp, B, T, pipeline, k_bits, v_bits, measured_s,
    predicted_s, pct_error, measured_allreduce_s, predicted_allreduce_s."""
    from kvmodel.calibration import _kv_format, _resolve_model  # noqa: PLC0415 - torch-free
    from kvmodel.predict import allreduce_time_s, step_time_s, tp_link  # noqa: PLC0415
    from kvmodel.timing import TimeModel  # noqa: PLC0415

    tm = TimeModel(gpu, calibration)
    out = []
    for r in rows:
        if r.get("status") not in ("ok", "ok-eager") or not (_f(r, "median_s") or 0) > 0:
            continue
        tp, B, T = int(_f(r, "tp")), float(r["B"]), float(r["T"])
        spec, kv = _resolve_model(r["model"]), _kv_format(r)
        lat = terms.latency_s(tp) if (terms is not None and tp > 1) else None
        t = float(step_time_s(tm, spec, kv, B, T, r["pipeline"], tp=tp, allreduce_latency_s=lat))
        ar = 0.0
        if tp > 1:
            link = tp_link(gpu, tp)
            ar = float(allreduce_time_s(spec, B, tp, link, lat))
            if terms is not None:
                fitted = float(allreduce_time_s(spec, B, tp, terms.interconnect(link, tp), lat))
                t, ar = t - ar + fitted, fitted
        meas = float(r["median_s"])
        out.append(
            {
                "model": r["model"],
                "tp": tp,
                "B": int(B),
                "T": int(T),
                "pipeline": r["pipeline"],
                "k_bits": kv.k_bits,
                "v_bits": kv.v_bits,
                "measured_s": meas,
                "predicted_s": t,
                "pct_error": 100.0 * (t / meas - 1.0),
                "measured_allreduce_s": _f(r, "allreduce_s"),
                "predicted_allreduce_s": ar,
            }
        )
    return out


def error_summary(preds: Sequence[dict]) -> dict:
    """Median and worst |error| % per TP degree (and over all rows) of :func:`predict_tp_rows` output."""
    groups: dict = {"all": [p["pct_error"] for p in preds]}
    for p in preds:
        groups.setdefault(f"tp{p['tp']}", []).append(p["pct_error"])
    return {
        k: {
            "n": len(v),
            "median_abs_pct": float(np.median(np.abs(v))) if v else None,
            "max_abs_pct": float(np.max(np.abs(v))) if v else None,
        }
        for k, v in groups.items()
    }


def summarize(terms: LinkTerms) -> str:
    lines = []
    for tp, f in sorted(terms.per_tp.items()):
        lines.append(
            f"tp={tp}: λ = {f.latency_s * 1e6:.2f} us, BW = {f.bw_GBps:.1f} GB/s (R² {f.r2:.3f}, median "
            f"|err| {f.median_abs_pct_error:.1f} %, max {f.max_abs_pct_error:.1f} %, n {f.n_points}, "
            f"{f.bytes_range[0]:.0f}..{f.bytes_range[1]:.0f} B){' ' + f.note if f.note else ''}"
        )
    if terms.launch_s is not None:
        lines.append(
            f"joint: launch {terms.launch_s * 1e6:.2f} us + 2(N-1) x hop {terms.hop_latency_s * 1e6:.3f} us, "
            f"BW {terms.bw_GBps:.1f} GB/s (R² {terms.joint_r2:.3f}, median |err| "
            f"{terms.joint_median_abs_pct_error:.1f} %)"
        )
    return "\n".join(lines)


def link_terms_yaml(terms: LinkTerms) -> str:
    import yaml  # noqa: PLC0415

    return "# TP link terms fitted by kvmodel.tp_fit\n" + yaml.safe_dump(
        terms.calibration_entry(), sort_keys=False
    )


def calibration_with_link(cal, terms: LinkTerms):
    """A copy of calibration ``cal`` (:class:`~kvmodel.specs.Calibration`) with ``tp_link`` set from ``terms``
    (validated; a joint fit without a hop term records hop_latency_s = 0, i.e. λ = launch_s at every degree
    that was not measured itself)."""
    from kvmodel.specs import TPLinkCalibration  # noqa: PLC0415

    entry = dict(terms.calibration_entry())
    if entry.get("hop_latency_s") is None:
        entry["hop_latency_s"] = 0.0
    if entry.get("launch_s") is None:
        entry["launch_s"] = 0.0
    if entry.get("bw_GBps") is None:
        raise ValueError("the link fit has no joint bandwidth; cannot fill a calibration's tp_link")
    link = TPLinkCalibration.model_validate(entry)
    note = f"tp_link fitted by kvmodel.tp_fit ({terms.source or 'measured'})"
    notes = cal.notes if note in (cal.notes or "") else ((cal.notes + " " if cal.notes else "") + note)
    return cal.model_copy(update={"tp_link": link, "notes": notes})


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="Fit all-reduce latency and bandwidth (TP link terms)")
    ap.add_argument("csv", nargs="+", help="allreduce_probe CSV(s), or tp_decode CSV(s) with --from-steps")
    ap.add_argument("--mode", default="graph")
    ap.add_argument("--backend", default=None)
    ap.add_argument("--from-steps", action="store_true", help="fit the allreduce_s column of tp_decode rows")
    ap.add_argument("--out", default=None, help="write the terms as YAML here (atomically)")
    ap.add_argument("--compare", default=None, help="tp_decode CSV: print prediction error with the fitted terms")
    ap.add_argument("--gpu", default="h200", help="catalog GPU of --compare")
    ap.add_argument("--calibration", default=None,
                    help="calibration YAML for --compare and --calibration-out (default: the shipped one of --gpu)")
    ap.add_argument("--calibration-out", default=None,
                    help="write --calibration (or the shipped one of --gpu) with tp_link filled from this fit here "
                         "(atomically; may be the same file)")
    a = ap.parse_args(argv)
    from kvmodel.calibration import read_csv_rows  # noqa: PLC0415

    rows = [r for p in a.csv for r in read_csv_rows(p)]
    src = ", ".join(Path(p).name for p in a.csv)
    try:
        pts = points_from_tp_rows(rows) if a.from_steps else points_from_probe_rows(rows, a.mode, a.backend)
        terms = fit_link_terms(pts, source=src)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summarize(terms))
    if a.out:
        from kvmodel.measure.results import atomic_write_text  # noqa: PLC0415 - plain file I/O, no torch

        atomic_write_text(a.out, link_terms_yaml(terms))
    if a.calibration_out:
        from kvmodel.calibration import find_calibration, load_calibration, write_calibration  # noqa: PLC0415
        from kvmodel.specs import SpecError, get_gpu  # noqa: PLC0415

        try:
            base = load_calibration(a.calibration) if a.calibration else find_calibration(get_gpu(a.gpu).name)
            if base is None:
                raise ValueError(f"no shipped calibration for {a.gpu!r}; give --calibration")
            path = write_calibration(calibration_with_link(base, terms), a.calibration_out)
        except (ValueError, KeyError, SpecError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"wrote {path} (tp_link: {len(terms.per_tp)} degrees)")
    if a.compare:
        from kvmodel.calibration import find_calibration, load_calibration  # noqa: PLC0415
        from kvmodel.specs import get_gpu  # noqa: PLC0415

        gpu = get_gpu(a.gpu)
        cal = load_calibration(a.calibration) if a.calibration else find_calibration(gpu.name)
        preds = predict_tp_rows(read_csv_rows(a.compare), gpu, cal, terms)
        print(f"prediction vs {Path(a.compare).name} ({'calibrated' if cal else 'uncalibrated'} {gpu.name}):")
        for k, v in error_summary(preds).items():
            if v["n"]:
                print(f"  {k}: n {v['n']}, median |err| {v['median_abs_pct']:.1f} %, worst {v['max_abs_pct']:.1f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
