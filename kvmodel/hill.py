"""Hill-law fit of speedup against batch: S(B) = Smax * B^gamma / (B_half^gamma + B^gamma).

The study fitted this curve to the fused-INT4 over FP16 attention speedup. :func:`speedups` pairs baseline and
candidate timings of the same configuration in a results file (the study's CSV or ours), :func:`fit_hill` fits the
law with scipy's ``curve_fit`` and reports R^2 (of S, linear scale) and 95 % confidence intervals, from the
parameter covariance (Student t) or, on request, from a case-resampling bootstrap.

No torch; numpy, scipy, pandas only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

PARAMS = ("Smax", "B_half", "gamma")

#: Columns that identify one attention configuration in our results files (besides the pipeline and format).
OUR_KEYS = ("model", "B", "T", "Hq", "Hkv", "d")
#: Columns that identify one configuration in the study's summary CSV.
STUDY_KEYS = ("config", "T_kv", "B")


def hill(B, Smax, B_half, gamma):
    """S(B) = Smax * B^gamma / (B_half^gamma + B^gamma) (vectorized; B, B_half > 0)."""
    B = np.asarray(B, dtype=float)
    # B^g / (Bh^g + B^g) = 1 / (1 + (Bh/B)^g): stable for large exponents
    return Smax / (1.0 + np.power(B_half / B, gamma))


@dataclass
class HillFit:
    Smax: float
    B_half: float
    gamma: float
    R2: float
    n: int
    ci95: dict = field(default_factory=dict)  # param -> [low, high]
    ci_method: str = "covariance"
    rmse: float = float("nan")
    stderr: dict = field(default_factory=dict)

    def predict(self, B):
        return hill(B, self.Smax, self.B_half, self.gamma)

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in d.items()}


def r_squared(y, yhat) -> float:
    y = np.asarray(y, dtype=float)
    ss_res = float(np.sum((y - yhat) ** 2))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    return 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")


def _curve_fit(B, S, p0):
    from scipy.optimize import curve_fit

    lower = (0.0, 1e-6, 0.05)
    upper = (np.inf, 1e6, 20.0)
    popt, pcov = curve_fit(hill, B, S, p0=p0, bounds=(lower, upper), maxfev=20000)
    return popt, pcov


def fit_hill(B, S, p0=None, bootstrap: int = 0, seed: int = 0) -> HillFit:
    """Fit the Hill law to speedups ``S`` at batches ``B``.

    ``bootstrap`` > 0: 95 % CIs from that many case resamples (percentile); otherwise from the covariance of the
    least-squares fit (estimate +- t(0.975, n - 3) x standard error).
    """
    from scipy import stats

    B = np.asarray(B, dtype=float)
    S = np.asarray(S, dtype=float)
    ok = np.isfinite(B) & np.isfinite(S) & (B > 0)
    B, S = B[ok], S[ok]
    n = int(B.size)
    if n < 4:
        raise ValueError(f"need at least 4 (batch, speedup) points to fit 3 parameters, got {n}")
    if np.unique(B).size < 3:
        raise ValueError("need at least 3 distinct batch sizes to fit a Hill curve")
    if p0 is None:
        top = float(np.percentile(S, 90))
        # half-maximum batch: the smallest batch whose median speedup reaches half the top
        med = {b: float(np.median(S[B == b])) for b in np.unique(B)}
        half = [b for b, m in sorted(med.items()) if m >= top / 2]
        p0 = (max(top, 1e-3), half[0] if half else float(np.median(B)), 1.3)
    popt, pcov = _curve_fit(B, S, p0)
    yhat = hill(B, *popt)
    fit = HillFit(*(float(x) for x in popt), R2=r_squared(S, yhat), n=n,
                  rmse=float(np.sqrt(np.mean((S - yhat) ** 2))))
    se = np.sqrt(np.clip(np.diag(pcov), 0, None)) if np.all(np.isfinite(pcov)) else np.full(3, np.nan)
    fit.stderr = {p: float(s) for p, s in zip(PARAMS, se)}
    if bootstrap and bootstrap > 0:
        rng = np.random.default_rng(seed)
        draws = []
        for _ in range(int(bootstrap)):
            idx = rng.integers(0, n, n)
            if np.unique(B[idx]).size < 3:
                continue
            try:
                draws.append(_curve_fit(B[idx], S[idx], popt)[0])
            except (RuntimeError, ValueError):
                continue
        draws = np.asarray(draws)
        fit.ci_method = f"bootstrap ({len(draws)} resamples, percentile)"
        fit.ci95 = {p: [float(np.percentile(draws[:, i], 2.5)), float(np.percentile(draws[:, i], 97.5))]
                    for i, p in enumerate(PARAMS)}
    else:
        tq = float(stats.t.ppf(0.975, max(n - 3, 1)))
        fit.ci_method = "covariance (Student t, n - 3 dof)"
        fit.ci95 = {p: [float(v - tq * s), float(v + tq * s)] for p, v, s in zip(PARAMS, popt, se)}
    return fit


# ----------------------------------------------------------------------------------------------------------------
# Results files -> speedups
# ----------------------------------------------------------------------------------------------------------------


def load_results(path) -> "pd.DataFrame":  # noqa: F821
    """Read a results CSV (the study's summary format or ours) into a frame with a ``median_s`` column."""
    import pandas as pd

    path = Path(path)
    try:
        df = pd.read_csv(path, comment=None)
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read as CSV: {e}") from None
    if "pipeline" not in df.columns:
        raise ValueError(f"{path}: no 'pipeline' column (expected the study's summary CSV or a kvmodel results file)")
    if "median_s" not in df.columns:
        if "median_ms" in df.columns:
            df["median_s"] = df["median_ms"] * 1e-3
        else:
            raise ValueError(f"{path}: no 'median_s' or 'median_ms' column")
    if "B" not in df.columns:
        raise ValueError(f"{path}: no 'B' (batch) column")
    if "variant" in df.columns:  # kvmodel's benchmark: "default" (or empty) is the default kernel, else an ablation
        df["variant"] = df["variant"].fillna("").astype(str).replace("", "default")
    return df


def _key_columns(df) -> list[str]:
    if all(c in df.columns for c in STUDY_KEYS):
        keys = list(STUDY_KEYS)
    else:
        keys = [c for c in OUR_KEYS if c in df.columns]
        for c in ("T",):
            if c not in df.columns:
                raise ValueError(f"results file lacks column {c!r}")
    return keys


def _parse_kv(kv: Optional[str]):
    if kv is None:
        return None
    from kvmodel.specs import parse_kv_format

    f = parse_kv_format(kv)
    return f.k_bits, f.v_bits


def _apply_filters(df, filters):
    for flt in filters or ():
        if "=" not in flt:
            raise ValueError(f"filter {flt!r}: expected COLUMN=VALUE")
        col, val = flt.split("=", 1)
        col = col.strip()
        if col not in df.columns:
            raise ValueError(f"filter {flt!r}: no column {col!r} (columns: {', '.join(map(str, df.columns))})")
        s = df[col]
        try:
            df = df[np.isclose(s.astype(float), float(val))]
        except (ValueError, TypeError):
            df = df[s.fillna("").astype(str) == val.strip()]
    return df


def _unique_per_key(df, keys, role: str):
    dup = df.duplicated(keys, keep=False)
    if dup.any():
        varying = [c for c in df.columns if c not in keys and c not in ("median_s", "median_ms")
                   and df[dup].groupby(keys)[c].nunique(dropna=False).max() > 1]
        measured = ("_ms", "_s", "_tps", "_pct", "_GBps", "_bytes", "date", "time")
        varying = [c for c in varying if not str(c).endswith(measured)
                   and not str(c).startswith(("mean", "min", "max", "std", "p5", "p95", "cv", "n_runs"))]
        raise ValueError(f"{int(dup.sum())} {role} rows share a configuration; pick one with --filter on "
                         f"{', '.join(varying[:6]) or 'a distinguishing column'} (or --kv)")
    return df


def speedups(df, baseline: str = "P0", candidate: str = "P5", mode: Optional[str] = "decode", min_batch: int = 1,
             kv: Optional[str] = None, filters=None, baseline_filters=None):
    """Per matching configuration: S = baseline median time / candidate median time.

    ``mode`` filters the study's decode/prefill column (ignored when absent). ``kv`` (e.g. int4, k8v4) selects the
    candidate's K/V bits when the file has k_bits/v_bits columns (default there: int4 unless the candidate is a
    16-bit pipeline). ``filters`` (COLUMN=VALUE) further select candidate rows, ``baseline_filters`` baseline rows.
    Returns a frame with the key columns, ``B``, ``t_baseline_s``, ``t_candidate_s``, ``S``.
    """
    keys = _key_columns(df)
    if mode and "mode" in df.columns:
        df = df[df["mode"] == mode]
    base = df[df["pipeline"] == baseline]
    cand = df[df["pipeline"] == candidate]
    if base.empty or cand.empty:
        have = ", ".join(sorted(map(str, df["pipeline"].unique())))
        raise ValueError(f"no rows for pipeline {baseline if base.empty else candidate!r} (have: {have})")
    if "k_bits" in df.columns and "v_bits" in df.columns:
        kb = _parse_kv(kv) if kv else ((16, 16) if candidate.startswith("P0") else (4, 4))
        cand = cand[(cand["k_bits"] == kb[0]) & (cand["v_bits"] == kb[1])]
        if baseline.startswith("P0"):
            base = base[(base["k_bits"] == 16) & (base["v_bits"] == 16)]
        if "group" in cand.columns and cand["group"].nunique() > 1 and not any(
                f.startswith("group") for f in filters or ()):
            cand = cand[cand["group"] == 32] if (cand["group"] == 32).any() else cand
    if "variant" in df.columns:  # the default kernel unless a filter names a variant (e.g. variant=nosplit)
        if not any(f.split("=", 1)[0].strip() == "variant" for f in filters or ()):
            cand = cand[cand["variant"] == "default"]
        if not any(f.split("=", 1)[0].strip() == "variant" for f in baseline_filters or ()):
            base = base[base["variant"] == "default"]
    cand = _apply_filters(cand, filters)
    base = _apply_filters(base, baseline_filters)
    if cand.empty:
        raise ValueError(f"no {candidate} rows left after selecting format/filters")
    base = _unique_per_key(base, keys, baseline)
    cand = _unique_per_key(cand, keys, candidate)
    m = base[keys + ["median_s"]].merge(cand[keys + ["median_s"]], on=keys, suffixes=("_b", "_c"))
    m = m.rename(columns={"median_s_b": "t_baseline_s", "median_s_c": "t_candidate_s"})
    m["S"] = m["t_baseline_s"] / m["t_candidate_s"]
    m = m[(m["B"] >= min_batch) & np.isfinite(m["S"])]
    return m.reset_index(drop=True)


def fit_file(path, baseline="P0", candidate="P5", mode="decode", min_batch=4, kv=None, filters=None,
             bootstrap=0) -> tuple[HillFit, "pd.DataFrame"]:  # noqa: F821
    """Load ``path``, pair speedups, fit; returns (fit, the speedup frame)."""
    df = load_results(path)
    sp = speedups(df, baseline, candidate, mode=mode, min_batch=min_batch, kv=kv, filters=filters)
    return fit_hill(sp["B"].to_numpy(float), sp["S"].to_numpy(float), bootstrap=bootstrap), sp
