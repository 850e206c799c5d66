"""The study's public H100 sweep (knlp v40), modelled with the study's own pipelines and held out.

Pipelines as the study ran them (one attention layer per call, eager PyTorch/Triton launches):

- **P0** (FP16 baseline): ``repeat_interleave`` K/V to every query head, then SDPA. Traffic: ``attn_bytes_P0_expand``.
  Time: one saturating-bandwidth curve ``t0 + smoothmax(bytes, knee)/BW``.
- **P1** (non-fused INT4): PyTorch dequantize to an FP16 buffer, then P0. Time: the P0 curve at the P0-expand bytes
  **plus** a dequantization curve over the dequant step's bytes (INT4 + scales read, FP16 written:
  ``attn_bytes_P1_expand - attn_bytes_P0_expand``). The total traffic is ``attn_bytes_P1_expand``.
- **P5** (fused INT4, no split-K): one program per (sequence, query head) = ``fused_programs_nosplit`` = B*Hq, each
  loading its KV head's quantized tiles (``attn_bytes_P5_nosplit_loads``). Time: the occupancy model
  ``fused_wave_time`` (programs in waves of c_res per SM, a lone program at r_1, sharing programs at r_c each).
- **P3** is the same fused-kernel family; it is *not* fitted: the P5 calibration predicts it (an out-of-sample
  pipeline check).

Calibration split (documented, fixed): the 7 models of :data:`TRAIN_MODELS` at the alternate contexts
:data:`TRAIN_CONTEXTS` are fitted; everything else is held out: the same models at the other contexts ("held-out
contexts") and the 7 other models at every context ("held-out models").
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from kvmodel import traffic
from kvmodel.fused_fit import fit_occupancy
from kvmodel.hill import fit_hill
from kvmodel.specs import BandwidthCurve
from kvmodel.timing import DEFAULT_KERNEL_T0_S, OccupancyCurve, curve_time_s, split_count

from .common import curve_dict, data_path, error_stats, fit_curve, grouped_stats

DATASET = "knlp-v40-h100"
#: Models whose training-context rows calibrate the model (every head_dim 64/128/256 and GQA 2..16 represented).
TRAIN_MODELS = ("deepseek_mla", "gemma3_12b", "gemma3n_e4b", "llama31_8b", "nemotron3_nano", "qwen25_05b",
                "qwen25_7b")
#: Alternate context lengths used for calibration; 1024, 4096, 16384, 65536 are held out.
TRAIN_CONTEXTS = (512, 2048, 8192, 32768, 131072)
#: H100 SXM streaming multiprocessors (the study's GPU: "NVIDIA H100 80GB HBM3").
H100_SMS = 132
SPLIT_DOC = (f"calibrate on models {', '.join(TRAIN_MODELS)} at contexts {', '.join(map(str, TRAIN_CONTEXTS))} "
             "(decode rows; P0, P1, P5); predict every other decode row: those models at contexts 1024/4096/16384/"
             "65536 ('held-out contexts') and the other 7 models at all contexts ('held-out models'); P3 is never "
             "fitted (predicted with the P5 calibration).")

FUSED = ("P3", "P5")
#: Device-side cost of the split-K merge kernel's launch (kvmodel.timing.DEFAULT_KERNEL_T0_S).
MERGE_LAUNCH_S = DEFAULT_KERNEL_T0_S



def load(mode: str = "decode") -> pd.DataFrame:
    """The sweep as one row per (config, T, B, pipeline) with shapes, bytes and programs; times in seconds."""
    d = pd.read_csv(data_path(DATASET, "bench_results_summary.csv"))
    shapes = json.loads(data_path(DATASET, "model_configs.json").read_text())
    d = d[d["mode"] == mode].copy()
    d["Hq"] = d["config"].map(lambda c: shapes[c]["n_heads"]).astype(int)
    d["Hkv"] = d["config"].map(lambda c: shapes[c]["n_kv_heads"]).astype(int)
    d["d"] = d["config"].map(lambda c: shapes[c]["head_dim"]).astype(int)
    d["G"] = d["Hq"] // d["Hkv"]
    d = d.rename(columns={"T_kv": "T"})
    d["meas_s"] = d["median_ms"] * 1e-3
    B, T, Hq, Hkv, hd = (d[c].to_numpy(float) for c in ("B", "T", "Hq", "Hkv", "d"))
    ab = traffic.attention_layer_bytes
    d["bytes_P0x"] = ab("P0-expand", B, T, Hq, Hkv, hd)
    d["bytes_P0"] = ab("P0", B, T, Hq, Hkv, hd)
    d["bytes_P1x"] = ab("P1-expand", B, T, Hq, Hkv, hd, 4, 4, 32)
    d["bytes_dq"] = d["bytes_P1x"] - d["bytes_P0x"]
    d["bytes_P5"] = ab("P5", B, T, Hq, Hkv, hd, 4, 4, 32)
    vals = {"B": B, "T": T, "H_q": Hq, "H_kv": Hkv, "d": hd, "d_v": hd, "d_q": hd, "b_a": 2, "b_k": 4, "b_v": 4,
            "g": 32, "m_k": 2, "m_v": 2}
    d["bytes_P5_loads"] = traffic.evaluate("attn_bytes_P5_nosplit_loads", vals)
    d["programs"] = traffic.evaluate("fused_programs_nosplit", vals)
    d["role"] = np.where(d["config"].isin(TRAIN_MODELS),
                         np.where(d["T"].isin(TRAIN_CONTEXTS), "train", "held-out contexts"), "held-out models")
    return d.reset_index(drop=True)


@dataclass
class StudyCalibration:
    p0: BandwidthCurve
    dequant: BandwidthCurve
    fused: OccupancyCurve
    sm_count: int = H100_SMS
    info: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"P0 (expand + SDPA)": curve_dict(self.p0), "P1 dequantize step": curve_dict(self.dequant),
                "P5 fused, no split-K (occupancy)": self.fused.as_dict(), "sm_count": self.sm_count,
                "fused_plateau_GBps_of_loads": self.fused.plateau_GBps(self.sm_count), **self.info}


def fit(train: pd.DataFrame, sm_count: int = H100_SMS) -> StudyCalibration:
    p0 = train[train.pipeline == "P0"]
    c0 = fit_curve(p0["bytes_P0x"], p0["meas_s"])
    p1 = train[train.pipeline == "P1"]
    base = curve_time_s(p1["bytes_P0x"].to_numpy(float), c0.t0_s, c0.bw_GBps, c0.knee_bytes, c0.sharpness)
    cdq = fit_curve(p1["bytes_dq"], p1["meas_s"], base_s=base)
    p5 = train[train.pipeline == "P5"]
    occ, info = fit_occupancy(p5["programs"], p5["bytes_P5_loads"], p5["meas_s"], sm_count, head_dim=p5["d"])
    return StudyCalibration(p0=c0, dequant=cdq, fused=occ, sm_count=sm_count, info={"fused_fit": info})


def predict(cal: StudyCalibration, d: pd.DataFrame) -> np.ndarray:
    """Predicted seconds per row (P0, P1, P3/P5 models as in the module docstring)."""
    c0, cdq = cal.p0, cal.dequant
    t0 = curve_time_s(d["bytes_P0x"].to_numpy(float), c0.t0_s, c0.bw_GBps, c0.knee_bytes, c0.sharpness)
    tdq = curve_time_s(d["bytes_dq"].to_numpy(float), cdq.t0_s, cdq.bw_GBps, cdq.knee_bytes, cdq.sharpness)
    t5 = cal.fused.time_s(d["programs"].to_numpy(float), d["bytes_P5_loads"].to_numpy(float), cal.sm_count,
                          head_dim=d["d"].to_numpy(float))
    p = d["pipeline"].to_numpy()
    return np.where(p == "P0", t0, np.where(p == "P1", t0 + tdq, np.where(np.isin(p, FUSED), t5, np.nan)))


def splitk_time(cal: StudyCalibration, d: pd.DataFrame, bandwidth_bound: bool = False,
                launch_s: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Predicted seconds of a split-K fused INT4 kernel on the same shapes, and its occupancy.

    One program per sequence x KV head x split, each tile serving all G query heads, so the KV is loaded once
    (``attn_bytes_P5``); programs = ``fused_programs_splitk`` with the split count of the kernel's launcher rule
    (:func:`kvmodel.timing.split_count`). Per-program rates: the study loop's (r_1, r_c as fitted) or, with
    ``bandwidth_bound``, scaled so that the plateau equals the P0 curve's (SDPA's) plateau. ``launch_s``: per-kernel
    fixed cost (default: the fitted t0, i.e. eager Python launches). The merge kernel is enqueued by the same
    wrapper right after kernel 1 (its host cost overlaps kernel 1's launch), so it adds one device-side launch gap,
    :data:`MERGE_LAUNCH_S`, not a second eager launch. Launch-aware: the kernel keeps one split when splitting would
    not pay for that gap.
    """
    f = cal.fused
    t0 = f.t0_s if launch_s is None else launch_s
    scale = (cal.p0.bw_GBps / f.plateau_GBps(cal.sm_count)) if bandwidth_bound else 1.0
    occ = OccupancyCurve(0.0, f.r1_GBps * scale, f.rc_GBps * scale, f.c_res, f.head_dim_exponent)
    bh = (d["B"] * d["Hkv"]).to_numpy(float)
    nbytes = d["bytes_P5"].to_numpy(float)
    hd = d["d"].to_numpy(float)

    def at(ns):
        vals = {"B": d["B"].to_numpy(float), "H_kv": d["Hkv"].to_numpy(float), "n_split": ns}
        programs = traffic.evaluate("fused_programs_splitk", vals)
        dev = occ.time_s(programs, nbytes, cal.sm_count, head_dim=hd)
        return t0 + dev + np.where(ns > 1, MERGE_LAUNCH_S, 0.0), occ.occupancy(programs, cal.sm_count)

    t_rule, occ_rule = at(split_count(bh, d["T"].to_numpy(float), cal.sm_count))
    t_one, occ_one = at(np.ones_like(bh))
    # launch-aware: one split when the merge launch costs more than splitting saves (launch-bound calls)
    return np.minimum(t_rule, t_one), np.where(t_one < t_rule, occ_one, occ_rule)


def _gqa_p0_time(cal: StudyCalibration, d: pd.DataFrame, launch_s: float | None = None) -> np.ndarray:
    """SDPA with enable_gqa (P0, no expansion) on the P0 curve: the FP16 KV read once."""
    c0 = cal.p0
    t0 = c0.t0_s if launch_s is None else launch_s
    return curve_time_s(d["bytes_P0"].to_numpy(float), t0, c0.bw_GBps, c0.knee_bytes, c0.sharpness)


def hill_analysis(d: pd.DataFrame, cal: StudyCalibration) -> dict:
    """Measured vs model-predicted speedup S(B) = t(P0) / t(P5) per configuration, their Hill fits, the mechanism
    (traffic ratio x occupancy) and the split-K prediction."""
    p = d.pivot_table(index=["config", "T", "B", "Hq", "Hkv", "d", "G"], columns="pipeline",
                      values=["meas_s", "pred_s"]).dropna()
    keys = p.index.to_frame(index=False)
    S_meas = (p[("meas_s", "P0")] / p[("meas_s", "P5")]).to_numpy()
    S_pred = (p[("pred_s", "P0")] / p[("pred_s", "P5")]).to_numpy()
    shp = d[d.pipeline == "P5"].set_index(["config", "T", "B"])
    k3 = pd.MultiIndex.from_frame(keys[["config", "T", "B"]])
    sub = shp.loc[k3].reset_index()
    t_p0x_pred = p[("pred_s", "P0")].to_numpy()
    t_split, occ_split = splitk_time(cal, sub)
    t_split_bw, _ = splitk_time(cal, sub, bandwidth_bound=True)
    t_gqa = _gqa_p0_time(cal, sub)
    occ = cal.fused.occupancy(sub["programs"].to_numpy(float), cal.sm_count)
    traffic_ratio = (sub["bytes_P0x"] / sub["bytes_P5_loads"]).to_numpy()
    bw_p0 = (sub["bytes_P0x"].to_numpy() / t_p0x_pred) / 1e9
    frame = keys.assign(S_meas=S_meas, S_pred=S_pred, S_splitk=t_p0x_pred / t_split,
                        S_splitk_bw=t_p0x_pred / t_split_bw, S_splitk_vs_gqa=t_gqa / t_split_bw,
                        occupancy=occ, occupancy_splitk=occ_split,
                        traffic_ratio=traffic_ratio, bw_p0_GBps=bw_p0)
    sel = frame.B >= 4
    fm = fit_hill(frame.B[sel], frame.S_meas[sel])
    fp = fit_hill(frame.B[sel], frame.S_pred[sel])
    by_b = frame.groupby("B").agg(S_meas=("S_meas", "median"), S_pred=("S_pred", "median"),
                                  S_splitk=("S_splitk", "median"), S_splitk_bw=("S_splitk_bw", "median"),
                                  S_splitk_vs_gqa=("S_splitk_vs_gqa", "median"),
                                  min_S_splitk=("S_splitk", "min"), min_S_splitk_vs_gqa=("S_splitk_vs_gqa", "min"),
                                  occupancy=("occupancy", "median"), occupancy_splitk=("occupancy_splitk", "median"),
                                  traffic_ratio=("traffic_ratio", "median"), n=("S_meas", "size")).reset_index()
    resid = frame.S_meas - frame.S_pred
    r2_cfg = 1 - float(np.sum(resid ** 2)) / float(np.sum((frame.S_meas - frame.S_meas.mean()) ** 2))
    return {
        "fit_measured": fm.to_dict(),
        "fit_model": fp.to_dict(),
        "model_vs_measured_speedup_R2_per_config": r2_cfg,
        "model_vs_measured_speedup_abs_pct": error_stats(frame.S_pred, frame.S_meas),
        "by_batch": by_b.to_dict(orient="records"),
        "frame": frame,
    }


def run() -> dict:
    """Fit on the documented split, predict every decode row, summarize errors and the Hill analysis."""
    d = load()
    train = d[(d.role == "train") & d.pipeline.isin(["P0", "P1", "P5"])]
    cal = fit(train)
    d["pred_s"] = predict(cal, d)
    held = d[d.role != "train"]
    per_pipeline = {}
    for pl in ("P0", "P1", "P5", "P3"):
        h = held[held.pipeline == pl]
        per_pipeline[pl] = {"all held-out": error_stats(h.pred_s, h.meas_s),
                            **{r: error_stats(g.pred_s, g.meas_s) for r, g in h.groupby("role")}}
    fitted = {pl: error_stats(g.pred_s, g.meas_s) for pl, g in d[d.role == "train"].groupby("pipeline")}
    per_model = {pl: grouped_stats(held[held.pipeline == pl], "config") for pl in ("P0", "P1", "P5")}
    hill = hill_analysis(d, cal)
    return {"split": SPLIT_DOC, "calibration": cal.to_dict(), "per_pipeline_heldout": per_pipeline,
            "fitted_rows": fitted, "per_model_heldout": per_model,
            "heldout_all_pipelines": error_stats(held[held.pipeline.isin(["P0", "P1", "P5"])].pred_s,
                                                 held[held.pipeline.isin(["P0", "P1", "P5"])].meas_s),
            "hill": hill, "frame": d, "cal": cal}
