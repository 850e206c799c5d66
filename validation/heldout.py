"""Held-out accuracy on our H200 measurements: decode attention per pipeline and format, and end-to-end steps.

Data (written by the measurement code): ``validation/data/h200/decode_attention.csv`` (pipeline, variant, model, B,
T, Hq, Hkv, d, k_bits, v_bits, group, num_splits, median_s, ...) and ``validation/data/h200/e2e_decode.csv`` (model,
B, T, k_bits, v_bits, pipeline, runtime, median_s, ...).

Split (documented, derived from the data so that it holds whatever grid landed): the measured context lengths in
increasing order, **alternate ones** (1st, 3rd, 5th, ...) calibrate and the others are held out; and **one model is
held out entirely** (:data:`HELDOUT_MODEL_PREFERENCE`: the first of those present, else the second model by name).
Every row that is not (calibration model x calibration context) is predicted.

Attention model (graph-captured calls, so per-call costs are small):

- P0 (SDPA, GQA-aware) and P0-expand: one saturating curve each over their traffic (``attn_bytes_P0``,
  ``attn_bytes_P0_expand``).
- P1 (dequantize to FP16, then SDPA): the P0 curve over the P0 bytes + one dequantization curve over the
  dequant step's bytes (quantized read + FP16 write = ``attn_bytes_P1 - attn_bytes_P0``), shared by all formats.
- P5 (fused split-K): an occupancy curve (``fused_wave_time``) per K/V format and head dim, and per block shape
  where fitted, programs = ``fused_programs_splitk`` with the measured split count, bytes = ``attn_bytes_P5``:
  :func:`kvmodel.fused_fit.fit_fused_curves`, the fit ``kvmodel calibrate`` ships for ``kvmodel predict``. Its
  ablations are *not* fitted: "nosplit" (one split:
  programs = B*Hkv) and "nogqa" (one program per query head: programs = B*Hq*splits, loads G x the KV) are
  predicted from the same curve, a test of the occupancy mechanism.

End-to-end model: ``step = step_overhead + L*layer_overhead + weights (one saturating curve per weight matrix call,
as kvmodel.predict does) + L * attention(pipeline, format)``, the attention term from the attention calibration
above; step_overhead, layer_overhead and the weight curve are fitted on the calibration rows of e2e_decode.csv.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from kvmodel import fused_fit, traffic
from kvmodel.fused_fit import FusedCurves, format_label
from kvmodel.predict import attention_call_time_s, fused_launches
from kvmodel.specs import BandwidthCurve, KVFormat, get_model
from kvmodel.calibration import fit_curve_reread, fit_curves_pairs
from kvmodel.timing import (DEQUANT_LAYOUTS, KERNEL_PORT_VERSION, OccupancyCurve, curve_time_s,
                            dequant_step_time_s, dequant_v_layout, expand_charged_bytes, expand_reread_miss,
                            kernel_split_count, sdpa_charged_bytes, split_count)

from .common import curve_dict, data_path, error_stats, fit_curve, grouped_stats

ATTENTION_FILE = ("h200", "decode_attention.csv")
#: Extra calibration rows (explicit split counts; training models x contexts only), beside the attention file.
CALIB_FILE = ("h200", "decode_attention_calib.csv")
E2E_FILE = ("h200", "e2e_decode.csv")
#: Models held out entirely when present (first match), in the spelling of the files (case-insensitive).
HELDOUT_MODEL_PREFERENCE = ("qwen2.5-7b", "Qwen2.5-7B")
H200_SMS = 132
#: The H200's L2 (hardware/h200.yaml, datasheet 50 MB): a call whose benchmark rotation pool (``working_sets``
#: copies of its inputs) fits in it reads them from L2 (:func:`kvmodel.timing.l2_hit_fraction`).
L2_BYTES = 50 * 2**20
TARGETS = {"attention_median": 5.0, "attention_max": 15.0, "e2e_median": 10.0}


_fmt = format_label


def split_roles(df: pd.DataFrame, model_col: str = "model", heldout_model: Optional[str] = None) -> tuple:
    """Add a ``role`` column (train / held-out contexts / held-out model) and return (df, split description)."""
    ts = sorted(df["T"].unique())
    train_T = ts[0::2]
    models = sorted(df[model_col].unique(), key=str.lower)
    if heldout_model is None:
        low = {m.lower(): m for m in models}
        heldout_model = next((low[p.lower()] for p in HELDOUT_MODEL_PREFERENCE if p.lower() in low), None)
        if heldout_model is None and len(models) > 1:
            heldout_model = models[1]
    role = np.where(df[model_col] == heldout_model, "held-out model",
                    np.where(df["T"].isin(train_T), "train", "held-out contexts"))
    df = df.assign(role=role)
    desc = (f"calibrate on contexts {', '.join(map(str, train_T))} of models "
            f"{', '.join(m for m in models if m != heldout_model)}; held out: contexts "
            f"{', '.join(str(t) for t in ts if t not in train_T) or '(none)'} of those models"
            + (f", and model {heldout_model} entirely" if heldout_model else
               " (only one model measured so far: no model held out entirely)"))
    return df, desc, {"train_contexts": [int(t) for t in train_T], "heldout_model": heldout_model}


# ----------------------------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------------------------


def load_attention(path: Optional[Path] = None) -> Optional[pd.DataFrame]:
    path = Path(path) if path else data_path(*ATTENTION_FILE)
    if not path.exists():
        return None
    return prepare_attention(pd.read_csv(path))


def prepare_attention(d: pd.DataFrame) -> pd.DataFrame:
    """Rows of a decode_attention CSV (the benchmark's format) with the columns the attention model needs."""
    if "status" in d.columns:
        d = d[d["status"].fillna("ok").isin(["ok", ""])]
    d = d[np.isfinite(pd.to_numeric(d["median_s"], errors="coerce"))].copy()
    d["median_s"] = d["median_s"].astype(float)
    # the default kernel is "" internally (the benchmark writes "default"); ablations keep their names
    d["variant"] = (d["variant"].fillna("").astype(str).replace("default", "") if "variant" in d.columns else "")
    if "num_splits" not in d.columns:
        d["num_splits"] = 1
    d["num_splits"] = pd.to_numeric(d["num_splits"], errors="coerce").fillna(1).astype(float)
    if "model" not in d.columns:
        d["model"] = d["Hq"].astype(str) + "/" + d["Hkv"].astype(str) + "/" + d["d"].astype(str)
    if "group" not in d.columns:
        d["group"] = 32
    d["G"] = d["Hq"] // d["Hkv"]
    # the fused kernel's columns (format, bytes_P5, programs, loads, block shape `config`, l2_hit): the same
    # preparation kvmodel calibrate uses
    d = fused_fit.add_fused_columns(d, H200_SMS, L2_BYTES)
    B, T, Hq, Hkv, hd = (d[c].to_numpy(float) for c in ("B", "T", "Hq", "Hkv", "d"))
    kb, vb, g = d["k_bits"].to_numpy(float), d["v_bits"].to_numpy(float), d["group"].to_numpy(float)
    ab = traffic.attention_layer_bytes
    d["bytes_P0"] = ab("P0", B, T, Hq, Hkv, hd)
    # SDPA's (sequence, KV head) pairs (kvmodel.timing.sdpa_pair_efficiency)
    d["pairs"] = B * Hkv
    d["bytes_P0x"] = ab("P0-expand", B, T, Hq, Hkv, hd)
    # P0-expand's repeat reads that L2 cannot serve (kvmodel.timing.expand_reread_miss)
    d["bytes_P0x_reread"] = traffic.expand_reread_bytes(B, T, Hq, Hkv, hd) * expand_reread_miss(T, hd, L2_BYTES)
    d["bytes_dq"] = dequant_bytes(B, T, Hq, Hkv, hd, kb, vb, g)
    d["bytes_dq_k"], d["bytes_dq_v"] = dequant_half_bytes(B, T, Hkv, hd, kb, vb, g)
    d["v_layout"] = [dequant_v_layout(v, h) for v, h in zip(vb, hd)]
    return d.reset_index(drop=True)


def dequant_half_bytes(B, T, Hkv, d, k_bits, v_bits, group=32):
    """Bytes of P1's K and V dequantize kernels (symbolic ``attn_bytes_P1_dequant_k`` / ``_v``; 0 for a 16-bit
    half, used in place): they sum to :func:`dequant_bytes`."""
    kb, vb = np.asarray(k_bits, dtype=float), np.asarray(v_bits, dtype=float)
    vals = {"B": B, "T": T, "H_kv": Hkv, "d": d, "d_v": d, "b_k": kb, "b_v": vb, "g": group,
            "m_k": np.where(kb >= 16, 0, 2), "m_v": np.where(vb >= 16, 0, 2)}
    return (traffic.evaluate("attn_bytes_P1_dequant_k", vals), traffic.evaluate("attn_bytes_P1_dequant_v", vals))


def dequant_bytes(B, T, Hq, Hkv, d, k_bits, v_bits, group=32):
    """Bytes of the non-fused pipeline's dequantize step (quantized read + FP16 staging-buffer write), from the
    traffic model: ``attn_bytes_P1 - attn_bytes_P0``. attn_bytes_P1 charges the buffer (write + read) only for the
    halves stored below 16 bits (``attn_bytes_P1 - attn_bytes_P5`` is exactly that write + read); the SDPA read that
    follows is the P0 traffic, so the difference is what the dequantize kernel moves (0 for a 16-bit half, used in
    place)."""
    ab = traffic.attention_layer_bytes
    return ab("P1", B, T, Hq, Hkv, d, k_bits, v_bits, group) - ab("P0", B, T, Hq, Hkv, d)


def _by_dim(curves: dict, hd):
    """The curve of the nearest calibrated head dim (exact when calibrated)."""
    keys = np.array(sorted(curves))
    return curves[int(keys[np.argmin(np.abs(np.log2(keys) - np.log2(float(hd))))])]


@dataclass
class AttentionCalibration:
    p0: dict  # head_dim -> BandwidthCurve (SDPA is a different kernel per head dim)
    #: P0-expand's curve; its ``reread_weight`` charges the repeat reads L2 cannot serve (fit_curve_reread)
    p0x: Optional[BandwidthCurve]
    #: P1's dequantize kernel, one launch per half stored below 16 bits: layout it reads -> BandwidthCurve
    #: (kvmodel.timing.dequant_step_time_s; one launch floor and sharpness, a rate per layout)
    dequant: Optional[dict]
    #: the fused kernel's occupancy curves (kvmodel.fused_fit: per format and head dim, and per block shape)
    p5: FusedCurves = field(default_factory=FusedCurves)
    sm_count: int = H200_SMS
    info: dict = field(default_factory=dict)
    #: fused-kernel version that measured the data: its launch rules time P5 calls without a measured split count
    kernel_version: str = KERNEL_PORT_VERSION

    @property
    def l2_rate_scale(self) -> float:
        """Per-program rate of L2-served loads over DRAM-served ones, shared by the P5 curves (1: none)."""
        return self.p5.l2_rate_scale

    def to_dict(self) -> dict:
        return {"P0 (per head_dim)": {int(k): curve_dict(v) for k, v in self.p0.items()},
                "P0-expand": curve_dict(self.p0x) if self.p0x else None,
                "P1 dequantize kernel (per launch, by layout)": ({k: curve_dict(v) for k, v in self.dequant.items()}
                                                                  if self.dequant else None),
                "P5 (per format and head_dim)": {fused_fit.curve_label(k): self.p5.pooled[k].as_dict()
                                                 for k in sorted(self.p5.pooled, key=_p5_key)},
                "P5 (per format, head_dim and block shape)": {
                    fused_fit.curve_label(k): self.p5.per_shape[k].as_dict()
                    for k in sorted(self.p5.per_shape, key=_p5_key)},
                "sm_count": self.sm_count, **self.info}

    def fused_curve(self, k_bits, v_bits, hd, config: Optional[str] = None) -> Optional[OccupancyCurve]:
        """The curve of the program the kernel runs (:meth:`kvmodel.fused_fit.FusedCurves.curve`: block shape,
        else the format's pooled curve at the nearest head dim)."""
        return self.p5.curve(k_bits, v_bits, hd, config)

    def _p0_time(self, nbytes, hd, pairs=None):
        """SDPA's (P0) seconds for ``nbytes`` at head dim ``hd``; with ``pairs`` (B x Hkv) and a curve fitted with
        its pair term, at the charged bytes (:func:`kvmodel.timing.sdpa_charged_bytes`)."""
        c = _by_dim(self.p0, hd)
        if pairs is not None and c.pairs_half:
            nbytes = sdpa_charged_bytes(nbytes, pairs, c.pairs_half)
        return curve_time_s(nbytes, c.t0_s, c.bw_GBps, c.knee_bytes, c.sharpness)

    def time_s(self, pipeline: str, B, T, Hq, Hkv, d, k_bits, v_bits, group=32, num_splits=None,
               variant: str = ""):
        """Predicted seconds of one attention-layer call (vectorized over B and T; one shape, pipeline, format)."""
        B, T = np.asarray(B, dtype=float), np.asarray(T, dtype=float)
        ab = traffic.attention_layer_bytes
        if pipeline == "P0":
            return self._p0_time(ab("P0", B, T, Hq, Hkv, d), d, B * Hkv)
        if pipeline == "P0-expand":
            c = self.p0x
            if c is None:
                return self._p0_time(ab("P0-expand", B, T, Hq, Hkv, d), d)
            nb = expand_charged_bytes(ab("P0-expand", B, T, Hq, Hkv, d),
                                      traffic.expand_reread_bytes(B, T, Hq, Hkv, d),
                                      expand_reread_miss(T, d, L2_BYTES), c.reread_weight or 0.0)
            return curve_time_s(nb, c.t0_s, c.bw_GBps, c.knee_bytes, c.sharpness)
        if pipeline == "P1":
            bk, bv = dequant_half_bytes(B, T, Hkv, d, k_bits, v_bits, group)
            return (self._p0_time(ab("P0", B, T, Hq, Hkv, d), d, B * Hkv)
                    + dequant_step_time_s(bk, bv, dequant_v_layout(v_bits, d), self.dequant))
        if pipeline == "P5":
            # the kernel's block shape and split count for each call (its own rules, ported; kvmodel predict's)
            B, T = np.broadcast_arrays(B, T)
            ph = Hq if variant == "nogqa" else Hkv
            ns, keys, rounds = fused_launches(k_bits, v_bits, d, B, ph, T, self.sm_count, self.kernel_version)
            if num_splits is not None:
                ns = np.broadcast_to(np.asarray(num_splits, float), B.shape)
            nbytes = np.broadcast_to(ab("P5", B, T, Hq, Hkv, d, k_bits, v_bits, group), B.shape)
            programs = B * ph * ns  # nogqa: one program per query head, each loading its KV head's tiles
            if variant == "nogqa":
                nbytes = nbytes * Hq / Hkv
            out = np.full(B.shape, np.nan)
            for key in np.unique(keys):
                m = keys == key
                occ = self.fused_curve(k_bits, v_bits, d, str(key))
                out[m] = occ.time_s(programs[m], nbytes[m], self.sm_count, head_dim=d, splits=ns[m],
                                    merge_round_splits=rounds[m])
            return out if out.ndim else float(out)
        raise ValueError(f"unknown pipeline {pipeline!r}")


def _p5_key(key: tuple):
    """Report order of P5 curves: by format label, then head dim (and block shape)."""
    return (_fmt(key[0], key[1]), *key[2:])


def data_kernel_version(attention_path: Optional[Path] = None) -> str:
    """Fused-kernel version of the committed H200 P5 data (the attention grid's provenance; the e2e file's P5 rows
    were measured with the same kernel, tests/test_validation.py checks): its launch rules, not the current
    kernel's, predict those rows."""
    from kvmodel.calibration import grid_kernel_version

    path = Path(attention_path) if attention_path else data_path(*ATTENTION_FILE)
    return grid_kernel_version(path) or KERNEL_PORT_VERSION


def fit_attention(train: pd.DataFrame, sm_count: int = H200_SMS,
                  kernel_version: str = KERNEL_PORT_VERSION) -> AttentionCalibration:
    base = train[train["variant"] == ""]
    # SDPA per head dim, with its (sequence, KV head) pair term shared by the head dims (kvmodel calibrate's fit,
    # on this model's fitter)
    c0 = fit_curves_pairs({int(hd): (g["bytes_P0"], g["pairs"], g["median_s"])
                           for hd, g in base[base.pipeline == "P0"].groupby("d")}, fit=fit_curve)
    px = base[base.pipeline == "P0-expand"]
    # P0-expand with its repeat reads that leave L2 (the same fit kvmodel calibrate uses, on this model's fitter)
    cx = (fit_curve_reread(px["bytes_P0x"], px["bytes_P0x_reread"], px["median_s"], fit=fit_curve)
          if len(px) >= 6 else None)
    cal = AttentionCalibration(p0=c0, p0x=cx, dequant=None, sm_count=sm_count, kernel_version=kernel_version)
    p1 = base[base.pipeline == "P1"]
    if len(p1) >= 6:
        t0 = np.concatenate([cal._p0_time(g["bytes_P0"].to_numpy(float), hd, g["pairs"].to_numpy(float))
                             for hd, g in p1.groupby("d")])
        p1 = pd.concat([g for _, g in p1.groupby("d")])
        cal.dequant = fit_dequant_launches(p1["bytes_dq_k"], p1["bytes_dq_v"], p1["v_layout"], p1["median_s"],
                                           base_s=t0)
    # P5: the occupancy curves kvmodel calibrate fits too (one implementation: kvmodel.fused_fit)
    cal.p5 = fused_fit.fit_fused_curves(base[base.pipeline == "P5"], sm_count)
    cal.info = {"fused_fit": {fused_fit.curve_label(k): cal.p5.info[k] for k in sorted(cal.p5.pooled, key=_p5_key)},
                "fused_fit_per_shape": {fused_fit.curve_label(k): cal.p5.info[k]
                                        for k in sorted(cal.p5.per_shape, key=_p5_key)}}
    return cal


def fit_dequant_launches(bytes_k, bytes_v, v_layout, t_s, base_s=None) -> dict:
    """P1's dequantize kernels (:func:`kvmodel.timing.dequant_step_time_s`): one launch per half stored below 16
    bits, ``t0 + smoothmax(bytes, knee)/BW_layout`` each, one floor (t0, knee, sharpness) for all launches and a
    rate per layout read (K: channel; V: :func:`kvmodel.timing.dequant_v_layout`), fitted to the calls' times minus
    ``base_s`` (the SDPA part). A layout without rows shares the other's rate. Returns layout -> BandwidthCurve."""
    from kvmodel.fused_fit import lsq, r2_log

    bk, bv = np.asarray(bytes_k, dtype=float), np.asarray(bytes_v, dtype=float)
    lay = np.asarray(v_layout, dtype=object)
    t = np.asarray(t_s, dtype=float)
    base = np.zeros_like(t) if base_s is None else np.asarray(base_s, dtype=float)
    octet = (lay == "token_octet") & (bv > 0)
    fit_octet = bool(octet.sum() >= 3)

    def curves(th):
        t0, bw_c, bw_o, knee, n = np.exp(th)
        c = BandwidthCurve(t0_s=float(t0), bw_GBps=float(bw_c), knee_bytes=float(knee), sharpness=float(n))
        return {"channel": c, "token_octet": c.model_copy(update={"bw_GBps": float(bw_o if fit_octet else bw_c)})}

    def model(th):
        return base + dequant_step_time_s(bk, bv, lay, curves(th))

    rest = np.maximum(t - base, 1e-9)
    bw0 = float(np.median((bk + bv) / rest)) / 1e9
    lo, hi = np.log([1e-8, 1.0, 1.0, 1.0, 0.5]), np.log([1.0, 1e5, 1e5, 1e12, 200.0])
    best = None
    for t00 in (1e-7, 2e-6):
        for knee0 in (1e6, 1e7):
            for n0 in (1.0, 2.0, 6.0):
                x0 = np.clip(np.log([t00, bw0, bw0, knee0, n0]), lo + 1e-9, hi - 1e-9)
                r = lsq(lambda th: np.log(model(th) / t), x0, bounds=(lo, hi))
                if best is None or r.cost < best.cost:
                    best = r
    out = curves(best.x)
    pred = model(best.x)
    q = {"r2": r2_log(t, pred), "n_points": int(t.size),
         "median_abs_pct_error": float(np.median(np.abs(pred / t - 1.0)) * 100.0)}
    return {k: v.model_copy(update=q) for k, v in out.items() if k in DEQUANT_LAYOUTS}


def predict_attention(cal: AttentionCalibration, d: pd.DataFrame) -> np.ndarray:
    """Predicted seconds per row of a decode_attention frame (see the module docstring)."""
    out = np.full(len(d), np.nan)
    pl = d["pipeline"].to_numpy()
    for hd in d["d"].unique():
        m = (d["d"] == hd).to_numpy()
        p0 = cal._p0_time(d["bytes_P0"].to_numpy(float), hd, d["pairs"].to_numpy(float))
        out[m & (pl == "P0")] = p0[m & (pl == "P0")]
        if cal.dequant is not None:
            t1 = p0 + dequant_step_time_s(d["bytes_dq_k"].to_numpy(float), d["bytes_dq_v"].to_numpy(float),
                                          d["v_layout"].to_numpy(object), cal.dequant)
            out[m & (pl == "P1")] = t1[m & (pl == "P1")]
    m = pl == "P0-expand"
    if m.any():
        c = cal.p0x
        if c is not None:
            nb = expand_charged_bytes(d.loc[m, "bytes_P0x"].to_numpy(float), d.loc[m, "bytes_P0x_reread"]
                                      .to_numpy(float), 1.0, c.reread_weight or 0.0)
            out[m] = curve_time_s(nb, c.t0_s, c.bw_GBps, c.knee_bytes, c.sharpness)
    m = pl == "P5"
    if m.any():
        out[m] = cal.p5.time_s(d[m], cal.sm_count)
    return out


def _label(d: pd.DataFrame) -> pd.Series:
    v = d["variant"].replace("", np.nan)
    return d["pipeline"] + np.where(v.isna(), "", "-" + v.fillna("").astype(str))


def calibration_rows(attention_path: Optional[Path], split: dict) -> tuple[pd.DataFrame, dict]:
    """Extra calibration rows for the training split: ``decode_attention_calib.csv`` beside the attention file, read
    by :func:`kvmodel.calibration.grid_calibration_rows` (what ``kvmodel calibrate`` adds to the grid too: rows of
    explicit split counts, variant ``sp<N>`` -> 'default'; ablations dropped; the whole file left out when measured
    with another kernel version than the grid). Only rows of the split's training models x contexts are kept (the
    others are counted in info). Returns (raw rows in the grid's format, info)."""
    from kvmodel.calibration import grid_calibration_rows

    apath = Path(attention_path) if attention_path else data_path(*ATTENTION_FILE)
    rows, note = grid_calibration_rows(apath)
    info = {"file": CALIB_FILE[1], "n_rows": 0, "n_outside_training_split": 0, "note": note}
    if not rows:
        return pd.DataFrame(), info
    raw = pd.DataFrame(rows)
    for c in ("B", "T", "Hq", "Hkv", "d", "k_bits", "v_bits", "group", "num_splits", "median_s", "p10_s", "p90_s",
              "n_samples", "calls_per_sample", "bytes_moved", "working_sets"):
        if c in raw.columns:
            raw[c] = pd.to_numeric(raw[c], errors="coerce")
    inside = raw["T"].isin(split["train_contexts"]) & (raw["model"] != split["heldout_model"])
    info["n_outside_training_split"] = int((~inside).sum())
    raw = raw[inside]
    info["n_rows"] = int(len(raw))
    info["note"] = f"{len(raw)} rows added to the training split"
    return raw.reset_index(drop=True), info


def run_attention(path: Optional[Path] = None) -> dict:
    d = load_attention(path)
    if d is None:
        return {"available": False, "reason": f"validation/data/{'/'.join(ATTENTION_FILE)} not present (the H200 "
                                              "attention benchmark has not landed)"}
    d, desc, split = split_roles(d)
    train = d[(d.role == "train") & (d.variant == "")]
    extra_raw, calib_info = calibration_rows(path, split)
    if len(extra_raw):
        extra = prepare_attention(extra_raw).assign(role="train")
        train = pd.concat([train, extra[train.columns.intersection(extra.columns)]], ignore_index=True)
    cal = fit_attention(train, kernel_version=data_kernel_version(path))
    d["pred_s"] = predict_attention(cal, d)
    d["meas_s"] = d["median_s"]
    d["label"] = _label(d)
    held = d[(d.role != "train") & np.isfinite(d.pred_s)]
    core = held[held.variant == ""]
    return {
        "available": True, "split": desc, "split_detail": split, "calibration": cal.to_dict(),
        "n_rows": int(len(d)), "n_train": int(len(train)), "calibration_rows": calib_info,
        "overall": error_stats(core.pred_s, core.meas_s),
        "calls_at_least_30us": error_stats(core[core.meas_s >= 30e-6].pred_s, core[core.meas_s >= 30e-6].meas_s),
        "rows_over_15pct": int((np.abs(core.pred_s / core.meas_s - 1) > 0.15).sum()),
        "per_pipeline_format": grouped_stats(core, ["pipeline", "format"]),
        "per_pipeline": grouped_stats(core, "pipeline"),
        "per_model": grouped_stats(core, "model"),
        "per_role": grouped_stats(core, "role"),
        "ablations_predicted": grouped_stats(d[(d.variant != "") & np.isfinite(d.pred_s)], ["label", "format"]),
        "fitted_rows": error_stats(train.assign(p=predict_attention(cal, train)).p, train.median_s),
        "frame": d, "cal": cal,
    }


# ----------------------------------------------------------------------------------------------------------------
# End-to-end decode steps
# ----------------------------------------------------------------------------------------------------------------


def load_e2e(path: Optional[Path] = None) -> Optional[pd.DataFrame]:
    path = Path(path) if path else data_path(*E2E_FILE)
    if not path.exists():
        return None
    d = pd.read_csv(path)
    if "status" in d.columns:
        d = d[d["status"].fillna("ok").astype(str).isin(["ok", "", "nan"])]
    d = d[np.isfinite(pd.to_numeric(d["median_s"], errors="coerce"))].copy()
    d["median_s"] = d["median_s"].astype(float)
    if "runtime" not in d.columns:
        d["runtime"] = "kvmodel-graph"
    d["format"] = [_fmt(k, v) for k, v in zip(d["k_bits"], d["v_bits"])]
    return d.reset_index(drop=True)


def _weight_calls(model):
    from kvmodel.architecture import param_breakdown, weight_calls

    calls = [(c.layers, float(c.params)) for c in weight_calls(model)]
    pb = param_breakdown(model)
    lm = float(pb.lm_head or pb.embedding)
    return calls, lm


def _weights_time(calls, lm, B, curve: BandwidthCurve, peak_flops: float, bpp: float = 2.0):
    t = np.zeros_like(np.asarray(B, dtype=float))
    for layers, params in calls + [(1, lm)]:
        tm = curve_time_s(params * bpp, curve.t0_s, curve.bw_GBps, curve.knee_bytes, curve.sharpness)
        t = t + layers * np.maximum(tm, 2.0 * np.asarray(B, float) * params / peak_flops)
    return t


@dataclass
class E2ECalibration:
    step_overhead_s: float
    layer_overhead_s: float
    weights: BandwidthCurve
    attention: AttentionCalibration
    info: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"step_overhead_s": self.step_overhead_s, "layer_overhead_s": self.layer_overhead_s,
                "weights": curve_dict(self.weights), **self.info}


def _attention_per_step(att: AttentionCalibration, model, rows: pd.DataFrame) -> np.ndarray:
    out = np.zeros(len(rows))
    hd = model.head_dim
    for (pl, kb, vb), g in rows.groupby(["pipeline", "k_bits", "v_bits"]):
        idx = rows.index.get_indexer(g.index)
        if pl not in ("P0", "P0-expand", "P1", "P5"):
            out[idx] = np.nan
            continue
        t = att.time_s(pl, g["B"], g["T"], model.num_heads, model.num_kv_heads, hd, kb, vb)
        out[idx] = model.num_layers * t
    return out


def fit_e2e(train: pd.DataFrame, att: AttentionCalibration, peak_flops: float) -> E2ECalibration:
    from scipy.optimize import least_squares

    groups = []
    for name, g in train.groupby("model"):
        m = get_model(name)
        calls, lm = _weight_calls(m)
        groups.append((m, calls, lm, g["B"].to_numpy(float), _attention_per_step(att, m, g),
                       g["median_s"].to_numpy(float)))
    t_all = np.concatenate([x[5] for x in groups])

    def model_t(th):
        so, lo, t0, bw, knee = np.exp(th)
        c = BandwidthCurve(t0_s=t0, bw_GBps=bw, knee_bytes=knee, sharpness=2.0)
        return np.concatenate([so + m.num_layers * lo + _weights_time(calls, lm, B, c, peak_flops) + ta
                               for m, calls, lm, B, ta, _ in groups])

    x0 = np.log([20e-6, 5e-6, 3e-6, 4000.0, 4e6])
    r = least_squares(lambda th: np.log(model_t(th) / t_all), x0, loss="soft_l1", f_scale=0.05, max_nfev=3000)
    so, lo, t0, bw, knee = np.exp(r.x)
    return E2ECalibration(step_overhead_s=float(so), layer_overhead_s=float(lo),
                          weights=BandwidthCurve(t0_s=float(t0), bw_GBps=float(bw), knee_bytes=float(knee)),
                          attention=att)


def predict_e2e(cal: E2ECalibration, d: pd.DataFrame, peak_flops: float) -> np.ndarray:
    out = np.full(len(d), np.nan)
    for name, g in d.groupby("model"):
        m = get_model(name)
        calls, lm = _weight_calls(m)
        idx = d.index.get_indexer(g.index)
        out[idx] = (cal.step_overhead_s + m.num_layers * cal.layer_overhead_s
                    + _weights_time(calls, lm, g["B"].to_numpy(float), cal.weights, peak_flops)
                    + _attention_per_step(cal.attention, m, g))
    return out


def shipped_predictions(d: pd.DataFrame, cal=None, label: Optional[str] = None,
                        kernel_version: Optional[str] = None, gpu: str = "h200",
                        fitted_on: str = "fitted on all data, not held out") -> tuple[np.ndarray, str]:
    """kvmodel as shipped: :func:`kvmodel.predict.step_time_s` per row with calibration ``cal`` (default: the
    shipped kvmodel-graph calibration of ``gpu``). Predict looks each attention op up as
    ``attention:<P>:k<b>v<b>:d<d>``, then coarser keys (:meth:`kvmodel.timing.TimeModel.attention_op`).

    ``kernel_version``: the fused kernel that measured the rows (its launch rules; default
    :func:`data_kernel_version`). ``fitted_on``: what the shipped calibration was fitted on, for its label. No shipped calibration is an explicit "uncalibrated" label, not an error; any
    other failure propagates."""
    from kvmodel.calibration import find_calibration
    from kvmodel.predict import step_time_s
    from kvmodel.specs import KVFormat, get_gpu
    from kvmodel.timing import TimeModel

    gpu = get_gpu(gpu)
    if cal is None:
        cal = find_calibration(gpu.name, runtime="kvmodel-graph")
        if cal is None:
            label = f"uncalibrated (datasheet x 0.85): no shipped {gpu.name} kvmodel-graph calibration"
        else:
            label = f"shipped calibration ({cal.date or 'undated'}; {fitted_on})"
    tm = TimeModel(gpu, cal, kernel_version=kernel_version or data_kernel_version())
    out = np.full(len(d), np.nan)
    for (name, pl, kb, vb), g in d.groupby(["model", "pipeline", "k_bits", "v_bits"]):
        if pl not in ("P0", "P0-expand", "P1", "P5"):
            continue
        idx = d.index.get_indexer(g.index)
        out[idx] = step_time_s(tm, get_model(name), KVFormat(k_bits=int(kb), v_bits=int(vb)), g["B"].to_numpy(float),
                               g["T"].to_numpy(float), pl)
    return out, label


def predict_attention_shipped(cal, d: pd.DataFrame, kernel_version: Optional[str] = None) -> np.ndarray:
    """Seconds of one attention-layer call exactly as kvmodel predicts it
    (:func:`kvmodel.predict.attention_call_time_s`: the most specific calibrated curve, the fused kernel's block
    shape and splits by its own rules, those of ``kernel_version``, default :func:`data_kernel_version`)."""
    from kvmodel.specs import get_gpu
    from kvmodel.timing import TimeModel

    tm = TimeModel(get_gpu("h200"), cal, kernel_version=kernel_version or data_kernel_version())
    out = np.full(len(d), np.nan)
    for (pl, kb, vb, hd, grp), g in d.groupby(["pipeline", "k_bits", "v_bits", "d", "group"]):
        if pl not in ("P0", "P0-expand", "P1", "P5"):
            continue
        kv = KVFormat(k_bits=int(kb), v_bits=int(vb), group_size=int(grp))
        B, T, Hq, Hkv = (g[c].to_numpy(float) for c in ("B", "T", "Hq", "Hkv"))
        out[d.index.get_indexer(g.index)] = attention_call_time_s(tm, pl, kv, B, T, Hq, Hkv, int(hd))
    return out


def run_predict_heldout(attention: dict, e2e: dict, attention_path: Optional[Path] = None,
                        e2e_path: Optional[Path] = None) -> dict:
    """Held-out accuracy of the SHIPPED predictor (:mod:`kvmodel.predict` with a :class:`Calibration` fitted by
    :func:`kvmodel.calibration.fit_calibration`), on the same split as the validation model.

    The calibration is fitted from a temporary folder holding the committed ``probes.csv`` (bandwidth and GEMV
    probes: no attention or step rows) and only the *training* rows of ``decode_attention.csv`` (the attention
    split's calibration models x contexts) and of ``e2e_decode.csv`` (kvmodel-graph rows of the e2e split's
    calibration models x contexts), in the files' own formats. Held-out attention rows are predicted per layer
    (:func:`predict_attention_shipped`), held-out steps with :func:`kvmodel.predict.step_time_s`."""
    import shutil
    import tempfile

    from kvmodel.calibration import fit_calibration

    if not (attention.get("available") and e2e.get("available")):
        return {"available": False, "reason": "needs both H200 files (decode_attention.csv and e2e_decode.csv)"}
    att_path = Path(attention_path) if attention_path else data_path(*ATTENTION_FILE)
    e2e_path_ = Path(e2e_path) if e2e_path else data_path(*E2E_FILE)
    probes = att_path.parent / "probes.csv"
    if not probes.exists():
        return {"available": False, "reason": f"{probes} not present (the calibration needs the probes)"}
    sa, se = attention["split_detail"], e2e["split_detail"]
    raw_a = pd.read_csv(att_path)
    raw_a = raw_a[raw_a["T"].isin(sa["train_contexts"]) & (raw_a["model"] != sa["heldout_model"])]
    extra, _ = calibration_rows(att_path, sa)  # the same extra training rows as the validation model's
    if len(extra):
        raw_a = pd.concat([raw_a, extra], ignore_index=True)
    raw_e = pd.read_csv(e2e_path_)
    rt = raw_e["runtime"] if "runtime" in raw_e.columns else pd.Series("kvmodel-graph", index=raw_e.index)
    raw_e = raw_e[(rt == "kvmodel-graph") & raw_e["T"].isin(se["train_contexts"])
                  & (raw_e["model"] != se["heldout_model"])]
    with tempfile.TemporaryDirectory(prefix="kvmodel-heldout-cal-") as tmp:
        tmp = Path(tmp)
        shutil.copy(probes, tmp / "probes.csv")
        raw_a.to_csv(tmp / "decode_attention.csv", index=False)
        raw_e.to_csv(tmp / "e2e_decode.csv", index=False)
        kv = data_kernel_version(att_path)  # the copies carry no provenance: the kernel that measured them
        cal = fit_calibration(tmp, gpu="h200", runtime="kvmodel-graph", kernel_version=kv,
                              command="kvmodel.validation.heldout.run_predict_heldout (training split only)")
    fa = attention["frame"]
    fa = fa[(fa.role != "train") & (fa.variant == "")].copy()
    fa["pred_s"] = predict_attention_shipped(cal, fa, kv)
    fa = fa[np.isfinite(fa.pred_s)]
    # predict takes the split count of the kernel's rule as ported (of the data's kernel version); the
    # validation model the measured one
    p5 = fa[fa.pipeline == "P5"]
    rule = np.array([float(kernel_split_count(r.k_bits, r.v_bits, r.d, r.B, r.Hkv, r.T, H200_SMS, kv))
                     for r in p5.itertuples()])
    same = rule == p5["num_splits"].to_numpy(float)
    split_rule = {"n_rows": int(len(p5)), "n_split_mismatch": int((~same).sum()),
                  "matching": error_stats(p5.pred_s[same], p5.median_s[same]),
                  "mismatching": error_stats(p5.pred_s[~same], p5.median_s[~same])}
    fe = e2e["frame"]
    fe = fe[fe.role != "train"].copy()
    fe["pred_s"], _ = shipped_predictions(fe, cal, "held-out calibration", kv)
    fe = fe[np.isfinite(fe.pred_s)]
    return {
        "available": True,
        "model": "kvmodel predict (shipped model: TimeModel curves per op class, attention curve looked up by "
                 "pipeline/format/head dim, the fused kernel by occupancy curves per format/head dim/block shape; "
                 "step = overheads + weights + attention), calibrated by kvmodel.calibration.fit_calibration on the "
                 "training split only",
        "n_train_attention_rows": int(len(raw_a)), "n_train_e2e_rows": int(len(raw_e)),
        "calibration_ops": sorted(cal.ops), "step_overhead_s": cal.step_overhead_s,
        "layer_overhead_s": cal.layer_overhead_s,
        "attention": error_stats(fa.pred_s, fa.median_s),
        "attention_per_pipeline_format": grouped_stats(fa.assign(meas_s=fa.median_s), ["pipeline", "format"]),
        "p5_split_rule": split_rule,
        "e2e": error_stats(fe.pred_s, fe.median_s),
        "e2e_per_pipeline_format": grouped_stats(fe.assign(meas_s=fe.median_s), ["pipeline", "format"]),
        "e2e_per_role": grouped_stats(fe.assign(meas_s=fe.median_s), "role"),
    }


def run_e2e(path: Optional[Path] = None, attention: Optional[dict] = None) -> dict:
    from kvmodel.specs import get_gpu
    from kvmodel.timing import DEFAULT_FLOP_EFFICIENCY

    d = load_e2e(path)
    if d is None:
        return {"available": False, "reason": f"validation/data/{'/'.join(E2E_FILE)} not present (the end-to-end "
                                              "H200 measurements have not landed)"}
    if attention is None or not attention.get("available"):
        return {"available": False, "reason": "the e2e model needs the attention calibration (decode_attention.csv)"}
    ours = d[d.runtime == "kvmodel-graph"].copy()
    ours, desc, split = split_roles(ours)
    peak = get_gpu("h200").fp16_dense_TFLOPS * 1e12 * DEFAULT_FLOP_EFFICIENCY
    train = ours[ours.role == "train"]
    cal = fit_e2e(train, attention["cal"], peak)
    ours["pred_s"] = predict_e2e(cal, ours, peak)
    ours["meas_s"] = ours["median_s"]
    shipped, shipped_label = shipped_predictions(ours)
    ours["shipped_s"] = shipped
    held = ours[(ours.role != "train") & np.isfinite(ours.pred_s)]
    return {
        "available": True, "split": desc, "split_detail": split, "calibration": cal.to_dict(),
        "n_rows": int(len(ours)), "n_train": int(len(train)),
        "overall": error_stats(held.pred_s, held.meas_s),
        "per_model": grouped_stats(held, "model"),
        "per_pipeline_format": grouped_stats(held, ["pipeline", "format"]),
        "per_role": grouped_stats(held, "role"),
        "shipped": {"label": shipped_label, "all_rows": error_stats(ours.shipped_s, ours.meas_s),
                    "per_pipeline_format": grouped_stats(ours[np.isfinite(ours.shipped_s)], ["pipeline", "format"],
                                                         pred="shipped_s")},
        "frame": ours, "cal": cal,
    }


#: `kvmodel calibrate`'s own run on an H100 (its probes and e2e steps; the attention grid beside it)
H100_E2E_FILE = ("h100", "calibrate", "e2e_decode.csv")
H100_ATTENTION_FILE = ("h100", "decode_attention_v12.csv")


def run_shipped_in_sample(e2e_path: Optional[Path] = None, attention_path: Optional[Path] = None) -> dict:
    """The shipped H100 kvmodel-graph calibration against the e2e rows it was fitted on (in-sample: a check that
    the shipped file and ``kvmodel predict`` reproduce their own data, not a held-out accuracy)."""
    d = load_e2e(e2e_path or data_path(*H100_E2E_FILE))
    if d is None:
        return {"available": False, "reason": f"validation/data/{'/'.join(H100_E2E_FILE)} not present"}
    ours = d[d.runtime == "kvmodel-graph"].copy()
    kv = data_kernel_version(attention_path or data_path(*H100_ATTENTION_FILE))
    ours["shipped_s"], label = shipped_predictions(ours, kernel_version=kv, gpu="h100",
                                                   fitted_on="in-sample: fitted on these rows")
    ours["meas_s"] = ours["median_s"]
    ok = ours[np.isfinite(ours.shipped_s)]
    return {"available": True, "label": label, "n_rows": int(len(ok)), "kernel_version": kv,
            "all_rows": error_stats(ok.shipped_s, ok.meas_s),
            "per_model": grouped_stats(ok, "model", pred="shipped_s"),
            "per_pipeline_format": grouped_stats(ok, ["pipeline", "format"], pred="shipped_s")}


# ----------------------------------------------------------------------------------------------------------------
# Synthetic data (tests and development; never committed as measurements)
# ----------------------------------------------------------------------------------------------------------------


def synthetic_attention(path: Path, seed: int = 0, noise: float = 0.02) -> Path:
    """Write a decode_attention.csv in the benchmark's format from a known ground truth (for tests)."""
    rng = np.random.default_rng(seed)
    shapes = {"llama-3.1-8b": (32, 8, 128), "qwen2.5-7b": (28, 4, 128), "gemma-3-12b": (16, 8, 256),
              "qwen2.5-0.5b": (14, 2, 64)}
    truth_p0 = (6e-6, 4300.0, 8e6, 3.0)
    truth_px = (9e-6, 3900.0, 1.2e7, 3.0)
    truth_dq = (5e-6, 2600.0, 6e6, 3.0)
    occ = {"fp16": OccupancyCurve(6e-6, 40.0, 17.0), "int8": OccupancyCurve(6e-6, 36.0, 16.0),
           "int4": OccupancyCurve(6e-6, 30.0, 15.5), "k8v4": OccupancyCurve(6e-6, 33.0, 15.7),
           "k16v4": OccupancyCurve(6e-6, 35.0, 16.2)}
    rows = []
    ab = traffic.attention_layer_bytes
    for model, (Hq, Hkv, hd) in shapes.items():
        for B in (1, 4, 16, 64):
            for T in (1024, 4096, 16384, 32768):
                for kb, vb in ((16, 16), (8, 8), (4, 4), (8, 4), (16, 4)):
                    fmt = _fmt(kb, vb)
                    plist = ["P5"] + (["P0", "P0-expand"] if fmt == "fp16" else ["P1"])
                    for pl in plist:
                        for variant in ([""] + (["nosplit", "nogqa"] if pl == "P5" and fmt == "int4" else [])):
                            ns = float(split_count(B * Hkv, T, H200_SMS)) if pl == "P5" and variant != "nosplit" \
                                else 1.0
                            if pl == "P0":
                                t = curve_time_s(ab("P0", B, T, Hq, Hkv, hd), *truth_p0)
                            elif pl == "P0-expand":
                                t = curve_time_s(ab("P0-expand", B, T, Hq, Hkv, hd), *truth_px)
                            elif pl == "P1":
                                b0 = ab("P0", B, T, Hq, Hkv, hd)
                                t = curve_time_s(b0, *truth_p0) + curve_time_s(
                                    ab("P1", B, T, Hq, Hkv, hd, kb, vb) - b0, *truth_dq)
                            else:
                                nb = ab("P5", B, T, Hq, Hkv, hd, kb, vb)
                                progs = B * Hkv * ns
                                if variant == "nogqa":
                                    progs = B * Hq * ns
                                    nb = nb * Hq / Hkv
                                t = occ[fmt].time_s(progs, nb, H200_SMS, head_dim=hd)
                            t = float(t) * float(np.exp(noise * rng.standard_normal()))
                            rows.append(dict(pipeline=pl, variant=variant, model=model, B=B, T=T, Hq=Hq, Hkv=Hkv,
                                             d=hd, k_bits=kb, v_bits=vb, group=32, num_splits=int(ns),
                                             median_s=t))
    path = Path(path)
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def synthetic_e2e(path: Path, seed: int = 1, noise: float = 0.02) -> Path:
    """Write an e2e_decode.csv in the measurement's format from a known ground truth (for tests)."""
    rng = np.random.default_rng(seed)
    att_path = Path(path).with_name("_synthetic_attention_truth.csv")
    # the truth's attention curves are fitted on noisy synthetic rows: noise-free rows fit exactly and the robust
    # least squares then crawls to its iteration cap (~500 s instead of ~40 s on a 2-core machine)
    synthetic_attention(att_path, seed=seed + 100)
    att = load_attention(att_path)
    cal = fit_attention(att[att.variant == ""])
    att_path.unlink()
    truth = E2ECalibration(step_overhead_s=25e-6, layer_overhead_s=6e-6,
                           weights=BandwidthCurve(t0_s=2e-6, bw_GBps=4100.0, knee_bytes=3e6), attention=cal)
    rows = []
    for name in ("Qwen2.5-0.5B", "Qwen2.5-7B", "Llama-3.1-8B"):
        for B in (1, 4, 16, 64):
            for T in (1024, 4096, 16384, 32768):
                for pl, kb, vb in (("P0", 16, 16), ("P5", 4, 4), ("P1", 4, 4), ("P5", 8, 8)):
                    rows.append(dict(model=name, B=B, T=T, k_bits=kb, v_bits=vb, pipeline=pl,
                                     runtime="kvmodel-graph", median_s=np.nan, status="ok"))
    d = pd.DataFrame(rows)
    from kvmodel.specs import get_gpu
    from kvmodel.timing import DEFAULT_FLOP_EFFICIENCY

    peak = get_gpu("h200").fp16_dense_TFLOPS * 1e12 * DEFAULT_FLOP_EFFICIENCY
    t = predict_e2e(truth, d, peak)
    d["median_s"] = t * np.exp(noise * rng.standard_normal(len(t)))
    d.to_csv(path, index=False)
    return Path(path)
