"""What-if studies: sweeps over GPUs x models x contexts x batches x KV formats (x tensor-parallel degrees), their
tables (CSV, Parquet) and plots, and capacity planning.

Orchestration only. Times come from :mod:`kvmodel.predict` (weights_time_s, attention_time_s, the all-reduce),
bytes from formulas through :func:`kvmodel.traffic.evaluate`; per-layer precision policies through
:mod:`kvmodel.policies`. Each (GPU, model, format, TP) combination is one vectorized numpy evaluation over the whole
batch x context grid.

Value lists (command line or study file): ``1k,4k,32k``; geometric ranges ``1k:128k:x2``; arithmetic ranges
``1024:8192:+1024``; ``a:b`` is ``a:b:x2``. Tokens take k = 1024 and m = 1024^2.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from kvmodel import traffic
from kvmodel.policies import (
    KVPolicy,
    as_policy,
    check_policy,
    load_policy,
    policy_attention_time_s,
    policy_groups,
)
from kvmodel.atomic import atomic_write
from kvmodel.predict import (
    DEFAULT_FRAGMENTATION,
    DEFAULT_WORKSPACE_BYTES,
    FP16,
    allreduce_terms,
    allreduce_time_s,
    attention_time_s,
    tp_link,
    weights_time_s,
)
from kvmodel.specs import (
    GPUSpec,
    KVFormat,
    ModelSpec,
    get_gpu,
    get_model,
    load_yaml_spec,
    parse_kv_format,
    parse_tokens,
)
from kvmodel.timing import TimeModel

WEIGHT_DTYPES = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5}

#: Above this many configurations a sweep shows a progress bar on stderr.
PROGRESS_THRESHOLD = 200_000
#: At most this many values in one list after expanding ranges (a typo like 1:1m:+1 must not eat the machine).
MAX_VALUES = 100_000


# ----------------------------------------------------------------------------------------------------------------
# Value lists and ranges
# ----------------------------------------------------------------------------------------------------------------


def _num(text: str, tokens: bool) -> int:
    if tokens:
        return parse_tokens(text)
    t = text.strip()
    if not re.fullmatch(r"\d+", t) or int(t) <= 0:
        raise ValueError(f"not a positive whole number: {text!r}")
    return int(t)


def parse_values(text: str | int | list, tokens: bool = False) -> list[int]:
    """Expand ``1k,4k,32k``, ``1k:128k:x2``, ``1:128:x2``, ``1024:8192:+1024`` (and lists of those) into sorted
    unique positive integers. ``tokens``: accept k/m suffixes (k = 1024)."""
    if isinstance(text, list):
        out: list[int] = []
        for item in text:
            out += parse_values(item, tokens)
        return sorted(set(out))
    if isinstance(text, int) and not isinstance(text, bool):
        if text <= 0:
            raise ValueError(f"values must be positive, got {text}")
        return [text]
    vals: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            raise ValueError(f"empty item in list {text!r}")
        if ":" in part:
            bits = part.split(":")
            if len(bits) not in (2, 3):
                raise ValueError(f"range {part!r}: use start:stop[:xF|:+S]")
            a, b = _num(bits[0], tokens), _num(bits[1], tokens)
            step = bits[2].strip().lower() if len(bits) == 3 else "x2"
            if b < a:
                raise ValueError(f"range {part!r} runs backwards")
            m = re.fullmatch(r"x(\d+(?:\.\d+)?)", step)
            n = re.fullmatch(r"\+(\S+)", step)
            if m:
                f = float(m.group(1))
                if f <= 1:
                    raise ValueError(f"range {part!r}: the factor must exceed 1")
                v = float(a)
                while v <= b * (1 + 1e-12):
                    vals.append(int(round(v)))
                    v *= f
                    if len(vals) > MAX_VALUES:
                        raise ValueError(f"range {part!r} expands to more than {MAX_VALUES} values")
            elif n:
                s = _num(n.group(1), tokens)
                if (b - a) // s + 1 > MAX_VALUES:
                    raise ValueError(f"range {part!r} expands to more than {MAX_VALUES} values")
                vals += list(range(a, b + 1, s))
            else:
                raise ValueError(f"range {part!r}: step must be xF (geometric) or +S (arithmetic)")
        else:
            vals.append(_num(part, tokens))
    return sorted(set(vals))


def parse_formats(items: list[str], group_size: int = 32, asymmetric: bool = False) -> list:
    """KV formats (fp16, fp8, int8, int4, kNvM) or per-layer policy YAML files (paths ending .yaml/.yml)."""
    out = []
    for it in items:
        for name in str(it).split(","):
            name = name.strip()
            if not name:
                continue
            if name.endswith((".yaml", ".yml")):
                out.append(load_policy(name))
            else:
                out.append(parse_kv_format(name, group_size=group_size, asymmetric=asymmetric))
    if not out:
        raise ValueError("no KV formats given")
    return out


def fmt_label(f) -> str:
    return f.label


# ----------------------------------------------------------------------------------------------------------------
# Study files
# ----------------------------------------------------------------------------------------------------------------


class StudySpec(BaseModel):
    """A sweep described in YAML (every key optional except gpus, models, contexts)."""

    model_config = ConfigDict(extra="forbid")

    name: str = "sweep"
    gpus: list[str] = Field(min_length=1)
    models: list[str] = Field(min_length=1)
    contexts: list[int | str] = Field(min_length=1, description="tokens: 1k, 1k:128k:x2, ...")
    batches: list[int | str] = Field(default_factory=lambda: [1])
    kv: list[str] = Field(default_factory=lambda: ["fp16", "int4"], description="formats or policy YAML paths")
    tp: list[int] = Field(default_factory=lambda: [1])
    group_size: int = 32
    asymmetric: bool = False
    pipeline: str = "P5"
    weights: str = "bf16"
    plots: bool = True

    @field_validator("pipeline")
    @classmethod
    def _pipe(cls, v):
        if v not in ("P5", "P1", "P0", "P0-expand", "P1-expand"):
            raise ValueError("pipeline must be one of P5, P1, P0, P0-expand, P1-expand")
        return v

    @field_validator("weights")
    @classmethod
    def _w(cls, v):
        if v not in WEIGHT_DTYPES:
            raise ValueError(f"weights must be one of {', '.join(sorted(WEIGHT_DTYPES))}")
        return v

    @field_validator("tp")
    @classmethod
    def _tp(cls, v):
        if any(int(x) < 1 for x in v):
            raise ValueError("tp degrees must be >= 1")
        return v


def load_study(path: str | Path) -> StudySpec:
    """Read a study YAML (yaml.safe_load, validated with extra="forbid"); problems become SpecErrors naming the
    file and the field."""
    path = Path(path)
    spec = load_yaml_spec(path, StudySpec)
    # resolve relative policy paths against the study file
    kv = [str(path.parent / k) if k.endswith((".yaml", ".yml")) and not Path(k).is_absolute() else k
          for k in spec.kv]
    return spec.model_copy(update={"kv": kv})


# ----------------------------------------------------------------------------------------------------------------
# The sweep
# ----------------------------------------------------------------------------------------------------------------

COLUMNS = ["gpu", "model", "kv", "tp", "batch", "context", "step_time_s", "tokens_per_s", "tokens_per_s_per_seq",
           "fp16_step_time_s", "speedup_vs_fp16", "weights_bytes", "kv_read_bytes", "kv_fraction", "regime",
           "crossover_context", "footprint_per_gpu_bytes", "usable_bytes", "fits", "allreduce_time_s", "flops",
           "arithmetic_intensity", "ridge_flop_per_byte", "timing"]


def _fmt_values(model: ModelSpec, f: KVFormat, wbpp: float, **kw) -> dict:
    v = traffic.model_symbols(model)
    v.update(traffic.kv_symbols(f))
    v.update(b_w=wbpp, M_ws=DEFAULT_WORKSPACE_BYTES, phi=DEFAULT_FRAGMENTATION, **kw)
    return v


def _policy_sum(model, policy, wbpp, name, **kw):
    """Sum a per-layer-group formula over a policy's groups (L = the group's layers)."""
    L = model.num_layers
    out = 0.0
    for f, n in policy_groups(policy, model):
        v = _fmt_values(model, f, wbpp, **kw)
        v["L_s"] = v["L_s"] * n / L
        v["L"] = n
        out = out + traffic.evaluate(name, v)
    return out


def sweep_combo(gpu: GPUSpec, model: ModelSpec, fmt, batches, contexts, tp: int = 1, pipeline: str = "P5",
                weight_bytes_per_param: float = 2.0, calibration=None) -> dict[str, np.ndarray]:
    """All sweep columns for one GPU x model x format x TP over the batch x context grid (arrays of shape
    (len(batches), len(contexts)))."""
    pol = as_policy(fmt)
    check_policy(pol, model) if isinstance(pol, KVPolicy) else _check_format(pol.kv, model)
    tp_link(gpu, tp)  # raises for a bad degree or a GPU without a GPU-GPU link
    tm = TimeModel(gpu, calibration)
    B = np.asarray(batches, dtype=float)[:, None]
    T = np.asarray(contexts, dtype=float)[None, :]
    wb = weight_bytes_per_param
    overhead = tm.step_overhead_s + model.num_layers * tm.layer_overhead_s
    t_w = overhead + weights_time_s(tm, model, B, wb, tp=tp)
    t_ar = allreduce_time_s(model, B, tp, *allreduce_terms(tm, tp)) if tp > 1 else np.zeros_like(B)
    t16 = t_w + attention_time_s(tm, model, FP16, B, T, "P0", tp=tp) + t_ar
    if pipeline.startswith("P0"):
        t = t_w + attention_time_s(tm, model, FP16, B, T, pipeline, tp=tp) + t_ar
    else:
        t = t_w + policy_attention_time_s(tm, model, pol, B, T, pipeline, tp=tp) + t_ar
    shape = np.broadcast(B, T).shape
    t = np.broadcast_to(t, shape)
    t16 = np.broadcast_to(t16, shape)
    kv_read = np.broadcast_to(_policy_sum(model, pol, wb, "kv_read_bytes", B=B, T=T), shape)
    v0 = _fmt_values(model, policy_groups(pol, model)[0][0], wb, B=B, T=T, M_cap=gpu.memory_capacity_bytes)
    weights = np.broadcast_to(traffic.evaluate("weight_bytes_streamed", v0), shape)
    # per-GPU footprint: weight shard + ceil(H_kv / N) heads of every layer group + workspace
    kv_cache_gpu = 0.0
    for f, n in policy_groups(pol, model):
        v = _fmt_values(model, f, wb, B=B, T=T, N=tp)
        v["L_s"] = v["L_s"] * n / model.num_layers
        v["L"] = n
        kv_cache_gpu = kv_cache_gpu + traffic.evaluate("kv_cache_bytes_per_gpu", v)
    resident = traffic.evaluate("weight_bytes_resident", v0) / tp
    footprint = np.broadcast_to(resident + kv_cache_gpu + DEFAULT_WORKSPACE_BYTES, shape)
    usable = float(traffic.evaluate("usable_memory", v0))
    # crossover context of the (first-group) format: KV reads = streamed weights at this batch
    cross = np.broadcast_to(traffic.evaluate("crossover_context", {**v0, "B": B}), shape)
    other = traffic.evaluate("kv_write_bytes", v0) + traffic.evaluate("activation_bytes", v0)
    flops = np.broadcast_to(traffic.evaluate("step_flops", v0), shape)
    total_bytes = weights + kv_read + other
    return {
        "step_time_s": t,
        "tokens_per_s": np.broadcast_to(B, shape) / t,
        "tokens_per_s_per_seq": 1.0 / t,
        "fp16_step_time_s": t16,
        "speedup_vs_fp16": t16 / t,
        "weights_bytes": weights,
        "kv_read_bytes": kv_read,
        "kv_fraction": kv_read / total_bytes,
        "crossover_context": cross,
        "footprint_per_gpu_bytes": footprint,
        "usable_bytes": np.full(shape, usable),
        "fits": footprint <= usable,
        "allreduce_time_s": np.broadcast_to(t_ar, shape),
        "flops": flops,
        "arithmetic_intensity": flops / total_bytes,
    }


def _check_format(kv: KVFormat, model: ModelSpec):
    for bits, dim in ((kv.k_bits, model.k_dim_cached), (kv.v_bits, model.v_dim_cached)):
        if bits < 16 and dim % kv.group_size:
            raise ValueError(f"group size {kv.group_size} does not divide head_dim {dim} of {model.name}")


def run_sweep(gpus: list[GPUSpec], models: list[ModelSpec], formats: list, batches, contexts, tps=(1,),
              pipeline: str = "P5", weight_bytes_per_param: float = 2.0, calibrations: dict | None = None,
              progress: bool | None = None, warn: Callable[[str], None] = lambda m: None):
    """The sweep as a pandas DataFrame (one row per configuration, COLUMNS). Combinations that cannot run
    (TP > 1 on a GPU without a GPU-GPU link, a group size that does not divide head_dim) are skipped with a
    warning through ``warn``."""
    import pandas as pd

    batches = np.asarray(sorted(set(int(b) for b in batches)))
    contexts = np.asarray(sorted(set(int(t) for t in contexts)))
    combos = [(g, m, f, tp) for g in gpus for m in models for f in formats for tp in tps]
    n_cfg = len(combos) * len(batches) * len(contexts)
    show = progress if progress is not None else n_cfg >= PROGRESS_THRESHOLD
    frames = []
    BB, TT = np.meshgrid(batches, contexts, indexing="ij")

    def _iter():
        if show:
            import click

            with click.progressbar(combos, label=f"sweep ({n_cfg:,} configs)", file=sys.stderr) as bar:
                yield from bar
        else:
            yield from combos

    for g, m, f, tp in _iter():
        try:
            cols = sweep_combo(g, m, f, batches, contexts, tp, pipeline, weight_bytes_per_param,
                               (calibrations or {}).get(g.name))
        except ValueError as e:
            warn(f"skipped {g.name} x {m.name} x {fmt_label(f)} x tp{tp}: {e}")
            continue
        tm_label = TimeModel(g, (calibrations or {}).get(g.name)).label
        n = BB.size
        data = {"gpu": np.full(n, g.name, dtype=object), "model": np.full(n, m.name, dtype=object),
                "kv": np.full(n, fmt_label(f), dtype=object), "tp": np.full(n, tp), "batch": BB.ravel(),
                "context": TT.ravel()}
        for k, a in cols.items():
            data[k] = np.ascontiguousarray(a).ravel()
        data["regime"] = np.where(data["kv_read_bytes"] > data["weights_bytes"], "KV-bound", "weight-bound")
        data["ridge_flop_per_byte"] = np.full(n, g.ridge_flop_per_byte)
        data["timing"] = np.full(n, tm_label, dtype=object)
        frames.append(pd.DataFrame(data)[COLUMNS])
    if not frames:
        return pd.DataFrame(columns=COLUMNS)
    return pd.concat(frames, ignore_index=True)


# ----------------------------------------------------------------------------------------------------------------
# Atomic outputs
# ----------------------------------------------------------------------------------------------------------------


def write_tables(df, out_dir: str | Path, name: str = "sweep") -> list[Path]:
    """CSV and Parquet (pyarrow), each written atomically."""
    out_dir = Path(out_dir)
    csv_path = atomic_write(out_dir / f"{name}.csv", lambda p: df.to_csv(p, index=False))
    pq_path = atomic_write(out_dir / f"{name}.parquet", lambda p: df.to_parquet(p, index=False, engine="pyarrow"))
    return [csv_path, pq_path]


# ----------------------------------------------------------------------------------------------------------------
# Plots (matplotlib, Agg)
# ----------------------------------------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", s).strip("-").lower()


def _save(fig, path: Path) -> Path:
    plt = _plt()
    try:
        fig.tight_layout()
    except Exception:  # noqa: BLE001 - layout is cosmetic
        pass
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return path


def _grid(sub, col):
    piv = sub.pivot_table(index="batch", columns="context", values=col, aggfunc="first")
    return piv.index.values, piv.columns.values, piv.values


def _heat(ax, Bs, Ts, Z, label, log=False, fits=None, cmap="viridis", center=None):
    from matplotlib.colors import LogNorm, TwoSlopeNorm

    norm = None
    Zp = np.asarray(Z, dtype=float)
    if log and np.nanmin(Zp) > 0:
        norm = LogNorm(vmin=np.nanmin(Zp), vmax=np.nanmax(Zp))
    elif center is not None:
        # keep the center on the neutral colour even when every value is on one side of it (all slowdowns
        # must read as red, all speedups as blue)
        lo, hi = np.nanmin(Zp), np.nanmax(Zp)
        span = max(hi - center, center - lo, 1e-9)
        norm = TwoSlopeNorm(vcenter=center, vmin=min(lo, center - 1e-3 * span), vmax=max(hi, center + 1e-3 * span))
    im = ax.pcolormesh(np.arange(len(Ts) + 1), np.arange(len(Bs) + 1), Zp, norm=norm, cmap=cmap, shading="flat")
    if fits is not None and (~fits).any():
        yy, xx = np.nonzero(~fits)
        ax.scatter(xx + 0.5, yy + 0.5, marker="x", s=12, c="white", linewidths=0.8, label="does not fit")
    step_t = max(1, len(Ts) // 8)
    step_b = max(1, len(Bs) // 8)
    ax.set_xticks(np.arange(len(Ts))[::step_t] + 0.5)
    ax.set_xticklabels([_tok(t) for t in Ts[::step_t]], rotation=45, fontsize=7)
    ax.set_yticks(np.arange(len(Bs))[::step_b] + 0.5)
    ax.set_yticklabels([str(int(b)) for b in Bs[::step_b]], fontsize=7)
    ax.set_xlabel("context")
    ax.set_ylabel("batch")
    return im


def _tok(t) -> str:
    t = int(t)
    if t >= 1 << 20 and t % (1 << 20) == 0:
        return f"{t >> 20}m"
    if t >= 1024 and t % 1024 == 0:
        return f"{t >> 10}k"
    return str(t)


def plot_sweep(df, out_dir: str | Path, max_files: int = 60) -> list[Path]:
    """Heatmaps of tokens/s and of speedup vs FP16 per (GPU, model, TP), a regime map per GPU with the crossover
    context T*(B) of each format from the symbolic model, and a roofline per GPU."""
    plt = _plt()
    out_dir = Path(out_dir)
    paths: list[Path] = []
    if df.empty:
        return paths
    many_b = df["batch"].nunique() > 1
    many_t = df["context"].nunique() > 1
    for (g, m, tp), sub in df.groupby(["gpu", "model", "tp"], sort=False):
        if len(paths) >= max_files:
            break
        if many_b and many_t:
            kvs = list(dict.fromkeys(sub["kv"]))
            fig, axes = plt.subplots(1, len(kvs), figsize=(4.2 * len(kvs), 3.6), squeeze=False)
            for ax, k in zip(axes[0], kvs):
                s = sub[sub["kv"] == k]
                Bs, Ts, Z = _grid(s, "tokens_per_s")
                _, _, F = _grid(s, "fits")
                im = _heat(ax, Bs, Ts, Z, "tokens/s", log=True, fits=F.astype(bool))
                ax.set_title(f"{k}", fontsize=9)
                fig.colorbar(im, ax=ax, label="tokens/s (aggregate)")
            fig.suptitle(f"{m} on {g}{'' if tp == 1 else f' (TP {tp})'}: tokens/s; x = does not fit", fontsize=10)
            paths.append(_save(fig, out_dir / f"heatmap_tokens_per_s_{_slug(g)}_{_slug(m)}_tp{tp}.png"))
            kvq = [k for k in kvs if k != "fp16"]
            if kvq:
                fig, axes = plt.subplots(1, len(kvq), figsize=(4.2 * len(kvq), 3.6), squeeze=False)
                for ax, k in zip(axes[0], kvq):
                    s = sub[sub["kv"] == k]
                    Bs, Ts, Z = _grid(s, "speedup_vs_fp16")
                    _, _, F = _grid(s, "fits")
                    im = _heat(ax, Bs, Ts, Z, "speedup", fits=F.astype(bool), cmap="RdBu", center=1.0)
                    ax.set_title(f"{k} vs fp16", fontsize=9)
                    fig.colorbar(im, ax=ax, label="step speedup vs FP16 KV")
                fig.suptitle(f"{m} on {g}{'' if tp == 1 else f' (TP {tp})'}: speedup of quantized KV", fontsize=10)
                paths.append(_save(fig, out_dir / f"heatmap_speedup_{_slug(g)}_{_slug(m)}_tp{tp}.png"))
    # regime map: per model, KV fraction of the first format with T*(B) for every format
    models = list(dict.fromkeys(df["model"]))
    g0 = df["gpu"].iloc[0]
    if many_b or many_t:
        n = len(models)
        cols = min(n, 3)
        rows = math.ceil(n / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.8 * rows), squeeze=False)
        for ax, m in zip(axes.ravel(), models):
            sub = df[(df["model"] == m) & (df["gpu"] == g0) & (df["tp"] == df["tp"].min())]
            kvs = list(dict.fromkeys(sub["kv"]))
            s0 = sub[sub["kv"] == kvs[0]]
            Bs, Ts, Z = _grid(s0, "kv_fraction")
            if many_b and many_t:
                X, Y = np.meshgrid(Ts, Bs)
                ax.contourf(X, Y, Z, levels=[0, 0.5, 1], colors=["#cfe3f5", "#f5d5cf"], alpha=0.9)
                ax.set_xscale("log", base=2)
                ax.set_yscale("log", base=2)
            for k in kvs:
                s = sub[sub["kv"] == k]
                cross = s.groupby("batch")["crossover_context"].first()
                ok = np.isfinite(cross.values) & (cross.values > 0)
                ax.plot(cross.values[ok], cross.index.values[ok], label=f"T*(B) {k}")
            if len(Ts) > 1:
                ax.set_xlim(Ts.min(), Ts.max())
            if len(Bs) > 1:
                ax.set_ylim(Bs.min(), Bs.max())
            ax.set_xlabel("context (tokens)")
            ax.set_ylabel("batch")
            ax.set_title(f"{m}: weight-bound (blue) vs KV-bound (red), {kvs[0]}", fontsize=8)
            ax.legend(fontsize=6)
        for ax in axes.ravel()[n:]:
            ax.axis("off")
        paths.append(_save(fig, out_dir / "regime_map.png"))
    # roofline per GPU
    for g, sub in df.groupby("gpu", sort=False):
        from kvmodel.specs import get_gpu as _gg

        spec = _gg(g)
        fig, ax = plt.subplots(figsize=(5.5, 4))
        I = np.geomspace(max(sub["arithmetic_intensity"].min() / 2, 1e-2), max(sub["arithmetic_intensity"].max() * 2,
                                                                             spec.ridge_flop_per_byte * 4), 200)
        peak = spec.fp16_dense_TFLOPS * 1e12
        bw = spec.memory_bandwidth_GBps * 1e9
        ax.loglog(I, np.minimum(peak, bw * I), "k-", lw=1, label="datasheet roofline")
        achieved = sub["flops"] / sub["step_time_s"] / sub["tp"]
        for k, s in sub.assign(achieved=achieved).groupby("kv", sort=False):
            ax.scatter(s["arithmetic_intensity"], s["achieved"], s=4, alpha=0.5, label=k)
        ax.axvline(spec.ridge_flop_per_byte, color="grey", ls=":", lw=0.8)
        ax.set_xlabel("arithmetic intensity (FLOP / byte)")
        ax.set_ylabel("achieved FLOP/s per GPU (predicted)")
        ax.set_title(f"roofline - {g}", fontsize=9)
        ax.legend(fontsize=6, markerscale=3)
        paths.append(_save(fig, out_dir / f"roofline_{_slug(g)}.png"))
    return paths


# ----------------------------------------------------------------------------------------------------------------
# Capacity planning
# ----------------------------------------------------------------------------------------------------------------


class SLO(BaseModel):
    model_config = ConfigDict(extra="forbid")

    step_time_s: float | None = Field(default=None, gt=0, description="max seconds per decode step")
    tokens_per_s_per_user: float | None = Field(default=None, gt=0)
    aggregate_tokens_per_s: float | None = Field(default=None, gt=0, description="per replica (TP group)")

    def describe(self) -> str:
        parts = []
        if self.step_time_s:
            parts.append(f"step <= {self.step_time_s * 1e3:g} ms")
        if self.tokens_per_s_per_user:
            parts.append(f">= {self.tokens_per_s_per_user:g} tok/s per user")
        if self.aggregate_tokens_per_s:
            parts.append(f">= {self.aggregate_tokens_per_s:g} tok/s aggregate")
        return ", ".join(parts) or "none (fits in memory)"


class PlanOption(BaseModel):
    model_config = ConfigDict(extra="forbid")

    gpu: str
    tp: int
    kv: str
    batch: int
    step_time_s: float
    tokens_per_s: float
    tokens_per_s_per_user: float
    footprint_per_gpu_GiB: float
    usable_per_gpu_GiB: float
    bound: str = Field(description="memory-bandwidth or compute (roofline at this point)")
    meets: bool
    reason: str = Field(description="why it fails the SLO ('' when it meets it)")
    price_per_gpu_hour: float | None = None
    cost_per_million_tokens: float | None = None


def plan(model: ModelSpec, context: int, slo: SLO, gpus: list[GPUSpec], formats: list, batches, tps=(1,),
         prices: dict[str, float] | None = None, weight_bytes_per_param: float = 2.0,
         calibrations: dict | None = None) -> tuple[list[PlanOption], list[PlanOption]]:
    """(meeting, failing). ``meeting``: per GPU x TP x format, the largest batch meeting the SLO (the cheapest per
    token), ranked by cost per million tokens when prices are given, else by tokens/s per GPU. ``failing``: per
    GPU x TP x format that meets it at no batch, the option closest to it with the reason (memory, bandwidth,
    compute, or no GPU link for TP)."""
    GiB = 1024**3
    prices = prices or {}
    meet: list[PlanOption] = []
    fail: list[PlanOption] = []
    batches = sorted(set(int(b) for b in batches))
    for g in gpus:
        for tp in tps:
            for f in formats:
                label = fmt_label(f)
                try:
                    c = sweep_combo(g, model, f, batches, [context], tp, "P5", weight_bytes_per_param,
                                    (calibrations or {}).get(g.name))
                except ValueError as e:
                    fail.append(PlanOption(gpu=g.name, tp=tp, kv=label, batch=0, step_time_s=math.nan,
                                           tokens_per_s=0.0, tokens_per_s_per_user=0.0, footprint_per_gpu_GiB=math.nan,
                                           usable_per_gpu_GiB=g.memory_capacity_GiB, bound="-", meets=False,
                                           reason=f"unavailable: {e}"))
                    continue
                price = prices.get(g.name)
                opts = []
                for i, B in enumerate(batches):
                    t = float(c["step_time_s"][i, 0])
                    fits = bool(c["fits"][i, 0])
                    tps_agg = B / t
                    compute = c["arithmetic_intensity"][i, 0] >= g.ridge_flop_per_byte
                    bound = "compute" if compute else "memory-bandwidth"
                    reasons = []
                    if not fits:
                        reasons.append(f"memory: needs {c['footprint_per_gpu_bytes'][i, 0] / GiB:.1f} GiB per GPU, "
                                       f"{c['usable_bytes'][i, 0] / GiB:.1f} GiB usable")
                    kind = "compute" if compute else "bandwidth"
                    if slo.step_time_s and t > slo.step_time_s:
                        reasons.append(f"{kind}: step {t * 1e3:.2f} ms > {slo.step_time_s * 1e3:g} ms")
                    if slo.tokens_per_s_per_user and 1 / t < slo.tokens_per_s_per_user:
                        reasons.append(f"{kind}: {1 / t:.1f} tok/s per user < {slo.tokens_per_s_per_user:g}")
                    if slo.aggregate_tokens_per_s and tps_agg < slo.aggregate_tokens_per_s:
                        reasons.append(f"{kind}: {tps_agg:,.0f} tok/s aggregate < {slo.aggregate_tokens_per_s:g}")
                    cost = (price * tp / 3600.0 / tps_agg * 1e6) if price else None
                    opts.append(PlanOption(
                        gpu=g.name, tp=tp, kv=label, batch=B, step_time_s=t, tokens_per_s=tps_agg,
                        tokens_per_s_per_user=1 / t, footprint_per_gpu_GiB=float(c["footprint_per_gpu_bytes"][i, 0]) / GiB,
                        usable_per_gpu_GiB=float(c["usable_bytes"][i, 0]) / GiB, bound=bound, meets=not reasons,
                        reason="; ".join(reasons), price_per_gpu_hour=price, cost_per_million_tokens=cost))
                ok = [o for o in opts if o.meets]
                if ok:
                    meet.append(max(ok, key=lambda o: o.tokens_per_s))
                else:
                    # the most informative failure: the largest batch that fits, else the smallest batch
                    fitting = [o for o in opts if not o.reason.startswith("memory")]
                    fail.append(max(fitting, key=lambda o: o.tokens_per_s) if fitting else opts[0])
    if prices and all(o.cost_per_million_tokens is not None for o in meet):
        meet.sort(key=lambda o: o.cost_per_million_tokens)
    else:
        meet.sort(key=lambda o: (o.cost_per_million_tokens is None, o.cost_per_million_tokens or 0,
                                 -o.tokens_per_s / o.tp))
    return meet, fail


def parse_prices(items: list[str]) -> dict[str, float]:
    """``h100=2.5`` (dollars per GPU-hour) -> {catalog GPU name: price}."""
    out = {}
    for it in items:
        for part in str(it).split(","):
            if not part.strip():
                continue
            if "=" not in part:
                raise ValueError(f"price {part!r}: use GPU=DOLLARS_PER_HOUR, e.g. h100=2.5")
            name, val = part.split("=", 1)
            try:
                p = float(val)
            except ValueError:
                raise ValueError(f"price {part!r}: {val!r} is not a number") from None
            if not p > 0 or not math.isfinite(p):
                raise ValueError(f"price {part!r}: must be a positive number")
            out[get_gpu(name.strip()).name] = p
    return out


def resolve_gpus(names: list[str]) -> list[GPUSpec]:
    out = []
    for n in names:
        for part in str(n).split(","):
            if part.strip():
                out.append(get_gpu(part.strip()))
    return list({g.name: g for g in out}.values())


def resolve_models(names: list[str]) -> list[ModelSpec]:
    out = []
    for n in names:
        for part in ([n] if str(n).endswith(".json") else str(n).split(",")):
            if part.strip():
                out.append(get_model(part.strip()))
    return list({m.name: m for m in out}.values())


__all__ = [
    "COLUMNS",
    "SLO",
    "WEIGHT_DTYPES",
    "PlanOption",
    "StudySpec",
    "atomic_write",
    "load_study",
    "parse_formats",
    "parse_prices",
    "parse_values",
    "plan",
    "plot_sweep",
    "resolve_gpus",
    "resolve_models",
    "run_sweep",
    "sweep_combo",
    "write_tables",
]
